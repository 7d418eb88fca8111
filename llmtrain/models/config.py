"""The small typed config a model is built from. Models read nothing else."""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("encoder", "decoder", "encoder_decoder")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope", "none")


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
    d_ff: int | None = None
    """Hidden width of the MLP; None means 4*d_model (gelu) or ~8/3*d_model rounded up to 64 (swiglu)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (size of the learned position table, or rope cache)."""
    norm: str = "rmsnorm"
    """layernorm | rmsnorm."""
    norm_eps: float = 1e-5
    mlp: str = "swiglu"
    """gelu | swiglu."""
    position: str = "rope"
    """learned | rope | none."""
    rope_theta: float = 10000.0
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    init_std: float = 0.02
    """Std of normal init; residual output projections get init_std / sqrt(2 * depth)."""
    pad_token_id: int = 0
    """Filled in from the tokenizer."""
    decoder_start_token_id: int = 0
    """First decoder input of an encoder_decoder (T5 uses pad)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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
        if self.mlp == "swiglu":  # keep parameter count near a 4*d GELU MLP (LLaMA)
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
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
        need(getattr(cfg, name) > 0, f"model.{name}={getattr(cfg, name)} must be a positive integer")
    need(
        cfg.d_model % cfg.n_heads == 0,
        f"model.d_model={cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}; "
        f"allowed: n_heads that divide d_model",
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
    need(cfg.vocab_size >= 0, f"model.vocab_size={cfg.vocab_size} must be >= 0 (0 = from the tokenizer)")
    if cfg.n_decoder_layers is not None:
        need(cfg.n_decoder_layers > 0, f"model.n_decoder_layers={cfg.n_decoder_layers} must be positive")
