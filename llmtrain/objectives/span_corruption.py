"""T5 span corruption (Raffel et al. 2020): noise spans -> sentinels in the input, sentinel + span in the target.

Length arithmetic follows T5's `random_spans_helper` / HF `compute_input_and_target_lengths`, so a raw window
of 568 tokens gives exactly 512 encoder inputs and 114 targets at density 0.15, mean span 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def random_segmentation(num_items: int, num_segments: int, generator: torch.Generator | None) -> torch.Tensor:
    """Lengths (num_segments,) of a random partition of num_items into non-empty segments."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values, torch.tensor([num_items])])
    return bounds.diff()


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
        if not 0 < noise_density < 1:
            raise ValueError(f"objective.noise_density={noise_density} must be in (0, 1)")
        if mean_noise_span_length < 1:
            raise ValueError(f"objective.mean_noise_span_length={mean_noise_span_length} must be >= 1")
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
                f"{len(sentinel_ids)}; lower data.seq_len or objective.noise_density"
            )
        self.inputs_pad = inputs_length - inputs_out  # 0 unless the window could not be fitted exactly
        self.target_length = targets_length or targets_out
        self.targets_pad = self.target_length - targets_out
        self.sentinels = torch.tensor(sentinel_ids[: self.num_noise_spans], dtype=torch.long)
        self.eos, self.start, self.pad = eos_token_id, decoder_start_token_id, pad_token_id
        self.document_attention = document_attention

    def noise_mask(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool (raw_length,): alternating non-noise / noise spans, starting with non-noise (as T5)."""
        noise = random_segmentation(self.num_noise_tokens, self.num_noise_spans, generator)
        keep = random_segmentation(self.raw_length - self.num_noise_tokens, self.num_noise_spans, generator)
        lengths = torch.stack([keep, noise], dim=1).reshape(-1)  # keep0, noise0, keep1, noise1, ...
        is_noise = torch.tensor([False, True]).repeat(self.num_noise_spans)
        return is_noise.repeat_interleave(lengths)

    def corrupt(
        self, tokens: torch.Tensor, noise: torch.Tensor, documents: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """One window -> (inputs, targets). Each noise span becomes the next sentinel in the inputs; the
        targets are each sentinel followed by its span's tokens. Both end with EOS.

        With `documents` (the window's document ids) also (input_documents, target_documents): a kept token
        keeps its document; a span's sentinel and all its tokens take the document the span starts in, so
        every target token has its sentinel among the encoder tokens of its own document (a span that runs
        over a document boundary is predicted from the first document's context)."""
        span_start = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])
        sentinel_at = self.sentinels[(span_start.cumsum(0) - 1).clamp(min=0)]  # sentinel of the current span

        def interleave(
            values: torch.Tensor, first_keep: torch.Tensor, second_keep: torch.Tensor
        ) -> torch.Tensor:
            # at each position: optionally its span's sentinel, then optionally the token itself
            return values.reshape(-1)[torch.stack([first_keep, second_keep], dim=1).reshape(-1)]

        eos = torch.tensor([self.eos])
        values = torch.stack([sentinel_at, tokens], dim=1)
        inputs = torch.cat([interleave(values, span_start, ~noise), eos])
        targets = torch.cat([interleave(values, span_start, noise), eos])
        if documents is None:
            return inputs, targets
        positions = torch.arange(len(tokens))
        start_of_span = torch.cummax(torch.where(span_start, positions, 0), dim=0).values
        doc = torch.where(noise, documents[start_of_span], documents)
        doc_values = torch.stack([doc, doc], dim=1)
        input_docs = interleave(doc_values, span_start, ~noise)
        target_docs = interleave(doc_values, span_start, noise)
        input_docs = torch.cat([input_docs, input_docs[-1:]])  # the final EOS: the last document's
        target_docs = torch.cat([target_docs, target_docs[-1:]])
        return inputs, targets, input_docs, target_docs

    def __call__(
        self, windows: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """windows (B, raw_length) -> input_ids (B, seq_len), decoder_input_ids and labels (B, target_length)."""
        docs = document_ids(windows, self.eos) if self.document_attention else [None] * len(windows)
        parts = list(zip(*(self.corrupt(w, self.noise_mask(generator), d) for w, d in zip(windows, docs))))
        input_ids, labels = torch.stack(parts[0]), torch.stack(parts[1])
        batch = {}
        if self.document_attention:
            # padding takes the last document's id; the attention mask keeps it out of every real row
            batch["document_ids"] = F.pad(torch.stack(parts[2]), (0, self.inputs_pad), mode="replicate")
            batch["decoder_document_ids"] = F.pad(
                torch.stack(parts[3]), (0, self.targets_pad), mode="replicate"
            )
        if self.inputs_pad:  # only when no raw length maps exactly onto seq_len
            batch["attention_mask"] = F.pad(
                torch.ones_like(input_ids, dtype=torch.bool), (0, self.inputs_pad)
            )
            input_ids = F.pad(input_ids, (0, self.inputs_pad), value=self.pad)
        if self.targets_pad:
            labels = F.pad(labels, (0, self.targets_pad), value=IGNORE_INDEX)
        previous = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, self.pad)
        start = torch.full((len(labels), 1), self.start, dtype=torch.long)
        batch.update(
            input_ids=input_ids, decoder_input_ids=torch.cat([start, previous], dim=1), labels=labels
        )
        return batch
