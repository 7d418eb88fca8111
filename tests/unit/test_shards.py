"""Shards: tokens read back equal tokens encoded, an interrupted run is not complete and a restart skips the
finished chunks, the output does not depend on the number of workers, bad input is named."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from llmtrain.config import DataConfig, TokenizerConfig
from llmtrain.data import shards as shards_module
from llmtrain.data.curation import DedupConfig, curate, minimal_curation, web_curation
from llmtrain.data.shards import (
    PrepareConfig,
    TokenArray,
    open_shards,
    prepare_shards,
    shard_corpus,
    token_dtype,
)
from llmtrain.data.sources import DataError, is_validation
from llmtrain.data.tokenizer import load_tokenizer, train_bpe
from tests.conftest import write_jsonl
from tests.unit.test_curation import _edit, prose

DOCS = [prose(1000 + i, paragraphs=2, lines=2) for i in range(60)]
CORPUS = DOCS + [DOCS[3], _edit(DOCS[5], 1, seed=1), "tiny."]  # an exact and a near duplicate, a short one


def data_config(path, cache, **kw) -> DataConfig:
    return DataConfig(
        name="tiny", source="files", paths=[str(path)], cache_dir=str(cache), val_fraction=0.2,
        tokenizer=TokenizerConfig(vocab_size=400, train_bytes=200_000), **kw,
    )  # fmt: skip


def prep_config(folder, **kw) -> PrepareConfig:
    cfg = dataclasses.replace(minimal_curation(), dedup=DedupConfig())  # normalise, both dedups
    settings = {"shard_bytes": 6000, "batch_bytes": 2500, "workers": 1, **kw}
    return PrepareConfig(curation=cfg, output_dir=str(folder), **settings)


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "docs.jsonl", CORPUS)


def test_tokens_read_back_equal_tokens_encoded(corpus, tmp_path):
    data, prep = data_config(corpus, tmp_path / "cache"), prep_config(tmp_path / "shards")
    manifest = prepare_shards(data, prep)
    shard_set = open_shards(tmp_path / "shards")
    tokenizer = shard_set.tokenizer()
    assert manifest["tokenizer"]["digest"] == tokenizer.digest() and manifest["dtype"] == "uint16"
    assert len(manifest["splits"]["train"]["shards"]) > 2  # several chunks

    kept, report = curate(CORPUS, prep.curation)
    assert len(kept) == len(DOCS) + 1  # the copy and the near copy removed; "tiny." is kept by minimal
    for split in ("train", "val"):
        texts = [t for t in kept if is_validation(t, data.val_fraction) == (split == "val")]
        expected = np.concatenate([tokenizer.encode(t) + [tokenizer.eos_id] for t in texts])
        tokens = shard_set.split(split)
        assert np.array_equal(tokens[0 : len(tokens)], expected)
        ends = tokens.document_ends()
        assert len(ends) == len(texts) and ends[-1] == len(tokens)
        assert np.all(np.asarray(tokens)[ends - 1] == tokenizer.eos_id)  # every document ends with EOS
    assert manifest["report"]["stages"]["near_dedup"]["removed"] == {"near_dedup.threshold": 1}
    assert manifest["report"]["output"]["tokens"] == {
        s: manifest["splits"][s]["tokens"] for s in ("train", "val")
    }


def test_token_array_reads_across_shards(tmp_path):
    parts = [np.arange(0, 5), np.arange(5, 12), np.arange(12, 13)]
    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"{i}.bin")
        part.astype(np.uint16).tofile(files[-1])
    array = TokenArray(files, [len(p) for p in parts], np.uint16, [])
    whole = np.arange(13)
    assert len(array) == 13 and array[7] == 7 and array[-1] == 12
    for a, b in [(0, 13), (3, 9), (4, 5), (5, 12), (11, 13), (2, 2)]:
        assert np.array_equal(array[a:b], whole[a:b]), (a, b)


def test_interrupted_run_is_not_complete_and_restart_skips_finished_chunks(corpus, tmp_path, monkeypatch):
    data = data_config(corpus, tmp_path / "cache")
    reference = prepare_shards(data, prep_config(tmp_path / "reference"))
    n_chunks = len(list((tmp_path / "reference").glob("chunk-*.json")))

    prep = prep_config(tmp_path / "shards")
    finish, finished = shards_module._ChunkWriter.finish, []

    def crash_after_two(self, settings):
        if len(finished) == 2:
            raise KeyboardInterrupt  # killed while writing the third chunk
        finished.append(self.chunk)
        return finish(self, settings)

    monkeypatch.setattr(shards_module._ChunkWriter, "finish", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(data, prep)
    monkeypatch.undo()
    assert not (tmp_path / "shards" / "manifest.json").exists()
    with pytest.raises(DataError, match="has no manifest.json: its preparation did not finish"):
        open_shards(tmp_path / "shards")

    work, batches = shards_module._work, []
    monkeypatch.setattr(shards_module, "_work", lambda texts: batches.append(len(texts)) or work(texts))
    manifest = prepare_shards(data, prep)
    assert sum(batches) < len(CORPUS)  # the two finished chunks' documents were not processed again
    assert manifest["splits"] == reference["splits"] and n_chunks > 2
    assert manifest["report"]["stages"] == reference["report"]["stages"] or all(
        {k: v for k, v in s.items() if k != "cpu_seconds"}
        == {k: v for k, v in reference["report"]["stages"][name].items() if k != "cpu_seconds"}
        for name, s in manifest["report"]["stages"].items()
    )
    for shard in reference["splits"]["train"]["shards"]:
        assert (tmp_path / "shards" / shard["file"]).read_bytes() == (
            tmp_path / "reference" / shard["file"]
        ).read_bytes()

    batches.clear()  # complete: a third run reuses it without reading anything
    assert prepare_shards(data, prep)["settings"] == manifest["settings"] and batches == []


def test_output_does_not_depend_on_workers(corpus, tmp_path):
    data = data_config(corpus, tmp_path / "cache")
    one = prepare_shards(data, prep_config(tmp_path / "one"))
    two = prepare_shards(data, dataclasses.replace(prep_config(tmp_path / "two"), workers=2))
    assert one["splits"] == two["splits"] and one["report"]["workers"] == 1 and two["report"]["workers"] == 2
    for shard in one["splits"]["train"]["shards"] + one["splits"]["val"]["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (
            tmp_path / "two" / shard["file"]
        ).read_bytes()


def test_dtype_follows_the_vocabulary(corpus, tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(DataError, match=r"prepare.dtype=uint16 cannot hold a vocabulary of 70000"):
        token_dtype(70000, "uint16")
    data = data_config(corpus, tmp_path / "cache")
    manifest = prepare_shards(data, prep_config(tmp_path / "wide", dtype="uint32"))
    narrow = prepare_shards(data, prep_config(tmp_path / "narrow"))
    assert manifest["dtype"] == "uint32"
    wide, small = shard_corpus(tmp_path / "wide"), shard_corpus(tmp_path / "narrow")
    assert wide.train.dtype == np.uint32 and np.array_equal(
        wide.train[0 : len(wide.train)], small.train[0 : len(small.train)]
    )
    assert narrow["splits"]["train"]["tokens"] == manifest["splits"]["train"]["tokens"]


def test_shards_made_with_another_tokenizer_are_refused(corpus, tmp_path):
    data = data_config(corpus, tmp_path / "cache")
    prepare_shards(data, prep_config(tmp_path / "shards"))
    other = train_bpe(["something else entirely, " * 50], vocab_size=400)
    other.save(tmp_path / "other.json")
    with pytest.raises(DataError, match="made with another tokenizer"):
        shard_corpus(tmp_path / "shards", str(tmp_path / "other.json"))
    with pytest.raises(DataError, match=r"holds shards made with another tokenizer"):
        prepare_shards(
            dataclasses.replace(data, tokenizer=TokenizerConfig(path=str(tmp_path / "other.json"))),
            prep_config(tmp_path / "shards"),
        )
    own = load_tokenizer(tmp_path / "shards" / "tokenizer.json")
    assert (
        shard_corpus(tmp_path / "shards", str(tmp_path / "shards" / "tokenizer.json")).tokenizer.digest()
        == own.digest()
    )


def test_changed_settings_are_refused(corpus, tmp_path):
    data = data_config(corpus, tmp_path / "cache")
    prepare_shards(data, prep_config(tmp_path / "shards"))
    with pytest.raises(DataError, match="made with other settings"):
        prepare_shards(data, prep_config(tmp_path / "shards", shard_bytes=9000))


def test_nothing_left_after_filtering_names_the_rules(corpus, tmp_path):
    data = data_config(corpus, tmp_path / "cache", max_documents=5)
    strict = dataclasses.replace(prep_config(tmp_path / "shards"), curation=web_curation())
    strict.curation.gopher_quality.min_words = 10_000
    with pytest.raises(
        DataError, match=r"kept no train document of 5 read \(removed by: gopher_quality.min_words 5\)"
    ):
        prepare_shards(data, strict)
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_bad_input_is_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    good = write_jsonl(tmp_path / "good.jsonl", DOCS[:3])
    broken.write_text('{"text": "fine"}\n{"text": broken\n')
    data = data_config(good, tmp_path / "cache")
    data.paths = [str(good), str(broken)]
    data.tokenizer = TokenizerConfig(path=None, vocab_size=400)
    with pytest.raises(DataError, match=r"data.paths: .*broken.jsonl: could not be read"):
        prepare_shards(data, prep_config(tmp_path / "shards"))
    with pytest.raises(DataError, match=r"matches no file"):
        prepare_shards(
            data_config(tmp_path / "missing.jsonl", tmp_path / "cache"), prep_config(tmp_path / "s2")
        )
    with pytest.raises(DataError, match=r"prepare.dtype='int8'"):
        prepare_shards(data_config(good, tmp_path / "cache"), prep_config(tmp_path / "s3", dtype="int8"))


def test_manifest_is_written_last(corpus, tmp_path):
    prepare_shards(data_config(corpus, tmp_path / "cache"), prep_config(tmp_path / "shards"))
    folder = tmp_path / "shards"
    manifest = json.loads((folder / "manifest.json").read_text())
    newest_other = max(
        p.stat().st_mtime_ns for p in folder.iterdir() if p.name not in ("manifest.json", "report.json")
    )
    assert (folder / "manifest.json").stat().st_mtime_ns >= newest_other
    assert manifest["format"] == "llmtrain-shards/1" and manifest["source"]["paths"] == [
        str(tmp_path / "docs.jsonl")
    ]


def test_restart_after_an_interruption_while_writing_final_shards(corpus, tmp_path, monkeypatch):
    """Killed after deduplication, while the kept documents are copied into the final shards: the restart
    neither reads the source again nor changes a byte; staging files are gone once the set is complete."""
    data = data_config(corpus, tmp_path / "cache")
    reference = prepare_shards(data, prep_config(tmp_path / "reference"))
    finish, finished = shards_module._finish_chunk, []

    def crash_after_one(*args):
        if finished:
            raise KeyboardInterrupt
        finished.append(finish(*args))
        return finished[-1]

    monkeypatch.setattr(shards_module, "_finish_chunk", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(data, prep_config(tmp_path / "shards"))
    monkeypatch.undo()
    assert (tmp_path / "shards" / "dedup.json").is_file() and list((tmp_path / "shards").glob("stage-*"))
    work, batches = shards_module._work, []
    monkeypatch.setattr(shards_module, "_work", lambda texts: batches.append(len(texts)) or work(texts))
    manifest = prepare_shards(data, prep_config(tmp_path / "shards"))
    assert batches == [] and manifest["splits"] == reference["splits"]
    for split in ("train", "val"):
        for shard in reference["splits"][split]["shards"]:
            for key in ("file", "index"):
                assert (tmp_path / "shards" / shard[key]).read_bytes() == (
                    tmp_path / "reference" / shard[key]
                ).read_bytes()
    names = {p.name for p in (tmp_path / "shards").iterdir()}
    assert not [n for n in names if n.startswith(("stage-", "dedup", "."))], names


def test_a_kill_just_after_the_manifest_leaves_no_working_files_on_the_next_run(
    corpus, tmp_path, monkeypatch
):
    """The working files were removed after manifest.json was written; a run killed in between left them for
    good, as the next run found the set complete and returned before its cleanup."""
    data = data_config(corpus, tmp_path / "cache")
    write = shards_module._write_manifest

    def write_then_die(*args):
        write(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_write_manifest", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(data, prep_config(tmp_path / "shards"))
    monkeypatch.undo()
    assert (tmp_path / "shards" / "dedup.json").is_file()
    prepare_shards(data, prep_config(tmp_path / "shards"))
    names = {p.name for p in (tmp_path / "shards").iterdir()}
    assert not [n for n in names if n.startswith(("stage-", "dedup", "."))], names


def test_near_duplicate_in_a_later_chunk_is_removed_and_the_original_kept(corpus, tmp_path):
    data = data_config(corpus, tmp_path / "cache")
    manifest = prepare_shards(data, prep_config(tmp_path / "shards"))
    shard_set = open_shards(tmp_path / "shards")
    tokenizer = shard_set.tokenizer()
    docs = []
    for split in ("train", "val"):
        tokens = np.asarray(shard_set.split(split))
        docs += [tokenizer.decode(d) for d in np.split(tokens, shard_set.split(split).document_ends()[:-1])]
    assert DOCS[5] in docs and _edit(DOCS[5], 1, seed=1) not in docs and docs.count(DOCS[3]) == 1
    assert (
        len(manifest["splits"]["train"]["shards"]) > 2
    )  # the copies came in a later chunk than the originals


def test_tiktoken_gives_the_same_ids_as_tokenizers(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    del tiktoken
    texts = [*DOCS[:20], shards_module.TIKTOKEN_PROBE, "naïve café — “quoted” <eos> <extra_id_3>  \n\n\t x\u00a0y 👍🏽",
             "def f(x):\n    return x  # ok\n\n\n", "   leading and trailing   ", "I'm, you'll, they've, 'S 'LL"]  # fmt: skip
    tokenizer = train_bpe(texts * 3, vocab_size=600)
    encoding = shards_module.tiktoken_encoding(tokenizer)
    assert encoding is not None
    for text in texts:
        assert encoding.encode_ordinary(text) == tokenizer.encode_documents([text])[0], text
    assert shards_module._encode(texts, tokenizer, encoding) == shards_module._encode(texts, tokenizer)


@pytest.mark.parametrize("backend", ["tiktoken", "tokenizers"])
def test_special_token_text_in_documents_is_text_in_the_shards(tmp_path, backend):
    """Documents that write "<eos>", "<mask>" or "<extra_id_0>" as text: one EOS per document in the shards
    (document attention reads documents off EOS), no other special id."""
    if backend == "tiktoken":
        pytest.importorskip("tiktoken")
    specials = [
        f"{doc} The tokenizer writes <eos>, <mask> and <extra_id_{i}> like this."
        for i, doc in enumerate(DOCS[:20])
    ]
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS[20:] + specials)
    manifest = prepare_shards(
        data_config(path, tmp_path / "cache"), prep_config(tmp_path / "shards", tokenizer_backend=backend)
    )
    shard_set = open_shards(tmp_path / "shards")
    tokenizer = shard_set.tokenizer()
    tokens = np.concatenate([np.asarray(shard_set.split(split)) for split in ("train", "val")])
    documents = manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"]
    assert documents == len(DOCS) and int((tokens == tokenizer.eos_id).sum()) == documents
    assert not np.isin(tokens, [i for i in tokenizer.special_ids if i != tokenizer.eos_id]).any()


def test_a_chunk_whose_documents_are_all_filtered(tmp_path):
    """The last chunk holds only a document that normalises to nothing: no crash, nothing of it kept."""
    path = write_jsonl(tmp_path / "docs.jsonl", DOCS[:20] + ["\x01\x02 \n"])
    data = data_config(path, tmp_path / "cache")
    manifest = prepare_shards(data, prep_config(tmp_path / "shards", shard_bytes=1))
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 20
    assert not list((tmp_path / "shards").glob("stage-*"))


def test_changed_tokenizer_settings_are_refused_naming_the_setting(corpus, tmp_path, monkeypatch):
    """The folder's own tokenizer is reused only for the data.tokenizer.* settings it was trained with, in a
    complete folder and in an interrupted one; its file given as data.tokenizer.path is the same tokenizer."""
    data, prep = data_config(corpus, tmp_path / "cache"), prep_config(tmp_path / "shards")
    manifest = prepare_shards(data, prep)
    bigger = dataclasses.replace(data, tokenizer=dataclasses.replace(data.tokenizer, vocab_size=500))
    with pytest.raises(
        DataError, match=r"data.tokenizer.vocab_size=500 \(made with 400\); use the same settings"
    ):
        prepare_shards(bigger, prep)
    own = tmp_path / "shards" / "tokenizer.json"
    given = dataclasses.replace(data, tokenizer=TokenizerConfig(path=str(own), vocab_size=500))
    assert prepare_shards(given, prep)["settings"] == manifest["settings"]  # the same tokenizer: reused
    assert prepare_shards(data, prep)["settings"] == manifest["settings"]

    interrupted = prep_config(tmp_path / "interrupted")

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_deduplicate", killed)
    with pytest.raises(KeyboardInterrupt):  # killed after staging every chunk: the staged chunks stay
        prepare_shards(data, interrupted)
    monkeypatch.undo()
    fewer = dataclasses.replace(data, tokenizer=dataclasses.replace(data.tokenizer, n_sentinels=10))
    with pytest.raises(DataError, match=r"data.tokenizer.n_sentinels=10 \(made with 100\)"):
        prepare_shards(fewer, interrupted)
    (tmp_path / "interrupted" / "tokenizer-settings.json").unlink()  # as made before the settings were kept
    # such a folder is checked against what its tokenizer shows: its size and sentinels
    with pytest.raises(DataError, match=r"data.tokenizer.vocab_size=500 \(made with 400\)"):
        prepare_shards(bigger, interrupted)
    assert prepare_shards(data, interrupted)["settings"] == manifest["settings"]  # agrees: it resumes
    resumed = dataclasses.replace(
        given, tokenizer=TokenizerConfig(path=str(tmp_path / "interrupted" / "tokenizer.json"))
    )
    assert (
        prepare_shards(resumed, interrupted)["splits"] == manifest["splits"]
    )  # resumed with its own tokenizer


@pytest.mark.parametrize("bad", ["missing", "binary", "parquet"])
def test_failed_preparation_leaves_no_folder_behind(tmp_path, bad):
    """Bad input found before any chunk is staged: the folder this run created (and its new parents) goes; a
    folder that was there already stays."""
    path = tmp_path / {"missing": "nothing.jsonl", "binary": "data.txt", "parquet": "data.parquet"}[bad]
    if bad == "binary":
        path.write_bytes(b"\x00\x9f\xff binary \xfe" * 50)
    elif bad == "parquet":
        path.write_bytes(b"not a parquet file" * 50)
    out = tmp_path / "new" / "shards"
    with pytest.raises(DataError, match=path.name):
        prepare_shards(data_config(path, tmp_path / "cache"), prep_config(out))
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)
    with pytest.raises(DataError, match=path.name):
        prepare_shards(data_config(path, tmp_path / "cache"), prep_config(out))
    assert out.is_dir()


def test_an_interrupt_after_the_tokenizer_is_trained_keeps_it(corpus, tmp_path, monkeypatch):
    """The clean-up of a failed start leaves a trained tokenizer in place: the restart reuses it."""
    data, prep = data_config(corpus, tmp_path / "cache"), prep_config(tmp_path / "new" / "shards")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "token_dtype", interrupted)  # the next step after shard_tokenizer
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(data, prep)
    assert (tmp_path / "new" / "shards" / "tokenizer.json").is_file()


@pytest.mark.parametrize("given", [False, True], ids=["trained", "own-tokenizer-given"])
def test_a_set_that_cannot_finish_is_removed_so_the_advised_setting_works(corpus, tmp_path, given):
    """No document in the validation split: the error advises a higher data.val_fraction, and the run with it
    makes the set a fresh run makes (tokenizer included: it is trained on the training split), instead of
    refusing the chunks left behind as made with other settings. A given tokenizer file is never deleted."""
    data, out = data_config(corpus, tmp_path / "cache"), tmp_path / "new" / "shards"
    reference = prepare_shards(data, prep_config(tmp_path / "reference"))
    if given:  # the folder's own tokenizer, named as data.tokenizer.path
        out.mkdir(parents=True)
        own = out / "tokenizer.json"
        own.write_bytes((tmp_path / "reference" / "tokenizer.json").read_bytes())
        data = dataclasses.replace(data, tokenizer=TokenizerConfig(path=str(own)))
    assert not any(is_validation(t, 0.001) for t in CORPUS)
    with pytest.raises(DataError, match=r"fell in the validation split \(data.val_fraction=0.001\)"):
        prepare_shards(dataclasses.replace(data, val_fraction=0.001), prep_config(out))
    if given:
        assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]
    else:
        assert not (tmp_path / "new").exists()  # the folder it created goes too
    manifest = prepare_shards(data, prep_config(out))
    assert manifest["splits"] == reference["splits"] and manifest["settings"] == reference["settings"]
