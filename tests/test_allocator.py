"""glibc's mmap threshold and oneDNN's primitive cache, bounded by the command line for
bounded resident memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hetgraph.allocator import bound_heap_growth, release_free_memory

# A child process, so the test process's allocator stays as it was. After a 16 MiB block is
# freed, glibc's dynamic threshold has risen above 8 MiB, so freed 8 MiB blocks between live
# ones stay in the heap (resident); with the threshold fixed at 4 MiB they are unmapped.
_SCRIPT = textwrap.dedent("""
    import ctypes, sys
    from hetgraph.allocator import bound_heap_growth, release_free_memory
    fixed = bound_heap_growth() if sys.argv[1] == "fixed" else False
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
    before = anon_kb()
    blocks, pins = [], []
    for _ in range(8):  # a live small block after each: the heap cannot just shrink back
        blocks.append(libc.malloc(8 << 20))
        pins.append(libc.malloc(256 << 10))
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in blocks:
        libc.free(block)
    print(fixed, anon_kb() - before)
""")


def _retained_kb(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_a_fixed_threshold_returns_freed_blocks_to_the_system():
    fixed, retained_fixed = _retained_kb("fixed")
    if fixed != "True":
        pytest.skip("not glibc")
    _, retained_dynamic = _retained_kb("dynamic")
    assert retained_dynamic > 32 << 10  # the heap kept the 64 MiB of freed blocks
    assert retained_fixed < 8 << 10  # unmapped on free


def test_the_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert bound_heap_growth() is False
    with pytest.raises(ValueError, match="1 to"):
        bound_heap_growth(0)
    with pytest.raises(ValueError, match="glibc's limit"):  # was a ctypes overflow traceback
        bound_heap_growth(1 << 40)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_free_memory_hands_back_the_heaps_free_pages():
    script = _SCRIPT.replace(
        "print(fixed, anon_kb() - before)",
        "from hetgraph.allocator import release_free_memory\n"
        "release_free_memory()\nprint(fixed, anon_kb() - before)",
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "dynamic"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(out[1]) < 8 << 10  # the 64 MiB of freed heap blocks went back
    assert isinstance(release_free_memory(), bool)


_PRIMITIVES_SCRIPT = textwrap.dedent("""
    import sys
    from hetgraph.allocator import limit_primitive_cache, release_free_memory
    if sys.argv[1] == "limited":
        limit_primitive_cache()
    import torch
    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    before = anon_kb()
    for rows in range(2000, 2200):  # a new shape each time, as the adapter's node counts
        torch.randn(rows, 256, dtype=torch.bfloat16) @ weight
    release_free_memory()  # what is left is held, not free heap
    print(anon_kb() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is Linux's")
def test_a_limited_primitive_cache_does_not_keep_one_use_shapes(monkeypatch):
    import torch

    from hetgraph.training.precision import native_bfloat16

    if not native_bfloat16(torch.device("cpu")):
        pytest.skip("bfloat16 matmuls do not run through oneDNN here")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)

    def retained_kb(mode: str) -> int:
        return int(
            subprocess.run(
                [sys.executable, "-c", _PRIMITIVES_SCRIPT, mode],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )

    default, limited = retained_kb("default"), retained_kb("limited")
    assert limited < default - (16 << 10), (default, limited)


def test_the_command_line_limits_the_primitive_cache_unless_the_user_did(monkeypatch, capsys):
    from hetgraph.allocator import PRIMITIVE_CACHE_CAPACITY, limit_primitive_cache
    from hetgraph.cli import main

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert main(["--version"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(PRIMITIVE_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    assert limit_primitive_cache() is False
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
