"""The files of a saved index (``index.faiss`` + ``index.json``, and ``index.ivfdata`` for an
on-disk index): writing, checked reading, and the full check :func:`hetgraph.verify.verify` runs.

``index.json`` carries its own checksum and an integrity record of ``index.faiss`` (size,
full and sampled SHA-256). Saving writes the new ``index.faiss`` aside, then removes
the old ``index.json`` before renaming it into place, so a save that is interrupted leaves
no pair that looks complete and one that fails for lack of space leaves the old index
whole. Loading checks the record cheaply (size and sampled checksum), then refuses a file
whose dimension, size or metric disagrees with ``index.json`` (an index read with the wrong
metric would rank neighbours backwards).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import faiss

from hetgraph.errors import HetgraphError
from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    read_json_record,
)
from hetgraph.io import (
    INDEX_DIR,
    INDEX_FILE,
    INDEX_LISTS_FILE,
    INDEX_METADATA,
    INTEGRITY_KEY,
    atomic_path,
    fsync_directory,
)
from hetgraph.locking import LockError, directory_lock, while_unlocked
from hetgraph.storage import remove_stale_temporaries, storage_errors

INDEX_FORMAT_VERSION = 1
#: FAISS's metric constant of each ``IndexConfig.metric``.
FAISS_METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


class DatastoreIndexError(HetgraphError):
    """An index is missing, damaged, built for another datastore, or cannot be built or
    searched with the settings given."""


def rebuild_index_hint(directory: str | Path) -> str:
    """How to rebuild the index in ``directory``, for CLI and Python users alike."""
    directory = Path(directory)
    store = directory.parent if directory.name == INDEX_DIR else "DATASTORE"
    return (
        f"rebuild it (hetgraph index build --datastore {store}, or "
        f"DatastoreIndex.build(datastore).save('{directory}'))"
    )


def write_index_files(directory: Path, index: faiss.Index, meta: dict[str, Any]) -> None:
    """Write ``index.faiss`` and ``index.json`` (``meta`` plus the integrity record) into
    ``directory``, holding its lock."""
    directory.mkdir(parents=True, exist_ok=True)
    with directory_lock(directory, "index"), storage_errors(directory, "build the index again"):
        remove_stale_temporaries(directory)
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
            # Written in full (a full disk leaves the old index whole); before the rename,
            # retire the old pair (no stale pair if interrupted) and an on-disk
            # predecessor's lists.
            for stale in (INDEX_METADATA, INDEX_LISTS_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (directory / stale).unlink()
            fsync_directory(directory)
        record = {"files": {INDEX_FILE: file_record(directory / INDEX_FILE)}}
        atomic_write_json_record(directory / INDEX_METADATA, {**meta, INTEGRITY_KEY: record})


def read_index_metadata(directory: Path) -> dict[str, Any]:
    """``index.json`` of ``directory``, checked (checksum, format version and field types).

    Raises:
        DatastoreIndexError: missing or damaged files.
        hetgraph.locking.LockError: so it seems because another process is writing the
            index right now.
    """
    with while_unlocked(directory, "index"):
        return _read_index_metadata(directory)


def _read_index_metadata(directory: Path) -> dict[str, Any]:
    meta_file, index_file = directory / INDEX_METADATA, directory / INDEX_FILE
    if not meta_file.is_file() or not index_file.is_file():
        raise DatastoreIndexError(
            f"no index at {directory} (need {INDEX_FILE} and {INDEX_METADATA}; an interrupted "
            f"save leaves only one); {rebuild_index_hint(directory)}"
        )
    meta = read_json_record(meta_file, DatastoreIndexError, rebuild_index_hint(directory))
    if meta.get("format_version") != INDEX_FORMAT_VERSION:
        version = meta.get("format_version")
        raise DatastoreIndexError(
            f"{meta_file}: unsupported index format {version!r}; {rebuild_index_hint(directory)}"
        )
    checks = {
        "factory": isinstance(meta.get("factory"), str),
        "metric": meta.get("metric") in FAISS_METRICS,
        "num_vectors": _is_count(meta.get("num_vectors")),
        "dim": _is_count(meta.get("dim")),
        "config": isinstance(meta.get("config"), dict),
        INTEGRITY_KEY: isinstance(meta.get(INTEGRITY_KEY, {}), dict),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise DatastoreIndexError(
            f"{meta_file} is damaged (invalid {', '.join(bad)}); {rebuild_index_hint(directory)}"
        )
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_on_disk(meta: dict[str, Any]) -> bool:
    """Whether ``index.json`` describes an on-disk index (lists in ``index.ivfdata``)."""
    return meta.get("storage") == "ondisk"


def index_file_problem(directory: Path, meta: dict[str, Any], *, full: bool) -> str | None:
    """What is wrong with ``index.faiss`` (and ``index.ivfdata`` of an on-disk index) against
    the record in ``meta`` (None if nothing, or if ``meta`` has no record: an index saved by
    an older hetgraph)."""
    files = meta.get(INTEGRITY_KEY, {}).get("files")
    names = [INDEX_FILE, INDEX_LISTS_FILE] if is_on_disk(meta) else [INDEX_FILE]
    for name in names:
        record = files.get(name) if isinstance(files, dict) else None
        if not isinstance(record, dict):
            if name == INDEX_LISTS_FILE:
                return f"{directory / INDEX_METADATA} is damaged (no record of {name})"
            continue
        problem = check_file_record(directory / name, record, full=full)
        if problem:
            return f"{directory / name} {problem}"
    return None


def write_ondisk_metadata(directory: Path, meta: dict[str, Any]) -> None:
    """Write ``index.json`` of an on-disk index whose ``index.faiss`` and ``index.ivfdata``
    are complete in ``directory`` (their integrity records are computed here)."""
    record = {
        "files": {name: file_record(directory / name) for name in (INDEX_FILE, INDEX_LISTS_FILE)}
    }
    atomic_write_json_record(
        directory / INDEX_METADATA, {**meta, "storage": "ondisk", INTEGRITY_KEY: record}
    )


def read_faiss_index(directory: Path, meta: dict[str, Any], *, full: bool = False) -> faiss.Index:
    """Read ``index.faiss`` after checking it against ``meta`` (cheaply unless ``full``).

    Raises:
        DatastoreIndexError: the file is damaged or disagrees with ``index.json`` (vectors,
            dimension or metric).
        hetgraph.locking.LockError: so it seems because another process is writing the
            index right now.
    """
    with while_unlocked(directory, "index"):
        return _read_faiss_index(directory, meta, full)


def _read_faiss_index(directory: Path, meta: dict[str, Any], full: bool) -> faiss.Index:
    index_file, hint = directory / INDEX_FILE, rebuild_index_hint(directory)
    problem = index_file_problem(directory, meta, full=full)
    if problem:
        raise DatastoreIndexError(f"{problem}; {hint}")
    # On-disk lists stay in index.ivfdata (mmap'd, paged in on demand), found next to the file.
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if is_on_disk(meta) else 0
    try:
        index = faiss.read_index(str(index_file), flags)
    except (RuntimeError, MemoryError):
        raise DatastoreIndexError(
            f"{index_file} is damaged (FAISS cannot read it: truncated, "
            f"empty or not an index file); {hint}"
        ) from None
    found = {
        "vectors": int(index.ntotal),
        "dimension": int(index.d),
        "metric": {v: k for k, v in FAISS_METRICS.items()}.get(index.metric_type, "other"),
    }
    wanted = {"vectors": meta["num_vectors"], "dimension": meta["dim"], "metric": meta["metric"]}
    wrong = [f"{k} {found[k]} vs {wanted[k]}" for k in wanted if found[k] != wanted[k]]
    if wrong:
        raise DatastoreIndexError(
            f"{index_file} does not match {directory / INDEX_METADATA} ("
            + "; ".join(wrong)
            + f"); the index is damaged, {hint}"
        )
    return index


def index_problems(directory: Path) -> tuple[list[str], list[str]]:
    """Every check of the index in ``directory``, the whole-file checksum included:
    ``(files checked, problems)``; each problem names the file and the repair."""
    names = [INDEX_METADATA, INDEX_FILE]
    try:
        meta = read_index_metadata(directory)
        if is_on_disk(meta):
            names.append(INDEX_LISTS_FILE)
        read_faiss_index(directory, meta, full=True)
    except (DatastoreIndexError, LockError) as error:
        return names, [str(error)]
    return names, []
