"""``verify``: check every file of a datastore, index, adapter or run directory in full.

Opening a datastore, an index or an adapter already checks it cheaply (sizes, headers, the
metadata's own checksum, sampled checksums of large files). :func:`verify` reads everything:
each file's whole-content SHA-256 against the record written when the datastore, index or
adapter was completed, every ``.npy`` header, shape and dtype, the FAISS index's dimension,
size and metric against ``index.json``, and the safetensors files. It reports which file is
damaged and how to repair it::

    report = verify("runs/ds")
    if not report.ok:
        print(report)          # one line per damaged file, with the command that repairs it
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hetgraph.errors import HetgraphError
from hetgraph.integrity import read_json_record
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_DIR,
    CORPUS_METADATA,
    DATASTORE_METADATA,
    DATASTORE_PROGRESS,
    INDEX_DIR,
    INDEX_FILE,
    INDEX_METADATA,
    RUN_ADAPTER_DIR,
    RUN_DATASTORE_DIR,
    TRAINER_STATE,
    TRAINING_RESULT,
)

logger = logging.getLogger(__name__)


class VerificationError(HetgraphError):
    """:func:`verify` found damaged files (see :meth:`VerificationReport.raise_if_damaged`)."""


@dataclass
class VerificationReport:
    """What :func:`verify` checked and found.

    Attributes:
        path: the directory checked.
        kinds: what it holds, e.g. ``["datastore", "index"]`` (empty if nothing hetgraph wrote).
        checked: every file checked, as paths.
        problems: one line per problem, naming the damaged file and how to repair it.
    """

    path: Path
    kinds: list[str] = field(default_factory=list)
    checked: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found (and there was something to check)."""
        return not self.problems

    def raise_if_damaged(self) -> None:
        """Raise :class:`VerificationError` (all problems in its message) unless :attr:`ok`."""
        if not self.ok:
            raise VerificationError(f"{self.path}: " + " | ".join(self.problems))

    def __str__(self) -> str:
        what = " + ".join(self.kinds) or "nothing hetgraph wrote"
        if self.ok:
            return f"OK: {self.path} ({what}; {len(self.checked)} files checked in full)"
        lines = [
            f"DAMAGED: {self.path} ({what}; {len(self.checked)} files checked, "
            f"{len(self.problems)} problem(s))"
        ]
        return "\n".join(lines + [f"  - {problem}" for problem in self.problems])


def verify(path: str | Path) -> VerificationReport:
    """Check every file under a datastore, index, adapter or run directory in full.

    Recognised (and combined, e.g. a datastore with its ``index/``): a datastore
    (``metadata.json``, and its progress records, whose checksums are checked), an index
    (``index.json`` / ``index.faiss``), an adapter (``adapter_config.json``), a training run's
    ``checkpoint/`` (or a checkpoint directory itself: ``trainer_state.json``), a corpus cache
    entry (``corpus.json``) or a corpus cache directory holding entries, and a pipeline run
    directory (``datastore/`` and ``adapter/``). Reads every byte; it never changes a file.

    Returns:
        a :class:`VerificationReport`; a path holding none of these has the problem "not a
        hetgraph directory".
    """
    path = Path(path)
    report = VerificationReport(path)
    if not path.is_dir():
        report.problems.append(
            f"{path} is not a directory; pass a datastore, index, adapter or run directory"
        )
        return report
    _verify_into(path, report)
    if not report.kinds:
        report.problems.append(
            f"{path} holds no hetgraph datastore ({DATASTORE_METADATA}), index ({INDEX_METADATA}),"
            f" adapter ({ADAPTER_CONFIG}), checkpoint ({TRAINER_STATE}), corpus cache "
            f"({CORPUS_METADATA}) or run directory ({RUN_DATASTORE_DIR}/, {RUN_ADAPTER_DIR}/); "
            "pass one of those"
        )
    return report


def _verify_into(path: Path, report: VerificationReport) -> None:
    from hetgraph.datastore.integrity import datastore_problems
    from hetgraph.fusion.persistence import adapter_problems
    from hetgraph.index.files import index_problems
    from hetgraph.training.checkpoint import checkpoint_problems

    if (path / DATASTORE_METADATA).is_file() or (path / DATASTORE_PROGRESS).is_file():
        _add(report, "datastore", path, datastore_problems)
    if (path / INDEX_METADATA).is_file() or (path / INDEX_FILE).is_file():
        _add(report, "index", path, index_problems)
    if (path / TRAINER_STATE).is_file():  # a checkpoint directory itself
        _add(report, "checkpoint", path, checkpoint_problems)
    elif (path / ADAPTER_CONFIG).is_file() or (path / ADAPTER_WEIGHTS).is_file():
        _add(report, "adapter", path, adapter_problems)
        _check_json(path / TRAINING_RESULT, report)
    if (path / CHECKPOINT_DIR).is_dir():
        _add(report, "checkpoint", path / CHECKPOINT_DIR, checkpoint_problems)
    if _is_corpus_cache(path):
        _add(report, "corpus cache", path, _corpus_cache_problems)
    for sub in (INDEX_DIR, RUN_DATASTORE_DIR, RUN_ADAPTER_DIR):
        if (path / sub).is_dir():
            _verify_into(path / sub, report)


def _is_corpus_cache(path: Path) -> bool:
    """A corpus cache entry (it holds ``corpus.json``) or a cache root holding entries
    (``$HETGRAPH_CACHE/corpus``)."""
    if (path / CORPUS_METADATA).is_file():
        return True
    return any(p.is_dir() and (p / CORPUS_METADATA).is_file() for p in path.iterdir())


def _corpus_cache_problems(directory: Path) -> tuple[list[str], list[str]]:
    from hetgraph.corpus.cache import corpus_cache_problems

    entries = (
        [directory]
        if (directory / CORPUS_METADATA).is_file()
        else sorted(
            p for p in directory.iterdir() if p.is_dir() and (p / CORPUS_METADATA).is_file()
        )
    )
    checked = [
        str(f.relative_to(directory))
        for entry in entries
        for f in sorted(entry.iterdir())
        if f.is_file()
    ]
    return checked, corpus_cache_problems(directory)


def _add(
    report: VerificationReport,
    kind: str,
    directory: Path,
    check: Callable[[Path], tuple[list[str], list[str]]],
) -> None:
    checked, problems = check(directory)
    report.kinds.append(kind)
    report.checked += [directory / name for name in checked]
    report.problems += problems


def _check_json(
    path: Path, report: VerificationReport, fix: str = "train the adapter again"
) -> None:
    if path.is_file():
        report.checked.append(path)
        try:
            read_json_record(path)
        except HetgraphError as error:
            report.problems.append(f"{error}; {fix}")
