"""Architecture presets (configs/model/{gpt2,llama,bert,t5}.yaml) and the block options they are built from:
post-norm, embedding norm, token types, relative position bias, exact/tanh GELU, GEGLU, head transform,
output bias, attention scale, head width. HF parity itself is in tests/parity/."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from llmtrain.config import to_dataclass, validate
from llmtrain.models import MODEL_CLASSES, ModelConfig, ModelConfigError, build_model, check_model_config
from llmtrain.models.build import count_parameters
from llmtrain.models.hf import UnsupportedArchitecture, hf_architecture
from llmtrain.models.positions import relative_position_bucket
from tests.conftest import compose_config

VOCAB = 96

# Published sizes (parameter counts of the HF classes at the published configs and vocabularies).
PUBLISHED = {
    "gpt2": (50257, 124_439_808),  # GPT-2 small
    "llama": (32000, 1_100_048_384),  # TinyLlama-1.1B (LLaMA 2 architecture)
    "bert": (30522, 109_514_298),  # bert-base-uncased with its MLM head
    "t5": (32128, 247_577_856),  # google/t5-v1_1-base
}


def preset(name: str) -> ModelConfig:
    cfg = to_dataclass(compose_config([f"model={name}", "run_name=x"]))
    validate(cfg)
    return cfg.model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_published_size_and_maps_to_its_hf_class(name):
    vocab, expected = PUBLISHED[name]
    cfg = replace(preset(name), vocab_size=vocab)
    assert hf_architecture(cfg) == name
    with torch.device("meta"):  # no memory, no init: only the shapes
        model = MODEL_CLASSES[cfg.family](cfg)
        model.tie_weights()
    assert count_parameters(model) == expected


def test_family_defaults_keep_their_modern_architecture():
    decoder = to_dataclass(compose_config(["model=decoder", "run_name=x"])).model
    assert (decoder.norm, decoder.mlp, decoder.position, decoder.norm_position) == (
        "rmsnorm",
        "swiglu",
        "rope",
        "pre",
    )
    assert hf_architecture(replace(decoder, vocab_size=VOCAB)) == "llama"  # a tied-head LLaMA


@pytest.mark.parametrize(
    "family,nearest,named",
    [("encoder", "bert", "model.norm_position"), ("encoder_decoder", "t5", "model.position")],
)
def test_unrepresentable_config_is_refused_with_nearest_preset(family, nearest, named):
    cfg = to_dataclass(compose_config([f"model={family}", "run_name=x"])).model
    with pytest.raises(UnsupportedArchitecture, match=rf"nearest preset is model={nearest} .*{named}"):
        hf_architecture(replace(cfg, vocab_size=VOCAB))


# --- the options ---------------------------------------------------------------------------------------------


def tiny(family: str = "decoder", **overrides) -> ModelConfig:
    base = ModelConfig(family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    return replace(base, **overrides)


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial norms and biases (they start at 1 and 0), so that every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_post_norm_block_is_norm_of_residual_sum():
    model = perturb(build_model(tiny(norm="layernorm", bias=True, norm_position="post")))
    block = model.decoder.layers[0]
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = block.attn_norm(x + block.attn(x))
        expected = block.mlp_norm(h + block.mlp(h))
        torch.testing.assert_close(block(x), expected)
    assert isinstance(model.decoder.norm, torch.nn.Identity)  # post-norm stacks end on a block's norm


def test_bert_embedding_adds_token_type_zero_then_normalises():
    cfg = tiny(
        "encoder", norm="layernorm", bias=True, position="learned", embedding_norm=True, n_token_types=2
    )
    model = perturb(build_model(cfg))
    stack, x = model.encoder, ids(1, 10)
    with torch.no_grad():
        emb = stack.embed(x) + stack.pos_embed.weight[:10] + stack.token_type_embed.weight[0]
        expected = stack.embed_norm(emb)
        seen = []
        handle = stack.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        stack(x)
        handle.remove()
    torch.testing.assert_close(seen[0], expected)


def test_head_transform_and_output_bias():
    cfg = tiny("encoder", head_transform=True, lm_head_bias=True, gelu="exact", norm="layernorm", bias=True)
    model = perturb(build_model(cfg))
    x = ids(2, 8)
    with torch.no_grad():
        h = model.encoder(x)
        t = model.head_transform
        expected = t.norm(torch.nn.functional.gelu(t.dense(h))) @ model.lm_head.weight.T + model.lm_head.bias
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_gelu_forms_differ_and_geglu_is_gated():
    base = perturb(build_model(tiny(mlp="gelu", gelu="tanh")))
    exact = build_model(tiny(mlp="gelu", gelu="exact")).eval()
    exact.load_state_dict(base.state_dict())
    x = ids(1, 12)
    with torch.no_grad():
        diff = (base(x).logits - exact(x).logits).abs().max().item()
    assert 0 < diff < 1e-2  # the tanh approximation is close to, but not, the erf form
    geglu = build_model(tiny(mlp="geglu")).decoder.layers[0].mlp
    assert geglu.gate_proj is not None and geglu.up_proj.out_features == tiny(mlp="geglu").ff_dim
    h = torch.randn(3, 32)
    with torch.no_grad():
        expected = geglu.down_proj(
            torch.nn.functional.gelu(geglu.gate_proj(h), approximate="tanh") * geglu.up_proj(h)
        )
        torch.testing.assert_close(geglu(h), expected)


def test_attn_scale_one_with_query_scaled_equals_default_scaling():
    scaled = perturb(build_model(tiny()))
    unscaled = build_model(tiny(attn_scale=1.0)).eval()
    state = dict(scaled.state_dict())
    for name in state:
        if name.endswith("q_proj.weight"):
            state[name] = state[name] / math.sqrt(8)  # head_dim 32 / 4
    unscaled.load_state_dict(state)
    x = ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(unscaled(x).logits, scaled(x).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(build_model(tiny(attn_scale=1.0)).eval()(x).logits, scaled(x).logits)


def test_unscaled_attention_folds_the_scale_into_query_init():
    torch.manual_seed(0)
    model = build_model(tiny(d_model=128, n_heads=2, attn_scale=1.0))  # head_dim 64
    q = torch.cat([layer.attn.q_proj.weight.flatten() for layer in model.decoder.layers])
    k = torch.cat([layer.attn.k_proj.weight.flatten() for layer in model.decoder.layers])
    assert q.std().item() == pytest.approx(0.02 / 8, rel=0.05)
    assert k.std().item() == pytest.approx(0.02, rel=0.05)


def test_d_head_sets_attention_width():
    model = build_model(tiny(d_head=6, n_heads=4, position="relative"))
    attn = model.decoder.layers[0].attn
    assert attn.q_proj.out_features == 24 and attn.o_proj.in_features == 24
    assert model(ids(1, 5)).logits.shape == (1, 5, VOCAB)


@pytest.mark.parametrize(
    "relative,bidirectional,bucket",
    # T5 defaults (32 buckets, max distance 128); relative = key position - query position
    [(3, True, 19), (-3, True, 3), (-8, True, 8), (-20, True, 10), (-200, True, 15), (200, True, 31),
     (5, False, 0), (-5, False, 5), (-20, False, 17), (-1000, False, 31)],
)  # fmt: skip
def test_relative_position_buckets_match_t5(relative, bidirectional, bucket):
    got = relative_position_bucket(torch.tensor([relative]), bidirectional, 32, 128)
    assert got.item() == bucket


def test_relative_bias_decoder_is_causal_and_pads_like_unpadded():
    model = perturb(build_model(tiny(position="relative", relative_buckets=8, relative_max_distance=16)))
    x = ids(1, 20, seed=3)
    changed = x.clone()
    changed[0, 12] = (x[0, 12] + 1 - 5) % (VOCAB - 5) + 5
    with torch.no_grad():
        a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    enc = perturb(
        build_model(tiny("encoder", position="relative", relative_buckets=8, relative_max_distance=16))
    )
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 11:] = False
    batch = torch.cat([x, changed])
    with torch.no_grad():
        padded = enc(batch, attention_mask=mask).logits
        alone = enc(changed[:, :11]).logits
    torch.testing.assert_close(padded[1:, :11], alone, rtol=1e-4, atol=1e-5)


def test_relative_bias_is_trained():
    model = build_model(tiny("encoder_decoder", position="relative", attn_scale=1.0, mlp="geglu"))
    x = ids(2, 12)
    out = model(x, x, labels=x)
    out.loss.backward()
    for stack in (model.encoder, model.decoder):
        assert stack.relative_bias.embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides,setting",
    [
        ({"norm_position": "sandwich"}, "model.norm_position"),
        ({"gelu": "fast"}, "model.gelu"),
        ({"mlp": "reglu"}, "model.mlp"),
        ({"d_head": 0}, "model.d_head"),
        ({"attn_scale": 0.0}, "model.attn_scale"),
        ({"n_token_types": -1}, "model.n_token_types"),
        ({"position": "relative", "relative_buckets": 2}, "model.relative_buckets"),
        (
            {"position": "relative", "relative_max_distance": 8, "relative_buckets": 32},
            "model.relative_max_distance",
        ),
        ({"norm_eps": 0.0}, "model.norm_eps"),
        ({"init_from": " "}, "model.init_from"),
    ],
)
def test_new_settings_are_checked_by_name(overrides, setting):
    with pytest.raises(ModelConfigError, match=setting.replace(".", r"\.")):
        check_model_config(tiny(**overrides))


def test_d_head_lifts_the_divisibility_rule():
    check_model_config(tiny(d_model=30, n_heads=4, d_head=8))
    with pytest.raises(ModelConfigError, match="model.n_heads"):
        check_model_config(tiny(d_model=30, n_heads=4))
