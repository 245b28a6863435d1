"""Retrieval of neighbour corpus positions for query hidden states."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hetgraph.datastore import Datastore
from hetgraph.fusion.random_neighbours import draw_rows
from hetgraph.graph import leakage_mask
from hetgraph.index import DatastoreIndex
from hetgraph.index.rerank import exact_distances


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

    def random(
        self,
        queries: Tensor,
        k: int,
        identities: Tensor,
        exclude_positions: Tensor | None = None,
        margin: int = 0,
        radius: int = 3072,
        same_document: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """``k`` datastore rows drawn uniformly for each query (the random-neighbours
        control), as :meth:`search` returns retrieved ones.

        Each query draws ``k`` distinct rows (``k + margin`` with ``exclude_positions``,
        of which leaking ones are dropped and the first ``k`` kept in draw order, so the
        filter cannot favour any row) from its ``[Q, 2]`` ``identities``
        (:mod:`hetgraph.fusion.random_neighbours`). Distances are the exact ones between
        each query and its drawn keys (squared L2, or negated inner product, as the index's
        metric), and rows come nearest first (ties by row), as from :meth:`search`.

        Returns:
            ``(distances [Q, k] float32, ids [Q, k] int64)`` on the queries' device; ``-1``
            ids (``inf`` distance) where fewer than ``k`` rows remain.
        """
        device = queries.device
        if queries.shape[0] == 0:
            return self.search(queries, k)
        n = len(self.datastore)
        fetch = min(k if exclude_positions is None else k + margin, n)
        ids = draw_rows(identities.cpu(), fetch, n)
        distances = torch.zeros(ids.shape, dtype=torch.float32)
        if exclude_positions is not None:
            distances, ids = self._drop_leaking(distances, ids, exclude_positions.cpu(), k, radius,
                                                same_document)
        elif ids.shape[1] < k:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], k - ids.shape[1]), -1)], 1)
        found = exact_distances(self.datastore.keys, queries.detach().float().cpu().numpy(),
                                ids.numpy(), self.index.metric)
        distances = torch.from_numpy(found)
        # Nearest first, ties (and missing rows, at inf) by row, missing last.
        by_row = torch.sort(torch.where(ids < 0, torch.iinfo(torch.long).max, ids), dim=1).indices
        ids, distances = ids.gather(1, by_row), distances.gather(1, by_row)
        order = torch.sort(distances, dim=1, stable=True).indices
        return distances.gather(1, order).to(device), ids.gather(1, order).to(device)

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
