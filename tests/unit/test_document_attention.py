"""Document-aware attention in packed windows: a document attends as it would alone, for all three families."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmtrain.models import ModelConfig, build_model
from llmtrain.objectives import CausalLM, MaskedLM, SpanCorruption
from llmtrain.objectives.documents import document_ids

VOCAB, EOS, PAD, MASK = 256, 1, 0, 3
SENTINELS = [VOCAB - 1 - i for i in range(40)]


def model(family: str, position: str, seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(
        family=family, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, pad_token_id=PAD
    )
    torch.manual_seed(seed)
    return build_model(replace(cfg, position=position)).eval()


def doc(length: int, seed: int) -> torch.Tensor:
    """A document of `length` tokens whose last is EOS."""
    ids = torch.randint(4, VOCAB - 40, (length,), generator=torch.Generator().manual_seed(seed))
    ids[-1] = EOS
    return ids


def test_document_ids_by_hand():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 9, 9, 9, 9, 9, 9]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


@pytest.mark.parametrize("position", ["rope", "none"])
def test_decoder_packed_document_matches_it_alone(position):
    m = model("decoder", position)
    a, b = doc(9, 1), doc(14, 2)
    packed = torch.cat([a, b])[None]
    docs = document_ids(packed, EOS)
    with torch.no_grad():
        together = m(packed, document_ids=docs).logits[0]
        alone_a, alone_b = m(a[None]).logits[0], m(b[None]).logits[0]
        leaky = m(packed).logits[0]
    torch.testing.assert_close(together[:9], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[9:], alone_b, atol=1e-5, rtol=1e-5)
    assert (leaky[9:] - alone_b).abs().max() > 1e-3  # without the mask, b sees a


@pytest.mark.parametrize("position", ["rope", "none"])
def test_encoder_packed_documents_match_them_alone(position):
    m = model("encoder", position)
    a, b, c = doc(7, 3), doc(12, 4), doc(5, 5)
    packed = torch.cat([a, b, c])[None]
    with torch.no_grad():
        together = m(packed, document_ids=document_ids(packed, EOS)).logits[0]
        leaky = m(packed).logits[0]
        for start, d in ((0, a), (7, b), (19, c)):
            alone = m(d[None]).logits[0]
            torch.testing.assert_close(together[start : start + len(d)], alone, atol=1e-5, rtol=1e-5)
    assert (leaky[7:19] - m(b[None]).logits[0]).abs().max() > 1e-3


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_encoder_decoder_packed_documents_match_them_alone(position):
    """Encoder inputs and decoder targets of two documents, packed: the second document's logits equal those
    of a model that sees only its inputs and targets (its first decoder input is whatever token precedes)."""
    m = model("encoder_decoder", position)
    a_in, b_in = doc(10, 6), doc(13, 7)
    a_dec, b_dec = doc(6, 8), doc(8, 9)
    enc = torch.cat([a_in, b_in])[None]
    dec = torch.cat([a_dec, b_dec])[None]
    enc_docs = torch.tensor([[0] * 10 + [1] * 13])
    dec_docs = torch.tensor([[0] * 6 + [1] * 8])
    with torch.no_grad():
        together = m(enc, dec, document_ids=enc_docs, decoder_document_ids=dec_docs).logits[0]
        alone_a = m(a_in[None], a_dec[None]).logits[0]
        alone_b = m(b_in[None], b_dec[None]).logits[0]
        leaky = m(enc, dec).logits[0]
    torch.testing.assert_close(together[:6], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[6:], alone_b, atol=1e-5, rtol=1e-5)
    assert (leaky[6:] - alone_b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="decoder_document_ids"):
        m(enc, dec, document_ids=enc_docs)


def test_clm_and_mlm_emit_document_ids_only_when_asked():
    windows = torch.tensor([[5, 6, EOS, 7, 8, EOS, 9, 10, 11]])
    clm = CausalLM(8, document_eos_id=EOS)(windows)
    assert clm["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2]]  # of the inputs (the first 8)
    assert "document_ids" not in CausalLM(8)(windows)
    mlm = MaskedLM(9, VOCAB, MASK, [PAD, EOS, MASK], document_eos_id=EOS)(windows, torch.Generator())
    assert mlm["document_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]]  # from the uncorrupted window


def span_objective(inputs_length: int = 48, **kwargs) -> SpanCorruption:
    return SpanCorruption(inputs_length, SENTINELS, EOS, PAD, PAD, document_attention=True, **kwargs)


def test_span_corruption_documents_by_hand():
    """A span that crosses a document boundary belongs, with its sentinel, to the document it starts in."""
    objective = span_objective()
    tokens = torch.tensor([5, 6, EOS, 7, 8, 9, EOS, 10])
    noise = torch.tensor([False, False, True, True, False, False, False, True])
    documents = document_ids(tokens, EOS)
    inputs, targets, input_docs, target_docs = objective.corrupt(tokens, noise, documents)
    s0, s1 = SENTINELS[:2]
    assert inputs.tolist() == [5, 6, s0, 8, 9, EOS, s1, EOS]
    assert input_docs.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert targets.tolist() == [s0, EOS, 7, s1, 10, EOS]
    assert target_docs.tolist() == [0, 0, 0, 2, 2, 2]


def test_span_corruption_document_ids_are_consistent():
    objective = span_objective(64)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(4, VOCAB - 40, (64, objective.raw_length), generator=g)
    windows[torch.rand(windows.shape, generator=g) < 0.08] = EOS  # documents of ~12 tokens
    batch = objective(windows, torch.Generator().manual_seed(1))
    plain = SpanCorruption(64, SENTINELS, EOS, PAD, PAD)(windows, torch.Generator().manual_seed(1))
    for key in ("input_ids", "labels"):  # the same corruption, ids added
        assert torch.equal(batch[key], plain[key])
    enc, dec = batch["document_ids"], batch["decoder_document_ids"]
    # a document's decoder starts from the start token; elsewhere the targets shifted right
    first = torch.zeros_like(dec, dtype=torch.bool)
    first[:, 1:] = dec[:, 1:] != dec[:, :-1]
    assert first.any() and (batch["decoder_input_ids"][first] == PAD).all()  # PAD is the start token here
    assert torch.equal(batch["decoder_input_ids"][~first], plain["decoder_input_ids"][~first])
    assert enc.shape == batch["input_ids"].shape and dec.shape == batch["labels"].shape
    assert (enc.diff(dim=1) >= 0).all() and (dec.diff(dim=1) >= 0).all()
    raw_docs = document_ids(windows, EOS)
    sentinels = torch.tensor(SENTINELS)
    for row in range(len(windows)):
        inputs, labels = batch["input_ids"][row], batch["labels"][row]
        # each sentinel has the same document in the inputs and in the targets
        for s in sentinels[torch.isin(sentinels, labels)]:
            assert enc[row][inputs == s].item() == dec[row][labels == s].item()
        # every target's document has encoder tokens to attend to
        assert torch.isin(dec[row], enc[row]).all()
    for row in range(8):  # kept (non-noise) tokens keep their own document
        noise = objective.noise_mask(g)
        inputs, _, input_docs, _ = objective.corrupt(windows[row], noise, raw_docs[row])
        kept = ~torch.isin(inputs[:-1], sentinels)
        assert torch.equal(inputs[:-1][kept], windows[row][~noise])
        assert torch.equal(input_docs[:-1][kept], raw_docs[row][~noise])


def test_packed_span_corruption_keeps_documents_apart_end_to_end():
    """Changing one document's tokens changes no other document's logits: not through the encoder, and not
    through the decoder's shifted input (its first position once got the previous document's last target)."""
    objective = span_objective(48)
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(4, VOCAB - 40, (4, objective.raw_length), generator=g)
    windows[:, 20] = EOS  # document 0: positions 0-20, document 1: the rest
    changed = windows.clone()
    changed[:, :20] = torch.randint(4, VOCAB - 40, (4, 20), generator=g)
    m = model("encoder_decoder", "relative")
    batch, other = (objective(w, torch.Generator().manual_seed(4)) for w in (windows, changed))
    later = batch["decoder_document_ids"] > 0
    assert torch.equal(later, other["decoder_document_ids"] > 0) and later.any()
    with torch.no_grad():
        a, b = m(**batch).logits, m(**other).logits
    torch.testing.assert_close(a[later], b[later], atol=1e-5, rtol=1e-5)
    assert (a[~later] - b[~later]).abs().max() > 1e-3  # document 0 itself did change


def test_packed_span_corruption_batch_trains_without_nans():
    """Many short documents: no attention row is empty (which would give NaN), gradients are finite."""
    objective = span_objective(48)
    g = torch.Generator().manual_seed(2)
    windows = torch.randint(4, VOCAB - 40, (8, objective.raw_length), generator=g)
    windows[torch.rand(windows.shape, generator=g) < 0.3] = EOS
    m = model("encoder_decoder", "relative").train()
    out = m(**objective(windows, g))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_padded_span_corruption_pads_document_ids():
    """inputs_pad > 0 (no raw length maps exactly onto seq_len): ids are padded like the inputs."""
    objective = None
    for length in range(20, 80):
        candidate = span_objective(length, noise_density=0.5, mean_noise_span_length=1.0)
        if candidate.inputs_pad:
            objective = candidate
            break
    assert objective is not None
    windows = torch.randint(4, VOCAB - 40, (2, objective.raw_length), generator=torch.Generator())
    windows[:, 5] = EOS
    batch = objective(windows, torch.Generator().manual_seed(0))
    assert batch["document_ids"].shape == batch["input_ids"].shape
    m = model("encoder_decoder", "relative")
    assert torch.isfinite(m(**batch).loss)
    pad = objective.inputs_pad
    ids = batch["document_ids"]
    assert torch.equal(ids[:, -pad:], ids[:, -pad - 1 : -pad].expand(-1, pad))
