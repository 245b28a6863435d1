r"""Which positions of a split an evaluation scores: a document-stratified sample.

Scoring "the first N tokens" of a split covers a handful of documents — 4,096 tokens of the
Python docs' test split are 6 of its 36 documents — and two prefixes can disagree by a
quarter. :func:`stratified_segments` instead spreads a budget of ``N`` scored positions over
*every* document of the split: each document gets an equal share (all of it when it is
shorter than the share, the rest going to longer documents), taken as one contiguous segment
at a seeded random offset inside the document, so the scored tokens keep their natural left
context. The sample depends only on the documents' lengths, the budget and the seed: every
method, every run and every ``torchrun`` rank score exactly the same positions.

:func:`segment_windows` turns the segments into the strided windows the evaluation feeds
(the same windows shape as :func:`hetgraph.corpus.windows.sliding_windows`: every scored
position has at least ``context_length - stride`` tokens of left context wherever the split
has that much text before it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from hetgraph.corpus.windows import Window, sliding_windows

if TYPE_CHECKING:  # the config is read only; it imports this module
    from hetgraph.evaluation.lm import EvalConfig

#: Default seed of the evaluation sample.
DEFAULT_SAMPLE_SEED = 0


def document_bounds(doc_ids: np.ndarray) -> np.ndarray:
    r"""``[D, 2]`` int64 ``[start, end)`` of each run of equal ``doc_ids``, in order.

    A document is a maximal run of equal ids (a split stores each document contiguously).
    """
    doc_ids = np.asarray(doc_ids)
    if doc_ids.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    change = np.flatnonzero(doc_ids[1:] != doc_ids[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    ends = np.concatenate([change, [doc_ids.size]]).astype(np.int64)
    return np.stack([starts, ends], axis=1)


def equal_shares(lengths: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    r"""How many positions each document contributes to a sample of ``budget``.

    Water-filling: the largest share ``s`` with ``Σ min(n_d, s) ≤ budget``, then one more
    position each to documents still longer than ``s``, in a seeded random order, until the
    budget is spent. Every document gets ``min(n_d, s)`` or one more; when the budget is
    smaller than the number of documents, a seeded random ``budget`` of them get one each.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if budget >= int(lengths.sum()):
        return lengths.copy()
    low, high = 0, int(lengths.max())  # Σ min(n, low) <= budget < Σ min(n, high + 1)
    while low < high:
        mid = (low + high + 1) // 2
        if int(np.minimum(lengths, mid).sum()) <= budget:
            low = mid
        else:
            high = mid - 1
    shares = np.minimum(lengths, low)
    left = budget - int(shares.sum())
    longer = np.flatnonzero(lengths > low)
    shares[rng.permutation(longer)[:left]] += 1
    return shares


def stratified_segments(
    doc_ids: np.ndarray, budget: int | None, seed: int = DEFAULT_SAMPLE_SEED
) -> np.ndarray:
    r"""A document-stratified sample of ``budget`` positions as ``[S, 2]`` int64 segments.

    Args:
        doc_ids: ``[M]`` the document of each scorable position (the document of the token
            it predicts).
        budget: positions to score; ``None`` (or at least ``M``) = every position.
        seed: seeds the shares' remainder and each segment's offset in its document.

    Returns:
        ``[start, end)`` of one contiguous segment per covered document, in position order;
        their lengths add up to ``min(budget, M)``.
    """
    bounds = document_bounds(doc_ids)
    if budget is None or budget >= len(doc_ids):
        return bounds
    if budget < 1:
        raise ValueError(f"budget must be >= 1 or None, got {budget}")
    rng = np.random.default_rng(seed)
    lengths = bounds[:, 1] - bounds[:, 0]
    shares = equal_shares(lengths, int(budget), rng)
    # One uniform draw per document (drawn for all, so a document's offset does not depend
    # on which other documents are covered).
    offsets = np.floor(rng.random(len(bounds)) * (lengths - shares + 1)).astype(np.int64)
    starts = bounds[:, 0] + offsets
    segments = np.stack([starts, starts + shares], axis=1)
    return segments[shares > 0]


def segment_windows(segments: np.ndarray, context_length: int, stride: int) -> list[Window]:
    r"""Windows that score every position of ``segments`` exactly once.

    Each segment is scored in chunks of ``stride`` positions; the window of a chunk
    ``[s, e)`` feeds tokens ``[max(0, e - context_length), e)``, so windows have the full
    ``context_length`` wherever the split allows (and batch without padding).
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    segments = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
    if segments.size == 0:
        return []
    chunks = -(-(segments[:, 1] - segments[:, 0]) // stride)  # ceil
    first = np.repeat(segments[:, 0], chunks)
    index = np.arange(int(chunks.sum())) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    score_start = first + index * stride
    end = np.minimum(score_start + stride, np.repeat(segments[:, 1], chunks))
    start = np.maximum(0, end - context_length)
    return [Window(int(a), int(b), int(s)) for a, b, s in zip(start, end, score_start, strict=True)]


def scored_positions(segments: np.ndarray) -> np.ndarray:
    r"""``[N]`` int64: every position of ``segments``, in order."""
    segments = np.asarray(segments, dtype=np.int64).reshape(-1, 2)
    lengths = segments[:, 1] - segments[:, 0]
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(segments[:, 0], lengths) + offsets


def prefix_tokens(config: EvalConfig) -> int | None:
    """The tokens of a split an evaluation reads: ``config.max_tokens`` for a ``"prefix"``
    sample, all (``None``) for a stratified one, which chooses its positions among all."""
    return config.max_tokens if config.sample == "prefix" else None


def evaluation_windows(doc_ids: np.ndarray, config: EvalConfig) -> list[Window]:
    """The windows that score ``config``'s positions of a split whose tokens belong to
    ``doc_ids`` (already cut to :func:`prefix_tokens`): strided windows over every position
    when all are scored, else over the stratified sample's segments."""
    num_positions = len(doc_ids) - 1
    budget = config.max_tokens if config.sample == "stratified" else None
    if budget is None or budget >= num_positions:
        return sliding_windows(num_positions, config.context_length, config.stride)
    # The document of a position is that of the token it predicts.
    segments = stratified_segments(doc_ids[1:], budget, config.sample_seed)
    return segment_windows(segments, config.context_length, config.stride)


def scored_count(num_tokens: int, config: EvalConfig) -> int:
    """How many positions ``config`` scores in a split of ``num_tokens`` tokens."""
    positions = max(num_tokens - 1, 0)
    if config.max_tokens is None:
        return positions
    if config.sample == "prefix":
        return max(min(num_tokens, config.max_tokens) - 1, 0)
    return min(positions, config.max_tokens)
