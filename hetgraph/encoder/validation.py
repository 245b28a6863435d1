r"""Validation of an encoder on held-out datastore rows, raw keys against encoded keys:
recall@k of a same-next-token row and the perplexity of the kNN distribution, both with the
rows of the query's document inside the leakage radius never retrieved (exact search)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hetgraph.knnlm import knn_target_log_probs, tune_knn

logger = logging.getLogger(__name__)

__all__ = ["exact_neighbours", "knn_figures", "validate_encoder"]

#: kNN weights λ of the kNN + unigram mixture tried (the unigram only keeps a target that
#: no neighbour predicts from an infinite perplexity).
KNN_LAMBDAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
#: Temperatures tried, as multiples of the queries' mean distance spread over the k.
TEMPERATURE_FACTORS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def exact_neighbours(
    queries: torch.Tensor,
    query_rows: np.ndarray,
    key_chunks: Callable[[int, int], torch.Tensor],
    num_rows: int,
    doc_ids: np.ndarray,
    radius: int,
    k: int,
    metric: str,
    chunk_rows: int = 32768,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` nearest stored rows of each query by exact search, never a row of the
    query's document closer than ``radius`` rows (nor the query's own row).

    Args:
        queries: ``[Q, d]`` float32 (raw or encoded, as the keys).
        query_rows: ``[Q]`` datastore row of each query.
        key_chunks: ``key_chunks(start, stop)`` → ``[stop - start, d]`` float32 keys.
        num_rows: ``N``.
        metric: ``"l2"`` (squared L2 distances) or ``"ip"`` (negated inner products).

    Returns:
        ``(distances [Q, k], ids [Q, k])``, nearest first.
    """
    q = queries.float()
    qrows = torch.as_tensor(query_rows, dtype=torch.int64)[:, None]
    docs = torch.from_numpy(np.array(doc_ids, dtype=np.int64))
    qdocs = docs[qrows]
    best_d = torch.full((len(q), k), math.inf)
    best_i = torch.full((len(q), k), -1, dtype=torch.int64)
    q_sq = q.pow(2).sum(1, keepdim=True)
    for start in tqdm(
        range(0, num_rows, chunk_rows),
        desc="exact search",
        unit="chunk",
        disable=not show_progress,
        dynamic_ncols=True,
    ):
        stop = min(num_rows, start + chunk_rows)
        keys = key_chunks(start, stop).float()
        dots = q @ keys.T
        dist = (q_sq + keys.pow(2).sum(1)[None] - 2 * dots) if metric == "l2" else -dots
        ids = torch.arange(start, stop)[None]
        leaked = ((ids - qrows).abs() < max(radius, 1)) & (docs[start:stop][None] == qdocs)
        dist = dist.masked_fill(leaked, math.inf)
        all_d = torch.cat([best_d, dist], 1)
        all_i = torch.cat([best_i, ids.expand(len(q), -1)], 1)
        best_d, top = torch.topk(all_d, min(k, all_d.shape[1]), dim=1, largest=False)
        best_i = all_i.gather(1, top)
    best_i = torch.where(torch.isfinite(best_d), best_i, torch.full_like(best_i, -1))
    return best_d, best_i


def knn_figures(
    distances: torch.Tensor,
    ids: torch.Tensor,
    targets: np.ndarray,
    next_tokens: np.ndarray,
    unigram_log_probs: torch.Tensor,
    ks: Sequence[int],
) -> dict[str, float]:
    r"""recall@k (some neighbour among the first k predicts the target) for each of ``ks``,
    and the perplexity of the kNN distribution (``softmax(-d / T)`` over the neighbours,
    mixed with the unigram at weight ``1 - λ``; T and λ tuned on these rows)."""
    nt = torch.from_numpy(np.array(next_tokens, dtype=np.int64))
    tgt = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    tokens = torch.where(ids >= 0, nt[ids.clamp(min=0)], torch.full_like(ids, -1))
    hit = tokens == tgt[:, None]
    out = {f"recall@{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}
    finite = torch.where(torch.isfinite(distances), distances, distances.new_zeros(()))
    spread = float((finite[:, -1] - finite[:, 0]).mean())
    scale = spread if spread > 0 else 1.0
    temps = [scale * f for f in TEMPERATURE_FACTORS]
    uni = unigram_log_probs[tgt]
    lam, temp, grid = tune_knn(uni, distances, tokens, tgt, KNN_LAMBDAS, temps)
    out.update(
        knn_ppl=float(np.nanmin(grid)),
        knn_lambda=lam,
        knn_temperature=temp,
        unigram_ppl=float(torch.exp(-uni.double().mean())),
    )
    knn_only = knn_target_log_probs(distances, tokens, tgt, temp)
    out["knn_coverage"] = float(torch.isfinite(knn_only).float().mean())
    return out


def unigram_log_probs(next_tokens: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """Add-one unigram ``log p(w)`` of the next tokens of ``rows`` (vocabulary: up to the
    largest token id stored)."""
    nt = np.asarray(next_tokens)
    counts = np.bincount(nt[rows], minlength=int(nt.max()) + 1).astype(np.float64) + 1.0
    return torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)


def validate_encoder(
    store: Any,
    encoder: Any,
    rows: np.ndarray,
    training_rows: np.ndarray,
    radius: int,
    k: int,
    chunk_rows: int = 32768,
    show_progress: bool = True,
) -> dict[str, dict[str, float]]:
    r"""Raw keys against encoded keys on the held-out ``rows`` of ``store`` (a
    :class:`~hetgraph.datastore.Datastore`): :func:`knn_figures` of each, the neighbours
    found by exact search over every stored row outside the leakage radius."""
    n = len(store)
    k = min(k, n - 1)
    ks = sorted({min(1, k), min(8, k), k})
    keys, nt = store.keys, np.asarray(store.next_tokens)
    unigram = unigram_log_probs(nt, training_rows)
    raw_q = torch.as_tensor(np.asarray(keys[rows])).float()
    result = {}
    with torch.no_grad():
        for name, queries, chunks, metric in (
            ("raw", raw_q, lambda a, b: torch.from_numpy(np.array(keys[a:b])), "l2"),
            ("encoded", encoder(raw_q), lambda a, b: encoder.encode(keys[a:b]), encoder.metric),
        ):
            d, ids = exact_neighbours(
                queries,
                rows,
                chunks,
                n,
                store.doc_ids,
                radius,
                k,
                metric,
                chunk_rows,
                show_progress,
            )
            result[name] = knn_figures(d, ids, nt[rows], nt, unigram, ks)
            logger.info("%s keys: %s", name, result[name])
    return result
