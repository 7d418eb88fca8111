"""Curation: each rule on crafted documents (kept and removed), normalisation, exact and near dedup, the report."""

from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

import numpy as np
import pytest

from llmtrain.data.curation import (
    CITATION,
    EXACT,
    NEAR,
    POLICY,
    SENTENCE_END,
    WORD,
    BatchView,
    C4Config,
    CharactersConfig,
    CurationConfig,
    CurationError,
    Curator,
    DedupConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    KeyRun,
    LengthConfig,
    NormalizeConfig,
    Report,
    TextView,
    _duplicate_counts,
    c4_rule,
    characters_batch,
    characters_rule,
    check_curation_config,
    code_curation,
    content_digest,
    curate,
    digest_keys,
    find_duplicates,
    gopher_quality_batch,
    gopher_quality_rule,
    gopher_repetition_batch,
    gopher_repetition_rule,
    length_rule,
    lsh_bands,
    lsh_keys,
    minhash,
    minhash_batch,
    minimal_curation,
    normalize,
    shingles,
    sorted_run,
)

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ter",
    "van",
    "sul",
    "dor",
    "pe",
    "ris",
    "nol",
    "ba",
    "quen",
    "tro",
    "fi",
    "gar",
]
STOP = ["the", "of", "and", "to", "that", "with", "have", "be"]


def vocabulary(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))
    return sorted(words)


WORDS = vocabulary()


def sentence(rng: random.Random) -> str:
    words = [
        rng.choice(STOP) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(rng.randint(8, 14))
    ]
    return " ".join(words).capitalize() + "."


def prose(seed: int, paragraphs: int = 4, lines: int = 3) -> str:
    """Varied English-like text: passes every web rule (checked below)."""
    rng = random.Random(seed)
    return "\n\n".join(
        "\n".join(" ".join(sentence(rng) for _ in range(2)) for _ in range(lines)) for _ in range(paragraphs)
    )


GOOD = [prose(seed) for seed in range(5)]
Q = GopherQualityConfig()
R = GopherRepetitionConfig()
C4 = C4Config()


@pytest.mark.parametrize("doc", GOOD)
def test_good_prose_passes_every_web_rule(doc):
    assert gopher_quality_rule(doc, Q) is None
    assert gopher_repetition_rule(doc, R) is None
    kept, reason, dropped = c4_rule(doc, C4)
    assert (kept, reason, dropped) == (doc.replace("\n\n", "\n"), None, 0)


def _words(n: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(STOP) if i % 3 == 0 else rng.choice(WORDS) for i in range(n))


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        (_words(30) + ".", "gopher_quality.min_words"),
        (" ".join("a" for _ in range(80)) + " the of and.", "gopher_quality.min_mean_word_length"),
        (" ".join("internationalisations" for _ in range(80)) + " the of.", "gopher_quality.max_mean_word_length"),
        (_words(80) + " " + " ".join("#tag" for _ in range(12)), "gopher_quality.max_symbol_word_ratio"),
        (_words(80) + " " + " ".join("wait..." for _ in range(12)), "gopher_quality.max_symbol_word_ratio"),
        ("\n".join("- " + _words(12, seed=i) for i in range(20)), "gopher_quality.max_bullet_lines_fraction"),
        ("\n".join(_words(12, seed=i) + ("…" if i % 2 else ".") for i in range(20)),
         "gopher_quality.max_ellipsis_lines_fraction"),
        (_words(60) + " " + " ".join(str(1000 + i) for i in range(30)), "gopher_quality.min_alpha_words_fraction"),
        (" ".join(random.Random(3).choice(WORDS) for _ in range(80)) + ".", "gopher_quality.min_stop_words"),
    ],
)  # fmt: skip
def test_gopher_quality_rules_remove_what_they_should(doc, rule):
    assert gopher_quality_rule(doc, Q) == rule
    family, setting = rule.split(".")
    off = dataclasses.replace(Q, **{setting: None})  # switched off, the same document passes that rule
    assert gopher_quality_rule(doc, off) != rule


def _lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng) + " " + sentence(rng) for _ in range(n)]


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        ("\n".join(_lines(10, 1) + [_lines(1, 2)[0]] * 6), "gopher_repetition.max_duplicate_line_fraction"),
        ("\n\n".join(_lines(6, 1) + ["See the notes."] * 5), "gopher_repetition.max_duplicate_paragraph_fraction"),
        # a long line repeated twice: few duplicate lines, most of the characters
        ("\n".join(_lines(4, 1) + [" ".join(_lines(6, 2))] * 2), "gopher_repetition.max_duplicate_line_char_fraction"),
        (" ".join(f"{w} foo bar." for w in random.Random(4).sample(WORDS, 60)), "gopher_repetition.max_top_ngram_char_fraction.2"),
        # one 12-word passage recurring in different lines: repeated 5..10-grams, no repeated line
        ("\n".join(f"{s} {' '.join(WORDS[:12])}." for s in _lines(8, 5)), "gopher_repetition.max_duplicate_ngram_char_fraction.5"),
    ],
)  # fmt: skip
def test_gopher_repetition_rules_remove_what_they_should(doc, rule):
    assert gopher_repetition_rule(doc, R) == rule
    assert gopher_repetition_rule(doc, dataclasses.replace(R, enabled=True, **_off(rule))) != rule


def _off(rule: str) -> dict:
    setting = rule.split(".")[1]
    return {setting: {} if setting.startswith(("max_top", "max_duplicate_ngram")) else None}


def test_c4_drops_lines_and_documents():
    good = _lines(6, 7)
    doc = "\n".join(
        [good[0], "Menu Home About", good[1], "Please enable javascript to view this page.", good[2],
         "This site uses cookies to improve the experience.", good[3], "Read more...", good[4], good[5] + " [1]", "Hi."]
    )  # fmt: skip
    kept, reason, dropped = c4_rule(doc, C4)
    assert reason is None and dropped == 5  # no terminal mark, javascript, cookies, ellipsis, too few words
    assert kept.split("\n") == good  # "Hi." has too few words
    assert "[1]" not in kept

    assert (
        c4_rule("\n".join(good + ["Lorem ipsum dolor sit amet, consectetur."]), C4)[1]
        == "c4.drop_lorem_ipsum"
    )
    assert c4_rule("\n".join(good + ["Set x = {a: 1} in the code now."]), C4)[1] == "c4.drop_curly_bracket"
    assert c4_rule("\n".join(good[:2]), C4)[1] == "c4.min_sentences"  # 4 sentences < 5
    assert c4_rule("no punctuation here at all\nnor here", C4)[1] == "c4.no_line_left"
    relaxed = dataclasses.replace(C4, require_terminal_punctuation=False, min_sentences=None)
    assert (
        c4_rule("no punctuation here at all\nnor here either", relaxed)[0]
        == "no punctuation here at all\nnor here either"
    )


def test_characters_and_length_rules():
    code = "def f(x):\n    return x + 1\n" * 5
    on = CharactersConfig(enabled=True)
    assert characters_rule(code, on) is None
    assert characters_rule("!!! ### $$$ %%% ^^^ &&& *** a1", on) == "characters.min_alphanumeric_fraction"
    assert characters_rule("x = 1\n" + "y" * 1001, on) == "characters.max_line_length"
    assert characters_rule("\n".join(["z" * 150] * 4), on) == "characters.max_mean_line_length"
    assert length_rule("abc", LengthConfig(min_chars=5)) == "length.min_chars"
    assert length_rule("abcdef", LengthConfig(max_chars=5)) == "length.max_chars"
    assert length_rule("abcde", LengthConfig(min_chars=5, max_chars=5)) is None


def test_normalize():
    cfg = NormalizeConfig()
    text = "Cafe\u0301 ok  \r\nline\x00two\t \r\n\n\n\n\nend\n"
    assert normalize(text, cfg) == "Caf\u00e9 ok\nlinetwo\n\n\nend"
    assert normalize(text, dataclasses.replace(cfg, enabled=False)) == text
    assert normalize("x\n\n\n\ny", dataclasses.replace(cfg, max_blank_lines=0)) == "x\ny"


# -- deduplication ----------------------------------------------------------------------------------------


def _edit(doc: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    words = doc.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def _jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = set(shingles(a, n).tolist()), set(shingles(b, n).tolist())
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard():
    cfg = DedupConfig(num_perm=256)
    base = prose(10, paragraphs=6)
    for edits in (2, 10, 40):
        other = _edit(base, edits, seed=edits)
        estimate, jaccard = float(np.mean(minhash(base, cfg) == minhash(other, cfg))), _jaccard(base, other)
        assert abs(estimate - jaccard) < 4 * (jaccard * (1 - jaccard) / cfg.num_perm) ** 0.5, edits  # 4 sigma


def test_lsh_bands_follow_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows <= 128
        above, below = min(threshold + 0.05, 1), threshold - 0.3
        # a duplicate a little above the threshold is a candidate; most clearly different documents are not
        assert 1 - (1 - above**rows) ** bands > 0.98
        assert 1 - (1 - below**rows) ** bands < 0.3


def test_exact_and_near_duplicates_are_removed_distinct_kept():
    originals = [prose(100 + i, paragraphs=5) for i in range(6)]
    exact_copy = originals[0].replace("\n", "   \n")  # trailing spaces: identical once normalised
    near = [_edit(originals[1], 3, seed=1), _edit(originals[2], 5, seed=2)]  # a few words changed
    far = _edit(originals[3], 150, seed=3)  # most of it rewritten: a different document
    cfg = dataclasses.replace(minimal_curation(), dedup=DedupConfig())  # no prose rules; both dedups on
    assert all(_jaccard(o, n) > 0.85 for o, n in zip(originals[1:3], near))
    kept, report = curate(originals + [exact_copy, *near, far], cfg)
    assert kept == [normalize(d, cfg.normalize) for d in originals + [far]]
    assert report.stages["exact_dedup"].removed == {"exact_dedup.exact": 1}
    assert report.stages["near_dedup"].removed == {"near_dedup.threshold": 2}
    # at a threshold above their similarity the near-duplicates stay
    strict = dataclasses.replace(cfg, dedup=DedupConfig(threshold=0.99))
    assert len(curate(originals + near, strict)[0]) == len(originals) + 2


def test_report_counts_add_up_and_render():
    docs = GOOD + [
        _words(20),
        GOOD[0],
        "\n".join(_lines(10, 1) + [_lines(1, 2)[0]] * 6),
        _edit(GOOD[1], 2, 9),
    ]
    kept, report = curate(docs, CurationConfig())
    d = report.to_dict()
    previous = None
    for name, s in d["stages"].items():
        assert s["docs_in"] - s["docs_out"] == sum(s["removed"].values()), name
        if previous is not None:
            assert (s["docs_in"], s["bytes_in"]) == (previous["docs_out"], previous["bytes_out"]), name
        previous = s
    assert d["input"]["documents"] == len(docs) and d["output"]["documents"] == len(kept) == len(GOOD)
    assert 0 < d["kept_fraction"]["documents"] < 1
    assert d["stages"]["gopher_quality"]["removed"] == {"gopher_quality.min_words": 1}
    header, rows = report.rows()
    assert [r[0] for r in rows][-1] == "total" and len(header) == len(rows[0])
    again = Report.from_dict(d).to_dict()
    assert (again["stages"], again["output"], again["kept_fraction"]) == (
        d["stages"],
        d["output"],
        d["kept_fraction"],
    )


def test_presets_and_config_checks():
    assert not code_curation().gopher_quality.enabled and code_curation().characters.enabled
    assert not minimal_curation().dedup.near
    with pytest.raises(CurationError, match="backend='spacy'"):
        check_curation_config(CurationConfig(backend="spacy"))
    with pytest.raises(CurationError, match="dedup.threshold=1.5"):
        check_curation_config(dataclasses.replace(CurationConfig(), dedup=DedupConfig(threshold=1.5)))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"normalize": NormalizeConfig(max_blank_lines=-1)}, "normalize.max_blank_lines=-1 must be >= 0"),
        ({"dedup": DedupConfig(seed=-1)}, "dedup.seed=-1 must be >= 0"),
        (
            {"gopher_repetition": GopherRepetitionConfig(max_top_ngram_char_fraction={0: 0.2})},
            "max_top_ngram_char_fraction has n-gram length 0",
        ),
        (
            {"gopher_repetition": GopherRepetitionConfig(max_duplicate_ngram_char_fraction={-1: 0.2})},
            "max_duplicate_ngram_char_fraction has n-gram length -1",
        ),
    ],
)
def test_curation_settings_that_failed_late_are_named(change, named):
    """max_blank_lines=-1 joined every line of every document (the C4 and Gopher line rules then saw one line);
    a negative dedup seed and n-gram lengths below 1 failed inside numpy, naming no setting."""
    with pytest.raises(CurationError, match=re.escape(named)):
        check_curation_config(dataclasses.replace(CurationConfig(), **change))


# -- the reference implementation: datatrove ----------------------------------------------------------------


def test_datatrove_backend_agrees_on_crafted_documents():
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    removed_q = [
        _words(30) + ".",
        " ".join("internationalisations" for _ in range(80)) + " the of.",
        _words(80) + " " + " ".join("#tag" for _ in range(12)),
        "\n".join("- " + _words(12, seed=i) for i in range(20)),
        " ".join(random.Random(3).choice(WORDS) for _ in range(80)) + ".",
    ]
    removed_r = [
        "\n".join(_lines(10, 1) + [_lines(1, 2)[0]] * 6),
        "\n\n".join(_lines(6, 1) + ["See the notes."] * 5),
        "\n".join(f"{s} {' '.join(WORDS[:12])}." for s in _lines(8, 5)),
    ]
    removed_c4 = [
        "\n".join(_lines(6, 7) + ["Lorem ipsum dolor sit amet, consectetur."]),
        "\n".join(_lines(2, 7)),
    ]
    docs = GOOD + removed_q + removed_r + removed_c4
    results = {}
    for backend in ("fast", "datatrove"):
        cfg = dataclasses.replace(CurationConfig(backend=backend), dedup=DedupConfig(exact=False, near=False))
        kept, report = curate(docs, cfg)
        results[backend] = (kept, {k: s.docs_out for k, s in report.stages.items()})
    assert results["fast"] == results["datatrove"]
    assert results["fast"][0] == [d.replace("\n\n", "\n") for d in GOOD]


def test_datatrove_signatures_find_the_same_near_duplicates():
    pytest.importorskip("datatrove")
    pytest.importorskip("spacy")
    originals = [prose(200 + i, paragraphs=5) for i in range(4)]
    docs = originals + [_edit(originals[0], 3, seed=5), _edit(originals[2], 4, seed=6)]
    for backend in ("fast", "datatrove"):
        cfg = dataclasses.replace(minimal_curation(), backend=backend, dedup=DedupConfig())
        kept, _ = curate(docs, cfg)
        assert kept == originals, backend


def test_datatrove_signatures_estimate_jaccard_when_bands_leave_columns_unused():
    """At threshold 0.5 the LSH uses 33 x 3 of 128 columns; the verification's match fraction over all 128
    must still estimate the Jaccard similarity of the shingle sets (a constant filler in the other 29 columns
    matched in every pair: 0.36 for a true 0.17, so pairs far below the threshold were removed)."""
    pytest.importorskip("datatrove")
    from llmtrain.data.curation import DatatroveSignatures, lsh_bands

    cfg = DedupConfig(threshold=0.5)
    assert np.prod(lsh_bands(0.5, cfg.num_perm)) < cfg.num_perm
    signatures = DatatroveSignatures(cfg)
    rng = random.Random(0)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        for _ in range(5000)
    ]
    estimates, truths = [], []
    for _ in range(10):
        words = [rng.choice(vocab) for _ in range(400)]
        edited = list(words)
        for i in rng.sample(range(400), 90):
            edited[i] = rng.choice(vocab)
        a, b = " ".join(words), " ".join(edited)
        sets = [{tuple(np.atleast_1d(g).tolist()) for g in signatures.step.get_shingles(t)} for t in (a, b)]
        truths.append(len(sets[0] & sets[1]) / len(sets[0] | sets[1]))
        estimates.append(float((signatures(a) == signatures(b)).mean()))
    assert np.mean(truths) < 0.25 and abs(np.mean(estimates) - np.mean(truths)) < 0.04, (estimates, truths)


def _signatures(docs: list[str], cfg: DedupConfig) -> np.ndarray:
    return np.stack([minhash(d, cfg) for d in docs])


def test_find_duplicates_across_runs_and_partitions_keeps_the_earlier():
    """Documents split over several runs (chunks) and merged in several key partitions: a near copy (a few
    words changed) in a later run is removed, its original kept, distinct documents kept; the same verdicts as
    one run merged at once."""
    cfg = DedupConfig()
    originals = [prose(300 + i, paragraphs=3) for i in range(12)]
    docs = originals + [_edit(originals[2], 2, seed=7), originals[5], _edit(originals[9], 3, seed=8)]
    table = _signatures(docs, cfg)
    digests = digest_keys([content_digest(d) for d in docs])
    expected = np.zeros(len(docs), dtype=np.uint8)
    expected[[12, 14]], expected[13] = NEAR, EXACT

    def runs(bounds, keys):
        return [KeyRun(*sorted_run(keys[a:b]), a) for a, b in zip(bounds[:-1], bounds[1:])]

    for bounds, budget in (([0, len(docs)], 10**6), ([0, 5, 10, 13, len(docs)], 7)):
        verdicts = find_duplicates(
            len(docs), runs(bounds, digests), runs(bounds, lsh_keys(table, cfg)),
            lambda rows: table[rows.astype(np.int64)], cfg.threshold, budget=budget,
        )  # fmt: skip
        assert verdicts.tolist() == expected.tolist(), (bounds, budget)


def test_find_duplicates_greedy_first_kept_wins():
    """A duplicate of a removed document is judged against the kept ones: B copies A (removed), C copies B."""
    cfg = DedupConfig()
    a = prose(400, paragraphs=4)
    docs = [a, _edit(a, 2, seed=1), _edit(a, 2, seed=2), prose(401, paragraphs=4)]
    table = _signatures(docs, cfg)
    verdicts = find_duplicates(
        len(docs), [], [KeyRun(*sorted_run(lsh_keys(table, cfg)), 0)],
        lambda rows: table[rows.astype(np.int64)], cfg.threshold,
    )  # fmt: skip
    assert verdicts.tolist() == [0, NEAR, NEAR, 0]


def test_find_duplicates_memory_does_not_grow_with_documents():
    """Working memory (traced allocations, the inputs and the verdicts aside) is bounded by the partition budget,
    not the number of documents."""
    import tracemalloc

    cfg = DedupConfig()
    rng = np.random.default_rng(0)

    def peak(n: int) -> int:
        table = rng.integers(0, 2**32, size=(n, cfg.num_perm), dtype=np.uint32)  # distinct documents
        run = KeyRun(*sorted_run(lsh_keys(table, cfg)), 0)
        digests = KeyRun(*sorted_run(rng.integers(0, 2**63, size=n, dtype=np.uint64)), 0)
        verdicts = np.zeros(n, dtype=np.uint8)
        tracemalloc.start()
        find_duplicates(
            n, [digests], [run], lambda rows: table[rows.astype(np.int64)], 0.8, verdicts, budget=10_000
        )
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    small, large = peak(20_000), peak(80_000)  # 320,000 and 1,280,000 band records, 10,000 merged at once
    assert large < 1.5 * small + 200_000, (small, large)


# -- the batch path (Curator.process, fast backend) against the per-document rules --------------------------


def _old_c4_rule(text: str, cfg: C4Config):
    """C4's line rules as first written (one pass, every test on every line): the reference for c4_rule."""
    kept, sentences, dropped = [], 0, 0
    for raw_line in text.split("\n"):
        line = raw_line.strip()
        if not line:
            continue
        words = line.split()
        if cfg.max_word_length is not None and max(map(len, words)) > cfg.max_word_length:
            dropped += 1
            continue
        if cfg.remove_citations:
            line = CITATION.sub("", line).strip()
        if cfg.require_terminal_punctuation and (
            not line.endswith((".", "!", "?", '"', "'")) or line.endswith("...")
        ):
            dropped += 1
            continue
        if cfg.min_words_per_line is not None and len(words) < cfg.min_words_per_line:
            dropped += 1
            continue
        lower = line.lower()
        if cfg.drop_lorem_ipsum and "lorem ipsum" in lower:
            return None, "c4.drop_lorem_ipsum", dropped
        if cfg.remove_javascript_lines and "javascript" in lower:
            dropped += 1
            continue
        if cfg.drop_curly_bracket and "{" in line:
            return None, "c4.drop_curly_bracket", dropped
        if cfg.remove_policy_lines and any(p in lower for p in POLICY):
            dropped += 1
            continue
        sentences += max(1, len(SENTENCE_END.findall(line)))
        kept.append(line)
    if not kept:
        return None, "c4.no_line_left", dropped
    if cfg.min_sentences is not None and sentences < cfg.min_sentences:
        return None, "c4.min_sentences", dropped
    return "\n".join(kept), None, dropped


def _old_duplicate_counts(parts: list[str]) -> tuple[int, int]:
    seen, count, chars = set(), 0, 0
    for part in parts:
        if part in seen:
            count, chars = count + 1, chars + len(part)
        else:
            seen.add(part)
    return count, chars


def _reference_ngram_fractions(text: str, n: int) -> tuple[float, float]:
    """(characters of the most frequent n-gram's occurrences, the first to occur of those tied, characters of
    words in repeated occurrences of any n-gram) / characters of words, straight from the word strings."""
    words = [w.lower() for w in WORD.findall(text)]
    total = sum(map(len, words))
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    top = max(counts.values(), default=0)
    top_chars = top * sum(map(len, max(counts, key=counts.get))) if top > 1 else 0
    seen, covered = set(), [False] * len(words)
    for i, g in enumerate(grams):
        if g in seen:
            covered[i : i + n] = [True] * n
        seen.add(g)
    return top_chars / total, sum(len(w) for w, c in zip(words, covered) if c) / total


def _varied_documents(count: int, seed: int) -> list[str]:
    """Prose, repetitive text of a small vocabulary, junk, citations, bullets, ellipses, empty and tiny
    documents, non-ASCII: every rule fires somewhere, the rest pass."""
    rng = random.Random(seed)
    small = WORDS[:12] + STOP[:4]
    docs = []
    for _ in range(count):
        kind = rng.randrange(12)
        if kind < 4:
            doc = prose(rng.randrange(10**6), paragraphs=rng.randint(1, 5), lines=rng.randint(1, 3))
        elif kind == 4:  # a small vocabulary: repeated n-grams of every length
            doc = " ".join(rng.choice(small) for _ in range(rng.randint(5, 300))) + "."
        elif kind == 5:  # a passage recurring among fresh text
            passage = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12)))
            doc = "\n".join(f"{sentence(rng)} {passage}." for _ in range(rng.randint(2, 10)))
        elif kind == 6:
            doc = "Buy now!!! ### $$$ click here " * rng.randint(1, 20)
        elif kind == 7:  # C4 material: citations, javascript, cookies, lorem ipsum, braces, short lines
            lines = _lines(rng.randint(2, 8), rng.randrange(1000))
            extras = ["A fact. [1]", "Enable JavaScript please.", "This site uses cookies.", "Hi.",
                      "Lorem[2] ipsum dolor sit amet.", "Code {x} here is fine.", "Read more...", "x" * 1200 + "."]  # fmt: skip
            for _ in range(rng.randint(0, 3)):
                lines.insert(rng.randrange(len(lines) + 1), rng.choice(extras))
            doc = "\n".join(lines)
        elif kind == 8:
            doc = "\n".join(("- " if rng.random() < 0.7 else "") + _words(12, seed=rng.randrange(99))
                            + ("…" if rng.random() < 0.4 else ".") for _ in range(rng.randint(1, 20)))  # fmt: skip
        elif kind == 9:
            doc = rng.choice(
                ["", "   ", "\n\n", "a", "one two three", "Ça va? Ünïcödé ÀÉÎ straße ß İstanbul."]
            )
        elif kind == 10:  # repeated paragraphs and lines
            par = _lines(rng.randint(1, 3), rng.randrange(99))
            doc = "\n\n".join(
                ["\n".join(par)] * rng.randint(1, 4) + _lines(rng.randint(1, 6), rng.randrange(99))
            )
        else:
            doc = " ".join(f"{w} foo bar." for w in rng.sample(WORDS, rng.randint(3, 80)))
        if rng.random() < 0.2:
            doc = doc.replace(" ", rng.choice(["  ", " \t", "\u00a0", " — "]), rng.randint(1, 5))
        docs.append(doc)
    return docs


def test_c4_rule_and_duplicate_counts_match_the_first_implementation():
    docs = _varied_documents(300, seed=11)
    for cfg in (C4, dataclasses.replace(C4, remove_citations=False, min_sentences=None, max_word_length=5),
                dataclasses.replace(C4, require_terminal_punctuation=False, min_words_per_line=0)):  # fmt: skip
        for doc in docs:
            assert c4_rule(doc, cfg) == _old_c4_rule(doc, cfg), doc
    for doc in docs:
        for parts in (doc.split("\n"), doc.split(" "), re.split(r"\n{2,}", doc.strip())):
            assert _duplicate_counts(parts) == _old_duplicate_counts(parts)


def test_batch_view_and_rules_match_the_per_document_ones():
    docs = _varied_documents(400, seed=3)
    view = BatchView(docs)
    rows = list(range(len(docs)))
    for r, doc in enumerate(docs):
        single = TextView(doc)
        words = slice(view.word_starts[r], view.word_ends[r])
        assert np.array_equal(view.word_hashes[words], single.word_hashes)
        assert np.array_equal(view.word_lengths[words], single.word_lengths)
        assert (int(view.tokens()[0][r]), int(view.tokens()[1][r])) == single.tokens()
    odd = GopherRepetitionConfig(max_top_ngram_char_fraction={1: 0.3, 2: 0.2, 6: 0.1},
                                 max_duplicate_ngram_char_fraction={3: 0.5, 5: 0.15, 8: 0.05})  # fmt: skip
    for cfg, batch, single in [
        (R, gopher_repetition_batch, gopher_repetition_rule),
        (odd, gopher_repetition_batch, gopher_repetition_rule),
        (Q, gopher_quality_batch, gopher_quality_rule),
        (CharactersConfig(enabled=True), characters_batch, characters_rule),
    ]:
        assert batch(view, rows, cfg) == [single(doc, cfg) for doc in docs]
    d = DedupConfig()
    for got, doc in zip(minhash_batch(view, rows, d), docs):
        want = minhash(doc, d)
        assert (got is None and want is None) or np.array_equal(got, want)


def test_repetition_fractions_match_a_reference_on_random_documents():
    """The batch rule at thresholds just below and above each document's own fractions, against the fractions
    computed from the word strings. With a tie for the most frequent n-gram, the first of them to occur counts
    (the reference's Counter order, datatrove's most_common): the hash order chose before."""
    rng = random.Random(5)
    vocabularies = [WORDS[: rng.randint(2, 30)] for _ in range(200)]
    docs = [" ".join(rng.choice(v) for _ in range(rng.randint(8, 200))) for v in vocabularies]
    view = BatchView(docs)
    checked = Counter()
    for n_top, n_dup in ((2, 5), (3, 6), (4, 8)):
        for r, doc in enumerate(docs):
            top, dup = _reference_ngram_fractions(doc, n_top)[0], _reference_ngram_fractions(doc, n_dup)[1]
            for eps, expect in ((-1e-9, True), (1e-9, False)):
                cfg = GopherRepetitionConfig(
                    max_duplicate_line_fraction=None,
                    max_duplicate_paragraph_fraction=None,
                    max_duplicate_line_char_fraction=None,
                    max_duplicate_paragraph_char_fraction=None,
                    max_top_ngram_char_fraction={n_top: top + eps},
                    max_duplicate_ngram_char_fraction={},
                )
                if top > 0:  # ties too: the first of the tied n-grams to occur counts, as in the reference
                    got = gopher_repetition_batch(view, [r], cfg)[0]
                    assert (got == f"gopher_repetition.max_top_ngram_char_fraction.{n_top}") == expect, doc
                    checked["top"] += 1
                if dup > 0:
                    cfg.max_top_ngram_char_fraction = {}
                    cfg.max_duplicate_ngram_char_fraction = {n_dup: dup + eps}
                    got = gopher_repetition_batch(view, [r], cfg)[0]
                    assert (
                        got == f"gopher_repetition.max_duplicate_ngram_char_fraction.{n_dup}"
                    ) == expect, doc
                    checked["dup"] += 1
    assert checked["top"] > 100 and checked["dup"] > 100, checked


@pytest.mark.parametrize("preset", ["web", "code", "odd"])
def test_batch_process_matches_process_each(preset):
    cfg = {"web": CurationConfig(), "code": code_curation()}.get(preset)
    if cfg is None:
        cfg = dataclasses.replace(CurationConfig(), c4=dataclasses.replace(C4, remove_citations=False),
                                  gopher_quality=dataclasses.replace(Q, min_words=3, min_stop_words=0),
                                  characters=CharactersConfig(enabled=True), dedup=DedupConfig(ngram=3))  # fmt: skip
    docs = _varied_documents(500, seed=7) + [prose(s) for s in range(50)] + [d.upper() for d in GOOD]
    curator = Curator(cfg)
    batch, batch_stats = curator.process(docs)
    each, each_stats = curator.process_each(docs)
    assert [d and (d.text, d.digest) for d in batch] == [d and (d.text, d.digest) for d in each]
    for a, b in zip(batch, each):
        if a is not None:
            assert (a.signature is None and b.signature is None) or np.array_equal(a.signature, b.signature)
    strip = lambda stats: {k: {**s.to_dict(), "cpu_seconds": 0} for k, s in stats.items()}  # noqa: E731
    assert strip(batch_stats) == strip(each_stats)
    assert sum(d is not None for d in batch) > 20


def test_a_tie_for_the_most_frequent_ngram_counts_the_first_to_occur():
    """Two bigrams three times each, a long one first (32% of the word characters, over a 0.2 limit) and a
    short one (5%): the hash order picked either, so 23 of 40 such documents got the opposite verdict to
    datatrove's (Counter.most_common: the first to occur). Both fast paths now remove them all."""
    cfg = GopherRepetitionConfig(
        max_duplicate_line_fraction=None,
        max_duplicate_paragraph_fraction=None,
        max_duplicate_line_char_fraction=None,
        max_duplicate_paragraph_char_fraction=None,
        max_top_ngram_char_fraction={2: 0.2},
        max_duplicate_ngram_char_fraction={},
    )
    fillers = [f"filler{i:03d}" for i in range(24)]
    docs = []
    for trial in range(40):
        long_pair, short_pair = (
            (f"longwordnumberone{trial}", f"longwordnumbertwo{trial}"),
            (f"s{trial}a", f"s{trial}b"),
        )
        words = []
        for k in range(3):
            words += [*long_pair, *fillers[4 * k : 4 * k + 2], *short_pair, *fillers[4 * k + 2 : 4 * k + 4]]
        docs.append(" ".join(words + fillers[12:]))
    removed = "gopher_repetition.max_top_ngram_char_fraction.2"
    assert [gopher_repetition_rule(doc, cfg) for doc in docs] == [removed] * 40
    assert gopher_repetition_batch(BatchView(docs), range(40), cfg) == [removed] * 40


def test_unicode_line_separators_are_line_breaks():
    """U+2028, U+2029 and NEL split lines for datatrove (str.splitlines) but not for the fast backend's "\\n"
    rules: a menu line joined by them survived C4's line filter here only. VT, FF, FS, GS and RS too."""
    cfg = NormalizeConfig()
    assert normalize("Home | About\u2028Share on Facebook\u2029Next\x85end.", cfg) == (
        "Home | About\nShare on Facebook\nNext\nend."
    )
    # and the control characters str.splitlines breaks on: removed as control characters, they glued words
    text = "A good first sentence here.\x0bShare on Facebook\x0cAnother one\x1cx\x1dy\x1ez"
    assert normalize(text, cfg).splitlines() == text.splitlines()
