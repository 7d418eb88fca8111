"""Sources, tokenizer, token cache and the window loader."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from llmtrain.config import DataConfig, TokenizerConfig
from llmtrain.data import DataError, WindowLoader, iter_documents, prepare_corpus, train_bpe
from llmtrain.data import loader as loader_module
from llmtrain.data.sources import is_validation, stdlib_files
from tests.conftest import synthetic_documents, write_jsonl

DOCS = synthetic_documents(60, seed=1) + ["naïve café — 東京 🚀 ünïcödé text.", "tabs\tand\nnewlines\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(DOCS, vocab_size=400, n_sentinels=100)


def files_config(paths, tmp_path, **kw) -> DataConfig:
    return DataConfig(
        source="files", paths=[str(p) for p in paths], cache_dir=str(tmp_path / "cache"),
        tokenizer=TokenizerConfig(vocab_size=400, train_bytes=10**6), **kw,
    )  # fmt: skip


def test_special_tokens_have_fixed_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.mask_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert tokenizer.sentinel_ids == list(range(5, 105))
    assert tokenizer.hf.id_to_token(5) == "<extra_id_0>" and tokenizer.hf.id_to_token(104) == "<extra_id_99>"
    assert tokenizer.vocab_size == 400


@pytest.mark.parametrize("text", DOCS[-2:] + ["def f(x):\n    return x ** 2\n"])
def test_round_trip_and_token_bytes(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


SPECIAL_TEXT = "A model ends with <eos> here, masks with <mask>s, fills <extra_id_0> and pads <pad>."


def test_special_token_text_in_a_document_is_text(tokenizer):
    """Corpus text is all text: "<eos>" in a document is not EOS (it would end the document there); a
    prompt's markers are the special tokens (span filling reads <extra_id_0>)."""
    (ids,) = tokenizer.encode_documents([SPECIAL_TEXT])
    assert not set(ids) & set(tokenizer.special_ids) and tokenizer.decode(ids) == SPECIAL_TEXT
    prompt = set(tokenizer.encode(SPECIAL_TEXT))
    assert {tokenizer.eos_id, tokenizer.mask_id, tokenizer.sentinel_ids[0], tokenizer.pad_id} <= prompt


@pytest.mark.parametrize("kind", ["bpe", "unigram", "wordpiece"])
def test_special_token_text_is_text_for_every_tokenizer_kind(kind):
    """A Unigram model also holds the special tokens as pieces of its own vocabulary, scored highest: they
    must not be picked for a document's text either."""
    from llmtrain.data.tokenizer import train_tokenizer

    # every character of SPECIAL_TEXT is known (no <unk>): the text with the markers broken up
    texts = DOCS * 4 + [SPECIAL_TEXT.replace("<", "< ").replace(">", " >")] * 20
    tok = train_tokenizer(texts, kind, 600, n_sentinels=10)
    (ids,) = tok.encode_documents([SPECIAL_TEXT])
    assert not set(ids) & set(tok.special_ids), [tok.hf.id_to_token(i) for i in ids if i in tok.special_ids]
    if kind != "wordpiece":  # (WordPiece keeps no spaces)
        assert tok.decode(ids) == SPECIAL_TEXT
    assert tok.mask_id in tok.encode(SPECIAL_TEXT)  # a prompt's marker is still the token


def test_special_tokens_count_zero_bytes(tokenizer):
    assert tokenizer.token_bytes()[tokenizer.special_ids].sum() == 0


def test_a_tokenizer_path_that_is_not_a_tokenizer_is_a_data_error(tmp_path, tokenizer):
    from llmtrain.data import DataError
    from llmtrain.data.tokenizer import load_tokenizer

    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(DataError, match=f"data.tokenizer.path: {junk} is not a valid tokenizer.json"):
        load_tokenizer(junk)
    with pytest.raises(DataError, match=f"data.tokenizer.path: {tmp_path} is a folder"):
        load_tokenizer(tmp_path)
    bare = tmp_path / "bare.json"  # a valid tokenizer.json without llmtrain's special tokens
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.BPE()).save(str(bare))
    with pytest.raises(DataError, match=f"data.tokenizer.path: {bare}: tokenizer lacks special tokens"):
        load_tokenizer(bare)


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="data.tokenizer.vocab_size=300"):
        train_bpe(DOCS, vocab_size=300)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_file_kinds_read_the_same_documents(tmp_path, kind):
    docs = DOCS[:5]
    if kind == "jsonl":
        paths = [write_jsonl(tmp_path / "a.jsonl", docs)]
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths = [tmp_path / "a.parquet"]
        pq.write_table(pa.table({"text": docs}), paths[0])
    else:  # one document per .txt file
        paths = []
        for i, d in enumerate(docs):
            (tmp_path / f"{i}.txt").write_text(d)
            paths.append(tmp_path / f"{i}.txt")
    assert sorted(iter_documents(files_config(paths, tmp_path))) == sorted(docs)


def test_globs_and_limits(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part{i}.jsonl", DOCS[i * 10 : i * 10 + 10])
    cfg = files_config([tmp_path / "part*.jsonl"], tmp_path)
    assert len(list(iter_documents(cfg))) == 30
    cfg.max_documents = 7
    assert len(list(iter_documents(cfg))) == 7


def test_an_existing_file_is_read_as_named_even_with_glob_characters(tmp_path):
    """'corpus[1].jsonl' exists: it is that file. As a glob it matched corpus1.jsonl (another corpus, read
    without a word) or, alone, nothing ("matches no file" of a file that exists)."""
    write_jsonl(tmp_path / "corpus[1].jsonl", ["The intended file."])
    assert list(iter_documents(files_config([tmp_path / "corpus[1].jsonl"], tmp_path))) == [
        "The intended file."
    ]
    write_jsonl(tmp_path / "corpus1.jsonl", ["Other file entirely."])
    assert list(iter_documents(files_config([tmp_path / "corpus[1].jsonl"], tmp_path))) == [
        "The intended file."
    ]
    assert list(iter_documents(files_config([tmp_path / "corpus[0-9].jsonl"], tmp_path))) == [
        "Other file entirely."
    ]  # a pattern that names no file is still a glob


def test_a_non_text_column_is_named_on_every_reader(tmp_path):
    """Parquet (read through `datasets`) said `'int' object has no attribute 'strip'`; the .jsonl reader named
    the column already. A .txt file's byte-order mark is no text either (the .jsonl reader dropped it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for values, kind in (([1, 2], "int"), ([b"Hello there."], "bytes")):
        path = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.table({"text": values}), path)
        with pytest.raises(DataError, match=rf"column 'text' \(data.text_field\) holds {kind}, not text"):
            list(iter_documents(files_config([path], tmp_path)))
    (tmp_path / "bom.txt").write_bytes("\ufeffHello world.".encode())
    assert list(iter_documents(files_config([tmp_path / "bom.txt"], tmp_path))) == ["Hello world."]


def test_a_lone_surrogate_in_a_jsonl_record_is_named(tmp_path):
    """JSON's escapes can spell half a UTF-16 pair (web crawls hold them): it reached the byte count as a
    UnicodeEncodeError traceback. Now an error naming the file, line and column."""
    path = tmp_path / "crawl.jsonl"
    path.write_text('{"text": "fine text"}\n{"text": "bad \\ud800 surrogate"}\n')
    with pytest.raises(
        DataError, match=rf"\({re.escape(str(path))}, line 2\): column 'text' .* not valid Unicode"
    ):
        list(iter_documents(files_config([path], tmp_path)))


def test_wordpiece_and_unigram_keep_the_vocabulary_asked_for_or_say_why_not():
    """Both trainers keep every character of the sample: vocab_size=150 gave 270 and 261 tokens, silently."""
    from llmtrain.data.tokenizer import train_tokenizer

    texts = [
        f"{chr(0x4E00 + i)}{chr(0x4E00 + i + 1)} word{i}" for i in range(200)
    ]  # 200+ distinct characters
    for kind in ("unigram", "wordpiece"):
        with pytest.raises(ValueError, match=r"data.tokenizer.vocab_size=150 is below what a \w+ tokenizer"):
            train_tokenizer(texts, kind, 150, n_sentinels=10)
    assert train_tokenizer(texts, "wordpiece", 600, n_sentinels=10).vocab_size <= 600


def test_hub_source_uses_the_same_path(tmp_path):
    """A hub name goes through datasets.load_dataset(name, streaming=True); a local folder stands in for it."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOCS[:8])
    cfg = DataConfig(source="hub", hub_name=str(folder), hub_split="train")
    assert list(iter_documents(cfg)) == DOCS[:8]


def test_missing_text_column_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'text' \(data.text_field\)"):
        list(iter_documents(files_config([path], tmp_path)))


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"a.jsonl: could not be read: line 4 is not valid JSON"):
        list(iter_documents(files_config([path], tmp_path)))
    path.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"a.jsonl, line 2\): column 'text' \(data.text_field\) holds int"):
        list(iter_documents(files_config([path], tmp_path)))
    path.write_bytes(b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"a.jsonl: could not be read: not UTF-8"):
        list(iter_documents(files_config([path], tmp_path)))


def test_jsonl_reads_like_datasets(tmp_path):
    """What `datasets` accepted still reads: a byte-order mark, CRLF, blank lines, null text, and a later
    record without the text column (no text); a first record without it names the file."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"text": "first"}\r\n\r\n{"text": null}\n{"other": 1}\n{"text": "last", "id": 3}\n'
    )
    assert list(iter_documents(files_config([path], tmp_path))) == ["first", "last"]
    path.write_text('{"body": "x"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"a.jsonl, line 1\): no column 'text'"):
        list(iter_documents(files_config([path], tmp_path)))


def test_unknown_extension_is_named(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("x\n")
    with pytest.raises(DataError, match="a.csv has extension '.csv'"):
        list(iter_documents(files_config([path], tmp_path)))


def test_unreadable_parquet_is_named_and_nothing_is_written(tmp_path):
    """A truncated .parquet among good ones: the error names that file, and prepare_data leaves no shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmtrain.data.shards import PrepareConfig, prepare_shards

    good, bad = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": DOCS[:20]}), good)
    pq.write_table(pa.table({"text": DOCS[20:40]}), bad)
    bad.write_bytes(bad.read_bytes()[:-40])  # footer cut off
    cfg = files_config([good, bad], tmp_path)
    with pytest.raises(DataError, match=r"data.paths: .*b.parquet: could not be read"):
        list(iter_documents(cfg))
    cfg.tokenizer = TokenizerConfig(vocab_size=400, train_bytes=10**6)
    out = tmp_path / "shards"
    with pytest.raises(DataError, match=r"b.parquet: could not be read"):
        prepare_shards(cfg, PrepareConfig(output_dir=str(out), workers=1))
    assert not list(out.glob("*.bin")) and not (out / "manifest.json").exists()


def test_corrupt_parquet_alone_is_named(tmp_path):
    """One corrupt file fails inside load_dataset (reading its schema), before any record."""
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not a parquet file" * 20)
    with pytest.raises(DataError, match=r"data.paths \(.*bad.parquet\): could not be read: .*magic bytes"):
        list(iter_documents(files_config([bad], tmp_path)))


def test_unreachable_hub_dataset_is_named(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = DataConfig(source="hub", hub_name="nobody/nothing")
    with pytest.raises(DataError, match=r"data.hub_name=nobody/nothing: could not be read \(check the name"):
        list(iter_documents(cfg))


def test_folder_in_paths_is_named(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", DOCS[:3])
    with pytest.raises(DataError, match=r"corpus is a folder; give files \(.txt, .jsonl, .json, .parquet\)"):
        list(iter_documents(files_config([folder], tmp_path)))
    (folder / "sub").mkdir()  # a glob's folders are passed over; its files are read
    assert list(iter_documents(files_config([folder / "*"], tmp_path))) == DOCS[:3]


def test_split_is_by_document_and_stable():
    flags = [is_validation(d, 0.2) for d in DOCS]
    assert flags == [is_validation(d, 0.2) for d in DOCS]
    assert 0 < sum(flags) < len(DOCS)


def test_stdlib_corpus_is_found_without_site_packages():
    files = stdlib_files()
    names = {p.name for p in files}
    assert {"os.py", "json/__init__.py".split("/")[-1]} <= names
    assert not any("site-packages" in p.parts for p in files)
    first = next(iter_documents(DataConfig(source="stdlib", max_documents=1)))
    assert len(first) > 0


def test_corpus_is_cached_and_tokenizer_reused(tmp_path, monkeypatch):
    cfg = files_config([write_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path)
    corpus = prepare_corpus(cfg)
    n_docs = len(DOCS)
    # every document ends with EOS; train + val hold them all
    eos = corpus.tokenizer.eos_id
    assert int((corpus.train == eos).sum() + (corpus.val == eos).sum()) == n_docs
    assert corpus.train.dtype == np.uint16

    def no_training(*a, **k):
        raise AssertionError("the tokenizer should have been reused")

    monkeypatch.setattr(loader_module, "train_bpe", no_training)
    monkeypatch.setattr(loader_module, "_encode_splits", no_training)
    again = prepare_corpus(cfg)
    assert again.tokenizer_path == corpus.tokenizer_path
    assert np.array_equal(again.train, corpus.train)


def test_the_token_stream_holds_one_eos_per_document_whatever_the_text(tmp_path):
    docs = DOCS + [SPECIAL_TEXT] * 3
    corpus = prepare_corpus(files_config([write_jsonl(tmp_path / "a.jsonl", docs)], tmp_path))
    tokens = np.concatenate([corpus.train, corpus.val])
    tok = corpus.tokenizer
    assert int((tokens == tok.eos_id).sum()) == len(docs)
    assert not np.isin(tokens, [i for i in tok.special_ids if i != tok.eos_id]).any()


def test_interrupted_tokenisation_is_not_reused(tmp_path, monkeypatch):
    cfg = files_config([write_jsonl(tmp_path / "a.jsonl", DOCS)], tmp_path)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader_module, "atomic_write_text", crash)  # killed before the manifest is written
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(cfg)
    monkeypatch.undo()
    assert list((tmp_path / "cache" / "tokens").rglob("train.bin"))
    assert not list((tmp_path / "cache" / "tokens").rglob("meta.json"))
    corpus = prepare_corpus(cfg)  # starts over and completes
    assert len(corpus.train) > 0


def test_window_loader_epoch_covers_every_window_once():
    tokens = np.arange(100 * 8, dtype=np.uint16)
    loader = WindowLoader(tokens, raw_length=8, batch_size=10, seed=0)
    starts = torch.cat([loader.next_batch()[:, 0] for _ in range(loader.batches_per_epoch)])
    assert sorted(starts.tolist()) == list(range(0, 800, 8))
    assert loader.epoch == 0 and loader.next_batch().shape == (10, 8) and loader.epoch == 1


def test_window_loader_resumes_at_the_same_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    a = WindowLoader(tokens, raw_length=10, batch_size=4, seed=3)
    for _ in range(30):  # crosses an epoch boundary (25 batches per epoch)
        a.next_batch()
    b = WindowLoader(tokens, raw_length=10, batch_size=4, seed=3)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch(), b.next_batch())


@pytest.mark.parametrize(("before", "after"), [((1, 4), (1, 8)), ((2, 4), (4, 4)), ((1, 8), (3, 2))])
def test_a_resume_in_another_micro_batch_x_ranks_reads_each_window_once(before, after):
    """(world, micro-batch) before and after the checkpoint: the resumed loaders go on at the first unread
    window of the epoch's order, so the epoch reads no window twice and misses fewer than one micro-batch of
    the new layout's epoch (the resume used to round down to the new micro-batch x ranks and repeat up to 4 windows
    here); the next epoch is whole again."""
    tokens = np.arange(70 * 4, dtype=np.uint32)

    def loaders(world, batch):
        return [WindowLoader(tokens, 4, batch, seed=5, rank=r, world_size=world) for r in range(world)]

    first = loaders(*before)
    read = [w for _ in range(3) for loader in first for w in loader.next_batch()[:, 0].tolist()]
    state = first[0].state_dict()
    assert state == {"epoch": 0, "windows": len(read)}
    resumed = loaders(*after)
    for loader in resumed:
        loader.load_state_dict(state)
    while resumed[0].epoch == 0 and resumed[0].index < resumed[0].batches_left:
        read += [w for loader in resumed for w in loader.next_batch()[:, 0].tolist()]
    assert len(read) == len(set(read)), "a window was read twice in one epoch"
    per_batch = after[0] * after[1]
    assert resumed[0].batches_per_epoch * per_batch - per_batch < len(read) <= 70
    assert resumed[0].state_dict() == {"epoch": 0, "windows": len(read)}
    next_epoch = [
        w
        for _ in range(70 // (after[0] * after[1]))
        for loader in resumed
        for w in loader.next_batch()[:, 0].tolist()
    ]
    assert resumed[0].epoch == 1 and len(set(next_epoch)) == len(next_epoch) > 70 - after[0] * after[1]


def test_window_loader_ranks_are_disjoint():
    tokens = np.arange(400, dtype=np.uint16)
    seen = [WindowLoader(tokens, 10, 4, seed=1, rank=r, world_size=2).next_batch()[:, 0] for r in range(2)]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_window_loader_too_little_data():
    with pytest.raises(DataError, match="the train split has 50 tokens"):
        WindowLoader(np.zeros(50, dtype=np.uint16), raw_length=10, batch_size=8, seed=0)


def test_an_epoch_ends_at_the_same_window_in_every_layout_of_a_global_batch():
    """40 windows, global batch 16: 2 ranks x 8 and 1 rank x 8 x 2 accumulated take the same windows in every
    step across epoch boundaries (the epoch is 2 whole steps; in micro-batches one rank would take 40)."""
    tokens = np.arange(40 * 4, dtype=np.uint32)

    def steps(world: int, accum: int, n: int = 7) -> list[set[int]]:
        loaders = [
            WindowLoader(tokens, 4, 8, seed=3, rank=r, world_size=world, steps_of=accum) for r in range(world)
        ]
        out = []
        for _ in range(n):
            batch = [loader.next_batch() for _ in range(accum) for loader in loaders]
            out.append(set(torch.cat(batch)[:, 0].tolist()))
        return out

    two_ranks, accumulated = steps(2, 1), steps(1, 2)
    assert two_ranks == accumulated
    assert all(len(step) == 16 for step in accumulated)
