"""Run a command under a hard memory cap (a Linux memory cgroup), for the past-RAM benchmark.

``run_capped(cmd, limit_bytes)`` makes a child memory cgroup (v2 ``memory.max`` or v1
``memory.limit_in_bytes``, swap capped too where the controller has it), starts the command
inside it, and returns its exit status, output, the cgroup's peak usage and whether the
kernel's OOM killer fired. The cap counts everything the kernel charges to the cgroup:
anonymous memory and page cache alike — but page cache (the pages of a memory-mapped file)
is reclaimed under pressure, anonymous memory is not. A process that holds more than the cap
itself is killed (SIGKILL, return code -9).

``capped_cgroup_root()`` is ``None`` where no writable memory controller is found (no
privileges, or a container without cgroup delegation); the benchmark then skips the capped
runs and says so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/memory")


def _own_cgroup_v2() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return V2_ROOT / line[3:].lstrip("/")
    return None


def capped_cgroup_root() -> tuple[Path, int] | None:
    """A directory under which this process may create memory cgroups, and the cgroup version."""
    candidates: list[tuple[Path, int]] = []
    own = _own_cgroup_v2()
    if own is not None and (V2_ROOT / "cgroup.controllers").is_file():
        candidates.append((own, 2))
    if (V1_ROOT / "memory.limit_in_bytes").is_file():
        candidates.append((V1_ROOT, 1))
    for root, version in candidates:
        probe = root / f"hetgraph-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        limit = probe / ("memory.max" if version == 2 else "memory.limit_in_bytes")
        usable = limit.is_file()
        with contextlib.suppress(OSError):
            probe.rmdir()
        if usable:
            return root, version
    return None


@contextlib.contextmanager
def _cgroup(limit_bytes: int) -> Iterator[tuple[Path, int]]:
    found = capped_cgroup_root()
    if found is None:
        raise RuntimeError("no writable memory cgroup controller on this machine")
    root, version = found
    group = root / f"hetgraph-cap-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        if version == 2:
            (group / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        yield group, version
    finally:
        for _ in range(50):  # the cgroup can be removed once its last task has exited
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _peak_and_oom(group: Path, version: int) -> tuple[int | None, bool]:
    if version == 2:
        peak_file = group / "memory.peak"
        peak = int(peak_file.read_text()) if peak_file.is_file() else None
        events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
        return peak, int(events.get("oom_kill", 0)) > 0
    peak = int((group / "memory.max_usage_in_bytes").read_text())
    # memory.failcnt also counts page-cache reclaim at the cap, so it is no OOM signal
    control = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return peak, int(control.get("oom_kill", 0)) > 0


def run_capped(cmd: list[str], limit_bytes: int, timeout: float = 3600) -> dict:
    """Run ``cmd`` inside a fresh memory cgroup capped at ``limit_bytes``."""
    with _cgroup(limit_bytes) as (group, version):
        procs = group / "cgroup.procs"

        def enter() -> None:  # runs in the child before exec: the child joins the cgroup
            procs.write_text(str(os.getpid()))

        start = time.perf_counter()
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=enter
        )
        seconds = time.perf_counter() - start
        peak, oom = _peak_and_oom(group, version)
    return {
        "limit_bytes": limit_bytes,
        "cgroup_version": version,
        "returncode": done.returncode,
        "killed_by_oom": oom or done.returncode == -9,
        "peak_cgroup_bytes": peak,
        "seconds": seconds,
        "stdout": done.stdout,
        "stderr_tail": done.stderr[-2000:],
    }
