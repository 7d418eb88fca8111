"""The three objectives: token windows -> model inputs and labels (CLM, BERT MLM, T5 span corruption)."""

from __future__ import annotations

import pytest
import torch

from llmtrain.models import IGNORE_INDEX, ModelConfig, build_model
from llmtrain.objectives import CausalLM, MaskedLM, SpanCorruption, compute_input_and_target_lengths

# --- causal LM -------------------------------------------------------------------------------------------------


def test_clm_shifts_by_one():
    objective = CausalLM(seq_len=8)
    assert objective.raw_length == 9 and objective.target_length == 8
    windows = torch.arange(2 * 9).view(2, 9)
    batch = objective(windows)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 8)
    torch.testing.assert_close(batch["input_ids"], windows[:, :8])
    torch.testing.assert_close(batch["labels"], windows[:, 1:])
    # the label at t is the input at t + 1
    torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])


# --- masked LM -------------------------------------------------------------------------------------------------

MLM_VOCAB = 300
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = [PAD, CLS, SEP, MASK]


def mlm_sample(objective: MaskedLM, rows: int = 200, cols: int = 1000, seed: int = 0):
    """200k tokens drawn over the whole vocabulary, special tokens included."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, MLM_VOCAB, (rows, cols), generator=g)
    batch = objective(windows, generator=torch.Generator().manual_seed(seed + 1))
    return windows, batch["input_ids"], batch["labels"]


def mlm_split(windows, input_ids, labels):
    selected = labels != IGNORE_INDEX
    masked = selected & (input_ids == MASK)  # [MASK] never occurs at a selectable position otherwise
    unchanged = selected & (input_ids == windows)
    randomised = selected & ~masked & ~unchanged
    return selected, masked, randomised, unchanged


@pytest.mark.parametrize("select_rate,mask_rate,random_rate", [(0.15, 0.8, 0.1), (0.3, 0.5, 0.3)])
def test_mlm_rates(select_rate, mask_rate, random_rate):
    objective = MaskedLM(
        seq_len=1000,
        vocab_size=MLM_VOCAB,
        mask_token_id=MASK,
        special_token_ids=SPECIAL,
        select_rate=select_rate,
        mask_rate=mask_rate,
        random_rate=random_rate,
    )
    windows, input_ids, labels = mlm_sample(objective)
    selected, masked, randomised, unchanged = mlm_split(windows, input_ids, labels)
    selectable = ~torch.isin(windows, torch.tensor(SPECIAL))
    n_selected = selected.sum().item()
    assert abs(n_selected / selectable.sum().item() - select_rate) < 0.01
    # a random replacement equals the original with probability 1 / (ordinary tokens): count it as unchanged
    coincide = 1 / (MLM_VOCAB - len(SPECIAL))
    keep_rate = 1 - mask_rate - random_rate
    assert abs(masked.sum().item() / n_selected - mask_rate) < 0.02
    assert abs(randomised.sum().item() / n_selected - random_rate * (1 - coincide)) < 0.02
    assert abs(unchanged.sum().item() / n_selected - (keep_rate + random_rate * coincide)) < 0.02


def test_mlm_labels_and_special_tokens():
    objective = MaskedLM(seq_len=1000, vocab_size=MLM_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL)
    windows, input_ids, labels = mlm_sample(objective, seed=5)
    selected, masked, randomised, _ = mlm_split(windows, input_ids, labels)
    special = torch.isin(windows, torch.tensor(SPECIAL))
    assert special.sum() > 2000  # the sample does contain special tokens
    # labels: the original token where selected, -100 everywhere else
    torch.testing.assert_close(labels[selected], windows[selected])
    assert (labels[~selected] == IGNORE_INDEX).all()
    # special tokens are never selected and pass through untouched
    assert not (selected & special).any()
    torch.testing.assert_close(input_ids[special], windows[special])
    # positions not selected are untouched
    torch.testing.assert_close(input_ids[~selected], windows[~selected])
    # random replacements are ordinary tokens, spread over the ordinary vocabulary
    replacements = input_ids[randomised]
    assert not torch.isin(replacements, torch.tensor(SPECIAL)).any()
    assert not torch.isin(input_ids[selected & ~masked], torch.tensor(SPECIAL)).any()
    assert replacements.min() >= len(SPECIAL) and replacements.max() < MLM_VOCAB
    assert replacements.unique().numel() > 0.95 * (MLM_VOCAB - len(SPECIAL))


def test_mlm_label_positions_are_the_flat_labelled_positions():
    objective = MaskedLM(seq_len=300, vocab_size=MLM_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL)
    windows = torch.randint(0, MLM_VOCAB, (7, 300), generator=torch.Generator().manual_seed(8))
    batch = objective(windows, generator=torch.Generator().manual_seed(9))
    positions = batch["label_positions"]
    assert positions.dtype == torch.long
    expected = [i for i, label in enumerate(batch["labels"].reshape(-1).tolist()) if label != IGNORE_INDEX]
    assert positions.tolist() == expected and len(expected) > 0


def test_mlm_is_reproducible_with_a_generator():
    objective = MaskedLM(seq_len=64, vocab_size=MLM_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL)
    windows = torch.randint(4, MLM_VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    a = objective(windows, generator=torch.Generator().manual_seed(7))
    b = objective(windows, generator=torch.Generator().manual_seed(7))
    c = objective(windows, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    assert torch.equal(
        windows, torch.randint(4, MLM_VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    )


def test_mlm_all_mask_and_special_ids_outside_vocab():
    objective = MaskedLM(
        seq_len=500,
        vocab_size=MLM_VOCAB,
        mask_token_id=MASK,
        special_token_ids=[*SPECIAL, MLM_VOCAB + 5],  # an id past the vocabulary is ignored, not an error
        mask_rate=1.0,
        random_rate=0.0,
    )
    windows, input_ids, labels = mlm_sample(objective, rows=20, cols=500)
    selected = labels != IGNORE_INDEX
    assert selected.any()
    assert (input_ids[selected] == MASK).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"select_rate": 0.0},
        {"select_rate": 1.0},
        {"select_rate": -0.1},
        {"mask_rate": 0.9, "random_rate": 0.2},
        {"mask_rate": -0.1},
        {"random_rate": -0.1},
    ],
)
def test_mlm_rejects_bad_rates(kwargs):
    with pytest.raises(ValueError):
        MaskedLM(seq_len=8, vocab_size=MLM_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL, **kwargs)


# --- span corruption --------------------------------------------------------------------------------------------

SC_VOCAB = 400
SC_PAD, SC_EOS = 0, 1
SENTINELS = [SC_VOCAB - 1 - i for i in range(100)]  # <extra_id_0> = 399, <extra_id_1> = 398, ... (as T5)
ORDINARY = (2, SC_VOCAB - 100)


def hf_compute_input_and_target_lengths(inputs_length, noise_density, mean_noise_span_length):
    """An independent copy of HF run_t5_mlm_flax's compute_input_and_target_lengths."""

    def _tokens_length_to_inputs_length_targets_length(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length
    while _tokens_length_to_inputs_length_targets_length(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = _tokens_length_to_inputs_length_targets_length(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def test_span_lengths_published_figure():
    assert compute_input_and_target_lengths(512, 0.15, 3) == (568, 114)


@pytest.mark.parametrize(
    "inputs_length,density,mean_span",
    [
        (64, 0.15, 3),
        (128, 0.15, 3),
        (256, 0.15, 3),
        (1024, 0.15, 3),
        (512, 0.3, 3),
        (512, 0.15, 5),
        (100, 0.3, 2),
    ]
    + [(512, 0.5, 3), (27, 0.5, 3), (2048, 0.15, 3)],
)
def test_span_lengths_match_hf(inputs_length, density, mean_span):
    assert compute_input_and_target_lengths(inputs_length, density, mean_span) == (
        hf_compute_input_and_target_lengths(inputs_length, density, mean_span)
    )


def span_objective(inputs_length: int = 512, **kwargs) -> SpanCorruption:
    return SpanCorruption(
        inputs_length=inputs_length,
        sentinel_ids=SENTINELS,
        eos_token_id=SC_EOS,
        decoder_start_token_id=SC_PAD,
        pad_token_id=SC_PAD,
        **kwargs,
    )


def span_windows(objective: SpanCorruption, rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(*ORDINARY, (rows, objective.raw_length), generator=g)


def reassemble(inputs: list[int], targets: list[int]) -> tuple[list[int], list[bool], list[int], list[int]]:
    """Undo span corruption: (tokens, noise mask, sentinels in the inputs, sentinels in the targets)."""
    sentinel_set = set(SENTINELS)
    assert inputs[-1] == SC_EOS and targets[-1] == SC_EOS
    assert SC_EOS not in inputs[:-1] and SC_EOS not in targets[:-1]
    assert targets[0] in sentinel_set
    spans: dict[int, list[int]] = {}
    target_sentinels = []
    for token in targets[:-1]:
        if token in sentinel_set:
            target_sentinels.append(token)
            spans[token] = []
        else:
            spans[target_sentinels[-1]].append(token)
    tokens, noise, input_sentinels = [], [], []
    for token in inputs[:-1]:
        if token in sentinel_set:
            input_sentinels.append(token)
            assert spans[token], "every span holds at least one token"
            tokens += spans[token]
            noise += [True] * len(spans[token])
        else:
            tokens.append(token)
            noise.append(False)
    return tokens, noise, input_sentinels, target_sentinels


def test_validation_knows_the_lengths_the_objective_makes():
    """validate() refuses a short objective.targets_length and too few sentinels from `span_windows`; it must
    agree with what SpanCorruption itself makes of a window, density 0.5 included (where the search's target
    estimate is one longer than the window's own)."""
    from types import SimpleNamespace

    from llmtrain.objectives.span_corruption import span_windows

    for seq_len in (8, 31, 48, 64, 129, 512):
        for density, mean_span in ((0.15, 3.0), (0.5, 1.0), (0.5, 3.0), (0.3, 2.0)):
            cfg = SimpleNamespace(
                data=SimpleNamespace(seq_len=seq_len),
                objective=SimpleNamespace(noise_density=density, mean_noise_span_length=mean_span),
            )
            raw, targets, spans = span_windows(cfg)
            objective = SpanCorruption(seq_len, list(range(5, 5 + spans)), 2, 0, 0, density, mean_span)
            assert (raw, targets, spans) == (
                objective.raw_length,
                objective.target_length,
                objective.num_noise_spans,
            )


def test_span_corruption_shapes_and_round_trip():
    objective = span_objective(512)
    assert objective.raw_length == 568 and objective.target_length == 114
    windows = span_windows(objective, rows=8)
    batch = objective(windows, generator=torch.Generator().manual_seed(1))
    assert batch["input_ids"].shape == (8, 512)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (8, 114)
    assert "attention_mask" not in batch  # 568 raw tokens fill the 512 inputs exactly
    for row in range(8):
        tokens, noise, input_sentinels, target_sentinels = reassemble(
            batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        )
        assert tokens == windows[row].tolist()
        # sentinels in order <extra_id_0>, <extra_id_1>, ... in both inputs and targets
        assert input_sentinels == target_sentinels == SENTINELS[: len(input_sentinels)]
        assert len(input_sentinels) == objective.num_noise_spans
        assert sum(noise) == objective.num_noise_tokens
        assert not noise[0]  # as T5, a window starts with a non-noise span


def test_span_corruption_noise_statistics():
    objective = span_objective(128)
    windows = span_windows(objective, rows=200, seed=2)
    batch = objective(windows, generator=torch.Generator().manual_seed(3))
    masks, span_lengths = [], []
    for inputs, targets in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        _, noise, _, _ = reassemble(inputs, targets)
        masks.append(noise)
        run = 0
        for is_noise in [*noise, False]:
            if is_noise:
                run += 1
            elif run:
                span_lengths.append(run)
                run = 0
    noise = torch.tensor(masks, dtype=torch.float)  # (windows, raw_length)
    assert abs(noise.mean().item() - 0.15) < 0.01
    spans = torch.tensor(span_lengths, dtype=torch.float)
    assert abs(spans.mean().item() - 3.0) < 0.2
    assert spans.min() >= 1 and len(spans.unique()) > 3  # span lengths vary
    # as T5: a window starts with a non-noise span and ends with a noise span...
    assert (noise[:, 0] == 0).all() and (noise[:, -1] == 1).all()
    # ...and in between, noise lands all over the window, not in a fixed place
    interior = noise[:, 1:-12]
    half = interior.shape[1] // 2
    assert abs(interior[:, :half].mean().item() - interior[:, half:].mean().item()) < 0.03
    assert (noise.mean(dim=0)[1:] > 0).all()


def test_span_corruption_decoder_inputs_are_shifted_labels():
    objective = span_objective(64, targets_length=24)
    windows = span_windows(objective, rows=4, seed=4)
    batch = objective(windows, generator=torch.Generator().manual_seed(5))
    labels, decoder_input_ids = batch["labels"], batch["decoder_input_ids"]
    assert labels.shape == decoder_input_ids.shape == (4, 24)
    assert (decoder_input_ids[:, 0] == SC_PAD).all()  # the start token (T5: pad)
    previous = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, SC_PAD)
    torch.testing.assert_close(decoder_input_ids[:, 1:], previous)
    # targets shorter than 24 are padded with -100 after EOS
    n_real = 24 - objective.targets_pad
    assert objective.targets_pad > 0
    assert (labels[:, n_real - 1] == SC_EOS).all()
    assert (labels[:, n_real:] == IGNORE_INDEX).all()


def test_span_corruption_pads_inputs_when_no_window_fits_exactly():
    objective = span_objective(27, noise_density=0.5)  # T5's density-0.5 rule shortens the window by one
    windows = span_windows(objective, rows=3, seed=6)
    batch = objective(windows, generator=torch.Generator().manual_seed(7))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 27)
    assert (batch["input_ids"][:, -1] == SC_PAD).all() and not batch["attention_mask"][:, -1].any()
    assert batch["attention_mask"][:, :-1].all()
    for row in range(3):
        tokens, *_ = reassemble(batch["input_ids"][row, :-1].tolist(), batch["labels"][row].tolist())
        assert tokens == windows[row].tolist()


def test_span_corruption_mean_span_one_keeps_eos():
    """Mean span 1 needs a sentinel per noise token: the window must be shorter than inputs_length (as T5)."""
    objective = span_objective(64, mean_noise_span_length=1.0)
    windows = span_windows(objective, rows=3, seed=8)
    batch = objective(windows, generator=torch.Generator().manual_seed(9))
    assert batch["input_ids"].shape == (3, 64)
    assert "attention_mask" not in batch
    for row in range(3):
        tokens, noise, _, _ = reassemble(batch["input_ids"][row].tolist(), batch["labels"][row].tolist())
        assert tokens == windows[row].tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_density": 0.0},
        {"noise_density": 1.0},
        {"noise_density": -0.2},
        {"mean_noise_span_length": 0.5},
        {"targets_length": 100},  # shorter than the 114 targets of 512 inputs
    ],
)
def test_span_corruption_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        span_objective(512, **kwargs)


def test_span_corruption_makes_whole_windows_or_refuses_the_layout():
    """Every setting either corrupts a window into inputs of its length and targets of its target_length
    that reassemble to the window, or is refused up front: a dense noise at a short span length leaves fewer
    kept tokens than spans (T5's segmentation needs one kept token before each span), and a very short window
    has no noise token. Before the check, such settings crashed in the first batch with numpy's broadcast
    error or, with exactly one cut to place, trained on inputs a few tokens wide."""
    from llmtrain.objectives.span_corruption import check_span_layout

    made = refused = 0
    for length in (1, 2, 3, 8, 48, 64):
        for density in (0.15, 0.5, 0.6, 0.7, 0.8, 0.95):
            for mean_span in (1.0, 2.0, 3.0):
                try:
                    objective = span_objective(
                        length, noise_density=density, mean_noise_span_length=mean_span
                    )
                except ValueError as err:
                    assert "noise_density" in str(err) and f"data.seq_len={length}" in str(err)
                    with pytest.raises(ValueError):
                        check_span_layout(length, density, mean_span)
                    refused += 1
                    continue
                windows = span_windows(objective, rows=4, seed=length)
                batch = objective(windows, generator=torch.Generator().manual_seed(1))
                assert batch["input_ids"].shape == (4, length)
                assert batch["labels"].shape == (4, objective.target_length)
                for row in range(4):
                    inputs = batch["input_ids"][row].tolist()
                    if "attention_mask" in batch:
                        inputs = [t for t, m in zip(inputs, batch["attention_mask"][row].tolist()) if m]
                    tokens, noise, _, _ = reassemble(inputs, batch["labels"][row].tolist())
                    assert tokens == windows[row].tolist()
                    assert sum(noise) == objective.num_noise_tokens
                made += 1
    assert made and refused
    # the bound mean/(mean+1): density 0.7 at mean 3 lays out, at mean 2 it does not
    span_objective(64, noise_density=0.7, mean_noise_span_length=3.0)
    with pytest.raises(ValueError, match="kept token before it"):
        span_objective(64, noise_density=0.7, mean_noise_span_length=2.0)


def test_span_corruption_needs_enough_sentinels():
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruption(
            512, sentinel_ids=SENTINELS[:10], eos_token_id=SC_EOS, decoder_start_token_id=0, pad_token_id=0
        )


# --- objectives feed their model family ---------------------------------------------------------------------------


def test_objectives_feed_their_models():
    cfg = dict(vocab_size=SC_VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    clm = CausalLM(seq_len=32)
    decoder = build_model(ModelConfig(family="decoder", **cfg))
    batch = clm(torch.randint(*ORDINARY, (2, clm.raw_length), generator=g))
    out = decoder(**batch)
    assert out.n_targets.item() == 64 and torch.isfinite(out.loss)
    contiguous = [all(v.is_contiguous() for v in batch.values())]  # pinned and copied to CUDA in one piece

    mlm = MaskedLM(seq_len=32, vocab_size=SC_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL)
    encoder = build_model(ModelConfig(family="encoder", **cfg))
    batch = mlm(torch.randint(*ORDINARY, (2, 32), generator=g), generator=g)
    out = encoder(**batch)
    assert out.logits.shape[0] == (batch["labels"] != IGNORE_INDEX).sum() and torch.isfinite(out.loss)
    contiguous.append(all(v.is_contiguous() for v in batch.values()))

    span = span_objective(48)
    encoder_decoder = build_model(ModelConfig(family="encoder_decoder", **cfg))
    batch = span(span_windows(span, rows=2, seed=11), generator=g)
    out = encoder_decoder(**batch)
    assert out.logits.shape == (2, span.target_length, SC_VOCAB) and torch.isfinite(out.loss)
    contiguous.append(all(v.is_contiguous() for v in batch.values()))
    assert contiguous == [True, True, True]


# --- the vectorised objectives against straightforward per-window references -------------------------------------


def random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths of a random partition of num_items into num_segments non-empty segments (T5's helper)."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()


def reference_span_corruption(objective: SpanCorruption, windows: torch.Tensor, generator: torch.Generator):
    """One window at a time, in plain Python, drawing the same generator stream (noise cuts, then kept cuts)."""
    inputs, targets = [], []
    for window in windows.tolist():
        noise = random_segmentation(objective.num_noise_tokens, objective.num_noise_spans, generator).tolist()
        keep = random_segmentation(
            objective.raw_length - objective.num_noise_tokens, objective.num_noise_spans, generator
        ).tolist()
        ins, outs, at = [], [], 0
        for span, (k, n) in enumerate(zip(keep, noise)):
            sentinel = objective.sentinels[span].item()
            ins += window[at : at + k] + [sentinel]
            outs += [sentinel] + window[at + k : at + k + n]
            at += k + n
        inputs.append(ins + [objective.eos] + [objective.pad] * objective.inputs_pad)
        targets.append(outs + [objective.eos] + [IGNORE_INDEX] * objective.targets_pad)
    return torch.tensor(inputs), torch.tensor(targets)


@pytest.mark.parametrize(
    "length, kwargs",
    [
        (512, {}),
        (64, {"targets_length": 24}),
        (27, {"noise_density": 0.5}),
        (64, {"mean_noise_span_length": 1.0}),
    ],
)
def test_span_corruption_equals_the_per_window_reference(length, kwargs):
    objective = span_objective(length, **kwargs)
    windows = span_windows(objective, rows=6, seed=11)
    batch = objective(windows, torch.Generator().manual_seed(12))
    inputs, labels = reference_span_corruption(objective, windows, torch.Generator().manual_seed(12))
    assert torch.equal(batch["input_ids"], inputs) and torch.equal(batch["labels"], labels)


def test_masked_lm_masks_a_window_alike_whatever_the_micro_batch():
    """8 windows at once or 4 + 4 from the same generator: the same masks (gradient accumulation then trains
    what one larger micro-batch would; the draws were per micro-batch, then per window)."""
    objective = MaskedLM(seq_len=64, vocab_size=MLM_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL)
    windows = torch.randint(0, MLM_VOCAB, (8, 64), generator=torch.Generator().manual_seed(13))
    whole = objective(windows, torch.Generator().manual_seed(14))
    g = torch.Generator().manual_seed(14)
    halves = [objective(windows[:4], g), objective(windows[4:], g)]
    for key in ("input_ids", "labels"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))


def test_masked_lm_equals_the_torch_reference():
    objective = MaskedLM(seq_len=64, vocab_size=MLM_VOCAB, mask_token_id=MASK, special_token_ids=SPECIAL)
    windows = torch.randint(0, MLM_VOCAB, (8, 64), generator=torch.Generator().manual_seed(13))
    batch = objective(windows, torch.Generator().manual_seed(14))
    g = torch.Generator().manual_seed(14)
    rows = [torch.rand(3, 64, generator=g) for _ in range(8)]  # window by window: selection, action, id
    u, v, r = (torch.stack([row[i] for row in rows]) for i in range(3))
    ordinary = torch.tensor([i for i in range(MLM_VOCAB) if i not in SPECIAL])
    random_ids = ordinary[(r * len(ordinary)).long().clamp(max=len(ordinary) - 1)]
    selected = (u < 0.15) & ~torch.isin(windows, torch.tensor(SPECIAL))
    expected = torch.where(
        selected & (v < 0.8), MASK, torch.where(selected & (v >= 0.8) & (v < 0.9), random_ids, windows)
    )
    assert torch.equal(batch["input_ids"], expected)
    assert torch.equal(batch["labels"], torch.where(selected, windows, IGNORE_INDEX))
