"""T5 span corruption (Raffel et al. 2020): noise spans -> sentinels in the input, sentinel + span in the target.

Length arithmetic follows T5's `random_spans_helper` / HF `compute_input_and_target_lengths`, so a raw window
of 568 tokens gives exactly 512 encoder inputs and 114 targets at density 0.15, mean span 3.
"""

from __future__ import annotations

import numpy as np
import torch

from llmtrain.models.heads import IGNORE_INDEX
from llmtrain.objectives.documents import document_ids


def span_lengths(
    raw_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int, int, int]:
    """(num_noise_tokens, num_noise_spans, inputs_length, targets_length) for a raw window; each +1 is EOS."""
    num_noise_tokens = int(round(raw_length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), raw_length - 1)
    num_noise_spans = max(int(round(num_noise_tokens / mean_noise_span_length)), 1)
    num_nonnoise_tokens = raw_length - num_noise_tokens
    inputs_length = num_nonnoise_tokens + num_noise_spans + 1
    targets_length = num_noise_tokens + num_noise_spans + 1
    return num_noise_tokens, num_noise_spans, inputs_length, targets_length


def span_windows(cfg) -> tuple[int, int, int]:
    """(raw window length, targets length, noise spans per window) for a TrainConfig's settings: what
    SpanCorruption makes of a window (its span_lengths, which can be one shorter than the search's estimate)."""
    o = cfg.objective
    raw, _ = compute_input_and_target_lengths(cfg.data.seq_len, o.noise_density, o.mean_noise_span_length)
    _, spans, _, targets = span_lengths(raw, o.noise_density, o.mean_noise_span_length)
    return raw, targets, spans


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """The longest raw window whose corrupted input fits inputs_length, and its target length."""
    # Start one below inputs_length, as T5's random_spans_helper does (HF starts at inputs_length): a window
    # of inputs_length can need inputs_length + 1 inputs (mean span 1: one sentinel per noise token, + EOS).
    raw = inputs_length - 1
    while span_lengths(raw + 1, noise_density, mean_noise_span_length)[2] <= inputs_length:
        raw += 1
    targets_length = span_lengths(raw, noise_density, mean_noise_span_length)[3]
    # Like T5: at density 0.5 the targets can come out longer than the inputs; shorten the window then.
    if noise_density == 0.5 and targets_length > inputs_length:
        raw -= 1
        targets_length -= 1
    return raw, targets_length


def _pad_right(x: np.ndarray, n: int, value: int | None = None) -> np.ndarray:
    """x (B, W) with n more columns of `value` (None: copies of the last column)."""
    if n == 0:
        return x
    out = np.empty((x.shape[0], x.shape[1] + n), dtype=x.dtype)
    out[:, : x.shape[1]] = x
    out[:, x.shape[1] :] = x[:, -1:] if value is None else value
    return out


def check_span_settings(noise_density: float, mean_noise_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise ValueError(f"objective.noise_density={noise_density} must be in (0, 1)")
    if not mean_noise_span_length >= 1:
        raise ValueError(f"objective.mean_noise_span_length={mean_noise_span_length} must be >= 1")


def check_span_layout(inputs_length: int, noise_density: float, mean_noise_span_length: float) -> None:
    """A window of `inputs_length` inputs has at least one noise token and a kept token before each of its
    noise spans (T5's segmentation splits the kept tokens into one non-empty run per span)."""
    raw, _ = compute_input_and_target_lengths(inputs_length, noise_density, mean_noise_span_length)
    n_noise, spans, _, _ = span_lengths(raw, noise_density, mean_noise_span_length)
    if n_noise < 1 or raw - n_noise < spans:
        bound = mean_noise_span_length / (mean_noise_span_length + 1)
        raise ValueError(
            f"span corruption cannot lay out data.seq_len={inputs_length} inputs at objective.noise_density="
            f"{noise_density} and objective.mean_noise_span_length={mean_noise_span_length}: a window of {raw} "
            f"tokens would have {max(n_noise, 0)} noise tokens in {spans} spans but {max(raw - n_noise, 0)} kept "
            f"tokens, and each span needs a kept token before it; allowed: noise_density below about {bound:.3g} "
            "for this span length (mean/(mean+1)), a longer mean_noise_span_length, or a longer data.seq_len"
        )


class SpanCorruption:
    family = "encoder_decoder"

    def __init__(
        self,
        inputs_length: int,
        sentinel_ids: list[int],
        eos_token_id: int,
        decoder_start_token_id: int,
        pad_token_id: int,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        targets_length: int | None = None,
        document_attention: bool = False,
    ):
        check_span_settings(noise_density, mean_noise_span_length)
        check_span_layout(inputs_length, noise_density, mean_noise_span_length)
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.seq_len = inputs_length
        self.raw_length, derived_targets = compute_input_and_target_lengths(
            inputs_length, noise_density, mean_noise_span_length
        )
        self.num_noise_tokens, self.num_noise_spans, inputs_out, targets_out = span_lengths(
            self.raw_length, noise_density, mean_noise_span_length
        )
        if targets_length is not None and targets_length < targets_out:
            raise ValueError(
                f"objective.targets_length={targets_length} is shorter than the {targets_out} targets that "
                f"{inputs_length} inputs at noise_density={noise_density} produce; allowed: >= {targets_out} or null"
            )
        if self.num_noise_spans > len(sentinel_ids):
            raise ValueError(
                f"span corruption needs {self.num_noise_spans} sentinels per window but the tokenizer has "
                f"{len(sentinel_ids)} (data.tokenizer.n_sentinels); use a tokenizer with more, or lower data.seq_len "
                "or objective.noise_density, or raise objective.mean_noise_span_length"
            )
        self.inputs_pad = inputs_length - inputs_out  # 0 unless the window could not be fitted exactly
        self.target_length = targets_length or targets_out
        self.targets_pad = self.target_length - targets_out
        self.sentinels = torch.tensor(sentinel_ids[: self.num_noise_spans], dtype=torch.long)
        self._sentinels = self.sentinels.numpy()
        self.eos, self.start, self.pad = eos_token_id, decoder_start_token_id, pad_token_id
        self.document_attention = document_attention

    def noise_mask(self, generator: torch.Generator | None = None, rows: int | None = None) -> torch.Tensor:
        """Bool (raw_length,), or (rows, raw_length): alternating non-noise / noise spans, starting with
        non-noise (as T5). Each row draws its cuts (torch.randperm of the gaps, noise then kept), row after
        row, so a batch of B windows draws what B single windows would."""
        mask = torch.from_numpy(self._noise(generator, 1 if rows is None else rows))
        return mask[0] if rows is None else mask

    def _noise(self, generator: torch.Generator | None, n: int) -> np.ndarray:
        n_noise, spans = self.num_noise_tokens, self.num_noise_spans
        n_keep = self.raw_length - n_noise
        cuts = np.empty((n, 2, spans + 1), dtype=np.int64)  # [:, 0] noise, [:, 1] kept: 0, sorted cuts, total
        cuts[:, :, 0], cuts[:, 0, -1], cuts[:, 1, -1] = 0, n_noise, n_keep
        for row in range(n):  # the generator's stream: the only torch calls
            cuts[row, 0, 1:-1] = torch.randperm(n_noise - 1, generator=generator)[: spans - 1].numpy() + 1
            cuts[row, 1, 1:-1] = torch.randperm(n_keep - 1, generator=generator)[: spans - 1].numpy() + 1
        cuts[:, :, 1:-1].sort(axis=2)
        lengths = np.diff(cuts, axis=2)[:, ::-1].transpose(0, 2, 1).reshape(-1)  # keep0, noise0, keep1, ...
        return np.repeat(np.tile([False, True], n * spans), lengths).reshape(n, self.raw_length)

    def corrupt(
        self, tokens: torch.Tensor, noise: torch.Tensor, documents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Windows (B, L) or one window (L,) -> (inputs, targets). Each noise span becomes the next sentinel
        in the inputs; the targets are each sentinel followed by its span's tokens. Both end with EOS.

        With `documents` (the windows' document ids) also (input_documents, target_documents): a kept token
        keeps its document; a span's sentinel and all its tokens take the document the span starts in, so
        every target token has its sentinel among the encoder tokens of its own document (a span that runs
        over a document boundary is predicted from the first document's context)."""
        if tokens.dim() == 1:
            out = self.corrupt(tokens[None], noise[None], None if documents is None else documents[None])
            return tuple(t[0] for t in out)
        docs = None if documents is None else documents.numpy()
        out = self._corrupt(tokens.numpy(), noise.numpy(), docs)
        return tuple(torch.from_numpy(x) for x in out)

    def _corrupt(
        self, tokens: np.ndarray, noise: np.ndarray, docs: np.ndarray | None
    ) -> tuple[np.ndarray, ...]:
        # numpy: a batch is ~40 small array operations, at a fraction of torch's per-call cost on the CPU
        B = len(tokens)
        span_start = noise.copy()
        span_start[:, 1:] &= ~noise[:, :-1]
        span = np.cumsum(span_start, axis=1) - 1  # the current span's number (-1 before the first)
        sentinel_at = self._sentinels[np.maximum(span, 0)]

        def interleave(values: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
            # at each position: optionally its span's sentinel, then optionally the token itself; every row
            # keeps the same number (the spans and noise tokens per window are fixed), so rows stay rows
            return values[np.stack([first, second], axis=2)].reshape(B, -1)

        def with_last(x: np.ndarray, last) -> np.ndarray:
            out = np.empty((B, x.shape[1] + 1), dtype=x.dtype)
            out[:, :-1], out[:, -1:] = x, last
            return out

        values = np.stack([sentinel_at, tokens.astype(np.int64, copy=False)], axis=2)
        inputs = with_last(interleave(values, span_start, ~noise), self.eos)
        targets = with_last(interleave(values, span_start, noise), self.eos)
        if docs is None:
            return inputs, targets
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        start_of_span = np.maximum.accumulate(np.where(span_start, positions, 0), axis=1)
        doc = np.where(noise, np.take_along_axis(docs, start_of_span, axis=1), docs)
        doc_values = np.stack([doc, doc], axis=2)
        input_docs = interleave(doc_values, span_start, ~noise)
        target_docs = interleave(doc_values, span_start, noise)
        # the final EOS belongs to the last document of its sequence
        return (
            inputs,
            targets,
            with_last(input_docs, input_docs[:, -1:]),
            with_last(target_docs, target_docs[:, -1:]),
        )

    def __call__(
        self, windows: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """windows (B, raw_length) -> input_ids (B, seq_len), decoder_input_ids and labels (B, target_length)."""
        tokens = windows.numpy()
        docs = document_ids(windows, self.eos).numpy() if self.document_attention else None
        parts = self._corrupt(tokens, self._noise(generator, len(tokens)), docs)
        B, inputs_pad, targets_pad = len(tokens), self.inputs_pad, self.targets_pad
        input_ids = _pad_right(parts[0], inputs_pad, self.pad)
        labels = _pad_right(parts[1], targets_pad, IGNORE_INDEX)
        decoder_input_ids = np.empty_like(labels)
        decoder_input_ids[:, 0] = self.start
        decoder_input_ids[:, 1:] = np.where(labels[:, :-1] == IGNORE_INDEX, self.pad, labels[:, :-1])
        batch = {}
        if self.document_attention:
            # padding takes the last document's id; the attention mask keeps it out of every real row
            batch["document_ids"] = torch.from_numpy(_pad_right(parts[2], inputs_pad))
            decoder_docs = _pad_right(parts[3], targets_pad)
            batch["decoder_document_ids"] = torch.from_numpy(decoder_docs)
            # each document's decoder starts from the start token, as it would alone, not from the previous
            # document's last target (which its whole decoder would otherwise see)
            decoder_input_ids[:, 1:][decoder_docs[:, 1:] != decoder_docs[:, :-1]] = self.start
        if inputs_pad:  # only when no raw length maps exactly onto seq_len
            mask = np.ones((B, self.seq_len), dtype=bool)
            mask[:, -inputs_pad:] = False
            batch["attention_mask"] = torch.from_numpy(mask)
        batch.update(
            input_ids=torch.from_numpy(input_ids),
            decoder_input_ids=torch.from_numpy(decoder_input_ids),
            labels=torch.from_numpy(labels),
        )
        return batch
