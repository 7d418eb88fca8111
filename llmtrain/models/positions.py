"""Position information: learned absolute tables, rotary embeddings (RoFormer, Su et al. 2021) and T5's
bucketed relative position bias (Raffel et al. 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x (B, nh, T, hd) by the angles of positions start..start+T-1."""
    T = x.shape[-2]
    cos, sin = cos[start : start + T].to(x.dtype), sin[start : start + T].to(x.dtype)  # (T, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def split_heads(
    qkv: torch.Tensor, n_heads: int, n_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projections (B, T, (nh + 2 nkv) * hd) -> views q (B, nh, T, hd), k and v (B, nkv, T, hd)."""
    head_dim = qkv.shape[-1] // (n_heads + 2 * n_kv_heads)
    heads = qkv.unflatten(-1, (-1, head_dim)).transpose(1, 2)
    return heads.split((n_heads, n_kv_heads, n_kv_heads), dim=1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: float) -> None:
    """out = x with its halves rotated by +angle (sign 1) or -angle (sign -1), written in place."""
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)


class _RotaryQKV(torch.autograd.Function):
    """Fused projections (B, T, (nh + 2 nkv) * hd) -> rotated q (B, nh, T, hd), rotated k and v (B, nkv, T, hd),
    each contiguous. Backward writes the three gradients straight into the fused projections' gradient; with
    plain split views autograd would concatenate them, and v's view would keep the whole fused output alive."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, n_heads, n_kv_heads):
        q, k, v = split_heads(qkv, n_heads, n_kv_heads)
        q_out, k_out = (
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
        )
        _rotate(q, cos, sin, q_out, 1.0)
        _rotate(k, cos, sin, k_out, 1.0)
        ctx.save_for_backward(cos, sin)
        ctx.heads = (n_heads, n_kv_heads, q.shape[-1])
        return q_out, k_out, v.clone(memory_format=torch.contiguous_format)  # never a view of qkv

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        n_heads, n_kv_heads, head_dim = ctx.heads
        B, _, T, _ = grad_q.shape
        grad = torch.empty(B, T, n_heads + 2 * n_kv_heads, head_dim, dtype=grad_q.dtype, device=grad_q.device)
        gq, gk, gv = grad.transpose(1, 2).split((n_heads, n_kv_heads, n_kv_heads), 1)
        _rotate(grad_q, cos, sin, gq, -1.0)
        _rotate(grad_k, cos, sin, gk, -1.0)
        gv.copy_(grad_v)
        return grad.flatten(-2), None, None, None, None


class Rotary(nn.Module):
    """Holds the cos/sin tables as non-persistent buffers (rebuilt by init_weights, so meta init works)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        cos, sin = rope_tables(head_dim, max_seq_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self) -> None:
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.theta, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(self, q: torch.Tensor, k: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k of positions start..start+T-1 (start > 0 when decoding after a KV cache)."""
        self._check_positions(start, q.shape[-2])
        return apply_rope(q, self.cos, self.sin, start), apply_rope(k, self.cos, self.sin, start)

    def _check_positions(self, start: int, length: int) -> None:
        if start + length > self.max_seq_len:
            raise ValueError(
                f"position {start + length - 1} is past the rotary table of model.max_seq_len={self.max_seq_len}"
            )

    def split_rotate(
        self, qkv: torch.Tensor, n_heads: int, n_kv_heads: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused q/k/v projections (B, T, (nh + 2 nkv) * hd) of positions start..start+T-1 -> q and k
        rotated, (B, nh, T, hd) and (B, nkv, T, hd), and v (B, nkv, T, hd); what forward() gives on the
        split heads, in fewer passes."""
        T = qkv.shape[1]
        self._check_positions(start, T)
        if (
            torch.compiler.is_compiling()
        ):  # the compiler fuses the plain form; out= into views breaks its graph
            q, k, v = split_heads(qkv, n_heads, n_kv_heads)
            return *self(q, k, start), v
        cos, sin = self.cos[start : start + T].to(qkv.dtype), self.sin[start : start + T].to(qkv.dtype)
        with torch.autocast(qkv.device.type, enabled=False):
            return _RotaryQKV.apply(qkv, cos, sin, n_heads, n_kv_heads)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, n_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: exact buckets for small distances, then log-spaced
    ones up to max_distance, after which all distances share the last bucket. A bidirectional stack uses
    half the buckets for keys after the query; a causal one sees only keys at or before it."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * n_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = n_buckets // 2
    # float log as in Mesh TensorFlow and HF, so the buckets (and so the weights' meaning) agree exactly
    log_bucket = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (n_buckets - max_exact)
        ).long()
    )
    log_bucket = log_bucket.clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to every attention score of a stack (T5)."""

    def __init__(self, n_heads: int, n_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.embed = nn.Embedding(n_buckets, n_heads)

    def forward(self, q_len: int, k_len: int, start: int = 0) -> torch.Tensor:
        """(1, n_heads, q_len, k_len) for queries at positions start..start+q_len-1 and keys 0..k_len-1."""
        device = self.embed.weight.device
        query = torch.arange(start, start + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.n_buckets, self.max_distance)
        return self.embed(buckets).permute(2, 0, 1).unsqueeze(0)
