"""Generation for the three families: decoder sampling (KV cache, temperature, top-k, top-p, greedy, stop at
EOS), encoder-decoder decoding with the encoder run once and its keys/values cached, T5 span filling,
and encoder fill-mask."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # a type only: generation itself needs nothing but torch
    from llmtrain.data.tokenizer import Tokenizer


def choose_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B, 1) from logits (B, V): greedy when temperature <= 0, else sampled from the softmax
    at that temperature, restricted to the top_k most likely tokens and to the smallest set whose
    probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def _is_sharded(model: nn.Module) -> bool:
    """FSDP2 gathers the root's parameters in forward() only; decode_step() would see shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _finish(next_id: torch.Tensor, done: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Rows that already produced EOS keep producing EOS."""
    if eos_token_id is None:
        return next_id
    return next_id.masked_fill(done[:, None], eos_token_id)


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """input_ids (B, T) of equal-length prompts -> (B, T + n), n <= max_new_tokens; temperature 0 is greedy.

    Stops once every row has produced eos_token_id (finished rows are filled with EOS). With the cache each
    step feeds one token; without it the whole (last max_seq_len tokens of the) sequence is re-run. When the
    cache reaches max_seq_len, it is rebuilt from the last half of the context (a sliding window).
    """
    max_len = model.cfg.max_seq_len
    use_cache = use_cache and not _is_sharded(model)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache, fresh = None, input_ids
    for _ in range(max_new_tokens):
        if use_cache:
            if cache is None or cache.length + fresh.shape[1] > max_len:
                # (re)fill the cache: first with the prompt (its last max_len tokens), later the last half
                keep = min(input_ids.shape[1], max_len) if cache is None else max(max_len // 2, 1)
                cache, fresh = model.new_cache(), input_ids[:, -keep:]
            logits = model.decode_step(fresh, cache)[:, -1, :]
        else:
            logits = model(input_ids[:, -max_len:]).logits[:, -1, :]  # (B, V)
        next_id = _finish(choose_next(logits, temperature, top_k, top_p, generator), done, eos_token_id)
        input_ids, fresh = torch.cat([input_ids, next_id], dim=1), next_id
        if eos_token_id is not None:
            done |= next_id[:, 0] == eos_token_id
            if done.all():
                break
    return input_ids


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Decoder output (B, <= max_new_tokens) for encoder inputs (B, S); the encoder runs once, and with the
    cache its keys/values are projected once per decoder block. Greedy by default."""
    check_decoder_length(model, max_new_tokens)
    encoded = model.encode(input_ids, attention_mask)  # (B, S, d)
    B = input_ids.shape[0]
    out = torch.full((B, 1), model.cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    cache = model.new_cache() if use_cache else None
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.decode(out[:, -1:], encoded, attention_mask, cache=cache)[:, -1, :]
        else:
            logits = model.decode(out, encoded, attention_mask)[:, -1, :]
        next_id = _finish(choose_next(logits, temperature, top_k, top_p, generator), done, eos_token_id)
        out = torch.cat([out, next_id], dim=1)
        if eos_token_id is not None:
            done |= next_id[:, 0] == eos_token_id
            if done.all():
                break
    return out[:, 1:]


def greedy_seq2seq(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
) -> torch.Tensor:
    """Greedy decoder output (B, <= max_new_tokens) for encoder inputs (B, S)."""
    return generate_seq2seq(model, input_ids, max_new_tokens, eos_token_id)


# --- span filling and fill-mask ------------------------------------------------------------------------------


@dataclass
class FilledSpans:
    text: str
    """The input with each sentinel replaced by the span the model produced for it."""
    spans: list[str]
    """The produced span for each sentinel of the input, in order ('' where the model gave none)."""


def split_spans(target_ids: list[int], sentinel_ids: list[int], eos_token_id: int) -> dict[int, list[int]]:
    """A span-corruption target (sentinel, tokens, sentinel, tokens, ..., EOS) -> {sentinel id: tokens}."""
    spans: dict[int, list[int]] = {}
    current = None
    sentinels = set(sentinel_ids)
    for token in target_ids:
        if token == eos_token_id:
            break
        if token in sentinels:
            current = token
            spans.setdefault(current, [])
        elif current is not None:
            spans[current].append(token)
    return spans


def check_prompt_length(model: nn.Module, n_tokens: int) -> None:
    """An encoder reads at most its position table (learned or rotary) at once; refuse a longer prompt."""
    cfg = model.cfg
    if cfg.position != "relative" and n_tokens > cfg.max_seq_len:
        raise ValueError(
            f"the prompt is {n_tokens} tokens but the model reads at most model.max_seq_len={cfg.max_seq_len}; "
            "shorten it"
        )


def check_decoder_length(model: nn.Module, max_new_tokens: int) -> None:
    """An encoder-decoder's decoder reads its whole output so far (start token + max_new_tokens - 1 at the
    last step); with learned or rotary positions that must fit its position table. Refused before any work."""
    cfg = model.cfg
    if cfg.position in ("learned", "rope") and max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is more than the decoder's {cfg.position} positions reach "
            f"(model.max_seq_len={cfg.max_seq_len}); allowed: at most {cfg.max_seq_len}"
        )


def check_sentinels(text: str, n_sentinels: int) -> None:
    """The markers <extra_id_N> of a span-filling prompt must be the tokenizer's, numbered 0, 1, 2, ... as the
    objective numbers a window's spans: the model fills the k-th span after <extra_id_k>, so another marker's
    span would silently come back empty (and a marker beyond the tokenizer's is plain text)."""
    used = [int(n) for n in re.findall(r"<extra_id_(\d+)>", text)]
    allowed = f"<extra_id_0> to <extra_id_{n_sentinels - 1}>, in order from <extra_id_0>"
    beyond = [n for n in used if n >= n_sentinels]
    if beyond:
        raise ValueError(f"<extra_id_{beyond[0]}> is not a sentinel of this tokenizer; allowed: {allowed}")
    if used != list(range(len(used))):
        given = ", ".join(f"<extra_id_{n}>" for n in used)
        raise ValueError(f"the prompt's sentinels are {given}; allowed: {allowed} (the model fills them so)")


@torch.no_grad()
def fill_spans(
    model: nn.Module,
    tokenizer: Tokenizer,
    text: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> FilledSpans:
    """T5 span filling: text with <extra_id_0>, <extra_id_1>, ... markers in, the filled spans out; greedy by
    default, sampled (generate_seq2seq's temperature, top_k, top_p) for other fills of the same text.

    Whitespace right before a marker moves into the span: byte-level BPE words carry their leading space
    (" brown"), so in training a span starts with it and the text before a sentinel never ends in one.
    """
    device = next(model.parameters()).device
    check_sentinels(text, len(tokenizer.sentinel_ids))
    text = re.sub(r"\s+(<extra_id_\d+>)", r"\1", text)
    ids = tokenizer.encode(text) + [tokenizer.eos_id]  # the objective's inputs end with EOS too
    check_prompt_length(model, len(ids))
    sentinels = set(tokenizer.sentinel_ids)
    used = [i for i in ids if i in sentinels]
    if not used:
        raise ValueError("the text has no sentinel such as <extra_id_0> to fill")
    out = generate_seq2seq(
        model,
        torch.tensor([ids], device=device),
        max_new_tokens,
        tokenizer.eos_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        use_cache=use_cache,
    )
    spans = split_spans(out[0].tolist(), tokenizer.sentinel_ids, tokenizer.eos_id)
    filled = [t for token in ids[:-1] for t in (spans.get(token, []) if token in used else [token])]
    return FilledSpans(tokenizer.decode(filled), [tokenizer.decode(spans.get(s, [])) for s in used])


def _before_mask(tokenizer: Tokenizer) -> re.Pattern:
    """The tokenizer's mask marker, with the one space right before it (if any) where a word's token carries
    its leading space; a WordPiece tokenizer reads no spaces, and its tokens carry none."""
    marker = re.escape(tokenizer.hf.id_to_token(tokenizer.mask_id))
    return re.compile(" ?" + marker if tokenizer.spaced_words else marker)


def mask_prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids fill_mask feeds the encoder: one space right before a <mask> moves into the masked token.

    The objective masks whole tokens, and a byte-level BPE (or Unigram) word carries its leading space (" six"),
    so in training the text before a <mask> never ends in a space of its own; "five <mask>" would give the
    model a lone " " token before the mask that it never saw there. Only one space goes: a newline, or a
    second space, stays a token of its own before the word there too.
    """
    marker = tokenizer.hf.id_to_token(tokenizer.mask_id)
    return tokenizer.encode(_before_mask(tokenizer).sub(marker, text))


def fill_in(tokenizer: Tokenizer, text: str, tokens: list[str]) -> str:
    """text with its k-th <mask>, and the one space before it, replaced by tokens[k] (which carries its own
    leading space, as fill_mask's candidates do): "five <mask> seven" and " six" give "five six seven". With
    WordPiece only the marker is replaced ("six" in "five <mask> seven")."""
    fills = iter(tokens)
    return _before_mask(tokenizer).sub(lambda _: next(fills), text)


@torch.no_grad()
def fill_mask(
    model: nn.Module, tokenizer: Tokenizer, text: str, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each <mask> in text, the top_k (at most the vocabulary) tokens the encoder predicts there with their
    probabilities. A candidate is the token's text, with its leading space where the tokenizer's words carry
    one (" six"): it stands for the <mask> and the one space before it (mask_prompt_ids, fill_in)."""
    device = next(model.parameters()).device
    ids = torch.tensor([mask_prompt_ids(tokenizer, text)], device=device)
    check_prompt_length(model, ids.shape[1])
    positions = (ids[0] == tokenizer.mask_id).nonzero().flatten()
    if len(positions) == 0:
        raise ValueError("the text has no <mask> to fill")
    probs = model(ids).logits[0, positions].float().softmax(-1)  # (n_masks, V)
    best = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [
        [(tokenizer.decode([i]), p) for i, p in zip(row_ids.tolist(), row_p.tolist())]
        for row_ids, row_p in zip(best.indices, best.values)
    ]
