r"""What the contrastive objective compares: row labels (next token, or next two), held-out
rows, positives of the same label outside the leakage radius, and hard negatives (raw-key
FAISS neighbours of another label), all drawn vectorised with numpy."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["PairSampler", "row_labels"]

#: Candidates drawn per anchor when looking for a positive outside the leakage radius.
POSITIVE_DRAWS = 8


def row_labels(next_tokens: np.ndarray, doc_ids: np.ndarray, next_count: int) -> np.ndarray:
    r"""``int64 [N]`` label of every row: its next token (``next_count`` 1), or its next two
    tokens (2; a row whose second next token lies in another document, or past the end, gets
    its own "none" value for it)."""
    nt = np.asarray(next_tokens).astype(np.int64)
    if next_count == 1:
        return nt
    docs = np.asarray(doc_ids)
    second = np.full_like(nt, -1)
    same = docs[1:] == docs[:-1]
    second[:-1] = np.where(same, nt[1:], -1)
    return nt * (int(nt.max()) + 2) + (second + 1)


def leaks(rows: np.ndarray, others: np.ndarray, doc_ids: np.ndarray, radius: int) -> np.ndarray:
    r"""Whether ``others`` (any shape broadcasting with ``rows``) lie in the same document as
    ``rows`` closer than ``radius`` rows; a row always leaks onto itself."""
    near = np.abs(rows - others) < max(int(radius), 1)
    return near & (doc_ids[rows] == doc_ids[others])


class PairSampler:
    r"""Held-out rows, anchors, positives and mined hard negatives for one datastore.

    Args:
        labels: ``[N]`` from :func:`row_labels`.
        doc_ids: ``[N]`` document of every row.
        radius: leakage radius in rows.
        valid_rows: rows held out for validation (never anchors, positives or negatives).
        seed: seeds every draw.
    """

    def __init__(
        self, labels: np.ndarray, doc_ids: np.ndarray, radius: int, valid_rows: int, seed: int
    ) -> None:
        self.labels = np.asarray(labels)
        self.doc_ids = np.asarray(doc_ids)
        self.radius = int(radius)
        self.rng = np.random.default_rng(seed)
        n = len(self.labels)
        held = self.rng.choice(n, size=min(valid_rows, max(1, n // 5)), replace=False)
        self.held_out = np.sort(held)
        self.training = np.ones(n, dtype=bool)
        self.training[self.held_out] = False
        rows = np.flatnonzero(self.training)
        self.order = rows[np.argsort(self.labels[rows], kind="stable")]
        self.groups, self.starts, self.counts = np.unique(
            self.labels[self.order], return_index=True, return_counts=True
        )

    def _group(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.searchsorted(self.groups, self.labels[rows]).clip(max=len(self.groups) - 1)
        found = self.groups[g] == self.labels[rows]
        return self.starts[g], np.where(found, self.counts[g], 0)

    def anchor_pool(self, size: int) -> np.ndarray:
        """Up to ``size`` training rows whose label occurs at least twice, drawn at random."""
        rows = np.flatnonzero(self.training)
        eligible = rows[self._group(rows)[1] >= 2]
        if len(eligible) == 0:
            from hetgraph.encoder.model import EncoderError

            raise EncoderError(
                "no next token occurs twice among the datastore's training "
                "rows: nothing to learn; build a larger datastore"
            )
        take = min(size, len(eligible))
        return np.sort(self.rng.choice(eligible, size=take, replace=False))

    def positives(self, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r"""A random same-label training row outside the leakage radius per anchor:
        ``(rows, found)``; ``found`` is False where no draw succeeded."""
        start, count = self._group(anchors)
        draws = self.rng.random((len(anchors), POSITIVE_DRAWS))
        offsets = start[:, None] + np.floor(draws * count[:, None]).astype(np.int64)
        candidates = self.order[offsets.clip(max=len(self.order) - 1)]
        ok = (count[:, None] > 0) & ~leaks(anchors[:, None], candidates, self.doc_ids, self.radius)
        first = ok.argmax(axis=1)
        return candidates[np.arange(len(anchors)), first], ok.any(axis=1)

    def hard_negatives(
        self,
        anchors: np.ndarray,
        index: Any,
        keys: Any,
        count: int,
        show_progress: bool = True,
        batch: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        r"""The first ``count`` raw-key neighbours (``index``, a
        :class:`~hetgraph.index.DatastoreIndex` over ``keys``) of each anchor whose label
        differs and that are training rows: ``(rows [P, count], valid [P, count])``."""
        p = len(anchors)
        if count == 0:
            return np.zeros((p, 0), np.int64), np.zeros((p, 0), bool)
        search_k = min(int(index.ntotal), max(4 * count, count + 16))
        rows = np.zeros((p, count), np.int64)
        valid = np.zeros((p, count), bool)
        for s in tqdm(
            range(0, p, batch),
            desc="hard negatives",
            unit="batch",
            disable=not show_progress,
            dynamic_ncols=True,
        ):
            a = anchors[s : s + batch]
            _, ids = index.search(np.asarray(keys[a]), search_k)
            safe = ids.clip(min=0)
            ok = (ids >= 0) & self.training[safe] & (self.labels[safe] != self.labels[a][:, None])
            pick = np.argsort(~ok, axis=1, kind="stable")[:, :count]
            rows[s : s + batch] = np.take_along_axis(safe, pick, axis=1)
            valid[s : s + batch] = np.take_along_axis(ok, pick, axis=1)
        logger.info("hard negatives: %.1f valid of %d per anchor", valid.sum(1).mean(), count)
        return rows, valid
