"""Bytes per device of a training step: model states by precision and sharding strategy, and activations.

Model states (Rajbhandari et al. 2019, "ZeRO"): with Adam, each parameter carries weights, a gradient, two
optimizer moments and, in mixed precision, an fp32 master copy. ZeRO-1 shards the optimizer states (with the
master copy) over the data-parallel devices, ZeRO-2 also the gradients, ZeRO-3 / FSDP full shard also the
weights. Hybrid sharding shards over `shard_size` devices and replicates across the groups: shard_size 1 is
DDP, shard_size = world size is full sharding. CPU offload moves whatever the strategy shards to host memory
(and runs the optimizer step there).

Activations are what autograd saves for backward, derived tensor by tensor from `llmtrain.models.blocks`
with scaled_dot_product_attention (flash / memory-efficient / CPU flash kernels store no T x T scores, only
q, k, v, the output and a per-row log-sum-exp). Per token and layer, with h = d_model, f = the MLP width,
e = bytes per activation, c = 1 (c = 3 for q/k/v and 2 for gate/up under autocast, which casts the input
once per linear that reads it), in bytes:

    attention:  norm + e * (c*h [linear inputs] + 3h [q, k, v; k and v after GQA repetition]
                            + 2h [SDPA output, and the contiguous copy o_proj reads]) + 4 * n_heads [log-sum-exp]
    MLP:        norm + e * (c*h + 4f) for SwiGLU (gate, silu(gate), up, their product), e * (h + 2f) for GELU
    norm:       8h for RMSNorm (x and x/rms, kept in fp32), 4h for LayerNorm (its input; the residual stream
                is fp32 under autocast)

A decoder block of an encoder-decoder adds cross-attention: norm + e * 4h per decoder token (input, q,
output, copy) and e * 2h per encoder token (k, v). Every stack adds its final norm; the head adds e*h per
predicted position (its input) and the logits (e*V) with their fp32 log-softmax (4V); at the start of the
backward pass two more fp32 V-wide gradients exist, which is where the step peaks. For comparison,
Korthikanti et al. 2022 give sbh(34 + 5as/h) bytes per layer in 16 bit for Megatron's GELU block with dropout
and stored scores; without scores (5as/h) and dropout masks (3sbh) that is 31sbh, close to the 34sbh our
formula gives for the same block (the extra copy for o_proj and a fp32 LayerNorm input).

With activation checkpointing per block (as torchtitan applies it), each block keeps only its input (the
residual stream, fp32 under autocast) and one block's activations exist at a time while it is recomputed.

The step peaks either at the start of the backward pass (states + activations + loss gradients) or during
the optimizer step (states + gradients + the sqrt(v) buffer foreach AdamW allocates); gradients are freed
by `zero_grad(set_to_none=True)`, so they add to the first peak only under gradient accumulation.
Not counted: dropout masks (dropout defaults to 0), attention masks, the CUDA context and allocator
fragmentation (the micro-batch search keeps a reserve for those), DDP's gradient buckets (none with
gradient_as_bucket_view=True).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, fields

import torch

from llmtrain.measure.shapes import Lengths, largest_block_parameters, parameter_count
from llmtrain.models.config import ModelConfig

FP32 = 4


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element of one precision scheme."""

    weights: int
    grads: int
    master: int
    """An fp32 copy of the weights kept besides low-precision weights."""
    optimizer: int
    """Adam's two moments."""
    compute_copy: int
    """Low-precision copies of the weights used in forward and backward (autocast's cache)."""
    activation: int
    """Bytes per saved activation element (linear outputs)."""
    residual: int
    """Bytes per element of the residual stream (what a checkpointed block keeps)."""
    autocast: bool
    """Inputs are cast once per linear that reads them."""


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(4, 4, 0, 8, 0, 4, 4, autocast=False),
    # llmtrain's bf16: fp32 weights (the master copy), gradients and Adam states; bf16 autocast for compute.
    "bf16": Precision(4, 4, 0, 8, 2, 2, 4, autocast=True),
    # ZeRO / Megatron mixed precision: bf16 weights and gradients, fp32 master + Adam: 2 + 2 + K (K = 12).
    "bf16_master": Precision(2, 2, 4, 8, 0, 2, 2, autocast=False),
}

SHARDED_STATES: dict[str, tuple[str, ...]] = {
    "ddp": (),
    "zero1": ("master", "optimizer"),
    "zero2": ("master", "optimizer", "grads"),
    "zero3": ("master", "optimizer", "grads", "weights"),
    "fsdp": ("master", "optimizer", "grads", "weights"),
    "hybrid": ("master", "optimizer", "grads", "weights"),
}
STRATEGIES = tuple(SHARDED_STATES)


@dataclass(frozen=True)
class Setup:
    """How a step is run: precision and how model states are spread over the data-parallel devices."""

    precision: str = "fp32"
    """fp32 | bf16 (llmtrain: autocast over fp32 weights) | bf16_master (bf16 weights + fp32 master, ZeRO)."""
    strategy: str = "ddp"
    """ddp | zero1 | zero2 | zero3 | fsdp (= zero3) | hybrid."""
    world_size: int = 1
    """Data-parallel devices."""
    shard_size: int | None = None
    """hybrid: devices one copy is sharded over (1 = DDP, world_size = full shard)."""
    cpu_offload: bool = False
    """Keep what the strategy shards in host memory and step the optimizer there."""
    activation_checkpointing: bool = False
    """Per block: keep block inputs, recompute the rest in backward."""
    grad_accum_steps: int = 1
    """Above 1, gradients stay allocated across the forward passes of a step."""


def sharding_factor(setup: Setup) -> int:
    """Devices the sharded states are split over: 1 for DDP, shard_size for hybrid, else the world size."""
    if setup.strategy not in SHARDED_STATES:
        raise ValueError(f"strategy={setup.strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}")
    if setup.world_size < 1:
        raise ValueError(f"world_size={setup.world_size} must be >= 1")
    if setup.strategy == "ddp":
        return 1
    if setup.strategy != "hybrid":
        return setup.world_size
    shard = setup.shard_size
    if shard is None or not 1 <= shard <= setup.world_size or setup.world_size % shard:
        raise ValueError(
            f"hybrid sharding needs shard_size dividing world_size={setup.world_size}; got shard_size={shard}"
        )
    return shard


@dataclass(frozen=True)
class ModelStates:
    """Bytes per device of weights, gradients, master weights and optimizer states (and what sits on host)."""

    weights: float
    grads: float
    master: float
    optimizer: float
    host: float = 0.0
    """Offloaded to CPU memory; not part of the device total."""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer


def model_state_bytes(n_params: float, setup: Setup) -> ModelStates:
    """Per-device model states of `n_params` parameters under `setup` (ZeRO paper, Table 1 / Figure 1)."""
    precision = precision_of(setup.precision)
    shards = sharding_factor(setup)
    if setup.cpu_offload and shards == 1:
        raise ValueError("cpu_offload moves sharded states to the host; it needs zero1/zero2/zero3/fsdp/hybrid")
    sharded = SHARDED_STATES[setup.strategy]
    device, host = {}, 0.0
    for name in ("weights", "grads", "master", "optimizer"):
        per_device = n_params * getattr(precision, name) / (shards if name in sharded else 1)
        if setup.cpu_offload and name in sharded:
            device[name], host = 0.0, host + per_device
        else:
            device[name] = per_device
    return ModelStates(**device, host=host)


def precision_of(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r} is unknown; allowed: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def _norm_bytes(cfg: ModelConfig, p: Precision) -> int:
    """Bytes one norm saves per token: RMSNorm keeps x and x/rms in fp32, LayerNorm its input."""
    return cfg.d_model * (2 * FP32 if cfg.norm == "rmsnorm" else p.residual)


def _attention_bytes(cfg: ModelConfig, p: Precision) -> float:
    """Self-attention sublayer, per token."""
    h, e = cfg.d_model, p.activation
    inputs = 3 if p.autocast else 1
    return _norm_bytes(cfg, p) + e * (inputs * h + 3 * h + 2 * h) + FP32 * cfg.n_heads


def _cross_attention_bytes(cfg: ModelConfig, p: Precision, q_len: int, kv_len: int) -> float:
    """Cross-attention sublayer of one sequence: q side on q_len tokens, k and v on kv_len."""
    h, e = cfg.d_model, p.activation
    kv_inputs = 2 if p.autocast else 0  # otherwise the shared encoder output, counted once per model
    per_query = _norm_bytes(cfg, p) + e * 4 * h + FP32 * cfg.n_heads
    return q_len * per_query + kv_len * e * (2 + kv_inputs) * h


def _mlp_bytes(cfg: ModelConfig, p: Precision) -> float:
    h, f, e = cfg.d_model, cfg.ff_dim, p.activation
    if cfg.mlp == "swiglu":
        return _norm_bytes(cfg, p) + e * ((2 if p.autocast else 1) * h + 4 * f)
    return _norm_bytes(cfg, p) + e * (h + 2 * f)


def _block_bytes(cfg: ModelConfig, p: Precision, length: int, kv_len: int = 0) -> float:
    """One block of one sequence of `length` tokens (with cross-attention to kv_len tokens if kv_len)."""
    total = length * (_attention_bytes(cfg, p) + _mlp_bytes(cfg, p))
    return total + (_cross_attention_bytes(cfg, p, length, kv_len) if kv_len else 0.0)


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch."""

    saved: float
    """Saved for backward at the end of the forward pass (blocks, final norms, head input, logits)."""
    loss_gradients: float
    """The two fp32 V-wide gradients of the loss that exist at the start of the backward pass."""
    recompute: float = 0.0
    """With checkpointing: one block's activations, rebuilt during its backward."""

    @property
    def peak(self) -> float:
        return self.saved + self.loss_gradients + self.recompute


def activation_bytes(cfg: ModelConfig, lengths: Lengths, micro_batch: int, setup: Setup) -> Activations:
    """Activations of a micro-batch (formula in the module docstring)."""
    p = precision_of(setup.precision)
    stacks = [(cfg.n_layers, lengths.inputs, 0)]  # (layers, tokens, cross-attention length)
    if cfg.family == "encoder_decoder":
        stacks.append((cfg.decoder_layers, lengths.targets, lengths.inputs))
    blocks = recompute = checkpoints = final_norms = 0.0
    for n_layers, tokens, kv_len in stacks:
        block = _block_bytes(cfg, p, tokens, kv_len)
        blocks += n_layers * block
        recompute = max(recompute, block)
        checkpoints += n_layers * tokens * p.residual * cfg.d_model
        final_norms += tokens * _norm_bytes(cfg, p)
    if cfg.family == "encoder_decoder" and not p.autocast:
        final_norms += lengths.inputs * p.activation * cfg.d_model  # the encoder output, read by every k/v
    head = lengths.predicted * (p.activation * cfg.d_model + (p.activation + FP32) * cfg.vocab_size)
    loss_gradients = lengths.predicted * 2 * FP32 * cfg.vocab_size
    if setup.activation_checkpointing:
        saved, extra = checkpoints + final_norms + head, recompute
    else:
        saved, extra = blocks + final_norms + head, 0.0
    return Activations(micro_batch * saved, micro_batch * loss_gradients, micro_batch * extra)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step."""

    states: ModelStates
    compute_copies: float
    """bf16 weight copies under autocast, or the weights FSDP gathers (root + two blocks) when sharded."""
    activations: Activations
    step_temporaries: float
    """The sqrt(v) buffer of foreach AdamW (none on the device when the optimizer runs on the host)."""
    grads_during_backward: bool

    @property
    def backward_peak(self) -> float:
        s = self.states
        grads = s.grads if self.grads_during_backward else 0.0
        return s.weights + s.master + s.optimizer + grads + self.compute_copies + self.activations.peak

    @property
    def optimizer_peak(self) -> float:
        return self.states.total + self.step_temporaries

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.optimizer_peak)

    def components(self) -> dict[str, float]:
        """Named parts for a table (the peak is not their sum: see backward_peak and optimizer_peak)."""
        parts = {f.name: getattr(self.states, f.name) for f in fields(self.states) if f.name != "host"}
        parts.update(
            compute_copies=self.compute_copies,
            activations=self.activations.saved + self.activations.recompute,
            loss_gradients=self.activations.loss_gradients,
            step_temporaries=self.step_temporaries,
        )
        return parts


def _compute_copies(cfg: ModelConfig, n_params: int, setup: Setup, shards: int) -> float:
    p = precision_of(setup.precision)
    if shards > 1 and "weights" in SHARDED_STATES[setup.strategy]:  # FSDP: root unit + current + prefetched
        root = n_params - cfg.n_layers * largest_block_parameters(cfg)
        if cfg.family == "encoder_decoder":
            root -= cfg.decoder_layers * largest_block_parameters(cfg)
        return (max(root, 0) + 2 * largest_block_parameters(cfg)) * (p.compute_copy or p.weights)
    return n_params * p.compute_copy


def estimate_memory(cfg: ModelConfig, lengths: Lengths, micro_batch: int, setup: Setup) -> MemoryEstimate:
    """Everything a device holds for a step of `micro_batch` sequences of `lengths` under `setup`."""
    n_params = parameter_count(cfg)
    states = model_state_bytes(n_params, setup)
    shards = sharding_factor(setup)
    optimizer_shards = shards if "optimizer" in SHARDED_STATES[setup.strategy] else 1
    step_temporaries = 0.0 if setup.cpu_offload else n_params * FP32 / optimizer_shards
    return MemoryEstimate(
        states=states,
        compute_copies=_compute_copies(cfg, n_params, setup, shards),
        activations=activation_bytes(cfg, lengths, micro_batch, setup),
        step_temporaries=step_temporaries,
        grads_during_backward=setup.grad_accum_steps > 1,
    )


def max_micro_batch(
    cfg: ModelConfig, lengths: Lengths, setup: Setup, device_bytes: float, limit: int = 1 << 16
) -> int:
    """The largest micro-batch whose estimated peak fits in `device_bytes` (0 if not even one sequence)."""
    if estimate_memory(cfg, lengths, 1, setup).peak > device_bytes:
        return 0
    low, high = 1, limit
    while low < high:  # the peak grows monotonically with the micro-batch
        mid = (low + high + 1) // 2
        if estimate_memory(cfg, lengths, mid, setup).peak <= device_bytes:
            low = mid
        else:
            high = mid - 1
    return low


def measured_peak_bytes(device: torch.device | str) -> int:
    """Peak memory so far: the CUDA allocator's on GPU, the process's resident set on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
