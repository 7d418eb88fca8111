"""Pre-tokenised shards: sources -> curation -> tokens on disk, in parallel, restartable, read back memory-mapped.

Layout of a shard set (one directory):

    tokenizer.json              the tokenizer the tokens were made with (its digest is in the manifest)
    tokenizer-settings.json     the data.tokenizer.* settings that chose it: a restart must ask for the same
    train-00000.bin  .idx       tokens (uint16 when the vocabulary fits, else uint32), each document followed by
    val-00000.bin    .idx       EOS; .idx holds each document's end offset (uint64), so boundaries are known
    chunk-00000.json            a finished chunk: its files, counts and report (written after its shards)
    manifest.json               written last: without it the set is incomplete and nothing reads it
    report.json

Three passes, each restartable; memory does not grow with the corpus:

1. Stream. The input is cut into chunks of `prepare.shard_bytes` raw bytes. Workers normalise, filter, hash
   (content digest, MinHash signature) and tokenise batches (tiktoken when it reproduces the byte-level BPE,
   see PrepareConfig.tokenizer_backend); the main process stages each chunk: stage-k.bin/.idx (the tokens of
   every document that passed the filters), its signatures (stage-k.sig.npy), its digests and LSH band keys
   each sorted with the document numbers (stage-k.exact-*.npy, stage-k.near-*.npy), then stage-k.json. No
   dedup state is held while streaming: a chunk's memory goes when it is staged.
2. Deduplicate (curation.find_duplicates). The sorted runs are merged one key-range partition at a time
   (memory-mapped, PARTITION_RECORDS records at once), equal keys give candidate pairs, near pairs are verified
   on the memory-mapped signatures, and a greedy pass in document order keeps a document unless it equals or
   near-duplicates an earlier KEPT one: one verdict byte per document, memory-mapped, in dedup-verdicts.u8
   (with dedup.json: the chunks' document offsets).
3. Finish. Chunk k's train-k and val-k shards are the kept documents' token ranges copied from its staging
   files (no tokenising again); then chunk-k.json, then its staging files are deleted.

A restarted run skips staged chunks while reading the stream again (and the stream altogether once dedup.json
exists), then finishes the chunks without chunk-k.json. The output does not depend on the number of workers.
A run that fails before any chunk is staged (bad input) removes the folder it created. A run that ends with
nothing to make a set of (no document kept, or none in the validation split) removes what it wrote, tokenizer
included: its settings can never finish that set, and the advised change (data.val_fraction, more data, looser
curation) makes another one, whose tokenizer is trained on other documents.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmtrain.config import DataConfig
from llmtrain.data.curation import (
    STAGES,
    CurationConfig,
    Curator,
    DedupConfig,
    KeyRun,
    Report,
    StageStats,
    check_curation_config,
    content_digest,
    count_verdicts,
    digest_keys,
    find_duplicates,
    lsh_keys,
    sorted_run,
)
from llmtrain.data.loader import Corpus
from llmtrain.data.sources import DataError, fingerprint, is_validation, iter_documents, resolve_paths
from llmtrain.data.tokenizer import Tokenizer, atomic_write_text, load_tokenizer, train_bpe

log = logging.getLogger(__name__)
FORMAT = "llmtrain-shards/1"
MANIFEST = "manifest.json"
SHARD_STAGES = (*STAGES, "tokenize")


@dataclass
class PrepareConfig:
    """Options of scripts/prepare_data.py (and the curation used by scripts/train_tokenizer.py)."""

    curation: CurationConfig = field(default_factory=CurationConfig)
    output_dir: str | None = None
    """Shard directory; null: <data.cache_dir>/shards/<data.name>."""
    shard_bytes: int = 64_000_000
    """Raw input bytes per chunk; each chunk makes one train and one val shard and is the unit of restart."""
    batch_bytes: int = 1_000_000
    """Raw input bytes per task handed to a worker."""
    workers: int = 0
    """Worker processes for normalisation, filters, hashing and tokenisation; 0: one per CPU core."""
    dtype: str = "auto"
    """auto (uint16 when the vocabulary fits, else uint32) | uint16 | uint32."""
    tokenizer_backend: str = "auto"
    """auto | tiktoken | tokenizers: who encodes. auto: tiktoken when it is installed and reproduces the byte-level
    BPE (same ids on a probe text, and on one document in TIKTOKEN_CHECK_EVERY, checked as the run goes),
    else tokenizers."""
    tokenizer_sample_bytes: int | None = None
    """Without data.tokenizer.path: train the byte-level BPE on this many curated bytes (null: data.tokenizer.train_bytes)."""


def check_prepare_config(prep: PrepareConfig) -> None:
    check_curation_config(prep.curation, "prepare.curation")
    if prep.tokenizer_backend not in ("auto", "tiktoken", "tokenizers"):
        raise DataError(
            f"prepare.tokenizer_backend={prep.tokenizer_backend!r} is not allowed; allowed: auto, tiktoken, tokenizers"
        )
    if prep.dtype not in ("auto", "uint16", "uint32"):
        raise DataError(f"prepare.dtype={prep.dtype!r} is not allowed; allowed: auto, uint16, uint32")
    for name in ("shard_bytes", "batch_bytes"):
        if getattr(prep, name) <= 0:
            raise DataError(f"prepare.{name}={getattr(prep, name)} must be > 0")
    if prep.workers < 0:
        raise DataError(f"prepare.workers={prep.workers} must be >= 0 (0: one per core)")


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    if requested == "uint16" and vocab_size > 2**16:
        raise DataError(
            f"prepare.dtype=uint16 cannot hold a vocabulary of {vocab_size} tokens (ids up to {vocab_size - 1} > "
            "65535); allowed: uint32 or auto"
        )
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    return np.dtype(requested)


def output_dir(data: DataConfig, prep: PrepareConfig) -> Path:
    return Path(prep.output_dir) if prep.output_dir else Path(data.cache_dir) / "shards" / data.name


def source_description(data: DataConfig) -> dict:
    keys = ("name", "source", "paths", "hub_name", "hub_config", "hub_split", "text_field", "max_documents",
            "max_bytes", "val_fraction")  # fmt: skip
    return {k: getattr(data, k) for k in keys}


def settings_key(data: DataConfig, prep: PrepareConfig, tokenizer: Tokenizer) -> str:
    """What the shards depend on (not workers or batch size: the output does not)."""
    settings = {
        "source": source_description(data),
        "fingerprint": fingerprint(data),
        "curation": dataclasses.asdict(prep.curation),
        "shard_bytes": prep.shard_bytes,
        "dtype": token_dtype(tokenizer.vocab_size, prep.dtype).name,
        "tokenizer": tokenizer.digest(),
        "tokenizer_backend": prep.tokenizer_backend,
        "special_text": "plain",  # special-token text in documents is text (before: the special token)
        # 2: U+2028/U+2029/NEL/VT/FF/FS/GS/RS break lines; a top n-gram tie counts the first to occur
        "curation_rules": 2,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- workers ----------------------------------------------------------------------------------------------

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The regex of tokenizers' ByteLevel pre-tokenizer (use_regex=True), in tiktoken's spelling."""
TIKTOKEN_CHECK_EVERY = 128
"""With tiktoken, every document whose content hash is 0 modulo this is also encoded by `tokenizers` and
compared; a difference stops the run (prepare.tokenizer_backend=tokenizers then avoids tiktoken)."""
TIKTOKEN_PROBE = (
    "Hello, world! It's 3.14 — naïve café's “quotes” isn't we'll they've I'm you'd  double  spaces\n\n\n"
    "\ttabs\t\tand\r\nCRLF 中文字符 日本語 한국어 emoji 👍🏽 e\u0301 ﬁ ligature ÅΩ 12345 1,000,000 x=y+1;"
    "   trailing   \n  \u00a0nbsp\u2009thin \u3000ideographic <eos> <pad><extra_id_0> <mask>s 'S 'LL\n"
    "def f(a, b):\n    return {'k': [1, 2]}  # comment\n\n\n    \n"
)


def tiktoken_encoding(tokenizer: Tokenizer):
    """The tokenizer as a tiktoken Encoding, or None where it cannot be the same tokenizer (tiktoken missing,
    not a plain byte-level BPE with the GPT-2 regex, a normaliser, odd added tokens), or where it encodes
    TIKTOKEN_PROBE differently. Added tokens become tiktoken special tokens, found in the text as `tokenizers`
    finds them."""
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain = (
        model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("byte_fallback")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
        and all(
            not (t.get("lstrip") or t.get("rstrip") or t.get("single_word")) for t in spec["added_tokens"]
        )
    )
    if not plain:
        return None
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    added = {t["content"]: t["id"] for t in spec["added_tokens"]}
    try:
        ranks = {bytes(decode[c] for c in s): i for s, i in model["vocab"].items() if s not in added}
        encoding = tiktoken.Encoding(
            f"llmtrain-{tokenizer.digest()}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=added,
        )
    except (KeyError, ValueError):
        return None
    if encoding.encode_ordinary(TIKTOKEN_PROBE) != tokenizer.encode_documents([TIKTOKEN_PROBE])[0]:
        return None
    return encoding


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel vocabulary is spelled in)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_worker: dict = {}


def _init_worker(
    curation: CurationConfig,
    tokenizer_json: str,
    val_fraction: float,
    dtype: str,
    backend: str = "tokenizers",
) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = Tokenizer(HFTokenizer.from_str(tokenizer_json))
    _worker.update(
        curator=Curator(curation),
        tokenizer=tokenizer,
        tiktoken=tiktoken_encoding(tokenizer) if backend == "tiktoken" else None,
        val_fraction=val_fraction,
        dtype=np.dtype(dtype),
    )


@dataclass
class _Batch:
    """The documents of one batch that passed the filters, tokenised (their texts stay in the worker)."""

    tokens: np.ndarray
    """Every document's tokens followed by EOS, one after another."""
    lengths: np.ndarray
    val: np.ndarray
    sizes: np.ndarray
    """UTF-8 bytes of each curated document."""
    digests: np.ndarray
    signatures: np.ndarray
    """uint32[documents, num_perm]; all-zero rows where a document has none (has_signature False)."""
    has_signature: np.ndarray


def _work(texts: list[str]) -> tuple[_Batch, dict[str, StageStats]]:
    curator, tokenizer = _worker["curator"], _worker["tokenizer"]
    curated, stats = curator.process(texts)
    kept = [doc for doc in curated if doc is not None]
    t0 = time.process_time()
    encoded = _encode([doc.text for doc in kept], tokenizer, _worker.get("tiktoken"))
    stats["tokenize"] = StageStats(cpu_seconds=time.process_time() - t0)
    dtype, eos = _worker["dtype"], tokenizer.eos_id
    lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
    tokens = np.full(int(lengths.sum()), eos, dtype=dtype)
    ends = np.cumsum(lengths)
    for ids, end, n in zip(encoded, ends.tolist(), lengths.tolist()):
        tokens[end - n : end - 1] = ids
    cfg = curator.cfg.dedup
    signatures = np.zeros((len(kept), cfg.num_perm if cfg.near else 0), dtype=np.uint32)
    has_signature = np.array([doc.signature is not None for doc in kept], dtype=bool)
    for row, doc in enumerate(kept):
        if doc.signature is not None:
            signatures[row] = doc.signature
    batch = _Batch(
        tokens=tokens,
        lengths=lengths,
        val=np.array([is_validation(doc.text, _worker["val_fraction"]) for doc in kept], dtype=bool),
        sizes=np.array([len(doc.text.encode("utf-8")) for doc in kept], dtype=np.int64),
        digests=digest_keys([doc.digest for doc in kept]) if cfg.exact else np.zeros(0, np.uint64),
        signatures=signatures,
        has_signature=has_signature,
    )
    return batch, stats


def _encode(texts: list[str], tokenizer: Tokenizer, encoding=None) -> list[list[int]]:
    """Documents' token ids, special-token text read as text (`Tokenizer.encode_documents`): tiktoken's
    ordinary encoding when given (checked against `tokenizers` on a sample of documents chosen by content),
    else tokenizers'."""
    if encoding is None:
        return tokenizer.encode_documents(texts)
    out = [encoding.encode_ordinary(t) for t in texts]
    for text, ids in zip(texts, out):
        checked = zlib.crc32(text.encode("utf-8")) % TIKTOKEN_CHECK_EVERY == 0
        if checked and tokenizer.encode_documents([text])[0] != ids:
            raise DataError(
                "tiktoken and tokenizers encode a document differently (its first 80 characters: "
                f"{text[:80]!r}); set prepare.tokenizer_backend=tokenizers"
            )
    return out


class _Done:
    """A finished result, with AsyncResult's get(), for the in-process path."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


# -- writing ----------------------------------------------------------------------------------------------


def _atomic_tofile(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    array.tofile(tmp)
    os.replace(tmp, path)


def _atomic_save(array: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _stage_name(chunk: int, part: str) -> str:
    return f"stage-{chunk:05d}.{part}"


STAGE_PARTS = ("bin", "idx", "val.npy", "sizes.npy", "sig.npy", "exact-keys.npy", "exact-docs.npy",
               "near-keys.npy", "near-docs.npy")  # fmt: skip


class _ChunkWriter:
    """Stages one chunk: the tokens of every document that passed the filters, and what deduplication needs
    (digests and LSH band keys sorted, signatures), so the chunk's memory goes with it."""

    def __init__(self, folder: Path, chunk: int, dtype: np.dtype, dedup: DedupConfig):
        self.folder, self.chunk, self.dtype, self.dedup = folder, chunk, dtype, dedup
        self.batches: list[_Batch] = []
        self.stats = {name: StageStats() for name in SHARD_STAGES}

    def add(self, batch: _Batch) -> None:
        self.batches.append(batch)

    def finish(self, settings: str) -> dict:
        def joined(name: str, empty: np.ndarray) -> np.ndarray:
            parts = [getattr(b, name) for b in self.batches]
            return np.concatenate(parts) if parts else empty

        tokens = joined("tokens", np.zeros(0, self.dtype)).astype(self.dtype, copy=False)
        lengths = joined("lengths", np.zeros(0, np.int64))
        signatures = joined(
            "signatures", np.zeros((0, self.dedup.num_perm if self.dedup.near else 0), np.uint32)
        )
        has_signature = joined("has_signature", np.zeros(0, bool))
        digests = joined("digests", np.zeros(0, np.uint64))
        name = lambda part: self.folder / _stage_name(self.chunk, part)  # noqa: E731
        _atomic_tofile(tokens, name("bin"))
        _atomic_tofile(np.cumsum(lengths, dtype=np.uint64), name("idx"))
        _atomic_save(joined("val", np.zeros(0, bool)), name("val.npy"))
        _atomic_save(joined("sizes", np.zeros(0, np.int64)), name("sizes.npy"))
        _atomic_save(signatures, name("sig.npy"))
        keys, docs = (
            sorted_run(digests) if self.dedup.exact else (np.zeros(0, np.uint64), np.zeros(0, np.uint32))
        )
        _atomic_save(keys, name("exact-keys.npy"))
        _atomic_save(docs, name("exact-docs.npy"))
        if self.dedup.near and len(signatures):
            keys, docs = sorted_run(lsh_keys(signatures, self.dedup), has_signature)
        else:
            keys, docs = np.zeros(0, np.uint64), np.zeros(0, np.uint32)
        _atomic_save(keys, name("near-keys.npy"))
        _atomic_save(docs, name("near-docs.npy"))
        record = {
            "chunk": self.chunk,
            "settings": settings,
            "documents": len(lengths),
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
        }
        atomic_write_text(self.folder / _stage_name(self.chunk, "json"), json.dumps(record, indent=1))
        return record


def _chunks(
    docs: Iterator[str], shard_bytes: int, batch_bytes: int
) -> Iterator[tuple[int, list[str] | None]]:
    """(chunk, batch of texts) in stream order, and (chunk, None) after each chunk's last batch."""
    chunk, chunk_size, batch, batch_size = 0, 0, [], 0
    for text in docs:
        size = len(text.encode("utf-8"))
        batch.append(text)
        batch_size += size
        chunk_size += size
        if chunk_size >= shard_bytes:
            yield chunk, batch
            yield chunk, None
            chunk, chunk_size, batch, batch_size = chunk + 1, 0, [], 0
        elif batch_size >= batch_bytes:
            yield chunk, batch
            batch, batch_size = [], 0
    if batch or chunk_size:
        yield chunk, batch
        yield chunk, None


def _records(folder: Path, pattern: str, settings: str, files) -> dict[int, dict]:
    done = {}
    for path in sorted(folder.glob(pattern)):
        record = json.loads(path.read_text())
        if record.get("settings") != settings:
            raise DataError(
                f"{path} was made with other settings (tokenizer, curation, source or prepare.shard_bytes "
                f"differ); use another prepare.output_dir or delete {folder}"
            )
        if all((folder / f).is_file() for f in files(record)):
            done[record["chunk"]] = record
    return done


def _finished_chunks(folder: Path, settings: str) -> dict[int, dict]:
    """Chunks whose final shards are written (chunk-k.json)."""
    return _records(
        folder,
        "chunk-*.json",
        settings,
        lambda r: [f for s in r["shards"].values() for f in (s["file"], s["index"])],
    )


def _staged_chunks(folder: Path, settings: str) -> dict[int, dict]:
    """Chunks staged for deduplication (stage-k.json and its files)."""
    return _records(
        folder, "stage-*.json", settings, lambda r: [_stage_name(r["chunk"], p) for p in STAGE_PARTS]
    )


DEDUP_STATE, VERDICTS = "dedup.json", "dedup-verdicts.u8"


def _deduplicate(
    folder: Path, staged: dict[int, dict], n_chunks: int, cfg: DedupConfig, settings: str
) -> dict:
    """Settle every staged document (kept, or removed as an exact or near duplicate) from the staged keys and
    signatures; the verdicts go to a memory-mapped file, the state (chunk offsets) to dedup.json."""
    c0 = time.process_time()
    counts = [staged[k]["documents"] for k in range(n_chunks)]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    n_docs = int(offsets[-1])
    load = lambda k, part: np.load(folder / _stage_name(k, part), mmap_mode="r")  # noqa: E731
    exact = [
        KeyRun(load(k, "exact-keys.npy"), load(k, "exact-docs.npy"), int(offsets[k])) for k in range(n_chunks)
    ]
    near = [
        KeyRun(load(k, "near-keys.npy"), load(k, "near-docs.npy"), int(offsets[k])) for k in range(n_chunks)
    ]
    # Signature rows are read at random, one pread each: a memory map would fault in a page (and its
    # readahead) per 512-byte row, and the resident set would follow the number of candidate pairs.
    tables = [load(k, "sig.npy") for k in range(n_chunks)]
    columns = cfg.num_perm if cfg.near else 0
    row_bytes = columns * 4
    for t in tables:
        if t.dtype != np.uint32 or t.ndim != 2 or t.shape[1] != columns or not t.flags.c_contiguous:
            raise DataError(f"{t.filename}: not a uint32[documents, {columns}] signature table; delete it")
    where = [(os.open(t.filename, os.O_RDONLY), int(t.offset)) for t in tables]
    del tables

    def signatures(rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.int64)
        chunk_of = np.searchsorted(offsets, rows, side="right") - 1
        out = bytearray(len(rows) * row_bytes)
        for n, (k, row) in enumerate(zip(chunk_of.tolist(), (rows - offsets[chunk_of]).tolist())):
            fd, start = where[k]
            out[n * row_bytes : (n + 1) * row_bytes] = os.pread(fd, row_bytes, start + row * row_bytes)
        return np.frombuffer(out, dtype=np.uint32).reshape(len(rows), columns)

    tmp = folder / f".{VERDICTS}.tmp{os.getpid()}"
    verdicts = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n_docs, 1),))[:n_docs]
    workdir = folder / f".dedup-pairs.tmp{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    try:
        find_duplicates(n_docs, exact, near, signatures, cfg.threshold, verdicts, workdir=workdir)
        verdicts.flush()
        del verdicts
    finally:
        for fd, _ in where:
            os.close(fd)
        for leftover in workdir.iterdir():
            leftover.unlink()
        workdir.rmdir()
    os.replace(tmp, folder / VERDICTS)
    state = {"settings": settings, "chunks": n_chunks, "offsets": offsets.tolist(),
             "cpu_seconds": time.process_time() - c0}  # fmt: skip
    atomic_write_text(folder / DEDUP_STATE, json.dumps(state))
    return state


def _finish_chunk(folder: Path, record: dict, state: dict, dtype: np.dtype, settings: str) -> dict:
    """Write chunk k's train and val shards: the token ranges of its documents that deduplication kept, copied
    from the staged tokens (no tokenising again); then chunk-k.json, then the staged files go."""
    k = record["chunk"]
    stage = lambda part: folder / _stage_name(k, part)  # noqa: E731
    lo, hi = state["offsets"][k], state["offsets"][k + 1]
    verdicts = np.fromfile(folder / VERDICTS, dtype=np.uint8, count=hi - lo, offset=lo)
    ends = np.fromfile(stage("idx"), dtype=np.uint64).astype(np.int64)
    lengths = np.diff(ends, prepend=0)
    tokens = np.memmap(stage("bin"), dtype=dtype, mode="r") if len(ends) and ends[-1] else np.zeros(0, dtype)
    val, sizes = np.load(stage("val.npy")), np.load(stage("sizes.npy"))
    stats = {name: StageStats.from_dict(s) for name, s in record["stats"].items()}
    count_verdicts(stats, sizes, verdicts)
    kept = verdicts == 0
    t = stats["tokenize"]
    t.docs_in = t.docs_out = int(kept.sum())
    t.bytes_in = t.bytes_out = int(sizes[kept].sum())
    files = {}
    for split in ("train", "val"):
        chosen = kept & (val == (split == "val"))
        if not chosen.any():
            continue
        name = f"{split}-{k:05d}"
        part = np.asarray(tokens[np.repeat(chosen, lengths)])
        new_ends = np.cumsum(lengths[chosen], dtype=np.uint64)
        _atomic_tofile(part, folder / f"{name}.bin")
        _atomic_tofile(new_ends, folder / f"{name}.idx")
        files[split] = {"file": f"{name}.bin", "index": f"{name}.idx", "tokens": int(new_ends[-1]),
                        "documents": int(chosen.sum()), "max_id": int(part.max())}  # fmt: skip
    del tokens
    final = {"chunk": k, "settings": settings, "shards": files,
             "stats": {name: s.to_dict() for name, s in stats.items()}}  # fmt: skip
    atomic_write_text(folder / f"chunk-{k:05d}.json", json.dumps(final, indent=1))
    for part in (*STAGE_PARTS, "json"):
        stage(part).unlink(missing_ok=True)
    return final


def _peak_rss_mb() -> dict[str, float]:
    import resource  # POSIX

    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # kB on Linux, bytes on macOS
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return {"main": round(main, 1), "largest_worker": round(workers, 1)}


def _children_cpu() -> float:
    times = os.times()
    return times.children_user + times.children_system


# -- the pipeline -----------------------------------------------------------------------------------------


def curated_texts(
    data: DataConfig, curation: CurationConfig, split: str | None = "train", report: Report | None = None
) -> Iterator[str]:
    """Normalised, filtered, exactly deduplicated documents of one split (None: both), in one process; the
    filters' counts go into `report` when given."""
    curator = Curator(dataclasses.replace(curation, dedup=dataclasses.replace(curation.dedup, near=False)))
    seen: set[bytes] = set()
    for text in iter_documents(data):
        (doc,), stats = curator.process([text])
        if report is not None:
            report.merge({name: s for name, s in stats.items() if name in report.stages})
        if doc is None or doc.digest in seen:
            continue
        seen.add(doc.digest or content_digest(doc.text))
        if split is None or (split == "val") == is_validation(doc.text, data.val_fraction):
            yield doc.text


def _sample(texts: Iterator[str], budget: int) -> Iterator[str]:
    used = 0
    for text in texts:
        yield text
        used += len(text.encode("utf-8"))
        if used >= budget:
            return


TOKENIZER_REQUEST = "tokenizer-settings.json"


def tokenizer_request(data: DataConfig, prep: PrepareConfig) -> dict:
    """The settings that choose the shard set's tokenizer, by setting name: a given file, or what a trained
    BPE depends on (beyond the source and curation, which the settings key holds)."""
    t = data.tokenizer
    if t.path:
        return {"data.tokenizer.path": str(t.path)}
    return {"data.tokenizer.path": None, "data.tokenizer.vocab_size": t.vocab_size,
            "data.tokenizer.min_frequency": t.min_frequency, "data.tokenizer.n_sentinels": t.n_sentinels,
            "prepare.tokenizer_sample_bytes (else data.tokenizer.train_bytes)":
                prep.tokenizer_sample_bytes or t.train_bytes}  # fmt: skip


def _check_tokenizer_request(folder: Path, request: dict) -> None:
    """The folder's own tokenizer is reused only for the settings it was made with (TOKENIZER_REQUEST)."""
    own, record = folder / "tokenizer.json", folder / TOKENIZER_REQUEST
    other = f"another prepare.output_dir, or delete {folder}"
    reuse = f"use the same settings (or data.tokenizer.path={own}), {other}"
    if not record.is_file():  # made before the settings were recorded: check what the tokenizer itself shows
        tok = load_tokenizer(own)
        made = {"data.tokenizer.path": None, "data.tokenizer.vocab_size": tok.vocab_size,
                "data.tokenizer.n_sentinels": len(tok.sentinel_ids)}  # fmt: skip
        request = {k: v for k, v in request.items() if k in made}
    else:
        made = json.loads(record.read_text())
    keys = [k for k in {**made, **request} if request.get(k) != made.get(k)]
    if "data.tokenizer.path" in keys:  # a given file against a trained BPE: the other settings do not apply
        keys = ["data.tokenizer.path"]
    changed = [f"{k}={request.get(k)} (made with {made.get(k)})" for k in keys]
    if changed:
        raise DataError(f"{folder} holds a tokenizer made with other settings: {', '.join(changed)}; {reuse}")


def shard_tokenizer(data: DataConfig, prep: PrepareConfig, folder: Path) -> Tokenizer:
    """data.tokenizer.path, or the folder's own tokenizer.json (a restart with the data.tokenizer.* settings it
    was made with), or a byte-level BPE trained on a sample of the curated training documents."""
    own = folder / "tokenizer.json"
    request = tokenizer_request(data, prep)
    if data.tokenizer.path:
        tokenizer = load_tokenizer(data.tokenizer.path)
    elif own.is_file():
        _check_tokenizer_request(folder, request)
        return load_tokenizer(own)
    else:
        t = data.tokenizer
        budget = prep.tokenizer_sample_bytes or t.train_bytes
        log.info("prepare: training byte-level BPE (vocab %d) on %d curated bytes", t.vocab_size, budget)
        report = Report()
        texts = list(_sample(curated_texts(data, prep.curation, "train", report), budget))
        if not texts:
            raise DataError(f"{_source_name(data)}: {_nothing_left(report, 'train')}")
        tokenizer = train_bpe(texts, t.vocab_size, t.min_frequency, t.n_sentinels)
    if not own.is_file() or load_tokenizer(own).digest() != tokenizer.digest():
        if own.is_file() and list(folder.glob("chunk-*.json")):
            raise DataError(
                f"{folder} holds shards made with another tokenizer ({own}, digest {load_tokenizer(own).digest()}) "
                f"than data.tokenizer.path={data.tokenizer.path} ({tokenizer.digest()}); use another "
                "prepare.output_dir or delete it"
            )
        atomic_write_text(folder / TOKENIZER_REQUEST, json.dumps(request, indent=1))  # first: see the check
        tokenizer.save(own)
    return tokenizer


def prepare_shards(data: DataConfig, prep: PrepareConfig) -> dict:
    """Run the whole pipeline into output_dir(data, prep) and return the manifest (reused when complete)."""
    check_prepare_config(prep)
    if data.source == "files":
        resolve_paths(data.paths)  # missing, empty or unknown files: named before anything is made
    folder = output_dir(data, prep)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"prepare.output_dir: {folder} is a file; give a folder (made if missing)")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare(data, prep, folder)
    except BaseException:
        # bad input found before any chunk was staged: leave no folder behind that looks like a started set
        # (but a trained tokenizer stays: a restart reuses it instead of training it again)
        started = any(folder.glob("stage-*.json")) or any(folder.glob("chunk-*.json"))
        if created and not started and not (folder / "tokenizer.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            for parent in created[1:]:
                if any(parent.iterdir()):
                    break
                parent.rmdir()
        raise


def _prepare(data: DataConfig, prep: PrepareConfig, folder: Path) -> dict:
    tokenizer = shard_tokenizer(data, prep, folder)
    dtype = token_dtype(tokenizer.vocab_size, prep.dtype)
    settings = settings_key(data, prep, tokenizer)
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            log.info("prepare: %s is complete; reusing it", folder)
            _remove_working_files(folder)  # a kill after the manifest could leave them
            return manifest
        raise DataError(
            f"{manifest_path} was made with other settings; use another prepare.output_dir or delete {folder}"
        )
    for leftover in folder.glob(".*.tmp*"):  # half-written files of a killed run
        if leftover.is_dir():
            for f in leftover.iterdir():
                f.unlink()
            leftover.rmdir()
        else:
            leftover.unlink()
    done = _finished_chunks(folder, settings)
    staged = _staged_chunks(folder, settings)
    state = None
    if (folder / DEDUP_STATE).is_file() and (folder / VERDICTS).is_file():
        state = json.loads((folder / DEDUP_STATE).read_text())
        state = state if state.get("settings") == settings else None
    if done or staged:
        log.info(
            "prepare: restarting; %d staged and %d finished chunks will be skipped", len(staged), len(done)
        )

    workers = prep.workers or os.cpu_count() or 1
    cfg = prep.curation.dedup
    report = Report(SHARD_STAGES)
    report.workers = workers
    t0, cpu0, children0 = time.perf_counter(), time.process_time(), _children_cpu()
    if state is None:  # stream: curate, tokenise and stage every chunk not staged yet
        backend = _tokenizer_backend(prep, tokenizer)
        init_args = (prep.curation, tokenizer.hf.to_str(), data.val_fraction, dtype.name, backend)
        n_chunks = _stream(data, prep, folder, init_args, dtype, settings, done, staged, workers)
        staged = _staged_chunks(folder, settings)
        missing = [k for k in range(n_chunks) if k not in staged]
        if missing:
            raise DataError(f"{folder}: chunks {missing[:5]} were finished without the rest; delete {folder}")
        state = _deduplicate(folder, staged, n_chunks, cfg, settings)
    report.stages["near_dedup"].cpu_seconds += state["cpu_seconds"]
    records = []
    for k in range(state["chunks"]):
        record = done.get(k) or _finish_chunk(folder, staged[k], state, dtype, settings)
        records.append(record)
        report.merge({name: StageStats.from_dict(s) for name, s in record["stats"].items()})
    report.wall_seconds = time.perf_counter() - t0
    report.cpu_seconds = time.process_time() - cpu0 + _children_cpu() - children0
    report.peak_rss_mb = _peak_rss_mb()
    manifest = _write_manifest(folder, data, prep, tokenizer, dtype, settings, records, report)
    _remove_working_files(folder)
    return manifest


def _remove_working_files(folder: Path) -> None:
    """What only an unfinished set needs: the dedup verdicts and state, staged chunks (a chunk finished just
    before a crash keeps its staged files)."""
    for name in (VERDICTS, DEDUP_STATE):
        (folder / name).unlink(missing_ok=True)
    for leftover in folder.glob("stage-*"):
        leftover.unlink()


def _tokenizer_backend(prep: PrepareConfig, tokenizer: Tokenizer) -> str:
    if prep.tokenizer_backend == "tokenizers":
        return "tokenizers"
    if tiktoken_encoding(tokenizer) is not None:
        return "tiktoken"
    if prep.tokenizer_backend == "tiktoken":
        raise DataError(
            "prepare.tokenizer_backend=tiktoken: tiktoken is not installed, or it cannot reproduce this "
            "tokenizer (only a plain byte-level BPE); use auto or tokenizers"
        )
    return "tokenizers"


def _stream(data, prep, folder, init_args, dtype, settings, done, staged, workers) -> int:
    """Read the source, curate and tokenise its batches in the workers and stage every chunk not finished
    before; the number of chunks."""
    pool = None
    if workers > 1:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=init_args)
    else:
        _init_worker(*init_args)
    # In stream order: ("batch", chunk, result) and ("end", chunk, None) after a chunk's last batch. Chunks
    # staged or finished by an earlier run are read past. At most 2 batches per worker in flight.
    pending: collections.deque = collections.deque()
    tasks = _chunks(iter_documents(data), prep.shard_bytes, prep.batch_bytes)
    writer: _ChunkWriter | None = None
    n_chunks = 0
    try:
        while True:
            while len(pending) < 2 * workers + 2 and (item := next(tasks, None)) is not None:
                chunk, texts = item
                n_chunks = chunk + 1
                if chunk in done or chunk in staged:
                    continue
                if texts is None:
                    pending.append(("end", chunk, None))
                else:
                    result = pool.apply_async(_work, (texts,)) if pool else _Done(_work(texts))
                    pending.append(("batch", chunk, result))
            if not pending:
                break
            kind, chunk, result = pending.popleft()
            writer = writer or _ChunkWriter(folder, chunk, dtype, prep.curation.dedup)
            if kind == "end":
                writer.finish(settings)
                writer = None
                continue
            batch, stats = result.get()
            for name, s in stats.items():
                writer.stats[name].merge(s)
            writer.add(batch)
        if pool is not None:
            pool.close()  # every result is in: let the workers exit
            pool.join()
            pool = None
    finally:
        if pool is not None:  # an error or an interrupt: stop the workers
            pool.terminate()
            pool.join()
    return n_chunks


def _write_manifest(
    folder: Path,
    data: DataConfig,
    prep: PrepareConfig,
    tokenizer: Tokenizer,
    dtype: np.dtype,
    settings: str,
    records: list[dict],
    report: Report,
) -> dict:
    splits = {}
    for split in ("train", "val"):
        shards = [r["shards"][split] for r in records if split in r["shards"]]
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
        report.tokens[split] = splits[split]["tokens"]
        report.documents[split] = splits[split]["documents"]
    summary = report.to_dict()
    problem = None
    if not report.stages["normalize"].docs_in:
        problem = f"{_source_name(data)}: no non-empty document found"
    elif not splits["train"]["documents"]:
        problem = _nothing_left(report, "train")
    elif not splits["val"]["documents"]:
        problem = (
            f"{_source_name(data)}: no document of the {splits['train']['documents']} kept fell in the validation "
            f"split (data.val_fraction={data.val_fraction}); raise data.val_fraction or add data"
        )
    if problem:
        _discard_unfinishable(folder, data)
        raise DataError(problem)
    atomic_write_text(folder / "report.json", json.dumps(summary, indent=1))
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "source": source_description(data),
        "curation": dataclasses.asdict(prep.curation),
        "shard_bytes": prep.shard_bytes,
        "dtype": dtype.name,
        "tokenizer": {
            "file": "tokenizer.json",
            "digest": tokenizer.digest(),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },  # fmt: skip
        "splits": splits,
        "report": summary,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _discard_unfinishable(folder: Path, data: DataConfig) -> None:
    """Remove a set that these settings can never finish (the same run ends with the same error): otherwise its
    chunk records, made with the settings the error advises to change, would refuse the next run. The tokenizer
    goes too (it was trained on this source, curation and split), unless it is the file data.tokenizer.path
    names. Only the set's own files are removed; the folder itself goes in prepare_shards if this run made it."""
    own = folder / "tokenizer.json"
    given = bool(data.tokenizer.path) and Path(data.tokenizer.path).resolve() == own.resolve()
    log.warning(
        "prepare: nothing to make a shard set of in %s; removing its chunks, shards%s",
        folder,
        "" if given else " and tokenizer",
    )
    _remove_working_files(folder)
    names = ("chunk-*.json", "train-*.bin", "train-*.idx", "val-*.bin", "val-*.idx", "report.json")
    for path in [p for pattern in names for p in folder.glob(pattern)]:
        path.unlink()
    if not given:
        own.unlink(missing_ok=True)
        (folder / TOKENIZER_REQUEST).unlink(missing_ok=True)


def _source_name(data: DataConfig) -> str:
    return {"stdlib": "data.source=stdlib", "files": f"data.paths={list(data.paths)}"}.get(
        data.source, f"data.hub_name={data.hub_name}"
    )


def _nothing_left(report: Report, split: str) -> str:
    removed = collections.Counter()
    for s in report.stages.values():
        removed.update(s.removed)
    top = ", ".join(f"{rule} {n}" for rule, n in removed.most_common(4)) or "nothing"
    if not report.stages["normalize"].docs_in:
        return "the source has no non-empty document"
    return (
        f"curation kept no {split} document of {report.stages['normalize'].docs_in} read (removed by: {top}); "
        "loosen the prepare.curation.* settings named there, or pick a preset that suits the text "
        "(prepare=code for source code, prepare=minimal)"
    )


# -- reading ----------------------------------------------------------------------------------------------


class TokenArray:
    """The tokens of several shard files, memory-mapped, read as one array: len(), [i], [a:b] (-> ndarray)."""

    def __init__(
        self,
        files: list[Path],
        lengths: list[int],
        dtype: np.dtype,
        index_files: list[Path],
        max_ids: list[int] | None = None,
    ):
        self.files, self.index_files, self.dtype = files, index_files, np.dtype(dtype)
        self.max_ids = max_ids
        self.filename = str(files[0].parent) if files else None
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            n = int(self.offsets[i + 1] - self.offsets[i])
            self._maps[i] = np.memmap(self.files[i], dtype=self.dtype, mode="r", shape=(n,))
        return self._maps[i]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            index = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= index < len(self):
                raise IndexError(key)
            shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
            return self._shard(shard)[index - self.offsets[shard]]
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenArray takes an index or a contiguous slice")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left")) - 1
        pieces = [
            self._shard(i)[max(start - self.offsets[i], 0) : min(stop, self.offsets[i + 1]) - self.offsets[i]]
            for i in range(first, last + 1)
        ]
        return np.asarray(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None):
        array = self[0 : len(self)]
        return array if dtype is None else array.astype(dtype)

    def max(self) -> int:
        """Largest token id, from the manifest (no pass over the tokens)."""
        if self.max_ids is not None:
            return max(self.max_ids, default=0)
        return max(
            (
                int(self._shard(i).max())
                for i in range(len(self.files))
                if self.offsets[i + 1] > self.offsets[i]
            ),
            default=0,
        )

    def astype(self, dtype) -> np.ndarray:
        return self[0 : len(self)].astype(dtype)

    def document_ends(self) -> np.ndarray:
        """End offset of every document (each ends with EOS), over the whole array."""
        ends = [
            np.fromfile(p, dtype=np.uint64).astype(np.int64) + self.offsets[i]
            for i, p in enumerate(self.index_files)
        ]
        return np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)


class ShardSet:
    """A complete shard directory: its manifest, tokenizer and per-split token arrays."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.dtype = np.dtype(manifest["dtype"])

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / self.manifest["tokenizer"]["file"]

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def split(self, name: str) -> TokenArray:
        shards = self.manifest["splits"][name]["shards"]
        return TokenArray(
            [self.folder / s["file"] for s in shards],
            [s["tokens"] for s in shards],
            self.dtype,
            [self.folder / s["index"] for s in shards],
            [s["max_id"] for s in shards],
        )


def open_shards(path: str | Path, tokenizer_digest: str | None = None) -> ShardSet:
    """Open a shard set made by prepare_shards, checking it is complete and (optionally) its tokenizer."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        what = (
            "does not exist"
            if not folder.exists()
            else "has no manifest.json: its preparation did not finish"
        )
        raise DataError(f"shard directory {folder} {what}; run scripts/prepare_data.py (it resumes)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = folder / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                raise DataError(f"shard {path} is missing or has the wrong size; prepare the set again")
    digest = manifest["tokenizer"]["digest"]
    if tokenizer_digest is not None and tokenizer_digest != digest:
        raise DataError(
            f"shards in {folder} were made with another tokenizer (digest {digest}) than the one configured "
            f"({tokenizer_digest}); set data.tokenizer.path to {folder / manifest['tokenizer']['file']} or "
            "prepare the shards again with this tokenizer"
        )
    return ShardSet(folder, manifest)


def shard_corpus(path: str | Path, tokenizer_path: str | None = None) -> Corpus:
    """A Corpus (as prepare_corpus returns) over a shard set: memory-mapped train and val arrays."""
    expected = load_tokenizer(tokenizer_path).digest() if tokenizer_path else None
    shards = open_shards(path, expected)
    return Corpus(shards.tokenizer(), shards.split("train"), shards.split("val"), shards.tokenizer_path)


# -- Hydra ------------------------------------------------------------------------------------------------


def register_prepare_config(name: str, default_preset: str = "web", **sections: type) -> None:
    """Store root config `name`: configs/train.yaml, a `prepare` section chosen from the presets
    (prepare=web | code | minimal, see curation.PRESETS) and any extra typed `sections`."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from llmtrain.config import register_configs
    from llmtrain.data.curation import PRESETS

    register_configs()
    store = ConfigStore.instance()
    for preset, make in PRESETS.items():
        store.store(group="prepare", name=preset, node=PrepareConfig(curation=make()))
    node = {
        "defaults": [
            "_self_",
            {"prepare": default_preset},
            "train",
        ],  # prepare first: train closes the root schema
        **{key: OmegaConf.structured(cls) for key, cls in sections.items()},
    }
    store.store(name=name, node=node)
