"""The GNN-LM training-leakage filter on retrieved neighbours."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def leakage_mask(
    neighbour_ids: Tensor, query_positions: Tensor, corpus_doc_ids: Tensor | np.ndarray, radius: int
) -> Tensor:
    r"""Which retrieved neighbours would leak the query's own text (the GNN-LM filter).

    When the query text is itself in the datastore (training), neighbour :math:`o` of a
    query at datastore row :math:`p` leaks if it lies in the same document and
    :math:`|p - o| < \text{radius}`.

    Args:
        neighbour_ids: ``[Q, k]`` datastore rows (negative = missing, never leaks).
        query_positions: ``[Q]`` datastore row of each query, ``-1`` if not in the store.
        corpus_doc_ids: ``[N]`` document id of every datastore row.
        radius: leakage radius in rows.

    Returns:
        ``[Q, k]`` bool, ``True`` where the neighbour must be dropped.
    """
    # Datastore arrays are numpy memmaps; avoid a copy where torch can share memory.
    docs = (
        corpus_doc_ids
        if isinstance(corpus_doc_ids, Tensor)
        else torch.as_tensor(np.asarray(corpus_doc_ids))
    )
    n = docs.shape[0]
    rows = neighbour_ids.long()
    own = query_positions.long().to(rows.device)[:, None]

    def doc_of(ids: Tensor) -> Tensor:
        return docs[ids.clamp(min=0, max=max(n - 1, 0)).to(docs.device)].to(rows.device)
    return (rows >= 0) & (own >= 0) & (doc_of(own) == doc_of(rows)) & ((own - rows).abs() < radius)
