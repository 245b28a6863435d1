"""The GNN-LM adapter: input projections, a stack of hetero attention layers, output projection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import GELU, Dropout, Identity, LayerNorm, Linear, Module, ModuleList, Sequential
from torch_geometric.data import HeteroData
from torch_geometric.nn.module_dict import ModuleDict

from hetgraph.graph.config import C2C, CTX, K2C, K2N, KG, N2C, N2N, NBR, context_graph_metadata
from hetgraph.graph.layout import WindowLayout
from hetgraph.nn.config import AdapterConfig, ComputePath
from hetgraph.nn.conv import AttentionDict, HeteroGraphAttention
from hetgraph.nn.dense import CausalLayout, causal_layout, dense_query_attention
from hetgraph.nn.dense.common import (
    slot_index,
    slot_keys_values,
    window_layer_inputs,
    window_outputs,
)
from hetgraph.nn.gnnlm import (
    adapter_to_gnnlm_state_dict,
    gnnlm_adapter_config,
    load_gnnlm_state_dict,
)
from hetgraph.nn.kg import KGFactEncoder

#: Parameter sets of the official GNN-LM relations (``tie_intra``): ``intra`` is shared by
#: ``tgt -> tgt`` (c2c) and ``ntgt -> ntgt`` (n2n), ``inter`` is ``ntgt -> tgt`` (n2c).
INTRA_INTER = {N2N: "intra", C2C: "intra", N2C: "inter"}


def _dense_layout(graph: HeteroData) -> WindowLayout | None:
    """The :class:`~hetgraph.graph.WindowLayout` of ``graph`` if the dense path
    reproduces the graph exactly: a window grid (``"grid"`` or ``"shared"``) and
    no edges but ``n2n``, ``n2c`` and causal ``c2c`` edges as the layout describes
    them (``layout.c2c``); else :obj:`None`. Edges of the ``kg`` node type do not count:
    an adapter without a knowledge-graph branch ignores them, and one with a branch never
    takes the dense path (:meth:`GraphAdapter.use_dense`)."""
    try:
        layout = getattr(graph, "layout", None)
    except ValueError:  # a batch of graphs with different windows
        return None
    if not isinstance(layout, WindowLayout) or not layout.is_dense:
        return None
    allowed = (N2N, N2C, C2C) if layout.c2c else (N2N, N2C)
    if any(
        graph[e].edge_index.numel() > 0
        for e in graph.edge_types
        if e not in allowed and KG not in (e[0], e[2])
    ):
        return None
    return layout


def _slots_within_reach(query_slots: list[int], width: int, layers_after: int) -> slice | None:
    """The window slots whose outputs the remaining ``layers_after`` layers read: a slot
    reaches the queries through ``layers_after - 1`` chain steps and then an n2c edge, so
    the slots within that distance of a query slot (:obj:`None` after the last layer,
    whose window outputs reach nothing). Skipping the others is exact, and with
    l = r = 1 it leaves a third of the nbr-side work of the last two layers."""
    if layers_after == 0:
        return None
    reach = layers_after - 1
    return slice(max(0, min(query_slots) - reach), min(width, max(query_slots) + 1 + reach))


def _input_map(width: int, hidden: int, kind: str) -> Module:
    """``"linear"``: a Linear; ``"official"``: Linear + GELU (GNN-LM ``adapt_ws``) only when
    the width differs from ``hidden``, else the identity."""
    if kind == "official":
        return Identity() if width == hidden else Sequential(Linear(width, hidden), GELU())
    return Linear(width, hidden)


class GraphAdapter(Module):
    r"""The GNN-LM graph network: per-type input maps (``nbr`` features plus,
    optionally, their token embeddings), ``num_layers``
    :class:`HeteroGraphAttention` layers (each optionally followed by a
    feed-forward block :math:`\mathbf{x} \leftarrow \mathrm{LayerNorm}(\mathbf{x}
    + \mathrm{Dropout}(\mathrm{FFN}(\mathbf{x})))`), and an output map of the
    ``ctx`` nodes.

    The input and output maps are Linears by default; with
    ``input_maps="official"`` / ``output_map="official"`` they are the official
    GNN-LM ``HGT``'s (Linear + GELU only where a width differs from the hidden
    width, a Linear only where hidden and output widths differ, else the
    identity). With :meth:`AdapterConfig.paper <hetgraph.nn.AdapterConfig.paper>`
    the adapter computes the official ``HGT`` function, and
    :meth:`from_gnnlm_state_dict` / :meth:`to_gnnlm_state_dict` convert official
    checkpoints.

    On graphs whose :attr:`~hetgraph.graph.ContextGraph.layout` is a window
    grid (``"shared"``, one window per distinct retrieved row, or ``"grid"``,
    one per (query, neighbour)) and whose ``c2c`` edges, if any, are the causal
    edges of the builder (``layout.c2c``), the dense masked-attention path runs:
    the windows receive nothing from the ``ctx`` nodes, so their stack runs first
    (:meth:`window_key_values`: ``n2n`` attention once per window), then the ``ctx``
    layers on the keys and values each layer reads from them (:meth:`ctx_forward`,
    :func:`~hetgraph.nn.dense.dense_query_attention`: attention over the gathered
    windows, with ``c2c`` plus causal masked attention over each sequence's ``ctx``
    nodes) — per layer the computation of
    :func:`~hetgraph.nn.dense.dense_window_attention` /
    :func:`~hetgraph.nn.dense.dense_causal_window_attention`. Otherwise the
    edge-list path runs. Both use the same weights and give the same ``ctx`` outputs.

    With a knowledge-graph branch (``config.kg_channels > 0``) the adapter also reads the
    ``kg`` nodes of :func:`~hetgraph.graph.add_kg_nodes`: their features are
    :attr:`kg_in` (a :class:`~hetgraph.nn.KGFactEncoder`, whose embedding tables must be
    set) of each fact's head, relation and tail, and each layer's ``k2c`` (and ``k2n``)
    messages are added through a zero-initialised per-channel gate
    (:class:`HeteroGraphAttention`'s ``gated_relations``), so the untrained branch leaves
    the output bit for bit unchanged. Such an adapter always runs the edge-list path
    (PyG message passing), with or without ``kg`` nodes: the dense path and
    :class:`~hetgraph.NeighbourStates` have no ``kg`` nodes.

    Args:
        config (AdapterConfig): The hyper-parameters.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        config.validate_resolved()
        self.config = config
        h = config.hidden_channels
        self.ctx_in = _input_map(config.ctx_channels, h, config.input_maps)
        # use_n2c=False without k2n: no nbr node reaches anything, so no map for them.
        uses_nbr = config.use_n2c or (config.kg_channels > 0 and config.use_k2n)
        self.nbr_in: Module | None = (
            _input_map(config.nbr_channels, h, config.input_maps) if uses_nbr else None
        )
        self.token_in: Module | None = None
        if config.token_channels > 0 and uses_nbr:
            self.token_in = (
                Identity()
                if config.token_channels == h
                else Linear(config.token_channels, h, bias=False)
            )
        self.kg_in: KGFactEncoder | None = None
        if config.kg_channels > 0:
            self.kg_in = KGFactEncoder(config.kg_channels, h, config.kg_combine)
        metadata = context_graph_metadata(
            config.use_c2c,
            kg=self.kg_in is not None,
            k2n=config.use_k2n,
            k2k=config.use_k2k,
            n2c=config.use_n2c,
        )
        self.node_types = list(metadata[0])
        self.edge_types = list(metadata[1])
        self.convs = ModuleList(
            HeteroGraphAttention(
                h,
                metadata,
                heads=config.heads,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
                normalization=config.normalization,
                out_bias=config.output_bias,
                relation_mean=config.relation_mean,
                relation_names=INTRA_INTER if config.tie_intra else None,
                relation_init=config.relation_init,
                gated_relations=[e for e in (K2C, K2N) if e in metadata[1]],
            )
            for _ in range(config.num_layers)
        )
        self.ffns = ModuleList()
        self.ffn_norms = ModuleList()
        if config.feed_forward:
            ff = config.ff_multiplier * h
            for _ in range(config.num_layers):
                self.ffns.append(
                    ModuleDict(
                        {
                            t: Sequential(
                                Linear(h, ff), GELU(), Dropout(config.dropout), Linear(ff, h)
                            )
                            for t in self.node_types
                        }
                    )
                )
                self.ffn_norms.append(ModuleDict({t: LayerNorm(h) for t in self.node_types}))
        self.out: Module = (
            Identity()
            if config.output_map == "official" and h == config.out_channels
            else Linear(h, config.out_channels)
        )
        self.reset_parameters()

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the adapter computes in (that of its parameters)."""
        return self.convs[0].param_dtype

    @classmethod
    def from_gnnlm_state_dict(
        cls, state_dict: Mapping[str, Tensor], prefix: str = "", **overrides: Any
    ) -> GraphAdapter:
        r"""The paper-mode adapter (:meth:`AdapterConfig.paper
        <hetgraph.nn.AdapterConfig.paper>`) holding an official GNN-LM ``HGT`` state dict
        (:mod:`hetgraph.nn.gnnlm`): widths, layers and heads from the tensors' shapes,
        ``overrides`` for other :class:`~hetgraph.nn.AdapterConfig` fields (``dropout``, …);
        the adapter takes the state dict's dtype. Its forward on a graph built with
        :meth:`GraphConfig.paper() <hetgraph.graph.GraphConfig.paper>`, with ``nbr_x`` the
        stored features of ``graph["nbr"].corpus_id``, equals the official
        ``HGT.forward(graph, {"tgt": ctx_x, "ntgt": nbr_x})["tgt"]``.

        Raises:
            GNNLMStateDictError: a key is missing, unexpected or of the wrong shape.
        """
        adapter = cls(gnnlm_adapter_config(state_dict, prefix, **overrides))
        return load_gnnlm_state_dict(adapter, state_dict, prefix)

    def to_gnnlm_state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        """This adapter's weights with the official GNN-LM module names; see
        :func:`~hetgraph.nn.gnnlm.adapter_to_gnnlm_state_dict`."""
        return adapter_to_gnnlm_state_dict(self, prefix)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # type: ignore[operator]
        if self.config.norm_init != 1.0:  # AdapterConfig.norm_init (our option)
            norms = [conv.norm[t] for conv in self.convs for t in conv.node_types]
            norms += [norm for block in self.ffn_norms for norm in block.values()]
            with torch.no_grad():
                for norm in norms:
                    norm.weight.fill_(float(self.config.norm_init))

    def _feed_forward(self, i: int, node_type: str, x: Tensor) -> Tensor:
        if not self.config.feed_forward:
            return x
        y = F.dropout(self.ffns[i][node_type](x), p=self.config.dropout, training=self.training)
        return self.ffn_norms[i][node_type](x + y)

    def _nbr_inputs(
        self, nbr_x: Tensor, nbr_token_x: Tensor | None, nbr_token_index: Tensor | None
    ) -> Tensor:
        dtype = self.param_dtype
        nbr_h = self.nbr_in(nbr_x.to(dtype))
        if self.token_in is not None:
            if nbr_token_x is None:
                raise ValueError("this adapter adds token embeddings: pass nbr_token_x")
            token_h = self.token_in(nbr_token_x.to(dtype))
            # Distinct tokens mapped once: far fewer rows than nodes (forward and backward).
            nbr_h = nbr_h + (token_h if nbr_token_index is None else token_h[nbr_token_index])
        return nbr_h

    def use_dense(self, graph: HeteroData, path: ComputePath | None = None) -> bool:
        """Whether :meth:`forward` takes the dense path on ``graph``."""
        path = path or self.config.path
        if path == "sparse":
            return False
        # A knowledge-graph branch runs the edge-list path only (kg nodes or not).
        ok = self.kg_in is None and _dense_layout(graph) is not None
        if path == "dense" and not ok:
            raise ValueError(
                "the dense path needs an adapter without a knowledge-graph branch and a graph "
                "from build_context_graph with a window-grid layout (share_windows, not "
                "deduplicate, not batched by PyG) whose c2c edges are the builder's causal "
                "edges"
            )
        return ok

    def forward(
        self,
        graph: HeteroData,
        ctx_x: Tensor,
        nbr_x: Tensor,
        nbr_token_x: Tensor | None = None,
        *,
        nbr_token_index: Tensor | None = None,
        nbr_index: Tensor | None = None,
        path: ComputePath | None = None,
        return_attention_weights: bool = False,
    ) -> Tensor | tuple[Tensor, list[AttentionDict]]:
        r"""Runs the adapter.

        Args:
            graph (HeteroData): A graph from :func:`~hetgraph.graph.build_context_graph`.
            ctx_x (torch.Tensor): :math:`[N_{ctx}, F_{ctx}]` query features.
            nbr_x (torch.Tensor): :math:`[N_{nbr}, F_{nbr}]` neighbour features.
            nbr_token_x (torch.Tensor, optional): :math:`[N_{nbr}, F_{tok}]`
                token embeddings of the neighbour tokens (with
                :obj:`nbr_token_index`, :math:`[N_{tok}, F_{tok}]`: one row per distinct
                token).
            nbr_token_index (torch.Tensor, optional): :math:`[N_{nbr}]` the row of
                :obj:`nbr_token_x` of each nbr node (with :obj:`nbr_index`, of each row
                of :obj:`nbr_x`), when it holds each distinct token once (their maps are
                then computed once per token).
            nbr_index (torch.Tensor, optional): :math:`[N_{nbr}]` the row of
                :obj:`nbr_x` of each nbr node, when :obj:`nbr_x` (and
                :obj:`nbr_token_x`) hold each distinct corpus row once,
                :math:`[R, F_{nbr}]`: a row's input maps, and on the dense path its
                first-layer keys and values, are then computed once, however many
                windows share it.
            path (str, optional): Override :obj:`config.path`.
            return_attention_weights (bool, optional): Also return each
                layer's attention coefficients per edge type (forces the
                edge-list path). Per-edge ``n2c`` weights map back to each
                query's neighbour slots through ``graph['n2c'].nbr_slot`` /
                ``window_slot``, see :func:`~hetgraph.graph.n2c_to_dense`.

        :rtype: :class:`torch.Tensor` :math:`[N_{ctx}, F_{out}]` in the dtype
            of :obj:`ctx_x`, optionally with a list of per-layer attention dicts.
        """
        ctx_h = self.ctx_in(ctx_x.to(self.param_dtype))
        nbr_h = None  # use_n2c=False without k2n: the knowledge graph alone
        if self.nbr_in is not None:
            nbr_h = self._nbr_inputs(nbr_x, nbr_token_x, nbr_token_index)
        if not return_attention_weights and self.use_dense(graph, path):
            return self.out(self._forward_dense(graph, ctx_h, nbr_h, nbr_index)).to(ctx_x.dtype)
        if nbr_h is not None and nbr_index is not None:
            nbr_h = nbr_h.index_select(0, nbr_index)
        ctx_h, attentions = self._forward_edges(graph, ctx_h, nbr_h, return_attention_weights)
        out = self.out(ctx_h).to(ctx_x.dtype)
        return (out, attentions) if return_attention_weights else out

    def _window_grid(
        self, graph: HeteroData, nbr_h: Tensor | None, nbr_index: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """The ``[U, W, F]`` grid of the nbr nodes' states (empty slots zero; :obj:`None`
        without ``nbr_h``), its ``[U, W]`` mask of the slots that hold a node and, with
        ``nbr_index`` (``nbr_h`` one row per distinct corpus row), the ``[U, W]`` rows of
        ``[nbr_h; 0]`` the grid is made of (empty slots: the appended zero row), else
        :obj:`None`."""
        layout = graph.layout
        U, W = layout.num_windows, layout.window
        grid_index = graph[NBR].grid_index
        mask = torch.zeros(U * W, dtype=torch.bool, device=grid_index.device)
        mask[grid_index] = True
        if nbr_h is None:
            return None, mask.view(U, W), None
        F_ = nbr_h.size(-1)
        if nbr_index is None:
            windows = nbr_h.new_zeros(U * W, F_).index_copy(0, grid_index, nbr_h)
            return windows.view(U, W, F_), mask.view(U, W), None
        R = nbr_h.size(0)
        slot_rows = torch.full((U * W,), R, dtype=torch.long, device=grid_index.device)
        slot_rows[grid_index] = nbr_index
        rows = torch.cat([nbr_h, nbr_h.new_zeros(1, F_)])
        slot_rows = slot_rows.view(U, W)
        windows = rows.index_select(0, slot_rows.view(-1)).view(U, W, F_)
        return windows, mask.view(U, W), (rows, slot_rows)

    def _causal_layout(self, graph: HeteroData) -> CausalLayout | None:
        layout = graph.layout
        if C2C in self.edge_types and layout.c2c and graph[C2C].edge_index.numel() > 0:
            return causal_layout(graph[CTX].batch_index, graph[CTX].seq_index, layout.c2c_window)
        return None

    def _forward_dense(
        self, graph: HeteroData, ctx_h: Tensor, nbr_h: Tensor, nbr_index: Tensor | None = None
    ) -> Tensor:
        # The windows receive nothing from the queries: run their stack first, then the
        # queries' layers on what each layer reads from them (the same functions the
        # neighbour-state table is built and read with).
        return self._ctx_layers(graph, ctx_h, self._window_layers(graph, nbr_h, nbr_index))

    def _window_layers(
        self, graph: HeteroData, nbr_h: Tensor, nbr_index: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        windows, mask, by_row = self._window_grid(graph, nbr_h, nbr_index)
        query_slots = list(graph.layout.query_slots)
        key_values = []
        for i, conv in enumerate(self.convs):
            # Only the slots whose outputs later layers read are updated (none in the last).
            keep = _slots_within_reach(query_slots, mask.size(1), len(self.convs) - 1 - i)
            if i == 0 and by_row is not None:  # first layer: maps once per distinct row
                qkv = window_layer_inputs(
                    conv, NBR, by_row[0], N2N, keep is not None, keep, by_row[1]
                )
            else:
                qkv = window_layer_inputs(conv, NBR, windows, N2N, keep is not None, keep)
            slots = slot_index(query_slots, mask.size(1), mask.device)
            key_values.append(slot_keys_values(conv, NBR, windows, slots, qkv))
            if qkv is not None:
                relation = N2N if N2N in conv.edge_types else None
                windows = window_outputs(conv, NBR, windows, qkv, mask, relation, keep)
                windows = self._feed_forward(i, NBR, windows)
                mask = mask[:, keep]
                query_slots = [j - keep.start for j in query_slots]
        return key_values

    def _ctx_layers(
        self, graph: HeteroData, ctx_h: Tensor, key_values: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        _, mask, _ = self._window_grid(graph, None)
        slot_mask = mask[:, list(graph.layout.query_slots)]
        causal = self._causal_layout(graph)
        for i, conv in enumerate(self.convs):
            ctx_h = dense_query_attention(
                conv, ctx_h, key_values[i], slot_mask, graph[CTX].nbr_window, N2C, C2C, causal
            )
            ctx_h = self._feed_forward(i, CTX, ctx_h)
        return ctx_h

    def _require_dense(self, graph: HeteroData) -> None:
        if not self.use_dense(graph, "auto"):
            raise ValueError(
                "window key/values need an adapter without a knowledge-graph branch and a "
                "graph with a window-grid layout (build_context_graph with share_windows or "
                "the official grid, not deduplicate, not batched by PyG)"
            )

    def window_key_values(
        self,
        graph: HeteroData,
        nbr_x: Tensor,
        nbr_token_x: Tensor | None = None,
        nbr_token_index: Tensor | None = None,
        nbr_index: Tensor | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        r"""What each layer's ``ctx`` nodes read from the windows: per layer, the keys and
        values :math:`[U, S, H d_k]` of the :math:`S` query-linked slots
        (``graph.layout.query_slots``) of every window.

        The windows receive nothing from the ``ctx`` nodes, so these depend on the
        windows alone: a window's are the same whichever queries retrieve it (the
        basis of :class:`~hetgraph.NeighbourStates`). :meth:`forward`'s dense path is
        :meth:`ctx_forward` of these. The inputs are :meth:`forward`'s.

        Raises:
            ValueError: if ``graph`` has no window grid (see :meth:`use_dense`).
        """
        self._require_dense(graph)
        nbr_h = self._nbr_inputs(nbr_x, nbr_token_x, nbr_token_index)
        return self._window_layers(graph, nbr_h, nbr_index)

    def ctx_forward(
        self, graph: HeteroData, ctx_x: Tensor, window_key_values: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        r"""The adapter's output :math:`[N_{ctx}, F_{out}]` from the ``ctx`` features and
        the windows' per-layer keys and values (:meth:`window_key_values`, or rows of a
        :class:`~hetgraph.NeighbourStates`): the nbr side is not computed.

        Raises:
            ValueError: if ``graph`` has no window grid, or there are not one pair of
                keys and values per layer.
        """
        self._require_dense(graph)
        if len(window_key_values) != len(self.convs):
            raise ValueError(
                f"window_key_values has {len(window_key_values)} layers, the "
                f"adapter {len(self.convs)}"
            )
        ctx_h = self.ctx_in(ctx_x.to(self.param_dtype))
        return self.out(self._ctx_layers(graph, ctx_h, window_key_values)).to(ctx_x.dtype)

    def _forward_edges(
        self,
        graph: HeteroData,
        ctx_h: Tensor,
        nbr_h: Tensor | None,
        return_attention_weights: bool,
    ) -> tuple[Tensor, list[AttentionDict]]:
        edge_index_dict = {e: graph[e].edge_index for e in self.edge_types if e in graph.edge_types}
        x_dict = {CTX: ctx_h} if nbr_h is None else {CTX: ctx_h, NBR: nbr_h}
        if self.kg_in is not None and KG in graph.node_types:
            store = graph[KG]
            x_dict[KG] = (
                self.kg_in(store.head, store.relation, store.tail).to(self.param_dtype)
                if store.num_nodes
                else ctx_h.new_zeros(0, ctx_h.size(-1))
            )
        attentions: list[AttentionDict] = []
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            if return_attention_weights:
                x_dict, attn = conv(x_dict, edge_index_dict, return_attention_weights=True)
                attentions.append(attn)
            else:
                # The last layer's nbr outputs reach nothing: drop the edges into nbr nodes.
                edges = {e: ei for e, ei in edge_index_dict.items() if i < last or e[2] == CTX}
                x_dict = conv(x_dict, edges)
            x_dict = {
                t: self._feed_forward(i, t, x) for t, x in x_dict.items() if i < last or t == CTX
            }
        return x_dict[CTX], attentions

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{self.__class__.__name__}(ctx={c.ctx_channels}, nbr={c.nbr_channels}, "
            f"token={c.token_channels}, hidden={c.hidden_channels}, out={c.out_channels}, "
            f"layers={c.num_layers}, heads={c.heads}, "
            f"normalization={c.normalization!r}, c2c={c.use_c2c}"
            + ("" if c.use_n2c else ", n2c=False")
            + (f", kg={c.kg_channels})" if c.kg_channels else ")")
        )
