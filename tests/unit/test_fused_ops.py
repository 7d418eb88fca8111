"""The block library's hand-written forward/backward pairs against autograd through the plain formulas they
replace: fused projections, RMSNorm, the rotary split, the gated activation (the CPU matmul attention and the
chunked loss are checked in test_models.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.models.blocks import RMSNorm, _GatedActivation, _RMSNormFunction, fused_linear
from llmtrain.models.positions import Rotary


def saved_bytes(fn) -> list[torch.Tensor]:
    """The tensors autograd saves while fn() runs."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_linear_equals_separate_linears(bias, precision):
    torch.manual_seed(0)
    linears = tuple(nn.Linear(12, n, bias=bias) for n in (8, 4, 4))
    x = torch.randn(2, 5, 12, requires_grad=True)
    grad_out = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        got = fused_linear(x, linears)
    (got * grad_out).sum().backward()
    got_grads = [x.grad] + [p.grad for linear in linears for p in linear.parameters()]
    for t in [x] + [p for linear in linears for p in linear.parameters()]:
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        expected = torch.cat([linear(x) for linear in linears], dim=-1)
    (expected * grad_out).sum().backward()
    expected_grads = [x.grad] + [p.grad for linear in linears for p in linear.parameters()]
    assert got.dtype == expected.dtype
    tolerance = {} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(got, expected, **tolerance)
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, **tolerance)


def test_fused_linear_saves_the_weights_not_a_concatenated_copy():
    linears = tuple(nn.Linear(64, 64, bias=False) for _ in range(3))
    x = torch.randn(4, 64, requires_grad=True)
    saved = saved_bytes(lambda: fused_linear(x, linears))
    weights = {linear.weight.data_ptr() for linear in linears}
    assert {t.data_ptr() for t in saved} == weights | {x.data_ptr()}
    assert sum(t.numel() for t in saved) == x.numel() + 3 * 64 * 64


def reference_rmsnorm(x, weight, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_equals_autograd_of_the_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 7, 16) * 3).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 7, 16).to(dtype)
    (norm(x) * grad_out).sum().backward()
    got = x.grad, norm.weight.grad
    x.grad, norm.weight.grad = None, None
    (reference_rmsnorm(x, norm.weight, 1e-6) * grad_out).sum().backward()
    tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got[0], x.grad, **tolerance)
    torch.testing.assert_close(got[1], norm.weight.grad, rtol=1e-4, atol=1e-4)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32


def test_rmsnorm_gradcheck_and_what_it_saves():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6, torch.float64), (x, w))
    norm = RMSNorm(8)
    x32 = torch.randn(2, 3, 8, requires_grad=True)
    saved = saved_bytes(lambda: norm(x32))
    # x / rms (fp32), 1 / rms and the weight: not x itself
    assert sorted(t.numel() for t in saved) == [6, 8, 48] and x32.data_ptr() not in {
        t.data_ptr() for t in saved
    }


def test_rmsnorm_cast_output_writes_the_autocast_dtype():
    norm, plain = RMSNorm(8, cast_output=True), RMSNorm(8)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast, kept = norm(x), plain(x)
    assert cast.dtype == torch.bfloat16 and kept.dtype == torch.float32
    torch.testing.assert_close(cast, kept.bfloat16())
    assert norm(x).dtype == torch.float32  # no autocast: the input's dtype


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rotary_split_equals_split_then_rotate(n_heads, n_kv_heads, dtype):
    torch.manual_seed(0)
    rotary, hd, start = Rotary(8, 32, 10000.0), 8, 3
    qkv = torch.randn(2, 5, (n_heads + 2 * n_kv_heads) * hd).to(dtype).requires_grad_()
    q, k, v = rotary.split_rotate(qkv, n_heads, n_kv_heads, start)
    grads = [torch.randn_like(t) for t in (q, k, v)]
    sum((t * g).sum() for t, g in zip((q, k, v), grads)).backward()
    got_grad, qkv.grad = qkv.grad, None

    def heads(t, n):
        return t.unflatten(-1, (n, hd)).transpose(1, 2)

    q2, k2, v2 = qkv.split((n_heads * hd, n_kv_heads * hd, n_kv_heads * hd), dim=-1)
    q2, k2 = rotary(heads(q2, n_heads), heads(k2, n_kv_heads), start=start)
    v2 = heads(v2, n_kv_heads)
    sum((t * g).sum() for t, g in zip((q2, k2, v2), grads)).backward()
    # bf16: one rounding (addcmul) where the formula rounds the two products and their sum
    tolerance = {} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    for got, expected in zip((q, k, v, got_grad), (q2, k2, v2, qkv.grad), strict=True):
        torch.testing.assert_close(got, expected, **tolerance)
    assert all(t.is_contiguous() for t in (q, k, v))
    assert v.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr()  # v does not keep qkv alive
    with pytest.raises(ValueError, match="max_seq_len=32"):
        rotary.split_rotate(qkv, n_heads, n_kv_heads, start=30)


@pytest.mark.parametrize("activation", [("silu", "none"), ("gelu", "tanh"), ("gelu", "none")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_activation_equals_the_formula(activation, dtype):
    name, approximate = activation
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16).to(dtype).requires_grad_()
    grad_out = torch.randn(3, 5, 8).to(dtype)
    got = _GatedActivation.apply(h, name == "silu", approximate)
    (got * grad_out).sum().backward()
    got_grad, h.grad = h.grad, None
    gate, up = h.chunk(2, dim=-1)
    act = F.silu(gate) if name == "silu" else F.gelu(gate, approximate=approximate)
    expected = act * up
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, h.grad, rtol=0, atol=0)


@pytest.mark.parametrize("length", [128, 192, 256, 200])
def test_causal_block_attention_equals_sdpa(length):
    """The CPU causal path by query blocks (2 to 4; one plain block when the length does not divide):
    values and gradients of scaled_dot_product_attention with is_causal."""
    from llmtrain.models.blocks import matmul_attention

    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 16, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 16, generator=g, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = matmul_attention(*ours, None, 0.0, True, None)
    (out * grad_out).sum().backward()
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*reference, is_causal=True)
    (expected * grad_out).sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # rope, RMSNorm, SwiGLU
        {"mlp": "geglu", "position": "relative", "attn_scale": 1.0},  # T5 v1.1
        {"norm": "layernorm", "mlp": "gelu", "position": "learned", "bias": True},  # GPT-2
    ],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_block_compiles_to_one_graph(overrides, precision):
    """torch.compile traces each block whole (parallel.compile compiles per block): no hand-written op may
    break the graph (dynamo refuses, for one, `out=` into non-contiguous views)."""
    import torch._dynamo

    from llmtrain.models import ModelConfig, build_model

    family = "encoder_decoder" if overrides.get("position") == "relative" else "decoder"
    cfg = ModelConfig(
        family=family, vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=256, **overrides
    )
    model = build_model(cfg)
    stack = model.decoder
    block = stack.layers[0]
    x = torch.randn(2, 128, 32, requires_grad=True)  # 128 tokens: the CPU causal path by query blocks in bf16
    kwargs = {}
    if family == "encoder_decoder":
        kwargs = {
            "mask": stack.self_attention_mask(None, 128, None, x.device),
            "context": torch.randn(2, 128, 32),
        }
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        explanation = torch._dynamo.explain(block)(x, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("compiled", [False, True], ids=["chunked", "compiled"])
def test_ignored_rows_do_not_reach_the_loss_even_when_not_finite(compiled):
    """F.cross_entropy's value skips ignore_index rows; so does the chunked loss, and its gradient there is 0
    (the built-in's log-softmax backward gives NaN on a row of -inf). fp16 logits can overflow at padding."""
    from llmtrain.models.heads import IGNORE_INDEX, lm_loss

    logits = torch.randn(4, 10)
    logits[1] = float("-inf")
    logits[2, 3] = float("nan")
    labels = torch.tensor([2, IGNORE_INDEX, IGNORE_INDEX, 7])
    ours = logits.clone().requires_grad_()
    loss, n = lm_loss(ours, labels, compiled)
    loss.backward()
    builtin = logits.clone().requires_grad_()
    expected = F.cross_entropy(builtin, labels, ignore_index=IGNORE_INDEX)
    expected.backward()
    assert n.item() == 2 and torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours.grad[[0, 3]], builtin.grad[[0, 3]])
    assert (ours.grad[1:3] == 0).all()


def test_pre_norm_blocks_hand_matmuls_their_input_in_the_autocast_dtype():
    """Under autocast a pre-norm block's RMSNorms write bf16 (the linears read bf16, so no cast of their own);
    the residual stream and the final norm stay fp32."""
    from llmtrain.models import ModelConfig, build_model

    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16))
    block = model.decoder.layers[0]
    seen = {}
    block.attn_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("attn_norm", o.dtype))
    block.mlp_norm.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp_norm", o.dtype))
    model.decoder.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("final", o.dtype))
    block.register_forward_hook(lambda m, i, o: seen.__setitem__("residual", o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 64, (2, 16)))
    assert seen == {
        "attn_norm": torch.bfloat16,
        "mlp_norm": torch.bfloat16,
        "residual": torch.float32,
        "final": torch.float32,
    }


@pytest.mark.parametrize("length", [32, 256])  # one block; 4 causal query blocks
def test_bf16_cpu_attention_gradients_follow_float64(length):
    """The bf16 matmul path's gradients against float64 SDPA: within bf16's error."""
    from llmtrain.models.blocks import matmul_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, length, 16, generator=g, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(2, 3, length, 16, generator=g, dtype=torch.float64)
    exact = [t.clone().requires_grad_() for t in (q, k, v)]
    (F.scaled_dot_product_attention(*exact, is_causal=True) * grad_out).sum().backward()
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    (matmul_attention(*low, None, 0.0, True, None) * grad_out.bfloat16()).sum().backward()
    for a, b in zip(low, exact, strict=True):
        error = (a.grad.double() - b.grad).norm() / b.grad.norm()
        assert error < 0.02, error


def test_fused_linear_with_frozen_weights_gives_only_the_input_gradient():
    linears = tuple(nn.Linear(6, 4) for _ in range(2))
    for linear in linears:
        linear.requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    fused_linear(x, linears).sum().backward()
    expected = sum(linear.weight.sum(0) for linear in linears).expand(3, 6)
    torch.testing.assert_close(x.grad, expected)
    assert all(p.grad is None for linear in linears for p in linear.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_equals_the_chunked_one_and_the_builtin(dtype):
    """parallel.compile on CUDA computes the loss's two passes with generated kernels (one read of the
    logits each way): the same value and gradient as the eager chunks and as F.cross_entropy in fp32."""
    from llmtrain.models.heads import IGNORE_INDEX, lm_loss

    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 101)).to(dtype)
    labels = torch.randint(0, 101, (37,))
    labels[::5] = IGNORE_INDEX
    results = []
    for compiled in (False, True):
        x = logits.clone().requires_grad_()
        loss, n = lm_loss(x, labels, compiled)
        (2 * loss).backward()  # an incoming gradient other than 1
        results.append((loss, x.grad))
        assert x.grad.dtype == dtype and n.item() == (labels != IGNORE_INDEX).sum()
    reference = logits.float().requires_grad_()
    (2 * F.cross_entropy(reference, labels, ignore_index=IGNORE_INDEX)).backward()
    (chunked, chunked_grad), (fused, fused_grad) = results
    torch.testing.assert_close(fused, chunked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX))
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-4}
    torch.testing.assert_close(fused_grad.float(), chunked_grad.float(), **tol)
    torch.testing.assert_close(fused_grad.float(), reference.grad, **tol)
