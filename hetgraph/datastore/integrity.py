"""The files of a datastore: which they are, their integrity record, and their checks.

A completed datastore records every file's size and checksums in ``metadata.json``
(``integrity``, see :func:`hetgraph.integrity.file_record`). :meth:`Datastore.open
<hetgraph.datastore.Datastore.open>` compares sizes and sampled checksums;
:func:`datastore_problems` (used by :func:`hetgraph.verify.verify`) compares everything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hetgraph.datastore.metadata import DatastoreError, DatastoreMetadata, rebuild_hint
from hetgraph.datastore.progress import progress_files, read_record
from hetgraph.errors import HetgraphError
from hetgraph.integrity import check_file_record, file_record
from hetgraph.io import (
    DATASTORE_METADATA,
    DATASTORE_PROGRESS,
    DOC_NAMES,
    INDEX_BLOCK_FILE,
    INDEX_DIR,
    INDEX_FILE,
    INDEX_LISTS_FILE,
    INDEX_METADATA,
    INDEX_PLAN_FILE,
    INDEX_SHARDS_DIR,
    INDEX_TRAINED_FILE,
)
from hetgraph.locking import LOCK_FILE
from hetgraph.storage import remove_without_following, temporary_target

logger = logging.getLogger(__name__)

ARRAY_NAMES = ("keys", "next_tokens", "tokens", "doc_ids", "positions")
_OWN_FILES = {
    DATASTORE_METADATA,
    DATASTORE_PROGRESS,
    DOC_NAMES,
    LOCK_FILE,
    *(f"{name}.npy" for name in ARRAY_NAMES),
}
#: Per-layer feature arrays, and the per-rank progress records of a distributed build.
_OWN_PATTERN = re.compile(r"^features_-?\d+\.npy$|^progress\.rank\d+\.json$")
_OWN_INDEX_FILES = {INDEX_FILE, INDEX_METADATA, INDEX_LISTS_FILE, LOCK_FILE}
#: What an unfinished on-disk index build keeps in ``index/shards/``.
_BLOCK_PREFIX, _, _BLOCK_REST = INDEX_BLOCK_FILE.partition("{")
_OWN_SHARD_PATTERN = re.compile(
    rf"^{re.escape(INDEX_TRAINED_FILE)}$|^{re.escape(INDEX_PLAN_FILE)}$"
    rf"|^{re.escape(_BLOCK_PREFIX)}\d+{re.escape(_BLOCK_REST.partition('}')[2])}$"
)


@dataclass(frozen=True)
class FileProblem:
    """What is wrong with one file of a datastore.

    Attributes:
        file: the file's name inside the datastore directory (``"keys.npy"``).
        message: the whole sentence, naming the file (``"keys.npy is missing"``); it is
            also the problem's ``str``.
    """

    file: str
    message: str

    def __str__(self) -> str:
        return self.message


def _own_name(path: Path) -> str:
    return temporary_target(path.name) or path.name


def _is_own_index_entry(path: Path) -> bool:
    if path.is_dir():
        return path.name == INDEX_SHARDS_DIR and all(
            _OWN_SHARD_PATTERN.match(_own_name(p)) for p in path.iterdir()
        )
    return _own_name(path) in _OWN_INDEX_FILES


def array_path(directory: str | Path, name: str) -> Path:
    """The ``.npy`` file of the datastore array ``name`` (``"keys"``, ``"features_3"``, …)."""
    return Path(directory) / f"{name}.npy"


def open_array(
    file: Path, shape: tuple[int, ...], dtype: Any
) -> tuple[np.ndarray | None, FileProblem | None]:
    """``(memmap, None)`` of the ``.npy`` file ``file`` if it holds ``dtype`` ``shape``, else
    ``(None, what is wrong with it)`` (never numpy's own messages, which suggest loading
    pickles)."""
    if not file.is_file():
        return None, FileProblem(file.name, f"{file.name} is missing")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        truncated = isinstance(error, EOFError) or "mmap length" in str(error)
        what = "truncated" if truncated else "not a valid .npy array file"
        return None, FileProblem(file.name, f"{file.name} is damaged ({what})")
    if array.shape != shape or array.dtype != np.dtype(dtype):
        return None, FileProblem(
            file.name,
            (
                f"{file.name} is damaged: expected {np.dtype(dtype).name} {shape}, found "
                f"{array.dtype.name} {array.shape}"
            ),
        )
    return array, None


def expected_arrays(metadata: DatastoreMetadata) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Name -> (shape, dtype) of every array a datastore with ``metadata`` holds."""
    n = metadata.num_entries
    arrays: dict[str, tuple[tuple[int, ...], Any]] = {"keys": ((n, metadata.dim), np.float16)}
    arrays.update(dict.fromkeys(ARRAY_NAMES[1:], ((n,), np.int32)))
    arrays.update(
        {
            f"features_{layer}": ((n, dim), np.float16)
            for layer, dim in metadata.feature_dims.items()
        }
    )
    return arrays


def array_problems(directory: Path, metadata: DatastoreMetadata) -> list[FileProblem]:
    """What is wrong with the ``.npy`` headers, shapes and dtypes (cheap: nothing is read)."""
    problems = []
    for name, (shape, dtype) in expected_arrays(metadata).items():
        _, problem = open_array(array_path(directory, name), shape, dtype)
        if problem:
            problems.append(problem)
    return problems


def integrity_record(directory: Path, metadata: DatastoreMetadata) -> dict[str, Any]:
    """The ``integrity`` section of a completed datastore's ``metadata.json``: a
    :func:`~hetgraph.integrity.file_record` of every array and of ``doc_names.json``."""
    names = [f"{name}.npy" for name in expected_arrays(metadata)]
    if (directory / DOC_NAMES).is_file():
        names.append(DOC_NAMES)
    return {"files": {name: file_record(directory / name) for name in names}}


def recorded_file_problems(
    directory: Path, metadata: DatastoreMetadata, *, full: bool
) -> list[FileProblem]:
    """What is wrong with the files against ``metadata.integrity`` (nothing to compare in
    older datastores without one); sizes and sampled checksums, whole files if ``full``."""
    record = metadata.integrity
    if not record:
        return []
    files = record.get("files")
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        return [
            FileProblem(
                DATASTORE_METADATA,
                f"{DATASTORE_METADATA} is damaged (its integrity record is malformed)",
            )
        ]
    problems = []
    for name, file in files.items():
        problem = check_file_record(directory / name, file, full=full)
        if problem:
            problems.append(FileProblem(name, f"{name} {problem}"))
    return problems


def is_own_entry(path: Path) -> bool:
    """Whether ``path`` (an entry of a datastore directory) is a file a datastore build or an
    index build writes there (including partial files of an interrupted write)."""
    if path.is_dir():
        return path.name == INDEX_DIR and all(_is_own_index_entry(p) for p in path.iterdir())
    name = _own_name(path)
    return name in _OWN_FILES or bool(_OWN_PATTERN.match(name))


def foreign_entries(directory: Path) -> list[str]:
    """Names of the entries of ``directory`` that no datastore build wrote (sorted)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if not is_own_entry(p))


def clear_datastore(directory: Path) -> None:
    """Delete the datastore files in ``directory`` (and its index), keeping the lock file.

    Raises:
        ValueError: ``directory`` holds anything else; nothing is deleted then.
    """
    foreign = foreign_entries(directory)
    if foreign:
        raise ValueError(f"{directory} holds files no datastore build wrote: {foreign[:5]}")
    for path in directory.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():  # a linked index/: only the link goes
            for inner in path.iterdir():  # shards/ of an unfinished on-disk index build too
                if inner.name != LOCK_FILE:
                    remove_without_following(inner, directory)
        else:
            remove_without_following(path, directory)
    logger.info("removed the datastore files in %s", directory)


def datastore_problems(directory: Path) -> tuple[list[str], list[str]]:
    """Every check of the datastore in ``directory``, whole-file checksums included:
    ``(files checked, problems)``; each problem names the file and the repair."""
    try:
        metadata = DatastoreMetadata.load(directory / DATASTORE_METADATA)
    except DatastoreError as error:
        return [DATASTORE_METADATA], [str(error)]
    checked = [DATASTORE_METADATA, *(f"{name}.npy" for name in expected_arrays(metadata))]
    progress_checked, progress = progress_problems(directory, metadata.complete)
    checked += progress_checked
    if not metadata.complete:
        return checked, [
            f"{directory / DATASTORE_METADATA} records an interrupted build; resume "
            "it by running the same build command again",
            *progress,
        ]
    problems = array_problems(directory, metadata)
    damaged = {problem.file for problem in problems}
    problems += [
        problem
        for problem in recorded_file_problems(directory, metadata, full=True)
        if problem.file not in damaged
    ]
    if not metadata.integrity:
        logger.info(
            "%s has no integrity record (built by an older hetgraph); only the array "
            "headers were checked",
            directory,
        )
    hint = rebuild_hint(directory)
    return checked, [f"{directory}/{problem}; {hint}" for problem in problems] + progress


def progress_problems(directory: Path, complete: bool) -> tuple[list[str], list[str]]:
    """The progress records (``progress.json``, ``progress.rank*.json``) of the datastore in
    ``directory`` checked against their checksums: ``(names checked, problems)``; each problem
    names the record and what to do."""
    problems, checked = [], []
    for path in progress_files(directory):
        checked.append(path.name)
        try:
            read_record(path)
        except HetgraphError as error:
            what = (
                "a completed datastore never reads it: delete it"
                if complete
                else "the build does not trust it: running the same build command again "
                "computes the batches it recorded again"
            )
            problems.append(f"{error}; {what}")
    return checked, problems
