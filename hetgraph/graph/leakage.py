"""The GNN-LM training-leakage filter on retrieved neighbours."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from hetgraph.graph.corpus import column_length, gather_rows


def leakage_mask(
    neighbour_ids: Tensor,
    query_positions: Tensor,
    corpus_doc_ids: Tensor | np.ndarray,
    radius: int,
    same_document: bool = True,
) -> Tensor:
    r"""Which retrieved neighbours would leak the query's own text (the GNN-LM filter).

    When the query text is itself in the datastore (training), neighbour :math:`o` of a
    query at datastore row :math:`p` leaks if :math:`|p - o| < \text{radius}` and (with
    ``same_document``) it lies in the same document. The official GNN-LM code compares
    corpus offsets regardless of document (``same_document=False``).

    Args:
        neighbour_ids: ``[Q, k]`` datastore rows (negative = missing, never leaks).
        query_positions: ``[Q]`` datastore row of each query, ``-1`` if not in the store.
        corpus_doc_ids: ``[N]`` document id of every datastore row (a tensor, or a numpy
            memmap read at the rows asked for only).
        radius: leakage radius in rows.
        same_document: only neighbours of the query's own document can leak.

    Returns:
        ``[Q, k]`` bool, ``True`` where the neighbour must be dropped.
    """
    # Datastore columns are numpy memmaps: only the rows asked for are read (gather_rows).
    n = column_length(corpus_doc_ids)
    rows = neighbour_ids.long()
    own = query_positions.long().to(rows.device)[:, None]

    def doc_of(ids: Tensor) -> Tensor:
        return gather_rows(corpus_doc_ids, ids.clamp(min=0, max=max(n - 1, 0)))

    near = (rows >= 0) & (own >= 0) & ((own - rows).abs() < radius)
    return near & (doc_of(own) == doc_of(rows)) if same_document else near
