"""Retrieval of neighbour corpus positions for query hidden states."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hetgraph.datastore import Datastore
from hetgraph.graph import leakage_mask
from hetgraph.index import DatastoreIndex


class Retriever:
    """Searches a datastore's FAISS index with torch queries and returns torch results.

    Args:
        datastore: the datastore the index was built over (for document ids).
        index: its FAISS index.
    """

    def __init__(self, datastore: Datastore, index: DatastoreIndex) -> None:
        self.datastore = datastore
        self.index = index
        self._doc_ids = torch.from_numpy(np.asarray(datastore.doc_ids, dtype=np.int64))

    def search(
        self,
        queries: Tensor,
        k: int,
        exclude_positions: Tensor | None = None,
        margin: int = 0,
        radius: int = 3072,
        same_document: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``k`` nearest datastore rows of each query, nearest first.

        Args:
            queries: ``[Q, d]`` query states (any float dtype, any device).
            k: neighbours per query.
            exclude_positions: ``[Q]`` datastore row of each query when its text is itself in
                the datastore (``-1`` otherwise). Neighbours within ``radius`` rows of it
                (in the same document, with ``same_document``) are dropped (the GNN-LM
                leakage filter), and ``k + margin`` are retrieved so that ``k`` usually
                remain (``margin=0``: dropped neighbours are not replaced, as officially).
            margin: extra neighbours retrieved when ``exclude_positions`` is given.
            radius: leakage radius in tokens.
            same_document: only neighbours of the query's document can leak (``False``:
                any neighbour within ``radius`` rows, as the official code).

        Returns:
            ``(distances [Q, k] float32, ids [Q, k] int64)`` on the queries' device, in FAISS's
            order; ``-1`` ids (with ``inf`` distance) where fewer than ``k`` neighbours remain.
        """
        device = queries.device
        if queries.shape[0] == 0:
            return (torch.empty(0, k, dtype=torch.float32, device=device),
                    torch.empty(0, k, dtype=torch.long, device=device))
        fetch = k if exclude_positions is None else min(k + margin, len(self.datastore))
        distances_np, ids_np = self.index.search(queries.detach().float().cpu().numpy(), fetch)
        ids = torch.from_numpy(ids_np)
        distances = torch.from_numpy(distances_np)
        if exclude_positions is not None:
            distances, ids = self._drop_leaking(distances, ids, exclude_positions.cpu(), k, radius,
                                                same_document)
        return distances.to(device), ids.to(device)

    def _drop_leaking(
        self, distances: Tensor, ids: Tensor, positions: Tensor, k: int, radius: int,
        same_document: bool,
    ) -> tuple[Tensor, Tensor]:
        found = ids >= 0
        leaking = leakage_mask(ids, positions, self._doc_ids, radius, same_document=same_document)
        keep = found & ~leaking
        # Stable sort moves kept neighbours to the front without changing their order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
        kept = keep.gather(1, order)
        ids = torch.where(kept, ids.gather(1, order), torch.full_like(order, -1))
        distances = torch.where(kept, distances.gather(1, order),
                                torch.full_like(distances[:, :k], float("inf")))
        if ids.shape[1] < k:  # the datastore is smaller than k + margin
            pad = k - ids.shape[1]
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
            distances = torch.cat(
                [distances, distances.new_full((ids.shape[0], pad), float("inf"))], 1)
        return distances, ids
