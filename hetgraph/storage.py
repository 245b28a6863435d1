r"""Storage faults: full disks, file-size limits, quotas and read-only file systems turned into
one :class:`StorageError` naming the file (:func:`storage_errors`, :func:`check_free_space`),
and the temporaries that writers killed mid-write leave behind (:func:`temporary_name`,
:func:`remove_stale_temporaries`), removed only once their process is dead.

The atomic writers of :mod:`hetgraph.io` build on this module (it imports nothing of theirs).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from hetgraph.errors import HetgraphError
from hetgraph.limits import format_bytes

logger = logging.getLogger(__name__)


class StorageError(HetgraphError):
    """Writing a file failed for lack of space or a file-size limit; nothing complete is lost."""


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def temporary_name(path: Path) -> Path:
    r"""A fresh temporary name for a new version of ``path`` (``.<name>.<pid>-<hex>.tmp``):
    hidden, unique per writer, in the target's directory (so that ``os.replace`` is a rename),
    and recognised by :func:`temporary_target` once its writer is dead."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def temporary_target(name: str) -> str | None:
    r"""The file name an :func:`~hetgraph.io.atomic_path` temporary named ``name`` was to
    replace, or ``None`` when ``name`` is no such temporary."""
    match = _TEMPORARY.match(name)
    return match["name"] if match else None


def process_alive(pid: int) -> bool:
    r"""Whether a process ``pid`` runs on this machine (``True`` when that cannot be told)."""
    if pid <= 0:
        return False
    with contextlib.suppress(OSError):  # Linux: a thread's id is no process (kill accepts it)
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
        return re.search(rf"^Tgid:\s*{pid}$", status, re.MULTILINE) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        return True
    return True


def _stale_temporary(path: Path) -> bool:
    match = _TEMPORARY.match(path.name)
    return match is not None and not process_alive(int(match["pid"]))


def _remove_entry(path: Path) -> None:
    # A directory is deleted with its content; a link (even to a directory) only as a link.
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _remove_quietly(path)


def remove_dead_temporaries(target: Path) -> None:
    r"""Delete the temporaries of ``target`` whose writers no longer run."""
    prefix = f".{target.name}."
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            if (
                path.name.startswith(prefix)
                and _stale_temporary(path)
                and temporary_target(path.name) == target.name
            ):
                _remove_entry(path)
                logger.info("removed %s, left by a writer that was killed", path)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    r"""Delete the temporaries that writers killed mid-write left in ``directory``: files
    of :func:`~hetgraph.io.atomic_path` (``.<name>.<pid>-<hex>.tmp``; the directory's writers
    hold its lock, so none is live) and directories of :func:`~hetgraph.io.atomic_directory`
    whose process ``pid`` no longer runs (those writers may not hold the lock: a live one's is
    never removed); return them. Call it while holding the directory's lock
    (:func:`hetgraph.locking.directory_lock`)."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.iterdir():
            is_file = path.is_file() and not path.is_symlink()
            if (is_file and _TEMPORARY.match(path.name)) or (
                path.is_dir() and not path.is_symlink() and _stale_temporary(path)
            ):
                _remove_entry(path)
                removed.append(path)
    if removed:
        logger.info(
            "removed %d partial file(s) of an interrupted write in %s", len(removed), directory
        )
    return removed


def remove_without_following(path: str | Path, inside: str | Path) -> None:
    r"""Delete ``path`` — a file, a link or a directory with its content — without ever
    following a symbolic link: a link is removed as a link, so nothing outside ``inside``
    (the directory being cleared) is touched. ``path`` must lie in ``inside``.

    Raises:
        ValueError: ``path`` is not inside ``inside`` (a bug in the caller).
    """
    path, inside = Path(path), Path(inside)
    if os.path.commonpath([os.path.abspath(path), os.path.abspath(inside)]) != os.path.abspath(
        inside
    ):
        raise ValueError(f"refusing to delete {path}: not inside {inside}")
    if path.is_symlink() or not path.is_dir():
        _remove_quietly(path)
    else:
        shutil.rmtree(path)  # rmtree never follows links below path


# -- full disks: one mechanism for every writer ---------------------------------------------

_STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EFBIG: "the file is too large for this file system or the file-size limit (ulimit -f)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
}
#: numpy's ``tofile``/``save`` report a short write as ``OSError("N requested and M
#: written")`` without an errno.
_SHORT_WRITE = re.compile(r"\b\d+ requested and \d+ written\b")
#: What to do once there is room, for the writers in a :func:`storage_errors` block.
_THEN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "hetgraph_storage_then", default=None
)
_DEFAULT_THEN = "run the same command again (what was written is kept)"


def storage_reason(error: BaseException) -> str | None:
    r"""Why ``error`` means no room to write — a full disk, a file-size limit, a quota or a
    read-only file system — or ``None`` when it means something else.

    Writers report this in their own forms; all are recognised: an ``OSError`` with one of
    those errnos, numpy's short write (an ``OSError`` without errno), FAISS's
    ``RuntimeError`` ("… (No space left on device)") and safetensors' ``SafetensorError``
    ("… (os error 28)").
    """
    if isinstance(error, HetgraphError):
        return None
    if isinstance(error, OSError) and error.errno is not None:
        return _STORAGE_ERRNOS.get(error.errno)
    text = str(error)
    if isinstance(error, OSError):
        return (
            "the disk is full or the file reached a size limit (a write stopped short)"
            if _SHORT_WRITE.search(text)
            else None
        )
    if not isinstance(error, RuntimeError) and type(error).__name__ != "SafetensorError":
        return None
    for code, reason in _STORAGE_ERRNOS.items():
        if os.strerror(code) in text or f"os error {code})" in text:
            return reason
    return None


def free_bytes(path: str | Path) -> int | None:
    r"""Bytes free to an unprivileged writer on the file system of ``path`` (or of its
    nearest existing parent); ``None`` when that cannot be told."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def storage_error(
    path: str | Path, reason: str, needed: int | None = None, then: str | None = None
) -> StorageError:
    r"""The :class:`StorageError` for ``path``: ``reason``, the bytes ``needed`` (when known)
    and free, and what to do (``then``; default: the enclosing :func:`storage_errors`')."""
    free = free_bytes(path)
    sizes = [f"needs {format_bytes(needed)}"] if needed is not None else []
    if free is not None:
        sizes.append(f"{format_bytes(free)} free")
    space = f" ({', '.join(sizes)})" if sizes else ""
    fix = "make it writable" if reason == _STORAGE_ERRNOS[errno.EROFS] else "free space"
    return StorageError(
        f"cannot write {path}: {reason}{space}; {fix} (or choose a directory on "
        f"another file system), then {then or _THEN.get() or _DEFAULT_THEN}"
    )


def check_free_space(path: str | Path, needed: int, then: str | None = None) -> None:
    r"""Refuse to start writing ``needed`` bytes to ``path`` when its file system has less
    free; a :class:`StorageError` naming ``path``, the space needed and free."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise storage_error(path, "the disk has too little free space", needed, then)


@contextlib.contextmanager
def storage_errors(
    path: str | Path,
    then: str | None = None,
    *,
    needed: int | None = None,
    outer_then_first: bool = False,
) -> Iterator[None]:
    r"""Turn a full disk, a file-size limit, a quota or a read-only file system in the block
    (any form :func:`storage_reason` recognises) into a :class:`StorageError` naming
    ``path``, the space ``needed`` (when known) and free, and ending with ``then`` (what to
    run once there is room). ``then`` also applies to the atomic writers in the block, which
    name the file they were writing; their :class:`StorageError` passes through. With
    ``outer_then_first`` (for library functions), an enclosing block's ``then`` (a
    command's) is kept."""
    keep_outer = outer_then_first and _THEN.get() is not None
    token = _THEN.set(then) if then and not keep_outer else None
    try:
        yield
    except Exception as error:
        reason = storage_reason(error)
        if reason is None:
            raise
        raise storage_error(path, reason, needed) from None
    finally:
        if token is not None:
            _THEN.reset(token)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def reserve_blocks(path: str | Path) -> None:
    """Reserve the blocks of the file ``path`` (a sparse file, e.g. a new memmap) now, so that
    a full disk is an error here (a :class:`StorageError` naming the file, the space needed
    and free) and not a ``SIGBUS`` when a memmap page is written later. Where the file system
    cannot reserve blocks, the free space is checked instead."""
    path = Path(path)
    size = path.stat().st_size
    with storage_errors(path, needed=size):
        if not hasattr(os, "posix_fallocate"):
            check_free_space(path, size - path.stat().st_blocks * 512)
            return
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            check_free_space(path, size - os.fstat(fd).st_blocks * 512)
        finally:
            os.close(fd)
