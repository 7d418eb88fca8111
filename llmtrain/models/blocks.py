"""The one block library every family is built from: norms, attention, MLPs, residual blocks, stacks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.cache import KVCache, LayerCache
from llmtrain.models.config import GATED_MLPS, ModelConfig
from llmtrain.models.positions import RelativePositionBias, Rotary, split_heads


class _RMSNormFunction(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) * weight in fp32, written in `out_dtype`, forward and backward by hand:
    three passes over x forward and six backward, where autograd through the same formula takes about
    twice as many and saves both x and the normalised x. Only x / rms (fp32) and 1 / rms are kept."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        sum_sq = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_()  # one pass, no x^2 tensor
        rstd = sum_sq.div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = x32 * rstd
        if torch.compiler.is_compiling():  # a new tensor: torch 2.11's dynamo loses the gradient of an out=
            out = normed * weight.to(normed.dtype)  # result or of a same-dtype .to (an alias)
            out = out.to(out_dtype) if out_dtype != out.dtype else out
        else:
            out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            torch.mul(normed, weight.to(normed.dtype), out=out)
        ctx.save_for_backward(normed, rstd, weight)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        normed, rstd, weight = ctx.saved_tensors
        weight = weight.to(normed.dtype)
        grad_times_normed = grad_out * normed
        grad_weight = grad_times_normed.flatten(0, -2).sum(0)
        # d(x/rms)/dx: (g - x/rms * mean(g * x/rms)) / rms with g = grad_out * weight
        dot = (grad_times_normed @ weight).unsqueeze(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad_out * weight, normed, dot, value=-1).mul_(rstd)
        return grad_x.to(ctx.x_dtype), grad_weight.to(ctx.weight_dtype), None, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019); statistics in fp32.

    cast_output: under autocast, write the result in the autocast dtype (for a norm whose output only
    feeds matmuls, which would cast it anyway); otherwise the result has the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-5, cast_output: bool = False):
        super().__init__()
        self.eps, self.cast_output = eps, cast_output
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        out_dtype = x.dtype
        if self.cast_output and torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return _RMSNormFunction.apply(x, self.weight, self.eps, out_dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)

    def init_weights(self) -> None:
        self.reset_parameters()


def make_norm(cfg: ModelConfig, feeds_matmuls: bool = False) -> nn.Module:
    """feeds_matmuls: the output is only read by linear layers (a pre-norm sublayer's input norm), so an
    RMSNorm may write it in the autocast dtype directly."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps, cast_output=feeds_matmuls)
    return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


def key_padding(mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """A (B, T) padding mask as bool, True = real token: bool as given, 0/1 integers (Hugging Face's
    convention) compared with 0. A float mask is refused: added to the scores as a bias it would keep
    padding and, standing in for the causal mask, let a decoder see the future."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be bool or 0/1 integers (True / 1 = a real token); got {mask.dtype}")
    return mask != 0


def padding_to_attn_mask(key_padding: torch.Tensor | None, q_len: int, causal: bool) -> torch.Tensor | None:
    """Self-attention mask (B, 1, T, T), True = may attend, from key_padding (B, T) with True = real token.

    Each query may always attend to its own position, so a padded row never becomes all -inf (NaN).
    """
    if key_padding is None:
        return None
    B, S = key_padding.shape
    mask = key_padding[:, None, None, :].expand(B, 1, q_len, S)
    if causal:
        mask = mask & torch.ones(q_len, S, dtype=torch.bool, device=key_padding.device).tril()
    return mask | torch.eye(q_len, S, dtype=torch.bool, device=key_padding.device)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """(q_len, k_len), True = may attend: the q_len queries are the last positions of the k_len keys."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


MATMUL_ATTENTION_MAX_SCORES = 1 << 20
"""Largest query x key score matrix (per head) for which bf16 attention on the CPU runs as matmuls."""


def use_matmul_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """bf16 on the CPU: scores by matmul (oneDNN's bf16 kernels, AMX where the CPU has it) beat SDPA's CPU
    flash kernel, which is slower in bf16 than in fp32 here (decoder_small: 56 vs 46 ms per layer, forward
    and backward; matmuls 38 ms; docs/benchmarks.md). The scores are materialised, so only while they are
    small; CUDA always takes SDPA (flash / memory-efficient kernels)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.shape[-2] * k.shape[-2] <= MATMUL_ATTENTION_MAX_SCORES
    )


class _MatmulAttention(torch.autograd.Function):
    """softmax(q k^T + mask) v with q already scaled, forward and backward by hand: autograd's version of
    the same ops scaled and masked the score matrix again in backward; here the masked scores' gradient is
    the softmax backward alone (their probabilities are 0). The bf16 softmax reduces in fp32 inside its
    kernel."""

    @staticmethod
    def forward(ctx, q, k, v, mask, may_be_empty):
        scores = q @ k.transpose(-1, -2)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, float("-inf"))
            else:
                scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        if may_be_empty:
            probs.nan_to_num_(0.0)  # rows with every key masked: softmax over -inf only
        ctx.save_for_backward(q, k, v, probs)
        ctx.mask_shape = None if mask is None or mask.dtype == torch.bool else mask.shape
        return probs @ v

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_v = probs.transpose(-1, -2) @ grad_out
        grad_scores = torch._softmax_backward_data(grad_out @ v.transpose(-1, -2), probs, -1, probs.dtype)
        grad_q = grad_scores @ k
        grad_k = grad_scores.transpose(-1, -2) @ q
        grad_mask = None
        if ctx.mask_shape is not None and ctx.needs_input_grad[3]:  # T5's learned position bias
            grad_mask = grad_scores.sum_to_size(ctx.mask_shape)
        return grad_q, grad_k, grad_v, grad_mask, None


class _CausalBlockAttention(torch.autograd.Function):
    """Causal softmax(q k^T) v (q already scaled, as many queries as keys) by query blocks: block i's
    queries score only the keys up to the block's end, so the scores above the diagonal blocks are never
    computed (3/8 of them with 4 blocks), as SDPA's flash kernel skips them; only each diagonal block
    is masked."""

    @staticmethod
    def forward(ctx, q, k, v, n_blocks):
        shape = q.shape
        q, k, v = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))  # (B * nh, T, hd)
        size = q.shape[1] // n_blocks
        diagonal = torch.ones(size, size, dtype=torch.bool, device=q.device).triu_(1)  # True: masked
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        probs = []
        for i in range(n_blocks):
            start, end = i * size, (i + 1) * size
            scores = torch.bmm(q[:, start:end], k[:, :end].transpose(1, 2))  # (B * nh, size, end)
            scores[:, :, start:].masked_fill_(diagonal, float("-inf"))
            p = torch.softmax(scores, dim=-1)
            probs.append(p)
            torch.bmm(p, v[:, :end], out=out[:, start:end])
        ctx.save_for_backward(q, k, v, *probs)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *probs = ctx.saved_tensors
        size = q.shape[1] // len(probs)
        grad_out = grad_out.reshape(q.shape)
        grad_q = torch.empty_like(q)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        for i, p in enumerate(probs):
            start, end = i * size, (i + 1) * size
            g = grad_out[:, start:end]
            grad_v[:, :end].baddbmm_(p.transpose(1, 2), g)
            grad_scores = torch._softmax_backward_data(
                torch.bmm(g, v[:, :end].transpose(1, 2)), p, -1, p.dtype
            )
            torch.bmm(grad_scores, k[:, :end], out=grad_q[:, start:end])
            grad_k[:, :end].baddbmm_(grad_scores.transpose(1, 2), q[:, start:end])
        return grad_q.view(ctx.shape), grad_k.view(ctx.shape), grad_v.view(ctx.shape), None


CAUSAL_BLOCK = 64
"""Query block of the CPU causal matmul attention (at most 4 blocks)."""


def matmul_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, as scaled_dot_product_attention defines it (bool mask: True may
    attend; float mask: added; is_causal: the top-left lower triangle; a row that may attend to nothing gives
    zeros). The softmax reduces in fp32 inside the kernel and stores bf16."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if scale != 1.0:  # T5 has none
        q = q * scale  # cheaper on q than on the scores
    T = q.shape[-2]
    n_blocks = min(4, T // CAUSAL_BLOCK)
    blocks_fit = n_blocks > 1 and T % n_blocks == 0 and T == k.shape[-2]
    if causal and not dropout and blocks_fit and not torch.compiler.is_compiling():  # bmm(out=) into views
        with torch.autocast(q.device.type, enabled=False):
            return _CausalBlockAttention.apply(q, k, v, n_blocks)
    may_be_empty = mask is not None  # a causal row always has its own key
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if not dropout:
        with torch.autocast(q.device.type, enabled=False):
            return _MatmulAttention.apply(q, k, v, mask, may_be_empty)
    scores = q @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    if may_be_empty:
        probs = probs.nan_to_num(0.0)
    return F.dropout(probs, dropout) @ v


class _FusedLinear(torch.autograd.Function):
    """x @ cat(weights).T + bias, saving the weights themselves: F.linear on the concatenation would save the
    concatenated copy for backward, which re-concatenates them instead (a copy of the weights, small beside
    the activations) and hands each weight a view of the one weight gradient."""

    @staticmethod
    def forward(ctx, *inputs):  # (x, bias, *weights); one varargs parameter: torch 2.11's dynamo drops ctx
        x, bias, *weights = inputs  # under no_grad when the argument count equals forward's parameter count
        ctx.save_for_backward(x, *weights)
        ctx.has_bias = bias is not None
        return F.linear(x, torch.cat(weights), bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, *weights = ctx.saved_tensors
        grad_x = grad_y @ torch.cat(weights) if ctx.needs_input_grad[0] else None
        rows = grad_y.reshape(-1, grad_y.shape[-1])
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        if not any(ctx.needs_input_grad[2:]):  # frozen weights
            return grad_x, grad_b, *(None for _ in weights)
        grad_w = rows.T @ x.reshape(-1, x.shape[-1])
        return grad_x, grad_b, *grad_w.split([w.shape[0] for w in weights])


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
    """The outputs of several projections of the same input, concatenated on the last dim, by one matmul.

    The parameters stay separate (checkpoints, export and init see q_proj, k_proj, ...). One larger matmul
    runs closer to the hardware's rate than three small ones, and autocast casts the input and the autograd
    engine sums its gradient once instead of once per projection. Under autocast the input and weights are
    cast here, as F.linear's autocast would.
    """
    weights = [linear.weight for linear in linears]
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(device)
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return _FusedLinear.apply(x, bias, *weights)


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention; self or cross, causal or not, GQA.

    `mask` is None, bool (True = may attend) or float (added to the scores: T5's position bias, with -inf
    where attention is not allowed). With a `cache`, self-attention appends this call's keys and values to
    the cached ones (rotary positions continue from there) and cross-attention projects the context once.
    """

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False, rotary: Rotary | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal, self.cross, self.dropout = causal, cross, cfg.dropout
        self.scale = cfg.attn_scale  # None: SDPA's 1/sqrt(head_dim)
        self.rotary = None if cross else rotary  # positions are relative within a sequence, not across
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)

    def heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n * hd) -> (B, n, T, hd)."""
        return y.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = fused_linear(src, (self.k_proj, self.v_proj)).chunk(2, dim=-1)
        return self.heads(k, self.n_kv_heads), self.heads(v, self.n_kv_heads)  # (B, nkv, S, hd)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = self.heads(self.q_proj(x), self.n_heads)  # (B, nh, T, hd)
            if cache is None:
                k, v = self.project_kv(context)
            else:
                if cache.cross_keys is None:
                    cache.cross_keys, cache.cross_values = self.project_kv(context)
                k, v = cache.cross_keys, cache.cross_values
        else:  # one matmul for q, k and v
            qkv = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj))
            if self.rotary is not None:
                start = cache.length if cache is not None else 0
                q, k, v = self.rotary.split_rotate(qkv, self.n_heads, self.n_kv_heads, start)
            else:
                q, k, v = split_heads(qkv, self.n_heads, self.n_kv_heads)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, nkv, past + T, hd)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        if self.n_kv_heads != self.n_heads:  # each kv head serves n_heads / n_kv_heads query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        dropout = self.dropout if self.training else 0.0
        causal = self.causal and mask is None
        if use_matmul_attention(q, k):
            y = matmul_attention(q, k, v, mask, dropout, causal, self.scale)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.scale
            )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Activation(nn.Module):
    """SiLU, or GELU in its tanh approximation (GPT-2, T5 'gelu_new') or exact erf form (BERT)."""

    def __init__(self, name: str, gelu: str = "tanh"):
        super().__init__()
        self.silu = name == "silu"
        self.approximate = "tanh" if gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self.silu else F.gelu(x, approximate=self.approximate)


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up of h = [gate | up] (the fused gate and up projections), whose backward writes the
    gradient of h in place, both halves, instead of two gradients that autograd would concatenate."""

    @staticmethod
    def forward(ctx, h, silu, approximate):
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) if silu else F.gelu(gate, approximate=approximate)
        ctx.save_for_backward(h, act)
        ctx.silu, ctx.approximate = silu, approximate
        return act * up

    @staticmethod
    def backward(ctx, grad_y):
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad = torch.empty_like(h)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(act, grad_y, out=grad_up)
        grad_act = grad_y * up
        if ctx.silu:
            torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_gate)
        else:
            torch.ops.aten.gelu_backward.grad_input(
                grad_act, gate, approximate=ctx.approximate, grad_input=grad_gate
            )
        return grad, None, None


class MLP(nn.Module):
    """GELU MLP (GPT-2/BERT), or gated: SwiGLU (Shazeer 2020, LLaMA) or GEGLU (T5 v1.1).

    Gated: down(act(gate(x)) * up(x)); plain: down(act(up(x))).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in GATED_MLPS
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias) if self.gated else None
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)
        self.act = Activation("silu" if cfg.mlp == "swiglu" else "gelu", cfg.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:  # one matmul for gate and up
            h = fused_linear(x, (self.gate_proj, self.up_proj))
            if torch.compiler.is_compiling():  # the compiler fuses the plain form (out= into views breaks it)
                gate, up = h.chunk(2, dim=-1)
                return self.down_proj(self.act(gate) * up)
            return self.down_proj(_GatedActivation.apply(h, self.act.silu, self.act.approximate))
        return self.down_proj(self.act(self.up_proj(x)))


class HeadTransform(nn.Module):
    """BERT's MLM head transform: norm(act(dense(h))), applied before the output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.act = Activation("gelu", cfg.gelu)
        self.norm = make_norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(h)))


class Block(nn.Module):
    """Residual block, pre-norm x + f(norm(x)) or post-norm norm(x + f(x)); a decoder block of an
    encoder-decoder adds a cross-attention sublayer."""

    def __init__(
        self, cfg: ModelConfig, causal: bool, cross_attention: bool = False, rotary: Rotary | None = None
    ):
        super().__init__()
        pre_norm = cfg.norm_position == "pre"  # a pre-norm sublayer's norm output goes only to its linears
        self.attn_norm = make_norm(cfg, feeds_matmuls=pre_norm)
        self.attn = Attention(cfg, causal=causal, rotary=rotary)
        self.cross_norm = make_norm(cfg, feeds_matmuls=pre_norm) if cross_attention else None
        self.cross_attn = Attention(cfg, causal=False, cross=True) if cross_attention else None
        self.mlp_norm = make_norm(cfg, feeds_matmuls=pre_norm)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.post_norm = cfg.norm_position == "post"

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, mask=mask, cache=cache)))
            if self.cross_attn is not None:
                x = self.cross_norm(
                    x + self.drop(self.cross_attn(x, context=context, mask=context_mask, cache=cache))
                )
            return self.mlp_norm(x + self.drop(self.mlp(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), mask=mask, cache=cache))
        if self.cross_attn is not None:
            x = x + self.drop(
                self.cross_attn(self.cross_norm(x), context=context, mask=context_mask, cache=cache)
            )
        x = x + self.drop(self.mlp(self.mlp_norm(x)))
        return x


class Stack(nn.Module):
    """Token embedding (+ learned positions, token type 0, embedding norm), n blocks, final norm (pre-norm
    stacks). Shared by every family. T5's relative position bias lives here, computed once per call and
    shared by the blocks (HF keeps it in the first block)."""

    def __init__(
        self,
        cfg: ModelConfig,
        n_layers: int,
        causal: bool,
        cross_attention: bool = False,
        embedding: nn.Embedding | None = None,
    ):
        super().__init__()
        self.causal = causal
        self.embed = embedding if embedding is not None else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.max_seq_len = cfg.max_seq_len  # the table's rows (an int8 copy of it has no num_embeddings)
        self.token_type_embed = nn.Embedding(cfg.n_token_types, cfg.d_model) if cfg.n_token_types else None
        self.embed_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.rotary = (
            Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.position == "rope" else None
        )
        self.relative_bias = (
            RelativePositionBias(
                cfg.n_heads, cfg.relative_buckets, cfg.relative_max_distance, bidirectional=not causal
            )
            if cfg.position == "relative"
            else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            Block(cfg, causal=causal, cross_attention=cross_attention, rotary=self.rotary)
            for _ in range(n_layers)
        )
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()

    def self_attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        T: int,
        past: int | None,
        device: torch.device,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """None (SDPA's own causal flag, or no mask), bool (B|1, 1, T, past+T) or float with the relative bias.

        past is None without a KV cache, else the number of positions the cache holds before this call.
        document_ids (B, T): tokens attend only within their own document (packed windows).
        """
        if past is not None and (attention_mask is not None or document_ids is not None):
            raise ValueError(
                "attention_mask and document_ids are not supported with a KV cache; pass equal-length prompts"
            )
        if past:  # the T queries are the last T of past + T keys
            mask = causal_mask(T, past + T, device)[None, None] if self.causal else None
        else:
            mask = padding_to_attn_mask(attention_mask, T, self.causal)
        if document_ids is not None:  # block-diagonal; each token is in its own block, so no row is empty
            same = document_ids[:, None, :, None] == document_ids[:, None, None, :]  # (B, 1, T, T)
            if mask is None and self.causal:
                mask = causal_mask(T, T, device)[None, None]
            mask = same if mask is None else mask & same
        if self.relative_bias is None:
            return mask
        past = past or 0
        if mask is None and self.causal:
            mask = causal_mask(T, T, device)[None, None]
        bias = self.relative_bias(T, past + T, past)  # (1, nh, T, past+T)
        return bias if mask is None else bias.masked_fill(~mask, float("-inf"))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
        context_document_ids: torch.Tensor | None = None,
        embedded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With a cache, input_ids continue the cache.length positions it holds (incremental decoding).

        document_ids (B, T) and context_document_ids (B, S): document-aware attention in packed windows;
        a query attends to keys (and cross-attends to context positions) of its own document only.
        embedded: self.embed(input_ids), when the caller looked it up already."""
        T, device = input_ids.shape[1], input_ids.device
        past = cache.length if cache is not None else None
        x = self.embed(input_ids) if embedded is None else embedded  # (B, T, d)
        if self.pos_embed is not None:
            start = past or 0
            if start + T > self.max_seq_len:  # as the rotary table says; CUDA would assert
                raise ValueError(
                    f"position {start + T - 1} is past the learned position table of model.max_seq_len="
                    f"{self.max_seq_len}"
                )
            x = x + self.pos_embed(torch.arange(start, start + T, device=device))
        if self.token_type_embed is not None:  # single segments: type 0 everywhere
            x = x + self.token_type_embed.weight[0]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        attention_mask = key_padding(attention_mask, "attention_mask")
        context_mask = key_padding(context_mask, "the encoder's attention_mask")
        mask = self.self_attention_mask(attention_mask, T, past, device, document_ids)
        cross_mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, S)
        if document_ids is not None and context_document_ids is not None:
            same = document_ids[:, None, :, None] == context_document_ids[:, None, None, :]  # (B, 1, T, S)
            cross_mask = same if cross_mask is None else cross_mask & same
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x = layer(x, mask=mask, context=context, context_mask=cross_mask, cache=layer_cache)
        return self.norm(x)


def init_weights(module: nn.Module, cfg: ModelConfig, n_residual_layers: int) -> None:
    """Normal(0, init_std) for matrices and embeddings; residual outputs scaled by 1/sqrt(2*depth) (GPT-2).

    With a fixed attn_scale (T5: 1.0) the usual 1/sqrt(head_dim) is folded into the query init instead,
    so that the scores start with the same spread as in a scaled model (as HF T5's init does).
    """
    residual_std = cfg.init_std / math.sqrt(2 * n_residual_layers)
    query_std = cfg.init_std
    if cfg.attn_scale is not None:
        query_std = cfg.init_std / math.sqrt(cfg.head_dim) / cfg.attn_scale
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
            if name.endswith("q_proj"):
                std = query_std
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=cfg.init_std)
        elif isinstance(sub, (RMSNorm, LayerNorm, Rotary)):
            sub.init_weights()
