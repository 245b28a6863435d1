r"""Helpers for fault-injection tests: run the command line in a child process with a fault
(a file-size limit, a kill at the N-th rename), damage a file, and find temporaries.

A fresh ``python -m hetgraph`` spends most of its time importing torch and transformers
(10-20 s on a loaded 2-core machine), too long for a loop of a hundred commands. Each
command therefore runs in a child forked from a ``forkserver`` that has already imported
them: the child is its own process — a signal, an exit status and a traceback printed to
its stderr are observed exactly as for ``python -m hetgraph`` — and it starts in
milliseconds. The child runs :func:`hetgraph.cli.main`; an exception that escapes it is
printed with its traceback and exits 1, as the ``hetgraph`` script does.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PRELOAD = [
    "torch",
    "transformers",
    "faiss",
    "hetgraph.cli",
    "hetgraph.cli_commands",
    "hetgraph.datastore",
    "hetgraph.index",
    "hetgraph.fusion",
    "hetgraph.training",
    "hetgraph.evaluation",
    "transformers.models.qwen2.modeling_qwen2",
]

#: What a killed writer may leave: ``.<name>.<pid>-<hex>.tmp`` temporaries (files and
#: directories) and ``.<name>.old-<hex>`` copies of a directory being replaced.
LEFTOVER = re.compile(r"(\.tmp$)|(^\..+\.old-[0-9a-f]{8}$)")


@dataclass
class Result:
    """How a command ended: ``code`` is the exit status, or ``-signal`` when killed."""

    code: int
    out: str
    err: str

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def _child(
    argv: list[str],
    env: dict[str, str],
    out: str,
    err: str,
    file_size: int | None,
    kill_at: tuple[int, str] | None,
    renames_log: str | None,
) -> None:
    for fd, path in ((1, out), (2, err)):
        _copy_through_pipe(fd, path)
    os.environ.update(env)
    renames: list[str] = []
    if file_size is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    if kill_at is not None or renames_log is not None:
        _interpose_renames(renames, kill_at)
    from hetgraph.cli import main

    try:
        code = main(argv)
    finally:
        if renames_log is not None:
            Path(renames_log).write_text(json.dumps(renames))
    sys.exit(code)


def _copy_through_pipe(fd: int, path: str) -> None:
    r"""Point ``fd`` at a pipe whose reader, a process forked now (before any limit or
    interposition), copies it to ``path`` (written as ``path.part``, renamed at the end):
    a file-size limit on the command never cuts its own error message short."""
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(write)
        code = 0
        try:
            with open(path + ".part", "wb") as sink:
                while chunk := os.read(read, 65536):
                    sink.write(chunk)
            os.rename(path + ".part", path)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(read)
    os.dup2(write, fd)
    os.close(write)


def _interpose_renames(renames: list[str], kill_at: tuple[int, str] | None) -> None:
    r"""Count every ``os.replace`` / ``os.rename`` (pathlib's ``replace`` / ``rename`` call
    them); with ``kill_at = (n, "before" | "after")`` the process kills itself with
    ``SIGKILL`` right before or right after the n-th (0-based)."""
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def interposed(src, dst, *args, real=real, **kwargs):
            n = len(renames)
            renames.append(os.fspath(dst))
            if kill_at == (n, "before"):
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(src, dst, *args, **kwargs)
            if kill_at == (n, "after"):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(os, name, interposed)


class Runner:
    r"""Runs ``hetgraph`` commands in children of one ``forkserver`` (see the module doc)."""

    def __init__(self, logs: Path, env: dict[str, str] | None = None) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self.count = 0

    def __call__(
        self,
        *argv,
        file_size: int | None = None,
        kill_at: tuple[int, str] | None = None,
        renames: Path | None = None,
        timeout: float = 300,
    ) -> Result:
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        child = self.context.Process(
            target=_child,
            args=(
                [str(a) for a in argv],
                self.env,
                str(out),
                str(err),
                file_size,
                kill_at,
                None if renames is None else str(renames),
            ),
        )
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise AssertionError(f"hetgraph {' '.join(map(str, argv))} ran over {timeout} s")
        deadline = time.monotonic() + 30  # the pipes' readers finish at the child's end
        while not (out.exists() and err.exists()) and time.monotonic() < deadline:
            time.sleep(0.01)
        return Result(
            child.exitcode,
            *(p.read_text(errors="replace") if p.exists() else "" for p in (out, err)),
        )


def leftovers(*roots: Path) -> list[str]:
    r"""Temporaries and ``.old-`` copies anywhere below ``roots``."""
    return sorted(
        str(p)
        for root in roots
        if root.exists()
        for p in root.rglob("*")
        if LEFTOVER.search(p.name)
    )


#: A JSON string (a key when group 2 matched) or number, scanned left to right.
_JSON_TOKEN = re.compile(r'("(?:[^"\\]|\\.)*")(\s*:)?|-?\d[\d.eE+-]*')


def flip_byte(path: Path, seed: int) -> int:
    r"""Change one byte of ``path`` at a seeded position and return the position.

    A JSON file keeps parsing: one letter or digit inside a value is changed into another
    of its kind (a damaged record, not a syntax error). Any other file gets one byte
    ``^ 0xFF``.
    """
    import random

    rng = random.Random(f"{seed}:{path.name}")
    data = bytearray(path.read_bytes())
    if path.suffix == ".json":
        text = data.decode("utf-8")
        positions = [
            m.start() + i
            for m in _JSON_TOKEN.finditer(text)
            if not m.group(2)
            for i, c in enumerate(m.group(0))
            if c.isascii() and (c.isalnum() if m.group(1) else c.isdigit())
        ]  # 1e-05 stays a number
        position = len(text[: rng.choice(positions)].encode("utf-8"))
        old = chr(data[position])
        kind = (
            "0123456789"
            if old.isdigit()
            else "abcdef"
            if old in "abcdef"
            else "ghijklmnopqrstuvwxyz"
            if old.islower()
            else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        )
        data[position] = ord(rng.choice([c for c in kind if c != old]))
    else:
        position = rng.randrange(len(data))
        data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    return position
