"""Where documents come from: the embedded standard-library corpus, local files, or a hub dataset.

Parquet and .json files and hub datasets go through the same `datasets` code path (streaming), so a hub name
works like a local path; tests use local files. Local .jsonl and .txt files are read directly (a JSON parser
per line runs at ten times the rate of datasets' streaming reader, which dominated prepare_data's reading).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from llmtrain.config import DataConfig

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Missing, empty or unreadable data; the message names the file or setting."""


def stdlib_files() -> list[Path]:
    """The standard library's own .py files (no site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Expand globs; every pattern must match an existing, non-empty file with a known extension."""
    files: list[Path] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        # a file that exists is that file, whatever its name holds ("corpus[2024].jsonl" is no glob)
        literal = [Path(path)] if Path(path).is_file() else []
        matches = literal or [Path(m) for m in sorted(glob.glob(path, recursive=True))]
        if not matches:
            raise DataError(f"data.paths: {pattern!r} matches no file")
        folders = [m for m in matches if m.is_dir()]  # a glob may also match folders: their files count
        if len(folders) == len(matches):
            what = f"{folders[0]} is a folder" if len(folders) == 1 else f"{pattern!r} matches only folders"
            raise DataError(
                f"data.paths: {what}; give files ({', '.join(BUILDERS)}) or a glob of them, such as "
                f"'{folders[0] / '*.jsonl'}'"
            )
        for match in (m for m in matches if not m.is_dir()):
            if match.suffix not in BUILDERS:
                raise DataError(
                    f"data.paths: {match} has extension {match.suffix!r}; allowed: {', '.join(BUILDERS)}"
                )
            if match.stat().st_size == 0:
                raise DataError(f"data.paths: {match} is empty")
            files.append(match)
    return files


def fingerprint(cfg: DataConfig) -> str:
    """A short hash naming this corpus and its reading settings, for cache keys (cheap: stat, not read)."""
    h = hashlib.sha256()
    if cfg.source == "stdlib":
        h.update(sys.version.encode())
        for p in stdlib_files():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    elif cfg.source == "files":
        for p in resolve_paths(cfg.paths):
            st = p.stat()
            h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(f"{cfg.hub_name}:{cfg.hub_config}:{cfg.hub_split}".encode())
    h.update(f"{cfg.text_field}:{cfg.max_documents}:{cfg.max_bytes}:{cfg.val_fraction}".encode())
    return h.hexdigest()[:16]


def _read_stdlib() -> Iterator[str]:
    for path in stdlib_files():
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of test fixtures are deliberately not UTF-8


def _unreadable(builder: str, files: list[Path], kwargs: dict) -> Path | None:
    """The first file that fails to parse on its own (called only after reading them together failed)."""
    from datasets import load_dataset

    for path in files:
        try:
            for _ in load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs):
                pass
        except Exception:
            return path
    return None


def _read_local(files: list[Path], field: str) -> Iterator[str]:
    """.jsonl (one JSON object per line) or .txt (one document per file) files, read directly."""
    for path in files:
        if path.suffix == ".txt":
            try:
                yield path.read_text(encoding="utf-8-sig")  # a byte-order mark is no text (as .jsonl)
            except (UnicodeDecodeError, OSError) as err:
                raise DataError(f"data.paths: {path}: could not be read: {err}") from None
            continue
        try:
            with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of line 1
                first = True
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise DataError(
                            f"data.paths: {path}: could not be read: line {lineno} is not valid JSON ({err})"
                        ) from None
                    # as `datasets` reads JSON lines: the first record sets the columns (a file without the
                    # text column is an error); a later record without it holds no text
                    if not isinstance(record, dict) or (first and field not in record):
                        columns = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise DataError(
                            f"data.paths ({path}, line {lineno}): no column {field!r} (data.text_field); "
                            f"columns: {columns}"
                        )
                    first = False
                    text = record.get(field)
                    if text is not None and not isinstance(text, str):
                        raise DataError(
                            f"data.paths ({path}, line {lineno}): column {field!r} (data.text_field) holds "
                            f"{type(text).__name__}, not text"
                        )
                    if text and not text.isascii():  # JSON's escapes can spell a lone surrogate ("\ud800")
                        try:
                            text.encode("utf-8")
                        except UnicodeEncodeError as err:
                            raise DataError(
                                f"data.paths ({path}, line {lineno}): column {field!r} (data.text_field) holds "
                                f"text that is not valid Unicode ({err.reason}: {err.object[err.start : err.end]!a})"
                            ) from None
                    yield text or ""
        except UnicodeDecodeError as err:
            raise DataError(f"data.paths: {path}: could not be read: not UTF-8 ({err})") from None


def _read_dataset(cfg: DataConfig) -> Iterator[str]:
    if cfg.source == "files":
        files = resolve_paths(cfg.paths)
        if all(p.suffix in (".jsonl", ".txt") for p in files) and len({p.suffix for p in files}) == 1:
            yield from _read_local(files, cfg.text_field)
            return
    from datasets import load_dataset

    if cfg.source == "files":
        builders = {BUILDERS[p.suffix] for p in files}
        if len(builders) > 1:
            raise DataError(f"data.paths mixes file kinds {sorted(builders)}; use one kind per data config")
        builder = builders.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        where = f"data.paths ({', '.join(map(str, files))})"
        load = partial(
            load_dataset, builder, data_files=[str(p) for p in files], split="train", streaming=True, **kwargs
        )
    else:
        where = f"data.hub_name={cfg.hub_name}"
        load = partial(load_dataset, cfg.hub_name, cfg.hub_config, split=cfg.hub_split, streaming=True)

    def unreadable(err: Exception) -> DataError:
        """pyarrow / json / network errors of corrupt files or an unknown or unreachable hub dataset: name
        the data (the file that fails, among several), not the parser."""
        bad = _unreadable(builder, files, kwargs) if cfg.source == "files" and len(files) > 1 else None
        culprit = f"data.paths: {bad}" if bad else where
        hint = (
            " (check the name, data.hub_config, data.hub_split, the network)" if cfg.source == "hub" else ""
        )
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return DataError(f"{culprit}: could not be read{hint}: {first_line}")

    try:
        records = iter(load())
    except Exception as err:
        raise unreadable(err) from err
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as err:
            raise unreadable(err) from err
        if cfg.text_field not in record:
            raise DataError(
                f"{where}: no column {cfg.text_field!r} (data.text_field); columns: {sorted(record)}"
            )
        text = record[cfg.text_field]
        if text is not None and not isinstance(text, str):  # as _read_local says of a JSON line's
            raise DataError(
                f"{where}: column {cfg.text_field!r} (data.text_field) holds {type(text).__name__}, not text"
            )
        yield text or ""


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Non-empty documents of the configured source, stopping at max_documents / max_bytes."""
    docs = _read_stdlib() if cfg.source == "stdlib" else _read_dataset(cfg)
    n_docs = n_bytes = 0
    for text in docs:
        if not text or not text.strip():
            continue
        yield text
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        if (cfg.max_documents and n_docs >= cfg.max_documents) or (
            cfg.max_bytes and n_bytes >= cfg.max_bytes
        ):
            return


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic document-level split: the same document always lands in the same split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction
