"""Vectorised construction of the batched GNN-LM context graph."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from hetgraph.graph.config import C2C, CTX, N2C, N2N, NBR, GraphConfig

#: Value of ``graph.layout`` when the dense fast path applies.
GRID_LAYOUT = "grid"
#: Value of ``graph.layout`` when only the edge-list path applies.
IRREGULAR_LAYOUT = "irregular"


class ContextGraph(HeteroData):
    r"""The :class:`~torch_geometric.data.HeteroData` returned by
    :func:`build_context_graph`. It only changes how
    :meth:`~torch_geometric.data.Batch.from_data_list` offsets the
    ``batch_index`` attributes: by the number of sequences of each graph
    (PyG's default, ``max + 1``, fails on empty tensors and would offset
    ``ctx`` and ``nbr`` differently). A batched graph is never ``"grid"``.
    """

    def __inc__(self, key: str, value: Any, store: Any = None, *args: Any, **kwargs: Any) -> Any:
        if key == "batch_index":
            return int(self.query_shape[0])
        return super().__inc__(key, value, store, *args, **kwargs)


def _as_tensor(x: Tensor | np.ndarray | Any) -> Tensor:
    # Datastore arrays are numpy memmaps; avoid a copy where torch can share memory.
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _empty_edges(device: torch.device) -> Tensor:
    return torch.empty(2, 0, dtype=torch.long, device=device)


def _unique_edges(src: Tensor, dst: Tensor, num_src: int) -> Tensor:
    # Coalesce duplicate (src, dst) pairs; result sorted by (dst, src).
    key = torch.unique(dst * num_src + src)
    return torch.stack([key % num_src, key // num_src])


def build_context_graph(
    neighbour_ids: Tensor,
    corpus_tokens: Tensor,
    corpus_doc_ids: Tensor,
    config: GraphConfig,
    query_positions: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> ContextGraph:
    r"""Builds one batched heterogeneous context graph (GNN-LM, `Meng et al.
    <https://arxiv.org/abs/2110.08743>`_) for a batch of query positions.

    Every query position becomes a ``ctx`` node; every corpus token of the
    window :math:`[o - l, o + r]` around each retrieved datastore row :math:`o`
    becomes an ``nbr`` node (windows are clipped at document boundaries and at
    the corpus ends). Edge types ``('nbr', 'n2n', 'nbr')``,
    ``('nbr', 'n2c', 'ctx')`` and ``('ctx', 'c2c', 'ctx')`` are always present
    (empty ``[2, 0]`` int64 tensors where unused). Fully vectorised: no Python
    loop over tokens, neighbours or sequences.

    Args:
        neighbour_ids: ``[B, T, k]`` int datastore rows retrieved for each
            position; ``-1`` marks a missing neighbour (creates no node).
        corpus_tokens: ``[N]`` token id of every datastore row.
        corpus_doc_ids: ``[N]`` document id of every datastore row.
        config: The :class:`GraphConfig`.
        query_positions: ``[B, T]`` datastore row of each query position when
            the query text is itself in the datastore (``-1`` otherwise).
            Neighbours ``o`` of the same document with
            ``|query_pos - o| < config.leakage_radius`` are dropped.
        query_mask: ``[B, T]`` bool; only positions where it is ``True``
            become ``ctx`` nodes.

    Returns:
        A :class:`ContextGraph` (a :class:`~torch_geometric.data.HeteroData`) with

        * ``graph['ctx'].batch_index``, ``graph['ctx'].seq_index``: ``[num_ctx]``
          int64 position of each ``ctx`` node in ``[B, T]`` (row-major order);
        * ``graph['nbr'].corpus_id``, ``graph['nbr'].token_id``,
          ``graph['nbr'].batch_index``: ``[num_nbr]`` int64;
        * ``graph.layout``: ``"grid"`` when every ``nbr`` node has its own
          slot in a ``[num_ctx, k, W]`` grid (no de-duplication), stored in
          ``graph['nbr'].grid_index`` (flat slot index), with ``graph.grid_k``,
          ``graph.grid_w``, ``graph.grid_center`` and ``graph.n2c_mode``; this
          is what the dense fast path of :class:`~hetgraph.nn.GraphAdapter`
          uses. Otherwise ``"irregular"``;
        * ``graph.query_shape``: ``(B, T)``.
    """
    if neighbour_ids.dim() != 3:
        raise ValueError(f"neighbour_ids must be [B, T, k] (got shape {tuple(neighbour_ids.shape)})")
    device = neighbour_ids.device
    B, T, K = neighbour_ids.shape
    tokens = _as_tensor(corpus_tokens)
    docs = _as_tensor(corpus_doc_ids)
    N = docs.numel()
    if tokens.numel() != N:
        raise ValueError(f"corpus_tokens ({tokens.numel()}) and corpus_doc_ids ({N}) differ in length")
    l, r, W = config.left, config.right, config.window_size

    def lookup(table: Tensor, index: Tensor) -> Tensor:
        # The corpus may live on another device (CPU memmap) than the queries.
        return table[index.to(table.device)].to(device=device, dtype=torch.long)

    # ---- ctx nodes: row-major (b, t), so each sequence's nodes are contiguous and sorted.
    if query_mask is None:
        ctx_b = torch.arange(B, device=device).repeat_interleave(T)
        ctx_t = torch.arange(T, device=device).repeat(B)
    else:
        if query_mask.shape != (B, T):
            raise ValueError(f"query_mask must be [B, T] = {(B, T)} (got {tuple(query_mask.shape)})")
        ctx_b, ctx_t = query_mask.to(device).nonzero(as_tuple=True)
    C = ctx_b.numel()

    # ---- retrieved centres [C, k] and validity.
    centre = neighbour_ids[ctx_b, ctx_t].long()
    valid = centre >= 0
    if C > 0 and K > 0 and int(centre.max()) >= N:
        raise ValueError(f"neighbour id {int(centre.max())} out of range for a corpus of {N} rows")
    centre = centre.clamp(min=0)
    centre_doc = lookup(docs, centre)
    if query_positions is not None and config.leakage_radius > 0:
        if query_positions.shape != (B, T):
            raise ValueError(f"query_positions must be [B, T] = {(B, T)}")
        qpos = query_positions.to(device)[ctx_b, ctx_t].long()
        in_store = qpos >= 0
        qdoc = lookup(docs, qpos.clamp(min=0, max=max(N - 1, 0)))
        leak = (
            in_store[:, None]
            & (qdoc[:, None] == centre_doc)
            & ((qpos[:, None] - centre).abs() < config.leakage_radius)
        )
        valid = valid & ~leak

    # ---- window slots [C, k, W]: valid when the centre is, inside the corpus and its document.
    offsets = torch.arange(-l, r + 1, device=device)
    pos = centre[..., None] + offsets
    in_corpus = (pos >= 0) & (pos < N)
    pos = pos.clamp(0, max(N - 1, 0))
    slot_valid = valid[..., None] & in_corpus & (lookup(docs, pos) == centre_doc[..., None])

    node_grid = torch.full((C, K, W), -1, dtype=torch.long, device=device)
    if config.deduplicate:
        # One node per (sequence, corpus row): key = b * N + row.
        slot_b = ctx_b.view(C, 1, 1).expand(C, K, W)
        keys = slot_b[slot_valid] * N + pos[slot_valid]
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        node_grid[slot_valid] = inverse
        corpus_id = unique_keys % N
        nbr_batch = unique_keys // N
        grid_index = None
    else:
        grid_index = slot_valid.view(-1).nonzero().view(-1)
        node_grid.view(-1)[grid_index] = torch.arange(grid_index.numel(), device=device)
        corpus_id = pos.view(-1)[grid_index]
        nbr_batch = ctx_b[grid_index // (K * W)]
    M = corpus_id.numel()

    # ---- n2n: self-loops + adjacent slots of one window, both directions.
    a, b = node_grid[..., :-1], node_grid[..., 1:]
    adjacent = (a >= 0) & (b >= 0)
    a, b = a[adjacent], b[adjacent]
    loops = torch.arange(M, device=device)
    n2n_src = torch.cat([loops, a, b])
    n2n_dst = torch.cat([loops, b, a])

    # ---- n2c: retrieved centre (or whole window) -> query.
    ctx_of_slot = torch.arange(C, device=device).view(C, 1, 1).expand(C, K, W)
    if config.n2c == "center":
        n2c_mask = slot_valid[..., l]
        n2c_src = node_grid[..., l][n2c_mask]
        n2c_dst = ctx_of_slot[..., l][n2c_mask]
    else:
        n2c_src = node_grid[slot_valid]
        n2c_dst = ctx_of_slot[slot_valid]

    if config.deduplicate:
        # Overlapping windows and repeated retrievals yield the same edge more than once.
        n2n = _unique_edges(n2n_src, n2n_dst, M)
        n2c = _unique_edges(n2c_src, n2c_dst, M)
    else:
        n2n = torch.stack([n2n_src, n2n_dst])
        n2c = torch.stack([n2c_src, n2c_dst])

    # ---- c2c: for node v the sources form the contiguous id range [lo_v, v] of its sequence.
    if config.c2c and C > 0:
        order_key = ctx_b * T + ctx_t  # sorted ascending
        if config.c2c_window is None:
            first_t = torch.zeros_like(ctx_t)
        else:
            first_t = ctx_t - config.c2c_window + 1
        lo = torch.searchsorted(order_key, ctx_b * T + first_t.clamp(min=0))
        v = torch.arange(C, device=device)
        counts = v - lo + 1
        c2c_dst = v.repeat_interleave(counts)
        starts = torch.cumsum(counts, 0) - counts
        c2c_src = lo[c2c_dst] + torch.arange(c2c_dst.numel(), device=device) - starts[c2c_dst]
        c2c = torch.stack([c2c_src, c2c_dst])
    else:
        c2c = _empty_edges(device)

    graph = ContextGraph()
    graph[CTX].num_nodes = C
    graph[CTX].batch_index = ctx_b.long()
    graph[CTX].seq_index = ctx_t.long()
    graph[NBR].num_nodes = M
    graph[NBR].corpus_id = corpus_id
    graph[NBR].token_id = lookup(tokens, corpus_id)
    graph[NBR].batch_index = nbr_batch
    graph[N2N].edge_index = n2n
    graph[N2C].edge_index = n2c
    graph[C2C].edge_index = c2c
    graph.query_shape = (B, T)
    graph.n2c_mode = config.n2c
    if grid_index is not None:
        graph.layout = GRID_LAYOUT
        graph[NBR].grid_index = grid_index
        graph.grid_k, graph.grid_w, graph.grid_center = K, W, l
    else:
        graph.layout = IRREGULAR_LAYOUT
    return graph


def is_grid_graph(graph: HeteroData) -> bool:
    """Whether ``graph`` has the regular ``[num_ctx, k, W]`` layout and no causal
    context edges, i.e. whether the dense fast path reproduces it exactly."""
    if getattr(graph, "layout", None) != GRID_LAYOUT:
        return False
    if C2C in graph.edge_types and graph[C2C].edge_index.numel() > 0:
        return False
    return True


def ctx_to_dense(graph: HeteroData, x: Tensor, fill_value: float = 0.0) -> Tensor:
    """Scatters ``ctx`` node outputs ``[num_ctx, *]`` back to ``[B, T, *]``
    (positions that are not ``ctx`` nodes get ``fill_value``)."""
    B, T = graph.query_shape
    out = x.new_full((B, T) + tuple(x.shape[1:]), fill_value)
    out[graph[CTX].batch_index, graph[CTX].seq_index] = x
    return out
