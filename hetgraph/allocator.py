r"""Resident memory of long CPU runs: glibc's heap and PyTorch's temporary tensors.

On CPU, PyTorch takes every tensor from ``malloc``. glibc serves a request of at least its
*mmap threshold* with a mapping of its own, returned to the system on ``free``, and smaller
ones from its heap; but the threshold is dynamic — it rises to the size of any mapped block
freed, up to 32 MiB — so after the first steps the graph adapter's temporaries of a few MiB
all come from the heap, which fragments and keeps growing. Measured on ``make demo``'s
training (SmolLM2-135M, 4 × 128 tokens per step, 1 thread): the resident set grows by about
30 MiB a step, to a 3.9 GB peak after 150 steps; with the threshold fixed at 4 MiB it stays
at 2.1 GB, for about 10 % fewer training tokens/s (the kernel zero-fills the pages of every
mapped block).

:func:`bound_heap_growth` fixes the threshold. The ``hetgraph`` command line calls it at
start; a program using the library can call it itself. Where ``MALLOC_MMAP_THRESHOLD_`` is
set, glibc has applied the user's own choice and nothing is changed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

#: ``mallopt`` parameter number of the mmap threshold (glibc ``malloc.h``).
_M_MMAP_THRESHOLD = -3
#: The threshold :func:`bound_heap_growth` sets by default.
DEFAULT_MMAP_THRESHOLD = 4 << 20


def bound_heap_growth(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (see the module
    docstring); True if it was set. Nothing happens (False) off Linux, with a C library
    without ``mallopt``, or where ``MALLOC_MMAP_THRESHOLD_`` is set in the environment.

    Raises:
        ValueError: ``threshold`` is not positive.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold}")
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    logger.debug("glibc mmap threshold %s at %d bytes", "fixed" if done else "not set", threshold)
    return done
