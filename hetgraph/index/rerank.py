r"""Exact re-ranking of approximate candidates against the stored keys.

An approximate index (IVF-PQ, OPQ, HNSW) ranks by compressed codes. With
``IndexConfig.rerank = k'`` (``k' > k``), :meth:`~hetgraph.index.DatastoreIndex.search` asks
the index for ``k'`` candidates, re-scores them exactly against the datastore's fp16 keys
(read from the memmap by one vectorised gather per block of queries, no per-query loop) and
keeps the best ``k``. Recall then depends only on whether the true neighbours are among the
``k'`` candidates; each query reads ``k'·d`` fp16 values (``k'=128``, ``d=1536``: 384 KiB).
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: float32 values held at once while re-ranking (bounds the gather's memory: 256 MiB).
RERANK_BLOCK_VALUES = 1 << 26


def exact_distances(keys: Any, queries: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances ``[Q, c]`` from each query to the keys ``ids`` (``-1``: ``inf``).

    Args:
        keys: ``[N, d]`` array or memmap (any float dtype; computed in float32).
        queries: float32 ``[Q, d]``.
        ids: int64 ``[Q, c]`` rows of ``keys``; ``-1`` marks no candidate.
        metric: ``"l2"`` (squared L2) or ``"ip"`` (negated inner product).
    """
    q_count, c = ids.shape
    d = queries.shape[1]
    out = np.empty((q_count, c), dtype=np.float32)
    step = max(1, RERANK_BLOCK_VALUES // max(1, c * d))
    for lo in range(0, q_count, step):
        block = ids[lo:lo + step]
        valid = block >= 0
        rows = np.where(valid, block, 0).reshape(-1)
        # Gather in sorted row order (sequential memmap reads), then restore the order.
        order = np.argsort(rows, kind="stable")
        gathered = np.empty((rows.size, d), dtype=np.float32)
        gathered[order] = np.asarray(keys[rows[order]], dtype=np.float32)
        vectors = gathered.reshape(block.shape[0], c, d)
        q = queries[lo:lo + step, None, :]
        if metric == "ip":
            dist = -np.einsum("qcd,qcd->qc", vectors, np.broadcast_to(q, vectors.shape))
        else:
            diff = vectors - q
            dist = np.einsum("qcd,qcd->qc", diff, diff)
        out[lo:lo + step] = np.where(valid, dist, np.float32(np.inf))
    return out


def rerank(keys: Any, queries: np.ndarray, candidates: np.ndarray, k: int,
           metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of ``candidates`` ``[Q, k']`` by exact distance: ``(distances, ids)``,
    nearest first (ties keep the index's order); missing candidates (``-1``) come last."""
    distances = exact_distances(keys, queries, candidates, metric)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    return distances, np.where(np.isfinite(distances), ids, -1)
