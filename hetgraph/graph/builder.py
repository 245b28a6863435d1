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
#: Value of ``graph.layout`` for the dense path over shared windows (``share_windows``).
SHARED_LAYOUT = "shared"
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


def leakage_mask(neighbour_ids: Tensor, query_positions: Tensor, corpus_doc_ids: Tensor | np.ndarray,
                 radius: int) -> Tensor:
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
    docs = _as_tensor(corpus_doc_ids)
    n = docs.shape[0]
    rows = neighbour_ids.long()
    own = query_positions.long().to(rows.device)[:, None]
    doc_of = lambda ids: docs[ids.clamp(min=0, max=max(n - 1, 0)).to(docs.device)].to(rows.device)  # noqa: E731
    return (rows >= 0) & (own >= 0) & (doc_of(own) == doc_of(rows)) & ((own - rows).abs() < radius)


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
        * ``graph.layout`` and the dense-path metadata:

          - ``"shared"`` (``config.share_windows``, the default): one window
            per distinct retrieved row of the batch; ``nbr`` nodes are ordered
            by (row, offset) and ``graph['nbr'].grid_index`` is each node's flat
            slot in a ``[graph.num_windows, W]`` grid;
            ``graph['ctx'].nbr_window`` (``[num_ctx, k]`` int64) is the window
            of each query's ``k``-th neighbour (``-1``: missing or dropped).
            ``graph['nbr'].batch_index`` is then the first sequence that
            retrieved the window.
          - ``"grid"`` (``share_windows=False``, the official layout): every
            ``nbr`` node has its own slot in a ``[num_ctx, k, W]`` grid,
            stored as the flat slot index ``graph['nbr'].grid_index``.
          - ``"irregular"`` (``deduplicate``): only the edge-list path applies.

          Both grid layouts also set ``graph.grid_k``, ``graph.grid_w``,
          ``graph.grid_center`` (``left``); every graph has ``graph.n2c_mode``;

        * ``graph['n2c'].nbr_slot`` and ``graph['n2c'].window_slot`` (not with
          ``deduplicate``): ``[num_n2c]`` int64, the neighbour slot ``k`` and
          window offset ``j`` (``0 .. W-1``, ``left`` = retrieved token) of
          each ``n2c`` edge; with its ``ctx`` node (``edge_index[1]``) they
          map per-edge values such as attention weights back to the query's
          retrieved neighbours (see :func:`n2c_to_dense`). ``n2c`` edges are
          ordered by (ctx, k, j) in every layout, so shared and unshared
          graphs list them in the same order;
        * ``graph.query_shape``: ``(B, T)``.

    Batching graphs with :meth:`~torch_geometric.data.Batch.from_data_list`
    gives an ``"irregular"`` graph (edge-list path only).
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
        valid = valid & ~leakage_mask(centre, qpos, docs, config.leakage_radius)

    # ---- windows and their nbr nodes.
    offsets = torch.arange(-l, r + 1, device=device)

    def window_slots(rows: Tensor, rows_doc: Tensor) -> tuple[Tensor, Tensor]:
        # Corpus rows [..., W] of the windows around `rows` and which slots exist
        # (inside the corpus and the centre's document).
        pos = rows[..., None] + offsets
        in_corpus = (pos >= 0) & (pos < N)
        pos = pos.clamp(0, max(N - 1, 0))
        return pos, in_corpus & (lookup(docs, pos) == rows_doc[..., None])

    share = config.share_windows and not config.deduplicate
    window_of: Tensor | None = None
    if share:
        # One window per distinct retrieved row of the batch (windows do not depend on the query).
        rows, inverse = torch.unique(centre[valid], return_inverse=True)
        U = rows.numel()
        window_of = torch.full((C, K), -1, dtype=torch.long, device=device)
        window_of[valid] = inverse
        pos, slot_valid = window_slots(rows, lookup(docs, rows))  # [U, W]
        grid_index = slot_valid.view(-1).nonzero().view(-1)
        windows = torch.full((U, W), -1, dtype=torch.long, device=device)
        windows.view(-1)[grid_index] = torch.arange(grid_index.numel(), device=device)
        corpus_id = pos.view(-1)[grid_index]
        # A shared window belongs to several sequences: record the first one.
        seq = ctx_b.view(C, 1).expand(C, K)[valid]
        window_b = torch.full((U,), B, dtype=torch.long, device=device).scatter_reduce(0, inverse, seq, "amin")
        nbr_batch = window_b[grid_index // W]
        # Node of every (query, neighbour, offset) slot, -1 where none.
        if U > 0:
            node_grid = windows[window_of.clamp(min=0)].masked_fill(~valid[..., None], -1)
        else:
            node_grid = torch.full((C, K, W), -1, dtype=torch.long, device=device)
    else:
        pos, slot_valid = window_slots(centre, centre_doc)  # [C, k, W]
        slot_valid = slot_valid & valid[..., None]
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
        windows = node_grid.view(C * K, W)
    M = corpus_id.numel()

    # ---- n2n: self-loops + adjacent slots of one window, both directions (each window once).
    a, b = windows[:, :-1], windows[:, 1:]
    adjacent = (a >= 0) & (b >= 0)
    a, b = a[adjacent], b[adjacent]
    loops = torch.arange(M, device=device)
    n2n_src = torch.cat([loops, a, b])
    n2n_dst = torch.cat([loops, b, a])

    # ---- n2c: retrieved centre (or whole window) -> query, in (query, neighbour, offset) order.
    slot_ctx = torch.arange(C, device=device).view(C, 1, 1).expand(C, K, W)
    slot_k = torch.arange(K, device=device).view(1, K, 1).expand(C, K, W)
    slot_j = offsets.view(1, 1, W).expand(C, K, W) + l
    if config.n2c == "center":
        node_grid, slot_ctx, slot_k, slot_j = (x[..., l : l + 1] for x in (node_grid, slot_ctx, slot_k, slot_j))
    n2c_mask = node_grid >= 0
    n2c_src, n2c_dst = node_grid[n2c_mask], slot_ctx[n2c_mask]

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
    if not config.deduplicate:
        # Maps each n2c edge (and its attention weight) back to its query's neighbour slot.
        graph[N2C].nbr_slot = slot_k[n2c_mask]
        graph[N2C].window_slot = slot_j[n2c_mask]
    if grid_index is None:
        graph.layout = IRREGULAR_LAYOUT
    else:
        graph.layout = SHARED_LAYOUT if share else GRID_LAYOUT
        graph[NBR].grid_index = grid_index
        graph.grid_k, graph.grid_w, graph.grid_center = K, W, l
        if share:
            graph[CTX].nbr_window = window_of
            graph.num_windows = int(windows.size(0))
    return graph


def is_grid_graph(graph: HeteroData) -> bool:
    """Whether ``graph`` has one of the regular window layouts (``"grid"``:
    ``[num_ctx, k, W]``, or ``"shared"``: ``[num_windows, W]`` with a
    ``[num_ctx, k]`` window index) and no causal context edges, i.e. whether
    the dense fast path reproduces it exactly."""
    if getattr(graph, "layout", None) not in (GRID_LAYOUT, SHARED_LAYOUT):
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


def n2c_to_dense(graph: HeteroData, values: Tensor, fill_value: float = 0.0) -> Tensor:
    """Scatters per-``n2c``-edge values ``[num_n2c, *]`` (e.g. the attention
    weights returned with ``return_attention_weights=True``) to
    ``[num_ctx, k, W, *]`` by (ctx node, neighbour slot, window offset);
    slots without an edge get ``fill_value``. With ``n2c="center"`` only
    offset ``graph.grid_center`` is filled. Needs a graph built without
    ``deduplicate``."""
    store = graph[N2C]
    if "nbr_slot" not in store:
        raise ValueError("this graph has no per-edge neighbour slots (built with deduplicate=True?)")
    C = graph[CTX].num_nodes
    out = values.new_full((C, int(graph.grid_k), int(graph.grid_w)) + tuple(values.shape[1:]), fill_value)
    out[store.edge_index[1], store.nbr_slot, store.window_slot] = values
    return out
