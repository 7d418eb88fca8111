"""Byte-level BPE (GPT-2 style) with the special tokens of all three objectives, via `tokenizers`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
BASE_SPECIALS = [PAD, BOS, EOS, UNK, MASK]


NOT_TEXT = "\U0010ffff"
"""A Unicode noncharacter: a prefix that makes a vocabulary entry impossible to match in any text."""


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def special_tokens(n_sentinels: int) -> list[str]:
    """pad=0, bos=1, eos=2, unk=3, mask=4, then <extra_id_0>, <extra_id_1>, ... in order."""
    return BASE_SPECIALS + [sentinel(i) for i in range(n_sentinels)]


def min_vocab_size(n_sentinels: int) -> int:
    """The smallest byte-level BPE vocabulary: 256 bytes, the special tokens, and one merge."""
    return 256 + len(special_tokens(n_sentinels)) + 1


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids the objectives need."""

    hf: HFTokenizer
    _plain: HFTokenizer | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        missing = [t for t in BASE_SPECIALS if self.hf.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}; llmtrain needs {BASE_SPECIALS}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id = (
            self.hf.token_to_id(t) for t in BASE_SPECIALS
        )
        self.sentinel_ids: list[int] = []
        while (i := self.hf.token_to_id(sentinel(len(self.sentinel_ids)))) is not None:
            self.sentinel_ids.append(i)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id, *self.sentinel_ids]

    @property
    def spaced_words(self) -> bool:
        """Whether a word's token carries the space before it (byte-level BPE " dog", Unigram "▁dog"); a
        WordPiece tokenizer drops the spaces between words (its decoder puts one back between them)."""
        return not isinstance(self.hf.model, models.WordPiece)

    def encode(self, text: str) -> list[int]:
        """A prompt: special-token text in it is that token (`<extra_id_0>` marks a span to fill)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    @property
    def plain(self) -> HFTokenizer:
        """The same tokenizer reading special-token text as plain text (made on first use)."""
        if self._plain is None:
            spec = json.loads(self.hf.to_str())
            # a Unigram model also holds the specials as pieces of its own, scored highest: spelt here as no
            # text is, at the same ids
            if spec["model"]["type"] == "Unigram":
                specials = set(special_tokens(len(self.sentinel_ids)))
                for piece in spec["model"]["vocab"]:
                    if piece[0] in specials:
                        piece[0] = NOT_TEXT + piece[0]
            self._plain = HFTokenizer.from_str(json.dumps(spec))
            self._plain.encode_special_tokens = True
        return self._plain

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Corpus text, where every character is text: "<eos>" or "<mask>" written in a document is encoded
        as those characters, not as the special token (only the data pipeline and the objectives put special
        tokens into a stream: an EOS inside a document would end it there for document attention, a stray
        <mask> would be an input the objective never made)."""
        return [e.ids for e in self.plain.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes each id stands for (0 for special tokens), for bits per byte.

        A byte-level BPE token is a string of byte-alphabet characters, one character per byte. A Unigram
        (Metaspace) token counts its text with "▁" as a space; a WordPiece token its text without "##" (the
        spaces between words are implied, not tokens, so they are not counted there). So bits per byte is exact
        for byte-level BPE only: WordPiece leaves the spaces out (bpb 1.2-1.4x a BPE's on the same text), and
        a Unigram or WordPiece <unk> counts no bytes (`bytes_exact`).
        """
        lengths = torch.zeros(self.vocab_size, dtype=torch.long)
        specials = set(self.special_ids)
        byte_level = self.bytes_exact
        wordpiece = isinstance(self.hf.model, models.WordPiece)
        for token, i in self.hf.get_vocab().items():
            if i in specials:
                continue
            if byte_level:
                lengths[i] = len(token)
            elif wordpiece:
                lengths[i] = len(token.removeprefix("##").encode("utf-8"))
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return lengths

    @property
    def bytes_exact(self) -> bool:
        """Whether token_bytes adds up to the UTF-8 bytes of any text (byte-level BPE), for bits per byte."""
        return isinstance(self.hf.pre_tokenizer, pre_tokenizers.ByteLevel)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.hf.to_str())

    def digest(self) -> str:
        """What the ids depend on: the tokenizer's JSON, its post-processor left out (the special tokens it
        wraps a text in, which `encode` never asks for): a T5 export's EOS template keeps the run's digest, so
        its shards and cache still serve a run continued from the export."""
        text = self.hf.to_str()
        spec = json.loads(text)
        if spec.get("post_processor") is not None:
            spec["post_processor"] = None
            text = HFTokenizer.from_str(json.dumps(spec)).to_str()
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, n_sentinels: int = 100
) -> Tokenizer:
    specials = special_tokens(n_sentinels)
    floor = min_vocab_size(n_sentinels) - 1
    if vocab_size <= floor:
        raise ValueError(
            f"data.tokenizer.vocab_size={vocab_size} is too small: 256 bytes + {len(specials)} special tokens "
            f"need more than {floor}"
        )
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


TOKENIZER_KINDS = ("bpe", "unigram", "wordpiece")


def train_tokenizer(
    texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int = 2, n_sentinels: int = 100
) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, lossless), Unigram (SentencePiece style: spaces as "▁", NFC; lossless for NFC
    text without unknown characters or a "▁" of its own) or WordPiece (BERT style: split on whitespace and
    punctuation, "##" continuations, NFC, cased; spaces are not kept, so decoding does not restore the text
    exactly), each with the same special tokens at the same ids (pad=0, bos=1, eos=2, unk=3, mask=4, then the
    sentinels)."""
    if kind == "bpe":
        return train_bpe(texts, vocab_size, min_frequency, n_sentinels)
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not allowed; allowed: {', '.join(TOKENIZER_KINDS)}")
    specials = special_tokens(n_sentinels)
    if vocab_size <= len(specials) + 1:
        raise ValueError(
            f"data.tokenizer.vocab_size={vocab_size} is too small: {len(specials)} special tokens need more"
        )
    if kind == "unigram":
        hf = HFTokenizer(models.Unigram())
        # GPT-2's split (a word with its leading space; whitespace runs on their own), then spaces as "▁":
        # lossless, and indentation can become one token (plain Metaspace makes every extra space a token)
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r" ?\S+|\s+(?!\S)|\s+"), behavior="isolated"),
                pre_tokenizers.Metaspace(prepend_scheme="never", split=False),
            ]
        )
        hf.decoder = decoders.Metaspace(prepend_scheme="never", split=False)
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False
        )
    else:
        hf = HFTokenizer(models.WordPiece(unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
    hf.normalizer = normalizers.NFC()
    too_small = (
        f"data.tokenizer.vocab_size={vocab_size} is below what a {kind} tokenizer of this text holds (the "
        "special tokens and every distinct character); raise it"
    )
    try:
        hf.train_from_iterator(texts, trainer=trainer)
    except Exception as err:  # the Unigram trainer's bare Exception: "not large enough to contain all chars"
        if "not large enough" in str(err):
            raise ValueError(too_small) from None
        raise
    tok = Tokenizer(hf)
    # both trainers keep every character of the sample, whatever the size asked; WordPiece's size is then its
    # floor, while below its floor the Unigram trainer returns a size of no meaning
    if tok.vocab_size > vocab_size:
        raise ValueError(too_small + (f" to at least {tok.vocab_size}" if kind == "wordpiece" else ""))
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (plain JSON; no code runs)."""
    from llmtrain.data.sources import DataError

    path = Path(path)
    if path.is_dir():
        raise DataError(f"data.tokenizer.path: {path} is a folder; give its tokenizer.json file")
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer.path: {path} does not exist")
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"data.tokenizer.path: {path} is not a valid tokenizer.json ({err})") from None
    try:
        return Tokenizer(hf)
    except ValueError as err:  # e.g. a Hugging Face tokenizer without llmtrain's special tokens
        raise DataError(f"data.tokenizer.path: {path}: {err}") from None


def tokenizer_settings_key(**settings) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
