"""kNN-LM (Khandelwal et al., ICLR 2020): interpolating an LM with a nearest-neighbour distribution.

For a query with retrieved neighbours ``j = 1 … k`` at distances ``d_j`` whose stored
next tokens are ``w_j``::

    p_kNN(w) = Σ_j [w_j = w] · softmax_j(−d_j / T)
    p(w)     = λ · p_kNN(w) + (1 − λ) · p_LM(w)

Everything here works in float32 log-space (never bf16), vectorised over queries.
Missing neighbours (FAISS id ``-1``) are marked by an infinite distance or a negative
token id and get zero weight. Inputs may be torch tensors or numpy arrays; outputs are
float32 tensors on the inputs' device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_LAMBDAS",
    "KNN_TUNING",
    "interpolate_log_probs",
    "knn_log_probs",
    "knn_mixture_argmax",
    "knn_target_log_probs",
    "neighbour_log_weights",
    "perplexity",
    "read_knn_tuning",
    "tune_knn",
    "write_knn_tuning",
]

logger = logging.getLogger(__name__)

#: The kNN-LM λ and T that ``hetgraph eval`` tuned (JSON with its own checksum): in an adapter
#: directory those of GNN-LM + kNN, in a datastore directory those of the base LM + kNN.
#: ``hetgraph generate --knn`` reads them.
KNN_TUNING = "knn_tuning.json"

#: λ grid used by :func:`tune_knn` callers when none is given (0 = the LM alone).
DEFAULT_LAMBDAS: tuple[float, ...] = (
    0.0,
    0.05,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
)


def _f32(x: Any, device: torch.device | None = None) -> Tensor:
    t = torch.as_tensor(x, device=device)
    return t.to(torch.float32)


def _i64(x: Any, device: torch.device | None = None) -> Tensor:
    return torch.as_tensor(x, device=device).to(torch.int64)


def neighbour_log_weights(
    distances: Any,
    temperature: float,
    neighbour_tokens: Any | None = None,
) -> Tensor:
    """``log softmax_j(−d_j / T)`` over the k neighbours, ``[Q, k]`` float32.

    Neighbours with an infinite / NaN distance (or a negative token id, if tokens are
    given) get weight ``-inf``; a query without any valid neighbour gets all ``-inf``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    d = _f32(distances)
    if d.dim() != 2:
        raise ValueError(f"distances must be [Q, k], got shape {tuple(d.shape)}")
    valid = torch.isfinite(d)
    if neighbour_tokens is not None:
        valid &= _i64(neighbour_tokens, d.device) >= 0
    scores = torch.where(valid, -d / float(temperature), torch.full_like(d, -math.inf))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = scores - lse
    return torch.where(valid, weights, torch.full_like(weights, -math.inf))


def knn_log_probs(
    distances: Any,
    neighbour_next_tokens: Any,
    vocab_size: int,
    temperature: float,
) -> Tensor:
    """The full kNN distribution ``log p_kNN`` as ``[Q, V]`` float32.

    Args:
        distances: ``[Q, k]`` (smaller = closer).
        neighbour_next_tokens: ``[Q, k]`` next token of each neighbour (negative = missing).
        vocab_size: ``V``.
        temperature: ``T`` in ``softmax(−d / T)``.
    """
    w = neighbour_log_weights(distances, temperature, neighbour_next_tokens)
    tokens = _i64(neighbour_next_tokens, w.device)
    if tokens.shape != w.shape:
        raise ValueError(
            f"neighbour tokens {tuple(tokens.shape)} and distances {tuple(w.shape)} differ"
        )
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(f"a neighbour token id {int(tokens.max())} is >= vocab_size {vocab_size}")
    # log Σ exp(w) per token: shift by the row max (finite unless the row is empty).
    row_max = w.max(dim=-1, keepdim=True).values
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    mass = torch.zeros(w.shape[0], vocab_size, dtype=torch.float32, device=w.device)
    mass.scatter_add_(1, tokens.clamp(min=0), torch.exp(w - row_max))
    return torch.log(mass) + row_max


def knn_target_log_probs(
    distances: Any,
    neighbour_tokens: Any,
    targets: Any,
    temperature: float,
) -> Tensor:
    """``log p_kNN(target)`` per query, ``[Q]`` float32 (``-inf`` if no neighbour has it).

    The cheap path for evaluation: ``logsumexp`` of the neighbour weights whose next
    token equals the target, without materialising ``[Q, V]``.
    """
    w = neighbour_log_weights(distances, temperature, neighbour_tokens)
    tokens = _i64(neighbour_tokens, w.device)
    tgt = _i64(targets, w.device)
    hit = tokens == tgt.unsqueeze(-1)
    return torch.logsumexp(torch.where(hit, w, torch.full_like(w, -math.inf)), dim=-1)


def interpolate_log_probs(lm_log_probs: Any, knn_log_probs: Any, lam: float) -> Tensor:
    """``log(λ · p_kNN + (1 − λ) · p_LM)`` in float32, any matching shapes.

    ``λ = 0`` returns the LM log-probs and ``λ = 1`` the kNN ones exactly.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    lm = _f32(lm_log_probs)
    knn = _f32(knn_log_probs, lm.device)
    if lam == 0.0:
        return lm.clone()
    if lam == 1.0:
        return knn.clone()
    return torch.logaddexp(knn + math.log(lam), lm + math.log1p(-lam))


def perplexity(log_probs: Any) -> float:
    """``exp(−mean log p)`` of per-token log-probabilities (``inf`` if any is ``-inf``)."""
    lp = _f32(log_probs)
    if lp.numel() == 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(torch.exp(-lp.double().mean()))


def tune_knn(
    lm_target_log_probs: Any,
    distances: Any,
    neighbour_tokens: Any,
    targets: Any,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    temperatures: Sequence[float] = (1.0,),
) -> tuple[float, float, np.ndarray]:
    """Grid search of λ and T minimising the perplexity of the mixture (on a valid split).

    Args:
        lm_target_log_probs: ``[Q]`` LM log-prob of each target.
        distances, neighbour_tokens: ``[Q, k]`` neighbours of each query.
        targets: ``[Q]`` target tokens.
        lambdas, temperatures: the grid.

    Returns:
        ``(best λ, best T, grid)`` with ``grid[i, j]`` the perplexity at
        ``(lambdas[i], temperatures[j])``; ties go to the first grid point.
    """
    lambdas, temperatures = list(lambdas), list(temperatures)
    if not lambdas or not temperatures:
        raise ValueError("tune_knn needs non-empty lambda and temperature grids")
    lm = _f32(lm_target_log_probs)
    grid = np.empty((len(lambdas), len(temperatures)), dtype=np.float64)
    for j, temp in enumerate(temperatures):
        knn = knn_target_log_probs(distances, neighbour_tokens, targets, temp).to(lm.device)
        for i, lam in enumerate(lambdas):
            grid[i, j] = perplexity(interpolate_log_probs(lm, knn, lam))
    i, j = np.unravel_index(int(np.argmin(np.where(np.isnan(grid), np.inf, grid))), grid.shape)
    return float(lambdas[i]), float(temperatures[j]), grid


def knn_mixture_argmax(
    lm_argmax: Any,
    lm_neighbour_log_probs: Any,
    distances: Any,
    neighbour_tokens: Any,
    lam: float,
    temperature: float,
    *,
    lm_argmax_log_probs: Any,
    chunk_size: int = 8192,
    max_block_elements: int = 1 << 24,
) -> Tensor:
    """Exact argmax of the full mixture ``λ p_kNN + (1 − λ) p_LM`` without ``[Q, V]``.

    A token that no neighbour predicts has ``p_kNN = 0``, so among those the LM's argmax
    wins; the mixture's argmax therefore lies in ``{LM argmax} ∪ {neighbour tokens}``.

    Args:
        lm_argmax: ``[Q]`` the LM's most likely token.
        lm_neighbour_log_probs: ``[Q, k]`` LM log-prob of each neighbour's next token.
        distances, neighbour_tokens: ``[Q, k]``.
        lam, temperature: mixture parameters.
        lm_argmax_log_probs: ``[Q]`` the LM's log-prob of its argmax.
        chunk_size: at most this many queries per ``[chunk, k+1, k]`` comparison block.
        max_block_elements: and at most this many elements per block, so memory stays
            bounded (about 100 MB) however large ``k`` is.

    Returns:
        ``[Q]`` int64 predicted tokens (ties: the LM argmax, then the nearest neighbour).
    """
    w_all = neighbour_log_weights(distances, temperature, neighbour_tokens)
    tok_all = _i64(neighbour_tokens, w_all.device)
    top_all = _i64(lm_argmax, w_all.device)
    lm_nb_all = _f32(lm_neighbour_log_probs, w_all.device)
    lm_top_all = _f32(lm_argmax_log_probs, w_all.device)
    out = torch.empty(tok_all.shape[0], dtype=torch.int64, device=w_all.device)
    k = tok_all.shape[-1]
    chunk_size = max(1, min(chunk_size, max_block_elements // max(1, (k + 1) * k)))
    for s in range(0, tok_all.shape[0], chunk_size):
        w, tok, top = (
            w_all[s : s + chunk_size],
            tok_all[s : s + chunk_size],
            top_all[s : s + chunk_size],
        )
        cand = torch.cat([top.unsqueeze(-1), tok], dim=-1)  # [q, k+1]
        cand_lm = torch.cat(
            [lm_top_all[s : s + chunk_size].unsqueeze(-1), lm_nb_all[s : s + chunk_size]], -1
        )
        same = cand.unsqueeze(-1) == tok.unsqueeze(-2)  # [q, k+1, k]
        knn = torch.logsumexp(
            torch.where(same, w.unsqueeze(-2), torch.tensor(-math.inf, device=w.device)), -1
        )
        score = interpolate_log_probs(cand_lm, knn, lam)
        score = torch.where(cand >= 0, score, torch.full_like(score, -math.inf))
        out[s : s + chunk_size] = cand.gather(1, score.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return out


def write_knn_tuning(
    directory: str | Path, row: Mapping[str, Any], identity: Mapping[str, Any]
) -> Path:
    r"""Record a tuned kNN-LM row of :func:`~hetgraph.evaluation.evaluate_four_way`
    (``lambda``, ``temperature``, ``k``) in ``directory``/:data:`KNN_TUNING`, atomically, with
    ``identity`` (what it was tuned for: ``{"datastore": fingerprint, "adapter": checksum or
    None}``), which :func:`read_knn_tuning` compares."""
    from hetgraph.integrity import atomic_write_json_record

    path = Path(directory) / KNN_TUNING
    record = {
        "lambda": float(row["lambda"]),
        "temperature": float(row["temperature"]),
        "k": int(row["k"]),
        **identity,
    }
    atomic_write_json_record(path, record)
    return path


def read_knn_tuning(directory: str | Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    r"""The record :func:`write_knn_tuning` left in ``directory`` for ``identity``, or ``None``
    when there is none; one that is damaged, out of range or tuned for another adapter or
    datastore is ignored with a warning (it only ever replaces a missing setting)."""
    from hetgraph.errors import HetgraphError
    from hetgraph.integrity import read_json_record

    path = Path(directory) / KNN_TUNING
    if not path.is_file():
        return None
    try:
        record = read_json_record(path)
        lam, temperature = float(record["lambda"]), float(record["temperature"])
    except (HetgraphError, KeyError, TypeError, ValueError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None
    if any(record.get(key) != value for key, value in identity.items()):
        logger.warning(
            "ignoring %s: tuned for another adapter or datastore; run `hetgraph "
            "eval` again to tune this one",
            path,
        )
        return None
    if not (0.0 <= lam <= 1.0 and math.isfinite(temperature) and temperature > 0):
        logger.warning(
            "ignoring %s: lambda %s / temperature %s out of range", path, lam, temperature
        )
        return None
    return {**record, "lambda": lam, "temperature": temperature}
