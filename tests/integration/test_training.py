"""Each family trains end to end on the synthetic corpus through the real config tree."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

from llmtrain.config import ConfigError, validate
from llmtrain.training.checkpoint import latest_checkpoint, load_checkpoint, read_train_state
from llmtrain.training.optim import lr_factor
from llmtrain.training.trainer import Trainer
from tests.helpers import step_losses

FAMILIES = ["decoder", "encoder", "encoder_decoder"]


@pytest.mark.parametrize("model", FAMILIES)
def test_family_trains_and_loss_falls(tiny_config, model):
    cfg = tiny_config(model, "trainer.max_steps=60")
    validate(cfg)
    trainer = Trainer(cfg)
    result = trainer.fit()
    vocab = trainer.corpus.tokenizer.vocab_size
    # a fresh model predicts close to uniformly
    assert abs(result["initial_val_loss"] - math.log(vocab)) < 0.1 * math.log(vocab)
    # and learns the templated corpus quickly
    assert result["val_loss"] < result["initial_val_loss"] - 1.5, result
    assert result["val_bpb"] < result["initial_val_bpb"]
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40, 50, 60]
    assert latest_checkpoint(trainer.run_dir).name == "step-0000060"


def test_bits_per_byte_is_nats_over_bytes(tiny_config):
    """val_bpb = summed nats / ln 2 / UTF-8 bytes of the predicted text, recomputed by hand."""
    cfg = tiny_config("decoder", "trainer.eval_batches=1")
    trainer = Trainer(cfg)
    metrics = trainer.evaluate()
    tok = trainer.corpus.tokenizer
    windows = torch.as_tensor(trainer.corpus.val[: 8 * (cfg.data.seq_len + 1)].astype("int64")).view(8, -1)
    with torch.no_grad():
        logits = trainer.model(windows[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
    text_bytes = sum(
        len(tok.decode([i]).encode("utf-8"))
        for i in windows[:, 1:].flatten().tolist()
        if i not in tok.special_ids
    )
    assert metrics["val_bpb"] == pytest.approx(nats.item() / math.log(2) / text_bytes, rel=1e-4)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)


@pytest.mark.parametrize(
    ("model", "extra"),
    [(family, ()) for family in FAMILIES] + [("decoder", ("model.dropout=0.1",))],
    ids=FAMILIES + ["decoder-dropout"],
)
def test_resume_continues_bitwise(tiny_config, model, extra):
    """10 steps straight == 5 steps, a checkpoint, a fresh Trainer, 5 more: the same per-step losses and
    final weights, bit for bit (one fp32 process). With dropout the masks continue the saved RNG stream: the
    MFU peak probe at a start's first log draws from a generator of its own."""
    steps = ("trainer.max_steps=10", "trainer.sample_tokens=0", "trainer.log_interval=1", *extra)
    straight = Trainer(tiny_config(model, *steps, "run_name=straight"))
    straight.fit()
    first = Trainer(tiny_config(model, *steps, "run_name=split", "trainer.checkpoint_interval=5"))
    first.cfg.trainer.max_steps = 5  # stop after 5 (the schedule still spans 10)
    first.fit()
    resumed = Trainer(tiny_config(model, *steps, "run_name=split"))
    assert resumed.step == 5
    resumed.fit()
    assert step_losses(resumed.run_dir) == step_losses(straight.run_dir)
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_resumed_run_logs_each_step_once(tiny_config):
    """A run stopped after logging past its last checkpoint: the resumed run's metrics.jsonl holds every
    training step and evaluation once, in order, with the uninterrupted run's values."""
    import shutil

    steps = ("trainer.max_steps=10", "trainer.sample_tokens=0", "trainer.log_interval=1")
    steps += ("trainer.eval_interval=5", "trainer.checkpoint_interval=5")

    def records(trainer):
        lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        return [
            (r["step"], "val" if "val_loss" in r else "train", r.get("loss", r.get("val_loss")))
            for r in map(json.loads, lines)
        ]

    straight = Trainer(tiny_config("decoder", *steps, "run_name=straight"))
    straight.fit()
    stopped = Trainer(tiny_config("decoder", *steps, "run_name=stopped"))
    stopped.fit()
    shutil.rmtree(stopped.run_dir / "step-0000010")  # as if killed after logging step 10, before its save
    with (stopped.run_dir / "metrics.jsonl").open("a") as log:
        log.write('{"step": 11, "lo')  # and mid-line
    resumed = Trainer(tiny_config("decoder", *steps, "run_name=stopped"))
    assert resumed.step == 5
    resumed.fit()
    expected = records(straight)
    assert [r[:2] for r in expected] == [(0, "val")] + [(s, "train") for s in range(1, 6)] + [(5, "val")] + [
        (s, "train") for s in range(6, 11)
    ] + [(10, "val")]
    got = records(resumed)
    assert [r[:2] for r in got] == [r[:2] for r in expected]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in expected], abs=1e-6)
    # a checkpoint between evaluations (step 3 of an eval every 2), and a finished run started again
    steps = steps[:3] + ("trainer.eval_interval=2", "trainer.checkpoint_interval=3", "trainer.max_steps=4")
    straight = Trainer(tiny_config("decoder", *steps, "run_name=straight4"))
    straight.fit()
    stopped = Trainer(tiny_config("decoder", *steps, "run_name=stopped4"))
    stopped.fit()
    shutil.rmtree(stopped.run_dir / "step-0000004")
    Trainer(tiny_config("decoder", *steps, "run_name=stopped4")).fit()  # from step 3
    assert [r[:2] for r in records(stopped)] == [r[:2] for r in records(straight)]
    again = Trainer(tiny_config("decoder", *steps, "run_name=stopped4"))
    assert again.step == 4
    again.fit()  # nothing to train: the final evaluation again, logged once
    assert [r[:2] for r in records(again)] == [r[:2] for r in records(straight)]


def logged(run_dir: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_a_resume_with_other_optimizer_settings_trains_with_them(tiny_config, caplog):
    """The checkpoint's param_groups kept its learning rate, decay, betas and eps while the schedule's shape
    followed the new settings, and a raised max_steps trained one step at the old schedule's last rate. The
    resumed steps now follow this run's settings, as a run started with them does, and the change is named."""
    base = ("trainer.sample_tokens=0", "trainer.log_interval=1", "optim.warmup_steps=2")
    new = (
        "trainer.max_steps=8",
        "optim.lr=1e-3",
        "optim.weight_decay=0",
        "optim.beta2=0.99",
        "optim.eps=1e-6",
    )
    straight = Trainer(tiny_config("decoder", *base, *new, "run_name=straight"))
    straight.fit()
    Trainer(tiny_config("decoder", *base, "trainer.max_steps=4", "run_name=changed")).fit()
    with caplog.at_level("WARNING", logger="llmtrain"):
        resumed = Trainer(tiny_config("decoder", *base, *new, "run_name=changed"))
    assert resumed.step == 4
    warning = " ".join(r.getMessage() for r in caplog.records)
    for named in ("optim.lr: 0.003 -> 0.001", "optim.weight_decay: 0.1 -> 0", "trainer.max_steps: 4 -> 8"):
        assert named in warning, warning
    resumed.fit()
    after = {s: lr for s, lr in logged(resumed.run_dir, "lr").items() if s > 4}
    assert after == pytest.approx({s: logged(straight.run_dir, "lr")[s] for s in range(5, 9)}, rel=1e-9)
    for group in resumed.optimizer.param_groups:
        assert (group["weight_decay"], group["betas"], group["eps"]) == (0.0, (0.9, 0.99), 1e-6)


def test_a_finished_run_started_again_keeps_the_config_it_trained_with(tiny_config):
    """Started again with other settings, a finished run trains nothing: its config.json was rewritten with
    settings its weights never saw."""
    Trainer(tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0", "run_name=done")).fit()
    again = Trainer(tiny_config("decoder", "trainer.max_steps=2", "optim.lr=1e-2", "run_name=done"))
    again.fit()
    assert json.loads((again.run_dir / "config.json").read_text())["optim"]["lr"] == 3e-3


def test_a_resume_between_logs_continues_the_loss_window(tiny_config):
    """A checkpoint between two logs: the next record averages the same steps as the uninterrupted run's (it
    averaged only the steps since the resume), and the spike detector keeps its running mean."""
    import shutil

    steps = ("trainer.max_steps=8", "trainer.sample_tokens=0", "trainer.log_interval=4")
    steps += ("trainer.checkpoint_interval=3",)
    straight = Trainer(tiny_config("decoder", *steps, "run_name=straight"))
    straight.fit()
    stopped = Trainer(tiny_config("decoder", *steps, "run_name=stopped"))
    stopped.fit()
    shutil.rmtree(stopped.run_dir / "step-0000008")  # killed after step 8's log, before its save
    resumed = Trainer(tiny_config("decoder", *steps, "run_name=stopped"))
    assert (resumed.step, resumed.window_steps) == (6, 2)
    resumed.fit()
    assert step_losses(resumed.run_dir) == pytest.approx(step_losses(straight.run_dir), abs=1e-6)
    assert resumed.spikes.mean == pytest.approx(straight.spikes.mean, abs=1e-6)


def test_a_flop_budget_resumed_at_another_micro_batch_spends_what_is_left(tiny_config, caplog):
    """trainer.max_flops counted the steps from the new shape alone: 4 steps at micro-batch 4, resumed at 8,
    took max_flops // (the new step) steps in all, 81% of the budget in the review. The FLOPs spent are kept."""
    small = Trainer(tiny_config("decoder", "trainer.micro_batch_size=4", "run_name=probe"))
    budget = 12.5 * small.flops_per_step  # 12 steps at micro-batch 4
    first = Trainer(tiny_config("decoder", "trainer.micro_batch_size=4", f"trainer.max_flops={budget}"))
    assert first.cfg.trainer.max_steps == 12
    first.cfg.trainer.max_steps = 4  # stopped early (the schedule still spans 12)
    first.fit()
    with caplog.at_level("WARNING", logger="llmtrain"):
        resumed = Trainer(tiny_config("decoder", "trainer.micro_batch_size=8", f"trainer.max_flops={budget}"))
    assert resumed.step == 4 and resumed.cfg.trainer.max_steps == 4 + 4  # 8.5 small steps left: 4 large
    o = (
        resumed.cfg.optim
    )  # the rate the checkpoint would have trained step 4 at (not the new schedule's start)
    named = f"learning rate is {o.lr * lr_factor(4, o, 8):.4g} (the checkpoint's schedule: {o.lr * lr_factor(4, o, 12):.4g})"
    assert named in caplog.text
    result = resumed.fit()
    assert result["steps"] == 8 and result["flops"] == pytest.approx(12 * small.flops_per_step, rel=1e-12)


def test_an_encoder_decoder_samples_within_its_decoder_positions(tiny_config):
    """The end-of-run sample decodes at most the trained target length, so a decoder whose position table is
    shorter than the sample length asked for (64) still ends its run with result.json."""
    cfg = tiny_config(
        "encoder_decoder", "model.max_seq_len=48", "trainer.max_steps=2", "trainer.sample_tokens=64"
    )
    trainer = Trainer(cfg)
    trainer.fit()
    assert (trainer.run_dir / "result.json").is_file()


def test_checkpoint_loads_into_a_fresh_model(tiny_config):
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0"))
    trainer.fit()
    path = latest_checkpoint(trainer.run_dir)
    state = read_train_state(path)  # torch.load(weights_only=True) inside
    assert state["step"] == 2 and state["model_config"]["family"] == "decoder" and state["world_size"] == 1
    fresh = Trainer(tiny_config("decoder", "trainer.max_steps=2", "trainer.resume=never", "run_name=other"))
    assert not all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), trainer.model.parameters()))
    load_checkpoint(path, fresh.model)
    for a, b in zip(fresh.model.state_dict().values(), trainer.model.state_dict().values()):
        assert torch.equal(a, b)


def test_partial_checkpoint_is_ignored(tiny_config):
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0"))
    trainer.fit()
    partial = trainer.run_dir / "step-0000004"  # as a crash mid-save would leave it: no train_state.pt
    partial.mkdir()
    (partial / ".metadata").write_bytes(b"")
    assert latest_checkpoint(trainer.run_dir).name == "step-0000002"


def run_files(run_dir) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()}


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ("model.d_model=64", "model.d_model: 32 there, 64 now"),
        ("data.tokenizer.train_bytes=3000", "another tokenizer"),  # same vocabulary size, other merges
        ("trainer.resume=never", "already holds checkpoints (newest step-0000002)"),
    ],
)
def test_resume_refuses_a_run_it_cannot_continue_and_writes_nothing(tiny_config, changed, named):
    """Another model, another tokenizer of the same size (its ids would mean other tokens), or a new run
    over old checkpoints: refused before config.json, tokenizer.json or metrics are touched."""
    first = Trainer(tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0", "run_name=same"))
    first.fit()
    before = run_files(first.run_dir)
    with pytest.raises(ConfigError, match=re.escape(named)):
        Trainer(tiny_config("decoder", changed, "run_name=same"))
    assert run_files(first.run_dir) == before
    resumed = Trainer(tiny_config("decoder", "trainer.max_steps=4", "run_name=same"))  # the same settings do
    assert resumed.step == 2


def test_online_wandb_without_an_api_key_is_refused_before_the_run_directory(
    tiny_config, tmp_path, monkeypatch
):
    """Without a key (and no terminal to ask on, as under torchrun or Slurm) wandb.init raised a UsageError
    traceback after config.json, tokenizer.json and an empty metrics.jsonl were written."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    cfg = tiny_config("decoder", "logger.wandb=online", "run_name=online")
    with pytest.raises(ConfigError, match="logger.wandb=online needs a W&B API key"):
        Trainer(cfg)
    assert not (Path(cfg.output_dir) / "online").exists()
    # a key where `wandb login` keeps one passes, read locally (wandb.login looked the user up over the network)
    from llmtrain.training.trainer import MetricsLog

    (tmp_path / "home").mkdir()
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    MetricsLog.check_wandb(cfg)
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    MetricsLog.check_wandb(cfg)


def test_a_run_resumes_under_settings_its_weights_do_not_depend_on(tiny_config):
    """Dropout, the init and model.n_decoder_layers of a decoder (debug=tiny sets it for every family) change
    nothing in the weights: the resume used to refuse them as "another model"; the architecture is still
    compared as model.init_from compares it (a wider MLP is refused)."""
    first = Trainer(
        tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0", "run_name=loose")
    )
    first.fit()
    loose = ("model.dropout=0.1", "model.init_std=0.01", "model.n_decoder_layers=3", "run_name=loose")
    resumed = Trainer(tiny_config("decoder", "trainer.max_steps=3", *loose))
    assert resumed.step == 2
    with pytest.raises(ConfigError, match=re.escape("model.d_ff: 128 there, 96 now")):
        Trainer(tiny_config("decoder", "trainer.max_steps=3", "model.d_ff=96", "run_name=loose"))


def test_an_unreadable_train_state_is_refused_naming_the_file(tiny_config):
    trainer = Trainer(
        tiny_config("decoder", "trainer.max_steps=2", "trainer.sample_tokens=0", "run_name=cut")
    )
    trainer.fit()
    state = latest_checkpoint(trainer.run_dir) / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"cannot read {state}"):
        Trainer(tiny_config("decoder", "trainer.max_steps=4", "run_name=cut"))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("objective.noise_density=0", "objective.noise_density=0"),
        ("optim.lr=inf", "optim.lr=inf"),
        ("optim.beta1=1.5", "optim.beta1=1.5"),
        ("optim.eps=-1", "optim.eps=-1"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1"),
        ("trainer.num_threads=-2", "trainer.num_threads=-2"),
        ("trainer.eval_interval=-1", "trainer.eval_interval=-1"),
        ("trainer.checkpoint_interval=-1", "trainer.checkpoint_interval=-1"),
        ("trainer.prefetch=-1", "trainer.prefetch=-1"),
        ("trainer.time_limit_minutes=-1", "trainer.time_limit_minutes=-1"),
        ("trainer.max_flops=-1", "trainer.max_flops=-1"),
        ("data.max_bytes=0", "data.max_bytes=0"),
        ("data.tokenizer.vocab_size=300", "data.tokenizer.vocab_size=300 is too small"),
        ("run_name=..", "run_name='..'"),
        ("parallel.strategy=fsdp", "parallel.shard_size=3 must divide the world size 1"),
        # FSDP's settings without parallel=fsdp (a hybrid-sharding line trained DDP, silently)
        ("parallel.shard_size=2", "parallel.shard_size=2 needs parallel.strategy=fsdp, not single"),
        (
            "parallel.reshard_after_forward=false",
            "parallel.reshard_after_forward=False needs parallel.strategy",
        ),
        ("model.init_std=-1", "model.init_std=-1.0 must be >= 0"),
        ("model.rope_theta=0", "model.rope_theta=0.0 must be > 0"),
        ("data.tokenizer.min_frequency=-1", "data.tokenizer.min_frequency=-1"),
        ("data.tokenizer.n_sentinels=-5", "data.tokenizer.n_sentinels=-5"),
        ("data.tokenizer.train_bytes=0", "data.tokenizer.train_bytes=0"),
        ("trainer.max_skips=-1", "trainer.max_skips=-1"),
        ("trainer.spike_factor=-1", "trainer.spike_factor=-1"),
        ("trainer.peak_tflops=-5", "trainer.peak_tflops=-5"),
        ("parallel.timeout_minutes=-1", "parallel.timeout_minutes=-1"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be in [0, 1]"),
        # span corruption: the sentinels a window needs, and a targets length below the derived one
        ("data.tokenizer.n_sentinels=2", "data.tokenizer.n_sentinels=2 is fewer than the"),
        ("objective.targets_length=0", "objective.targets_length=0 is shorter than the"),
        (
            "objective.noise_density=0.95",
            "objective.noise_density=0.95 and objective.mean_noise_span_length=3.0",
        ),
    ],
)
def test_settings_out_of_range_are_refused_by_validate(tiny_config, override, named):
    span_corruption = ("noise", "n_sentinels=2", "targets_length")
    model = "encoder_decoder" if any(part in override for part in span_corruption) else "decoder"
    extra = ["parallel.shard_size=3"] if "fsdp" in override else []
    cfg = tiny_config(model, *extra, override)
    with pytest.raises(ConfigError, match=re.escape(named)):
        validate(cfg)


def test_init_from_a_training_run_folder_says_to_export_it(tiny_config):
    from llmtrain.models import ModelConfigError

    run = Trainer(tiny_config("decoder", "trainer.max_steps=1", "trainer.sample_tokens=0", "run_name=src"))
    run.fit()
    with pytest.raises(ModelConfigError, match="is a training run folder.*scripts/export_hf.py"):
        Trainer(tiny_config("decoder", f"model.init_from={run.run_dir}", "run_name=dst"))


def test_init_from_a_folder_that_is_not_a_model_is_refused_by_name(tiny_config, tmp_path):
    """It warned that a tokenizer would be trained, trained one, then failed on `<folder>/config.json does not
    exist` without naming the setting."""
    (tmp_path / "legal").mkdir()
    for folder, why in (
        (tmp_path / "legal", "it holds no config.json"),
        (tmp_path / "nowhere", "no such folder"),
    ):
        cfg = tiny_config("decoder", f"model.init_from={folder}", "run_name=dst")
        with pytest.raises(
            ConfigError,
            match=re.escape(f"model.init_from={folder} is not a Hugging Face model folder ({why})"),
        ):
            Trainer(cfg)
        assert not (Path(cfg.output_dir) / "dst").exists()


def test_mlm_rates_are_refused_by_validate(tiny_config):
    with pytest.raises(ConfigError, match=re.escape("objective.select_rate=1.5")):
        validate(tiny_config("encoder", "objective.select_rate=1.5"))


def test_a_file_where_a_directory_belongs_is_refused(tiny_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for override, named in (
        (f"output_dir={blocker}", "output_dir"),
        (f"data.cache_dir={blocker}", "data.cache_dir"),
    ):
        with pytest.raises(ConfigError, match=f"{named}: {blocker} is a file"):
            validate(tiny_config("decoder", override))


def test_vocab_smaller_than_tokenizer_is_refused(tiny_config):
    cfg = tiny_config("decoder", "model.vocab_size=300", "data.tokenizer.path=null")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        validate(cfg)


def test_gradient_accumulation_matches_large_batch(tiny_config):
    """2 micro-batches of 4 accumulate to the gradient of one batch of 8 (same windows, CLM)."""
    big = Trainer(tiny_config("decoder", "trainer.micro_batch_size=8", "run_name=big"))
    small = Trainer(
        tiny_config("decoder", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2", "run_name=acc")
    )
    small.model.load_state_dict(big.model.state_dict())
    windows = big.train_loader.next_batch()
    big.train_loader.next_batch = lambda: windows
    halves = iter([windows[:4], windows[4:]])
    small.train_loader.next_batch = lambda: next(halves)
    for t in (big, small):
        t.cfg.optim.grad_clip = 0.0
        t.optimizer.step = lambda: None  # keep the gradients to compare
        t.optimizer.zero_grad = lambda set_to_none=True: None
        t.train_step()
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_fsdp_on_one_device_trains_the_plain_model(tiny_config):
    """parallel=fsdp in one process: nothing to shard, so no process group, no DTensor and no FSDP hooks
    (`fsdp_wraps`); the steps are the plain model's, step for step."""
    from torch.distributed.tensor import DTensor

    fsdp = Trainer(tiny_config("decoder", "parallel=fsdp", "run_name=fsdp"))
    assert not fsdp.fsdp and not torch.distributed.is_initialized()
    assert fsdp.forward_model is fsdp.model
    assert not any(isinstance(p, DTensor) for p in fsdp.model.parameters())
    assert fsdp.use_autocast == (fsdp.precision != "fp32")  # autocast casts, as in the plain model
    assert fsdp.strategy_name == "single: parallel=fsdp on one device has nothing to shard"
    plain = Trainer(tiny_config("decoder", "run_name=plain"))
    assert [fsdp.train_step().item() for _ in range(2)] == [plain.train_step().item() for _ in range(2)]


def test_gradient_accumulation_weights_every_labelled_token_alike(tiny_config):
    """MLM labels a different number of tokens in each micro-batch: 2 micro-batches of 4 give the gradient of
    one batch of 8 (the mean over all its labelled tokens), not the mean of the two micro-batch means."""
    big = Trainer(tiny_config("encoder", "trainer.micro_batch_size=8", "run_name=big"))
    small = Trainer(
        tiny_config("encoder", "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2", "run_name=acc")
    )
    small.model.load_state_dict(big.model.state_dict())
    whole = big.objective(big.train_loader.next_batch(), torch.Generator().manual_seed(0))

    def rows(part: slice) -> dict[str, torch.Tensor]:
        batch = {k: v[part] for k, v in whole.items() if k != "label_positions"}
        batch["label_positions"] = (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1)
        return batch

    halves = [rows(slice(0, 4)), rows(slice(4, 8))]
    assert len(halves[0]["label_positions"]) != len(halves[1]["label_positions"])
    big.batches.next = lambda: whole
    small.batches.next = iter(halves).__next__
    losses = []
    for t in (big, small):
        t.cfg.optim.grad_clip = 0.0
        t.optimizer.step = lambda: None  # keep the gradients to compare
        t.optimizer.zero_grad = lambda set_to_none=True: None
        losses.append(t.train_step())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tiny_config):
    """parallel.compile compiles each block; the training it computes is the eager one."""
    steps = ("trainer.max_steps=6", "trainer.sample_tokens=0", "trainer.checkpoint=false")
    eager = Trainer(tiny_config("decoder", *steps, "run_name=eager")).fit()
    compiled = Trainer(tiny_config("decoder", *steps, "run_name=compiled", "parallel.compile=true"))
    assert all(hasattr(block, "_orig_mod") for block in compiled.model.decoder.layers)  # OptimizedModule
    result = compiled.fit()
    assert result["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_matches_plain(tiny_config, dropout):
    """With dropout, the recomputation replays the forward's RNG state: the same masks, the same training."""
    steps = (
        "trainer.max_steps=4",
        "trainer.sample_tokens=0",
        "trainer.checkpoint=false",
        f"model.dropout={dropout}",
    )
    plain = Trainer(tiny_config("encoder_decoder", *steps, "run_name=plain")).fit()
    ckpt = Trainer(
        tiny_config("encoder_decoder", *steps, "run_name=ac", "parallel.activation_checkpointing=true")
    )
    assert all("Checkpoint" in type(block).__name__ for block in ckpt.model.encoder.layers)
    assert ckpt.fit()["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-5)


def test_throughput_metrics_are_logged_consistently(tiny_config):
    """Every log line carries tokens/s, TFLOP/s per device from the model's FLOPs, MFU and peak memory."""
    from llmtrain.measure.flops import training_flops_per_token
    from llmtrain.measure.shapes import lengths_for

    trainer = Trainer(tiny_config("encoder_decoder", "trainer.max_steps=6", "trainer.log_interval=3"))
    trainer.fit()
    records = [
        r
        for r in map(json.loads, (trainer.run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    lengths = lengths_for(trainer.cfg)
    per_token = training_flops_per_token(
        trainer.cfg.model, lengths
    )  # per corpus token (568-style raw windows)
    for r in records:
        corpus_tokens_per_s = r["tokens_per_s"] * lengths.corpus / lengths.inputs
        assert r["tflops_per_device"] * 1e12 == pytest.approx(corpus_tokens_per_s * per_token, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / trainer.peak_flops, rel=1e-9)
        assert 0 < r["mfu"] < 1.5 and r["peak_memory_gib"] > 0.05


def test_the_logged_learning_rate_is_the_one_each_update_used(tiny_config):
    """metrics.jsonl's lr at step s is the rate AdamW applied in step s (not the next step's), and the last
    step trains at min_lr_ratio."""
    cfg = tiny_config(
        "decoder",
        "trainer.max_steps=6",
        "trainer.log_interval=1",
        "optim.lr=0.01",
        "optim.warmup_steps=2",
        "optim.min_lr_ratio=0.1",
    )
    trainer = Trainer(cfg)
    used = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
    trainer.fit()
    logged = [
        r["lr"]
        for r in map(json.loads, (trainer.run_dir / "metrics.jsonl").read_text().splitlines())
        if "lr" in r
    ]
    assert logged == pytest.approx(used) and len(used) == 6
    assert used[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01]) and used[-1] == pytest.approx(0.001)


def test_throughput_windows_leave_out_evaluations_and_checkpoints(tiny_config, monkeypatch):
    """tokens/s and MFU time the training steps only: a slow evaluation or checkpoint between two log lines
    does not count against the window after it."""
    trainer = Trainer(
        tiny_config(
            "decoder",
            "trainer.max_steps=6",
            "trainer.log_interval=2",
            "trainer.eval_interval=2",
            "trainer.checkpoint_interval=3",
        )
    )
    pause = 1.5
    evaluate, save = trainer.evaluate, trainer.save
    monkeypatch.setattr(trainer, "evaluate", lambda: (time.sleep(pause), evaluate())[1])
    monkeypatch.setattr(trainer, "save", lambda: (time.sleep(pause), save())[1])
    trainer.fit()
    windows = [
        r
        for r in map(json.loads, (trainer.run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert [r["step"] for r in windows] == [2, 4, 6]
    for r in windows:  # two steps of a tiny model: far below one pause
        assert 2 * trainer.tokens_per_step / r["tokens_per_s"] < pause, windows


def test_every_evaluation_is_logged_to_the_console(tiny_config, caplog):
    """The first, each trainer.eval_interval, and the last evaluation print their val loss and bits per byte."""
    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=6", "trainer.eval_interval=2"))
    with caplog.at_level("INFO", logger="llmtrain"):
        result = trainer.fit()
    logged = [r.getMessage() for r in caplog.records if "val loss" in r.getMessage()]
    assert [line.split(":")[0] for line in logged] == ["step 0", "step 2", "step 4", "step 6"]
    assert logged[-1] == f"step 6: val loss {result['val_loss']:.4f}, bits per byte {result['val_bpb']:.4f}"


def test_flop_budget_sets_the_number_of_steps(tiny_config):
    probe = Trainer(tiny_config("decoder", "run_name=probe"))
    budget = 5.5 * probe.flops_per_step
    trainer = Trainer(tiny_config("decoder", f"trainer.max_flops={budget}", "trainer.sample_tokens=0"))
    assert trainer.cfg.trainer.max_steps == 5 and trainer.fit()["steps"] == 5
    # a budget below one step was rounded up to one step (76x the budget in the review), and the fit took the
    # budget as that run's C
    small = tiny_config("decoder", f"trainer.max_flops={0.5 * probe.flops_per_step}", "run_name=small")
    with pytest.raises(ConfigError, match=r"trainer.max_flops=\S+ pays for no step: one step of this model"):
        Trainer(small)
    assert not (Path(small.output_dir) / "small").exists()


@pytest.mark.parametrize("model", FAMILIES)
def test_document_attention_trains_every_family(tiny_config, model):
    """data.document_attention=true: the objective emits document ids, the model masks across documents, and
    the family still learns the corpus (packed windows of several templated documents)."""
    cfg = tiny_config(model, "trainer.max_steps=30", "data.document_attention=true")
    trainer = Trainer(cfg)
    raw = trainer.objective.raw_length
    windows = torch.as_tensor(trainer.corpus.train[: 64 * raw].astype("int64")).view(64, raw)
    batch = trainer.objective(windows, torch.Generator().manual_seed(0))
    assert batch["document_ids"].max() >= 1  # some windows hold more than one document
    result = trainer.fit()
    assert result["val_loss"] < result["initial_val_loss"] - 1.0, result


def test_every_layout_evaluates_the_same_windows_when_the_split_is_short(tiny_config):
    """eval_batches beyond the validation split: whole global batches are taken, the same windows for one
    micro-batch of 8 or two of 4 (counting micro-batches let the second layout take more)."""
    layouts = [("trainer.micro_batch_size=8",), ("trainer.micro_batch_size=4", "trainer.grad_accum_steps=2")]
    trainers = [
        Trainer(tiny_config("decoder", "trainer.eval_batches=100000", f"run_name=l{i}", *layout))
        for i, layout in enumerate(layouts)
    ]
    windows = [t.eval_micro_batches * t.cfg.trainer.micro_batch_size for t in trainers]
    assert windows[0] == windows[1] and windows[0] % 8 == 0
    assert windows[0] > 8 * 2  # more than the default eval_batches: the split, in whole global batches
    trainers[1].model.load_state_dict(trainers[0].model.state_dict())
    first, second = (t.evaluate()["val_loss"] for t in trainers)
    assert first == pytest.approx(second, rel=1e-6)


@pytest.mark.parametrize("model", ["encoder", "encoder_decoder"])
def test_evaluation_is_the_same_in_every_layout(tiny_config, model):
    """MLM's selection and the spans are drawn per window (seeded by its tokens), not per micro-batch or rank:
    one micro-batch of 8 and two of 4 give the same validation figures with the same weights."""
    layouts = [("trainer.micro_batch_size=8",), ("trainer.micro_batch_size=4", "trainer.grad_accum_steps=2")]
    trainers = [Trainer(tiny_config(model, f"run_name=l{i}", *layout)) for i, layout in enumerate(layouts)]
    trainers[1].model.load_state_dict(trainers[0].model.state_dict())
    first, second = (t.evaluate() for t in trainers)
    assert first["val_loss"] == pytest.approx(second["val_loss"], rel=1e-6)
    assert first["val_bpb"] == pytest.approx(second["val_bpb"], rel=1e-6)


def test_the_logits_are_freed_after_the_backward(tiny_config):
    """torchtitan frees the model's output before loss.backward(); the trainer kept it (B x T x V logits)
    through the optimizer step (and, with accumulation, the next micro-batch's forward): 8% of GPT-2 124M's
    tracked peak at micro-batch 1. The loss's graph holds what its backward needs and lets go of it there."""
    import weakref

    trainer = Trainer(tiny_config("decoder", "trainer.max_steps=1"))
    forward, logits = trainer.forward_model, []

    def watched(**batch):
        out = forward(**batch)
        logits.append(weakref.ref(out.logits))
        return out

    trainer.forward_model = watched
    step, alive_at_step = trainer.optimizer.step, []

    def checked(*args, **kwargs):
        alive_at_step.append(logits[-1]() is not None)
        return step(*args, **kwargs)

    trainer.optimizer.step = checked
    trainer.train_step()
    assert alive_at_step == [False]
