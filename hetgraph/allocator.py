r"""Resident memory of long CPU runs: glibc's heap and PyTorch's temporary tensors.

On CPU, PyTorch takes every tensor from ``malloc``. glibc serves a request of at least its
*mmap threshold* with a mapping of its own, returned to the system on ``free``, and smaller
ones from its heap; but the threshold is dynamic — it rises to the size of any mapped block
freed, up to 32 MiB — so after the first steps the graph adapter's temporaries of a few MiB
come from the heap, and since their sizes change from batch to batch (the number of distinct
neighbour windows does) the freed blocks fragment it. Measured on ``make demo``'s training
(SmolLM2-135M, 4 × 128 tokens per step): the resident set grows by about 30 MiB a step, to a
3.9 GB peak after 150 steps.

Two remedies, measured on 2 cores:

- :func:`release_free_memory` (glibc ``malloc_trim``) hands the heap's free pages back. The
  trainer calls it after every :data:`RELEASE_EVERY_STEPS` steps and each validation, the
  evaluation before every :data:`RELEASE_EVERY_BATCHES`-th batch of windows: ``make demo``
  then peaked at 2.5 GB instead of 3.9 GB. The released pages are faulted in again: the
  8-step training speed of ``benchmarks/gnnlm.py`` was 240 tokens/s against 255–280 before
  (a noisy figure); a trim after every evaluation batch cost 6 % of GNN-LM's evaluation
  speed, one every 4 batches nothing measurable.
- :func:`bound_heap_growth` fixes the threshold (4 MiB by default): every larger block is
  mapped and unmapped, so nothing accumulates (training peaked at 2.1 GB instead of 3.0 GB
  after 40 steps), but the kernel zero-fills every mapped block — the base model's forward
  ran 22 % slower. Opt in where memory matters more than speed; where
  ``MALLOC_MMAP_THRESHOLD_`` is set, glibc has applied the user's own choice and nothing is
  changed.

A third cache grows with bfloat16 training on CPU (``mixed_precision``), whose matrix
products run through oneDNN: its cache of compiled primitives keeps up to 1,024 of them, one
per distinct shape, with their scratch memory, and the adapter's shapes change every batch
(the number of neighbour windows does), so the cache fills with primitives used once.
:func:`limit_primitive_cache` caps it (the command line sets 16): ``make demo``'s training
peaked at 2.25 GB instead of 2.59 GB after 40 steps, at the same speed (580 tokens/s).

:func:`available_memory_bytes` says how much memory a new allocation can take now (the
index size rule and the evaluation's neighbour-state table decide with it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: ``mallopt`` parameter number of the mmap threshold (glibc ``malloc.h``).
_M_MMAP_THRESHOLD = -3
#: The threshold :func:`bound_heap_growth` sets by default.
DEFAULT_MMAP_THRESHOLD = 4 << 20
#: How often the trainer calls :func:`release_free_memory` (optimiser steps).
RELEASE_EVERY_STEPS = 1
#: How often the evaluation calls it (batches of windows; the first batch included).
RELEASE_EVERY_BATCHES = 4


@functools.cache  # looked up once: release_free_memory runs after every step and batch
def _glibc_function(name: str) -> Any | None:
    # The C library's function `name`, or None off Linux or without it (musl: no mallopt).
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the free pages of glibc's heap to the system (``malloc_trim(0)``); True if
    some were released. Nothing happens (False) off glibc."""
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


#: glibc refuses a larger threshold (``HEAP_MAX_SIZE / 2`` on 64-bit systems).
MAX_MMAP_THRESHOLD = 32 << 20


def bound_heap_growth(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (see the module
    docstring for the cost); True if it was set. Nothing happens (False) off glibc or where
    ``MALLOC_MMAP_THRESHOLD_`` is set in the environment.

    Raises:
        ValueError: ``threshold`` is not in ``1 … MAX_MMAP_THRESHOLD`` bytes.
    """
    if not 0 < threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(
            f"threshold must be 1 to {MAX_MMAP_THRESHOLD} bytes (32 MiB, glibc's "
            f"limit), got {threshold}"
        )
    mallopt = None if "MALLOC_MMAP_THRESHOLD_" in os.environ else _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    logger.debug("glibc mmap threshold %s at %d bytes", "fixed" if done else "not set", threshold)
    return done


#: Capacity of oneDNN's primitive cache that :func:`limit_primitive_cache` sets by default:
#: enough for the shapes every step repeats (the frozen LM head's), not for one-use ones.
PRIMITIVE_CACHE_CAPACITY = 16


def limit_primitive_cache(capacity: int = PRIMITIVE_CACHE_CAPACITY) -> bool:
    """Cap oneDNN's cache of compiled primitives at ``capacity`` for this process (see the
    module docstring); True if set. oneDNN reads ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` when
    it first computes, so call this before; where the variable is already set, the user's
    own choice stands and nothing is changed."""
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" in os.environ:
        return False
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(capacity)
    return True


def available_memory_bytes() -> int:
    """Memory available to a new allocation now (``MemAvailable``; free pages elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
