"""The GNN-LM adapter: input projections, a stack of hetero attention layers, output projection."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import GELU, Dropout, Identity, LayerNorm, Linear, Module, ModuleList, Sequential
from torch_geometric.data import HeteroData
from torch_geometric.nn.module_dict import ModuleDict

from hetgraph.graph.builder import SHARED_LAYOUT, is_grid_graph
from hetgraph.graph.config import CTX, NBR, context_graph_metadata
from hetgraph.nn.config import AdapterConfig, ComputePath
from hetgraph.nn.conv import AttentionDict, HeteroGraphAttention


class GraphAdapter(Module):
    r"""The GNN-LM graph network: per-type input projections (``nbr`` features
    plus, optionally, their token embeddings), ``num_layers``
    :class:`HeteroGraphAttention` layers (each optionally followed by a
    feed-forward block :math:`\mathbf{x} \leftarrow \mathrm{LayerNorm}(\mathbf{x}
    + \mathrm{Dropout}(\mathrm{FFN}(\mathbf{x})))`), and an output projection
    of the ``ctx`` nodes.

    On graphs with one of the regular window layouts (see
    :func:`~hetgraph.graph.build_context_graph`: ``"shared"``, one window per
    distinct retrieved row, or ``"grid"``, one per (query, neighbour)) and no
    causal edges, the dense masked-attention path is used (``n2n`` attention
    once per window, ``ctx`` attention over the gathered windows); otherwise
    the edge-list path. Both give the same ``ctx`` outputs.

    Args:
        config (AdapterConfig): The hyper-parameters.
    """

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_channels
        assert h is not None and config.out_channels is not None
        self.ctx_in = Linear(config.ctx_channels, h)
        self.nbr_in = Linear(config.nbr_channels, h)
        self.token_in: Module | None = None
        if config.token_channels > 0:
            self.token_in = Identity() if config.token_channels == h else Linear(config.token_channels, h, bias=False)
        metadata = context_graph_metadata(config.use_c2c)
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
                            t: Sequential(Linear(h, ff), GELU(), Dropout(config.dropout), Linear(ff, h))
                            for t in self.node_types
                        }
                    )
                )
                self.ffn_norms.append(ModuleDict({t: LayerNorm(h) for t in self.node_types}))
        self.out = Linear(h, config.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()  # type: ignore[operator]

    def _feed_forward(self, i: int, node_type: str, x: Tensor) -> Tensor:
        if not self.config.feed_forward:
            return x
        y = F.dropout(self.ffns[i][node_type](x), p=self.config.dropout, training=self.training)
        return self.ffn_norms[i][node_type](x + y)

    def _inputs(self, ctx_x: Tensor, nbr_x: Tensor, nbr_token_x: Tensor | None) -> tuple[Tensor, Tensor]:
        dtype = self.out.weight.dtype
        ctx_h = self.ctx_in(ctx_x.to(dtype))
        nbr_h = self.nbr_in(nbr_x.to(dtype))
        if self.token_in is not None:
            if nbr_token_x is None:
                raise ValueError("this adapter adds token embeddings: pass nbr_token_x")
            nbr_h = nbr_h + self.token_in(nbr_token_x.to(dtype))
        return ctx_h, nbr_h

    def use_dense(self, graph: HeteroData, path: ComputePath | None = None) -> bool:
        """Whether :meth:`forward` takes the dense path on ``graph``."""
        path = path or self.config.path
        if path == "sparse":
            return False
        ok = is_grid_graph(graph)
        if path == "dense" and not ok:
            raise ValueError("the dense path needs a graph with the grid layout and no c2c edges")
        return ok

    def forward(
        self,
        graph: HeteroData,
        ctx_x: Tensor,
        nbr_x: Tensor,
        nbr_token_x: Tensor | None = None,
        *,
        path: ComputePath | None = None,
        return_attention_weights: bool = False,
    ) -> Tensor | tuple[Tensor, list[AttentionDict]]:
        r"""Runs the adapter.

        Args:
            graph (HeteroData): A graph from :func:`~hetgraph.graph.build_context_graph`.
            ctx_x (torch.Tensor): :math:`[N_{ctx}, F_{ctx}]` query features.
            nbr_x (torch.Tensor): :math:`[N_{nbr}, F_{nbr}]` neighbour features.
            nbr_token_x (torch.Tensor, optional): :math:`[N_{nbr}, F_{tok}]`
                token embeddings of the neighbour tokens.
            path (str, optional): Override :obj:`config.path`.
            return_attention_weights (bool, optional): Also return each
                layer's attention coefficients per edge type (forces the
                edge-list path). Per-edge ``n2c`` weights map back to each
                query's neighbour slots through ``graph['n2c'].nbr_slot`` /
                ``window_slot``, see :func:`~hetgraph.graph.n2c_to_dense`.

        :rtype: :class:`torch.Tensor` :math:`[N_{ctx}, F_{out}]` in the dtype
            of :obj:`ctx_x`, optionally with a list of per-layer attention dicts.
        """
        ctx_h, nbr_h = self._inputs(ctx_x, nbr_x, nbr_token_x)
        if not return_attention_weights and self.use_dense(graph, path):
            C, K, W = ctx_h.size(0), int(graph.grid_k), int(graph.grid_w)
            grid_index = graph[NBR].grid_index
            if graph.layout == SHARED_LAYOUT:
                # One [W]-slot window per distinct retrieved row; ctx nodes gather theirs.
                window = graph[CTX].nbr_window
                shape = (int(graph.num_windows), W)
            else:
                window, shape = None, (C, K, W)
            # Scatter nbr nodes into their slots; empty slots stay zero and masked.
            num_slots = math.prod(shape)
            grid = nbr_h.new_zeros(num_slots, nbr_h.size(-1)).index_copy(0, grid_index, nbr_h)
            grid = grid.view(shape + (nbr_h.size(-1),))
            mask = torch.zeros(num_slots, dtype=torch.bool, device=grid.device)
            mask[grid_index] = True
            mask = mask.view(shape)
            last = len(self.convs) - 1
            for i, conv in enumerate(self.convs):
                # The last layer's nbr outputs reach nothing: skip their attention.
                ctx_h, grid = conv.forward_grid(
                    ctx_h, grid, mask, graph.n2c_mode, int(graph.grid_center), update_nbr=i < last, window=window
                )
                ctx_h = self._feed_forward(i, CTX, ctx_h)
                if i < last:
                    grid = self._feed_forward(i, NBR, grid)
            return self.out(ctx_h).to(ctx_x.dtype)

        edge_index_dict = {e: graph[e].edge_index for e in self.edge_types if e in graph.edge_types}
        x_dict = {CTX: ctx_h, NBR: nbr_h}
        attentions: list[AttentionDict] = []
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            edges = edge_index_dict
            if i == last and not return_attention_weights:
                # The last layer's nbr outputs reach nothing: drop the edges into nbr nodes.
                edges = {e: ei for e, ei in edge_index_dict.items() if e[2] == CTX}
            if return_attention_weights:
                x_dict, attn = conv(x_dict, edges, return_attention_weights=True)
                attentions.append(attn)
            else:
                x_dict = conv(x_dict, edges)
            x_dict = {t: self._feed_forward(i, t, x) for t, x in x_dict.items() if i < last or t == CTX}
        out = self.out(x_dict[CTX]).to(ctx_x.dtype)
        if return_attention_weights:
            return out, attentions
        return out

    def __repr__(self) -> str:
        c = self.config
        return (
            f"{self.__class__.__name__}(ctx={c.ctx_channels}, nbr={c.nbr_channels}, token={c.token_channels}, "
            f"hidden={c.hidden_channels}, out={c.out_channels}, layers={c.num_layers}, heads={c.heads}, "
            f"normalization={c.normalization!r}, c2c={c.use_c2c})"
        )
