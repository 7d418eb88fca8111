"""Training FLOPs from the model's shapes, the PaLM formula, MFU, and a matmul probe for the peak in hand.

Counting convention (the one of PaLM appendix B and `torch.utils.flop_counter`): a matmul of (m, k) by (k, n)
is 2mkn FLOPs; only matmuls are counted (norms, softmax, activations and the loss are well under 1%); the
backward pass costs two matmuls per forward matmul (gradient of each operand), so training = 3 x forward;
causal attention is counted over the full T x T square, and recomputation (activation checkpointing, the
flash-attention backward) is not counted: MFU measures useful model FLOPs, not the work the hardware did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from llmtrain.measure.shapes import Lengths
from llmtrain.models.config import GATED_MLPS, ModelConfig

BACKWARD_PER_FORWARD = 2  # one matmul for the gradient of each operand


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sequence, by part."""

    projections: float
    """q, k, v and output projections of self- and cross-attention."""
    attention: float
    """Scores QK^T and their product with V, over every (query, key) pair."""
    mlp: float
    head: float
    """The output projection to the vocabulary (and BERT's head transform), on the predicted positions only."""

    @property
    def forward(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def training(self) -> float:
        """Forward + backward."""
        return (1 + BACKWARD_PER_FORWARD) * self.forward


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention_flops(cfg: ModelConfig, q_len: int, kv_len: int) -> tuple[float, float]:
    """(projections, scores) of one attention sublayer: q and o on q_len tokens, k and v on kv_len."""
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    projections = 2 * linear_flops(q_len, cfg.d_model, q_width) + 2 * linear_flops(
        kv_len, cfg.d_model, kv_width
    )
    scores = 2 * 2.0 * q_len * kv_len * q_width  # QK^T and AV, each 2 * T * S * head_dim per head
    return projections, scores


def mlp_flops(cfg: ModelConfig, tokens: int) -> float:
    matrices = 3 if cfg.mlp in GATED_MLPS else 2
    return matrices * linear_flops(tokens, cfg.d_model, cfg.ff_dim)


def forward_flops(cfg: ModelConfig, lengths: Lengths) -> FlopCount:
    """Forward FLOPs of one sequence: the stack(s), then the head on `lengths.predicted` positions.

    For an encoder-decoder the encoder runs on `lengths.inputs` tokens and the decoder on `lengths.targets`,
    its cross-attention taking queries from the decoder and keys/values from the encoder output.
    """
    stack_len = lengths.inputs
    proj, scores = attention_flops(cfg, stack_len, stack_len)
    projections, attention = cfg.n_layers * proj, cfg.n_layers * scores
    mlp = cfg.n_layers * mlp_flops(cfg, stack_len)
    if cfg.family == "encoder_decoder":
        T, S, n = lengths.targets, lengths.inputs, cfg.decoder_layers
        self_proj, self_scores = attention_flops(cfg, T, T)
        cross_proj, cross_scores = attention_flops(cfg, T, S)
        projections += n * (self_proj + cross_proj)
        attention += n * (self_scores + cross_scores)
        mlp += n * mlp_flops(cfg, T)
    head = linear_flops(lengths.predicted, cfg.d_model, cfg.vocab_size)
    if cfg.head_transform:
        head += linear_flops(lengths.predicted, cfg.d_model, cfg.d_model)
    return FlopCount(projections=projections, attention=attention, mlp=mlp, head=head)


def training_flops_per_token(cfg: ModelConfig, lengths: Lengths) -> float:
    """Training FLOPs per corpus token (the unit of D in C = 6ND). The trainer's tokens and tokens/s count
    input tokens, fewer for span corruption (`llmtrain.measure.shapes.corpus_tokens`)."""
    return forward_flops(cfg, lengths).training / lengths.corpus


def palm_flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM appendix B: 6N + 12·L·H·Q·T model FLOPs per token of a decoder (N parameters, Q head dim)."""
    return 6.0 * n_params + 12.0 * n_layers * n_heads * head_dim * seq_len


def achieved_flops_per_second(flops: float, seconds: float, n_devices: int = 1) -> float:
    """Model FLOP/s per device for `flops` of work done in `seconds` by `n_devices` together."""
    if seconds <= 0 or n_devices <= 0:
        raise ValueError(f"seconds={seconds} and n_devices={n_devices} must be > 0")
    return flops / seconds / n_devices


def mfu(flops_per_second_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak, as a fraction."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0")
    return flops_per_second_per_device / peak_flops


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_matmuls(a: torch.Tensor, b: torch.Tensor, seconds: float) -> tuple[int, float]:
    """(matmuls done, seconds taken) for about `seconds` of back-to-back a @ b."""
    device = a.device
    _synchronize(device)
    iterations, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or iterations < 2:
        torch.matmul(a, b)
        iterations += 1
        if iterations % 4 == 0:  # on CUDA, only waiting tells how long the queued work took
            _synchronize(device)
    _synchronize(device)
    return iterations, time.perf_counter() - start


def measure_matmul_peak(
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    size: int | None = None,
    seconds: float = 0.25,
) -> float:
    """FLOP/s of back-to-back square matmuls of `size` (default 8192 on CUDA, 1024 on CPU): the honest peak
    of the device in hand for MFU. A warm-up of half as long first lets the clocks settle. Its random matrices
    come from a generator of its own: the trainer probes at its first log, and the global RNG state (dropout's,
    restored on resume) must not depend on when that is."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    _run_matmuls(a, b, seconds / 2)
    iterations, elapsed = _run_matmuls(a, b, seconds)
    return 2.0 * size**3 * iterations / elapsed
