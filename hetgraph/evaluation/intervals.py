r"""95 % intervals for perplexities and their ratios: a bootstrap over documents.

Tokens of one document are not independent (a document about the C API is hard for every
token of it), so resampling tokens would give intervals far too narrow. The bootstrap here
resamples *documents* with replacement (a cluster bootstrap): resample ``r`` draws ``D``
documents out of the ``D`` scored ones and recomputes the perplexity

.. math::
    \mathrm{PPL}^{(r)} = \exp\Big(-\frac{\sum_d w^{(r)}_d S_d}{\sum_d w^{(r)}_d n_d}\Big),

where :math:`S_d` is the summed log-probability of document :math:`d`'s scored tokens,
:math:`n_d` their number and :math:`w^{(r)}_d` how often the resample drew :math:`d`. A
ratio of two methods scored on the same tokens is *paired*: both perplexities of a resample
use the same :math:`w^{(r)}`, so what the documents share cancels. The interval is the
2.5th–97.5th percentile of the resampled values; the resamples are drawn from a seeded
generator, so the interval is reproducible, and their number is stated with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Resamples drawn by default.
DEFAULT_RESAMPLES = 1000
#: Seed of the resamples by default.
DEFAULT_BOOTSTRAP_SEED = 0
#: Resamples whose document weights are held at once (bounds memory at ``chunk × D``).
_CHUNK = 256


@dataclass(frozen=True)
class BootstrapSpec:
    """How intervals are drawn: ``resamples`` document resamples from ``seed``, ``level``
    the two-sided coverage."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_BOOTSTRAP_SEED
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples must be >= 1, got {self.resamples}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")


def document_sums(log_probs: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Per document: the summed log-probabilities ``[..., D]`` (float64) and the token
    counts ``[D]``, for ``log_probs`` ``[..., M]`` (one row per method) and ``doc_ids``
    ``[M]``. Documents are numbered in order of first appearance."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    _, inverse = np.unique(np.asarray(doc_ids), return_inverse=True)
    num_docs = int(inverse.max()) + 1 if inverse.size else 0
    counts = np.bincount(inverse, minlength=num_docs).astype(np.float64)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    sums = np.stack([np.bincount(inverse, weights=row, minlength=num_docs) for row in flat])
    return sums.reshape(*log_probs.shape[:-1], num_docs), counts


def resample_weights(num_docs: int, spec: BootstrapSpec):
    r"""Yield ``[r, D]`` arrays: how often each resample drew each document (chunks of
    resamples, all drawn from one generator seeded with ``spec.seed``, in order)."""
    rng = np.random.default_rng(spec.seed)
    done = 0
    while done < spec.resamples:
        r = min(_CHUNK, spec.resamples - done)
        draws = rng.integers(0, num_docs, size=(r, num_docs))
        flat = (draws + num_docs * np.arange(r)[:, None]).ravel()
        yield np.bincount(flat, minlength=r * num_docs).reshape(r, num_docs).astype(np.float64)
        done += r


def bootstrap_perplexities(
    log_probs: np.ndarray, doc_ids: np.ndarray, spec: BootstrapSpec | None = None
) -> np.ndarray:
    r"""``[methods, resamples]`` perplexities of document resamples.

    Args:
        log_probs: ``[methods, M]`` (or ``[M]``) log-probabilities of the same ``M`` scored
            tokens under each method (natural log).
        doc_ids: ``[M]`` document of each token.
        spec: resamples, seed and level.
    """
    spec = spec or BootstrapSpec()
    sums, counts = document_sums(np.atleast_2d(log_probs), doc_ids)
    out = [
        np.exp(-(w @ sums.T) / (w @ counts)[:, None]).T for w in resample_weights(len(counts), spec)
    ]
    return np.concatenate(out, axis=1)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    r"""The central ``level`` percentile interval of ``values`` (``[..., R]``, last axis)."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail], axis=-1)
    return float(low), float(high)


@dataclass(frozen=True)
class PerplexityInterval:
    """A perplexity, its interval and what it was computed over."""

    ppl: float
    ci95: tuple[float, float]
    documents: int
    tokens: int


@dataclass(frozen=True)
class RatioInterval:
    """``ppl(a) / ppl(b)`` on the same tokens and its paired interval."""

    ratio: float
    ci95: tuple[float, float]

    @property
    def detectable(self) -> bool:
        """Whether the interval excludes 1 (no change)."""
        return not self.ci95[0] <= 1.0 <= self.ci95[1]

    def describe(self, a: str, b: str) -> str:
        """One sentence for prose: the ratio with its interval, or "no detectable
        difference" when the interval contains 1."""
        interval = f"{self.ratio:.3f} (95 % CI {self.ci95[0]:.3f}–{self.ci95[1]:.3f})"
        if not self.detectable:
            return f"{a} vs {b}: no detectable difference, ratio {interval}"
        return f"{a} / {b} = {interval}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form under ``"ratios"``: ``{"ratio": …, "ci95": [low, high]}``."""
        return {"ratio": self.ratio, "ci95": list(self.ci95)}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RatioInterval:
        return cls(float(row["ratio"]), (float(row["ci95"][0]), float(row["ci95"][1])))


def perplexity_intervals(
    log_probs: dict[str, np.ndarray], doc_ids: np.ndarray, spec: BootstrapSpec | None = None
) -> tuple[dict[str, PerplexityInterval], dict[str, RatioInterval]]:
    r"""Each method's perplexity with its document-bootstrap interval, and every ratio
    between two methods with its paired interval.

    Args:
        log_probs: method name -> ``[M]`` log-probabilities of the same scored tokens.
        doc_ids: ``[M]`` document of each token.
        spec: resamples, seed and level.

    Returns:
        ``(per_method, ratios)``; ``ratios`` is keyed ``"a/b"`` for every ordered pair of
        distinct methods ``a`` after ``b`` in ``log_probs``'s order (``"gnn/base"``, …).
    """
    spec = spec or BootstrapSpec()
    names = list(log_probs)
    stacked = np.stack([np.asarray(log_probs[n], dtype=np.float64) for n in names])
    if stacked.shape[1] == 0:
        raise ValueError("perplexity_intervals: no scored tokens")
    doc_ids = np.asarray(doc_ids)
    ppl = np.exp(-stacked.mean(axis=1))
    resampled = bootstrap_perplexities(stacked, doc_ids, spec)
    documents, tokens = len(np.unique(doc_ids)), int(stacked.shape[1])
    per_method = {
        n: PerplexityInterval(
            float(ppl[i]), percentile_interval(resampled[i], spec.level), documents, tokens
        )
        for i, n in enumerate(names)
    }
    ratios = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names[:i]):
            ratios[f"{a}/{b}"] = RatioInterval(
                float(ppl[i] / ppl[j]), percentile_interval(resampled[i] / resampled[j], spec.level)
            )
    return per_method, ratios
