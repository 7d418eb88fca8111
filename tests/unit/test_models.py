"""Behaviour of the three model families and the block library they share (tiny models, CPU)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llmtrain.models import IGNORE_INDEX, ModelConfig, ModelConfigError, build_model, check_model_config
from llmtrain.models.blocks import RMSNorm
from llmtrain.models.build import count_parameters
from llmtrain.models.positions import Rotary

VOCAB = 256
FAMILIES = ("decoder", "encoder", "encoder_decoder")


def tiny_config(family: str = "decoder", **overrides) -> ModelConfig:
    cfg = ModelConfig(
        family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, pad_token_id=0
    )
    return replace(cfg, **overrides)


def tiny_model(family: str = "decoder", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(family, **overrides)).eval()


def random_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def run(model, family: str, ids: torch.Tensor, labels: torch.Tensor | None = None):
    """Forward any family on ids; the encoder-decoder decodes ids (shifted right) against ids."""
    if family == "encoder_decoder":
        decoder_input = F.pad(ids[:, :-1], (1, 0), value=model.cfg.decoder_start_token_id)
        return model(ids, decoder_input, labels=labels)
    return model(ids, labels=labels)


# --- initial loss and a tiny overfit ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_initial_loss_is_near_uniform(family):
    model = tiny_model(family)
    ids = random_ids(4, 32, seed=1)
    labels = random_ids(4, 32, seed=2)
    if family == "encoder":  # MLM: only ~15% of positions carry a label
        keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)) < 0.15
        labels = labels.masked_fill(~keep, IGNORE_INDEX)
    with torch.no_grad():
        out = run(model, family, ids, labels)
    assert out.n_targets == (labels != IGNORE_INDEX).sum()
    assert abs(out.loss.item() - math.log(VOCAB)) < 0.1 * math.log(VOCAB)


@pytest.mark.parametrize("family", FAMILIES)
def test_overfits_one_batch(family):
    model = tiny_model(family).train()
    ids = random_ids(4, 16, seed=4)
    labels = random_ids(4, 16, seed=5)
    if family == "encoder":
        labels[:, ::2] = IGNORE_INDEX
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = run(model, family, ids, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --- what each position may see ----------------------------------------------------------------------------


def test_decoder_is_causal():
    model = tiny_model("decoder")
    ids = random_ids(1, 16, seed=6)
    p = 9
    changed = ids.clone()
    changed[0, p] = (ids[0, p] % (VOCAB - 1)) + 1
    assert changed[0, p] != ids[0, p]
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :p], b[:, :p], rtol=0, atol=1e-5)
    for t in range(p, 16):
        assert not torch.allclose(a[:, t], b[:, t], atol=1e-4), f"position {t} ignores token {p}"


def test_encoder_every_token_reaches_every_position():
    model = tiny_model("encoder")
    ids = random_ids(1, 12, seed=7)
    with torch.no_grad():
        base = model(ids).logits
        for p in range(ids.shape[1]):
            changed = ids.clone()
            changed[0, p] = (ids[0, p] % (VOCAB - 1)) + 1
            diff = (model(changed).logits - base).abs().amax(dim=-1)[0]  # (T,)
            assert (diff > 1e-5).all(), f"changing token {p} leaves positions {torch.nonzero(diff <= 1e-5)}"


def test_encoder_decoder_visibility():
    model = tiny_model("encoder_decoder")
    src = random_ids(1, 12, seed=8)
    tgt = random_ids(1, 10, seed=9)
    src_late = src.clone()
    src_late[0, -1] = (src[0, -1] % (VOCAB - 1)) + 1
    with torch.no_grad():
        # encoder is bidirectional: the last input token reaches the first encoder output
        enc, enc_late = model.encode(src), model.encode(src_late)
        assert not torch.allclose(enc[:, 0], enc_late[:, 0], atol=1e-5)
        # cross-attention sees the whole input: the last encoder token reaches the first decoder position
        out, out_late = model(src, tgt).logits, model(src_late, tgt).logits
        assert not torch.allclose(out[:, 0], out_late[:, 0], atol=1e-5)
        # decoder is causal
        p = 6
        tgt_changed = tgt.clone()
        tgt_changed[0, p] = (tgt[0, p] % (VOCAB - 1)) + 1
        changed = model(src, tgt_changed).logits
    torch.testing.assert_close(out[:, :p], changed[:, :p], rtol=0, atol=1e-5)
    assert not torch.allclose(out[:, p:], changed[:, p:], atol=1e-4)
    assert all(not torch.allclose(out[:, t], changed[:, t], atol=1e-4) for t in range(p, 10))


# --- padding -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_right_padding_matches_unpadded(family):
    model = tiny_model(family)
    lengths = [10, 16, 7]
    T = max(lengths)
    ids = random_ids(len(lengths), T, seed=10)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    padded = ids.masked_fill(~mask, 0)
    with torch.no_grad():
        batched = model(padded, attention_mask=mask).logits
        assert torch.isfinite(batched).all()
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n]).logits
            torch.testing.assert_close(batched[row : row + 1, :n], alone, rtol=1e-4, atol=1e-5)
    if family == "encoder":  # the mask matters: without it the padding leaks into the shorter rows
        with torch.no_grad():
            unmasked = model(padded).logits
        assert not torch.allclose(unmasked[2, :7], batched[2, :7], atol=1e-4)


def test_encoder_decoder_input_padding_matches_unpadded():
    model = tiny_model("encoder_decoder")
    src = random_ids(2, 12, seed=11)
    tgt = random_ids(2, 6, seed=12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    with torch.no_grad():
        batched = model(src.masked_fill(~mask, 0), tgt, attention_mask=mask).logits
        alone = model(src[1:, :8], tgt[1:]).logits
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[1:], alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hugging_face_style_integer_masks_equal_bool_masks(family, precision):
    """attention_mask as 0/1 integers (Hugging Face's convention) means what the bool mask means, on every
    attention path (CPU bf16 takes the matmul one); a float mask is refused, not added as a bias."""
    model = tiny_model(family)
    ids = random_ids(2, 12, seed=13)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    extra = (random_ids(2, 6, seed=14),) if family == "encoder_decoder" else ()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        as_bool = model(ids, *extra, attention_mask=mask).logits
        as_long = model(ids, *extra, attention_mask=mask.long()).logits
        torch.testing.assert_close(as_long, as_bool, rtol=0, atol=0)
        with pytest.raises(ValueError, match="attention_mask must be bool or 0/1 integers"):
            model(ids, *extra, attention_mask=mask.float())
        if (
            family == "decoder"
        ):  # no padding, as integers: still causal (a later token changes no earlier logit)
            changed = ids.clone()
            changed[:, 8] = (changed[:, 8] + 1) % 64
            ones = torch.ones(2, 12, dtype=torch.long)
            before, after = model(ids, attention_mask=ones).logits, model(changed, attention_mask=ones).logits
            assert torch.equal(before[:, :8], after[:, :8])


# --- attention variants ---------------------------------------------------------------------------------------


def test_gqa_equals_full_attention_with_repeated_kv():
    gqa = tiny_model("decoder", n_heads=4, n_kv_heads=2)
    full = tiny_model("decoder", n_heads=4, seed=1)
    head_dim, group = gqa.cfg.head_dim, 4 // 2
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (n_kv*hd, d) -> (n_kv, hd, d) -> each kv head repeated for its group of query heads
            w = w.view(-1, head_dim, w.shape[-1]).repeat_interleave(group, dim=0).reshape(-1, w.shape[-1])
        state[name] = w
    full.load_state_dict(state)
    assert count_parameters(gqa) < count_parameters(full)
    ids = random_ids(2, 16, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids).logits, full(ids).logits, rtol=1e-4, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
    head_dim, T = 16, 40
    rotary = Rotary(head_dim, T, theta=10000.0)
    g = torch.Generator().manual_seed(14)
    q_vec, k_vec = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    # the same q and k vector at every position, so scores differ only through rotation
    q = q_vec.expand(1, 1, T, head_dim).contiguous()
    k = k_vec.expand(1, 1, T, head_dim).contiguous()
    q_rot, k_rot = rotary(q, k)
    scores = (q_rot @ k_rot.transpose(-1, -2))[0, 0]  # (T, T), scores[m, n] = <q at m, k at n>
    for m, n in [(5, 2), (3, 11), (0, 0), (7, 30)]:
        for offset in (1, 4, 9):
            torch.testing.assert_close(scores[m + offset, n + offset], scores[m, n], rtol=1e-4, atol=1e-4)
    # ...and they do depend on the distance, and rotation keeps norms
    assert not torch.allclose(scores[5, 2], scores[5, 3], atol=1e-3)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(15)) * 3
    expected = x / torch.sqrt((x**2).mean(dim=-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    out_bf16 = norm(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("position", ["learned", "rope", "none"])
@pytest.mark.parametrize("norm,mlp", [("rmsnorm", "swiglu"), ("layernorm", "gelu")])
def test_variants_build_and_run(family, position, norm, mlp):
    model = tiny_model(family, position=position, norm=norm, mlp=mlp, bias=norm == "layernorm")
    stack = model.encoder if family != "decoder" else model.decoder
    assert (stack.pos_embed is not None) == (position == "learned")
    assert (stack.rotary is not None) == (position == "rope")
    ids = random_ids(2, 12, seed=16)
    with torch.no_grad():
        logits = run(model, family, ids).logits
    assert logits.shape == (2, 12, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("position", ["learned", "rope", "none"])
def test_encoder_order_sensitivity_comes_from_positions(position):
    """Without positions a bidirectional encoder is permutation-equivariant; with them it is not."""
    model = tiny_model("encoder", position=position)
    ids = random_ids(1, 12, seed=17)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(18))
    with torch.no_grad():
        permuted_out = model(ids[:, perm]).logits
        out_permuted = model(ids).logits[:, perm]
    equivariant = torch.allclose(permuted_out, out_permuted, atol=1e-5)
    assert equivariant == (position == "none")


# --- build, tying, init ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tied_embeddings_share_storage(family):
    tied = tiny_model(family, tie_embeddings=True)
    untied = tiny_model(family, tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.token_embedding.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.token_embedding.weight.data_ptr()
    assert not torch.equal(untied.lm_head.weight, untied.token_embedding.weight)
    assert count_parameters(untied) - count_parameters(tied) == VOCAB * 32
    assert not any(p.is_meta for p in tied.parameters())
    if family == "encoder_decoder":  # one embedding for encoder, decoder and head
        assert tied.decoder.embed.weight.data_ptr() == tied.encoder.embed.weight.data_ptr()
    # an in-place update of one is seen by the other
    with torch.no_grad():
        tied.token_embedding.weight[3, 0] += 1.0
    assert tied.lm_head.weight[3, 0] == tied.token_embedding.weight[3, 0]


@pytest.mark.parametrize(
    "family,n_layers,n_decoder_layers", [("decoder", 8, None), ("encoder_decoder", 3, 5)]
)
def test_residual_projection_init_std(family, n_layers, n_decoder_layers):
    init_std = 0.02
    model = tiny_model(
        family, d_model=64, n_layers=n_layers, n_decoder_layers=n_decoder_layers, init_std=init_std
    )
    # decoder: 2 residual adds per block (GPT-2); encoder-decoder: counted over both stacks
    depth = n_layers + (n_decoder_layers or 0)
    residual_std = init_std / math.sqrt(2 * depth)
    residual, other = [], []
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            residual.append(p.flatten())
        elif name.endswith(("q_proj.weight", "up_proj.weight", "gate_proj.weight")):
            other.append(p.flatten())
    assert len(residual) == (2 * n_layers if family == "decoder" else 2 * n_layers + 3 * n_decoder_layers)
    residual_all, other_all = torch.cat(residual), torch.cat(other)
    assert residual_all.std().item() == pytest.approx(residual_std, rel=0.03)
    assert residual_all.mean().abs().item() < 0.1 * residual_std
    assert other_all.std().item() == pytest.approx(init_std, rel=0.03)
    assert model.token_embedding.weight.std().item() == pytest.approx(init_std, rel=0.03)
    # every single residual projection, not only the pooled ones, got the smaller std
    assert all(abs(r.std().item() - residual_std) < 0.15 * residual_std for r in residual)


def test_rope_tables_are_materialised_after_meta_build():
    model = tiny_model("decoder", position="rope")
    rotary = model.decoder.rotary
    fresh = Rotary(rotary.head_dim, rotary.max_seq_len, rotary.theta)
    torch.testing.assert_close(rotary.cos, fresh.cos)
    torch.testing.assert_close(rotary.sin, fresh.sin)


# --- config checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,setting",
    [
        ({"d_model": 30, "n_heads": 4}, "model.n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads"),
        ({"n_heads": 4, "n_kv_heads": 8}, "model.n_kv_heads"),
        ({"family": "gpt"}, "model.family"),
        ({"norm": "batchnorm"}, "model.norm"),
        ({"mlp": "relu"}, "model.mlp"),
        ({"position": "alibi"}, "model.position"),
        ({"d_model": 24, "n_heads": 8}, "model.position"),  # rope with an odd head dim of 3
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_check_model_config_names_the_setting(overrides, setting):
    cfg = tiny_config(**overrides)
    with pytest.raises(ModelConfigError, match=setting.replace(".", r"\.")):
        check_model_config(cfg)
    with pytest.raises(ModelConfigError):
        build_model(cfg)


def test_valid_configs_pass_and_vocab_is_required():
    for family in FAMILIES:
        check_model_config(tiny_config(family, n_kv_heads=2))
    assert issubclass(ModelConfigError, ValueError)
    with pytest.raises(ModelConfigError, match="vocab_size"):
        build_model(tiny_config(vocab_size=0))


# --- encoder head on labelled positions only ---------------------------------------------------------------------


def test_encoder_labels_select_positions_and_loss_matches_hand_cross_entropy():
    model = tiny_model("encoder")
    ids = random_ids(3, 16, seed=19)
    labels = torch.full_like(ids, IGNORE_INDEX)
    g = torch.Generator().manual_seed(20)
    selected = torch.rand(ids.shape, generator=g) < 0.25
    labels[selected] = random_ids(int(selected.sum()), seed=21)
    with torch.no_grad():
        full = model(ids).logits  # (B, T, V)
        out = model(ids, labels=labels)
    n = int(selected.sum())
    assert out.logits.shape == (n, VOCAB)
    assert out.n_targets.item() == n
    torch.testing.assert_close(out.logits, full[selected], rtol=1e-5, atol=1e-5)
    log_probs = full.float().log_softmax(dim=-1)
    by_hand = -log_probs[selected].gather(1, labels[selected][:, None]).mean()
    torch.testing.assert_close(out.loss, by_hand, rtol=1e-5, atol=1e-5)


def test_encoder_label_positions_from_the_objective_give_the_same_loss_and_gradients():
    """The MLM objective's label_positions (flat indices found on the CPU) replace the boolean selection the
    model would otherwise make on the device: same logits, loss and gradients."""
    from llmtrain.objectives import MaskedLM

    objective = MaskedLM(seq_len=16, vocab_size=VOCAB, mask_token_id=3, special_token_ids=[0, 1, 2, 3])
    batch = objective(random_ids(3, 16, seed=24), generator=torch.Generator().manual_seed(25))
    results = []
    for kwargs in ({}, {"label_positions": batch["label_positions"]}):
        model = tiny_model("encoder", seed=26)
        out = model(batch["input_ids"], labels=batch["labels"], **kwargs)
        out.loss.backward()
        results.append(
            (out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        )
    (logits, loss, grads), (logits_p, loss_p, grads_p) = results
    assert logits.shape[0] == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(logits_p, logits, rtol=0, atol=0)
    torch.testing.assert_close(loss_p, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_p[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # positions that skip a labelled token drop it from the loss: the positions are what the head reads
    fewer = model(batch["input_ids"], labels=batch["labels"], label_positions=batch["label_positions"][1:])
    assert fewer.n_targets.item() == logits.shape[0] - 1


def test_loss_ignores_unlabelled_positions_and_is_zero_without_labels():
    model = tiny_model("decoder")
    ids = random_ids(2, 8, seed=22)
    labels = random_ids(2, 8, seed=23)
    with torch.no_grad():
        logits = model(ids).logits
        half = labels.clone()
        half[:, 4:] = IGNORE_INDEX
        out = model(ids, labels=half)
        expected = F.cross_entropy(logits[:, :4].reshape(-1, VOCAB), labels[:, :4].reshape(-1))
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
        assert out.n_targets.item() == 8
        none = model(ids, labels=torch.full_like(labels, IGNORE_INDEX))
    assert none.loss.item() == 0.0 and none.n_targets.item() == 0


@pytest.mark.parametrize("kind", ["causal", "none", "bool", "bias", "bias_with_inf"])
def test_matmul_attention_equals_sdpa(kind):
    """The CPU bf16 path (matmuls + softmax) computes what scaled_dot_product_attention does, every mask kind."""
    from llmtrain.models.blocks import matmul_attention, use_matmul_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g) for _ in range(3))
    allowed = (torch.rand(2, 1, 16, 16, generator=g) > 0.3) | torch.eye(16, dtype=torch.bool)
    bias = torch.randn(1, 4, 16, 16, generator=g)
    mask = {"causal": None, "none": None, "bool": allowed, "bias": bias}.get(
        kind, bias.masked_fill(~allowed, float("-inf"))
    )
    causal = kind == "causal"
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(matmul_attention(q, k, v, mask, 0.0, causal, None), expected)
    if kind == "bool":  # a row that may attend to nothing: zeros, as SDPA gives
        empty = mask.clone()
        empty[0, 0, 3] = False
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=empty)
        torch.testing.assert_close(matmul_attention(q, k, v, empty, 0.0, False, None), reference)
        assert (matmul_attention(q, k, v, empty, 0.0, False, None)[0, :, 3] == 0).all()
    if kind == "causal":  # fewer queries than keys: SDPA's is_causal is the top-left triangle
        reference = F.scaled_dot_product_attention(q[:, :, :5], k, v, is_causal=True)
        torch.testing.assert_close(matmul_attention(q[:, :, :5], k, v, None, 0.0, True, None), reference)
    # gradients, the hand-written backward against autograd through SDPA (q, k, v and the float mask)
    grad_out = torch.randn(2, 4, 16, 8, generator=g)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    masks = [None if mask is None else mask.clone().requires_grad_(mask.is_floating_point()) for _ in "ab"]
    (
        F.scaled_dot_product_attention(*inputs, attn_mask=masks[0], is_causal=causal) * grad_out
    ).sum().backward()
    expected_grads = [t.grad for t in inputs] + ([masks[0].grad] if kind.startswith("bias") else [])
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    (matmul_attention(*inputs, masks[1], 0.0, causal, None) * grad_out).sum().backward()
    got_grads = [t.grad for t in inputs] + ([masks[1].grad] if kind.startswith("bias") else [])
    for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got_grad, expected_grad)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert use_matmul_attention(qb, kb) and not use_matmul_attention(q, k)
    got = matmul_attention(qb, kb, vb, mask, 0.0, causal, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_builtin(dtype, monkeypatch):
    """lm_loss's hand-written cross-entropy: the value and logits gradient of F.cross_entropy on the fp32
    logits, with ignored labels, over several row chunks (the last one short)."""
    from llmtrain.models import heads

    monkeypatch.setattr(heads, "loss_chunk_elements", lambda device: 3 * 50)  # 3 rows of 50 per chunk
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 50, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, 2] = labels[1, 6] = IGNORE_INDEX
    ours = logits.clone().requires_grad_()
    loss, n = heads.lm_loss(ours, labels)
    (loss * 3.0).backward()
    builtin = logits.clone().requires_grad_()
    expected = F.cross_entropy(builtin.float().reshape(-1, 50), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    (expected * 3.0).backward()
    assert n.item() == 12 and loss.dtype == torch.float32 and ours.grad.dtype == dtype
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(ours.grad, builtin.grad)
    assert (ours.grad[0, 2] == 0).all() and (ours.grad[1, 6] == 0).all()


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_a_sequence_past_the_position_table_is_refused_by_name(position):
    """Both tables say which setting they hold (the learned one raised a bare IndexError: a device-side assert
    on CUDA); a sequence that fits runs."""
    model = tiny_model("decoder", position=position, norm="layernorm", mlp="gelu", max_seq_len=16)
    model(random_ids(1, 16))
    with pytest.raises(
        ValueError, match=r"position 19 is past the \w+ (position )?table of model.max_seq_len=16"
    ):
        model(random_ids(1, 20))
