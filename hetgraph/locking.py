"""Advisory locks on the directories hetgraph commands write.

A datastore, index, adapter or run directory is written by one process at a time:
:func:`directory_lock` takes an exclusive ``fcntl.flock`` on ``<directory>/.hetgraph.lock``
and refuses at once, with a clear message, when another process holds it. The operating
system releases the lock when its holder exits — even after ``kill -9`` — so a crashed
writer never leaves a stale lock behind; the lock file itself is harmless and stays.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hetgraph.errors import HetgraphError

#: The lock file inside a locked directory.
LOCK_FILE = ".hetgraph.lock"


class LockError(HetgraphError):
    """Another process is writing the same output directory."""


@contextmanager
def directory_lock(directory: str | Path, what: str = "directory") -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) while the block runs.

    Args:
        directory: the output directory.
        what: what it is, for the message (``"datastore"``, ``"adapter"``, …).

    Raises:
        LockError: another process holds the lock.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise LockError(f"{what} {directory} is being written by {holder} (lock {path}); wait "
                            "for it to finish, or write to another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield directory
    finally:
        os.close(fd)  # closing releases the lock
