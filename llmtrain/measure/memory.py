"""Bytes per device of a training step: model states by precision and sharding strategy, and activations.

Model states (Rajbhandari et al. 2019, "ZeRO"): with Adam, each parameter carries weights, a gradient, two
optimizer moments and, in mixed precision, an fp32 master copy. ZeRO-1 shards the optimizer states (with the
master copy) over the data-parallel devices, ZeRO-2 also the gradients, ZeRO-3 / FSDP full shard also the
weights. Hybrid sharding shards over `shard_size` devices and replicates across the groups: shard_size 1 is
DDP, shard_size = world size is full sharding. CPU offload moves whatever the strategy shards to host memory
(and runs the optimizer step there).

Activations are what autograd saves for backward, derived tensor by tensor from `llmtrain.models.blocks`
with scaled_dot_product_attention (flash / memory-efficient / CPU flash kernels store no T x T scores, only
q, k, v, the output and a per-row log-sum-exp). Per token and layer, with h = d_model, w = n_heads * head_dim
(= h unless d_head is set), f = the MLP width, e = bytes per activation, in bytes (q, k and v are one
fused matmul and gate and up another, so each sublayer's input is saved, and cast under autocast, once):

    attention:  norm + e * (h [linear input] + 3w [q, k, v; k and v after GQA repetition]
                            + 2w [SDPA output, and the contiguous copy o_proj reads]) + 4 * n_heads [log-sum-exp]
                (without rotary positions and with GQA, q, k and v are views that keep the whole fused
                projection: its un-repeated k and v, 2 * kv wide, besides the repeated ones)
    MLP:        norm + e * (h + 4f) gated (SwiGLU/GEGLU: [gate | up], act(gate), product), e * (h + 2f) GELU
    norm:       4h + 4 for RMSNorm (x/rms in fp32, and 1/rms), r*h for LayerNorm (its input; r = bytes of the
                residual stream: 4 in fp32 and under autocast, 2 in pure 16 bit)

Post-norm blocks (BERT) save the same tensors in another order. A decoder block of an encoder-decoder adds
cross-attention: norm + e * (h + 3w) per decoder token and e * 2w per encoder token (k, v). Each stack adds
its final norm (pre-norm), embedding norm (if any) and T5's relative bias, a (1, heads, T, T) float mask
(cast once per block under autocast). The head adds per predicted position its input (e*h; BERT's transform
adds 2e*h and a norm) and the logits (e*V, the loss's backward recomputes the softmax from them) with their
fp32 log-sum-exp. At the start of the backward pass the logits' gradient (e*V, and in 16 bit one fp32 chunk
of at most 2^25 logits it is computed in) exists, which is where the step usually peaks; with a small
vocabulary the peak is instead inside the first block's backward (all activations + that block's gradients).
For comparison, Korthikanti et al. 2022 give sbh(34 + 5as/h)
bytes per layer in 16 bit for Megatron's GELU/LayerNorm block with dropout and stored scores; without the
scores (5as/h) and the two dropout masks (2sbh) that is 32sbh. Our formula gives 34sbh for that block in
pure 16 bit: the SDPA output is kept besides the copy o_proj reads.

Precision as llmtrain trains: bf16/fp16 autocast over fp32 weights under DDP; under FSDP (zero2, zero3,
hybrid here) a MixedPrecisionPolicy casts the parameters instead, so activations are plain 16 bit.

With activation checkpointing per block (as torchtitan applies it), each block keeps only its input (the
residual stream); in backward one block at a time is rebuilt, and its activations plus the gradients inside
it (at its MLP: 3f + 2h wide when gated, 2f + 2h for GELU) come on top of the inputs. As the backward moves
down, the inputs left shrink while the parameter gradients made so far (the head's, then each block's) grow
and autocast's 16-bit weight copies of the blocks done are freed: the peak is taken over the first and last
block of each stack (`Activations.in_blocks`).

The step peaks at the start of the backward pass (states + activations + loss gradients), at its end with
tied embeddings (all the gradients, and the tied weight's head and embedding gradients with their sum: two
V x d matrices more), or during the optimizer step (states + gradients, + the sqrt(v) buffer of foreach
AdamW; fused AdamW, llmtrain's on CUDA and CPU, needs none); gradients are freed by
`zero_grad(set_to_none=True)`, so they exist throughout the backward only under gradient accumulation, and
otherwise build up during it (the moments above). Not counted: dropout masks (dropout defaults to 0), padding
masks, the gradient of T5's bias (transient, (B, heads, T, T) for one block), the CUDA context and allocator fragmentation
(leave a reserve: `usable_fraction` where a GPU is fitted), DDP's gradient buckets (none with
gradient_as_bucket_view=True).

Checked against measurement (tests/unit/test_measure_memory.py): every family, fp32 / bf16 autocast, with
and without checkpointing, within 10% of the peak tensor memory on CPU for the tiny test models (the tests
allow 15%; with checkpointing and fused AdamW within 5%, the backward's moments counting the gradients
already made), and within 3% of torch.cuda.max_memory_allocated on an H200 (measured before the fused projections and the
hand-written loss; not re-measured since).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, fields, replace

import torch

from llmtrain.measure.shapes import (
    Lengths,
    all_block_parameters,
    block_parameters,
    head_parameters,
    largest_block_parameters,
    parameter_count,
)
from llmtrain.models.config import GATED_MLPS, ModelConfig
from llmtrain.models.heads import CPU_LOSS_CHUNK, GPU_LOSS_CHUNK

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
    "fp16": Precision(4, 4, 0, 8, 2, 2, 4, autocast=True),  # as bf16 (plus a loss scale)
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
    """fp32 | bf16, fp16 (llmtrain: 16-bit compute over fp32 weights) | bf16_master (bf16 weights + fp32
    master copy, as ZeRO and Megatron)."""
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
    reshard_after_forward: bool = True
    """hybrid (llmtrain's FSDP2 over a shard group): False keeps every block's gathered weights from forward
    to backward, as zero2 does (zero2 / zero3 name the choice themselves)."""
    optimizer: str = "fused"
    """AdamW implementation: fused (llmtrain, on CUDA and CPU; no temporaries) | foreach (one sqrt(v) buffer)."""
    device: str = "cuda"
    """cuda | cpu: in 16 bit the loss makes its logits' gradient in fp32 chunks of 2^25 (CUDA) or 2^20 (CPU)
    elements (`llmtrain.models.heads.loss_chunk_elements`)."""


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


def sharded_states(setup: Setup) -> tuple[str, ...]:
    """What `setup.strategy` shards. llmtrain runs zero2 as FSDP2 without resharding after forward, so under
    its own precisions (fp32 weights, which are the master copy) the weights are sharded too and a whole
    gathered copy is kept from forward to backward (`_compute_copies`); under bf16_master (ZeRO's scheme)
    zero2's 16-bit weights are replicated and are what compute reads."""
    sharded = SHARDED_STATES[setup.strategy]
    if setup.strategy == "zero2" and not precision_of(setup.precision).master:
        return (*sharded, "weights")
    return sharded


def model_state_bytes(n_params: float, setup: Setup) -> ModelStates:
    """Per-device model states of `n_params` parameters under `setup` (ZeRO paper, Table 1 / Figure 1).
    CPU offload keeps the sharded states on the host, even sharded over one device (FSDP with offload)."""
    precision = precision_of(setup.precision)
    shards = sharding_factor(setup)
    if setup.cpu_offload and setup.strategy == "ddp":
        raise ValueError(
            "cpu_offload moves sharded states to the host; it needs zero1/zero2/zero3/fsdp/hybrid"
        )
    sharded = sharded_states(setup)
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


def activation_precision(setup: Setup) -> Precision:
    """What the activations see. llmtrain autocasts under DDP; under FSDP (zero2/zero3/fsdp/hybrid here) a
    MixedPrecisionPolicy casts the parameters instead, so compute, inputs and residual stream are 16 bit."""
    p = precision_of(setup.precision)
    if p.autocast and "grads" in SHARDED_STATES[setup.strategy]:
        return replace(p, autocast=False, residual=p.activation)
    return p


def _norm_bytes(cfg: ModelConfig, p: Precision) -> int:
    """Bytes one norm saves per token: RMSNorm keeps x/rms in fp32 and 1/rms, LayerNorm its input."""
    if cfg.norm == "rmsnorm":
        return FP32 * (cfg.d_model + 1)
    return cfg.d_model * p.residual


def _q_width(cfg: ModelConfig) -> int:
    return cfg.n_heads * cfg.head_dim


def _attention_bytes(cfg: ModelConfig, p: Precision) -> float:
    """Self-attention sublayer, per token. Without rotary positions q, k and v are views of the fused
    projection, which they keep whole: with GQA its un-repeated k and v are kept besides the repeated ones."""
    h, w, e = cfg.d_model, _q_width(cfg), p.activation
    kv = cfg.kv_heads * cfg.head_dim
    fused = 2 * kv if cfg.position != "rope" and kv != w else 0
    return _norm_bytes(cfg, p) + e * (h + 3 * w + fused + 2 * w) + FP32 * cfg.n_heads


def _cross_attention_bytes(cfg: ModelConfig, p: Precision, q_len: int, kv_len: int) -> float:
    """Cross-attention sublayer of one sequence: q side on q_len tokens, k and v on kv_len."""
    h, w, e = cfg.d_model, _q_width(cfg), p.activation
    kv_inputs = h if p.autocast else 0  # else the shared encoder output, counted once per model
    per_query = _norm_bytes(cfg, p) + e * (h + 3 * w) + FP32 * cfg.n_heads
    return q_len * per_query + kv_len * e * (2 * w + kv_inputs)


def _mlp_bytes(cfg: ModelConfig, p: Precision) -> float:
    h, f, e = cfg.d_model, cfg.ff_dim, p.activation
    if cfg.mlp in GATED_MLPS:
        return _norm_bytes(cfg, p) + e * (h + 4 * f)
    return _norm_bytes(cfg, p) + e * (h + 2 * f)


def _relative_bias_bytes(cfg: ModelConfig, q_len: int, kv_len: int, element: int) -> float:
    """T5's bias (1, heads, T, S) is a float attention mask, shared by a stack's blocks."""
    return cfg.n_heads * q_len * kv_len * element if cfg.position == "relative" else 0.0


def _block_bytes(cfg: ModelConfig, p: Precision, length: int, kv_len: int = 0) -> float:
    """One block of one sequence of `length` tokens (with cross-attention to kv_len tokens if kv_len)."""
    total = length * (_attention_bytes(cfg, p) + _mlp_bytes(cfg, p))
    if p.autocast:  # the fp32 bias is cast to 16 bit for every block's attention
        total += _relative_bias_bytes(cfg, length, length, p.activation)
    return total + (_cross_attention_bytes(cfg, p, length, kv_len) if kv_len else 0.0)


def _block_gradient_bytes(cfg: ModelConfig, p: Precision, length: int) -> float:
    """Gradients alive inside a block's backward, at its MLP: the f-wide ones (3 gated, 2 plain), two h-wide."""
    f_wide = 3 if cfg.mlp in GATED_MLPS else 2
    return length * p.activation * (f_wide * cfg.ff_dim + 2 * cfg.d_model)


def _head_bytes(cfg: ModelConfig, p: Precision) -> float:
    """Per predicted position: the projection's input, BERT's transform (dense output, its norm, a second
    input), and the logits (in the compute dtype) with their fp32 log-sum-exp, which the loss keeps."""
    h, e = cfg.d_model, p.activation
    transform = 2 * e * h + _norm_bytes(cfg, p) if cfg.head_transform else 0
    return e * h + transform + e * cfg.vocab_size + FP32


def _stack_extras(cfg: ModelConfig, p: Precision, tokens: int) -> float:
    """Per stack: its final norm (pre-norm), embedding norm, and relative bias (in the parameters' dtype)."""
    norms = int(cfg.norm_position == "pre") + int(cfg.embedding_norm)
    bias_element = FP32 if p.autocast else p.activation
    return tokens * norms * _norm_bytes(cfg, p) + _relative_bias_bytes(cfg, tokens, tokens, bias_element)


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch."""

    saved: float
    """Saved for backward at the end of the forward pass (blocks or their inputs, norms, head input, loss)."""
    loss_gradients: float
    """The logits' gradient (and in 16 bit its fp32 chunk) that exists at the start of the backward pass."""
    in_blocks: tuple[tuple[float, float], ...] = ()
    """Moments inside the blocks' backward, as (activation bytes, share of the parameters whose gradient
    exists by then): the first and last block of each stack, in backward order. With checkpointing, the
    inputs of the blocks not yet reached plus one block rebuilt and the gradients inside it; without, the
    activations of the blocks not yet reached plus those gradients. The parameter gradients made so far (the
    head's, the blocks' already done) grow as the activations shrink."""

    @property
    def recompute_peak(self) -> float:
        """The most activation bytes inside the blocks' backward."""
        return max((act for act, _ in self.in_blocks), default=0.0)

    def peak(self, grads: float = 0.0, copies: float = 0.0) -> float:
        """The most bytes at once: activations, the share of `grads` made by then, and the rest of the weight
        `copies` that the backward frees as it makes those gradients."""
        moments = [(self.saved + self.loss_gradients, 0.0), *self.in_blocks]
        return max(act + share * grads + (1 - share) * copies for act, share in moments)


def activation_bytes(cfg: ModelConfig, lengths: Lengths, micro_batch: int, setup: Setup) -> Activations:
    """Activations of a micro-batch (formula in the module docstring)."""
    p = activation_precision(setup)
    stacks = [(cfg.n_layers, lengths.inputs, 0)]  # (layers, tokens, cross-attention length)
    if cfg.family == "encoder_decoder":
        stacks.append((cfg.decoder_layers, lengths.targets, lengths.inputs))
    extras = sum(_stack_extras(cfg, p, tokens) for _, tokens, _ in stacks)
    if cfg.family == "encoder_decoder" and not p.autocast:
        extras += lengths.inputs * p.activation * cfg.d_model  # the encoder output, read by every k/v
    head = lengths.predicted * _head_bytes(cfg, p)
    logits = micro_batch * lengths.predicted * cfg.vocab_size
    # the logits' gradient, and in 16 bit the fp32 chunk it is computed in
    chunk = CPU_LOSS_CHUNK if setup.device == "cpu" else GPU_LOSS_CHUNK
    loss_gradients = logits * p.activation + (FP32 * min(logits, chunk) if p.activation < FP32 else 0)
    kept = []  # per stack: what one block keeps for backward, and what its backward adds
    for n_layers, tokens, kv_len in stacks:
        block = _block_bytes(cfg, p, tokens, kv_len)
        inside = _block_gradient_bytes(cfg, p, tokens)
        if setup.activation_checkpointing:
            kept.append((n_layers, tokens * p.residual * cfg.d_model, block + inside, kv_len > 0))
        else:
            kept.append((n_layers, block, inside, kv_len > 0))
    saved = sum(n * per_block for n, per_block, _, _ in kept)
    n_params = parameter_count(cfg)
    # the head's gradient comes first (a tied weight's: V x d, its embedding half added at the very end)
    made = head_parameters(cfg) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    left, moments = saved, []  # the blocks' kept bytes not yet reached by the backward
    for n_layers, per_block, added, cross in reversed(kept):  # backward: the last stack's last block first
        params = block_parameters(cfg, cross)
        first = (left + added, made)
        last = (left - (n_layers - 1) * per_block + added, made + (n_layers - 1) * params)
        moments += [(micro_batch * (act + extras), share / n_params) for act, share in (first, last)]
        left -= n_layers * per_block
        made += n_layers * params
    return Activations(micro_batch * (extras + head + saved), loss_gradients, tuple(moments))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training step."""

    states: ModelStates
    compute_copies: float
    """16-bit weight copies: autocast's cache (DDP), or what FSDP gathers at a time (root + two blocks)."""
    activations: Activations
    step_temporaries: float
    """foreach AdamW's sqrt(v) buffer (none for fused AdamW, or when the optimizer runs on the host)."""
    grads_during_backward: bool
    copies_freed_in_backward: bool = False
    """The copies are autocast's (freed as the backward passes the ops that saved them), not FSDP's units."""
    tied_gradients: float = 0.0
    """A tied embedding's last moment in backward: its head gradient, its embedding gradient and their sum
    (two V x d fp32 matrices beyond the one counted with the gradients), after every other gradient."""

    @property
    def end_of_backward_peak(self) -> float:
        return self.states.total + self.tied_gradients

    @property
    def backward_peak(self) -> float:
        s = self.states
        # autocast's 16-bit copies are saved by the ops that read them and freed by their backward
        freed = self.compute_copies if self.copies_freed_in_backward else 0.0
        fixed = s.weights + s.master + s.optimizer + self.compute_copies - freed
        if self.grads_during_backward:  # accumulating: every gradient exists throughout
            return fixed + s.grads + self.activations.peak(copies=freed)
        return fixed + self.activations.peak(s.grads, freed)

    @property
    def optimizer_peak(self) -> float:
        return self.states.total + self.step_temporaries

    @property
    def peak(self) -> float:
        return max(self.backward_peak, self.end_of_backward_peak, self.optimizer_peak)

    def components(self) -> dict[str, float]:
        """Named parts for a table (the peak is not their sum: see backward_peak and optimizer_peak)."""
        parts = {f.name: getattr(self.states, f.name) for f in fields(self.states) if f.name != "host"}
        parts.update(
            compute_copies=self.compute_copies,
            activations=self.activations.saved,
            loss_gradients=self.activations.loss_gradients,
            recompute=self.activations.recompute_peak,
            step_temporaries=self.step_temporaries,
        )
        return parts


def _compute_copies(cfg: ModelConfig, n_params: int, setup: Setup, shards: int) -> tuple[float, bool]:
    """Bytes of 16-bit (or gathered) weight copies, and whether they are autocast's (not FSDP's units)."""
    p = precision_of(setup.precision)
    sharded = sharded_states(setup)
    gathered = p.compute_copy or p.weights  # FSDP gathers in the compute dtype (fp32 runs gather fp32)
    # run by FSDP: it gathers a copy even on one device (hybrid over shard groups of one is plain DDP here)
    fsdp = "weights" in sharded and (shards > 1 or setup.cpu_offload or setup.strategy != "hybrid")
    keeps_all = setup.strategy == "zero2" or (setup.strategy == "hybrid" and not setup.reshard_after_forward)
    if fsdp and keeps_all:  # no resharding after forward: all of it, from forward to backward
        return n_params * gathered, False
    if fsdp:  # the root unit (embeddings, head) + the current block + the prefetched one
        root = n_params - all_block_parameters(cfg)
        return (root + 2 * largest_block_parameters(cfg)) * gathered, False
    if shards > 1 and "grads" in sharded:  # ZeRO-2: the replicated weights are what compute reads
        return 0.0, False
    return n_params * p.compute_copy, p.compute_copy > 0


def estimate_memory(cfg: ModelConfig, lengths: Lengths, micro_batch: int, setup: Setup) -> MemoryEstimate:
    """Everything a device holds for a step of `micro_batch` sequences of `lengths` under `setup`."""
    n_params = parameter_count(cfg)
    states = model_state_bytes(n_params, setup)
    shards = sharding_factor(setup)
    optimizer_shards = shards if "optimizer" in SHARDED_STATES[setup.strategy] else 1
    if setup.optimizer not in ("fused", "foreach"):
        raise ValueError(f"optimizer={setup.optimizer!r} is unknown; allowed: fused, foreach")
    step_temporaries = 0.0
    if setup.optimizer == "foreach" and not setup.cpu_offload:
        step_temporaries = n_params * FP32 / optimizer_shards
    copies, autocast_cache = _compute_copies(cfg, n_params, setup, shards)
    return MemoryEstimate(
        states=states,
        compute_copies=copies,
        copies_freed_in_backward=autocast_cache,
        activations=activation_bytes(cfg, lengths, micro_batch, setup),
        step_temporaries=step_temporaries,
        grads_during_backward=setup.grad_accum_steps > 1,
        tied_gradients=2 * cfg.vocab_size * cfg.d_model * FP32 if cfg.tie_embeddings else 0.0,
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
