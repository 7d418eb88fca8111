"""The shapes every measurement starts from: sequence lengths per objective and parameter counts.

Parameter counts are computed from a ModelConfig by arithmetic (no model is built), so the planner can search
thousands of shapes; a test checks them against `count_parameters` of the built model for every family.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from llmtrain.config import TrainConfig
from llmtrain.models.config import GATED_MLPS, ModelConfig
from llmtrain.objectives.span_corruption import span_windows


@dataclass(frozen=True)
class Lengths:
    """Per-sequence lengths of one training example."""

    inputs: int
    """Tokens into the first (or only) stack: the decoder's for CLM, the encoder's for MLM and span corruption."""
    targets: int = 0
    """Decoder tokens of an encoder-decoder; 0 for the single-stack families."""
    predicted: float = 0.0
    """Positions the output head runs on: every position for CLM and span corruption, only the selected ones
    (select_rate * inputs on average) for MLM, whose head runs on those alone."""
    corpus: int = 0
    """Corpus tokens one sequence consumes (the D of scaling laws): inputs, or for span corruption the raw
    window before corruption (568 for 512 inputs at the T5 defaults)."""


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    """The training config's model with vocab_size 0 ("from the tokenizer") resolved to the tokenizer's size."""
    return replace(cfg.model, vocab_size=cfg.model.vocab_size or tokenizer_vocab_size(cfg))


def tokenizer_vocab_size(cfg: TrainConfig) -> int:
    """The vocabulary the trainer gives a model of vocab_size 0: the tokenizer file's (data.tokenizer.path,
    model.init_from's tokenizer.json, or the one of data.shards / the first data.mixture source), else the size
    of the BPE the run trains."""
    from llmtrain.data.shards import open_shards
    from llmtrain.data.tokenizer import load_tokenizer

    data = cfg.data
    if data.tokenizer.path:
        return load_tokenizer(data.tokenizer.path).vocab_size
    kept = Path(cfg.model.init_from or "") / "tokenizer.json"  # the trainer reads with the weights' tokenizer
    if cfg.model.init_from and kept.is_file():
        try:
            return load_tokenizer(kept).vocab_size
        except ValueError:  # not llmtrain's (the trainer trains one on the data then, as below)
            pass
    prepared = data.shards or (data.mixture[0].path if data.mixture else None)
    if prepared:
        return open_shards(prepared).tokenizer().vocab_size
    return data.tokenizer.vocab_size


def lengths_for(cfg: TrainConfig) -> Lengths:
    """Lengths of one example of `cfg`'s objective at data.seq_len."""
    seq_len, objective = cfg.data.seq_len, cfg.objective
    if objective.name == "mlm":
        return Lengths(inputs=seq_len, predicted=objective.select_rate * seq_len, corpus=seq_len)
    if objective.name == "span_corruption":
        # what the objective lays out (the length search's estimate can be one token longer)
        raw, targets, _ = span_windows(cfg)
        targets = objective.targets_length or targets
        return Lengths(inputs=seq_len, targets=targets, predicted=targets, corpus=raw)
    return Lengths(inputs=seq_len, predicted=seq_len, corpus=seq_len)


def corpus_tokens(cfg: TrainConfig, input_tokens: float) -> float:
    """Corpus tokens (the D of scaling laws) behind `input_tokens` of the trainer's count (its logged `tokens`
    and tokens/s count inputs): the same for CLM and MLM; for span corruption raw window / inputs times more
    (568 / 512 at the T5 defaults)."""
    lengths = lengths_for(cfg)
    return input_tokens * lengths.corpus / lengths.inputs


def linear_parameters(d_in: int, d_out: int, bias: bool) -> int:
    return d_in * d_out + (d_out if bias else 0)


def norm_parameters(cfg: ModelConfig) -> int:
    return cfg.d_model * (2 if cfg.norm == "layernorm" and cfg.bias else 1)


def attention_parameters(cfg: ModelConfig) -> int:
    """q and o at n_heads * head_dim, k and v at n_kv_heads * head_dim (grouped-query attention)."""
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return (
        linear_parameters(cfg.d_model, q_width, cfg.bias)
        + 2 * linear_parameters(cfg.d_model, kv_width, cfg.bias)
        + linear_parameters(q_width, cfg.d_model, cfg.bias)
    )


def mlp_parameters(cfg: ModelConfig) -> int:
    matrices_in = 2 if cfg.mlp in GATED_MLPS else 1  # swiglu and geglu add a gate projection
    return matrices_in * linear_parameters(cfg.d_model, cfg.ff_dim, cfg.bias) + linear_parameters(
        cfg.ff_dim, cfg.d_model, cfg.bias
    )


def block_parameters(cfg: ModelConfig, cross_attention: bool = False) -> int:
    """One block; a decoder block of an encoder-decoder adds a normed cross-attention sublayer."""
    sublayers = 3 if cross_attention else 2
    return (
        sublayers * norm_parameters(cfg) + (sublayers - 1) * attention_parameters(cfg) + mlp_parameters(cfg)
    )


def stack_parameters(cfg: ModelConfig, n_layers: int, cross_attention: bool = False) -> int:
    """Blocks and what a stack owns besides its token embedding (counted by the model): position table or
    relative bias, token-type table, embedding norm, final norm (pre-norm only)."""
    extras = {
        "learned": cfg.max_seq_len * cfg.d_model,
        "relative": cfg.relative_buckets * cfg.n_heads,
    }.get(cfg.position, 0)
    extras += cfg.n_token_types * cfg.d_model
    extras += norm_parameters(cfg) * (int(cfg.embedding_norm) + int(cfg.norm_position == "pre"))
    return n_layers * block_parameters(cfg, cross_attention) + extras


def head_parameters(cfg: ModelConfig) -> int:
    """The output side: optional transform (dense + norm), the projection when untied, its bias."""
    transform = linear_parameters(cfg.d_model, cfg.d_model, cfg.bias) + norm_parameters(cfg)
    return (
        (transform if cfg.head_transform else 0)
        + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
        + (cfg.vocab_size if cfg.lm_head_bias else 0)
    )


def parameter_count(cfg: ModelConfig) -> int:
    """Unique parameters of the model `cfg` builds (as `count_parameters`; a tied head counts once)."""
    stacks = stack_parameters(cfg, cfg.n_layers)
    if cfg.family == "encoder_decoder":
        stacks += stack_parameters(cfg, cfg.decoder_layers, cross_attention=True)
    return stacks + cfg.vocab_size * cfg.d_model + head_parameters(cfg)


def all_block_parameters(cfg: ModelConfig) -> int:
    """Parameters of every block (what FSDP wraps unit by unit; the rest is the root unit)."""
    total = cfg.n_layers * block_parameters(cfg)
    if cfg.family == "encoder_decoder":
        total += cfg.decoder_layers * block_parameters(cfg, cross_attention=True)
    return total


def largest_block_parameters(cfg: ModelConfig) -> int:
    """Parameters of the largest block: the unit FSDP gathers at a time."""
    return block_parameters(cfg, cross_attention=cfg.family == "encoder_decoder")
