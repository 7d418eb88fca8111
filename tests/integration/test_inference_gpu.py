"""The same inference paths on a CUDA device (skipped without one): T5's float attention bias through SDPA
with gradients under bf16 autocast, KV-cached greedy decoding, int8 layers, CPU/GPU agreement, and the
speed of cached generation. Needs only torch (no Hydra), so it runs with `--noconftest` too."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch

from llmtrain.inference.generate import generate_seq2seq, sample
from llmtrain.inference.quantize import quantize_int8
from llmtrain.models import ModelConfig, build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
VOCAB = 512
T5 = dict(position="relative", attn_scale=1.0, mlp="geglu", tie_embeddings=False, relative_buckets=32)


@pytest.fixture(autouse=True)
def exact_fp32():
    """Comparisons in fp32 without TF32 matmuls."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cfg(family: str = "decoder", **overrides) -> ModelConfig:
    base = ModelConfig(family=family, vocab_size=VOCAB, d_model=256, n_layers=4, n_heads=8, max_seq_len=512)
    return replace(base, **overrides)


def sharp(c: ModelConfig, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(c, device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def ids(B: int, T: int, device: str) -> torch.Tensor:
    return torch.randint(5, VOCAB, (B, T), generator=torch.Generator().manual_seed(1)).to(device)


def test_t5_bias_trains_under_bf16_autocast_on_gpu():
    model = build_model(cfg("encoder_decoder", **T5), "cuda")
    x = ids(8, 128, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    for stack in (model.encoder, model.decoder):
        grad = stack.relative_bias.embed.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("family,overrides", [("decoder", {}), ("decoder", T5), ("encoder_decoder", T5)])
def test_gpu_logits_match_cpu(family, overrides):
    c = cfg(family, **overrides)
    torch.manual_seed(0)
    cpu = build_model(c).eval()  # at its init scale: sharpened weights amplify fp32 rounding across 8 blocks
    gpu = copy.deepcopy(cpu).cuda()  # the same weights (building on cuda would draw from the CUDA RNG)
    x = ids(2, 64, "cpu")
    with torch.no_grad():
        args = (x, x) if family == "encoder_decoder" else (x,)
        a = cpu(*args).logits
        b = gpu(*(t.cuda() for t in args)).logits.cpu()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, dict(T5, n_kv_heads=2)])
def test_gpu_cached_greedy_equals_uncached(overrides):
    model = sharp(cfg(**overrides), "cuda")
    prompt = ids(2, 16, "cuda")
    cached = sample(model, prompt, 64, temperature=0.0)
    assert torch.equal(cached, sample(model, prompt, 64, temperature=0.0, use_cache=False))
    seq2seq = sharp(cfg("encoder_decoder", **T5), "cuda")
    a = generate_seq2seq(seq2seq, prompt, 48)
    assert torch.equal(a, generate_seq2seq(seq2seq, prompt, 48, use_cache=False))


def test_gpu_int8_close_to_fp32():
    torch.manual_seed(0)
    model = build_model(cfg(), "cuda").eval()
    x = ids(2, 64, "cuda")
    with torch.no_grad():
        before = model(x).logits
        after = quantize_int8(model)(x).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_cached_generation_speed(capsys):
    """Tokens/s of 256 new tokens, batch 1, bf16 autocast: cached against uncached (reported, and the cache
    must be faster)."""
    model = build_model(cfg(d_model=1024, n_layers=12, n_heads=16, max_seq_len=1024), "cuda").eval()
    prompt = ids(1, 32, "cuda")
    rates = {}
    for use_cache in (True, False, True):  # the first cached run warms up
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sample(model, prompt, 256, temperature=0.0, use_cache=use_cache)
        torch.cuda.synchronize()
        rates[use_cache] = (out.shape[1] - 32) / (time.perf_counter() - start)
    with capsys.disabled():
        print(
            f"\n{torch.cuda.get_device_name()}: d1024 x 12 layers, 256 tokens, batch 1, bf16: "
            f"cached {rates[True]:.0f} tokens/s, uncached {rates[False]:.0f} tokens/s"
        )
    assert rates[True] > rates[False]
