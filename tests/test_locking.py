"""Output-directory locks: a second writer is refused, a dead writer leaves no stale lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hetgraph.locking import LockError, directory_lock

HOLD = """
import sys, time
from hetgraph.locking import directory_lock
with directory_lock(sys.argv[1], "datastore"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_killed_one_releases(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "ds")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            LockError,
            match=rf"datastore {tmp_path / 'ds'} is being written by "
            rf"process {holder.pid}",
        ):
            with directory_lock(tmp_path / "ds", "datastore"):
                pass
    finally:
        holder.kill()  # as kill -9: the OS drops the lock with the process
        holder.wait()
    with directory_lock(tmp_path / "ds", "datastore"):
        pass


def test_lock_is_reentrant_across_sequential_uses(tmp_path):
    for _ in range(2):
        with directory_lock(tmp_path / "x") as directory:
            assert directory == tmp_path / "x"
