"""The Hugging Face Transformers layout of the four preset architectures, both ways.

gpt2 -> GPT2LMHeadModel, llama -> LlamaForCausalLM, bert -> BertForMaskedLM, t5 -> T5ForConditionalGeneration.
One table of weight names per architecture (`weight_rules`) serves export (ours -> HF) and import
(`model.init_from`, HF -> ours), so the two directions cannot drift apart. A config that no class
represents is refused with the nearest preset and what differs from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtrain.models.config import ModelConfig, ModelConfigError

HF_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "bert": "BertForMaskedLM",
    "t5": "T5ForConditionalGeneration",
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# What each architecture fixes (field -> allowed values); sizes and everything not listed are free.
REQUIRED: dict[str, dict[str, tuple[Any, ...]]] = {
    "gpt2": {
        "family": ("decoder",),
        "norm": ("layernorm",),
        "norm_position": ("pre",),
        "embedding_norm": (False,),
        "n_token_types": (0,),
        "mlp": ("gelu",),
        "position": ("learned",),
        "bias": (True,),
        "head_transform": (False,),
        "lm_head_bias": (False,),
        "attn_scale": (None, 1.0),
    },
    "llama": {
        "family": ("decoder",),
        "norm": ("rmsnorm",),
        "norm_position": ("pre",),
        "embedding_norm": (False,),
        "n_token_types": (0,),
        "mlp": ("swiglu", "geglu"),
        "position": ("rope",),
        "head_transform": (False,),
        "lm_head_bias": (False,),
        "attn_scale": (None,),
    },
    "bert": {
        "family": ("encoder",),
        "norm": ("layernorm",),
        "norm_position": ("post",),
        "embedding_norm": (True,),
        "mlp": ("gelu",),
        "position": ("learned",),
        "bias": (True,),
        "head_transform": (True,),
        "lm_head_bias": (True,),
        "attn_scale": (None,),
    },
    "t5": {
        "family": ("encoder_decoder",),
        "norm": ("rmsnorm",),
        "norm_position": ("pre",),
        "embedding_norm": (False,),
        "n_token_types": (0,),
        "position": ("relative",),
        "bias": (False,),
        "tie_embeddings": (False,),  # HF ties T5's head only together with a d_model**-0.5 rescale
        "head_transform": (False,),
        "lm_head_bias": (False,),
        "attn_scale": (1.0,),
    },
}


class UnsupportedArchitecture(ModelConfigError):
    """No Hugging Face class represents this model config (the message names the nearest preset)."""


def _problems(cfg: ModelConfig, arch: str) -> list[str]:
    """Why `arch` cannot represent cfg (empty: it can)."""
    out = [
        f"model.{name}={getattr(cfg, name)!r} ({arch} needs {' or '.join(map(repr, allowed))})"
        for name, allowed in REQUIRED[arch].items()
        if getattr(cfg, name) not in allowed
    ]
    if arch in ("gpt2", "bert", "t5") and cfg.kv_heads != cfg.n_heads:
        out.append(f"model.n_kv_heads={cfg.n_kv_heads} ({arch} has no grouped-query attention)")
    if arch in ("gpt2", "bert") and cfg.head_dim * cfg.n_heads != cfg.d_model:
        out.append(f"model.d_head={cfg.d_head} ({arch} needs d_model / n_heads)")
    if arch == "llama" and cfg.d_model % cfg.n_heads:
        out.append(f"model.n_heads={cfg.n_heads} (llama needs it to divide d_model={cfg.d_model})")
    if arch == "bert" and cfg.n_token_types < 1:
        out.append("model.n_token_types=0 (bert needs a token type table, usually 2)")
    if arch == "t5" and cfg.mlp == "geglu" and cfg.gelu != "tanh":
        out.append("model.gelu='exact' (t5's gated-gelu is the tanh form)")
    return out


def hf_architecture(cfg: ModelConfig) -> str:
    """gpt2 | llama | bert | t5: the Hugging Face architecture that represents cfg exactly, or raise."""
    problems = {arch: _problems(cfg, arch) for arch in HF_CLASSES}
    for arch, found in problems.items():
        if not found:
            return arch
    # the same family first (an encoder is never "nearly" a decoder), then the fewest differences
    nearest = min(problems, key=lambda a: (REQUIRED[a]["family"] != (cfg.family,), len(problems[a])))
    raise UnsupportedArchitecture(
        f"no Hugging Face class represents this model; the nearest preset is model={nearest} "
        f"({HF_CLASSES[nearest]}), which differs in: " + "; ".join(problems[nearest])
    )


# --- config.json -------------------------------------------------------------------------------------------


def _gelu_name(cfg: ModelConfig, tanh_name: str) -> str:
    return tanh_name if cfg.gelu == "tanh" else "gelu"


def hf_config(cfg: ModelConfig, bos_token_id: int = 1, eos_token_id: int = 2) -> dict[str, Any]:
    """The config.json of the Hugging Face model equivalent to cfg."""
    arch = hf_architecture(cfg)
    common = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "dtype": "float32",
    }
    if arch == "gpt2":
        return common | {
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.ff_dim,
            "n_positions": cfg.max_seq_len,
            "activation_function": _gelu_name(cfg, "gelu_new"),
            "layer_norm_epsilon": cfg.norm_eps,
            "scale_attn_weights": cfg.attn_scale is None,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
        }
    if arch == "llama":
        act = "silu" if cfg.mlp == "swiglu" else _gelu_name(cfg, "gelu_pytorch_tanh")
        return common | {
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ff_dim,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": act,
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "attention_dropout": cfg.dropout,
        }
    if arch == "bert":
        return common | {
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.ff_dim,
            "hidden_act": _gelu_name(cfg, "gelu_new"),
            "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": cfg.n_token_types,
            "layer_norm_eps": cfg.norm_eps,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout,
        }
    if cfg.mlp == "gelu":
        ff = _gelu_name(cfg, "gelu_new")
    else:
        ff = "gated-gelu" if cfg.mlp == "geglu" else "gated-silu"
    return common | {
        "is_encoder_decoder": True,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.ff_dim,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "feed_forward_proj": ff,
        "layer_norm_epsilon": cfg.norm_eps,
        "dropout_rate": cfg.dropout,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "n_positions": cfg.max_seq_len,
    }


NORM_EPS = {  # config.json key and the HF default
    "gpt2": ("layer_norm_epsilon", 1e-5),
    "llama": ("rms_norm_eps", 1e-6),
    "bert": ("layer_norm_eps", 1e-12),
    "t5": ("layer_norm_epsilon", 1e-6),
}


def _refuse(arch: str, what: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"this {arch} config.json uses {what}, which llmtrain's {arch} preset does not"
    )


def _gelu_form(name: str, arch: str) -> str:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return "tanh"
    if name in ("gelu", "gelu_python"):
        return "exact"
    raise _refuse(arch, f"activation {name!r}")


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig equivalent to a Hugging Face config.json of one of the four architectures."""
    arch = hf.get("model_type")
    if arch not in HF_CLASSES:
        raise UnsupportedArchitecture(
            f"config.json model_type={arch!r}; llmtrain imports {', '.join(HF_CLASSES)} ({', '.join(HF_CLASSES.values())})"
        )
    eps_key, eps_default = NORM_EPS[arch]
    base = dict(
        vocab_size=hf["vocab_size"],
        pad_token_id=hf.get("pad_token_id") or 0,
        init_std=hf.get("initializer_range", 0.02),
        norm_eps=hf.get(eps_key, eps_default),
    )
    if arch == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("add_cross_attention"):
            raise _refuse(arch, "scale_attn_by_inverse_layer_idx or add_cross_attention")
        d = hf.get("n_embd", 768)
        return ModelConfig(
            family="decoder",
            d_model=d,
            n_layers=hf.get("n_layer", 12),
            n_heads=hf.get("n_head", 12),
            d_ff=hf.get("n_inner") or 4 * d,
            max_seq_len=hf.get("n_positions", 1024),
            norm="layernorm",
            mlp="gelu",
            gelu=_gelu_form(hf.get("activation_function", "gelu_new"), arch),
            position="learned",
            bias=True,
            dropout=hf.get("resid_pdrop", 0.0),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            **base,
        )
    if arch == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _refuse(arch, f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
        if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
            raise _refuse(arch, "attention_bias != mlp_bias (llmtrain has one model.bias)")
        act = hf.get("hidden_act", "silu")
        n_heads = hf.get("num_attention_heads", 32)
        d = hf.get("hidden_size", 4096)
        head_dim = hf.get("head_dim") or d // n_heads
        return ModelConfig(
            family="decoder",
            d_model=d,
            n_layers=hf.get("num_hidden_layers", 32),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_head=None if head_dim * n_heads == d else head_dim,
            d_ff=hf.get("intermediate_size", 11008),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            mlp="swiglu" if act == "silu" else "geglu",
            gelu="tanh" if act == "silu" else _gelu_form(act, arch),
            position="rope",
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            bias=hf.get("attention_bias", False),
            dropout=hf.get("attention_dropout", 0.0),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            **base,
        )
    if arch == "bert":
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise _refuse(arch, f"position_embedding_type={hf['position_embedding_type']!r}")
        return ModelConfig(
            family="encoder",
            d_model=hf.get("hidden_size", 768),
            n_layers=hf.get("num_hidden_layers", 12),
            n_heads=hf.get("num_attention_heads", 12),
            d_ff=hf.get("intermediate_size", 3072),
            max_seq_len=hf.get("max_position_embeddings", 512),
            norm="layernorm",
            norm_position="post",
            embedding_norm=True,
            n_token_types=hf.get("type_vocab_size", 2),
            mlp="gelu",
            gelu=_gelu_form(hf.get("hidden_act", "gelu"), arch),
            position="learned",
            bias=True,
            dropout=hf.get("hidden_dropout_prob", 0.0),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            head_transform=True,
            lm_head_bias=True,
            **base,
        )
    # T5 (v1.1 layout). transformers 5 reads tie_word_embeddings=false as "do not rescale the decoder output"
    # and writes scale_decoder_outputs instead; an original T5 (tied head, rescaled output) is refused.
    if hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False):
        raise _refuse(
            arch, "the original T5's tied head with its d_model**-0.5 output rescale (T5 v1.1 is untied)"
        )
    proj = hf.get("feed_forward_proj", "relu")
    gated, act = proj.startswith("gated-"), proj.removeprefix("gated-")
    if not (act.startswith("gelu") or act == "silu" and gated):  # no plain SiLU (or ReLU) MLP here
        raise _refuse(arch, f"feed_forward_proj={proj!r}")
    n_heads, d = hf.get("num_heads", 8), hf.get("d_model", 512)
    head_dim = hf.get("d_kv", 64)
    return ModelConfig(
        family="encoder_decoder",
        d_model=d,
        n_layers=hf.get("num_layers", 6),
        n_decoder_layers=hf.get("num_decoder_layers") or hf.get("num_layers", 6),
        n_heads=n_heads,
        d_head=None if head_dim * n_heads == d else head_dim,
        d_ff=hf.get("d_ff", 2048),
        max_seq_len=hf.get("n_positions", 512),
        norm="rmsnorm",
        mlp=("swiglu" if act == "silu" else "geglu") if gated else "gelu",
        gelu="tanh" if act == "silu" or proj == "gated-gelu" else _gelu_form(act, arch),
        position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        bias=False,
        dropout=hf.get("dropout_rate", 0.0),
        tie_embeddings=False,
        attn_scale=1.0,
        decoder_start_token_id=hf.get("decoder_start_token_id") or 0,
        **base,
    )


# --- weights ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """hf = cat(ours, dim 0), transposed when `transpose` (GPT-2's Conv1D stores (in, out))."""

    hf: str
    ours: tuple[str, ...]
    transpose: bool = False
    export_only: bool = False
    """A second HF name for a tensor imported under another (BERT's head bias), written on export and read on
    import only when the other is missing (transformers 4 saves one of the two)."""


def _linear(hf: str, ours: str, bias: bool, transpose: bool = False) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", (f"{ours}.weight",), transpose)]
    return rules + [Rule(f"{hf}.bias", (f"{ours}.bias",))] if bias else rules


def _norm(hf: str, ours: str, bias: bool) -> list[Rule]:
    return _linear(hf, ours, bias)


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("transformer.wte.weight", ("decoder.embed.weight",))]
    rules.append(Rule("transformer.wpe.weight", ("decoder.pos_embed.weight",)))
    for i in range(cfg.n_layers):
        h, o = f"transformer.h.{i}", f"decoder.layers.{i}"
        qkv = ("q_proj", "k_proj", "v_proj")
        rules += _norm(f"{h}.ln_1", f"{o}.attn_norm", True)
        rules.append(Rule(f"{h}.attn.c_attn.weight", tuple(f"{o}.attn.{p}.weight" for p in qkv), True))
        rules.append(Rule(f"{h}.attn.c_attn.bias", tuple(f"{o}.attn.{p}.bias" for p in qkv)))
        rules += _linear(f"{h}.attn.c_proj", f"{o}.attn.o_proj", True, transpose=True)
        rules += _norm(f"{h}.ln_2", f"{o}.mlp_norm", True)
        rules += _linear(f"{h}.mlp.c_fc", f"{o}.mlp.up_proj", True, transpose=True)
        rules += _linear(f"{h}.mlp.c_proj", f"{o}.mlp.down_proj", True, transpose=True)
    return rules + _norm("transformer.ln_f", "decoder.norm", True)


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("model.embed_tokens.weight", ("decoder.embed.weight",))]
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"decoder.layers.{i}"
        rules += _norm(f"{h}.input_layernorm", f"{o}.attn_norm", False)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += _linear(f"{h}.self_attn.{p}", f"{o}.attn.{p}", cfg.bias)
        rules += _norm(f"{h}.post_attention_layernorm", f"{o}.mlp_norm", False)
        for p in ("gate_proj", "up_proj", "down_proj"):
            rules += _linear(f"{h}.mlp.{p}", f"{o}.mlp.{p}", cfg.bias)
    return rules + _norm("model.norm", "decoder.norm", False)


def _bert_rules(cfg: ModelConfig) -> list[Rule]:
    e = "bert.embeddings"
    rules = [
        Rule(f"{e}.word_embeddings.weight", ("encoder.embed.weight",)),
        Rule(f"{e}.position_embeddings.weight", ("encoder.pos_embed.weight",)),
        Rule(f"{e}.token_type_embeddings.weight", ("encoder.token_type_embed.weight",)),
        *_norm(f"{e}.LayerNorm", "encoder.embed_norm", True),
    ]
    for i in range(cfg.n_layers):
        h, o = f"bert.encoder.layer.{i}", f"encoder.layers.{i}"
        for hf_name, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rules += _linear(f"{h}.attention.self.{hf_name}", f"{o}.attn.{ours}", True)
        rules += _linear(f"{h}.attention.output.dense", f"{o}.attn.o_proj", True)
        rules += _norm(f"{h}.attention.output.LayerNorm", f"{o}.attn_norm", True)
        rules += _linear(f"{h}.intermediate.dense", f"{o}.mlp.up_proj", True)
        rules += _linear(f"{h}.output.dense", f"{o}.mlp.down_proj", True)
        rules += _norm(f"{h}.output.LayerNorm", f"{o}.mlp_norm", True)
    rules += _linear("cls.predictions.transform.dense", "head_transform.dense", True)
    rules += _norm("cls.predictions.transform.LayerNorm", "head_transform.norm", True)
    # transformers 5 keeps two bias parameters, tied like the weights: tied, the decoder's is cls.predictions.bias;
    # untied (tie_word_embeddings=false), its forward reads the decoder's own. Both names are exported.
    biases = ["cls.predictions.bias", "cls.predictions.decoder.bias"]
    read, alias = biases if cfg.tie_embeddings else biases[::-1]
    rules.append(Rule(read, ("lm_head.bias",)))
    rules.append(Rule(alias, ("lm_head.bias",), export_only=True))
    return rules


def _t5_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("shared.weight", ("encoder.embed.weight",))]
    for stack, n in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        rules.append(
            Rule(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (f"{stack}.relative_bias.embed.weight",),
            )
        )
        for i in range(n):
            h, o = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            sublayers = [("SelfAttention", "attn", "attn_norm")]
            if stack == "decoder":
                sublayers.append(("EncDecAttention", "cross_attn", "cross_norm"))
            for j, (hf_name, ours, norm) in enumerate(sublayers):
                for p in "qkvo":
                    rules += _linear(f"{h}.{j}.{hf_name}.{p}", f"{o}.{ours}.{p}_proj", False)
                rules += _norm(f"{h}.{j}.layer_norm", f"{o}.{norm}", False)
            f = f"{h}.{len(sublayers)}"
            if cfg.mlp == "gelu":
                rules += _linear(f"{f}.DenseReluDense.wi", f"{o}.mlp.up_proj", False)
            else:
                rules += _linear(f"{f}.DenseReluDense.wi_0", f"{o}.mlp.gate_proj", False)
                rules += _linear(f"{f}.DenseReluDense.wi_1", f"{o}.mlp.up_proj", False)
            rules += _linear(f"{f}.DenseReluDense.wo", f"{o}.mlp.down_proj", False)
            rules += _norm(f"{f}.layer_norm", f"{o}.mlp_norm", False)
        rules += _norm(f"{stack}.final_layer_norm", f"{stack}.norm", False)
    return rules


# HF names that import may meet and skip: aliases of tied tensors, buffers, heads llmtrain has no use for.
IGNORED = {
    "gpt2": r"transformer\.h\.\d+\.attn\.(bias|masked_bias)",
    "llama": r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    "bert": r"bert\.pooler\..*|cls\.seq_relationship\..*|bert\.embeddings\.position_ids",
    "t5": r"(encoder|decoder)\.embed_tokens\.weight|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
}
HEAD_NAMES = {"gpt2": "lm_head.weight", "llama": "lm_head.weight", "bert": "cls.predictions.decoder.weight"}


def weight_rules(cfg: ModelConfig) -> list[Rule]:
    arch = hf_architecture(cfg)
    rules = {"gpt2": _gpt2_rules, "llama": _llama_rules, "bert": _bert_rules, "t5": _t5_rules}[arch](cfg)
    if not cfg.tie_embeddings:
        rules.append(Rule(HEAD_NAMES.get(arch, "lm_head.weight"), ("lm_head.weight",)))
    return rules


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors (new, contiguous, CPU: ready for safetensors)."""
    state = strip_wrapper_prefixes(state)
    out = {}
    for rule in weight_rules(cfg):
        missing = [name for name in rule.ours if name not in state]
        if missing:
            raise KeyError(f"the model state lacks {missing[0]} (needed for {rule.hf})")
        tensor = torch.cat([state[name].detach().cpu() for name in rule.ours], dim=0)
        out[rule.hf] = (tensor.t() if rule.transpose else tensor).contiguous().clone()
    return out


BASE_PREFIXES = {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}
"""The base model's attribute in the *LM head* class: a checkpoint saved from the base class (GPT2Model, as
openai-community/gpt2 is) names its tensors without it, which transformers accepts."""


def hub_spellings(hf_state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The names transformers also loads, spelt as its current head classes save them: a base model's tensors
    get their prefix (`wte.weight` -> `transformer.wte.weight`) and LayerNorm's TF-era `gamma` / `beta`
    (bert-base-uncased) become `weight` / `bias`."""
    prefix = BASE_PREFIXES.get(arch)
    heads = ("lm_head.", "cls.")
    out = {}
    for name, tensor in hf_state.items():
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
        if prefix and not name.startswith((prefix, *heads)):
            name = prefix + name
        out[name] = tensor
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (without the aliases of tied weights). Raises on a missing tensor or on an
    HF tensor the model has no place for."""
    arch = hf_architecture(cfg)
    hf_state = hub_spellings(hf_state, arch)
    out, used = {}, set()
    rules = weight_rules(cfg)
    aliases = {rule.ours: rule.hf for rule in rules if rule.export_only}
    for rule in rules:
        if rule.export_only:
            used.add(rule.hf)
            continue
        name = rule.hf if rule.hf in hf_state else aliases.get(rule.ours, rule.hf)
        if name not in hf_state:
            raise KeyError(f"the Hugging Face weights lack {rule.hf}")
        tensor = hf_state[name]
        tensor = tensor.t() if rule.transpose else tensor
        for name, part in zip(rule.ours, tensor.chunk(len(rule.ours), dim=0)):
            out[name] = part.contiguous()
        used.add(rule.hf)
    head = HEAD_NAMES.get(arch, "lm_head.weight")
    if cfg.tie_embeddings and head in hf_state:  # tied: the head must equal the embedding it shares
        embedding = next(r.hf for r in weight_rules(cfg) if r.ours == (_embedding_name(cfg),))
        if not torch.equal(hf_state[head], hf_state[embedding]):
            raise ValueError(f"{head} differs from {embedding} although config.json ties them")
        used.add(head)
    unexpected = [k for k in hf_state if k not in used and not re.fullmatch(IGNORED[arch], k)]
    if unexpected:
        raise KeyError(
            f"the Hugging Face weights hold tensors a {arch} model has no place for: {unexpected[:5]}"
        )
    return out


def _embedding_name(cfg: ModelConfig) -> str:
    return ("decoder" if cfg.family == "decoder" else "encoder") + ".embed.weight"


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the name parts torch.compile and activation checkpointing add (`_orig_mod.`, ...)."""
    wrappers = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")
    return {wrappers.sub(r"\1", k).removeprefix("module."): v for k, v in state.items()}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that accepts a state without the aliases of tied weights, and says what is wrong."""
    state = strip_wrapper_prefixes(state)
    own = model.state_dict()
    misfits = [
        f"{k} is {tuple(v.shape)} in the weights but {tuple(own[k].shape)} in the model its config describes"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if misfits:  # load_state_dict would raise a RuntimeError listing them, past the callers' error handling
        raise ValueError("weights do not fit the model: " + "; ".join(misfits[:3]))
    result = model.load_state_dict(state, strict=False)
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    loaded = set(state)
    missing = [k for k in result.missing_keys if not _aliased(k, model, owners, loaded)]
    if missing or result.unexpected_keys:
        raise ValueError(
            "weights do not fit the model: "
            + (f"missing {missing[:5]} " if missing else "")
            + (f"unexpected {result.unexpected_keys[:5]}" if result.unexpected_keys else "")
        )


def _aliased(name: str, model: nn.Module, owners: dict[int, list[str]], loaded: set[str]) -> bool:
    try:
        p = model.get_parameter(name)
    except AttributeError:
        return False
    return any(other in loaded for other in owners.get(id(p), []))


# --- folders ---------------------------------------------------------------------------------------------------


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a Hugging Face model folder holds config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not the object of a model's settings")
    return config


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (no pickle: nothing in the file can run code)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (only single-file safetensors weights are read)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or damaged?): {err}"
        ) from None


DERIVED_FIELDS = ("n_kv_heads", "d_head", "d_ff", "n_decoder_layers")  # their None follows other fields
ARCHITECTURE_FIELDS = tuple(
    f.name
    for f in fields(ModelConfig)
    if f.name not in ("dropout", "init_std", "pad_token_id", "decoder_start_token_id", "init_from")
)


def architecture_differences(cfg: ModelConfig, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Fields (by their effective values) in which two configs build different functions: name -> (cfg, other)."""

    def effective(c: ModelConfig) -> dict[str, Any]:
        values = asdict(c)
        values.update(
            n_kv_heads=c.kv_heads, d_head=c.head_dim, d_ff=c.ff_dim, n_decoder_layers=c.decoder_layers
        )
        if c.position != "learned":  # the table size only matters for learned positions
            values.pop("max_seq_len")
        if c.position != "rope":
            values.pop("rope_theta")
        if c.position != "relative":
            values.pop("relative_buckets")
            values.pop("relative_max_distance")
        if c.family != "encoder_decoder":
            values.pop("n_decoder_layers")
        if c.mlp == "swiglu" and not c.head_transform:
            values.pop("gelu")
        return values

    a, b = effective(cfg), effective(other)
    return {k: (a.get(k), b.get(k)) for k in ARCHITECTURE_FIELDS if a.get(k) != b.get(k)}


def check_architecture(cfg: ModelConfig, folder: str | Path, vocabulary: bool = True) -> None:
    """Refuse a Hugging Face folder whose model is not the one `cfg` builds, naming the settings to change.
    vocabulary=False leaves vocab_size out (before the tokenizer has set it: a check before any work)."""
    raw = read_hf_config(folder)
    if "model_type" not in raw and {"model", "trainer"} <= raw.keys():  # llmtrain's own run config
        raise UnsupportedArchitecture(
            f"{folder} is a training run folder, not a Hugging Face model folder; export it first: "
            f"python scripts/export_hf.py {folder} OUT, then set model.init_from=OUT"
        )
    hf_cfg = model_config_from_hf(raw)
    if not vocabulary:
        cfg = replace(cfg, vocab_size=hf_cfg.vocab_size)
    differences = architecture_differences(cfg, hf_cfg)
    if differences:
        # name the settings to change: the primary ones, then any derived one they do not already fix
        primary = {k: theirs for k, (_, theirs) in differences.items() if k not in DERIVED_FIELDS}
        overrides = primary | {
            k: theirs for k, (_, theirs) in architecture_differences(replace(cfg, **primary), hf_cfg).items()
        }
        hint = ""
        if "vocab_size" in differences:
            hint = (
                f"; train with the folder's tokenizer: data.tokenizer.path={Path(folder) / 'tokenizer.json'}"
            )
        raise ModelConfigError(
            f"model.init_from={folder} holds another architecture; set "
            + " ".join(f"model.{k}={_override(v)}" for k, v in overrides.items())
            + " (now "
            + ", ".join(f"{k}={_override(differences[k][0])}" for k in overrides if k in differences)
            + ")"
            + hint
        )


def load_hf_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy the weights of a Hugging Face folder into model, whose config must have the same architecture."""
    cfg: ModelConfig = model.cfg
    check_architecture(cfg, folder)
    state = from_hf_state_dict(read_hf_weights(folder), cfg)
    with torch.no_grad():
        load_model_state(model, state)


def _override(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
