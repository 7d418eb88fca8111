"""The inference scripts on bad input: export_hf.py never writes into a folder that is not its own and never
leaves a half-written export; evaluate.py reads a run's data as training did (data.shards, data.mixture);
generate.py and evaluate.py refuse bad flags, devices, prompts and tokenizers with one `error:` line naming
what is wrong and what is allowed."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from llmtrain.config import to_dataclass
from llmtrain.data.shards import prepare_shards
from llmtrain.data.tokenizer import load_tokenizer, train_bpe
from llmtrain.inference import generate as generation
from llmtrain.inference.export import export_hf
from llmtrain.inference.generate import fill_mask
from llmtrain.inference.loading import CheckpointError, load_trained_model, model_tokenizer
from llmtrain.training.trainer import Trainer
from tests.conftest import compose_config, synthetic_documents, tiny_overrides, write_jsonl
from tests.integration.test_inference import one_thread, script_main
from tests.unit.test_curation import prose
from tests.unit.test_shards import data_config, prep_config


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def train(corpus_file, cache_dir, out, model: str, *extra: str) -> Trainer:
    overrides = tiny_overrides(corpus_file, cache_dir, out, model)  # run name: <model>-test
    overrides += ["trainer.max_steps=2", "trainer.sample_tokens=0", *extra]
    trainer = Trainer(to_dataclass(compose_config(overrides)))
    trainer.result = trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def runs(corpus_file, cache_dir, tmp_path_factory) -> dict[str, Trainer]:
    """A tiny run of each family (gpt2: one that exports), two steps each."""
    out = tmp_path_factory.mktemp("runs")
    with one_thread():
        return {m: train(corpus_file, cache_dir, out, m) for m in ("gpt2", "encoder", "encoder_decoder")}


def files_of(folder) -> dict[str, bytes | None]:
    """A folder's entries, with the contents of its files."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in sorted(folder.iterdir())}


# --- 1. export_hf.py: only into its own folder, and all or nothing --------------------------------------------


def test_export_refuses_a_run_folder_and_a_file(runs, tmp_path, capsys):
    run_dir = runs["gpt2"].run_dir
    before = files_of(run_dir)
    export = script_main("export_hf.py")
    assert export([str(run_dir), str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and f"{run_dir} exists and is not an earlier export" in err
    assert files_of(run_dir) == before  # the run's config.json kept, no model.safetensors beside it

    a_file = tmp_path / "out.bin"
    a_file.write_text("x")
    assert export([str(run_dir), str(a_file)]) == 2
    assert f"{a_file} is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_export_replaces_an_earlier_export_only_once_complete(runs, tmp_path, capsys, monkeypatch):
    run_dir = runs["gpt2"].run_dir
    export = script_main("export_hf.py")
    out = tmp_path / "hf"
    assert export([str(run_dir), str(out)]) == 0
    first = files_of(out)
    config = json.loads(first["config.json"])

    def disk_full(error):
        def save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # a few bytes, then the disk is full
            raise error

        return save_file

    for error in (
        SafetensorError("No space left on device"),
        OSError(errno.ENOSPC, "No space left on device"),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(safetensors.torch, "save_file", disk_full(error))
            assert export([str(run_dir), str(out)]) == 2  # over the earlier export
            assert export([str(run_dir), str(tmp_path / "new")]) == 2  # into a new folder
        err = capsys.readouterr().err
        assert err.startswith("error: could not write the export") and "No space left on device" in err
        assert "the earlier export there is unchanged" in err and "nothing was written" in err
        assert files_of(out) == first  # not a new config.json beside the old weights
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no partial folder, no "new"

    # the swap itself fails (the new folder cannot take the name): the earlier export is put back
    rename = Path.rename

    def refused(self, target):
        if self.name.endswith(".partial"):
            raise OSError(errno.EACCES, "Permission denied")
        return rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", refused)
        assert export([str(run_dir), str(out)]) == 2
    assert "the earlier export there is unchanged" in capsys.readouterr().err
    assert files_of(out) == first and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]

    # a complete re-export replaces the earlier one (here: of another model, so its config differs)
    other = json.loads(first["config.json"]) | {"n_layer": 1}
    (out / "config.json").write_text(json.dumps(other))
    assert export([str(run_dir), str(out)]) == 0
    assert json.loads((out / "config.json").read_text()) == config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_loading_refuses_a_run_folder_that_also_holds_an_export(runs, tmp_path):
    """Such a folder (left by an earlier export_hf.py) was read as the export, silently another model."""
    trainer = runs["gpt2"]
    damaged = shutil.copytree(trainer.run_dir, tmp_path / "run")
    exported = export_hf(trainer.model.state_dict(), trainer.cfg.model, tmp_path / "hf", None)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(exported / name, damaged / name)
    with pytest.raises(CheckpointError, match="holds both an exported model .* and step-XXXXXXX checkpoints"):
        load_trained_model(damaged)


def test_export_names_the_tokenizer_flag(runs, tmp_path, capsys):
    args = [str(runs["gpt2"].run_dir), str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "none.json")]
    assert script_main("export_hf.py")(args) == 2
    err = capsys.readouterr().err
    assert f"--tokenizer: {tmp_path / 'none.json'} does not exist" in err and "data.tokenizer" not in err
    assert not (tmp_path / "hf").exists()


# --- 2. evaluate.py reads the run's own data, as training read it ---------------------------------------------


def test_evaluate_reads_the_shards_and_mixture_a_run_trained_on(corpus_file, cache_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    docs = write_jsonl(tmp_path / "prose.jsonl", [prose(2000 + i, paragraphs=3) for i in range(80)])
    prepare_shards(data_config(docs, cache_dir), prep_config(shards))
    evaluate = script_main("evaluate.py")
    mixture = f"data.mixture=[{{path:{shards},weight:0.5,name:a}},{{path:{shards},weight:0.5,name:b}}]"
    for data in (mixture, f"data.shards={shards}"):
        trainer = train(corpus_file, cache_dir, tmp_path / data[5:11], "decoder", data)
        assert evaluate([str(trainer.run_dir), "--batches", "2", "--batch-size", "8"]) == 0
        fp32 = json.loads(capsys.readouterr().out)["results"]["fp32"]
        # the trainer's own final evaluation: the same windows of the same validation split
        assert fp32["bpb"] == pytest.approx(trainer.result["val_bpb"], rel=1e-6), data
        assert fp32["loss"] == pytest.approx(trainer.result["val_loss"], rel=1e-6), data
    # --data NAME replaces the run's data, its shards included; one without what it needs is named
    assert evaluate([str(trainer.run_dir), "--data", "files", "--batches", "1"]) == 2
    assert "error: data.paths is empty" in capsys.readouterr().err
    args = ["--data", "files", "--set", f"data.paths=[{corpus_file}]", "--batches", "2", "--batch-size", "8"]
    assert evaluate([str(trainer.run_dir), *args]) == 0
    fp32 = json.loads(capsys.readouterr().out)["results"]["fp32"]
    assert fp32["bpb"] != pytest.approx(trainer.result["val_bpb"], rel=1e-3)
    # so does a --set that names another source
    args = [
        "--set",
        "data.source=files",
        f"data.paths=[{corpus_file}]",
        "--batches",
        "2",
        "--batch-size",
        "8",
    ]
    assert evaluate([str(trainer.run_dir), *args]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["fp32"]["bpb"] == pytest.approx(
        fp32["bpb"], rel=1e-9
    )
    # evaluation reads the validation split only: a train split shorter than one batch does not matter
    args[-4:-4] = ["data.val_fraction=0.99"]
    args[-1] = "64"
    assert evaluate([str(trainer.run_dir), *args]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # more batches than the split holds: the report says how many were evaluated
    args[-3] = "100000"
    assert evaluate([str(trainer.run_dir), *args]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert 1 <= report["batches"] < 100000 and f"holds {report['batches']} batches of 64" in err
    assert report["results"]["fp32"]["targets"] == report["batches"] * 64 * 32  # windows x predicted tokens


# --- 3, 4. bad flags stop argparse at once, naming the flag and what is allowed --------------------------------

BAD_FLAGS = {
    "evaluate.py": [
        ("--batches", "0", ">= 1"),
        ("--batch-size", "0", ">= 1"),
        ("--batch-size", "-1", ">= 1"),
        ("--out", "/nonexistent/folder/x.json", "does not exist"),
        ("--device", "banana", "allowed: cpu, cuda"),
    ],
    "generate.py": [
        ("--top-p", "0", "> 0 and <= 1"),
        ("--top-p", "1.5", "> 0 and <= 1"),
        ("--top-k", "-1", ">= 0 (0 = off)"),
        ("--num-samples", "0", ">= 1"),
        ("--temperature", "-1", ">= 0"),
        ("--temperature", "nan", ">= 0"),
        ("--max-new-tokens", "-5", ">= 1"),
        ("--device", "banana", "allowed: cpu, cuda"),
    ],
}


@pytest.mark.parametrize(
    "script,flag,value,allowed", [(s, *case) for s, cases in BAD_FLAGS.items() for case in cases]
)
def test_bad_flags_are_refused_by_name(script, flag, value, allowed, runs, capsys):
    args = [str(runs["gpt2"].run_dir), flag, value] + (["--prompt", "the"] if script == "generate.py" else [])
    with pytest.raises(SystemExit) as stopped:
        script_main(script)(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and allowed in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("script", ["evaluate.py", "generate.py"])
def test_cuda_without_cuda_is_refused(script, runs, capsys):
    with pytest.raises(SystemExit):
        args = ["--device", "cuda"] + (["--prompt", "the"] if script == "generate.py" else [])
        script_main(script)([str(runs["gpt2"].run_dir), *args])
    assert "argument --device: cuda: this machine has no CUDA device" in capsys.readouterr().err


def test_evaluate_set_names_the_setting(runs, capsys):
    assert script_main("evaluate.py")([str(runs["gpt2"].run_dir), "--set", "data.pathz=1"]) == 2
    assert "error: --set data.pathz=1: Key 'pathz' not in 'DataConfig'" in capsys.readouterr().err


def test_generate_prompts_the_model_cannot_read(runs, capsys):
    generate = script_main("generate.py")
    encoder, t5 = str(runs["encoder"].run_dir), str(runs["encoder_decoder"].run_dir)
    assert generate([encoder, "--prompt", "the <mask> cat", "--top-k", "100000"]) == 0  # all the vocabulary
    candidates = re.findall(r"['\"] \d\.\d{3}(?:, |\n)", capsys.readouterr().out)  # 'token' 0.004,
    assert len(candidates) == runs["encoder"].cfg.model.vocab_size
    assert generate([encoder, "--prompt", "the <mask> cat", "--top-k", "0"]) == 2
    assert "error: --top-k 0: an encoder shows the k likeliest" in capsys.readouterr().err

    long = "the red cat sees the dog. " * 40 + "<mask>"
    assert generate([encoder, "--prompt", long]) == 2
    assert "but the model reads at most model.max_seq_len=64" in capsys.readouterr().err
    assert generate([t5, "--prompt", long.replace("<mask>", "<extra_id_0>")]) == 2
    assert "but the model reads at most model.max_seq_len=64" in capsys.readouterr().err

    n = len(load_tokenizer(runs["encoder_decoder"].corpus.tokenizer_path).sentinel_ids)
    allowed = f"allowed: <extra_id_0> to <extra_id_{n - 1}>, in order from <extra_id_0>"
    assert generate([t5, "--prompt", f"the <extra_id_0> sees <extra_id_{n}>"]) == 2
    assert f"error: <extra_id_{n}> is not a sentinel of this tokenizer; {allowed}" in capsys.readouterr().err
    assert generate([t5, "--prompt", f"the <extra_id_0> sees <extra_id_{n - 1}>"]) == 2  # never filled
    assert f"sentinels are <extra_id_0>, <extra_id_{n - 1}>; {allowed}" in capsys.readouterr().err
    args = ["--prompt", "the <extra_id_0> sees <extra_id_1>", "--max-new-tokens", "4"]
    assert generate([t5, *args]) == 0


def test_generate_passes_sampling_to_span_filling_and_refuses_flags_that_do_not_apply(
    runs, capsys, monkeypatch
):
    """The generation flags were silently ignored for an encoder and an encoder-decoder."""
    generate = script_main("generate.py")
    encoder, t5 = str(runs["encoder"].run_dir), str(runs["encoder_decoder"].run_dir)
    allowed = "it neither samples nor generates, so allowed: --top-k only"
    for flags in (
        ["--temperature", "0.5", "--seed", "3"],
        ["--greedy"],
        ["--top-p", "0.9"],
        ["--num-samples", "2"],
        ["--max-new-tokens", "4"],
        ["--no-stop-at-eos"],
        ["--no-cache"],
    ):
        assert generate([encoder, "--prompt", "the <mask> cat", "--top-k", "3", *flags]) == 2
        named = ", ".join(f for f in flags if f.startswith("--"))
        err = capsys.readouterr().err
        assert f"error: {named}: an encoder shows the k likeliest tokens per <mask> (--top-k)" in err
        assert allowed in err
    assert generate([encoder, "--prompt", "the <mask> cat", "--top-k", "3"]) == 0
    loaded = load_trained_model(encoder)
    top = fill_mask(loaded.model, model_tokenizer(loaded, None)[1], "the <mask> cat", 1)[0][0][0]
    assert capsys.readouterr().out.endswith("\nthe" + top + " cat\n")  # the likeliest in place of " <mask>"

    prompt = ["--prompt", "the <extra_id_0> sees", "--max-new-tokens", "6"]
    assert generate([t5, *prompt, "--no-stop-at-eos"]) == 2
    assert (
        "error: --no-stop-at-eos: span filling reads the spans up to the decoder's EOS"
        in capsys.readouterr().err
    )
    greedy_with = ["--top-k", "5", "--top-p", "0.9", "--seed", "3", "--num-samples", "2"]
    assert generate([t5, *prompt, *greedy_with]) == 2  # greedy: they would do nothing, or repeat one fill
    assert (
        "error: --top-k, --top-p, --seed, --num-samples: span filling is greedy unless --temperature > 0"
        in capsys.readouterr().err
    )

    calls, outputs, original = [], [], generation.generate_seq2seq

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        outputs.append(original(*args, **kwargs)[0].tolist())
        return torch.tensor([outputs[-1]])

    monkeypatch.setattr(generation, "generate_seq2seq", recorded)
    assert generate([t5, *prompt]) == 0
    assert calls[0]["temperature"] == 0.0 and calls[0]["use_cache"]  # the default stays greedy
    capsys.readouterr()
    sampled = [*prompt, "--temperature", "1.5", "--top-p", "0.95", "--num-samples", "6", "--seed", "5"]
    assert generate([t5, *sampled, "--top-k", "0", "--no-cache"]) == 0
    assert len(capsys.readouterr().out.split("-" * 40 + "\n")) == 6  # each sample's spans and text
    assert len(calls) == 1 + 6 and all(
        (k["temperature"], k["top_k"], k["top_p"], k["use_cache"]) == (1.5, 0, 0.95, False) for k in calls[1:]
    )
    first = outputs[1:]
    assert len({tuple(o) for o in first}) > 1 and outputs[0] not in first  # sampled, one generator
    assert generate([t5, *sampled, "--top-k", "0", "--no-cache"]) == 0
    assert outputs[7:] == first  # the seed gives the same fills


# --- 5. a tokenizer larger than the model's vocabulary ----------------------------------------------------------


def test_a_tokenizer_larger_than_the_model_is_refused(runs, tmp_path, capsys):
    trainer = runs["gpt2"]
    vocab = trainer.cfg.model.vocab_size
    bigger = tmp_path / "bigger.json"
    train_bpe(synthetic_documents(400, seed=3) + [prose(i) for i in range(60)], vocab + 200).save(bigger)
    size = load_tokenizer(bigger).vocab_size
    assert size > vocab
    message = f"{bigger} has {size} tokens but the model only {vocab}"
    replaced = shutil.copytree(trainer.run_dir, tmp_path / "replaced")
    shutil.copyfile(bigger, replaced / "tokenizer.json")
    for script, extra in (("generate.py", ["--prompt", "the red cat"]), ("evaluate.py", ["--batches", "1"])):
        main = script_main(script)
        assert main([str(trainer.run_dir), "--tokenizer", str(bigger), *extra]) == 2
        assert message in capsys.readouterr().err
        assert main([str(replaced), *extra]) == 2  # the run's own tokenizer.json, replaced
        assert f"{replaced / 'tokenizer.json'} has {size} tokens but the model only {vocab}" in (
            capsys.readouterr().err
        )
