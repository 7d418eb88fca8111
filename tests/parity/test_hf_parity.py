"""Each preset is the published architecture: a tiny Hugging Face model with random weights, copied into
llmtrain through the exporter's own name table (in reverse), gives the same logits (fp32, CPU); the
exported folder loads with `from_pretrained` and gives our logits; import -> export is exact."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from llmtrain.config import to_dataclass
from llmtrain.data.tokenizer import load_tokenizer, train_bpe
from llmtrain.inference import generate
from llmtrain.inference.export import export_hf
from llmtrain.models import ModelConfig, ModelConfigError, build_model
from llmtrain.models.hf import (
    HEAD_NAMES,
    HF_CLASSES,
    IGNORED,
    UnsupportedArchitecture,
    from_hf_state_dict,
    hf_architecture,
    load_model_state,
    model_config_from_hf,
    to_hf_state_dict,
    weight_rules,
)
from tests.conftest import compose_config, synthetic_documents

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 320  # >= the test tokenizer's vocabulary


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread than on two contended CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOL = {"rtol": 1e-4, "atol": 1e-4}


def hf_variants() -> dict[str, nn.Module]:
    t = transformers
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    gpt2 = dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    llama = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    bert = dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    t5 = dict(
        vocab_size=V, d_model=32, d_kv=6, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, tie_word_embeddings=False,
        dropout_rate=0.0,
    )  # fmt: skip
    return {
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(**gpt2, **no_dropout)),
        "gpt2-exact-unscaled-untied": lambda: t.GPT2LMHeadModel(
            t.GPT2Config(
                **gpt2,
                **no_dropout,
                activation_function="gelu",
                scale_attn_weights=False,
                tie_word_embeddings=False,
            )
        ),
        "llama": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(**llama, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)
        ),
        "llama-tied-geglu-bias-headdim": lambda: t.LlamaForCausalLM(
            t.LlamaConfig(
                **llama,
                num_key_value_heads=1,
                head_dim=12,
                hidden_act="gelu_pytorch_tanh",
                tie_word_embeddings=True,
                attention_bias=True,
                mlp_bias=True,
                max_position_embeddings=64,
            )
        ),  # fmt: skip
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(**bert)),
        # untied: transformers 5's forward reads cls.predictions.decoder.bias, not cls.predictions.bias
        "bert-untied": lambda: t.BertForMaskedLM(t.BertConfig(**bert, tie_word_embeddings=False)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(**t5, feed_forward_proj="gated-gelu")),
        "t5-gated-silu": lambda: t.T5ForConditionalGeneration(
            t.T5Config(**t5, feed_forward_proj="gated-silu")
        ),
    }


VARIANTS = list(hf_variants())


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random everything, norms and biases included (they start at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def make_hf(variant: str) -> nn.Module:
    torch.manual_seed(0)
    hf = hf_variants()[variant]()
    if hasattr(hf, "shared") and hf.lm_head.weight is hf.shared.weight:  # transformers 5 ties T5 at init
        hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())
    return perturb(hf)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (2, 40) (longer than T5's max distance 20: log buckets are used), a right-padding mask, and
    decoder ids (2, 25)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    return ids, mask, torch.randint(5, V, (2, 25), generator=g)


def logits_of(model: nn.Module, is_hf: bool, family: str, ids, mask=None, decoder_ids=None) -> torch.Tensor:
    with torch.no_grad():
        if family == "encoder_decoder":
            if is_hf:
                return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
            return model(ids, decoder_ids, attention_mask=None if mask is None else mask.bool()).logits
        if is_hf:
            return model(input_ids=ids, attention_mask=mask).logits
        return model(ids, attention_mask=None if mask is None else mask.bool()).logits


def assert_same_logits(hf: nn.Module, ours: nn.Module, family: str) -> None:
    ids, mask, decoder_ids = inputs()
    torch.testing.assert_close(
        logits_of(ours, False, family, ids, None, decoder_ids),
        logits_of(hf, True, family, ids, None, decoder_ids),
        **TOL,
    )
    padded_ours = logits_of(ours, False, family, ids, mask, decoder_ids)
    padded_hf = logits_of(hf, True, family, ids, mask, decoder_ids)
    if family == "encoder_decoder":  # the decoder attends to the real encoder tokens only
        torch.testing.assert_close(padded_ours, padded_hf, **TOL)
    else:  # compare the real positions
        torch.testing.assert_close(padded_ours[0], padded_hf[0], **TOL)
        torch.testing.assert_close(padded_ours[1, :25], padded_hf[1, :25], **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_weights_in_llmtrain_give_hf_logits(variant):
    hf = make_hf(variant)
    cfg = model_config_from_hf(hf.config.to_dict())
    assert hf_architecture(cfg) == variant.split("-")[0]
    ours = build_model(cfg).eval()
    load_model_state(ours, from_hf_state_dict(hf.state_dict(), cfg))
    assert_same_logits(hf, ours, cfg.family)


def test_bert_head_bias_saved_under_one_name_imports():
    """transformers 4 saves one of BERT's two head-bias names (the other is its tied alias): either is read."""
    hf = make_hf("bert-untied")
    cfg = model_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    state["cls.predictions.bias"] = state.pop("cls.predictions.decoder.bias")  # the bias HF's forward reads
    ours = build_model(cfg).eval()
    load_model_state(ours, from_hf_state_dict(state, cfg))
    assert_same_logits(hf, ours, cfg.family)


@pytest.mark.parametrize("variant", ["gpt2", "llama-tied-geglu-bias-headdim", "bert"])
def test_hub_spellings_import(variant):
    """Hub checkpoints spell names as transformers still loads them: openai-community/gpt2 was saved from
    GPT2Model (`wte.weight`, `h.0.attn.c_attn.weight`: no `transformer.`), bert-base-uncased keeps TF's
    LayerNorm `gamma` / `beta`. Either imports to the same logits."""
    hf = make_hf(variant)
    cfg = model_config_from_hf(hf.config.to_dict())
    if variant == "bert":
        state = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k): v for k, v in hf.state_dict().items()}
        state = {re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k): v for k, v in state.items()}
        assert sum(k.endswith(".gamma") for k in state) == 2 * cfg.n_layers + 2
    else:  # the base model alone (a tied head has nothing of its own)
        state = dict(hf.base_model.state_dict())
        assert not any(k.startswith(("transformer.", "model.")) for k in state)
    ours = build_model(cfg).eval()
    load_model_state(ours, from_hf_state_dict(state, cfg))
    assert_same_logits(hf, ours, cfg.family)


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_then_export_round_trips_tensors_exactly(variant):
    hf = make_hf(variant)
    cfg = model_config_from_hf(hf.config.to_dict())
    theirs = hf.state_dict()
    ours = build_model(cfg)
    load_model_state(ours, from_hf_state_dict(theirs, cfg))
    back = to_hf_state_dict(ours.state_dict(), cfg)
    aliases = {rule.hf for rule in weight_rules(cfg) if rule.export_only}  # written as the tensor HF reads
    for name, tensor in back.items():
        assert name in aliases or torch.equal(tensor, theirs[name]), name
    arch = hf_architecture(cfg)
    left = {k for k in theirs if k not in back and not re.fullmatch(IGNORED[arch], k)}
    assert left <= {HEAD_NAMES.get(arch)} and (not left or cfg.tie_embeddings)  # only a tied head's alias


def test_foreign_tensor_is_refused():
    hf = make_hf("llama")
    cfg = model_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    with pytest.raises(KeyError, match="no place for"):
        from_hf_state_dict(state, cfg)
    del state["model.layers.0.self_attn.q_norm.weight"], state["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        from_hf_state_dict(state, cfg)


@pytest.mark.parametrize("proj", ["silu", "relu", "gated-relu"])
def test_a_t5_mlp_llmtrain_has_not_is_refused(proj):
    """llmtrain's T5 MLPs are GELU, GeGLU and SwiGLU. A plain SiLU MLP (feed_forward_proj="silu") was read as
    a tanh-GELU one: the weights fit, and the logits were off by ~4."""
    import transformers as t

    shape = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, tie_word_embeddings=False)
    config = t.T5Config(**shape, feed_forward_proj=proj).to_dict()
    with pytest.raises(UnsupportedArchitecture, match=f"feed_forward_proj='{proj}'"):
        model_config_from_hf(config)
    assert model_config_from_hf(t.T5Config(**shape, feed_forward_proj="gated-silu").to_dict()).mlp == "swiglu"


# --- export of llmtrain presets ----------------------------------------------------------------------------

TINY = {
    "gpt2": ["model.n_heads=4"],
    "llama": ["model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64"],
    "bert": ["model.n_heads=4", "model.d_ff=64"],
    "t5": [
        "model.n_heads=4",
        "model.n_decoder_layers=3",
        "model.d_ff=64",
        "model.relative_buckets=8",
        "model.relative_max_distance=20",
    ],  # fmt: skip
    "decoder": ["model.n_heads=4"],  # the family default: a tied-head LLaMA
}


def tiny_preset(name: str) -> ModelConfig:
    overrides = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.max_seq_len=64",
        "data.seq_len=32",
        "run_name=x",
    ]
    cfg = to_dataclass(compose_config([f"model={name}", *overrides, *TINY[name]]))
    return replace(cfg.model, vocab_size=V)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(synthetic_documents(40), 300, n_sentinels=10).save(path)
    return path


@pytest.mark.parametrize("name", list(TINY))
def test_exported_preset_loads_with_from_pretrained(name, tmp_path, tokenizer_path, monkeypatch):
    cfg = tiny_preset(name)
    torch.manual_seed(0)
    model = perturb(build_model(cfg))
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", tokenizer_path)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}

    hf = getattr(transformers, HF_CLASSES[hf_architecture(cfg)]).from_pretrained(out).eval()
    assert_same_logits(hf, model, cfg.family)

    text = "the red cat <extra_id_0> sees the <mask> dog."
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours_tok = load_tokenizer(tokenizer_path)
    ids = ours_tok.encode(text)
    if cfg.family == "encoder_decoder":
        # T5's inputs end with EOS (span corruption's, fill_spans'), as Hugging Face's T5 tokenizer ends them
        assert hf_tok(text)["input_ids"] == ids + [2]
        assert hf_tok(text, "the dog.")["input_ids"] == ids + [2] + ours_tok.encode("the dog.") + [2]
        fed = []  # the encoder inputs fill_spans makes
        monkeypatch.setattr(generate, "generate_seq2seq", lambda model, ids, *a, **k: fed.append(ids) or ids)
        prompt = "the red cat<extra_id_0> sees the dog."
        generate.fill_spans(model, ours_tok, prompt)
        assert hf_tok(prompt)["input_ids"] == fed[0][0].tolist()
    else:  # a decoder's prompt and an MLM window have no marker tokens added: the run's tokenizer as it is
        assert hf_tok(text)["input_ids"] == ids
        assert (out / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    assert load_tokenizer(out / "tokenizer.json").encode(text) == ids  # llmtrain reads either the same
    # and takes it for the run's tokenizer: a run continued from the export reuses the run's shards and cache
    assert load_tokenizer(out / "tokenizer.json").digest() == ours_tok.digest()
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.mask_token_id) == (0, 2, 4)

    # model.init_from reads it back exactly
    again = build_model(replace(cfg, init_from=str(out)))
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_init_from_with_another_architecture_names_the_settings(tmp_path, tokenizer_path):
    cfg = tiny_preset("gpt2")
    export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf", tokenizer_path)
    wrong = replace(cfg, d_model=64, vocab_size=400, init_from=str(tmp_path / "hf"))
    with pytest.raises(
        ModelConfigError, match=r"set model\.vocab_size=320 model\.d_model=32 .*tokenizer\.path="
    ):
        build_model(wrong)


def test_unrepresentable_model_is_refused_before_writing(tmp_path, tokenizer_path):
    cfg = replace(tiny_preset("gpt2"), norm_position="post")
    with pytest.raises(ModelConfigError, match=r"nearest preset is model=gpt2 .*model\.norm_position='post'"):
        export_hf(build_model(cfg).state_dict(), cfg, tmp_path / "hf", tokenizer_path)
    assert not (tmp_path / "hf").exists()
