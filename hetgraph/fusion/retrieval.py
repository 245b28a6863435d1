"""Retrieval of neighbour corpus positions for query hidden states.

:class:`Retriever` is the one wrapper of a datastore's FAISS index: the fusion hooks, the
from-datastore training path and the evaluation (kNN-LM, and the GNN-LM pass that reuses
the base run's neighbours through :attr:`~hetgraph.fusion.context.CallOptions.retrieval`)
all search through it, so every position is searched once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hetgraph.configuration import ConfigError
from hetgraph.datastore import Datastore
from hetgraph.fusion.context import CallOptions, Retrieval
from hetgraph.fusion.random_neighbours import draw_rows, query_identities
from hetgraph.graph import CorpusTable, leakage_mask
from hetgraph.index import DatastoreIndex
from hetgraph.index.rerank import exact_distances

if TYPE_CHECKING:
    from hetgraph.fusion.config import FusionConfig


class Retriever:
    r"""Searches a datastore's FAISS index with torch queries and returns torch results.

    Args:
        datastore: the datastore the index was built over.
        index: its FAISS index.
        corpus: the datastore's integer columns (default: :meth:`CorpusTable.of
            <hetgraph.graph.CorpusTable.of>` the datastore, i.e. its memmaps); the leakage
            filter reads the document ids of the retrieved rows only.
    """

    def __init__(
        self, datastore: Datastore, index: DatastoreIndex, corpus: CorpusTable | None = None
    ) -> None:
        self.datastore = datastore
        self.index = index
        self.corpus = corpus if corpus is not None else CorpusTable.of(datastore)

    def check(self, k: int) -> None:
        """Refuse ``k`` outside ``[1, index size]`` (one-line :class:`ConfigError`)."""
        if not 1 <= k <= len(self.index):
            raise ConfigError(
                f"k must be in [1, {len(self.index)}] (the index size), got {k}; lower k", "k"
            )

    def retrieve(
        self,
        queries: Tensor,
        options: CallOptions,
        config: FusionConfig,
        *,
        tokens: Tensor | None = None,
        neighbours: str | None = None,
    ) -> Retrieval:
        """The neighbours of ``[B, T, d]`` query states for one call, as
        :meth:`FusionEngine.retrieve <hetgraph.FusionEngine.retrieve>` describes; positions
        that ``options.retrieval`` covers take its neighbours and are not searched."""
        batch, length = queries.shape[:2]
        positions = options.query_positions
        if positions is not None:
            positions = positions[:, -length:].to(queries.device).reshape(-1)
        k = options.k or config.k
        leakage = dict(
            exclude_positions=positions,
            margin=config.retrieval_margin,
            radius=config.graph.leakage_radius,
            same_document=config.graph.leakage_scope == "document",
        )
        flat = queries.reshape(batch * length, -1)
        if (neighbours or config.neighbours) == "random":
            identities = query_identities(positions, tokens, batch, length, config.neighbour_seed)
            distances, ids = self.random(flat, k, identities, **leakage)
            return Retrieval(distances.view(batch, length, -1), ids.view(batch, length, -1))
        given = self.given(options, k, batch, length)
        if given is None:
            distances, ids = self.search(flat, k, **leakage)
            return Retrieval(distances.view(batch, length, -1), ids.view(batch, length, -1))
        distances = given.distances.to(queries.device, torch.float32).reshape(batch * length, k)
        ids = given.neighbour_ids.to(queries.device, torch.long).reshape(batch * length, k)
        if not given.is_complete:  # search the positions it does not cover, once
            distances, ids = distances.clone(), ids.clone()  # never write into the caller's
            missing = (~given.covered.to(queries.device)).reshape(-1).nonzero().view(-1)
            if positions is not None:
                leakage["exclude_positions"] = positions[missing]
            distances[missing], ids[missing] = self.search(flat[missing], k, **leakage)
        return Retrieval(distances.view(batch, length, k), ids.view(batch, length, k))

    @staticmethod
    def given(options: CallOptions, k: int, batch: int, length: int) -> Retrieval | None:
        """``options.retrieval`` for the last ``length`` positions of a ``batch``-row call
        with ``k`` neighbours per position (``None`` when there is none).

        Raises:
            ValueError: it does not have ``[batch, >= length, k]`` neighbours.
        """
        given = options.retrieval
        if given is None:
            return None
        shape = tuple(given.neighbour_ids.shape)
        if len(shape) != 3 or shape[0] != batch or shape[1] < length or shape[2] != k:
            raise ValueError(
                f"CallOptions.retrieval holds neighbours of shape {shape}; this "
                f"call needs [{batch}, >= {length}, k={k}]: retrieve with the "
                "call's k, over its input positions"
            )
        return given.last(length)

    def complete(
        self, options: CallOptions, k: int, batch: int, length: int, device: torch.device
    ) -> Retrieval | None:
        """``options.retrieval`` of the last ``length`` positions on ``device`` when it covers
        every one of them (then a call needs no query states at all), else ``None``."""
        given = self.given(options, k, batch, length)
        if given is None or not given.is_complete:
            return None
        return Retrieval(
            given.distances.to(device, torch.float32), given.neighbour_ids.to(device, torch.long)
        )

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
            return (
                torch.empty(0, k, dtype=torch.float32, device=device),
                torch.empty(0, k, dtype=torch.long, device=device),
            )
        fetch = k if exclude_positions is None else min(k + margin, len(self.datastore))
        distances_np, ids_np = self.index.search(queries.detach().float().cpu().numpy(), fetch)
        ids = torch.from_numpy(ids_np)
        distances = torch.from_numpy(distances_np)
        if exclude_positions is not None:
            distances, ids = self._drop_leaking(
                distances, ids, exclude_positions.cpu(), k, radius, same_document
            )
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
            distances, ids = self._drop_leaking(
                distances, ids, exclude_positions.cpu(), k, radius, same_document
            )
        elif ids.shape[1] < k:
            ids = torch.cat([ids, ids.new_full((ids.shape[0], k - ids.shape[1]), -1)], 1)
        found = exact_distances(
            self.datastore.keys,
            queries.detach().float().cpu().numpy(),
            ids.numpy(),
            self.index.metric,
        )
        distances = torch.from_numpy(found)
        # Nearest first, ties (and missing rows, at inf) by row, missing last.
        by_row = torch.sort(torch.where(ids < 0, torch.iinfo(torch.long).max, ids), dim=1).indices
        ids, distances = ids.gather(1, by_row), distances.gather(1, by_row)
        order = torch.sort(distances, dim=1, stable=True).indices
        return distances.gather(1, order).to(device), ids.gather(1, order).to(device)

    def _drop_leaking(
        self,
        distances: Tensor,
        ids: Tensor,
        positions: Tensor,
        k: int,
        radius: int,
        same_document: bool,
    ) -> tuple[Tensor, Tensor]:
        found = ids >= 0
        leaking = leakage_mask(
            ids, positions, self.corpus.doc_ids, radius, same_document=same_document
        )
        keep = found & ~leaking
        # Stable sort moves kept neighbours to the front without changing their order.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
        kept = keep.gather(1, order)
        ids = torch.where(kept, ids.gather(1, order), torch.full_like(order, -1))
        distances = torch.where(
            kept, distances.gather(1, order), torch.full_like(distances[:, :k], float("inf"))
        )
        if ids.shape[1] < k:  # the datastore is smaller than k + margin
            pad = k - ids.shape[1]
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
            distances = torch.cat(
                [distances, distances.new_full((ids.shape[0], pad), float("inf"))], 1
            )
        return distances, ids
