"""Pre-tokenised shards: sources -> curation -> tokens on disk, in parallel, restartable, read back memory-mapped.

Layout of a shard set (one directory):

    tokenizer.json              the tokenizer the tokens were made with (its digest is in the manifest)
    train-00000.bin  .idx       tokens (uint16 when the vocabulary fits, else uint32), each document followed by
    val-00000.bin    .idx       EOS; .idx holds each document's end offset (uint64), so boundaries are known
    chunk-00000.json            a finished chunk: its files, counts and report (written after its shards)
    chunk-00000.dedup.npz       what deduplication remembers of it (content digests, MinHash signatures)
    manifest.json               written last: without it the set is incomplete and nothing reads it
    report.json

The input stream is cut into chunks of `prepare.shard_bytes` raw bytes; chunk k makes train-k and val-k. A
restarted run reads the stream again, skips every chunk whose chunk-k.json exists (restoring its dedup state
from chunk-k.dedup.npz) and continues with the first unfinished one. Workers normalise, filter, hash and
tokenise batches in parallel; the main process deduplicates in document order and writes, so the output does
not depend on the number of workers.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmtrain.config import DataConfig
from llmtrain.data.curation import (
    STAGES,
    CurationConfig,
    Curator,
    Deduplicator,
    Report,
    StageStats,
    check_curation_config,
    content_digest,
)
from llmtrain.data.loader import Corpus
from llmtrain.data.sources import DataError, fingerprint, is_validation, iter_documents
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
    tokenizer_sample_bytes: int | None = None
    """Without data.tokenizer.path: train the byte-level BPE on this many curated bytes (null: data.tokenizer.train_bytes)."""


def check_prepare_config(prep: PrepareConfig) -> None:
    check_curation_config(prep.curation, "prepare.curation")
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
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- workers ----------------------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(curation: CurationConfig, tokenizer_json: str, val_fraction: float, dtype: str) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    _worker.update(
        curator=Curator(curation),
        tokenizer=Tokenizer(HFTokenizer.from_str(tokenizer_json)),
        val_fraction=val_fraction,
        dtype=np.dtype(dtype),
    )


@dataclass
class _Doc:
    """One curated, tokenised document (its text stays in the worker)."""

    digest: bytes | None
    signature: np.ndarray | None
    split: str
    size: int
    tokens: np.ndarray


def _work(texts: list[str]) -> tuple[list[_Doc | None], dict[str, StageStats]]:
    curator, tokenizer = _worker["curator"], _worker["tokenizer"]
    curated, stats = curator.process(texts)
    kept = [doc for doc in curated if doc is not None]
    t0 = time.process_time()
    encoded = _encode([doc.text for doc in kept], tokenizer) if kept else []
    stats["tokenize"] = StageStats(cpu_seconds=time.process_time() - t0)
    dtype, eos = _worker["dtype"], tokenizer.eos_id
    tokens = iter(encoded)
    out: list[_Doc | None] = []
    for doc in curated:
        if doc is None:
            out.append(None)
            continue
        split = "val" if is_validation(doc.text, _worker["val_fraction"]) else "train"
        ids = np.array([*next(tokens), eos], dtype=dtype)
        out.append(_Doc(doc.digest, doc.signature, split, len(doc.text.encode("utf-8")), ids))
    return out, stats


def _encode(texts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids without offsets (encode_batch_fast, tokenizers >= 0.20, skips computing them)."""
    fast = getattr(tokenizer.hf, "encode_batch_fast", None)
    if fast is None:
        return tokenizer.encode_batch(texts)
    return [e.ids for e in fast(texts, add_special_tokens=False)]


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


class _ChunkWriter:
    def __init__(self, folder: Path, chunk: int, dtype: np.dtype):
        self.folder, self.chunk, self.dtype = folder, chunk, dtype
        self.parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.digests: list[bytes] = []
        self.signatures: list[np.ndarray] = []
        self.stats = {name: StageStats() for name in SHARD_STAGES}

    def add(self, doc: _Doc) -> None:
        self.parts[doc.split].append(doc.tokens)
        if doc.digest is not None:
            self.digests.append(doc.digest)
        if doc.signature is not None:
            self.signatures.append(doc.signature)
        s = self.stats["tokenize"]
        s.docs_in, s.docs_out, s.bytes_in, s.bytes_out = (
            s.docs_in + 1,
            s.docs_out + 1,
            s.bytes_in + doc.size,
            s.bytes_out + doc.size,
        )

    def finish(self, settings: str) -> dict:
        files = {}
        for split, parts in self.parts.items():
            if not parts:
                continue
            name = f"{split}-{self.chunk:05d}"
            ends = np.cumsum([len(p) for p in parts], dtype=np.uint64)
            tokens = np.concatenate(parts)
            _atomic_tofile(tokens, self.folder / f"{name}.bin")
            _atomic_tofile(ends, self.folder / f"{name}.idx")
            files[split] = {
                "file": f"{name}.bin",
                "index": f"{name}.idx",
                "tokens": int(ends[-1]),
                "documents": len(parts),
                "max_id": int(tokens.max()),
            }
        dedup_path = self.folder / f"chunk-{self.chunk:05d}.dedup.npz"
        tmp = dedup_path.with_name(f".{dedup_path.name}.tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            digests=np.frombuffer(b"".join(self.digests), dtype=np.uint64),
            signatures=np.stack(self.signatures) if self.signatures else np.zeros((0, 0), dtype=np.uint32),
        )
        os.replace(tmp, dedup_path)
        record = {
            "chunk": self.chunk,
            "settings": settings,
            "shards": files,
            "stats": {name: s.to_dict() for name, s in self.stats.items()},
        }
        atomic_write_text(self.folder / f"chunk-{self.chunk:05d}.json", json.dumps(record, indent=1))
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


def _restore(folder: Path, record: dict, dedup: Deduplicator) -> None:
    path = folder / f"chunk-{record['chunk']:05d}.dedup.npz"
    try:
        with np.load(path) as saved:
            digests, signatures = saved["digests"], saved["signatures"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"{path}: unreadable ({err}); delete chunk-{record['chunk']:05d}.json to redo it"
        ) from None
    for digest in digests:
        dedup.remember(digest.tobytes(), None)
    for signature in signatures:
        dedup.remember(None, signature)


def _finished_chunks(folder: Path, settings: str) -> dict[int, dict]:
    done = {}
    for path in sorted(folder.glob("chunk-*.json")):
        record = json.loads(path.read_text())
        if record.get("settings") != settings:
            raise DataError(
                f"{path} was made with other settings (tokenizer, curation, source or prepare.shard_bytes "
                f"differ); use another prepare.output_dir or delete {folder}"
            )
        missing = [
            f
            for s in record["shards"].values()
            for f in (s["file"], s["index"])
            if not (folder / f).is_file()
        ]
        if not missing:
            done[record["chunk"]] = record
    return done


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


def shard_tokenizer(data: DataConfig, prep: PrepareConfig, folder: Path) -> Tokenizer:
    """data.tokenizer.path, or the folder's own tokenizer.json (a restart), or a byte-level BPE trained on a
    sample of the curated training documents."""
    own = folder / "tokenizer.json"
    if data.tokenizer.path:
        tokenizer = load_tokenizer(data.tokenizer.path)
    elif own.is_file():
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
        tokenizer.save(own)
    return tokenizer


def prepare_shards(data: DataConfig, prep: PrepareConfig) -> dict:
    """Run the whole pipeline into output_dir(data, prep) and return the manifest (reused when complete)."""
    check_prepare_config(prep)
    folder = output_dir(data, prep)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = shard_tokenizer(data, prep, folder)
    dtype = token_dtype(tokenizer.vocab_size, prep.dtype)
    settings = settings_key(data, prep, tokenizer)
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings:
            log.info("prepare: %s is complete; reusing it", folder)
            return manifest
        raise DataError(
            f"{manifest_path} was made with other settings; use another prepare.output_dir or delete {folder}"
        )
    for leftover in folder.glob(".*.tmp*"):  # half-written files of a killed run
        leftover.unlink()
    done = _finished_chunks(folder, settings)
    if done:
        log.info("prepare: restarting; %d finished chunks will be skipped", len(done))

    workers = prep.workers or os.cpu_count() or 1
    report, dedup = Report(SHARD_STAGES), Deduplicator(prep.curation.dedup)
    report.workers = workers
    records: list[dict] = []
    init_args = (prep.curation, tokenizer.hf.to_str(), data.val_fraction, dtype.name)
    pool = None
    if workers > 1:
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=init_args)
    else:
        _init_worker(*init_args)
    t0, cpu0, children0 = time.perf_counter(), time.process_time(), _children_cpu()
    # In stream order: ("batch", chunk, result), ("end", chunk, None) after a chunk's last batch, and
    # ("restore", chunk, None) for a chunk finished by an earlier run. At most 2 batches per worker in flight.
    pending: collections.deque = collections.deque()
    tasks = _chunks(iter_documents(data), prep.shard_bytes, prep.batch_bytes)
    writer: _ChunkWriter | None = None
    try:
        while True:
            while len(pending) < 2 * workers + 2 and (item := next(tasks, None)) is not None:
                chunk, texts = item
                if chunk in done:
                    if texts is None:
                        pending.append(("restore", chunk, None))
                elif texts is None:
                    pending.append(("end", chunk, None))
                else:
                    result = pool.apply_async(_work, (texts,)) if pool else _Done(_work(texts))
                    pending.append(("batch", chunk, result))
            if not pending:
                break
            kind, chunk, result = pending.popleft()
            if kind == "restore":
                _restore(folder, done[chunk], dedup)
                records.append(done[chunk])
                report.merge({k: StageStats.from_dict(v) for k, v in done[chunk]["stats"].items()})
                continue
            writer = writer or _ChunkWriter(folder, chunk, dtype)
            if kind == "end":
                records.append(writer.finish(settings))
                report.merge(writer.stats)
                writer = None
                continue
            docs, stats = result.get()
            for name, s in stats.items():
                writer.stats[name].merge(s)
            for doc in docs:
                if doc is not None and dedup.check(doc, doc.size, writer.stats):
                    writer.add(doc)
        if pool is not None:
            pool.close()  # every result is in: let the workers exit
            pool.join()
            pool = None
    finally:
        if pool is not None:  # an error or an interrupt: stop the workers
            pool.terminate()
            pool.join()
    report.wall_seconds = time.perf_counter() - t0
    report.cpu_seconds = time.process_time() - cpu0 + _children_cpu() - children0
    report.peak_rss_mb = _peak_rss_mb()
    return _write_manifest(folder, data, prep, tokenizer, dtype, settings, records, report)


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
    atomic_write_text(folder / "report.json", json.dumps(summary, indent=1))
    if not report.stages["normalize"].docs_in:
        raise DataError(f"{_source_name(data)}: no non-empty document found")
    if not splits["train"]["documents"]:
        raise DataError(_nothing_left(report, "train"))
    if not splits["val"]["documents"]:
        raise DataError(
            f"{_source_name(data)}: no document of the {splits['train']['documents']} kept fell in the validation "
            f"split (data.val_fraction={data.val_fraction}); raise data.val_fraction or add data"
        )
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
