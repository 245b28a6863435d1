"""The context graph data class and the maps from its nodes and edges back to the queries."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from hetgraph.graph.config import CTX, N2C, NBR
from hetgraph.graph.layout import WindowLayout


class ContextGraph(HeteroData):
    r"""The :class:`~torch_geometric.data.HeteroData` returned by
    :func:`~hetgraph.graph.build_context_graph`, with a typed :attr:`layout`.

    :meth:`~torch_geometric.data.Batch.from_data_list` works on it: it offsets
    the ``batch_index`` attributes by the number of sequences of each graph
    (PyG's default, ``max + 1``, fails on empty tensors and would offset
    ``ctx`` and ``nbr`` differently), and the batch's :attr:`layout` is
    ``"irregular"`` (see :meth:`WindowLayout.batched`), so that only the
    edge-list path runs on it.

    Attributes set by the builder:

    * ``graph['ctx'].batch_index``, ``graph['ctx'].seq_index``: ``[num_ctx]``
      int64 position of each ``ctx`` node in ``[B, T]`` (row-major order);
    * ``graph['nbr'].corpus_id``, ``graph['nbr'].token_id``,
      ``graph['nbr'].batch_index``: ``[num_nbr]`` int64;
    * ``graph.layout``: the :class:`WindowLayout` (``"shared"`` with
      ``config.share_windows``, the default: one window per distinct
      retrieved row, nodes in (row, offset) order and
      ``graph['nbr'].batch_index`` the first sequence that retrieved the
      row; ``"grid"``: one window per (query, neighbour slot), the official
      layout; ``"irregular"`` with ``deduplicate``), and for the first two
      the window index tensors ``graph['nbr'].grid_index`` and
      ``graph['ctx'].nbr_window``;
    * ``graph['n2c'].nbr_slot`` and ``graph['n2c'].window_slot`` (not with
      ``deduplicate``): ``[num_n2c]`` int64, the neighbour slot ``k`` and
      window offset ``j`` (``0 .. W-1``, ``left`` = retrieved token) of
      each ``n2c`` edge; with its ``ctx`` node (``edge_index[1]``) they
      map per-edge values such as attention weights back to the query's
      retrieved neighbours (see :func:`n2c_to_dense`). ``n2c`` edges are
      ordered by (ctx, k, j) in every layout, so shared and unshared
      graphs list them in the same order;
    * ``graph.query_shape``: ``(B, T)``.

    :func:`~hetgraph.graph.add_kg_nodes` adds the ``kg`` node type (knowledge-graph facts:
    ``graph['kg'].batch_index``, ``triple``, ``head``, ``relation``, ``tail``) and the
    ``k2c`` / ``k2n`` / ``k2k`` edges; the builder itself never does.
    """

    @property
    def layout(self) -> WindowLayout:
        """The :class:`~hetgraph.graph.WindowLayout` of the ``nbr`` windows.

        Stored as the graph attribute ``layout`` (set it with ``graph.layout =
        ...``, e.g. ``graph.layout.as_irregular()`` after re-numbering nodes);
        a batch of graphs, whose attribute is the list of its graphs' layouts,
        reads as their :meth:`~WindowLayout.batched` layout.
        """
        stored = self._global_store.get("layout")
        if isinstance(stored, WindowLayout):
            return stored
        if (
            isinstance(stored, (list, tuple))
            and stored
            and all(isinstance(x, WindowLayout) for x in stored)
        ):
            return WindowLayout.batched(stored)
        raise AttributeError(
            f"this graph has no window layout (got {stored!r}); build it with build_context_graph"
        )

    def __inc__(self, key: str, value: Any, store: Any = None, *args: Any, **kwargs: Any) -> Any:
        if key == "batch_index":
            return int(self.query_shape[0])
        return super().__inc__(key, value, store, *args, **kwargs)


def ctx_to_dense(graph: HeteroData, x: Tensor, fill_value: float = 0.0) -> Tensor:
    """Scatters ``ctx`` node outputs ``[num_ctx, *]`` back to ``[B, T, *]``
    (positions that are not ``ctx`` nodes get ``fill_value``)."""
    B, T = graph.query_shape
    out = x.new_full((B, T, *x.shape[1:]), fill_value)
    out[graph[CTX].batch_index, graph[CTX].seq_index] = x
    return out


def n2c_to_dense(graph: ContextGraph, values: Tensor, fill_value: float = 0.0) -> Tensor:
    """Scatters per-``n2c``-edge values ``[num_n2c, *]`` (e.g. the attention
    weights returned with ``return_attention_weights=True``) to
    ``[num_ctx, k, W, *]`` by (ctx node, neighbour slot, window offset);
    slots without an edge get ``fill_value``. With ``n2c="center"`` only
    offset ``graph.layout.center`` is filled. Needs a graph built without
    ``deduplicate``."""
    store = graph[N2C]
    if "nbr_slot" not in store:
        raise ValueError(
            "this graph has no per-edge neighbour slots (built with deduplicate=True?)"
        )
    layout = graph.layout
    C = graph[CTX].num_nodes
    out = values.new_full((C, layout.k, layout.window, *values.shape[1:]), fill_value)
    out[store.edge_index[1], store.nbr_slot, store.window_slot] = values
    return out


def window_rows(graph: ContextGraph) -> Tensor:
    """The datastore row each window of a window-grid graph is centred on, ``[num_windows]``
    int64 (``-1``: a window without nodes, e.g. a dropped neighbour's in the ``"grid"``
    layout). A window's nodes are the rows around its centre, so this row decides them.

    Raises:
        ValueError: if ``graph`` has no window grid (``"irregular"`` layout).
    """
    layout = graph.layout
    if not layout.is_dense:
        raise ValueError("an irregular graph (deduplicate, or batched by PyG) has no windows")
    grid_index = graph[NBR].grid_index
    centre = grid_index % layout.window == layout.center
    rows = torch.full((layout.num_windows,), -1, dtype=torch.long, device=grid_index.device)
    rows[grid_index[centre] // layout.window] = graph[NBR].corpus_id[centre]
    return rows
