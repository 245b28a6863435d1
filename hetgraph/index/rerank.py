r"""Exact re-ranking of approximate candidates against the stored keys.

An approximate index (IVF-PQ, OPQ, HNSW) ranks by compressed codes. With
``IndexConfig.rerank = k'`` (``k' > k``), :meth:`~hetgraph.index.DatastoreIndex.search` asks
the index for ``k'`` candidates, re-scores them exactly against the datastore's fp16 keys
(read from the memmap by one vectorised gather per block of queries, no per-query loop) and
keeps the best ``k``. Recall then depends only on whether the true neighbours are among the
``k'`` candidates; each query reads ``k'·d`` fp16 values (``k'=128``, ``d=1536``: 384 KiB).

The same exact scoring makes results independent of the FAISS threads: a large exhaustive
search, which FAISS computes as one thread-dependent BLAS product, is re-scored query by
query (:func:`exact_top_k`), and neighbours at equal distances are ordered by id
(:func:`order_ties`).
"""

from __future__ import annotations

from typing import Any

import faiss
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
        block = ids[lo : lo + step]
        valid = block >= 0
        rows = np.where(valid, block, 0).reshape(-1)
        # Gather in sorted row order (sequential memmap reads), then restore the order.
        order = np.argsort(rows, kind="stable")
        gathered = np.empty((rows.size, d), dtype=np.float32)
        gathered[order] = np.asarray(keys[rows[order]], dtype=np.float32)
        vectors = gathered.reshape(block.shape[0], c, d)
        q = queries[lo : lo + step, None, :]
        if metric == "ip":
            dist = -np.einsum("qcd,qcd->qc", vectors, np.broadcast_to(q, vectors.shape))
        else:
            diff = vectors - q
            dist = np.einsum("qcd,qcd->qc", diff, diff)
        out[lo : lo + step] = np.where(valid, dist, np.float32(np.inf))
    return out


def rerank(
    keys: Any, queries: np.ndarray, candidates: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of ``candidates`` ``[Q, k']`` by exact distance: ``(distances, ids)``,
    nearest first (ties keep the index's order); missing candidates (``-1``) come last."""
    distances = exact_distances(keys, queries, candidates, metric)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(candidates, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    return distances, np.where(np.isfinite(distances), ids, -1)


#: Extra candidates :func:`exact_top_k` takes from FAISS, beyond ``k`` (at least this many,
#: or a quarter of ``k``), so that a neighbour pushed just past the ``k``-th by rounding is
#: still among them.
EXACT_TOP_K_MARGIN = 8


def exhaustive_vectors(index: faiss.Index) -> np.ndarray | None:
    """The ``[N, d]`` float32 vectors of an exhaustive (``Flat``) index, without a copy;
    None for any other index."""
    if not isinstance(index, faiss.IndexFlat) or index.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def takes_blas_path(num_queries: int, dim: int) -> bool:
    r"""Whether FAISS computes an exhaustive search of ``num_queries`` queries as one BLAS
    matrix product (measured: 1.15.1 does from ``num_queries * dim >=
    faiss.cvar.distance_compute_blas_threshold``, 128,000; older releases from 20 queries,
    which this also covers)."""
    return num_queries * dim >= int(faiss.cvar.distance_compute_blas_threshold)


def exact_top_k(
    index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    r"""The ``k`` nearest of ``vectors`` (``index``'s own) by distances computed query by
    query, in a fixed order: the same results for any number of threads.

    FAISS's exhaustive search of a large batch (:func:`takes_blas_path`) is one BLAS product
    whose rounding depends on how it is split among the threads: on a tiny datastore, 2,000
    queries on 1 and 2 threads differed in the last bits of 516 of 16,000 distances (and
    so, through the adapter's edge features, the trained adapter did). The product is kept to
    find candidates fast: ``k`` plus a margin (:data:`EXACT_TOP_K_MARGIN`) are taken, scored
    again exactly (:func:`hetgraph.index.rerank.exact_distances`, single-threaded NumPy) and
    the best ``k`` kept, ties by id (:func:`order_ties`). The extra work is ``(k + margin) /
    N`` of the search's.
    """
    fetch = min(int(index.ntotal), k + max(EXACT_TOP_K_MARGIN, k // 4))
    _, ids = index.search(queries, fetch)
    ids = ids.astype(np.int64, copy=False)
    distances = exact_distances(vectors, queries, ids, metric)
    distances, ids = order_ties(distances, ids, always=True)
    return np.ascontiguousarray(distances[:, :k]), np.ascontiguousarray(ids[:, :k])


def order_ties(
    distances: np.ndarray, ids: np.ndarray, *, always: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    r"""Each row of ``(distances, ids)`` ordered by distance, then id (missing ids, ``-1``,
    last): neighbours at the same distance come in the same order however the search found
    them (GPU FAISS merges partial results in its own order). Unless ``always``, rows already
    sorted without a tie are returned as they are (no sort)."""
    if not always and (distances.shape[1] < 2 or not (distances[:, 1:] == distances[:, :-1]).any()):
        return distances, ids
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, distances), axis=1)
    return (np.take_along_axis(distances, order, axis=1), np.take_along_axis(ids, order, axis=1))
