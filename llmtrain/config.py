"""Typed schema of the whole config tree, registered with Hydra, and the checks run before any work.

Hydra composes `configs/train.yaml` on top of `TrainConfig`, so a misspelled key or a wrong type stops the run
at composition time with a message naming the key. `validate()` then checks what types cannot express.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from llmtrain.models.config import ModelConfig, ModelConfigError, check_model_config
from llmtrain.objectives import OBJECTIVE_FAMILY, check_mlm_rates, check_span_settings


@dataclass
class ObjectiveConfig:
    name: str = "clm"
    """clm | mlm | span_corruption; each model config picks the one its family trains with."""
    select_rate: float = 0.15
    """MLM: fraction of non-special tokens selected for prediction."""
    mask_rate: float = 0.8
    """MLM: fraction of selected tokens replaced by [MASK]."""
    random_rate: float = 0.1
    """MLM: fraction of selected tokens replaced by a random token (the rest stay unchanged)."""
    noise_density: float = 0.15
    """Span corruption: fraction of raw tokens corrupted."""
    mean_noise_span_length: float = 3.0
    """Span corruption: mean length of a corrupted span."""
    targets_length: int | None = None
    """Span corruption: decoder length; null derives it from data.seq_len (512 -> 114 at the defaults)."""


@dataclass
class TokenizerConfig:
    path: str | None = None
    """An existing tokenizer.json to use; null trains a byte-level BPE on the corpus (cached by corpus)."""
    vocab_size: int = 4096
    min_frequency: int = 2
    train_bytes: int = 8_000_000
    """Train the BPE on at most this many bytes of training text."""
    n_sentinels: int = 100
    """<extra_id_0> ... for span corruption."""


@dataclass
class MixtureSourceConfig:
    path: str = ""
    """A shard directory made by scripts/prepare_data.py."""
    weight: float = 1.0
    """Relative share of training windows drawn from this source."""
    name: str | None = None
    """Label in logs (default: the directory name)."""
    max_epochs: float | None = None
    """Passes over this source before the run stops with an error; null repeats it (with a warning)."""


@dataclass
class DataConfig:
    name: str = "stdlib"
    """A label for the corpus (used in the run name and cache keys)."""
    source: str = "stdlib"
    """stdlib (the Python standard library's source, no download) | files (local paths) | hub (a dataset name)."""
    paths: list[str] = field(default_factory=list)
    """source=files: .txt / .jsonl / .json / .parquet files or globs."""
    hub_name: str | None = None
    """source=hub: a Hugging Face dataset name, streamed."""
    hub_config: str | None = None
    hub_split: str = "train"
    text_field: str = "text"
    """Column holding the text in jsonl / parquet / hub data."""
    max_documents: int | None = None
    max_bytes: int | None = None
    """Stop reading the source after this many bytes of text (null: all of it)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (chosen by a hash of the document, so stable)."""
    seq_len: int = 256
    """Tokens per sequence the model sees (the encoder's length for encoder_decoder)."""
    document_attention: bool = False
    """Packed windows hold several documents (each ends with EOS): attend only within a token's own
    document (block-diagonal masks for all three objectives, cross-attention included), not across."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shards: str | None = None
    """A prepared shard directory (scripts/prepare_data.py): train from its memory-mapped tokens and tokenizer."""
    mixture: list[MixtureSourceConfig] = field(default_factory=list)
    """Prepared shard directories with weights; batches draw windows in these proportions."""
    cache_dir: str = ".cache/llmtrain"
    """Tokenizers and token arrays are cached here, keyed by corpus and settings."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    """Applied to matrices only (not to norms, biases or embeddings... embeddings are matrices: decayed)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    schedule: str = "cosine"
    """cosine | linear | constant (all after linear warmup)."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine and linear)."""


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_flops: float | None = None
    """A training compute budget (model FLOPs over all ranks); when set, max_steps follows from it."""
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    precision: str = "auto"
    """auto (bf16 where the device supports it, else fp32) | bf16 | fp16 (CUDA, with loss scaling) | fp32."""
    device: str = "auto"
    """auto | cpu | cuda."""
    eval_interval: int = 100
    """Evaluate every N steps (and at the start and end); 0 = only at start and end."""
    eval_batches: int = 20
    log_interval: int = 10
    checkpoint: bool = True
    """Write a final checkpoint into the run directory."""
    checkpoint_interval: int = 0
    """Also save every N steps (0: only at the end)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint of the run directory | never: a new run, refused
    where the run directory already holds checkpoints (it would mix with them)."""
    keep_last_k: int = 3
    """Complete checkpoints kept in the run directory (at least 2; the newest is never deleted)."""
    time_limit_minutes: float = 0.0
    """Stop with a checkpoint after this much wall-clock time since the trainer started (startup and the first
    evaluation included; 0: no limit), as on SIGTERM."""
    stop_check_interval: int = 1
    """Steps between the ranks' agreement on a stop request (single process: free). One all-reduce of a host
    flag over gloo (on CUDA too: it does not wait for the GPU's kernels), which makes the ranks' host threads
    meet once per check; a stop waits up to this many steps."""
    nonfinite: str = "error"
    """A NaN/inf loss or gradient norm: error (stop, naming the step) | skip (drop the update, warn)."""
    max_skips: int = 3
    """trainer.nonfinite=skip: stop after this many skipped steps."""
    spike_factor: float = 2.0
    """Log a loss spike when a logged loss exceeds this multiple of the running mean (0: off)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; sets grad_accum_steps = global / (micro x ranks)."""
    prefetch: int = 2
    """Batches made ahead in a background thread (0: made in the training step); at least a step's
    grad_accum_steps micro-batches when not 0."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for MFU; 0: the datasheet figure of a known GPU, else a matmul probe."""
    num_threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""
    progress: bool = True
    """Show a progress bar with tokens/s."""
    sample_tokens: int = 64
    """Tokens to generate at the end of a decoder run (0: none)."""


@dataclass
class ParallelConfig:
    strategy: str = "single"
    """single (one process, or every rank alone) | ddp | fsdp (FSDP2 fully_shard per block and at the root)."""
    shard_size: int = 0
    """FSDP sharding factor: ranks one parameter is sharded over. 0 = world size (full shard, ZeRO-3);
    1 = full replication (like DDP); a divisor in between = hybrid shard (HSDP: replicate x shard mesh)."""
    reshard_after_forward: bool | None = None
    """FSDP: true frees gathered parameters after forward (ZeRO-3); false keeps them to backward (ZeRO-2);
    null (auto): see `reshards_after_forward`; when it reshards, the last block stays gathered. On one device
    FSDP wraps only when this is set or cpu_offload is (`fsdp_wraps`)."""
    zero1: bool = False
    """DDP: shard optimizer states over ranks with ZeroRedundancyOptimizer (ZeRO-1)."""
    cpu_offload: bool = False
    """FSDP: keep sharded parameters, gradients and optimizer states in CPU memory (CPUOffloadPolicy)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
    compile: bool = False
    """torch.compile each block."""
    timeout_minutes: float = 10.0
    """Collective timeout: a rank that stops answering fails the run instead of hanging it."""


def reshards_after_forward(
    setting: bool | None, shard_devices: int, cpu_offload: bool, precision: str
) -> bool:
    """parallel.reshard_after_forward as set, or for null (auto): reshard where it saves memory. Sharded over
    several devices or offloaded, resharding frees what the other devices hold. With a shard group of one
    device (shard_size=1 on several ranks) FSDP2 still keeps a gathered copy of each block's weights beside
    the fp32 shard: resharding frees it (gathering again in
    backward is a local copy) in fp32, where it would double the weights; under bf16/fp16 the 2-byte copies
    stay, as autocast keeps its casts of the weights from forward to backward too."""
    if setting is not None:
        return setting
    return shard_devices > 1 or cpu_offload or precision == "fp32"


def fsdp_wraps(parallel: ParallelConfig, world_size: int) -> bool:
    """Whether parallel.strategy=fsdp shards the model (fully_shard). On one device there is nothing to shard,
    and FSDP2's per-block gathers, reductions and DTensor optimizer steps cost 1.3-2.2x the plain step (one
    H100/H200), so the model trains unwrapped under autocast, as parallel=single does (torchtitan, too, applies
    FSDP only when its shard dimension is above one; shard_size=1 on several ranks still wraps here). Its
    activations are then the plain model's, a little more than FSDP's 16-bit parameter casts gave.
    parallel.cpu_offload (FSDP does the offloading) or a set parallel.reshard_after_forward (FSDP's own
    behaviour, asked for; false is the previous one-device default under bf16/fp16) still wrap on one device."""
    return parallel.strategy == "fsdp" and (
        world_size > 1 or parallel.cpu_offload or parallel.reshard_after_forward is not None
    )


@dataclass
class LoggerConfig:
    wandb: str = "offline"
    """offline (default; files in the run dir) | online | disabled."""
    project: str = "llmtrain"
    jsonl: bool = True
    """Write metrics.jsonl in the run directory."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 1337
    run_name: str = "default"
    """The run directory is output_dir/run_name: the same for every rank and every restart."""
    output_dir: str = "runs"


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


class ConfigError(ValueError):
    """A setting that cannot work; the one-line message names it, its value and what is allowed."""


def to_dataclass(cfg: DictConfig | TrainConfig) -> TrainConfig:
    if isinstance(cfg, TrainConfig):
        return cfg
    check_known_keys(cfg, TrainConfig)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))


def check_known_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Every key of a composed config is a field of its dataclass. Hydra refuses a misspelled key, and its
    message suggests `+key=value`; a key added that way reaches the merge, which keeps it, and to_object drops
    it without a word."""
    if not isinstance(node, (dict, DictConfig)):
        return
    fields = {f.name for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node:
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"unknown setting {name} ({schema.__name__} has: {', '.join(sorted(fields))}); check its spelling"
            )
        inner = [hints[key], *typing.get_args(hints[key])]  # X, X | None, list[X]
        for kind in (t for t in inner if dataclasses.is_dataclass(t)):
            value = node[key]
            if isinstance(value, (list, ListConfig)):
                for i, item in enumerate(value):
                    check_known_keys(item, kind, f"{name}[{i}].")
            else:
                check_known_keys(value, kind, f"{name}.")


TRAINER_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""trainer.precision's values."""


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def check_positive(name: str, value: int | float, meaning: str = "") -> None:
    """A setting that must be a finite number > 0; `meaning` follows the rule in the message."""
    if not (value > 0 and math.isfinite(value)):
        finite = " and finite" if value > 0 else ""
        raise ConfigError(f"{name}={value} must be > 0{finite}{meaning}")


def _non_negative(name: str, value: int | float, meaning: str = "") -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{name}={value} must be >= 0{meaning}")


def _unit_interval(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{name}={value} must be in [0, 1)")


def check_shard_size(
    shard_size: int, world: int, name: str = "parallel.shard_size", world_name: str = "the world size"
) -> None:
    """FSDP's shard group: 0 (all ranks), 1 (replicate) or a divisor of the world size (hybrid). `world_name`:
    where the world size comes from (memory.world_size, plan.devices when planning)."""
    if shard_size < 0 or (shard_size and world % shard_size):
        raise ConfigError(
            f"{name}={shard_size} must divide {world_name}{'=' if '.' in world_name else ' '}{world}; allowed: "
            "0 (= world size, full shard), 1 (replicate, like DDP), or a divisor in between (hybrid shard)"
        )


def _directory_or_absent(name: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} is a file, not a directory; give a directory (made if missing)")


def resolve_batch(cfg: TrainConfig, data_parallel_size: int) -> None:
    """Derive grad_accum_steps from trainer.global_batch_size, or fail naming the settings."""
    t = cfg.trainer
    if t.global_batch_size is None:
        return
    per_step = t.micro_batch_size * data_parallel_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={t.global_batch_size} is not divisible by trainer.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}; allowed: multiples of {per_step}"
        )
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps not in (1, accum):
        raise ConfigError(
            f"trainer.grad_accum_steps={t.grad_accum_steps} contradicts trainer.global_batch_size="
            f"{t.global_batch_size} (which needs {accum}); set one of them"
        )
    t.grad_accum_steps = accum


def validate_lengths(cfg: TrainConfig) -> None:
    """The windows the objective makes fit the model: data.seq_len, and T5's targets, within model.max_seq_len."""
    check_positive("data.seq_len", cfg.data.seq_len)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is longer than the position table model.max_seq_len="
            f"{cfg.model.max_seq_len}; allowed: data.seq_len <= {cfg.model.max_seq_len}"
        )
    if cfg.objective.name == "span_corruption":
        from llmtrain.objectives.span_corruption import check_span_layout, span_windows

        o = cfg.objective
        try:
            check_span_layout(cfg.data.seq_len, o.noise_density, o.mean_noise_span_length)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _, derived, _ = span_windows(cfg)
        given = cfg.objective.targets_length
        if given is not None and given < derived:
            raise ConfigError(
                f"objective.targets_length={given} is shorter than the {derived} targets that data.seq_len="
                f"{cfg.data.seq_len} inputs at objective.noise_density={cfg.objective.noise_density} produce; "
                f"allowed: >= {derived} or null (derived)"
            )
        targets = given or derived
        if targets > cfg.model.max_seq_len:
            raise ConfigError(
                f"span corruption targets of {targets} tokens exceed model.max_seq_len={cfg.model.max_seq_len}"
            )


def validate_data(cfg: TrainConfig) -> None:
    """Where the tokens come from: a source with what it needs, or prepared shards / a mixture of them."""
    _one_of("data.source", cfg.data.source, ("stdlib", "files", "hub"))
    prepared = bool(cfg.data.shards or cfg.data.mixture)  # tokens come from shards: the source is not read
    if cfg.data.source == "files" and not cfg.data.paths and not prepared:
        raise ConfigError("data.paths is empty; data.source=files needs at least one file or glob")
    if cfg.data.source == "hub" and not cfg.data.hub_name and not prepared:
        raise ConfigError("data.hub_name is not set; data.source=hub needs a dataset name")
    if cfg.data.shards and cfg.data.mixture:
        raise ConfigError(
            "data.shards and data.mixture are both set; use one (a mixture of one source is shards)"
        )
    for i, source in enumerate(cfg.data.mixture):
        if not source.path:
            raise ConfigError(
                f"data.mixture[{i}].path is empty; give a shard directory made by scripts/prepare_data.py"
            )
        if not source.weight >= 0:
            raise ConfigError(f"data.mixture[{i}].weight={source.weight} must be >= 0")
        if source.max_epochs is not None:
            check_positive(f"data.mixture[{i}].max_epochs", source.max_epochs)
    if cfg.data.mixture and not sum(s.weight for s in cfg.data.mixture) > 0:
        raise ConfigError("data.mixture weights sum to 0; at least one source needs a positive weight")
    if not 0 < cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    for name in ("max_documents", "max_bytes"):
        if getattr(cfg.data, name) is not None:
            check_positive(f"data.{name}", getattr(cfg.data, name))


def validate(cfg: TrainConfig, trains_bpe: bool = True) -> None:
    """Everything that can be checked before data, model or run directory exist. trains_bpe: a byte-level BPE
    is trained when data.tokenizer.path is not set (training, prepare_data; not train_tokenizer's other kinds)."""
    try:
        check_model_config(cfg.model)
    except ModelConfigError as err:
        raise ConfigError(str(err)) from None
    _one_of("objective.name", cfg.objective.name, tuple(OBJECTIVE_FAMILY))
    wanted = OBJECTIVE_FAMILY[cfg.objective.name]
    if wanted != cfg.model.family:
        raise ConfigError(
            f"objective.name={cfg.objective.name} trains the {wanted} family but model.family={cfg.model.family}; "
            f"allowed for {cfg.model.family}: "
            + ", ".join(k for k, v in OBJECTIVE_FAMILY.items() if v == cfg.model.family)
        )
    try:  # the objective's own rules, checked before any data is read
        if cfg.objective.name == "mlm":
            check_mlm_rates(cfg.objective.select_rate, cfg.objective.mask_rate, cfg.objective.random_rate)
        elif cfg.objective.name == "span_corruption":
            check_span_settings(cfg.objective.noise_density, cfg.objective.mean_noise_span_length)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    validate_data(cfg)
    prepared = bool(cfg.data.shards or cfg.data.mixture)
    validate_lengths(cfg)
    check_positive("data.tokenizer.vocab_size", cfg.data.tokenizer.vocab_size)
    tok = cfg.data.tokenizer
    check_positive("data.tokenizer.train_bytes", tok.train_bytes)
    _non_negative("data.tokenizer.min_frequency", tok.min_frequency)
    _non_negative(
        "data.tokenizer.n_sentinels", tok.n_sentinels, " (0: no sentinels; span corruption needs them)"
    )
    if trains_bpe and cfg.data.tokenizer.path is None and not prepared:  # a BPE is trained on the data
        from llmtrain.data.tokenizer import min_vocab_size

        if cfg.objective.name == "span_corruption":  # one sentinel per noise span of a window
            from llmtrain.objectives.span_corruption import span_windows

            spans = span_windows(cfg)[2]
            if cfg.data.tokenizer.n_sentinels < spans:
                raise ConfigError(
                    f"data.tokenizer.n_sentinels={cfg.data.tokenizer.n_sentinels} is fewer than the {spans} noise "
                    f"spans of a data.seq_len={cfg.data.seq_len} window; allowed: >= {spans} (or a longer "
                    "objective.mean_noise_span_length, a lower objective.noise_density or data.seq_len)"
                )

        floor = min_vocab_size(cfg.data.tokenizer.n_sentinels)
        if cfg.data.tokenizer.vocab_size < floor:
            raise ConfigError(
                f"data.tokenizer.vocab_size={cfg.data.tokenizer.vocab_size} is too small: 256 bytes + the special "
                f"tokens ({cfg.data.tokenizer.n_sentinels} sentinels) need at least {floor}"
            )
    if (
        cfg.model.vocab_size
        and cfg.data.tokenizer.path is None
        and cfg.model.vocab_size < cfg.data.tokenizer.vocab_size
    ):
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than data.tokenizer.vocab_size="
            f"{cfg.data.tokenizer.vocab_size}; allowed: 0 (take it from the tokenizer) or >= the tokenizer's"
        )
    for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "eval_batches", "log_interval"):
        check_positive(f"trainer.{name}", getattr(cfg.trainer, name))
    t = cfg.trainer
    _non_negative("trainer.eval_interval", t.eval_interval, " (0: evaluate only at the start and the end)")
    _non_negative("trainer.checkpoint_interval", t.checkpoint_interval, " (0: save only at the end)")
    _non_negative("trainer.prefetch", t.prefetch, " (0: batches made in the training step)")
    _non_negative("trainer.num_threads", t.num_threads, " (0: torch's default)")
    _non_negative("trainer.time_limit_minutes", t.time_limit_minutes, " (0: no limit)")
    if t.max_flops is not None:
        check_positive("trainer.max_flops", t.max_flops)
    _one_of("trainer.precision", cfg.trainer.precision, TRAINER_PRECISIONS)
    p = cfg.parallel
    _one_of("parallel.strategy", p.strategy, ("single", "ddp", "fsdp"))
    if p.strategy == "fsdp":  # under torchrun the world size is known now
        check_shard_size(p.shard_size, int(os.environ.get("WORLD_SIZE", "1")))
    else:  # FSDP's settings under another strategy: a hybrid-sharding line without parallel=fsdp trained DDP
        for name, value, unset in (
            ("shard_size", p.shard_size, 0),
            ("reshard_after_forward", p.reshard_after_forward, None),
        ):
            if value != unset:
                raise ConfigError(
                    f"parallel.{name}={value} needs parallel.strategy=fsdp, not {p.strategy} (add parallel=fsdp)"
                )
    if p.zero1 and p.strategy != "ddp":
        raise ConfigError(f"parallel.zero1=true needs parallel.strategy=ddp, not {p.strategy}")
    if p.cpu_offload and p.strategy != "fsdp":
        raise ConfigError(f"parallel.cpu_offload=true needs parallel.strategy=fsdp, not {p.strategy}")
    _one_of("trainer.device", cfg.trainer.device, ("auto", "cpu", "cuda"))
    _one_of("trainer.resume", cfg.trainer.resume, ("auto", "never"))
    _one_of("trainer.nonfinite", cfg.trainer.nonfinite, ("error", "skip"))
    if cfg.trainer.keep_last_k < 2:
        raise ConfigError(
            f"trainer.keep_last_k={cfg.trainer.keep_last_k} must be >= 2 (a crash mid-save needs a spare)"
        )
    check_positive("trainer.stop_check_interval", cfg.trainer.stop_check_interval)
    _non_negative("trainer.max_skips", cfg.trainer.max_skips)
    _non_negative("trainer.spike_factor", cfg.trainer.spike_factor, " (0: no spike detection)")
    _non_negative("trainer.peak_tflops", cfg.trainer.peak_tflops, " (0: the datasheet or a matmul probe)")
    check_positive("parallel.timeout_minutes", cfg.parallel.timeout_minutes)
    resolve_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.trainer.global_batch_size is not None:
        check_positive("trainer.global_batch_size", cfg.trainer.global_batch_size)
    check_positive("optim.lr", cfg.optim.lr)
    _non_negative("optim.weight_decay", cfg.optim.weight_decay)
    _unit_interval("optim.beta1", cfg.optim.beta1)
    _unit_interval("optim.beta2", cfg.optim.beta2)
    check_positive("optim.eps", cfg.optim.eps)
    _one_of("optim.schedule", cfg.optim.schedule, ("cosine", "linear", "constant"))
    _non_negative("optim.warmup_steps", cfg.optim.warmup_steps)
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if not math.isfinite(cfg.optim.grad_clip) or cfg.optim.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={cfg.optim.grad_clip} must be >= 0 (0 disables clipping)")
    _one_of("logger.wandb", cfg.logger.wandb, ("offline", "online", "disabled"))
    if not cfg.run_name or "/" in cfg.run_name or os.sep in cfg.run_name or cfg.run_name in (".", ".."):
        raise ConfigError(f"run_name={cfg.run_name!r} must be a non-empty name without '/', not '.' or '..'")
    _directory_or_absent("output_dir", Path(cfg.output_dir))
    _directory_or_absent("run_name (its run directory)", Path(cfg.output_dir) / cfg.run_name)
    _directory_or_absent("data.cache_dir", Path(cfg.data.cache_dir))
