"""Advisory locks on the directories hetgraph commands write.

A datastore, index, adapter or run directory is written by one process at a time:
:func:`directory_lock` takes an exclusive ``fcntl.flock`` on ``<directory>/.hetgraph.lock``
and refuses at once, with a clear message, when another process holds it. The operating
system releases the lock when its holder exits — even after ``kill -9`` — so a crashed
writer never leaves a stale lock behind; the lock file itself is harmless and stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hetgraph.errors import HetgraphError
from hetgraph.storage import process_alive, storage_errors

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
    path = directory / LOCK_FILE
    with storage_errors(path, f"run the command again (nothing in {directory} was changed)"):
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise LockError(
                f"{what} {directory} is being written by {holder} (lock {path}); wait "
                "for it to finish, or write to another directory"
            ) from None
        with storage_errors(path, f"run the command again (nothing in {directory} was changed)"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()}".encode(), 0)
        yield directory
    finally:
        os.close(fd)  # closing releases the lock


def _flock_holders(path: Path) -> set[int] | None:
    """Processes holding a ``flock`` on ``path`` according to ``/proc/locks`` (Linux), or
    ``None`` where that cannot be read."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF": device (hex major:minor) and inode.
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter's line, not a holder's
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            with contextlib.suppress(ValueError):
                holders.add(int(fields[4]))
    return holders


def lock_holder(directory: str | Path) -> int | None:
    """The process id of another live process holding ``directory``'s lock, or ``None``.

    Read without taking the lock (so a writer starting at that moment is never refused):
    from ``/proc/locks`` where there is one, else from the process id the holder wrote into
    the lock file, if that process still runs.
    """
    path = Path(directory) / LOCK_FILE
    if not path.is_file():
        return None
    holders = _flock_holders(path)
    if holders is None:
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError:
            return None
        match = re.fullmatch(r"process (\d+)", text.strip())
        holders = {int(match[1])} if match else set()
    holders = {pid for pid in holders if pid != os.getpid() and process_alive(pid)}
    return min(holders) if holders else None


@contextmanager
def while_unlocked(directory: str | Path, what: str = "directory") -> Iterator[None]:
    """For readers: a :class:`~hetgraph.errors.HetgraphError` raised in the block while
    another live process holds ``directory``'s lock becomes a :class:`LockError` that says
    so — the reader saw a half-written state, not damage — and to retry when it finishes."""
    try:
        yield
    except LockError:
        raise
    except HetgraphError as error:
        pid = lock_holder(directory)
        if pid is None:
            raise
        raise LockError(
            f"{what} {directory} is being written by process {pid} right now "
            f"(what was read: {str(error).split('; ')[0]}); retry when it "
            "finishes"
        ) from None
