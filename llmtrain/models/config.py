"""The small typed config a model is built from. Models read nothing else."""

from __future__ import annotations

import math
from dataclasses import dataclass

FAMILIES = ("encoder", "decoder", "encoder_decoder")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")
POSITIONS = ("learned", "rope", "relative", "none")
NORM_POSITIONS = ("pre", "post")
GELUS = ("tanh", "exact")


@dataclass
class ModelConfig:
    family: str = "decoder"
    """One of encoder (MLM), decoder (CLM), encoder_decoder (span corruption)."""
    vocab_size: int = 0
    """0 means: take it from the tokenizer."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Blocks in the stack (the encoder's, for encoder_decoder)."""
    n_decoder_layers: int | None = None
    """Decoder blocks of an encoder_decoder; None means n_layers."""
    n_heads: int = 4
    """Query heads; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads; must divide n_heads."""
    d_head: int | None = None
    """Width of one attention head; None means d_model // n_heads (T5 v1.1 small: 6 heads of 64 in d_model 512)."""
    d_ff: int | None = None
    """Hidden width of the MLP; None means 4*d_model (gelu) or ~8/3*d_model rounded up to 64 (swiglu, geglu)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the learned position table, or rope cache)."""
    norm: str = "rmsnorm"
    """layernorm | rmsnorm."""
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    """pre: x + f(norm(x)), with a final norm (GPT-2, LLaMA, T5) | post: norm(x + f(x)), no final norm (BERT)."""
    embedding_norm: bool = False
    """Normalise the summed embeddings before the first block (BERT)."""
    mlp: str = "swiglu"
    """gelu | swiglu | geglu (gated GELU, T5 v1.1)."""
    gelu: str = "tanh"
    """GELU form in gelu/geglu MLPs and the head transform: tanh approximation (GPT-2, T5) | exact (erf; BERT)."""
    position: str = "rope"
    """learned | rope | relative (T5's bucketed bias on attention scores, shared by a stack's blocks) | none."""
    rope_theta: float = 10000.0
    relative_buckets: int = 32
    """position=relative: buckets of the bias (a bidirectional stack gives half to each direction)."""
    relative_max_distance: int = 128
    """position=relative: distances from here on share the last bucket."""
    n_token_types: int = 0
    """Rows of a token-type (segment) table whose row 0 is added at every position (BERT: 2); 0: none."""
    attn_scale: float | None = None
    """Factor on q.k before the softmax; None means 1/sqrt(head dim). T5 uses 1.0 (the scale is in q's init)."""
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    head_transform: bool = False
    """Dense + GELU + norm on the final hidden states before the output projection (BERT's MLM head)."""
    lm_head_bias: bool = False
    """A bias on the output projection (BERT)."""
    init_std: float = 0.02
    """Std of normal init; residual output projections get init_std / sqrt(2 * depth) (depth: the blocks, of
    both stacks in an encoder-decoder)."""
    pad_token_id: int = 0
    """Filled in from the tokenizer."""
    decoder_start_token_id: int = 0
    """First decoder input of an encoder_decoder (T5 uses pad)."""
    init_from: str | None = None
    """A Hugging Face model folder (config.json + model.safetensors, as scripts/export_hf.py writes) whose
    weights start the model, e.g. to continue pretraining on a new domain; its architecture must match."""

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp in GATED_MLPS:  # keep parameter count near a 4*d GELU MLP (LLaMA)
            return -(-int(8 * self.d_model / 3) // 64) * 64
        return 4 * self.d_model


class ModelConfigError(ValueError):
    """A model setting that cannot be built; the message names the setting and what is allowed."""


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ModelConfigError naming the first setting that cannot be built."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ModelConfigError(message)

    need(cfg.family in FAMILIES, f"model.family={cfg.family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    need(cfg.norm in NORMS, f"model.norm={cfg.norm!r} is unknown; allowed: {', '.join(NORMS)}")
    need(cfg.mlp in MLPS, f"model.mlp={cfg.mlp!r} is unknown; allowed: {', '.join(MLPS)}")
    need(
        cfg.position in POSITIONS,
        f"model.position={cfg.position!r} is unknown; allowed: {', '.join(POSITIONS)}",
    )
    need(
        cfg.norm_position in NORM_POSITIONS,
        f"model.norm_position={cfg.norm_position!r} is unknown; allowed: {', '.join(NORM_POSITIONS)}",
    )
    need(cfg.gelu in GELUS, f"model.gelu={cfg.gelu!r} is unknown; allowed: {', '.join(GELUS)}")
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        need(getattr(cfg, name) > 0, f"model.{name}={getattr(cfg, name)} must be a positive integer")
    need(
        cfg.d_head is None or cfg.d_head > 0,
        f"model.d_head={cfg.d_head} must be a positive integer or null (d_model / n_heads)",
    )
    need(
        cfg.d_head is not None or cfg.d_model % cfg.n_heads == 0,
        f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}; "
        f"allowed: n_heads that divide d_model, or an explicit model.d_head",
    )
    need(
        cfg.n_kv_heads is None or cfg.n_kv_heads > 0,
        f"model.n_kv_heads={cfg.n_kv_heads} must be a positive divisor of model.n_heads or null",
    )
    need(
        cfg.n_heads % cfg.kv_heads == 0,
        f"model.n_kv_heads={cfg.n_kv_heads} does not divide model.n_heads={cfg.n_heads}",
    )
    need(
        cfg.position != "rope" or cfg.head_dim % 2 == 0,
        f"model.position=rope needs an even head dim; d_model/n_heads={cfg.head_dim}",
    )
    need(0.0 <= cfg.dropout < 1.0, f"model.dropout={cfg.dropout} must be in [0, 1)")
    need(cfg.norm_eps > 0, f"model.norm_eps={cfg.norm_eps} must be > 0")
    need(
        cfg.attn_scale is None or cfg.attn_scale > 0,
        f"model.attn_scale={cfg.attn_scale} must be > 0 or null (1/sqrt(head dim))",
    )
    need(cfg.n_token_types >= 0, f"model.n_token_types={cfg.n_token_types} must be >= 0 (0: none)")
    if cfg.position == "relative":
        need(
            cfg.relative_buckets >= 4,
            f"model.relative_buckets={cfg.relative_buckets} must be >= 4 with model.position=relative",
        )
        need(
            cfg.relative_max_distance > cfg.relative_buckets // 2,
            f"model.relative_max_distance={cfg.relative_max_distance} must exceed model.relative_buckets / 2 "
            f"= {cfg.relative_buckets // 2}",
        )
    need(
        cfg.init_from is None or bool(str(cfg.init_from).strip()),
        "model.init_from is empty; allowed: null or a Hugging Face model folder",
    )
    need(cfg.vocab_size >= 0, f"model.vocab_size={cfg.vocab_size} must be >= 0 (0 = from the tokenizer)")
    need(cfg.init_std >= 0 and math.isfinite(cfg.init_std), f"model.init_std={cfg.init_std} must be >= 0")
    need(
        cfg.position != "rope" or (cfg.rope_theta > 0 and math.isfinite(cfg.rope_theta)),
        f"model.rope_theta={cfg.rope_theta} must be > 0 (the rotary base: 10000 in RoPE, 500000 in LLaMA 3)",
    )
    if cfg.n_decoder_layers is not None:
        need(cfg.n_decoder_layers > 0, f"model.n_decoder_layers={cfg.n_decoder_layers} must be positive")
