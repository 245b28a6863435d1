r"""From retrieved neighbours to what a graph adapter reads: the graph and its node features.

:class:`GraphInputBuilder` is the one place that turns query states and the neighbour rows
retrieved for them into a :class:`~hetgraph.graph.ContextGraph` and the ``ctx`` / ``nbr``
feature matrices of :class:`~hetgraph.nn.GraphAdapter`. It holds no per-call state, so the
fusion hooks, the from-datastore training path, inspection and the benchmarks all call it
the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from hetgraph.datastore import Datastore
from hetgraph.fusion.config import HEAD, FusionSite
from hetgraph.graph import ContextGraph, CorpusTable, GraphConfig, build_context_graph


@dataclass
class AdapterInputs:
    r"""The arguments of :class:`~hetgraph.nn.GraphAdapter` for one graph.

    Attributes:
        graph: the context graph.
        ctx_x: :math:`[N_{ctx}, d]` query states (the fused site's hidden states).
        nbr_x: :math:`[R, d_{nbr}]` stored features of the distinct corpus rows of the
            ``nbr`` nodes (overlapping windows share rows: each is read and mapped once).
        nbr_token_x: :math:`[N_{tok}, d_{tok}]` input embeddings of the distinct tokens of
            those rows (``None`` unless ``neighbour_embedding="own_token"``).
        nbr_token_index: :math:`[R]` each row's row of ``nbr_token_x``.
        nbr_index: :math:`[N_{nbr}]` each ``nbr`` node's row of ``nbr_x``.
    """

    graph: ContextGraph
    ctx_x: Tensor
    nbr_x: Tensor
    nbr_token_x: Tensor | None
    nbr_token_index: Tensor | None = None
    nbr_index: Tensor | None = None


class GraphInputBuilder(nn.Module):
    r"""Builds context graphs over a datastore and gathers their node features.

    The corpus token, document and next-token columns are a :class:`~hetgraph.graph.CorpusTable`
    over the datastore's memmaps: never copied, never moved by ``.to(device)``; each graph
    reads the rows it needs on the CPU and moves those to the queries' device.

    Args:
        datastore: the corpus datastore (keys, tokens, document ids, optional features).
        graph_config: how graphs are built.
        neighbour_features: ``"key"``: every site reads the neighbours' stored keys;
            ``"stored"``: a decoder-layer site reads that layer's stored features (the key
            at the retrieval site).
        retrieval_site: the datastore's key site (``"head"`` or a decoder-layer index).
        neighbour_embedding: ``"own_token"``: also return the embedding of each row's own
            token; ``"none"``: the stored feature alone (official GNN-LM); ``"label"``: the
            ``nbr`` feature is the embedding of the row's label, the token that followed
            it (official fallback), and nothing stored is read.
    """

    def __init__(
        self,
        datastore: Datastore,
        graph_config: GraphConfig,
        neighbour_features: Literal["key", "stored"] = "key",
        retrieval_site: FusionSite = HEAD,
        neighbour_embedding: Literal["own_token", "none", "label"] = "own_token",
        corpus: CorpusTable | None = None,
    ) -> None:
        super().__init__()
        self.neighbour_embedding = neighbour_embedding
        self.datastore = datastore
        self.graph_config = graph_config
        self.neighbour_features = neighbour_features
        self.retrieval_site = retrieval_site
        self.corpus = corpus if corpus is not None else CorpusTable.of(datastore)

    def build_graph(self, neighbour_ids: Tensor, query_mask: Tensor | None = None) -> ContextGraph:
        """The context graph of ``[B, T, k]`` retrieved rows (``-1``: none), on their device.

        ``query_mask`` (``[B, T]`` bool) keeps only the positions that become ``ctx`` nodes.
        """
        graph = build_context_graph(
            neighbour_ids,
            self.corpus.tokens,
            self.corpus.doc_ids,
            self.graph_config,
            query_mask=query_mask,
        )
        return graph.to(neighbour_ids.device)

    def next_tokens(self, neighbour_ids: Tensor) -> Tensor:
        """The token that followed each retrieved row (``-1`` where the id is ``-1``)."""
        return self.corpus.next_tokens_of(neighbour_ids)

    def _reads_keys(self, site: FusionSite) -> bool:
        return self.neighbour_features == "key" or site == self.retrieval_site

    def feature_width(self, site: FusionSite) -> int:
        """Width of the ``nbr`` features a fused ``site`` reads."""
        if self._reads_keys(site):
            return self.datastore.dim
        return int(self.datastore.features(int(site)).shape[1])

    def neighbour_features_of(self, corpus_ids: Tensor, site: FusionSite) -> Tensor:
        """Stored features ``[M, d_nbr]`` of corpus rows (read from the memmaps, fp16)."""
        store = (
            self.datastore.keys if self._reads_keys(site) else self.datastore.features(int(site))
        )
        rows = corpus_ids.cpu().numpy()
        return torch.from_numpy(np.asarray(store[rows])).to(corpus_ids.device)

    def ctx_features(self, graph: ContextGraph, hidden: Tensor, dtype: torch.dtype) -> Tensor:
        """``[N_ctx, d]`` features of ``graph``'s ``ctx`` nodes: the ``[B, T, d]`` hidden
        states at their positions."""
        ctx = graph["ctx"]
        return hidden[ctx.batch_index, ctx.seq_index].to(dtype)

    def neighbour_inputs(
        self,
        graph: ContextGraph,
        site: FusionSite,
        embedding: nn.Module | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
        """``(nbr_x, nbr_token_x, nbr_token_index, nbr_index)`` of ``graph``'s ``nbr``
        nodes for the adapter at ``site``, on ``device`` (the adapter's arguments of those
        names): the features of each distinct corpus row once, and each node's row of
        them (a row sits in up to ``left + right + 1`` windows); with
        ``neighbour_embedding="own_token"`` the embeddings of the distinct tokens and each
        row's row of them (a batch holds a few thousand distinct tokens: the adapter maps
        each once), else ``None``."""
        nbr = graph["nbr"]
        token_x = token_index = None
        if embedding is None and self.neighbour_embedding != "none":
            raise ValueError(
                f"neighbour_embedding={self.neighbour_embedding!r} needs the base model's "
                "token embedding: pass embedding=model.get_input_embeddings()"
            )
        rows, nbr_index = nbr.corpus_id.unique(return_inverse=True)
        with torch.no_grad():  # the LM is frozen: its embedding needs no graph
            if self.neighbour_embedding == "label":
                nbr_x = embedding(self.next_tokens(rows.to(device))).to(dtype)
            else:
                nbr_x = self.neighbour_features_of(rows, site).to(device=device, dtype=dtype)
            if self.neighbour_embedding == "own_token":
                row_tokens = nbr.token_id.new_empty(rows.numel()).scatter_(
                    0, nbr_index, nbr.token_id
                )
                tokens, token_index = row_tokens.to(device).unique(return_inverse=True)
                token_x = embedding(tokens).to(dtype)
        return nbr_x, token_x, token_index, nbr_index.to(device)

    def adapter_inputs(
        self,
        graph: ContextGraph,
        hidden: Tensor,
        site: FusionSite,
        embedding: nn.Module | None,
        dtype: torch.dtype,
    ) -> AdapterInputs:
        """Node features of ``graph`` for the adapter at ``site``.

        Args:
            graph: a graph from :meth:`build_graph` over the positions of ``hidden``.
            hidden: ``[B, T, d]`` hidden states at ``site`` (the ``ctx`` features).
            site: the fused site (decides which stored ``nbr`` features are read).
            embedding: the LM's input embedding (``model.get_input_embeddings()``; ``None``
                with ``neighbour_embedding="none"``).
            dtype: dtype of the adapter's parameters.
        """
        return AdapterInputs(
            graph,
            self.ctx_features(graph, hidden, dtype),
            *self.neighbour_inputs(graph, site, embedding, dtype, hidden.device),
        )

    def extra_repr(self) -> str:
        return (
            f"entries={len(self.datastore)}, neighbour_features={self.neighbour_features!r}, "
            f"retrieval_site={self.retrieval_site!r}, "
            f"neighbour_embedding={self.neighbour_embedding!r}"
        )
