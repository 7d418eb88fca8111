"""The training loop. It never knows the family: an objective turns windows into a batch, the model a loss."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtrain.config import TRAINER_PRECISIONS, ConfigError, TrainConfig, fsdp_wraps, resolve_batch
from llmtrain.data import Corpus, DataError, Tokenizer, load_tokenizer
from llmtrain.data.mixture import build_loaders, load_corpus
from llmtrain.data.prefetch import Prefetcher, pinned
from llmtrain.distributed.env import DistInfo, all_reduce_sum, init_distributed, rank_zero_first
from llmtrain.distributed.parallelize import clip_grad_norm, parallelize, reshard_all
from llmtrain.inference.generate import greedy_seq2seq, sample
from llmtrain.measure.flops import forward_flops, measure_matmul_peak
from llmtrain.measure.hardware import accelerator_of_device
from llmtrain.measure.memory import measured_peak_bytes
from llmtrain.measure.shapes import lengths_for
from llmtrain.models import ModelConfig, build_model, count_parameters
from llmtrain.models.build import check_init_from
from llmtrain.models.heads import IGNORE_INDEX
from llmtrain.models.hf import architecture_differences
from llmtrain.objectives import CausalLM, MaskedLM, SpanCorruption
from llmtrain.objectives.evaluation import evaluation_batch
from llmtrain.training.checkpoint import (
    checkpoint_dir,
    incomplete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_rank_state,
    read_train_state,
    save_checkpoint,
)
from llmtrain.training.guards import NonFiniteGuard, SpikeDetector, StopRequest
from llmtrain.training.optim import apply_settings, build_optimizer, build_scheduler

log = logging.getLogger("llmtrain")
LN2 = math.log(2)


def build_objective(cfg: TrainConfig, tokenizer: Tokenizer):
    o, seq_len = cfg.objective, cfg.data.seq_len
    eos = tokenizer.eos_id if cfg.data.document_attention else None
    if o.name == "clm":
        return CausalLM(seq_len, document_eos_id=eos)
    if o.name == "mlm":
        return MaskedLM(
            seq_len,
            tokenizer.vocab_size,
            tokenizer.mask_id,
            tokenizer.special_ids,
            o.select_rate,
            o.mask_rate,
            o.random_rate,
            document_eos_id=eos,
        )
    return SpanCorruption(
        seq_len,
        tokenizer.sentinel_ids,
        tokenizer.eos_id,
        cfg.model.decoder_start_token_id,
        tokenizer.pad_id,
        o.noise_density,
        o.mean_noise_span_length,
        o.targets_length,
        document_attention=cfg.data.document_attention,
    )


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AMX or AVX512-BF16), where autocast pays off."""
    with contextlib.suppress(Exception):
        if torch._C._cpu._init_amx():
            return True
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def model_changes(saved: dict[str, Any], current: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """How the model of a checkpoint (its saved settings) and the configured one compute differently: name ->
    (there, now). Dropout, the init and settings the family does not use may change between restarts (as
    `model.init_from` allows them to); a checkpoint's settings from another version are compared as they are."""
    try:
        there = ModelConfig(**saved)
    except TypeError:
        return {k: (saved.get(k), v) for k, v in dataclasses.asdict(current).items() if saved.get(k) != v}
    return architecture_differences(there, current)


def resolve_precision(name: str, device: torch.device) -> str:
    if name not in TRAINER_PRECISIONS:  # validate() says so too; benchmarks build Trainers without it
        raise ConfigError(
            f"trainer.precision={name!r} is not allowed; allowed: {', '.join(TRAINER_PRECISIONS)}"
        )
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if name == "auto":
        return "bf16" if supported else "fp32"
    if name == "bf16" and device.type == "cuda" and not supported:
        raise ConfigError(
            f"trainer.precision=bf16 is not supported by {torch.cuda.get_device_name()}; use fp32"
        )
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            "trainer.precision=fp16 needs a CUDA device (loss scaling); on CPU use bf16 or fp32"
        )
    return name


def local_bytes(tensors) -> int:
    """Bytes this rank holds of the given tensors (a sharded DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def wandb_key_configured() -> bool:
    """WANDB_API_KEY, or a netrc entry for the W&B host (WANDB_BASE_URL, the base_url of wandb's settings file,
    else api.wandb.ai), where `wandb login` writes the key."""
    import configparser
    import netrc
    import urllib.parse

    if os.environ.get("WANDB_API_KEY"):
        return True
    settings = configparser.ConfigParser()
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    try:
        settings.read(config_dir / "settings")
    except configparser.Error:
        pass
    base_url = os.environ.get("WANDB_BASE_URL") or settings.get("default", "base_url", fallback="")
    host = urllib.parse.urlparse(base_url or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def dropout_seed(seed: int, rank: int, step: int = 0) -> int:
    """The global torch generator's seed on `rank` once the weights are made (dropout masks), for a run
    starting at `step`: each rank its own stream, apart from the objective's (seed + rank, ...)."""
    digest = hashlib.blake2b(f"dropout {seed} {rank} {step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl without what an interrupted run logged after its checkpoint at `step`, nor its
    evaluation at `step`, which the resumed run logs again (each step once, in order, for plots and fits)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
        if record["step"] < step or (record["step"] == step and "val_loss" not in record):
            kept.append(line + "\n")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    partial.replace(path)


class MetricsLog:
    """Console + metrics.jsonl + wandb (offline by default). Nothing secret is logged: only metrics."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, resolved_config: dict[str, Any], resumed_step: int | None
    ):
        """resumed_step: the checkpoint's step when the run resumes; metrics.jsonl then keeps what was logged
        up to it and continues, else starts empty."""
        self.jsonl = None
        if cfg.logger.jsonl:
            path = run_dir / "metrics.jsonl"
            if resumed_step is not None and path.is_file():
                drop_records_after(path, resumed_step)
            self.jsonl = path.open("w" if resumed_step is None else "a")
        self.wandb = None
        if cfg.logger.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logger.project,
                name=cfg.run_name,
                id=cfg.run_name,
                resume="allow",
                dir=str(run_dir),
                mode=cfg.logger.wandb,
                config=resolved_config,
            )

    @staticmethod
    def check_wandb(cfg: TrainConfig) -> None:
        """An online W&B run needs an API key; without one, and no terminal to ask for it on (torchrun, Slurm),
        wandb.init fails after the run directory is written. Checked before anything is written, from the
        places `wandb login` keeps a key (WANDB_API_KEY, ~/.netrc): no network, no prompt."""
        interactive = sys.stdin is not None and sys.stdin.isatty()
        if cfg.logger.wandb != "online" or interactive or wandb_key_configured():
            return
        raise ConfigError(
            "logger.wandb=online needs a W&B API key and there is no terminal to ask for one on; set "
            "WANDB_API_KEY or run `wandb login`, or use logger.wandb=offline and `wandb sync` the run later"
        )

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()


class Trainer:
    def __init__(
        self, cfg: TrainConfig, resolved_config: dict[str, Any] | None = None, corpus: Corpus | None = None
    ):
        self.cfg = cfg
        # trainer.time_limit_minutes counts from here: startup is in the job's slot too
        self.started = time.monotonic()
        t = cfg.trainer
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        try:
            self.dist: DistInfo = init_distributed(
                t.device,
                cfg.parallel.timeout_minutes,
                need_group=fsdp_wraps(cfg.parallel, 1),  # several ranks make a group anyway
            )
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.device, rank, world = self.dist.device, self.dist.rank, self.dist.world_size
        resolve_batch(cfg, world)
        self.fsdp = fsdp_wraps(cfg.parallel, world)  # fsdp on one device trains unwrapped unless asked
        if self.fsdp and world == 1 and not cfg.parallel.cpu_offload:
            self.log(
                "parallel.reshard_after_forward=%s: FSDP wraps on one device too (1.3-2.2x the plain step on "
                "one H100); leave it null to train the plain model",
                cfg.parallel.reshard_after_forward,
            )
        self.precision = resolve_precision(t.precision, self.device)
        if cfg.parallel.zero1 and not self.dist.distributed:
            raise ConfigError(
                "parallel.zero1=true shards the optimizer states over data-parallel ranks; this is one process "
                "(launch with torchrun --nproc_per_node=N, N >= 2, or drop parallel.zero1)"
            )
        if cfg.parallel.cpu_offload and self.device.type != "cuda":
            raise ConfigError(
                "parallel.cpu_offload=true offloads CUDA shards to host memory; it needs a CUDA device"
            )
        seed_everything(cfg.seed)  # the same on every rank: identical initial weights
        init_from = cfg.model.init_from
        if init_from and not (Path(init_from) / "config.json").is_file():  # before a tokenizer is trained
            raise ConfigError(
                f"model.init_from={init_from} is not a Hugging Face model folder ("
                + ("it holds no config.json" if Path(init_from).is_dir() else "no such folder")
                + "); give a folder with config.json and model.safetensors, as scripts/export_hf.py writes"
            )
        # the architecture before the data is read (tokenizing can take minutes); the vocabulary follows the
        # tokenizer, and is checked with the weights
        if init_from:
            check_init_from(cfg.model)
        chosen_tokenizer = self._init_from_tokenizer(cfg)

        def read_corpus() -> Corpus:
            try:
                return load_corpus(cfg.data)  # data.shards, data.mixture, or tokenised here
            except DataError as err:  # e.g. shards made with another tokenizer than the weights'
                if chosen_tokenizer is None:
                    raise
                raise DataError(
                    f"model.init_from={cfg.model.init_from} set data.tokenizer.path={chosen_tokenizer} (the "
                    f"tokenizer its weights were trained with): {err}"
                ) from None

        # rank 0 tokenizes and caches first; the others then read its cache
        self.corpus = corpus or rank_zero_first(read_corpus, "tokenizing the data")
        tok = self.corpus.tokenizer
        self._fit_vocabulary(tok)
        cfg.model.pad_token_id = tok.pad_id
        cfg.model.decoder_start_token_id = tok.pad_id
        self.objective = build_objective(cfg, tok)
        self.token_bytes = tok.token_bytes().to(self.device)
        if not tok.bytes_exact and self.dist.is_main:
            log.warning(
                "bits per byte counts the bytes of %s's tokens, which leave out what the tokenizer does not keep "
                "(WordPiece: the spaces between words; <unk>: its characters): exact for byte-level BPE only",
                self.corpus.tokenizer_path,
            )

        raw, batch = self.objective.raw_length, t.micro_batch_size
        pipeline = build_loaders(
            cfg.data, raw, batch, cfg.seed, rank, world, corpus=self.corpus, steps_of=t.grad_accum_steps
        )
        self.train_loader, self.val_loader = pipeline.train_loader, pipeline.val_loader
        # an eval batch is a global batch (micro x accumulation x ranks) and the val loader's epoch whole global
        # batches (steps_of), so every layout evaluates the same windows, a short split included
        self.eval_micro_batches = min(t.eval_batches * t.grad_accum_steps, self.val_loader.batches_per_epoch)
        self.objective_rng = torch.Generator().manual_seed(cfg.seed + rank)  # each rank masks its own windows
        # windows -> objective -> (pinned) batch, made ahead in a background thread
        # a step takes its grad_accum_steps micro-batches at once (it counts their labels first): made ahead,
        # a whole step's worth is ready
        self.batches = Prefetcher(
            self.train_loader,
            self.objective,
            self.objective_rng,
            t.prefetch and max(t.prefetch, t.grad_accum_steps),
            pin_memory=self.device.type == "cuda",
        )

        sequences = t.micro_batch_size * t.grad_accum_steps * world
        self.flops_per_step = forward_flops(cfg.model, lengths_for(cfg)).training * sequences  # all ranks
        if t.max_flops:  # a compute budget (IsoFLOP sweeps): as many steps as it pays for
            if t.max_flops < self.flops_per_step:  # one step would overspend it, and the fit take it as C
                raise ConfigError(
                    f"trainer.max_flops={t.max_flops:.3g} pays for no step: one step of this model and batch is "
                    f"{self.flops_per_step:.3g} FLOPs; raise it, or lower the batch or the model"
                )
            t.max_steps = int(t.max_flops // self.flops_per_step)
            self.log(
                "trainer.max_flops=%.3g: %d steps of %.3g FLOPs",
                t.max_flops,
                t.max_steps,
                self.flops_per_step,
            )

        self.model = build_model(cfg.model, self.device)
        # the module to call in training (DDP wraps; FSDP shards self.model in place)
        self.forward_model = parallelize(self.model, cfg.parallel, self.dist, self.precision)
        # the weights came from one seed on every rank; dropout draws each rank's own masks (as nanoGPT's seed
        # + rank), so a global batch over ranks is masked as it is in one process
        torch.manual_seed(dropout_seed(cfg.seed, rank))
        # FSDP casts parameters itself (MixedPrecisionPolicy); otherwise autocast does
        self.use_autocast = self.precision != "fp32" and not self.fsdp
        self.scaler = self._make_scaler()
        self.optimizer = build_optimizer(
            self.model,
            cfg.optim,
            self.device.type,
            zero1=cfg.parallel.zero1,
            fused=not (self.scaler is not None and self.fsdp),
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)
        self.step, self.tokens_seen = 0, 0
        self.checkpointed_step: int | None = None  # the step of the checkpoint saved or loaded last
        self.grad_bytes: int | None = None
        self._peak_flops: float | None = None
        self.guard = NonFiniteGuard(t.nonfinite, t.max_skips, check_grad_norm=self.precision != "fp16")
        # fused AdamW takes found_inf (as under GradScaler): the guard's verdict stays on the device and the
        # optimizer skips a bad update itself, so a step needs no host sync; others decide on the host
        # (not with parameters offloaded to the CPU: the flag would cross devices without a sync)
        # ZeRO-1 steps its rank's part with a wrapped fused AdamW, which takes found_inf in the same way
        self.steps_with = getattr(self.optimizer, "optim", self.optimizer)
        self.guard_on_device = (
            self.scaler is None
            and getattr(self.steps_with, "_step_supports_amp_scaling", False)
            and all(p.device == self.device for p in self.model.parameters())
        )
        self.spikes = SpikeDetector(t.spike_factor)
        self.flops_spent = 0.0  # by the steps so far, at each one's own shape (a resume may change it)
        # the training losses since the last log (summed on the device) and their count: a resume continues
        # the window, so the next record averages the same steps as an uninterrupted run's
        self.window_loss = torch.zeros((), device=self.device)
        self.window_steps = 0

        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        resolved_config = resolved_config or dataclasses.asdict(cfg)
        self.resumed = self._resume()  # refuses a run directory it cannot continue before writing into it

        def write_run_directory() -> None:
            if self.dist.is_main:
                MetricsLog.check_wandb(cfg)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                finished = self.resumed and self.step >= t.max_steps  # it keeps what it trained with
                if not finished:
                    (self.run_dir / "config.json").write_text(
                        json.dumps(resolved_config, indent=1, default=str)
                    )
                kept = self.run_dir / "tokenizer.json"  # export, generate and evaluate find it there
                source = Path(self.corpus.tokenizer_path)
                if source.is_file() and (not kept.exists() or not kept.samefile(source)):
                    shutil.copyfile(source, kept)

        rank_zero_first(write_run_directory, "writing the run directory")
        self.metrics = (
            MetricsLog(cfg, self.run_dir, resolved_config, self.step if self.resumed else None)
            if self.dist.is_main
            else None
        )

    def _init_from_tokenizer(self, cfg: TrainConfig) -> Path | None:
        """model.init_from without data.tokenizer.path: read the text as the weights were trained to, with the
        folder's tokenizer.json (a resumed run: the one it started with, its run directory's copy). Returns
        the tokenizer chosen, or None (a tokenizer is then trained on the data, with a warning)."""
        if not cfg.model.init_from or cfg.data.tokenizer.path is not None:
            return None
        own = Path(cfg.output_dir) / cfg.run_name / "tokenizer.json"
        folder = Path(cfg.model.init_from) / "tokenizer.json"
        resuming = cfg.trainer.resume == "auto" and latest_checkpoint(own.parent) is not None
        chosen = own if resuming and own.is_file() else folder
        warn = log.warning if self.dist.is_main else (lambda *args: None)
        if not chosen.is_file():
            warn(
                "model.init_from=%s holds no tokenizer.json: a tokenizer is trained on the data, whose ids need "
                "not be the ones the weights learned; set data.tokenizer.path to the model's tokenizer",
                cfg.model.init_from,
            )
            return None
        try:
            load_tokenizer(chosen)
        except ValueError as err:  # e.g. a Hugging Face tokenizer.json without llmtrain's special tokens
            warn(
                "model.init_from: %s; a tokenizer is trained on the data instead (set data.tokenizer.path)",
                err,
            )
            return None
        cfg.data.tokenizer.path = str(chosen)
        self.log("model.init_from: data.tokenizer.path=%s", chosen)
        return chosen

    def _fit_vocabulary(self, tok: Tokenizer) -> None:
        """The model's vocabulary follows the tokenizer; token ids beyond it are refused naming the tokens."""
        if self.cfg.model.vocab_size == 0:
            self.cfg.model.vocab_size = tok.vocab_size
        elif self.cfg.model.vocab_size < tok.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                f"({self.corpus.tokenizer_path}); allowed: 0 (from the tokenizer) or >= {tok.vocab_size}"
            )
        for split, tokens in (("train", self.corpus.train), ("validation", self.corpus.val)):
            top = int(tokens.max()) if len(tokens) else -1
            if top >= self.cfg.model.vocab_size:
                raise ConfigError(
                    f"the {split} tokens of {getattr(tokens, 'filename', None) or self.cfg.data.cache_dir} hold id "
                    f"{top}, beyond model.vocab_size={self.cfg.model.vocab_size}; were they made with "
                    f"another tokenizer than {self.corpus.tokenizer_path}?"
                )

    def _make_scaler(self):
        """fp16 needs loss scaling (sharded under FSDP); bf16 and fp32 do not."""
        if self.precision != "fp16":
            return None
        if self.fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler()
        return torch.amp.GradScaler("cuda")

    # -- pieces ---------------------------------------------------------------------------------------------

    def autocast(self):
        if self.use_autocast:
            return torch.autocast(
                self.device.type, dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16
            )
        return contextlib.nullcontext()

    def gradient_sync(self, enabled: bool):
        """What communication waits for the last micro-step of accumulation. DDP: its all-reduce (no_sync).
        FSDP still reduce-scatters every micro-step, so gradients stay sharded (deferring it would keep a whole
        fp32 gradient on every rank, 4 bytes a parameter, until the last micro-step; torchtitan also reduces
        every micro-batch); under HSDP only the all-reduce across the replicas waits."""
        if self.fsdp:
            self.model.set_requires_all_reduce(enabled)
        elif not enabled and isinstance(self.forward_model, torch.nn.parallel.DistributedDataParallel):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def evaluates_at(self, step: int) -> bool:
        """The training loop evaluates after `step` (an interval before the last step; the final evaluation
        follows the last one)."""
        t = self.cfg.trainer
        return bool(t.eval_interval) and step % t.eval_interval == 0 and step < t.max_steps

    def log(self, message: str, *args) -> None:
        if self.dist.is_main:
            log.info(message, *args)

    def log_evaluation(self, metrics: dict[str, float]) -> None:
        self.log(
            "step %d: val loss %.4f, bits per byte %.4f", self.step, metrics["val_loss"], metrics["val_bpb"]
        )

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.metrics:
            self.metrics.write(record)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pin = self.device.type == "cuda"
        return {
            k: (pinned(v) if pin and not v.is_pinned() else v).to(self.device, non_blocking=True)
            for k, v in batch.items()
        }

    @property
    def strategy_name(self) -> str:
        """What runs: parallel.strategy, except `single` on several ranks, which is DDP, and `fsdp` on one device
        without offloading or a resharding setting, which is the plain model."""
        strategy = self.cfg.parallel.strategy
        if strategy == "single" and isinstance(self.forward_model, torch.nn.parallel.DistributedDataParallel):
            return "ddp, from parallel=single on several ranks"
        if strategy == "fsdp" and not self.fsdp:
            return "single: parallel=fsdp on one device has nothing to shard"
        return strategy + (" + zero1" if self.cfg.parallel.zero1 and strategy != "fsdp" else "")

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimizer step over all ranks."""
        t = self.cfg.trainer
        return t.micro_batch_size * t.grad_accum_steps * self.dist.world_size * self.objective.seq_len

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity and bits per byte over the first eval_batches of the validation split.

        bits per byte = summed nats / ln 2 / UTF-8 bytes of the predicted tokens, so runs with different
        tokenizers compare. The objective's randomness (MLM masks, spans) is fixed for every evaluation, and is
        each window's own (`evaluation_batch`): every layout of the same global batch gives the same figures.
        """
        self.guard.check()  # never evaluate (or save) weights of a run that should have stopped
        self.model.eval()
        self.val_loader.load_state_dict({"epoch": 0, "windows": 0})
        nats = torch.zeros((), device=self.device, dtype=torch.float64)
        targets = torch.zeros((), device=self.device, dtype=torch.long)
        n_bytes = torch.zeros((), device=self.device, dtype=torch.long)
        for _ in range(self.eval_micro_batches):
            windows = self.val_loader.next_batch()
            batch = self.to_device(evaluation_batch(self.objective, windows, self.cfg.seed + 1))
            with self.autocast():
                out = self.model(**batch)
            nats += out.loss.double() * out.n_targets
            targets += out.n_targets
            labels = batch["labels"]
            # bytes of the labelled tokens, without boolean-mask indexing (a device sync on CUDA)
            n_bytes += (self.token_bytes[labels.clamp(min=0)] * (labels >= 0)).sum()
        self.model.train()
        sums = all_reduce_sum(torch.stack([nats, targets.double(), n_bytes.double()]))
        nats, targets, n_bytes = sums[0], sums[1], sums[2]
        loss = (nats / targets.clamp(min=1)).item()
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": (nats / LN2 / n_bytes.clamp(min=1)).item(),
        }

    def train_step(self) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (on device).

        The step's loss is the mean over all of its labelled tokens, on every micro-batch and rank, as one large
        batch would give, not a mean of micro-batch means: MLM labels a different number of tokens in each
        (as Hugging Face's num_items_in_batch). The count stays on the device: no host sync."""
        accum, world = self.cfg.trainer.grad_accum_steps, self.dist.world_size
        batches = [self.to_device(self.batches.next()) for _ in range(accum)]
        labelled = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in batches]).sum().double()
        step_targets = all_reduce_sum(labelled).clamp(min=1)  # the ranks' gradients are averaged: x world
        total = torch.zeros((), device=self.device)
        for micro_step, batch in enumerate(batches):
            with self.gradient_sync(micro_step == accum - 1):
                with self.autocast():
                    out = self.forward_model(**batch)
                    # 1 with one micro-batch in one process, 1/accum with equal counts
                    loss = out.loss * ((out.n_targets * world).double() / step_targets).float()
                    del out  # its logits (B x T x V) would live through the backward and the optimizer step
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        self.grad_norm = clip_grad_norm(self.model.parameters(), clip)
        if self.grad_bytes is None:  # measured once, while the gradients exist
            self.grad_bytes = local_bytes(p.grad for p in self.model.parameters() if p.grad is not None)
        if self.guard_on_device:  # agreed by all ranks; read back at the next log, eval or checkpoint
            self.steps_with.found_inf = self.guard.defer(
                self.guard.flag(total, self.grad_norm), self.step + 1
            )
            self.optimizer.step()
        elif self.guard.bad(total, self.grad_norm):  # agreed by all ranks: all skip, or none
            self.guard.handle(self.step + 1)
            if self.scaler:
                self.scaler.update()  # lowers the scale after an overflow
        elif self.scaler:
            self.scaler.step(self.optimizer)  # skips the step itself when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this step's update used (logged)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.flops_spent += self.flops_per_step
        return total

    # -- checkpoints ----------------------------------------------------------------------------------------

    @property
    def peak_flops(self) -> float:
        """Peak FLOP/s of one device for MFU: configured, else the datasheet of a known GPU, else a probe."""
        if self._peak_flops is None:
            dtype = {"bf16": "bf16", "fp16": "fp16"}.get(self.precision, "fp32")
            known = (
                accelerator_of_device(torch.cuda.get_device_name(self.device))
                if self.device.type == "cuda"
                else None
            )
            if self.cfg.trainer.peak_tflops:
                self._peak_flops = self.cfg.trainer.peak_tflops * 1e12
            elif known is not None:
                tf32 = dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32
                self._peak_flops = known.peak_flops("tf32" if tf32 else dtype)
            else:
                probe_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
                self._peak_flops = measure_matmul_peak(probe_dtype, self.device, seconds=0.1)
        return self._peak_flops

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer states this rank holds, from the local tensors."""
        reshard_all(self.model)  # FSDP: count the shards, not what the last evaluation left gathered
        states = getattr(self.optimizer, "optim", self.optimizer).state  # ZeRO-1: this rank's local optimizer
        optimizer_tensors = (
            v for state in states.values() if state for v in state.values() if torch.is_tensor(v)
        )
        return {
            "parameters": local_bytes(self.model.parameters()),
            "gradients": self.grad_bytes or 0,
            "optimizer": local_bytes(optimizer_tensors),
        }

    def train_state(self) -> dict[str, Any]:
        """What every rank shares; model and optimizer go through DCP beside it."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "loader": self.batches.state_dict()["loader"],  # after the last batch consumed, not prefetched
            "model_config": dataclasses.asdict(self.cfg.model),
            "tokenizer": self.corpus.tokenizer.digest(),  # the ids the weights learned
            "world_size": self.dist.world_size,
            "skipped": self.guard.skipped,  # non-finite updates skipped so far, against trainer.max_skips
            "optim": dataclasses.asdict(self.cfg.optim),  # what a resume with other settings names
            "max_steps": self.cfg.trainer.max_steps,
            "flops_spent": self.flops_spent,
            # the ranks' mean loss summed over the steps since the last log (a collective: every rank saves)
            "loss_window": [
                float(all_reduce_sum(self.window_loss.clone()) / self.dist.world_size),
                self.window_steps,
            ],
            "spike_mean": self.spikes.mean,
        }

    def rank_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "objective": self.batches.state_dict()["rng"]}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def save(self) -> Path:
        """A checkpoint of this step; none when this process saved or loaded one at this step already (a stop
        right after a periodic save, a finished run started again): nothing trained since. Decided from this
        process's own record, the same on every rank."""
        self.guard.check()
        if self.checkpointed_step == self.step:
            path = checkpoint_dir(self.run_dir, self.step)
            self.log("checkpoint: %s (saved at this step already)", path)
            return path
        path = save_checkpoint(
            self.run_dir,
            self.step,
            self.model,
            self.optimizer,
            self.train_state(),
            self.rank_state(),
            self.dist.rank,
            keep_last_k=self.cfg.trainer.keep_last_k,
        )
        self.checkpointed_step = self.step
        self.log("checkpoint: %s", path)
        return path

    def _resume(self) -> bool:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        if self.cfg.trainer.resume == "never":
            raise ConfigError(
                f"trainer.resume=never, but run directory {self.run_dir} already holds checkpoints (newest "
                f"{path.name}), which a new run there would mix with; choose another run_name, or remove the "
                "directory to start again"
            )
        for skipped in incomplete_checkpoints(self.run_dir):
            self.log("skipping incomplete checkpoint %s (a save that did not finish)", skipped)
        try:
            state = read_train_state(path)
        except Exception as err:  # a truncated or foreign train_state.pt
            raise ConfigError(
                f"cannot read {path / 'train_state.pt'} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                f"remove {path} to resume from an earlier checkpoint, or choose another run_name"
            ) from None
        changed = model_changes(state["model_config"], self.cfg.model)
        if changed:
            raise ConfigError(
                f"run directory {self.run_dir} holds a checkpoint of another model ("
                + ", ".join(f"model.{k}: {a} there, {b} now" for k, (a, b) in changed.items())
                + "); choose another run_name, or remove the directory to start again"
            )
        tokenizer = self.corpus.tokenizer.digest()
        if state.get("tokenizer", tokenizer) != tokenizer:  # checkpoints from before the digest: not checked
            raise ConfigError(
                f"run directory {self.run_dir} holds a checkpoint trained with another tokenizer than the data's "
                f"now ({self.corpus.tokenizer_path}): its token ids would mean other tokens; resume on data made "
                f"with {self.run_dir / 'tokenizer.json'} (data.tokenizer.path), or choose another run_name"
            )
        try:
            load_checkpoint(path, self.model, self.optimizer)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.scheduler.load_state_dict(state["scheduler"])
        self._continue_schedule(state)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.checkpointed_step = self.step
        self.guard.skipped = state.get("skipped", 0)
        if "loss_window" in state:  # checkpoints from before the eleventh session start a new window
            self.window_loss.fill_(state["loss_window"][0])
            self.window_steps = state["loss_window"][1]
            self.spikes.mean = state["spike_mean"]
        self.train_loader.load_state_dict(state["loader"])
        rng = read_rank_state(path, self.dist.rank)
        if rng is not None and state["world_size"] == self.dist.world_size:
            torch.set_rng_state(rng["torch"])
            self.objective_rng.set_state(rng["objective"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:  # another world size: fresh, still deterministic, streams
            self.objective_rng.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)
            torch.manual_seed(dropout_seed(self.cfg.seed, self.dist.rank, self.step))
        self.batches.load_state_dict(
            {"loader": self.train_loader.state_dict(), "rng": self.objective_rng.get_state()}
        )
        self.log("resumed from %s (step %d, saved by %d rank(s))", path, self.step, state["world_size"])
        if self.step >= self.cfg.trainer.max_steps:
            log.warning(
                "run directory %s already holds a finished run (step %d); choose another run_name, raise "
                "trainer.max_steps, or remove the directory to start again",
                self.run_dir,
                self.step,
            )
        return True

    def _continue_schedule(self, state: dict[str, Any]) -> None:
        """This run's optimizer settings and schedule from the checkpoint's step on, naming what changed: the
        checkpoint's param_groups would otherwise keep its learning rate, decay, betas and eps while the
        schedule's shape followed the new settings. A compute budget counts the FLOPs spent before (at the
        shape they were spent at), so a resume with another micro-batch or world size still spends it."""
        t, step = self.cfg.trainer, state["step"]
        before = self.optimizer.param_groups[0]["lr"]  # the checkpoint's (a new scheduler would reset it)
        spent = self.flops_spent = state.get("flops_spent", step * self.flops_per_step)
        if t.max_flops:
            if abs(spent - step * self.flops_per_step) > 1e-9 * spent:  # another shape than before
                t.max_steps = step + max(0, int((t.max_flops - spent) // self.flops_per_step))
                self.log(
                    "trainer.max_flops=%.3g: %.3g spent, %d steps in all", t.max_flops, spent, t.max_steps
                )
                self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, t.max_steps)
                self.scheduler.load_state_dict(state["scheduler"])
        apply_settings(self.optimizer, self.scheduler, self.cfg.optim, step)
        saved, now = state.get("optim", {}), dataclasses.asdict(self.cfg.optim)
        changed = [f"optim.{k}: {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
        if state.get("max_steps", t.max_steps) != t.max_steps:
            changed.append(f"trainer.max_steps: {state['max_steps']} -> {t.max_steps}")
        if changed and self.dist.is_main:
            log.warning(
                "resuming with other settings than the checkpoint's (%s): this run's apply from step %d, "
                "whose learning rate is %.4g (the checkpoint's schedule: %.4g)",
                ", ".join(changed),
                step,
                self.optimizer.param_groups[0]["lr"],
                before,
            )

    # -- the loop -------------------------------------------------------------------------------------------

    def fit(self, stop: StopRequest | None = None) -> dict[str, float]:
        """Train to trainer.max_steps, or until a stop request (a signal, the time limit) has it checkpoint and
        return. stop: one made before the Trainer (scripts/train.py), so a signal during start-up (rank 0
        tokenizing, the first evaluation) stops the run instead of killing the process; else made here."""
        cfg, t = self.cfg, self.cfg.trainer
        owned = stop is None
        if owned:
            stop = StopRequest(t.time_limit_minutes, since=self.started)
        n_params = count_parameters(self.model)
        self.log(
            "model: %s, %.2fM parameters (%.2fM without embeddings); %s on %s x %d (%s); %d tokens per step",
            cfg.model.family, n_params / 1e6, count_parameters(self.model, exclude_embeddings=True) / 1e6,
            self.precision, self.device.type, self.dist.world_size, self.strategy_name, self.tokens_per_step,
        )  # fmt: skip
        first = self.evaluate()
        self.log_evaluation(first)
        # a resumed run logs its evaluation at the checkpoint's step only where an uninterrupted run logs one:
        # at an evaluation interval before the last step (the final evaluation logs that one)
        if not self.resumed or self.evaluates_at(self.step):
            self.write_metrics({"step": self.step, **first})
        result = {"initial_" + k: v for k, v in first.items()}
        # config.json keeps vocab_size 0 where it came from the tokenizer; the fit reads the model's from here
        result["vocab_size"] = self.cfg.model.vocab_size

        progress = None
        if t.progress and self.dist.is_main:
            from tqdm import tqdm

            progress = tqdm(
                total=t.max_steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True
            )
        start = time.perf_counter()
        # the stop handlers stay until the run has ended: a signal after the last step (during the final
        # checkpoint or evaluation) lets the run finish instead of killing it before its checkpoint
        try:
            return self._finish(stop, progress, result, start)
        finally:
            if owned:
                stop.restore()

    def _finish(self, stop: StopRequest, progress, result: dict[str, Any], start: float) -> dict[str, float]:
        """fit's training loop and ending (a stop's checkpoint, or the final checkpoint, evaluation and sample),
        under `stop`'s signal handlers."""
        t = self.cfg.trainer
        try:
            stopped = self._loop(stop, progress)
        finally:
            self.batches.close()
            if progress:
                progress.close()
        stop.training_over = True
        if stopped:
            self.save()
            self.log(
                "stopped at step %d (%s); the same command resumes from the checkpoint", self.step, stopped
            )
            result.update(
                stopped=stopped,
                steps=self.step,
                tokens=self.tokens_seen,
                train_seconds=time.perf_counter() - start,
            )
            if self.dist.is_main:
                (self.run_dir / "result.json").write_text(json.dumps(result, indent=1))
                self.metrics.close()
            return result

        if t.checkpoint:  # before the final evaluation: a stop asked for during it finds the run saved
            self.save()
        final = self.evaluate()
        self.write_metrics({"step": self.step, **final})
        self.log_evaluation(final)
        result.update(
            final,
            train_seconds=time.perf_counter() - start,
            steps=self.step,
            tokens=self.tokens_seen,
            flops=self.flops_spent,  # training FLOPs of all ranks (from the shapes; 6ND is near it)
        )
        result["state_bytes_rank0"] = self.state_bytes()
        if t.sample_tokens:  # every rank runs it (FSDP forwards are collective); rank 0 prints
            self.log("sample:\n%s", self.sample_text(t.sample_tokens))
        if self.dist.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=1))
            self.metrics.close()
        return result

    def _loop(self, stop: StopRequest, progress) -> str | None:
        """Train to max_steps; returns why it stopped early (a signal, the time limit), or None."""
        t = self.cfg.trainer
        window_start, timed_steps = time.perf_counter(), 0  # throughput: the steps of this process only
        while self.step < t.max_steps:
            self.window_loss += self.train_step()
            self.window_steps += 1
            timed_steps += 1
            if progress:
                progress.update(1)
            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                self.guard.check()  # the non-finite verdicts of the steps since the last check
                elapsed = time.perf_counter() - window_start
                mean_loss = all_reduce_sum(self.window_loss / self.window_steps) / self.dist.world_size
                record = {
                    "step": self.step,
                    "loss": mean_loss.item(),  # the host sync of the loop, at log intervals only
                    "lr": self.lr,
                    "grad_norm": float(self.grad_norm),
                    "tokens": self.tokens_seen,
                    "tokens_per_s": timed_steps * self.tokens_per_step / elapsed,
                    "tflops_per_device": timed_steps
                    * self.flops_per_step
                    / elapsed
                    / self.dist.world_size
                    / 1e12,
                    "peak_memory_gib": measured_peak_bytes(self.device) / 2**30,
                }
                record["mfu"] = record["tflops_per_device"] * 1e12 / self.peak_flops
                if hasattr(self.train_loader, "proportions"):  # a mixture: the shares trained on so far
                    shares = self.train_loader.proportions(self.batches.state_dict()["loader"])
                    record.update({f"data/{k}": v for k, v in shares.items()})
                if self.spikes.update(record["loss"]):
                    record["loss_spike"] = True
                    self.log(
                        "loss spike at step %d: %.4f (running mean %.4f)",
                        self.step,
                        record["loss"],
                        self.spikes.mean,
                    )
                self.write_metrics(record)
                if progress:
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        mfu=f"{record['mfu']:.1%}",
                    )
                else:
                    self.log(
                        "step %d: loss %.4f, %.0f tokens/s, %.3f TFLOP/s per device, MFU %.1f%%, peak memory %.2f GiB",
                        self.step, record["loss"], record["tokens_per_s"], record["tflops_per_device"],
                        100 * record["mfu"], record["peak_memory_gib"],
                    )  # fmt: skip
                self.window_loss.zero_()
                self.window_steps = 0
                window_start, timed_steps = time.perf_counter(), 0
            # evaluation and checkpoints are not training: off the window's clock, once the queued steps are done
            evaluate = self.evaluates_at(self.step)
            save = (
                t.checkpoint_interval and self.step % t.checkpoint_interval == 0 and self.step < t.max_steps
            )
            if (evaluate or save) and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            paused = time.perf_counter()
            if evaluate:
                evaluated = self.evaluate()
                self.write_metrics({"step": self.step, **evaluated})
                self.log_evaluation(evaluated)
            if save:
                self.save()
            window_start += time.perf_counter() - paused
            if self.step < t.max_steps and self._stop_requested(stop):
                return stop.reason
        return None

    def _stop_requested(self, stop: StopRequest) -> bool:
        if not self.dist.distributed:
            return stop.local()
        if self.step % self.cfg.trainer.stop_check_interval:
            return False
        return stop.agreed()  # every rank, the same steps: no collective on some ranks only

    def sample_text(self, n_tokens: int) -> str:
        """A short demonstration of what the model learnt, in its family's own way."""
        tok, family = self.corpus.tokenizer, self.cfg.model.family
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        window = torch.as_tensor(self.corpus.val[: self.objective.raw_length].astype(np.int64))[None]
        with self.autocast():
            if family == "decoder":
                prompt = window[:, :16].to(self.device)
                out = sample(self.model, prompt, n_tokens, eos_token_id=None, generator=gen)
                text = tok.decode(prompt[0].tolist()) + " ⟶ " + tok.decode(out[0, prompt.shape[1] :].tolist())
            elif family == "encoder":
                batch = self.to_device(
                    self.objective(window[:, : self.objective.raw_length], torch.Generator().manual_seed(0))
                )
                logits = self.model(batch["input_ids"]).logits[0]
                selected = batch["labels"][0] >= 0
                guesses, truth = logits[selected].argmax(-1).tolist(), batch["labels"][0][selected].tolist()
                hits = sum(g == r for g, r in zip(guesses, truth))
                text = f"masked tokens predicted: {hits}/{len(truth)}; e.g. " + ", ".join(
                    f"{tok.decode([r])!r}->{tok.decode([g])!r}" for g, r in list(zip(guesses, truth))[:8]
                )
            else:
                batch = self.to_device(self.objective(window, torch.Generator().manual_seed(0)))
                length = min(n_tokens, 64, batch["labels"].shape[1])  # the decoder's trained length
                out = greedy_seq2seq(self.model, batch["input_ids"][:1], length, tok.eos_id)
                text = (
                    "target: " + tok.decode(batch["labels"][0][batch["labels"][0] >= 0].tolist(), False)[:300]
                    + "\nmodel:  " + tok.decode(out[0].tolist(), False)[:300]
                )  # fmt: skip
        self.model.train()
        return text
