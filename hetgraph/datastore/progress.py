"""Which batches of a datastore build are done: ``progress.json`` and per-rank records.

A one-process build records a prefix, ``{"batches_done": d, "num_batches": n}`` in
``progress.json`` (batches ``0 … d-1`` are written). In a distributed build every rank
records what it knows in its own ``progress.rank<r>.json``: ``{"done": [[a, b], …],
"num_batches": n}``, half-open intervals of batch indices whose rows are in the memmaps.
A rank starts its record from the union of every record read when the build started (rank 0
reads them and hands the union to all ranks), so rewriting its own file never forgets what
another rank, or an earlier run with another world size, finished. Every write is atomic
and every record carries its own checksum (:func:`hetgraph.integrity.atomic_write_json_record`:
a SHA-256 of the small JSON record, negligible next to a batch). A record that fails it, or
does not read, is not trusted: its batches count as not done and are computed again (a
damaged ``progress.json`` alone means the build starts again from its first batch), so a
changed byte can never mark unwritten rows as written. When the build completes, rank 0 writes
``progress.json`` with all batches done and removes the per-rank records, so a finished
datastore has the same files, byte for byte, however many processes built it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from hetgraph.errors import HetgraphError
from hetgraph.integrity import atomic_write_json_record, read_json_record
from hetgraph.io import (
    DATASTORE_PROGRESS,
    DATASTORE_RANK_PROGRESS,
    fsync_directory,
)

logger = logging.getLogger(__name__)

_RANK_FILE = re.compile(r"^progress\.rank\d+\.json$")

Intervals = list[list[int]]


def to_intervals(done: set[int]) -> Intervals:
    """Sorted half-open ``[start, stop)`` intervals covering the batch indices ``done``."""
    intervals: Intervals = []
    for b in sorted(done):
        if intervals and intervals[-1][1] == b:
            intervals[-1][1] = b + 1
        else:
            intervals.append([b, b + 1])
    return intervals


def from_intervals(intervals: Intervals, num_batches: int) -> set[int]:
    """The batch indices in ``intervals`` (clipped to ``range(num_batches)``)."""
    return {b for start, stop in intervals for b in range(max(0, start), min(stop, num_batches))}


def rank_files(out: Path) -> list[Path]:
    """The per-rank progress records in ``out``."""
    return sorted(p for p in out.iterdir() if _RANK_FILE.match(p.name)) if out.is_dir() else []


def read_record(path: Path) -> dict[str, Any] | None:
    """The progress record in ``path``, or None when there is none.

    Raises:
        hetgraph.errors.HetgraphError: it does not read or fails its checksum (the message
            names the file).
    """
    if not path.is_file():
        return None
    return read_json_record(path)


def progress_files(out: Path) -> list[Path]:
    """``progress.json`` (when there is one) and the per-rank records in ``out``."""
    main = [out / DATASTORE_PROGRESS] if (out / DATASTORE_PROGRESS).is_file() else []
    return main + rank_files(out)


def read_done(out: Path, num_batches: int) -> set[int]:
    """Every batch index that ``progress.json`` or any per-rank record marks as written.

    A record that does not read or fails its checksum counts as nothing done (its batches
    are simply run again): a damaged record is never trusted.
    """
    done: set[int] = set()
    for path in progress_files(out):
        try:
            record = read_record(path) or {}
            if path.name == DATASTORE_PROGRESS:
                done.update(range(min(int(record["batches_done"]), num_batches)))
            elif int(record["num_batches"]) == num_batches:
                done |= from_intervals(record["done"], num_batches)
        except (HetgraphError, KeyError, TypeError, ValueError) as error:
            logger.warning(
                "not trusting the progress record %s (%s): its batches are computed again",
                path,
                error,
            )
    return done


def write_prefix(out: Path, batches_done: int, num_batches: int) -> None:
    """``progress.json``: batches ``0 … batches_done-1`` are written."""
    atomic_write_json_record(
        out / DATASTORE_PROGRESS, {"batches_done": batches_done, "num_batches": num_batches}
    )


def write_rank(out: Path, rank: int, done: set[int], num_batches: int) -> None:
    """Rank ``rank``'s record: the batch indices ``done``."""
    atomic_write_json_record(
        out / DATASTORE_RANK_PROGRESS.format(rank=rank),
        {"done": to_intervals(done), "num_batches": num_batches},
    )


def mark_complete(out: Path, num_batches: int) -> None:
    """Record every batch as written in ``progress.json`` and drop the per-rank records."""
    write_prefix(out, num_batches, num_batches)
    stale = rank_files(out)
    for path in stale:
        path.unlink()
    if stale:
        fsync_directory(out)


class ProgressRecorder:
    """Records this process's progress after every batch: ``progress.json`` when the build
    runs in one process over a prefix of the schedule (as hetgraph always did), else this
    rank's own record.

    Args:
        out: the datastore directory.
        rank: this process's rank.
        done: batch indices written before this run started (all ranks agree on them).
        num_batches: batches in the whole schedule.
        prefix: whether to keep the one-process ``progress.json`` format.
    """

    def __init__(
        self, out: Path, rank: int, done: set[int], num_batches: int, prefix: bool
    ) -> None:
        self.out, self.rank, self.num_batches, self.prefix = out, rank, num_batches, prefix
        self.done = set(done)

    def record(self, batch: int) -> None:
        self.done.add(batch)
        if self.prefix:
            write_prefix(self.out, batch + 1, self.num_batches)
        else:
            write_rank(self.out, self.rank, self.done, self.num_batches)
