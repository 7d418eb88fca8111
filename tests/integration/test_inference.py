"""Using what was trained: KV-cached generation, sampling controls, span filling, fill-mask, the export and
generate scripts, continued pretraining from an exported folder, and damaged checkpoints."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmtrain.config import to_dataclass
from llmtrain.data.tokenizer import train_bpe, train_tokenizer
from llmtrain.inference.evaluate import evaluate_model
from llmtrain.inference.export import export_hf
from llmtrain.inference.generate import (
    choose_next,
    fill_in,
    fill_mask,
    fill_spans,
    generate_seq2seq,
    sample,
)
from llmtrain.inference.loading import CheckpointError, load_trained_model
from llmtrain.inference.quantize import Int8Linear, quantize_int8, weight_bytes
from llmtrain.models import ModelConfig, build_model
from llmtrain.objectives import MaskedLM, SpanCorruption
from llmtrain.training.checkpoint import TRAIN_STATE
from llmtrain.training.trainer import Trainer
from tests.conftest import ROOT, compose_config, synthetic_documents, tiny_overrides, write_jsonl

VOCAB = 120


def tiny(family: str = "decoder", **overrides) -> ModelConfig:
    cfg = ModelConfig(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=40)
    return replace(cfg, **overrides)


def sharp(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random model with peaked output distributions (so greedy choices are not near-ties)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


def prompt(B: int = 2, T: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def one_thread():
    """Tiny models train ~10x faster on one thread than on two contended ones (busy CI cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


T5_STYLE = dict(
    position="relative", relative_buckets=8, relative_max_distance=16, attn_scale=1.0, mlp="geglu"
)
DECODERS = {
    "rope": {},
    "learned-postnorm": dict(position="learned", norm="layernorm", bias=True, norm_position="post"),
    "relative-gqa": dict(T5_STYLE, n_kv_heads=2),
}


# --- KV cache -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(DECODERS))
def test_cached_steps_give_full_forward_logits(variant):
    model = sharp(tiny(**DECODERS[variant]))
    ids = prompt(2, 20)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model.decode_step(ids[:, :8], cache)]  # prefill, then one token at a time
        steps += [model.decode_step(ids[:, t : t + 1], cache) for t in range(8, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(DECODERS))
def test_decoder_cached_greedy_equals_uncached(variant):
    model = sharp(tiny(**DECODERS[variant]))
    ids = prompt()
    cached = sample(model, ids, 30, temperature=0.0, use_cache=True)
    uncached = sample(model, ids, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 36)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, 6:].tolist())) > 1  # not one repeated token


@pytest.mark.parametrize("variant", ["rope", "t5"])
def test_encoder_decoder_cached_greedy_equals_uncached(variant):
    overrides = T5_STYLE | {"tie_embeddings": False} if variant == "t5" else {}
    model = sharp(tiny("encoder_decoder", **overrides))
    src = prompt(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    cached = generate_seq2seq(model, src, 25, attention_mask=mask)
    uncached = generate_seq2seq(model, src, 25, attention_mask=mask, use_cache=False)
    assert cached.shape == (2, 25) and torch.equal(cached, uncached)
    alone = generate_seq2seq(model, src[1:, :9], 25)  # padding changes nothing
    assert torch.equal(cached[1:], alone)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_encoder_decoder_output_longer_than_its_positions_is_refused_before_decoding(position):
    """Up to model.max_seq_len new tokens decode (the last step reads position max_seq_len - 1); one more is
    a ValueError naming both settings, raised before the encoder runs (relative positions have no limit)."""
    model = sharp(tiny("encoder_decoder", max_seq_len=16, position=position))
    assert generate_seq2seq(model, prompt(1, 8), 16).shape == (1, 16)
    model.encode = None  # the refusal must come before any work
    with pytest.raises(ValueError, match="max_new_tokens=17 .*model.max_seq_len=16"):
        generate_seq2seq(model, prompt(1, 8), 17)
    relative = sharp(tiny("encoder_decoder", max_seq_len=16, **T5_STYLE))
    assert generate_seq2seq(relative, prompt(1, 8), 20).shape == (1, 20)


def test_generation_past_the_context_slides_the_window():
    model = sharp(tiny(max_seq_len=16))
    out = sample(model, prompt(1, 4), 40, temperature=0.0)
    assert out.shape == (1, 44)
    # within the context, identical to the uncached model
    assert torch.equal(out[:, :16], sample(model, prompt(1, 4), 12, temperature=0.0, use_cache=False))


# --- sampling controls ----------------------------------------------------------------------------------------


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(400, 4)
    g = torch.Generator().manual_seed(0)
    top_p = choose_next(logits, 1.0, top_p=0.7, generator=g).flatten()
    assert set(top_p.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: the nucleus is two tokens
    top_k = choose_next(logits, 1.0, top_k=3, generator=g).flatten()
    assert set(top_k.tolist()) == {0, 1, 2}
    assert (top_k == 0).float().mean().item() == pytest.approx(0.5 / 0.95, abs=0.08)
    hot = choose_next(logits, 100.0, generator=g).flatten()  # high temperature: nearly uniform
    assert (hot == 3).float().mean().item() > 0.15
    assert choose_next(logits[:2], 0.0).flatten().tolist() == [0, 0]


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = sharp(tiny())
    greedy = sample(model, prompt(), 12, temperature=0.0)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(sample(model, prompt(), 12, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(
        sample(model, prompt(), 12, temperature=1.0, top_k=None, top_p=1e-6, generator=g), greedy
    )
    sampled = sample(model, prompt(), 12, temperature=1.5, top_k=None, generator=g)
    assert not torch.equal(sampled, greedy)


def test_generation_stops_at_eos_per_row():
    model = sharp(tiny())
    greedy = sample(model, prompt(), 10, temperature=0.0)
    eos = greedy[0, 6 + 2].item()  # the third token row 0 produces
    out = sample(model, prompt(), 10, temperature=0.0, eos_token_id=eos)
    row0 = out[0, 6:].tolist()
    assert row0[: row0.index(eos) + 1] == greedy[0, 6 : 6 + row0.index(eos) + 1].tolist()
    assert all(t == eos for t in row0[row0.index(eos) :])  # a finished row only repeats EOS
    if eos not in greedy[1, 6:].tolist():  # the batch ran on for row 1
        assert torch.equal(out[1], greedy[1, : out.shape[1]])


# --- span filling and fill-mask on briefly trained models ---------------------------------------------------

CYCLE = "one two three four five six seven eight nine ten "


def cycle_tokenizer():
    return train_bpe([CYCLE * 50], 330, n_sentinels=10)


def train_briefly(model, objective, stream: torch.Tensor, steps: int, lr: float, batch: int = 32) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(1, len(stream) - objective.raw_length, (batch,), generator=g).tolist()
        windows = torch.stack([stream[s : s + objective.raw_length] for s in starts])
        loss = model(**objective(windows, g)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()


def corrupted_text(tok, tokens: list[int], noise: torch.Tensor) -> tuple[str, list[str]]:
    """Text with <extra_id_N> where the noise spans were, and each span's text."""
    text, spans, i = "", [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and noise[j] == noise[i]:
            j += 1
        if noise[i]:
            text += f"<extra_id_{len(spans)}>"
            spans.append(tok.decode(tokens[i:j]))
        else:
            text += tok.decode(tokens[i:j])
        i = j
    return text, spans


@pytest.mark.slow
def test_span_filling_restores_masked_spans():
    tok = cycle_tokenizer()
    stream = torch.tensor(tok.encode(CYCLE * 100))
    torch.manual_seed(0)
    cfg = tiny("encoder_decoder", vocab_size=tok.vocab_size, d_model=64, n_layers=1, max_seq_len=64)
    t5 = T5_STYLE | {"relative_buckets": 16, "relative_max_distance": 32, "tie_embeddings": False}
    model = build_model(replace(cfg, **t5))
    objective = SpanCorruption(32, tok.sentinel_ids, tok.eos_id, 0, tok.pad_id)  # 2 spans of 5 noise tokens
    train_briefly(model, objective, stream, steps=400, lr=2e-3)
    g = torch.Generator().manual_seed(123)
    restored = 0
    for trial in range(6):  # held-out corruptions, as text with sentinel markers
        start = 1 + trial
        text, truth = corrupted_text(
            tok, stream[start : start + objective.raw_length].tolist(), objective.noise_mask(g)
        )
        filled = fill_spans(model, tok, text)
        restored += filled.spans == truth
        assert filled.spans[0].split()[0] == truth[0].split()[0], (text, truth, filled.spans)
    assert restored >= 5
    metrics = evaluate_model(model, objective, stream.numpy(), tok.token_bytes(), 8, 2, seed=0)
    assert metrics["accuracy"] > 0.9 and metrics["loss"] < 0.5  # span-corruption targets
    filled = fill_spans(
        model, tok, "two three four<extra_id_0> eight nine ten" + CYCLE * 2 + "one two<extra_id_1>"
    )
    assert filled.spans[0] == " five six seven"
    assert filled.text.startswith("two three four five six seven eight nine ten")


def test_fill_mask_top_candidates():
    tok = cycle_tokenizer()
    stream = torch.tensor(tok.encode(CYCLE * 100))
    torch.manual_seed(0)
    cfg = tiny("encoder", vocab_size=tok.vocab_size, d_model=64, n_layers=1, max_seq_len=64)
    model = build_model(cfg)
    objective = MaskedLM(24, tok.vocab_size, tok.mask_id, tok.special_ids, select_rate=0.3)
    train_briefly(model, objective, stream, steps=150, lr=3e-3)
    result = fill_mask(model, tok, "three four five<mask> seven eight nine ten one<mask> three four", top_k=3)
    assert [candidates[0][0] for candidates in result] == [" six", " two"]
    spaced = "three four five <mask> seven eight nine ten one <mask> three four"  # as a user writes it
    assert fill_mask(model, tok, spaced, top_k=3) == result
    assert (
        fill_in(tok, spaced, [" six", " two"])
        == "three four five six seven eight nine ten one two three four"
    )
    for candidates in result:
        probs = [p for _, p in candidates]
        assert len(candidates) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    with pytest.raises(ValueError, match="<mask>"):
        fill_mask(model, tok, "no mask here")
    metrics = evaluate_model(model, objective, stream.numpy(), tok.token_bytes(), 8, 2, seed=0)
    assert metrics["accuracy"] > 0.9 and metrics["targets"] > 50  # on the selected (masked) tokens


def test_fill_mask_feeds_a_space_before_the_mask_as_training_did(monkeypatch):
    """The objective masks whole tokens, and a byte-level BPE word carries its leading space (" six"): the
    model never saw a lone " " token before a <mask>, so "five <mask>" must reach it as "five<mask>" does.
    A newline, or a second space, is a token of its own before a word, and stays."""
    tok = cycle_tokenizer()
    model = sharp(tiny("encoder", vocab_size=tok.vocab_size))
    fed = []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda ids, *a, **k: fed.append(ids[0].tolist()) or forward(ids, *a, **k)
    )
    assert fill_mask(model, tok, "four five <mask> seven") == fill_mask(model, tok, "four five<mask> seven")
    assert fed[0] == fed[1] == tok.encode("four five<mask> seven")
    assert tok.encode("five  six")[-2:] == tok.encode(" ") + tok.encode(" six")  # two spaces: " ", " six"
    for text, as_trained in [
        (" <mask> two", "<mask> two"),
        ("four five  <mask> seven", "four five <mask> seven"),
        ("four five\n<mask> seven", "four five\n<mask> seven"),
        ("four five \n<mask> seven", "four five \n<mask> seven"),
    ]:
        fed.clear()
        fill_mask(model, tok, text)
        assert fed == [tok.encode(as_trained)], text
    assert fill_in(tok, "four five <mask> seven", [" six"]) == "four five six seven"
    assert fill_in(tok, "four five<mask> seven <mask>", [" six", " eight"]) == "four five six seven eight"
    wordpiece = train_tokenizer([CYCLE * 50], "wordpiece", 120, n_sentinels=2)  # spaces are no tokens there
    assert wordpiece.encode("four five <mask> seven") == wordpiece.encode("four five<mask> seven")
    assert fill_in(wordpiece, "four five <mask> seven", ["six"]) == "four five six seven"


# --- a trained run: scripts, continued pretraining, damaged checkpoints -------------------------------------


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """The script as a user runs it, in a fresh process."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def script_main(name: str):
    """A script's main(argv), imported in this process (cheaper than a subprocess)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def trained_run(corpus_file, cache_dir, tmp_path_factory):
    """A tiny gpt2-preset run: its trainer (closed) and the exported folder."""
    out = tmp_path_factory.mktemp("runs")
    overrides = tiny_overrides(corpus_file, cache_dir, out, "gpt2") + [
        "trainer.max_steps=30",
        "trainer.sample_tokens=0",
    ]
    with one_thread():
        trainer = Trainer(to_dataclass(compose_config(overrides)))
        result = trainer.fit()
    return trainer, result, out


def test_export_script_writes_a_folder_transformers_loads(trained_run, tmp_path, capsys):
    pytest.importorskip("transformers")
    trainer, _, _ = trained_run
    folder = tmp_path / "hf"
    done = run_script(
        "export_hf.py", trainer.run_dir, folder, "--tokenizer", trainer.corpus.tokenizer_path, "--verify"
    )
    assert done.returncode == 0, done.stderr
    assert "GPT2LMHeadModel" in done.stdout
    difference = float(done.stdout.split("= ")[-1])
    assert difference < 1e-4
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"

    generate = script_main("generate.py")
    assert generate([str(folder), "--prompt", "the red cat", "--max-new-tokens", "8", "--greedy"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("the red cat") and "tokens/s" in out.err
    # from the run directory too (its checkpoint), same greedy text
    args = ["--prompt", "the red cat", "--max-new-tokens", "8", "--greedy", "--tokenizer"]
    assert generate([str(trainer.run_dir), *args, str(trainer.corpus.tokenizer_path)]) == 0
    assert capsys.readouterr().out == out.out


def test_export_script_refuses_an_unrepresentable_model(tmp_path, tiny_config, capsys):
    cfg = tiny_config("encoder", "trainer.max_steps=1", "trainer.sample_tokens=0")
    trainer = Trainer(cfg)
    trainer.fit()
    args = [str(trainer.run_dir), str(tmp_path / "hf"), "--tokenizer", str(trainer.corpus.tokenizer_path)]
    assert script_main("export_hf.py")(args) == 2
    err = capsys.readouterr().err
    assert "nearest preset is model=bert" in err and "model.norm_position" in err
    assert not (tmp_path / "hf").exists()


def test_training_continues_from_an_exported_folder(trained_run, corpus_file, cache_dir, tmp_path):
    trainer, result, _ = trained_run
    folder = tmp_path / "hf"
    export_hf(trainer.model.state_dict(), trainer.cfg.model, folder, trainer.corpus.tokenizer_path)
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path / "runs", "gpt2") + [
        f"model.init_from={folder}",
        "trainer.max_steps=2",
        "trainer.sample_tokens=0",
        "run_name=continued",
    ]
    continued = Trainer(to_dataclass(compose_config(overrides))).fit()
    # the new run starts where the exported model was, not from a random init
    assert continued["initial_val_loss"] == pytest.approx(result["val_loss"], abs=1e-4)
    # on other text it still reads with the folder's tokenizer (not one trained anew on that text)
    other = write_jsonl(tmp_path / "other.jsonl", [text.upper() for text in synthetic_documents(200, seed=5)])
    overrides = tiny_overrides(other, cache_dir, tmp_path / "runs", "gpt2") + [
        f"model.init_from={folder}",
        "trainer.max_steps=1",
        "trainer.sample_tokens=0",
        "run_name=other",
    ]
    trainer = Trainer(to_dataclass(compose_config(overrides)))
    assert (trainer.run_dir / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def test_init_from_another_architecture_is_refused_before_the_data_is_read(
    trained_run, corpus_file, cache_dir, tmp_path, monkeypatch
):
    """The architecture was compared when the model was built, after the corpus was tokenised (minutes on a
    real corpus): it is now compared first, the vocabulary (which the tokenizer sets) left to that later check."""
    from llmtrain.models import ModelConfigError
    from llmtrain.training import trainer as trainer_module

    trainer, _, _ = trained_run
    folder = tmp_path / "hf"
    export_hf(trainer.model.state_dict(), trainer.cfg.model, folder, trainer.corpus.tokenizer_path)

    def read_data(*args, **kwargs):
        raise AssertionError("the data was read before the architecture was checked")

    monkeypatch.setattr(trainer_module, "load_corpus", read_data)
    overrides = tiny_overrides(corpus_file, cache_dir, tmp_path / "runs", "gpt2") + [
        f"model.init_from={folder}",
        "model.d_model=48",
        "run_name=wider",
    ]
    with pytest.raises(ModelConfigError, match=rf"model.init_from={folder} holds another architecture; set "):
        Trainer(to_dataclass(compose_config(overrides)))


def test_init_from_tokenizer_on_resume_and_when_missing(
    trained_run, corpus_file, cache_dir, tmp_path, caplog
):
    """A resumed run keeps the tokenizer it started with (its run directory's copy), even where that is not
    the folder's; a folder without tokenizer.json trains one on the data, with a warning."""
    trainer, _, _ = trained_run
    folder = tmp_path / "hf"
    export_hf(trainer.model.state_dict(), trainer.cfg.model, folder, trainer.corpus.tokenizer_path)
    other = write_jsonl(tmp_path / "other.jsonl", [text.upper() for text in synthetic_documents(200, seed=5)])
    base = tiny_overrides(other, cache_dir, tmp_path / "runs", "gpt2") + ["trainer.sample_tokens=0"]
    other_tokenizer = Trainer(to_dataclass(compose_config(base + ["run_name=plain"]))).corpus.tokenizer_path
    started = base + [f"model.init_from={folder}", "trainer.max_steps=1", "run_name=started"]
    Trainer(to_dataclass(compose_config([*started, f"data.tokenizer.path={other_tokenizer}"]))).fit()
    resumed = Trainer(
        to_dataclass(compose_config([*started[:-2], "trainer.max_steps=2", "run_name=started"]))
    )
    assert resumed.step == 1  # it did resume
    assert Path(resumed.cfg.data.tokenizer.path) == resumed.run_dir / "tokenizer.json"
    assert (resumed.run_dir / "tokenizer.json").read_bytes() == Path(other_tokenizer).read_bytes()

    bare = shutil.copytree(folder, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer.json"))
    with caplog.at_level("WARNING"):
        fresh = Trainer(to_dataclass(compose_config(base + [f"model.init_from={bare}", "run_name=bare"])))
    assert fresh.cfg.data.tokenizer.path is None and "holds no tokenizer.json" in caplog.text
    (bare / "tokenizer.json").write_text("{}")  # not a tokenizer llmtrain reads (say, another library's)
    with caplog.at_level("WARNING"):
        foreign = Trainer(
            to_dataclass(compose_config(base + [f"model.init_from={bare}", "run_name=foreign"]))
        )
    assert (
        foreign.cfg.data.tokenizer.path is None
        and "a tokenizer is trained on the data instead" in caplog.text
    )


def test_damaged_checkpoints_get_clear_errors(trained_run, tmp_path):
    trainer, _, _ = trained_run
    source = load_trained_model(trainer.run_dir).source
    assert load_trained_model(source).cfg == replace(trainer.cfg.model, init_from=None)

    truncated = shutil.copytree(source, tmp_path / "truncated" / source.name)
    data = (truncated / TRAIN_STATE).read_bytes()
    (truncated / TRAIN_STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{TRAIN_STATE} is not a readable llmtrain checkpoint"):
        load_trained_model(truncated)

    tampered = shutil.copytree(source, tmp_path / "tampered" / source.name)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tampered / TRAIN_STATE).write_bytes(pickle.dumps({"model_config": Payload()}))
    with pytest.raises(CheckpointError, match="not a readable llmtrain checkpoint"):
        load_trained_model(tampered)
    assert not marker.exists()  # weights_only=True: nothing in the file ran

    shard = shutil.copytree(source, tmp_path / "shard" / source.name)
    for f in shard.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model weights could not be read"):
        load_trained_model(shard)


def test_truncated_safetensors_gets_a_clear_error(trained_run, tmp_path):
    trainer, _, _ = trained_run
    folder = export_hf(
        trainer.model.state_dict(), trainer.cfg.model, tmp_path / "hf", trainer.corpus.tokenizer_path
    )
    assert load_trained_model(folder).cfg.d_model == trainer.cfg.model.d_model
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_trained_model(folder)


def test_evaluate_script_reports_each_precision(trained_run, tmp_path, capsys):
    trainer, result, _ = trained_run
    out = tmp_path / "eval.json"
    args = [str(trainer.run_dir), "--tokenizer", str(trainer.corpus.tokenizer_path), "--batches", "2"]
    assert (
        script_main("evaluate.py")(
            [*args, "--batch-size", "8", "--precision", "fp32", "bf16", "int8", "--out", str(out)]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    fp32, bf16, int8 = (report["results"][p] for p in ("fp32", "bf16", "int8"))
    # the same windows and objective seed as the trainer's evaluation: the same figures
    assert fp32["loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    assert fp32["bpb"] == pytest.approx(result["val_bpb"], rel=1e-6)
    assert 0 < fp32["accuracy"] < 1 and fp32["targets"] == 2 * 8 * trainer.cfg.data.seq_len
    assert bf16["weight_bytes"] == fp32["weight_bytes"] // 2
    assert int8["weight_bytes"] <= 0.3 * fp32["weight_bytes"]
    assert int8["loss"] == pytest.approx(fp32["loss"], rel=0.02)


def test_evaluate_script_on_an_exported_folder_uses_the_models_length(
    trained_run, corpus_file, cache_dir, tmp_path, capsys
):
    """An exported folder has no run config: the windows take the model's max_seq_len (the default 256 ran
    past this learned position table and crashed), and a longer data.seq_len is refused by name."""
    trainer, _, _ = trained_run
    folder = export_hf(
        trainer.model.state_dict(), trainer.cfg.model, tmp_path / "hf", trainer.corpus.tokenizer_path
    )
    data = ["data.source=files", f"data.paths=[{corpus_file}]", f"data.cache_dir={cache_dir}"]
    main = script_main("evaluate.py")
    assert main([str(folder), "--batches", "1", "--batch-size", "2", "--set", *data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == trainer.cfg.model.max_seq_len == 64
    assert report["results"]["fp32"]["targets"] == 2 * 64
    assert main([str(folder), "--batches", "1", "--batch-size", "100000", "--set", *data]) == 2
    assert "--batch-size 100000" in capsys.readouterr().err  # a validation split shorter than one batch
    assert main([str(folder), "--batches", "1", "--set", *data, "data.seq_len=65"]) == 2
    assert "data.seq_len=65 is longer than the position table model.max_seq_len=64" in capsys.readouterr().err
    # a run's batch layout is not re-checked against this shell's world size: one trained on 2 ranks
    # (global batch 32 = 2 x 8 x 2 accumulation) evaluates in one process
    two_ranks = shutil.copytree(trainer.run_dir, tmp_path / "two_ranks")
    saved = json.loads((two_ranks / "config.json").read_text())
    saved["trainer"].update(global_batch_size=32, micro_batch_size=8, grad_accum_steps=2)
    (two_ranks / "config.json").write_text(json.dumps(saved))
    assert main([str(two_ranks), "--batches", "1", "--batch-size", "2"]) == 0, capsys.readouterr().err


def test_int8_layers_are_per_output_channel_and_keep_ties():
    torch.manual_seed(0)
    model = build_model(tiny(tie_embeddings=True)).eval()
    reference = {name: p.detach().clone() for name, p in model.state_dict().items()}
    ids = prompt(2, 12)
    with torch.no_grad():
        before = model(ids).logits
    quantize_int8(model)
    layer = model.decoder.layers[0].attn.q_proj
    assert isinstance(layer, Int8Linear) and layer.qweight.dtype == torch.int8
    assert layer.scale.shape == (layer.qweight.shape[0],)
    error = (layer.weight - reference["decoder.layers.0.attn.q_proj.weight"]).abs()
    assert (error <= layer.scale[:, None] / 2 + 1e-7).all()  # rounding: at most half a step per channel
    assert model.lm_head.qweight is model.decoder.embed.qweight  # the tied head shares the int8 table
    with torch.no_grad():
        after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()
    assert weight_bytes(model) < 0.3 * sum(t.numel() * 4 for t in reference.values() if t.is_floating_point())


def test_a_config_that_disagrees_with_its_weights_gets_a_clear_error(trained_run, tmp_path):
    """A user widens an export's config.json (a longer context, a wider MLP) over the same weights:
    load_state_dict's RuntimeError went past the loaders' handling as a traceback; it names the tensor now.
    A config.json that is not a JSON object is refused too (it failed on `.get`)."""
    trainer, _, _ = trained_run
    folder = export_hf(
        trainer.model.state_dict(), trainer.cfg.model, tmp_path / "hf", trainer.corpus.tokenizer_path
    )
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    key = next(k for k in ("intermediate_size", "n_inner", "d_ff") if config.get(k))
    config_path.write_text(json.dumps({**config, key: config[key] * 2}))
    with pytest.raises(
        CheckpointError, match=r"weights do not fit the model: \S+ is \(\d+, \d+\) in the weights"
    ):
        load_trained_model(folder)
    from llmtrain.models import ModelConfigError
    from llmtrain.models.hf import model_config_from_hf

    widened = model_config_from_hf(json.loads(config_path.read_text()))  # a training run's model.init_from
    with pytest.raises(ModelConfigError, match=rf"model.init_from={folder}: weights do not fit the model"):
        build_model(replace(widened, init_from=str(folder)))
    config_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="holds a JSON list, not the object of a model's settings"):
        load_trained_model(folder)
