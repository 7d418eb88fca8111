"""Options of the measurement scripts, and the root config that puts them beside the training config.

`scripts/estimate_memory.py` and `scripts/plan.py` compose `configs/train.yaml` like training does, so every
training override works (`model=encoder data.seq_len=512 trainer.micro_batch_size=8`), plus their own typed
sections: `memory.strategy=fsdp memory.world_size=8`, `plan.pf_days=100`. A misspelled key fails at
composition, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from llmtrain.config import (
    ParallelConfig,
    TrainConfig,
    check_known_keys,
    check_positive,
    check_shard_size,
    fsdp_wraps,
    register_configs,
    reshards_after_forward,
    to_dataclass,
    validate,
)
from llmtrain.measure.hardware import ACCELERATORS, GIB, accelerator
from llmtrain.measure.memory import PRECISIONS, STRATEGIES, Setup
from llmtrain.measure.planning import device_budget, device_peak_flops, from_pf_days


@dataclass
class MemoryOptions:
    gpu: str = "H100"
    """Device to fit (A100, A100-40GB, H100-SXM, H100-PCIe, H100-NVL, H200); any name with gpu_memory_gib set."""
    gpu_memory_gib: float | None = None
    """Device memory in GiB; overrides the table (and allows a device not in it)."""
    usable_fraction: float = 0.9
    """Part of the device memory a step may use (the rest: CUDA context, allocator fragmentation)."""
    precision: str | None = None
    """fp32 | bf16 | fp16 | bf16_master (ZeRO-style); null follows trainer.precision (auto -> bf16 on a GPU)."""
    world_size: int = 1
    """Data-parallel devices (what torchrun would start)."""
    strategy: str | None = None
    """ddp | zero1 | zero2 | zero3 | fsdp | hybrid; null follows the parallel config (see strategy_of)."""
    shard_size: int | None = None
    """hybrid: devices one model copy is sharded over; null follows parallel.shard_size."""
    cpu_offload: bool | None = None
    """null follows parallel.cpu_offload."""
    activation_checkpointing: bool | None = None
    """null follows parallel.activation_checkpointing."""
    micro_batch: int | None = None
    """Sequences per device per forward; null follows trainer.micro_batch_size."""

    def setup(
        self, cfg: TrainConfig, strategy: str | None = None, checkpointing: bool | None = None
    ) -> Setup:
        """The estimator's Setup: these options where set, else what the training config would run."""
        precision = self.precision or {"auto": "bf16"}.get(cfg.trainer.precision, cfg.trainer.precision)
        parallel_strategy, parallel_shard = strategy_of(cfg.parallel, self.world_size, precision)
        for choice in (self.activation_checkpointing, cfg.parallel.activation_checkpointing):
            checkpointing = choice if checkpointing is None else checkpointing
        shard_size = self.shard_size or parallel_shard
        offload = cfg.parallel.cpu_offload if self.cpu_offload is None else self.cpu_offload
        return Setup(
            precision=precision,
            strategy=strategy or self.strategy or parallel_strategy,
            world_size=self.world_size,
            shard_size=shard_size,
            cpu_offload=offload,
            activation_checkpointing=checkpointing,
            grad_accum_steps=cfg.trainer.grad_accum_steps,
            # hybrid: what parallel.reshard_after_forward does over its shard group (zero2/zero3 say it already)
            reshard_after_forward=reshards_after_forward(
                cfg.parallel.reshard_after_forward, shard_size or self.world_size, offload, precision
            ),
        )

    def check(
        self, cfg: TrainConfig, world: str = "memory.world_size", device: str | None = "memory.gpu"
    ) -> None:
        """Every option in its range, named; `world`: the setting the world size came from (plan.devices in
        scripts/plan.py). parallel.shard_size is checked here, against that world size, not this process's.
        `device`: the setting memory.gpu came from, to check it is in the table unless gpu_memory_gib is given
        (None: not checked; scripts/plan.py takes a device of its own with plan.peak_tflops, and no verdict)."""
        if self.gpu_memory_gib is not None:
            check_positive(
                "memory.gpu_memory_gib", self.gpu_memory_gib, " (null: the table's size for memory.gpu)"
            )
        elif device is not None:
            known_device(device, self.gpu, "memory.gpu_memory_gib")
        if not 0 < self.usable_fraction <= 1:
            raise ValueError(f"memory.usable_fraction={self.usable_fraction} must be in (0, 1]")
        _whole(world, self.world_size, "(data-parallel devices)")
        if self.micro_batch is not None:
            _whole("memory.micro_batch", self.micro_batch, "(null: trainer.micro_batch_size)")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(
                f"memory.precision={self.precision!r} is unknown; allowed: {', '.join(PRECISIONS)}"
            )
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(
                f"memory.strategy={self.strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}"
            )
        if self.shard_size is not None:
            _whole("memory.shard_size", self.shard_size, "(null: parallel.shard_size)")
            name, shard = "memory.shard_size", self.shard_size
        else:  # parallel.shard_size >= 0 was checked by validate; 0 is the world size
            name, shard = (
                "parallel.shard_size",
                cfg.parallel.shard_size if cfg.parallel.strategy == "fsdp" else 0,
            )
        check_shard_size(shard, self.world_size, name, world)

    def usable_bytes(self) -> float:
        gib = self.gpu_memory_gib or accelerator(self.gpu).memory_gib
        return gib * GIB * self.usable_fraction


PEAK_DTYPES = ("bf16", "fp16", "tf32", "fp32")


def known_device(setting: str, name: str, instead: str) -> None:
    """A device name the peak table knows, else an error naming the setting and the one to give instead."""
    try:
        accelerator(name)
    except ValueError:
        raise ValueError(
            f"{setting}={name!r} is not in the peak table ({', '.join(ACCELERATORS)}); name one of those or "
            f"set {instead}"
        ) from None


def strategy_of(parallel: ParallelConfig, world_size: int, precision: str) -> tuple[str, int | None]:
    """The estimator's strategy (and hybrid shard size) for llmtrain's parallel config on world_size devices:
    single/ddp -> ddp (zero1 with parallel.zero1); fsdp -> zero3 (zero2 without resharding after forward)
    when sharded over all devices, else hybrid over parallel.shard_size; fsdp that does not wrap on one
    device (`fsdp_wraps`) -> ddp, the plain model."""
    if fsdp_wraps(parallel, world_size):
        shard = parallel.shard_size or world_size
        if shard == world_size:
            reshard = reshards_after_forward(
                parallel.reshard_after_forward, shard, parallel.cpu_offload, precision
            )
            return ("zero3" if reshard else "zero2"), None
        return "hybrid", shard
    return ("zero1" if parallel.zero1 else "ddp"), None


@dataclass
class PlanOptions:
    flops: float | None = None
    """Budget in FLOPs (give one of flops, pf_days, hours; or none of them with tokens for the reverse)."""
    pf_days: float | None = None
    """Budget in petaFLOP/s-days (1e15 * 86400 FLOPs)."""
    hours: float | None = None
    """Budget as devices x hours x mfu on `device`."""
    devices: int = 8
    device: str = "H100"
    """A100, H100-SXM (= H100), H100-PCIe, H100-NVL, H200; another name needs peak_tflops."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device; overrides the table."""
    dtype: str = "bf16"
    """Which peak of the table: bf16 | tf32 | fp32."""
    mfu: float = 0.4
    """Model FLOPs utilisation expected (published: ~0.35-0.5 for well-tuned dense training)."""
    params: float | None = None
    """Reverse, without a budget: a parameter count to cost (default: the configured model's)."""
    tokens: float | None = None
    """Reverse, without a budget: tokens to train on (default: 20 per parameter). A budget fixes the parameters
    and tokens itself, so one given with params or tokens is refused."""
    aspect_ratio: float = 128.0
    """d_model / n_layers wanted for the model shape found for a budget."""

    def check(self) -> None:
        """Every option in its range, named; a budget together with plan.params or plan.tokens is refused
        (the budget alone fixes both)."""
        _whole("plan.devices", self.devices, "(data-parallel devices)")
        if self.dtype not in PEAK_DTYPES:
            raise ValueError(f"plan.dtype={self.dtype!r} has no peak; allowed: {', '.join(PEAK_DTYPES)}")
        if self.peak_tflops is None:
            known_device("plan.device", self.device, "plan.peak_tflops")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"plan.mfu={self.mfu} must be in (0, 1] (a fraction of the peak: 0.4 is 40%)")
        for name in ("peak_tflops", "params", "tokens", "aspect_ratio"):
            if getattr(self, name) is not None:
                check_positive(f"plan.{name}", getattr(self, name))
        budget = [f"plan.{k}" for k in ("flops", "pf_days", "hours") if getattr(self, k) is not None]
        sizes = [f"plan.{k}" for k in ("params", "tokens") if getattr(self, k) is not None]
        if budget and sizes:
            raise ValueError(
                f"{' and '.join(budget + sizes)} over-determine the plan: a budget gives the compute-optimal "
                "parameters and tokens; give either a budget (plan.flops, plan.pf_days or plan.hours) or "
                "plan.params / plan.tokens to cost"
            )

    def peak_flops(self) -> float:
        return device_peak_flops(self.device, self.dtype, self.peak_tflops)

    def budget(self, peak_flops: float) -> float | None:
        """The budget in FLOPs from whichever of flops, pf_days, hours is set (None when none is)."""
        named = (("flops", self.flops), ("pf_days", self.pf_days), ("hours", self.hours))
        given = {kind: value for kind, value in named if value is not None}
        if len(given) > 1:
            raise ValueError(
                f"give one budget of plan.flops, plan.pf_days, plan.hours; got {', '.join(given)}"
            )
        if not given:
            return None
        ((kind, value),) = given.items()
        check_positive(f"plan.{kind}", value, " (a budget)")
        if kind == "hours":
            return device_budget(self.devices, value, self.mfu, peak_flops)
        return from_pf_days(value) if kind == "pf_days" else value


def _whole(name: str, value: int, meaning: str) -> None:
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1 {meaning}")


def register_script_config(name: str, **sections: type) -> None:
    """Store root config `name`: configs/train.yaml plus typed `sections` (e.g. memory=MemoryOptions)."""
    register_configs()
    node = {
        "defaults": ["_self_", "train"],
        **{key: OmegaConf.structured(cls) for key, cls in sections.items()},
    }
    ConfigStore.instance().store(name=name, node=node)


def train_config(cfg: DictConfig, *sections: str, trains_bpe: bool = True) -> TrainConfig:
    """The validated training config of a script's composed config, without the script's own sections
    (trains_bpe: see config.validate)."""
    train = to_dataclass(OmegaConf.masked_copy(cfg, [key for key in cfg if key not in sections]))
    # parallel.shard_size must divide the world size planned for (memory.world_size, plan.devices), not this
    # process's: MemoryOptions.check checks it against that
    planned = train.parallel.shard_size > 0 and train.parallel.strategy == "fsdp"  # outside fsdp: refused
    validate(replace(train, parallel=replace(train.parallel, shard_size=0)) if planned else train, trains_bpe)
    return train


def section(cfg: DictConfig, name: str) -> Any:
    """A script section as its dataclass (MemoryOptions, PlanOptions)."""
    check_known_keys(cfg[name], OmegaConf.get_type(cfg[name]), f"{name}.")
    return OmegaConf.to_object(cfg[name])


def human(value: float, unit: str = "") -> str:
    """1.23e9 -> '1.23 B' style: K, M, B, T for counts (T = 1e12)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain aligned text table: first column left-aligned, others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells)

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
