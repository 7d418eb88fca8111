"""Curation: normalise -> quality filters -> exact and near deduplication, with a report of what went where.

The rules are the published ones (Gopher's quality and repetition rules, Rae et al. 2021, table A1; C4's line
rules, Raffel et al. 2020; StarCoder's character rules for code), each family switchable and each threshold
nullable. Two implementations of the filters sit behind `curation.backend`:

- `fast` (default): the same rules on numpy arrays of characters and word hashes, computed for a whole batch
  of documents at once (`BatchView`; `TextView` and the per-document rule functions are the reference the
  batch path is tested against, and what `Curator.process_each` runs); about 8-9 MB per CPU-second for web
  curation here (normalise, filters, digest and MinHash, no tokenisation), against 0.14 for datatrove.
- `datatrove`: Hugging Face datatrove's own GopherRepetitionFilter / GopherQualityFilter / C4QualityFilter
  (FineWeb's code, `pip install llmtrain[curation]`) with the same thresholds and its spaCy word splitting,
  and its MinHash shingling. A test checks that both backends keep and remove the same crafted documents.

Words, in the fast backend, are runs of letters and digits; "tokens" are whitespace-separated. Deliberate
departures from C4's code: a line is stripped again after its citation markers are removed (C4 drops
"A fact. [1]" because it then ends in a space). The fast backend counts C4's sentences by their end
punctuation (. ! ? then a space, a quote or the line's end), not with a trained sentence splitter as C4 and
datatrove do: abbreviations and initials ("Dr.", "U.S.") end a sentence there, so a document near
`min_sentences` may be kept that datatrove drops. Duplicate n-grams (n = 5..10) cover the characters of an
n-gram's repeated occurrences, after its first, as datatrove (FineWeb) counts them; Gopher's table counts
every occurrence of a duplicated n-gram, so its limits bite earlier.

Near-duplicates: MinHash signatures of word n-grams; LSH (bands x rows chosen for the configured Jaccard
threshold) makes one 64-bit key per band, and documents sharing a key (or a content digest, for exact dedup)
are candidate pairs, verified on the signatures' agreement (the MinHash estimate of Jaccard similarity) >=
`threshold`. A greedy pass in document order then removes a document that equals or near-duplicates an
earlier KEPT one (each document is compared with the first PAIRS_PER_MEMBER members of each group it shares),
so the first of a duplicate group is kept and the outcome depends only on document order, which the pipeline
keeps fixed. `find_duplicates` works on sorted runs of keys merged one key-range partition at a time: its
memory is bounded whatever the corpus size (llmtrain/data/shards.py stages the runs on disk).
"""

from __future__ import annotations

import hashlib
import mmap
import re
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

# -- configuration ----------------------------------------------------------------------------------------


@dataclass
class NormalizeConfig:
    enabled: bool = True
    unicode_form: str | None = "NFC"
    """NFC | NFKC | null: Unicode normal form applied to every document."""
    remove_control_chars: bool = True
    """Drop C0 control characters other than tab and newline, and DEL; CRLF / CR become LF."""
    strip_trailing_whitespace: bool = True
    """Remove spaces and tabs at the end of every line."""
    max_blank_lines: int | None = 2
    """Collapse longer runs of blank lines to this many (null: keep them)."""


@dataclass
class LengthConfig:
    enabled: bool = True
    min_chars: int | None = 1
    max_chars: int | None = None


@dataclass
class CharactersConfig:
    """Character-level rules (StarCoder's filters for code): non-alphanumeric ratio and line lengths."""

    enabled: bool = False
    min_alphanumeric_fraction: float | None = 0.25
    """Remove documents whose non-whitespace characters are less than this fraction letters or digits."""
    max_line_length: int | None = 1000
    max_mean_line_length: float | None = 100.0


@dataclass
class GopherQualityConfig:
    """Gopher's quality rules (table A1). Words: runs of letters/digits; tokens: whitespace-separated."""

    enabled: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    """'#' and ellipses ('...', '…'), each counted per whitespace token."""
    max_bullet_lines_fraction: float | None = 0.9
    max_ellipsis_lines_fraction: float | None = 0.3
    min_alpha_words_fraction: float | None = 0.8
    """Fraction of whitespace tokens containing at least one letter."""
    min_stop_words: int | None = 2
    """Distinct English stop words (the, be, to, of, and, that, have, with) the document must contain."""


@dataclass
class GopherRepetitionConfig:
    """Gopher's repetition rules (table A1). Character fractions count characters of words."""

    enabled: bool = True
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_paragraph_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    max_duplicate_paragraph_char_fraction: float | None = 0.2
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> limit on the characters covered by the most frequent n-gram (all its occurrences)."""
    max_duplicate_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    """n -> limit on the characters covered by repeated occurrences of any n-gram (after its first, as
    datatrove/FineWeb count; Gopher counts the first too)."""


@dataclass
class C4Config:
    """C4's rules: lines are dropped (the document is kept with the rest), documents are dropped."""

    enabled: bool = True
    require_terminal_punctuation: bool = True
    """Keep only lines ending in . ! ? or a quote (and not in '...')."""
    min_words_per_line: int | None = 3
    max_word_length: int | None = 1000
    """Drop lines holding a word longer than this."""
    remove_javascript_lines: bool = True
    remove_policy_lines: bool = True
    """Drop lines mentioning cookies, terms of use, privacy policy."""
    remove_citations: bool = True
    """Delete Wikipedia-style [1], [edit], [citation needed] markers."""
    min_sentences: int | None = 5
    """Drop documents with fewer sentences left after line filtering (fast backend: sentences counted by end
    punctuation, so abbreviations count as ends; datatrove: its sentence splitter)."""
    drop_lorem_ipsum: bool = True
    drop_curly_bracket: bool = True


@dataclass
class DedupConfig:
    exact: bool = True
    """Remove documents whose normalised text is byte-identical to an earlier one."""
    near: bool = True
    """Remove documents whose MinHash Jaccard estimate with an earlier one reaches `threshold`."""
    threshold: float = 0.8
    """Jaccard similarity (of word n-gram sets) at which two documents count as near-duplicates."""
    num_perm: int = 128
    """MinHash permutations; the LSH bands x rows are chosen from these and the threshold."""
    ngram: int = 5
    """Words per shingle."""
    seed: int = 1


@dataclass
class CurationConfig:
    backend: str = "fast"
    """fast (regex + numpy) | datatrove (datatrove's filters and MinHash signatures, spaCy word splitting)."""
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    characters: CharactersConfig = field(default_factory=CharactersConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    dedup: DedupConfig = field(default_factory=DedupConfig)


def web_curation() -> CurationConfig:
    """FineWeb-style: Gopher repetition and quality, C4 lines, exact and near dedup (the defaults)."""
    return CurationConfig()


def code_curation() -> CurationConfig:
    """Source code: length and StarCoder's character rules, exact and near dedup; no prose rules."""
    return CurationConfig(
        length=LengthConfig(min_chars=100, max_chars=1_000_000),
        characters=CharactersConfig(enabled=True),
        gopher_repetition=GopherRepetitionConfig(enabled=False),
        gopher_quality=GopherQualityConfig(enabled=False),
        c4=C4Config(enabled=False),
    )


def minimal_curation() -> CurationConfig:
    """Normalisation and exact dedup only: the text as it came, minus copies."""
    return CurationConfig(
        gopher_repetition=GopherRepetitionConfig(enabled=False),
        gopher_quality=GopherQualityConfig(enabled=False),
        c4=C4Config(enabled=False),
        dedup=DedupConfig(near=False),
    )


PRESETS = {"web": web_curation, "code": code_curation, "minimal": minimal_curation}
FILTER_STAGES = ("length", "characters", "gopher_repetition", "gopher_quality", "c4")
"""Filter families in the order they run (FineWeb's order for the Gopher and C4 rules)."""


class CurationError(ValueError):
    """A curation setting that cannot work; the message names it."""


def check_curation_config(cfg: CurationConfig, prefix: str = "curation") -> None:
    if cfg.backend not in ("fast", "datatrove"):
        raise CurationError(f"{prefix}.backend={cfg.backend!r} is not allowed; allowed: fast, datatrove")
    if cfg.normalize.unicode_form not in (None, "NFC", "NFKC", "NFD", "NFKD"):
        raise CurationError(
            f"{prefix}.normalize.unicode_form={cfg.normalize.unicode_form!r}; allowed: NFC, NFKC, null"
        )
    d = cfg.dedup
    if not 0 < d.threshold <= 1:
        raise CurationError(f"{prefix}.dedup.threshold={d.threshold} must be in (0, 1]")
    if d.num_perm < 2 or d.ngram < 1:
        raise CurationError(
            f"{prefix}.dedup.num_perm={d.num_perm} must be >= 2 and dedup.ngram={d.ngram} >= 1"
        )
    if d.seed < 0:  # numpy's seeding refuses it, late and without the setting's name
        raise CurationError(f"{prefix}.dedup.seed={d.seed} must be >= 0")
    blank = cfg.normalize.max_blank_lines
    if blank is not None and blank < 0:  # -1 joined every line of every document
        raise CurationError(f"{prefix}.normalize.max_blank_lines={blank} must be >= 0 or null (keep them)")
    r = cfg.gopher_repetition
    for name in ("max_top_ngram_char_fraction", "max_duplicate_ngram_char_fraction"):
        bad = [n for n in getattr(r, name) if not (isinstance(n, int) and n >= 1)]
        if bad:
            raise CurationError(
                f"{prefix}.gopher_repetition.{name} has n-gram length {bad[0]!r}; allowed: whole numbers >= 1"
            )


# -- normalisation ----------------------------------------------------------------------------------------

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
OTHER_LINE_BREAKS = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # str.splitlines' besides \n and \r
TRAILING_SPACE = re.compile(r"[ \t]+(?=\n|\Z)")


def normalize(text: str, cfg: NormalizeConfig) -> str:
    if not cfg.enabled:
        return text
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if OTHER_LINE_BREAKS.search(text):  # line breaks to str.splitlines (datatrove's line rules) too, not glue
        text = OTHER_LINE_BREAKS.sub("\n", text)
    if cfg.remove_control_chars:
        text = CONTROL.sub("", text)
    if cfg.unicode_form and not unicodedata.is_normalized(cfg.unicode_form, text):
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.strip_trailing_whitespace and (" \n" in text or "\t\n" in text or text.endswith((" ", "\t"))):
        text = TRAILING_SPACE.sub("", text)  # (the substring tests first: much cheaper than the regex scan)
    if cfg.max_blank_lines is not None:
        runs = cfg.max_blank_lines + 1  # k blank lines = k + 1 newlines in a row
        text = re.sub("\n" * runs + "\n+", "\n" * runs, text)
    return text.strip("\n")


# -- the filters (fast backend) ---------------------------------------------------------------------------
# Each returns None to keep the document, or the name of the rule that removes it ("family.setting", so the
# report names the setting to change). C4 may also return a shortened text.

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
PARAGRAPH_BREAK = re.compile(r"\n{2,}")
LINE_BREAKS = re.compile(r"\n+")
WORD = re.compile(r"[^\W_]+")
"""A word: a run of letters and digits (what TextView finds, for code that wants the strings)."""

_ASCII = [chr(c) for c in range(128)]
_ASCII_CLASSES = {
    name: np.array([test(c) for c in _ASCII] + [False])  # index 128 stands for every non-ASCII character
    for name, test in (("alnum", str.isalnum), ("alpha", str.isalpha), ("space", str.isspace))
}
_POLY = np.uint64(0x100000001B3)  # odd: invertible modulo 2**64
_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i modulo 2**64 for i < n (grown on demand, kept for the process)."""
    global _powers, _inverse_powers
    if len(_powers) < n:
        size = max(n, 2 * len(_powers))
        inverse = np.uint64(pow(int(_POLY), -1, 2**64))
        with np.errstate(over="ignore"):  # wrapping modulo 2**64 is the point
            _powers = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, _POLY)]), dtype=np.uint64)
            _inverse_powers = np.cumprod(
                np.concatenate([[np.uint64(1)], np.full(size - 1, inverse)]), dtype=np.uint64
            )
    return _powers[:n], _inverse_powers[:n]


class TextView:
    """One document's characters as numpy arrays: character classes, words (runs of letters and digits) with
    their lengths and 64-bit hashes (case-insensitive, the same in every process), whitespace tokens. Computed
    once per document and shared by the filters and MinHash, with no Python loop over characters or words."""

    def __init__(self, text: str):
        self.text = text
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        index = np.minimum(codes, 128)
        self.alnum, self.alpha, self.space = (_ASCII_CLASSES[k][index] for k in ("alnum", "alpha", "space"))
        lower = codes + ((codes >= 65) & (codes <= 90)) * np.uint32(32)
        high = np.flatnonzero(codes >= 128)
        if len(high):
            unique, inverse = np.unique(codes[high], return_inverse=True)
            chars = [chr(c) for c in unique.tolist()]
            for name in ("alnum", "alpha", "space"):
                test = getattr(str, f"is{name}")
                getattr(self, name)[high] = np.array([test(c) for c in chars])[inverse]
            lowered = [c.lower() for c in chars]
            lower[high] = np.array([ord(x) if len(x) == 1 else ord(c) for x, c in zip(lowered, chars)])[
                inverse
            ]
        edges = np.diff(self.alnum.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
        self.word_starts = np.flatnonzero(edges == 1)
        self.word_lengths = np.flatnonzero(edges == -1) - self.word_starts
        self._lower = lower
        self._hashes: np.ndarray | None = None

    @property
    def n_words(self) -> int:
        return len(self.word_starts)

    @property
    def word_hashes(self) -> np.ndarray:
        """uint64 per word: sum of its lower-cased code points times P**position, position from the word's start."""
        if self._hashes is None:
            n = len(self._lower)
            powers, inverse = _power_tables(n + 1)
            prefix = np.zeros(n + 1, dtype=np.uint64)
            np.cumsum(self._lower.astype(np.uint64) * powers[:n], out=prefix[1:])
            starts, ends = self.word_starts, self.word_starts + self.word_lengths
            self._hashes = (prefix[ends] - prefix[starts]) * inverse[starts]
        return self._hashes

    def tokens(self) -> tuple[int, int]:
        """(whitespace-separated tokens, tokens holding at least one letter)."""
        visible = ~self.space
        starts = visible & ~np.concatenate([[False], visible[:-1]])
        n_tokens = int(np.count_nonzero(starts))
        token_of = np.cumsum(starts)  # 1-based token number of each character
        letters = token_of[self.alpha]  # non-decreasing: distinct values = 1 + the steps
        letter_tokens = int(np.count_nonzero(letters[1:] != letters[:-1])) + 1 if len(letters) else 0
        return n_tokens, letter_tokens


def word_hash(word: str) -> int:
    """The hash TextView gives `word` (lower-case it first)."""
    return int(TextView(word.lower()).word_hashes[0])


STOP_WORD_HASHES = np.array([word_hash(w) for w in STOP_WORDS], dtype=np.uint64)


def length_rule(text: str, cfg: LengthConfig) -> str | None:
    if cfg.min_chars is not None and len(text) < cfg.min_chars:
        return "length.min_chars"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "length.max_chars"
    return None


def characters_rule(text: str, cfg: CharactersConfig, view: TextView | None = None) -> str | None:
    if cfg.min_alphanumeric_fraction is not None:
        view = view or TextView(text)
        visible = len(text) - int(np.count_nonzero(view.space))
        if visible == 0 or int(np.count_nonzero(view.alnum)) / visible < cfg.min_alphanumeric_fraction:
            return "characters.min_alphanumeric_fraction"
    return _line_length_rule(text, cfg)


def _line_length_rule(text: str, cfg: CharactersConfig) -> str | None:
    if cfg.max_line_length is not None or cfg.max_mean_line_length is not None:
        lines = text.split("\n")
        if cfg.max_line_length is not None and max(map(len, lines)) > cfg.max_line_length:
            return "characters.max_line_length"
        if (
            cfg.max_mean_line_length is not None
            and (len(text) - len(lines) + 1) / len(lines) > cfg.max_mean_line_length
        ):
            return "characters.max_mean_line_length"
    return None


def gopher_quality_rule(text: str, cfg: GopherQualityConfig, view: TextView | None = None) -> str | None:
    view = view or TextView(text)
    n_tokens, letter_tokens = view.tokens()
    stop = 0
    if cfg.min_stop_words is not None:
        stop = np.unique(view.word_hashes[np.isin(view.word_hashes, STOP_WORD_HASHES)]).size
    chars = int(view.word_lengths.sum())
    return _quality_checks(text, cfg, view.n_words, chars, n_tokens, letter_tokens, stop)


def _duplicate_counts(parts: list[str]) -> tuple[int, int]:
    """Elements that repeat an earlier one, and their characters."""
    count = len(parts) - len(set(parts))
    if not count:
        return 0, 0
    return count, sum(len(part) * (n - 1) for part, n in Counter(parts).items() if n > 1)


def _line_paragraph_rule(text: str, cfg: GopherRepetitionConfig) -> str | None:
    """Gopher's duplicate paragraph and line rules (the first four repetition checks)."""
    stripped = text.strip()
    if not stripped:
        return "gopher_repetition.empty"
    # str.split where it equals the regex split (no run of 3+ newlines; strip() left none at the ends)
    paragraphs = stripped.split("\n\n") if "\n\n\n" not in stripped else PARAGRAPH_BREAK.split(stripped)
    dup, dup_chars = _duplicate_counts(paragraphs)
    if (
        cfg.max_duplicate_paragraph_fraction is not None
        and dup / len(paragraphs) > cfg.max_duplicate_paragraph_fraction
    ):
        return "gopher_repetition.max_duplicate_paragraph_fraction"
    if (
        cfg.max_duplicate_paragraph_char_fraction is not None
        and dup_chars / len(text) > cfg.max_duplicate_paragraph_char_fraction
    ):
        return "gopher_repetition.max_duplicate_paragraph_char_fraction"
    lines = stripped.split("\n")
    if "\n\n" in stripped:
        lines = [line for line in lines if line]
    dup, dup_chars = _duplicate_counts(lines)
    if cfg.max_duplicate_line_fraction is not None and dup / len(lines) > cfg.max_duplicate_line_fraction:
        return "gopher_repetition.max_duplicate_line_fraction"
    if (
        cfg.max_duplicate_line_char_fraction is not None
        and dup_chars / len(text) > cfg.max_duplicate_line_char_fraction
    ):
        return "gopher_repetition.max_duplicate_line_char_fraction"
    return None


_GRAM_MIX = np.uint64(0x9E3779B97F4A7C15)


def _ngram_hashes(word_ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash per n-gram starting position: h_n[i] = h_(n-1)[i] * M + word[i + n - 1] (wrapping)."""
    return _NGrams(word_ids).of(n)


class _NGrams:
    """n-gram hashes for growing n, each from the previous one (one pass per n)."""

    def __init__(self, word_ids: np.ndarray):
        self.ids, self.n, self.hashes = word_ids, 1, word_ids

    def of(self, n: int) -> np.ndarray:
        if n < self.n:
            self.n, self.hashes = 1, self.ids
        while self.n < n:
            self.hashes = self.hashes[:-1] * _GRAM_MIX + self.ids[self.n :]
            self.n += 1
        return self.hashes


def _first_occurrence(hashes: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(hashes), dtype=bool)
    mask[np.unique(hashes, return_index=True)[1]] = True
    return mask


def gopher_repetition_rule(
    text: str, cfg: GopherRepetitionConfig, view: TextView | None = None
) -> str | None:
    reason = _line_paragraph_rule(text, cfg)
    if reason is not None:
        return reason
    if not cfg.max_top_ngram_char_fraction and not cfg.max_duplicate_ngram_char_fraction:
        return None
    view = view or TextView(text)
    if not view.n_words:
        return None
    ids, lengths = view.word_hashes, view.word_lengths
    n_words = len(ids)
    total = int(lengths.sum())
    cum = np.concatenate([[0], np.cumsum(lengths)])
    grams = _NGrams(ids)
    for n, limit in sorted(cfg.max_top_ngram_char_fraction.items()):
        if n_words < n:
            continue
        _, first, counts = np.unique(grams.of(n), return_index=True, return_counts=True)
        most = int(counts.max())
        if most < 2:
            continue
        # of the n-grams tied for the most occurrences, the first to occur (datatrove's Counter.most_common),
        # not the one the hash order puts first
        start = int(first[counts == most].min())
        if most * (cum[start + n] - cum[start]) / total > limit:
            return f"gopher_repetition.max_top_ngram_char_fraction.{n}"
    limits = sorted(cfg.max_duplicate_ngram_char_fraction.items())
    for i, (n, limit) in enumerate(limits):
        if n_words < n:
            break
        repeated = np.flatnonzero(~_first_occurrence(grams.of(n)))
        # words covered by any repeated occurrence: +1 at its start, -1 after its end, running sum > 0
        edges = np.bincount(repeated, minlength=n_words + 1) - np.bincount(
            repeated + n, minlength=n_words + 1
        )
        fraction = int(lengths[np.cumsum(edges[:-1]) > 0].sum()) / total
        if fraction > limit:
            return f"gopher_repetition.max_duplicate_ngram_char_fraction.{n}"
        # a repeated (n+1)-gram is two repeated n-grams: coverage only shrinks as n grows, so stop once it is
        # below every larger n's limit (the usual case: a clean document needs only its 5-grams hashed)
        if fraction <= min((x for _, x in limits[i + 1 :]), default=float("inf")):
            break
    return None


CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]", re.IGNORECASE)
TERMINAL = (".", "!", "?", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
SENTENCE_END = re.compile(r"[.!?]+(?:['\"]|\s|$)")


def c4_rule(text: str, cfg: C4Config) -> tuple[str | None, str | None, int]:
    """(kept text or None, reason, lines dropped)."""
    # Document-level pre-checks decide which per-line tests can ever fire: a phrase found in a line is found in
    # the lower-cased document (lower() maps characters one by one), unless removing a citation marker joins
    # its pieces, so with markers present every test runs on every line.
    cite = cfg.remove_citations and "[" in text
    lower_doc = (
        text.lower()
        if (cfg.drop_lorem_ipsum or cfg.remove_javascript_lines or cfg.remove_policy_lines)
        else ""
    )
    lorem = cfg.drop_lorem_ipsum and (cite or "lorem ipsum" in lower_doc)
    javascript = cfg.remove_javascript_lines and (cite or "javascript" in lower_doc)
    policy = cfg.remove_policy_lines and (cite or any(p in lower_doc for p in POLICY))
    curly = cfg.drop_curly_bracket and "{" in text
    phrases = lorem or javascript or policy
    terminal, max_word = cfg.require_terminal_punctuation, cfg.max_word_length
    min_words, min_sentences = cfg.min_words_per_line, cfg.min_sentences
    kept: list[str] = []
    sentences = dropped = 0
    for raw_line in text.split("\n"):
        line = raw_line.strip()
        if not line:
            continue  # blank lines are layout, not content: neither kept nor counted
        if (
            max_word is not None
            and len(line) > max_word  # (no word is longer than its line: skip the scan)
            and max(map(len, line.split())) > max_word
        ):
            dropped += 1
            continue
        words_of = line  # (words are counted before the markers go, as C4 does)
        if cite:  # then strip again: "a fact. [1]" keeps its line (C4 itself would drop it)
            line = CITATION.sub("", line).strip()
        if terminal and (not line.endswith(TERMINAL) or line.endswith("...")):
            dropped += 1
            continue
        if min_words is not None and len(words_of.split(None, min_words)) < min_words:
            dropped += 1
            continue
        if phrases:
            lower = line.lower()
            if lorem and "lorem ipsum" in lower:
                return None, "c4.drop_lorem_ipsum", dropped
            if javascript and "javascript" in lower:
                dropped += 1
                continue
        if curly and "{" in line:
            return None, "c4.drop_curly_bracket", dropped
        if policy and any(p in lower for p in POLICY):
            dropped += 1
            continue
        if min_sentences is not None and sentences < min_sentences:  # (only whether it reaches the minimum)
            sentences += max(1, len(SENTENCE_END.findall(line)))
        kept.append(line)
    if not kept:
        return None, "c4.no_line_left", dropped
    if min_sentences is not None and sentences < min_sentences:
        return None, "c4.min_sentences", dropped
    return "\n".join(kept), None, dropped


# -- the filters on a whole batch (fast backend) ----------------------------------------------------------
# The same rules as above, computed for many documents at once: one numpy pass over the batch's characters
# and words instead of a few dozen small numpy calls per document (which cost more than the arithmetic).

_ALNUM, _ALPHA, _SPACE = 1, 2, 4
_CLASS_TABLE = np.array(
    [c.isalnum() * _ALNUM | c.isalpha() * _ALPHA | c.isspace() * _SPACE for c in _ASCII] + [0], dtype=np.uint8
)


def _segment_sums(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """sum(values[s:e]) for each (s, e), exact in int64 (empty ranges give 0)."""
    cum = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=cum[1:])
    return cum[ends] - cum[starts]


class BatchView:
    """TextView for many documents at once: the texts joined by a newline (not a word character, a whitespace
    token boundary), the character classes, words, lengths and hashes of all of them in one set of arrays, and
    each document's range of characters and of words. Word hashes equal TextView's (position-relative)."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        n = len(texts)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
        self.char_starts = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1] + 1, out=self.char_starts[1:])
        self.char_ends = self.char_starts + lengths
        codes = np.frombuffer("\n".join(texts).encode("utf-32-le"), dtype=np.uint32)
        self.classes = _CLASS_TABLE[np.minimum(codes, 128)]
        lower = codes + (codes - np.uint32(65) < 26) * np.uint32(32)
        high = np.flatnonzero(codes >= 128)
        if len(high):
            unique, inverse = np.unique(codes[high], return_inverse=True)
            chars = [chr(c) for c in unique.tolist()]
            self.classes[high] = np.array(
                [c.isalnum() * _ALNUM | c.isalpha() * _ALPHA | c.isspace() * _SPACE for c in chars],
                dtype=np.uint8,
            )[inverse]
            lowered = [c.lower() for c in chars]
            lower[high] = np.array([ord(x) if len(x) == 1 else ord(c) for x, c in zip(lowered, chars)])[
                inverse
            ]
        alnum = (self.classes & _ALNUM).view(bool)
        edges = np.diff(alnum.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        self.word_lengths = ends - starts
        self.word_starts = np.searchsorted(starts, self.char_starts)  # each document's words: [start, end)
        self.word_ends = np.searchsorted(starts, self.char_ends)
        self.n_words = self.word_ends - self.word_starts
        powers, inverse_powers = _power_tables(len(lower) + 1)
        prefix = np.zeros(len(lower) + 1, dtype=np.uint64)
        np.cumsum(lower.astype(np.uint64) * powers[: len(lower)], out=prefix[1:])
        self.word_hashes = (prefix[ends] - prefix[starts]) * inverse_powers[starts]
        self.word_doc = np.repeat(np.arange(n), self.n_words)
        self.word_doc_end = np.repeat(self.word_ends, self.n_words)
        self.word_chars = _segment_sums(self.word_lengths, self.word_starts, self.word_ends)
        self._grams = {1: self.word_hashes}

    def __len__(self) -> int:
        return len(self.texts)

    def grams(self, n: int) -> np.ndarray:
        """n-gram hashes at every word position of the batch (as _ngram_hashes; those that run past their
        document's last word are garbage: see valid())."""
        while n not in self._grams:
            m = max(k for k in self._grams if k < n)
            self._grams[m + 1] = self._grams[m][:-1] * _GRAM_MIX + self.word_hashes[m:]
        return self._grams[n]

    def valid(self, n: int) -> np.ndarray:
        """bool per n-gram position: the n-gram lies inside one document."""
        size = max(len(self.word_hashes) - n + 1, 0)
        return np.arange(n, size + n) <= self.word_doc_end[:size]

    def char_counts(self, mask: np.ndarray) -> np.ndarray:
        return _segment_sums(mask, self.char_starts, self.char_ends)

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """Per document: (whitespace-separated tokens, tokens holding at least one letter)."""
        visible = (self.classes & _SPACE) == 0
        starts = visible.copy()
        starts[1:] &= ~visible[:-1]
        n_tokens = self.char_counts(starts)
        alpha = np.flatnonzero(self.classes & _ALPHA)
        token_of = np.cumsum(starts)[alpha]
        first = alpha[np.concatenate([[True], token_of[1:] != token_of[:-1]])] if len(alpha) else alpha
        letter_tokens = np.searchsorted(first, self.char_ends) - np.searchsorted(first, self.char_starts)
        return n_tokens, letter_tokens


def characters_batch(view: BatchView, rows: list[int], cfg: CharactersConfig) -> list[str | None]:
    """characters_rule for view.texts[rows]."""
    if cfg.min_alphanumeric_fraction is not None:
        spaces = view.char_counts((view.classes & _SPACE).view(bool))
        alnums = view.char_counts((view.classes & _ALNUM).view(bool))
    reasons: list[str | None] = []
    for r in rows:
        text = view.texts[r]
        if cfg.min_alphanumeric_fraction is not None:
            visible = len(text) - int(spaces[r])
            if visible == 0 or int(alnums[r]) / visible < cfg.min_alphanumeric_fraction:
                reasons.append("characters.min_alphanumeric_fraction")
                continue
        reasons.append(_line_length_rule(text, cfg))
    return reasons


def gopher_quality_batch(view: BatchView, rows: list[int], cfg: GopherQualityConfig) -> list[str | None]:
    """gopher_quality_rule for view.texts[rows]: the numpy figures for all at once, the checks in order."""
    n_words, chars = view.n_words, view.word_chars
    n_tokens, letter_tokens = view.tokens()
    stop = np.isin(view.word_hashes, STOP_WORD_HASHES)
    which = np.searchsorted(np.sort(STOP_WORD_HASHES), view.word_hashes[stop])
    pairs = np.unique(view.word_doc[stop] * len(STOP_WORD_HASHES) + which)
    stop_words = np.bincount(pairs // len(STOP_WORD_HASHES), minlength=len(view))
    reasons: list[str | None] = []
    for r in rows:
        reasons.append(_quality_checks(view.texts[r], cfg, int(n_words[r]), int(chars[r]), int(n_tokens[r]),
                                       int(letter_tokens[r]), int(stop_words[r])))  # fmt: skip
    return reasons


def _quality_checks(
    text: str,
    cfg: GopherQualityConfig,
    n_words: int,
    chars: int,
    n_tokens: int,
    letter_tokens: int,
    stop: int,
) -> str | None:
    if cfg.min_words is not None and n_words < cfg.min_words:
        return "gopher_quality.min_words"
    if cfg.max_words is not None and n_words > cfg.max_words:
        return "gopher_quality.max_words"
    if n_words == 0:
        return "gopher_quality.min_words"
    mean_length = chars / n_words
    if cfg.min_mean_word_length is not None and mean_length < cfg.min_mean_word_length:
        return "gopher_quality.min_mean_word_length"
    if cfg.max_mean_word_length is not None and mean_length > cfg.max_mean_word_length:
        return "gopher_quality.max_mean_word_length"
    if cfg.max_symbol_word_ratio is not None:
        if text.count("#") / n_tokens > cfg.max_symbol_word_ratio:
            return "gopher_quality.max_symbol_word_ratio"
        if (text.count("...") + text.count("…")) / n_tokens > cfg.max_symbol_word_ratio:
            return "gopher_quality.max_symbol_word_ratio"
    if cfg.max_bullet_lines_fraction is not None or cfg.max_ellipsis_lines_fraction is not None:
        lines = text.split("\n")
        if cfg.max_bullet_lines_fraction is not None:
            bullets = (
                sum(1 for line in lines if line.lstrip().startswith(("•", "-")))
                if "-" in text or "•" in text
                else 0
            )
            if bullets / len(lines) > cfg.max_bullet_lines_fraction:
                return "gopher_quality.max_bullet_lines_fraction"
        if cfg.max_ellipsis_lines_fraction is not None:
            ellipses = (
                sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
                if "..." in text or "…" in text
                else 0
            )
            if ellipses / len(lines) > cfg.max_ellipsis_lines_fraction:
                return "gopher_quality.max_ellipsis_lines_fraction"
    if cfg.min_alpha_words_fraction is not None and letter_tokens / n_tokens < cfg.min_alpha_words_fraction:
        return "gopher_quality.min_alpha_words_fraction"
    if cfg.min_stop_words is not None and stop < cfg.min_stop_words:
        return "gopher_quality.min_stop_words"
    return None


def _groups(view: BatchView, n: int, positions: np.ndarray):
    """Group the n-grams at `positions` by (document, hash): the sort order, the group starts, sizes and
    documents (groups ordered by document then hash; members by position)."""
    grams, docs = view.grams(n)[positions], view.word_doc[positions]
    order = np.lexsort((grams, docs))
    grams, docs = grams[order], docs[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (grams[1:] != grams[:-1]) | (docs[1:] != docs[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(order)))
    return order, starts, sizes, docs[starts]


def gopher_repetition_batch(
    view: BatchView, rows: list[int], cfg: GopherRepetitionConfig
) -> list[str | None]:
    """gopher_repetition_rule for view.texts[rows]. The n-gram rules: n-grams grouped by (document, hash) with
    one sort per n over the batch, and only where they can repeat: an n-gram repeats only if the (n-1)-grams
    at its position and the next do, so each n sorts the survivors of the one before (in prose, a few percent
    by n = 5). A document leaves once decided: removed by a rule (all rules before it checked), or its
    repeated n-gram coverage is below every later limit (coverage only shrinks as n grows)."""
    reasons: dict[int, str | None] = {r: _line_paragraph_rule(view.texts[r], cfg) for r in rows}
    top, dup = dict(cfg.max_top_ngram_char_fraction), dict(cfg.max_duplicate_ngram_char_fraction)
    if not top and not dup:
        return [reasons[r] for r in rows]
    active = np.zeros(len(view), dtype=bool)
    active[[r for r in rows if reasons[r] is None]] = True
    active &= view.n_words > 0
    total = np.maximum(view.word_chars, 1)
    cum = np.zeros(len(view.word_lengths) + 1, dtype=np.int64)
    np.cumsum(view.word_lengths, out=cum[1:])
    last_top = max(top, default=0)
    dup_limits = sorted(dup.items())
    # every rule in check order -> its failures; a document's reason is its first failing rule
    failed: dict[str, np.ndarray] = {}
    order_of_rules = [f"max_top_ngram_char_fraction.{n}" for n in sorted(top)] + [
        f"max_duplicate_ngram_char_fraction.{n}" for n, _ in dup_limits
    ]
    repeated_before = None
    for n in range(min([*top, *dup]), max([*top, *dup]) + 1):
        if not active.any():
            break
        valid = view.valid(n)
        valid &= active[view.word_doc[: len(valid)]]
        if repeated_before is not None:  # repeats only where the (n-1)-grams here and next repeat
            valid &= repeated_before[: len(valid)] & repeated_before[1 : len(valid) + 1]
        positions = np.flatnonzero(valid)
        order, starts, sizes, docs = _groups(view, n, positions)
        repeated_before = np.zeros(len(view.grams(n)), dtype=bool)
        repeated_before[positions[order[np.repeat(sizes > 1, sizes)]]] = True
        if n in top:
            many = sizes > 1
            g_starts, g_sizes, g_docs = starts[many], sizes[many], docs[many]
            fail = np.zeros(len(view), dtype=bool)
            if len(g_docs):
                seg = np.flatnonzero(np.concatenate([[True], g_docs[1:] != g_docs[:-1]]))
                most = np.maximum.reduceat(g_sizes, seg)
                is_top = g_sizes == np.repeat(most, np.diff(np.append(seg, len(g_docs))))
                candidates = np.flatnonzero(is_top)
                per_doc = np.flatnonzero(
                    np.concatenate([[True], g_docs[candidates][1:] != g_docs[candidates][:-1]])
                )
                # a group's first member is its first occurrence; of a document's tied groups, the earliest
                first_pos = np.minimum.reduceat(positions[order[g_starts[candidates]]], per_doc)
                firsts = candidates[per_doc]
                d = g_docs[firsts]
                fraction = g_sizes[firsts] * (cum[first_pos + n] - cum[first_pos]) / total[d]
                fail[d[fraction > top[n]]] = True
            failed[f"max_top_ngram_char_fraction.{n}"] = fail & active
            active &= ~fail  # (top rules come first: the first one failing is the reason)
        if n in dup:
            later_member = np.ones(len(order), dtype=bool)
            later_member[starts] = False  # a group's first member is its first occurrence
            repeats = positions[order[later_member]]
            # words covered by any repeated occurrence: +1 at its start, -1 after its end, running sum > 0
            size = len(view.word_lengths) + 1
            edges = np.bincount(repeats, minlength=size) - np.bincount(repeats + n, minlength=size)
            covered = np.cumsum(edges[:-1]) > 0
            fraction = _segment_sums(view.word_lengths * covered, view.word_starts, view.word_ends) / total
            fail = (fraction > dup[n]) & active
            failed[f"max_duplicate_ngram_char_fraction.{n}"] = fail
            later = min((x for m, x in dup_limits if m > n), default=float("inf"))
            settled = fail | (fraction <= later)
            if n >= last_top:  # (every top rule checked: a dup failure is the reason, a pass is final)
                active &= ~settled
    out = []
    for r in rows:
        reason = reasons[r]
        if reason is None:
            for rule in order_of_rules:
                if rule in failed and failed[rule][r]:
                    reason = f"gopher_repetition.{rule}"
                    break
        out.append(reason)
    return out


MINHASH_BATCH_BLOCK = 4096
"""Shingles per block in minhash_batch (a num_perm x 4096 uint64 temporary: 4 MB at 128)."""


def minhash_batch(view: BatchView, rows: list[int], cfg: DedupConfig) -> list[np.ndarray | None]:
    """minhash() of view.texts[rows]: the shingles of all of them multiplied by the permutations in blocks,
    the minimum taken per document (np.minimum.reduceat over each block's runs of one document)."""
    n = cfg.ngram
    out: list[np.ndarray | None] = [None] * len(rows)
    select = np.zeros(len(view), dtype=bool)
    for k, r in enumerate(rows):
        words = int(view.n_words[r])
        if words >= n:
            select[r] = True
        elif words:  # fewer words than a shingle: one shingle of them all
            out[k] = _minhash_ids(view.word_hashes[view.word_starts[r] : view.word_ends[r]], cfg)
    if not select.any():
        return out
    valid = view.valid(n)
    valid &= select[view.word_doc[: len(valid)]]
    positions = np.flatnonzero(valid)
    grams = view.grams(n)[positions]
    grams ^= grams >> np.uint64(31)  # as _shingle_hashes
    grams *= MIX
    docs = view.word_doc[positions]
    a, b = _permutations(cfg.num_perm, cfg.seed)
    lowest = np.full((cfg.num_perm, len(view)), np.iinfo(np.uint64).max, dtype=np.uint64)
    a, b = a[:, None], b[:, None]
    for start in range(0, len(grams), MINHASH_BATCH_BLOCK):  # permutations x shingles: contiguous runs
        block = np.multiply(a, grams[None, start : start + MINHASH_BATCH_BLOCK])
        block += b
        d = docs[start : start + MINHASH_BATCH_BLOCK]
        runs = np.flatnonzero(np.concatenate([[True], d[1:] != d[:-1]]))
        ids = d[runs]
        lowest[:, ids] = np.minimum(lowest[:, ids], np.minimum.reduceat(block, runs, axis=1))
    signatures = np.ascontiguousarray((lowest >> np.uint64(32)).astype(np.uint32).T)
    for k, r in enumerate(rows):
        if select[r]:
            out[k] = signatures[r]
    return out


# -- the filters (datatrove backend) ----------------------------------------------------------------------


class DatatroveFilters:
    """datatrove's GopherRepetition, GopherQuality and C4Quality filters, set from this module's config."""

    def __init__(self, cfg: CurationConfig):
        try:
            from datatrove.pipeline.filters import (
                C4QualityFilter,
                GopherQualityFilter,
                GopherRepetitionFilter,
            )
        except ImportError as err:
            raise CurationError(
                f"curation.backend=datatrove needs `pip install datatrove spacy` ({err}); or use backend=fast"
            ) from None
        q, r, c = cfg.gopher_quality, cfg.gopher_repetition, cfg.c4
        self.filters = {
            "gopher_repetition": GopherRepetitionFilter(
                dup_line_frac=r.max_duplicate_line_fraction,
                dup_para_frac=r.max_duplicate_paragraph_fraction,
                dup_line_char_frac=r.max_duplicate_line_char_fraction,
                dup_para_char_frac=r.max_duplicate_paragraph_char_fraction,
                top_n_grams=tuple(sorted(r.max_top_ngram_char_fraction.items())),
                dup_n_grams=tuple(sorted(r.max_duplicate_ngram_char_fraction.items())),
            ),
            "gopher_quality": GopherQualityFilter(
                min_doc_words=q.min_words,
                max_doc_words=q.max_words,
                min_avg_word_length=q.min_mean_word_length,
                max_avg_word_length=q.max_mean_word_length,
                max_symbol_word_ratio=q.max_symbol_word_ratio,
                max_bullet_lines_ratio=q.max_bullet_lines_fraction,
                max_ellipsis_lines_ratio=q.max_ellipsis_lines_fraction,
                max_non_alpha_words_ratio=q.min_alpha_words_fraction,
                min_stop_words=q.min_stop_words,
            ),
            "c4": C4QualityFilter(
                split_paragraph=True,
                remove_citations=c.remove_citations,
                filter_no_terminal_punct=c.require_terminal_punctuation,
                min_num_sentences=-1 if c.min_sentences is None else c.min_sentences,
                min_words_per_line=-1 if c.min_words_per_line is None else c.min_words_per_line,
                max_word_length=-1 if c.max_word_length is None else c.max_word_length,
                filter_lorem_ipsum=c.drop_lorem_ipsum,
                filter_javascript=c.remove_javascript_lines,
                filter_curly_bracket=c.drop_curly_bracket,
                filter_policy=c.remove_policy_lines,
            ),
        }

    def __call__(self, stage: str, text: str) -> tuple[str | None, str | None]:
        from datatrove.data import Document

        doc = Document(text=text, id="0")
        verdict = self.filters[stage].filter(doc)
        if verdict is True or verdict == (True, None):
            return doc.text, None  # C4QualityFilter rewrites doc.text to the kept lines
        reason = verdict[1] if isinstance(verdict, tuple) else "removed"
        return None, f"{stage}.{reason}"


# -- MinHash + LSH ----------------------------------------------------------------------------------------

MIX = np.uint64(0x9E3779B97F4A7C15)


@lru_cache(maxsize=8)
def lsh_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.05) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted areas of false positives and false
    negatives of the LSH S-curve 1 - (1 - s^rows)^bands on either side of the threshold (datasketch's choice,
    weighted 1:19 toward recall: every candidate is verified on its signature, so a false positive costs one
    comparison while a false negative keeps a duplicate). At 0.8 and 128: 16 x 8, P(candidate | J=0.85) = 0.994."""
    grid = np.linspace(0, 1, 1001)
    below, above = grid <= threshold, grid > threshold
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = 1 - (1 - grid**rows) ** bands
        error = false_positive_weight * np.trapezoid(p[below], grid[below]) + (
            1 - false_positive_weight
        ) * np.trapezoid(1 - p[above], grid[above])
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def shingles(text: str, n: int, view: TextView | None = None) -> np.ndarray:
    """Distinct 64-bit hashes of the lower-cased word n-grams (stable across processes and runs)."""
    ids = (view or TextView(text)).word_hashes
    if not len(ids):
        return np.zeros(0, dtype=np.uint64)
    return np.unique(_shingle_hashes(ids, n))


def _shingle_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """The n-gram hashes of shingles(), repeats included (the minimum over them is the same)."""
    grams = _ngram_hashes(ids, min(n, len(ids)))
    grams = grams ^ (grams >> np.uint64(31))  # spread the bits before the multiply-shift permutations
    grams *= MIX
    return grams


def minhash(text: str, cfg: DedupConfig, view: TextView | None = None) -> np.ndarray | None:
    """uint32[num_perm] signature (None for a document without words): per permutation h(x) = (a*x + b) >> 32
    (multiply-shift), the minimum over the document's shingles."""
    return _minhash_ids((view or TextView(text)).word_hashes, cfg)


MINHASH_BLOCK = 2048
"""Shingles multiplied by the permutations at once (bounded temporaries: 2048 x num_perm x 8 bytes)."""


def _minhash_ids(ids: np.ndarray, cfg: DedupConfig) -> np.ndarray | None:
    if not len(ids):
        return None
    grams = _shingle_hashes(ids, cfg.ngram)
    a, b = _permutations(cfg.num_perm, cfg.seed)
    lowest = np.full(cfg.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(grams), MINHASH_BLOCK):  # bounded temporaries for long documents
        block = np.multiply(grams[start : start + MINHASH_BLOCK, None], a)
        block += b
        np.minimum(lowest, block.min(axis=0), out=lowest)
    return (lowest >> np.uint64(32)).astype(
        np.uint32
    )  # the top bits of the minimum = the minimum of the top bits


class DatatroveSignatures:
    """datatrove's MinhashDedupSignature shingling (its text simplification, spaCy words, sha1 hashes: its
    default xxhash passes str, which xxhash>=4 refuses), folded to the same uint32[num_perm] layout."""

    def __init__(self, cfg: DedupConfig):
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.hashing import HashConfig

        bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
        config = MinhashConfig(
            n_grams=cfg.ngram,
            num_buckets=bands,
            hashes_per_bucket=rows,
            seed=cfg.seed,
            hash_config=HashConfig(precision=32, hash_fc="sha1"),
        )
        self.step = MinhashDedupSignature(output_folder="/nonexistent", config=config)
        self.num_perm = cfg.num_perm

    def __call__(self, text: str, view=None) -> np.ndarray | None:
        grams = self.step.get_shingles(text)
        if not len(grams):
            return None
        flat = np.concatenate([np.asarray(b, dtype=np.uint32) for b in self.step.get_signature(grams)])
        # bands x rows may be fewer than num_perm columns (33 x 3 at threshold 0.5): repeat the real ones, so
        # the verification's match fraction stays an unbiased estimate of the Jaccard similarity (a constant
        # filler matches in every pair and raised it: 0.36 for a true 0.17)
        return np.resize(flat, self.num_perm)


def content_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


# -- deduplication: sorted group keys, candidate pairs, verification, first-kept-wins --------------------
# Nothing here grows with the corpus in memory: every document contributes a few fixed-size records (its
# content digest; one 64-bit key per LSH band), kept sorted per run (one run per chunk, on disk in the
# pipeline); the runs are merged one key-range partition at a time, and the verdicts are one byte per
# document (memory-mapped in the pipeline).

EXACT, NEAR = 1, 2
"""Verdicts besides 0 (kept): removed as an exact or as a near duplicate."""
PAIRS_PER_MEMBER = 16
"""A document sharing a group key (digest, LSH band) is compared with at most this many of the group's first
members: bounded work on huge groups (boilerplate copied thousands of times), where the first members decide."""
PARTITION_RECORDS = 500_000
"""Records (key, document) merged and sorted at once: the bound on the dedup's working memory (~30 MB)."""
VERIFY_PAIRS = 8192
"""Candidate pairs whose signatures are compared at once (bounds the memory of verification)."""


def lsh_keys(signatures: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """uint64[n, bands]: one key per LSH band (its rows hashed, the band number mixed in, so bands never share
    a key); equal keys = equal band rows, up to a 2**-64 collision that the verification catches."""
    bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
    n = len(signatures)
    s = np.ascontiguousarray(signatures[:, : bands * rows]).reshape(n, bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64) * MIX, (n, bands)).copy()
        for r in range(rows):
            h ^= s[:, :, r]
            h *= _GRAM_MIX
            h ^= h >> np.uint64(29)
    return h


def digest_keys(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(digests), dtype=np.uint64).copy() if digests else np.zeros(0, np.uint64)


def sorted_run(keys: np.ndarray, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keys, local document numbers) sorted by key then document, from keys[n] or keys[n, bands] (rows where
    `present` is False, e.g. documents without a signature, left out)."""
    keys = keys[:, None] if keys.ndim == 1 else keys  # (a chunk whose documents were all filtered: 0 rows)
    docs = np.repeat(np.arange(len(keys), dtype=np.uint32), keys.shape[1])
    flat = keys.ravel()
    if present is not None:
        keep = np.repeat(present, keys.shape[1])
        flat, docs = flat[keep], docs[keep]
    order = np.lexsort((docs, flat))
    return flat[order], docs[order]


@dataclass
class KeyRun:
    """One run of sorted records (arrays or memory maps) and the global number of its first document."""

    keys: np.ndarray
    docs: np.ndarray
    offset: int


def _group_pairs(keys: np.ndarray, docs: np.ndarray, limit: int) -> np.ndarray:
    """uint64 codes (i << 32 | j), i < j, pairing each member of a group of equal keys with each of the group's
    first `limit` earlier members."""
    if len(keys) < 2:
        return np.zeros(0, dtype=np.uint64)
    index = np.arange(len(keys))
    start = np.maximum.accumulate(np.where(np.concatenate([[True], keys[1:] != keys[:-1]]), index, 0))
    rank = index - start
    codes = []
    for t in range(min(limit, int(rank.max()))):
        sel = np.flatnonzero(rank > t)
        i, j = docs[start[sel] + t].astype(np.uint64), docs[sel].astype(np.uint64)
        codes.append((np.minimum(i, j) << np.uint64(32)) | np.maximum(i, j))
    return np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.uint64)


def release_pages(arrays) -> None:
    """Drop the resident pages of memory-mapped arrays (np.memmap / np.load(mmap_mode=...)). They stay in the
    page cache, so reading them again costs a page-cache hit; the process's resident set stays bounded by what
    one step of a pass touches, not by the size of the files it has walked through."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    for array in arrays:
        mapped = getattr(array, "_mmap", None)
        if advice is not None and mapped is not None and hasattr(mapped, "madvise"):
            mapped.madvise(advice)


def _partition_pairs(runs: list[KeyRun], budget: int, limit: int):
    """Candidate pair codes, one key-range partition at a time (each partition's records merged and sorted
    alone, so memory is bounded by `budget` records whatever the corpus size)."""
    total = sum(len(r.keys) for r in runs)
    parts = max(1, -(-total // budget))
    bounds = [p * 2**64 // parts for p in range(parts + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keys, docs = [], []
        for run in runs:
            a = int(np.searchsorted(run.keys, np.uint64(lo), "left"))
            b = len(run.keys) if hi >= 2**64 else int(np.searchsorted(run.keys, np.uint64(hi), "left"))
            if b > a:
                keys.append(np.asarray(run.keys[a:b]))
                docs.append(np.asarray(run.docs[a:b]).astype(np.uint64) + np.uint64(run.offset))
        k, d = (np.concatenate(keys), np.concatenate(docs)) if keys else (None, None)
        release_pages(a for run in runs for a in (run.keys, run.docs))  # what was read is copied into k, d
        if k is not None:
            order = np.argsort(k, kind="stable")  # runs come in document order, each sorted by (key, doc)
            yield _group_pairs(k[order], d[order], limit)


def find_duplicates(
    n_docs: int,
    exact_runs: list[KeyRun],
    near_runs: list[KeyRun],
    signatures,
    threshold: float,
    verdicts: np.ndarray | None = None,
    budget: int = PARTITION_RECORDS,
    limit: int = PAIRS_PER_MEMBER,
    workdir: Path | None = None,
) -> np.ndarray:
    """uint8 verdict per document in stream order: 0 kept, EXACT, NEAR. Greedy in document order: a document
    is removed when it equals (same digest), or near-duplicates (signature agreement >= threshold), an earlier
    KEPT document sharing its digest or one of its LSH band keys (among that group's first `limit` members).
    `signatures(indices)` returns the signature rows of those documents; `verdicts` (e.g. a memory map) receives
    the result; with `workdir` the verified pairs wait there (filed by range of documents) for the greedy pass,
    which settles one range of `budget` documents at a time."""
    verdicts = np.zeros(n_docs, dtype=np.uint8) if verdicts is None else verdicts
    verdicts[:] = 0
    span = max(budget, 1)  # documents per range of the greedy pass; verified pairs are filed by range of j
    ranges: dict[int, list] = {}

    def file(codes: np.ndarray, kind: int) -> None:
        r = (codes & np.uint64(0xFFFFFFFF)) // np.uint64(span)
        for value in np.unique(r).tolist():
            part = codes[r == value]
            if workdir is None:
                ranges.setdefault(value, []).append((part, kind))
            else:
                with open(workdir / f"pairs-{value:05d}-{kind}.u64", "ab") as f:
                    part.tofile(f)
                ranges.setdefault(value, [])

    for kind, runs in ((EXACT, exact_runs), (NEAR, near_runs)):
        for codes in _partition_pairs(runs, budget, limit):
            if kind == NEAR:
                keep = np.zeros(len(codes), dtype=bool)
                for s in range(0, len(codes), VERIFY_PAIRS):  # 2 x 4 MB of signatures at num_perm=128
                    block = codes[s : s + VERIFY_PAIRS]
                    a, b = signatures(block >> np.uint64(32)), signatures(block & np.uint64(0xFFFFFFFF))
                    keep[s : s + VERIFY_PAIRS] = (a == b).mean(axis=1) >= threshold
                codes = codes[keep]
            if len(codes):
                file(codes, kind)
    for value in sorted(ranges):
        if workdir is None:
            parts = ranges[value]
        else:
            parts = []
            for kind in (EXACT, NEAR):
                path = workdir / f"pairs-{value:05d}-{kind}.u64"
                if path.is_file():
                    parts.append((np.fromfile(path, dtype=np.uint64), kind))
                    path.unlink()
        codes = np.concatenate([c for c, _ in parts])
        kinds = np.concatenate([np.full(len(c), k, dtype=np.uint8) for c, k in parts])
        i, j = codes >> np.uint64(32), codes & np.uint64(0xFFFFFFFF)
        lo = value * span
        order = np.lexsort((kinds, j))  # by document, exact before near
        i, j, kinds = i[order].astype(np.int64), j[order].astype(np.int64), kinds[order]
        before = i < lo  # settled in an earlier range
        earlier = np.zeros(len(i), dtype=np.uint8)
        earlier[before] = verdicts[i[before]]
        local = np.zeros(min(span, n_docs - lo), dtype=np.uint8).tolist()
        for a, b, kind, settled, old in zip(
            i.tolist(), (j - lo).tolist(), kinds.tolist(), before.tolist(), earlier.tolist()
        ):
            # every i < j is settled when j's pairs come: greedy, first kept document wins
            if local[b] == 0 and (old if settled else local[a - lo]) == 0:
                local[b] = kind
        verdicts[lo : lo + len(local)] = np.array(local, dtype=np.uint8)
    return verdicts


# -- report -----------------------------------------------------------------------------------------------


@dataclass
class StageStats:
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    lines_removed: int = 0
    cpu_seconds: float = 0.0
    """CPU time of this stage (all threads of the process that ran it), summed over processes."""
    removed: Counter = field(default_factory=Counter)
    """rule -> documents it removed."""

    def merge(self, other: StageStats) -> None:
        for name in ("docs_in", "docs_out", "bytes_in", "bytes_out", "lines_removed", "cpu_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.removed.update(other.removed)

    def to_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "lines_removed": self.lines_removed,
            "cpu_seconds": round(self.cpu_seconds, 4),
            "removed": dict(sorted(self.removed.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StageStats:
        return cls(**{**d, "removed": Counter(d.get("removed", {}))})


STAGES = ("normalize", *FILTER_STAGES, "exact_dedup", "near_dedup")


class Report:
    """Per stage: documents and bytes in and out, removals by rule, seconds spent; tokens after the last."""

    def __init__(self, stages: tuple[str, ...] = STAGES):
        self.stages = {name: StageStats() for name in stages}
        self.tokens: dict[str, int] = {}
        self.documents: dict[str, int] = {}
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0
        """CPU time of the whole run: main process and workers, reading and writing included."""
        self.workers = 1
        self.peak_rss_mb: dict[str, float] = {}
        """Peak resident memory of the main process and of the largest worker."""

    def merge(self, stats: dict[str, StageStats]) -> None:
        for name, s in stats.items():
            self.stages[name].merge(s)

    def to_dict(self) -> dict:
        first = self.stages[next(iter(self.stages))]
        last = self.stages[next(reversed(self.stages))]
        mb = first.bytes_in / 1e6
        return {
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
            "input": {"documents": first.docs_in, "bytes": first.bytes_in},
            "output": {
                "documents": last.docs_out,
                "bytes": last.bytes_out,
                "tokens": self.tokens,
                "documents_per_split": self.documents,
            },  # fmt: skip
            "kept_fraction": {
                "documents": last.docs_out / first.docs_in if first.docs_in else 0.0,
                "bytes": last.bytes_out / first.bytes_in if first.bytes_in else 0.0,
            },
            "wall_seconds": round(self.wall_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "workers": self.workers,
            "peak_rss_mb": self.peak_rss_mb,
            "mb_per_s": mb / self.wall_seconds if self.wall_seconds else None,
            "mb_per_cpu_second": mb / self.cpu_seconds if self.cpu_seconds else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        report = cls(tuple(d["stages"]))
        report.stages = {name: StageStats.from_dict(s) for name, s in d["stages"].items()}
        report.tokens = dict(d["output"].get("tokens", {}))
        report.documents = dict(d["output"].get("documents_per_split", {}))
        report.wall_seconds, report.cpu_seconds = d.get("wall_seconds", 0.0), d.get("cpu_seconds", 0.0)
        report.workers, report.peak_rss_mb = d.get("workers", 1), d.get("peak_rss_mb", {})
        return report

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """A table: one row per stage, then the removal reasons beneath their stage."""
        header = ["stage", "docs in", "docs out", "MB in", "MB out", "kept", "MB/cpu-s", "removed by"]
        rows = []
        for name, s in self.stages.items():
            kept = f"{s.docs_out / s.docs_in:.1%}" if s.docs_in else "-"
            speed = f"{s.bytes_in / 1e6 / s.cpu_seconds:.1f}" if s.cpu_seconds > 1e-3 else "-"
            reasons = ", ".join(f"{rule} {n}" for rule, n in s.removed.most_common())
            if s.lines_removed:
                reasons = ", ".join(filter(None, [reasons, f"({s.lines_removed} lines dropped)"]))
            rows.append(
                [
                    name,
                    str(s.docs_in),
                    str(s.docs_out),
                    f"{s.bytes_in / 1e6:.2f}",
                    f"{s.bytes_out / 1e6:.2f}",
                    kept,
                    speed,
                    reasons or "-",
                ]  # fmt: skip
            )
        d = self.to_dict()
        total_kept = f"{d['kept_fraction']['documents']:.1%} docs, {d['kept_fraction']['bytes']:.1%} bytes"
        speed = f"{d['mb_per_cpu_second']:.2f}" if d["mb_per_cpu_second"] else "-"
        tokens = ", ".join(f"{split} {n}" for split, n in self.tokens.items())
        rows.append(["total", str(d["input"]["documents"]), str(d["output"]["documents"]),
                     f"{d['input']['bytes'] / 1e6:.2f}", f"{d['output']['bytes'] / 1e6:.2f}", total_kept, speed,
                     f"tokens: {tokens}" if tokens else "-"])  # fmt: skip
        return header, rows


# -- the per-document pipeline ----------------------------------------------------------------------------


@dataclass
class Curated:
    """A document that passed normalisation and every filter (dedup happens later, in document order)."""

    text: str
    digest: bytes | None
    signature: np.ndarray | None


class Curator:
    """Normalise and filter documents; compute what deduplication needs. Stateless across documents, so
    batches can go to worker processes; `Deduplicator` holds the cross-document state."""

    def __init__(self, cfg: CurationConfig):
        check_curation_config(cfg)
        self.cfg = cfg
        self.datatrove = DatatroveFilters(cfg) if cfg.backend == "datatrove" else None
        d = cfg.dedup
        if d.near:
            self.signature = (
                DatatroveSignatures(d) if cfg.backend == "datatrove" else lambda t, v: minhash(t, d, v)
            )
        self.stages = [name for name in FILTER_STAGES if getattr(cfg, name).enabled]

    def _filter(self, stage: str, text: str, view: TextView | None) -> tuple[str | None, str | None, int]:
        cfg = self.cfg
        if self.datatrove is not None and stage in self.datatrove.filters:
            kept, reason = self.datatrove(stage, text)
            return kept, reason, 0
        if stage == "c4":
            return c4_rule(text, cfg.c4)
        if stage == "length":
            reason = length_rule(text, cfg.length)
        else:
            rule = {"characters": characters_rule, "gopher_quality": gopher_quality_rule,
                    "gopher_repetition": gopher_repetition_rule}[stage]  # fmt: skip
            reason = rule(text, getattr(cfg, stage), view)
        return (None if reason else text), reason, 0

    def process(self, texts: list[str]) -> tuple[list[Curated | None], dict[str, StageStats]]:
        """One entry per input text (None where a filter removed it), and per-stage statistics (the dedup
        stages get only the seconds spent hashing here; `Deduplicator` counts their documents). The fast
        backend works on the whole batch at once (BatchView); the result is process_each's."""
        if self.datatrove is not None:
            return self.process_each(texts)
        return self._process_batch(texts)

    def _process_batch(self, texts: list[str]) -> tuple[list[Curated | None], dict[str, StageStats]]:
        cfg = self.cfg
        stats = {name: StageStats() for name in STAGES}
        t0 = time.process_time()
        docs: list[str] = []
        sizes: list[int] = []
        for raw in texts:
            text = normalize(raw, cfg.normalize)
            size = _utf8_size(text)
            _count(stats["normalize"], _utf8_size(raw), size)
            docs.append(text)
            sizes.append(size)
        stats["normalize"].cpu_seconds += time.process_time() - t0
        alive = list(range(len(docs)))
        view: BatchView | None = None  # of the texts when a rule first needs it; row[i] = document i's row
        row: dict[int, int] = {}
        rules = {"characters": characters_batch, "gopher_quality": gopher_quality_batch,
                 "gopher_repetition": gopher_repetition_batch}  # fmt: skip
        for stage in FILTER_STAGES:
            s = stats[stage]
            if stage not in self.stages:
                for i in alive:
                    _count(s, sizes[i], sizes[i])
                continue
            t0 = time.process_time()
            survivors = []
            if stage == "c4":
                for i in alive:
                    text = docs[i]
                    kept, reason, dropped = c4_rule(text, cfg.c4)
                    s.lines_removed += dropped
                    if kept is None:
                        _count(s, sizes[i], None)
                        s.removed[reason] += 1
                        continue
                    if kept is not text:
                        # only blank lines and line-end spaces gone: every word as it was, the view still holds
                        same = dropped == 0 and (
                            not cfg.c4.remove_citations or "[" not in text or CITATION.search(text) is None
                        )
                        if not same:
                            row.pop(i, None)
                        size = _utf8_size(kept)
                        _count(s, sizes[i], size)
                        docs[i], sizes[i] = kept, size
                    else:
                        _count(s, sizes[i], sizes[i])
                    survivors.append(i)
            else:
                if stage == "length":
                    reasons = [length_rule(docs[i], cfg.length) for i in alive]
                else:
                    if view is None:
                        view = BatchView([docs[i] for i in alive])
                        row = {i: k for k, i in enumerate(alive)}
                    reasons = rules[stage](view, [row[i] for i in alive], getattr(cfg, stage))
                for i, reason in zip(alive, reasons):
                    if reason:
                        _count(s, sizes[i], None)
                        s.removed[reason] += 1
                    else:
                        _count(s, sizes[i], sizes[i])
                        survivors.append(i)
            alive = survivors
            s.cpu_seconds += time.process_time() - t0
        out: list[Curated | None] = [None] * len(docs)
        t0 = time.process_time()
        digests = [content_digest(docs[i]) for i in alive] if cfg.dedup.exact else [None] * len(alive)
        t1 = time.process_time()
        signatures: list[np.ndarray | None] = [None] * len(alive)
        if cfg.dedup.near:
            reuse = [k for k, i in enumerate(alive) if i in row]
            fresh = [k for k, i in enumerate(alive) if i not in row]
            if reuse:
                for k, sig in zip(reuse, minhash_batch(view, [row[alive[k]] for k in reuse], cfg.dedup)):
                    signatures[k] = sig
            if fresh:
                other = BatchView([docs[alive[k]] for k in fresh])
                for k, sig in zip(fresh, minhash_batch(other, list(range(len(fresh))), cfg.dedup)):
                    signatures[k] = sig
        stats["exact_dedup"].cpu_seconds += t1 - t0
        stats["near_dedup"].cpu_seconds += time.process_time() - t1
        for i, digest, signature in zip(alive, digests, signatures):
            out[i] = Curated(docs[i], digest, signature)
        return out, stats

    def process_each(self, texts: list[str]) -> tuple[list[Curated | None], dict[str, StageStats]]:
        """process(), one document at a time through the per-document rules (the datatrove backend's path,
        and the reference the batch path is tested against)."""
        stats = {name: StageStats() for name in STAGES}
        out: list[Curated | None] = []
        for raw in texts:
            t0 = time.process_time()
            text = normalize(raw, self.cfg.normalize)
            _count(stats["normalize"], len(raw.encode("utf-8")), len(text.encode("utf-8")))
            stats["normalize"].cpu_seconds += time.process_time() - t0
            size = len(text.encode("utf-8"))
            view = None  # built on first use, shared by the rules until a rule changes the text
            words_view = None  # a view whose words are the text's, after a change that kept them
            for stage in FILTER_STAGES:
                s = stats[stage]
                if stage not in self.stages:
                    _count(s, size, size)
                    continue
                t0 = time.process_time()
                if view is None and stage in ("characters", "gopher_quality", "gopher_repetition"):
                    view = TextView(text)
                kept, reason, dropped = self._filter(stage, text, view)
                s.cpu_seconds += time.process_time() - t0
                s.lines_removed += dropped
                if kept is None:
                    _count(s, size, None)
                    s.removed[reason] += 1
                    text = None
                    break
                new_size = size if kept is text else len(kept.encode("utf-8"))
                if kept is not text:
                    # C4 that dropped only blank lines and line-end spaces leaves every word as it was: the
                    # view's words (all MinHash reads) still hold
                    same_words = (
                        stage == "c4" and dropped == 0 and view is not None and self.datatrove is None
                    )
                    if same_words and self.cfg.c4.remove_citations:
                        same_words = CITATION.search(text) is None
                    words_view = view if same_words else None
                    view = None
                _count(s, size, new_size)
                text, size = kept, new_size
            if text is None:
                out.append(None)
                continue
            t0 = time.process_time()
            digest = content_digest(text) if self.cfg.dedup.exact else None
            t1 = time.process_time()
            signature = self.signature(text, view or words_view) if self.cfg.dedup.near else None
            stats["exact_dedup"].cpu_seconds += t1 - t0
            stats["near_dedup"].cpu_seconds += time.process_time() - t1
            out.append(Curated(text, digest, signature))
        return out, stats


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _count(s: StageStats, size_in: int, size_out: int | None) -> None:
    s.docs_in += 1
    s.bytes_in += size_in
    if size_out is not None:
        s.docs_out += 1
        s.bytes_out += size_out


def count_verdicts(stats: dict[str, StageStats], sizes: np.ndarray, verdicts: np.ndarray) -> None:
    """Count documents (of `sizes` bytes) with these verdicts into stats["exact_dedup"] and ["near_dedup"]."""
    exact, near = stats["exact_dedup"], stats["near_dedup"]
    sizes = np.asarray(sizes, dtype=np.int64)
    is_exact, is_near = verdicts == EXACT, verdicts == NEAR
    total, exact_bytes, near_bytes = int(sizes.sum()), int(sizes[is_exact].sum()), int(sizes[is_near].sum())
    n_exact, n_near = int(is_exact.sum()), int(is_near.sum())
    exact.docs_in += len(sizes)
    exact.bytes_in += total
    exact.docs_out += len(sizes) - n_exact
    exact.bytes_out += total - exact_bytes
    near.docs_in += len(sizes) - n_exact
    near.bytes_in += total - exact_bytes
    near.docs_out += len(sizes) - n_exact - n_near
    near.bytes_out += total - exact_bytes - near_bytes
    if n_exact:
        exact.removed["exact_dedup.exact"] += n_exact
    if n_near:
        near.removed["near_dedup.threshold"] += n_near


def deduplicate(docs: list[Curated], cfg: DedupConfig) -> np.ndarray:
    """Verdicts (0 kept, EXACT, NEAR) for documents held in memory, in order (see find_duplicates)."""
    exact_runs, near_runs, table = [], [], None
    if cfg.exact and docs:
        exact_runs.append(KeyRun(*sorted_run(digest_keys([d.digest for d in docs])), 0))
    if cfg.near and docs:
        present = np.array([d.signature is not None for d in docs])
        table = np.zeros((len(docs), cfg.num_perm), dtype=np.uint32)
        if present.any():
            table[present] = np.stack([d.signature for d in docs if d.signature is not None])
        near_runs.append(KeyRun(*sorted_run(lsh_keys(table, cfg), present), 0))
    return find_duplicates(
        len(docs), exact_runs, near_runs, lambda rows: table[rows.astype(np.int64)], cfg.threshold
    )


def curate(texts, cfg: CurationConfig) -> tuple[list[str], Report]:
    """Curate an in-memory collection in one process: the kept texts (in order) and the report."""
    curator, report = Curator(cfg), Report()
    t0, c0 = time.perf_counter(), time.process_time()
    results, stats = curator.process(list(texts))
    report.merge(stats)
    docs = [doc for doc in results if doc is not None]
    c1 = time.process_time()
    verdicts = deduplicate(docs, cfg.dedup)
    count_verdicts(report.stages, np.array([len(d.text.encode("utf-8")) for d in docs]), verdicts)
    report.stages["near_dedup"].cpu_seconds += time.process_time() - c1
    kept = [doc.text for doc, v in zip(docs, verdicts.tolist()) if v == 0]
    report.wall_seconds, report.cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    return kept, report
