"""The one block library every family is built from: norms, attention, MLPs, pre-norm residual blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.config import ModelConfig
from llmtrain.models.positions import Rotary


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019); statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)

    def init_weights(self) -> None:
        self.reset_parameters()


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


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


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention; self or cross, causal or not, GQA."""

    def __init__(self, cfg: ModelConfig, causal: bool, cross: bool = False, rotary: Rotary | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.causal, self.cross, self.dropout = causal, cross, cfg.dropout
        self.rotary = None if cross else rotary  # positions are relative within a sequence, not across
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        src = x if context is None else context
        S = src.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(src).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        if self.n_kv_heads != self.n_heads:  # each kv head serves n_heads / n_kv_heads query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """GELU MLP (GPT-2/BERT) or SwiGLU (Shazeer 2020, LLaMA)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias) if self.gated else None
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block; a decoder block of an encoder-decoder adds a cross-attention sublayer."""

    def __init__(
        self, cfg: ModelConfig, causal: bool, cross_attention: bool = False, rotary: Rotary | None = None
    ):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal, rotary=rotary)
        self.cross_norm = make_norm(cfg) if cross_attention else None
        self.cross_attn = Attention(cfg, causal=False, cross=True) if cross_attention else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), mask=mask))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_norm(x), context=context, mask=context_mask))
        x = x + self.drop(self.mlp(self.mlp_norm(x)))
        return x


class Stack(nn.Module):
    """Token embedding (+ learned positions), n blocks, final norm. Shared by every family."""

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
        self.rotary = (
            Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.position == "rope" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            Block(cfg, causal=causal, cross_attention=cross_attention, rotary=self.rotary)
            for _ in range(n_layers)
        )
        self.norm = make_norm(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, T, d)
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=input_ids.device))
        x = self.drop(x)
        mask = padding_to_attn_mask(attention_mask, T, self.causal)
        cross_mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, mask=mask, context=context, context_mask=cross_mask)
        return self.norm(x)


def init_weights(module: nn.Module, cfg: ModelConfig, n_residual_layers: int) -> None:
    """Normal(0, init_std) for matrices and embeddings; residual outputs scaled by 1/sqrt(2*depth) (GPT-2)."""
    residual_std = cfg.init_std / math.sqrt(2 * n_residual_layers)
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            std = residual_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=cfg.init_std)
        elif isinstance(sub, (RMSNorm, LayerNorm, Rotary)):
            sub.init_weights()
