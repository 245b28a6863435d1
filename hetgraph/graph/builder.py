"""Vectorised construction of the batched GNN-LM context graph.

:func:`build_context_graph` runs named steps: ``ctx`` nodes, retrieved centres
(with the leakage filter), the ``nbr`` windows of one layout, ``n2n``, ``n2c`` and
``c2c`` edges, assembly. Every step works on whole ``[C, k, W]`` tensors: no
Python loop over tokens, neighbours or sequences.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.typing import EdgeType

from hetgraph.graph.config import C2C, CTX, N2C, N2N, NBR, GraphConfig
from hetgraph.graph.corpus import Column, column_length, gather_rows
from hetgraph.graph.data import ContextGraph
from hetgraph.graph.layout import LayoutKind, WindowLayout
from hetgraph.graph.leakage import leakage_mask


def _as_column(x: Column | Any) -> Column:
    # Datastore columns are numpy memmaps: kept as they are and read at the rows a graph
    # needs (gather_rows); anything else array-like becomes a tensor.
    if isinstance(x, (Tensor, np.ndarray)):
        return x
    return torch.as_tensor(np.asarray(x))


class _Corpus(NamedTuple):
    """The datastore's token and document columns, read from the graph's device."""

    tokens: Column
    docs: Column
    device: torch.device

    @property
    def size(self) -> int:
        return column_length(self.docs)

    def lookup(self, table: Column, index: Tensor) -> Tensor:
        # The corpus may live elsewhere (a CPU memmap) than the queries.
        return gather_rows(table, index, self.device)

    def windows(self, rows: Tensor, offsets: Tensor, clip: str) -> tuple[Tensor, Tensor]:
        """Corpus rows ``[..., W]`` of the windows around ``rows`` and which slots
        exist (inside the corpus, and with ``clip="document"`` the centre's document)."""
        pos = rows[..., None] + offsets
        in_corpus = (pos >= 0) & (pos < self.size)
        pos = pos.clamp(0, max(self.size - 1, 0))
        if clip == "corpus":
            return pos, in_corpus
        rows_doc = self.lookup(self.docs, rows)
        return pos, in_corpus & (self.lookup(self.docs, pos) == rows_doc[..., None])


class _Windows(NamedTuple):
    """The ``nbr`` nodes of one layout."""

    node_grid: Tensor  # [C, k, W] node of every (query, neighbour, offset) slot, -1: none
    windows: Tensor  # [num_windows, W] node of every window slot (n2n links run along rows)
    corpus_id: Tensor  # [M]
    batch_index: Tensor  # [M]
    grid_index: Tensor | None = None  # [M] flat slot in `windows` (dense layouts only)
    nbr_window: Tensor | None = None  # [C, k] window of each neighbour slot, -1: none


def _ctx_nodes(
    B: int, T: int, query_mask: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(batch_index, seq_index)`` of the ``ctx`` nodes, in row-major ``(b, t)`` order,
    so that each sequence's nodes are contiguous and sorted."""
    if query_mask is None:
        return torch.arange(B, device=device).repeat_interleave(T), torch.arange(
            T, device=device
        ).repeat(B)
    if query_mask.shape != (B, T):
        raise ValueError(f"query_mask must be [B, T] = {(B, T)} (got {tuple(query_mask.shape)})")
    return query_mask.to(device).nonzero(as_tuple=True)


def _retrieved_centres(
    neighbour_ids: Tensor,
    ctx_b: Tensor,
    ctx_t: Tensor,
    corpus: _Corpus,
    config: GraphConfig,
    query_positions: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The ``[C, k]`` retrieved rows of each ``ctx`` node (clamped to ``>= 0``) and
    which of them make windows (present and not leaking)."""
    centre = neighbour_ids[ctx_b, ctx_t].long()
    valid = centre >= 0
    if centre.numel() > 0 and int(centre.max()) >= corpus.size:
        raise ValueError(
            f"neighbour id {int(centre.max())} out of range for a corpus of {corpus.size} rows"
        )
    centre = centre.clamp(min=0)
    if query_positions is not None and config.leakage_radius > 0:
        if query_positions.shape != neighbour_ids.shape[:2]:
            raise ValueError(f"query_positions must be [B, T] = {tuple(neighbour_ids.shape[:2])}")
        qpos = query_positions.to(centre.device)[ctx_b, ctx_t].long()
        valid = valid & ~leakage_mask(
            centre,
            qpos,
            corpus.docs,
            config.leakage_radius,
            same_document=config.leakage_scope == "document",
        )
    return centre, valid


def _grid_windows(
    centre: Tensor, valid: Tensor, ctx_b: Tensor, corpus: _Corpus, offsets: Tensor, clip: str
) -> _Windows:
    """``"grid"``: one window per (query, neighbour slot); window ``c * k + j``."""
    C, K = centre.shape
    W = offsets.numel()
    pos, slot_valid = corpus.windows(centre, offsets, clip)  # [C, k, W]
    slot_valid = slot_valid & valid[..., None]
    grid_index = slot_valid.view(-1).nonzero().view(-1)
    node_grid = torch.full((C, K, W), -1, dtype=torch.long, device=corpus.device)
    node_grid.view(-1)[grid_index] = torch.arange(grid_index.numel(), device=corpus.device)
    nbr_window = torch.arange(C * K, device=corpus.device).view(C, K).masked_fill(~valid, -1)
    return _Windows(
        node_grid,
        node_grid.view(C * K, W),
        pos.view(-1)[grid_index],
        ctx_b[grid_index // (K * W)],
        grid_index,
        nbr_window,
    )


def _shared_windows(
    centre: Tensor,
    valid: Tensor,
    ctx_b: Tensor,
    num_seqs: int,
    corpus: _Corpus,
    offsets: Tensor,
    clip: str,
) -> _Windows:
    """``"shared"``: one window per distinct retrieved row of the batch (a window does
    not depend on the query), in row order."""
    C, K = centre.shape
    W = offsets.numel()
    device = corpus.device
    rows, inverse = torch.unique(centre[valid], return_inverse=True)
    U = rows.numel()
    nbr_window = torch.full((C, K), -1, dtype=torch.long, device=device)
    nbr_window[valid] = inverse
    pos, slot_valid = corpus.windows(rows, offsets, clip)  # [U, W]
    grid_index = slot_valid.view(-1).nonzero().view(-1)
    windows = torch.full((U, W), -1, dtype=torch.long, device=device)
    windows.view(-1)[grid_index] = torch.arange(grid_index.numel(), device=device)
    # A shared window belongs to several sequences: record the first one.
    seq = ctx_b.view(C, 1).expand(C, K)[valid]
    window_b = torch.full((U,), num_seqs, dtype=torch.long, device=device).scatter_reduce(
        0, inverse, seq, "amin"
    )
    if U > 0:
        node_grid = windows[nbr_window.clamp(min=0)].masked_fill(~valid[..., None], -1)
    else:
        node_grid = torch.full((C, K, W), -1, dtype=torch.long, device=device)
    return _Windows(
        node_grid,
        windows,
        pos.view(-1)[grid_index],
        window_b[grid_index // W],
        grid_index,
        nbr_window,
    )


def _deduplicated_windows(
    centre: Tensor, valid: Tensor, ctx_b: Tensor, corpus: _Corpus, offsets: Tensor, clip: str
) -> _Windows:
    """``"irregular"`` (``deduplicate``): one node per (sequence, corpus row), ordered by
    that key, shared by every window of the sequence that contains the row."""
    C, K = centre.shape
    W = offsets.numel()
    pos, slot_valid = corpus.windows(centre, offsets, clip)  # [C, k, W]
    slot_valid = slot_valid & valid[..., None]
    slot_b = ctx_b.view(C, 1, 1).expand(C, K, W)
    keys = slot_b[slot_valid] * corpus.size + pos[slot_valid]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    node_grid = torch.full((C, K, W), -1, dtype=torch.long, device=corpus.device)
    node_grid[slot_valid] = inverse
    return _Windows(
        node_grid, node_grid.view(C * K, W), unique_keys % corpus.size, unique_keys // corpus.size
    )


def _unique_edges(src: Tensor, dst: Tensor, num_src: int) -> Tensor:
    # Coalesce duplicate (src, dst) pairs; result sorted by (dst, src).
    key = torch.unique(dst * num_src + src)
    return torch.stack([key % num_src, key // num_src])


def _n2n_edges(windows: Tensor, num_nodes: int, coalesce: bool) -> Tensor:
    """Self-loops plus both directions between adjacent slots of each window."""
    a, b = windows[:, :-1], windows[:, 1:]
    adjacent = (a >= 0) & (b >= 0)
    a, b = a[adjacent], b[adjacent]
    loops = torch.arange(num_nodes, device=windows.device)
    src, dst = torch.cat([loops, a, b]), torch.cat([loops, b, a])
    # Deduplicated nodes: overlapping windows yield the same edge more than once.
    return _unique_edges(src, dst, num_nodes) if coalesce else torch.stack([src, dst])


def _n2c_edges(
    node_grid: Tensor, config: GraphConfig, num_nbr: int
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Retrieved centre (or whole window) -> query, in (query, neighbour, offset) order,
    with the neighbour slot ``k`` and window offset ``j`` of each edge (``None`` with
    ``deduplicate``, whose edges are coalesced)."""
    C, K, W = node_grid.shape
    device = node_grid.device
    slot_ctx = torch.arange(C, device=device).view(C, 1, 1).expand(C, K, W)
    slot_k = torch.arange(K, device=device).view(1, K, 1).expand(C, K, W)
    slot_j = torch.arange(W, device=device).view(1, 1, W).expand(C, K, W)
    if config.n2c == "center":
        l = config.left
        node_grid, slot_ctx, slot_k, slot_j = (
            x[..., l : l + 1] for x in (node_grid, slot_ctx, slot_k, slot_j)
        )
    linked = node_grid >= 0
    src, dst = node_grid[linked], slot_ctx[linked]
    if config.deduplicate:
        # A shared node may reach the same query through several of its windows.
        return _unique_edges(src, dst, num_nbr), None
    return torch.stack([src, dst]), (slot_k[linked], slot_j[linked])


def _c2c_edges(ctx_b: Tensor, ctx_t: Tensor, T: int, config: GraphConfig) -> Tensor:
    """Causal ``u -> v`` (``u <= v``, same sequence, optionally ``v - u < c2c_window``).
    The sources of node ``v`` form the contiguous id range ``[lo_v, v]`` of its sequence."""
    C = ctx_b.numel()
    device = ctx_b.device
    if not config.c2c or C == 0:
        return torch.empty(2, 0, dtype=torch.long, device=device)
    order_key = ctx_b * T + ctx_t  # sorted ascending
    first_t = (
        torch.zeros_like(ctx_t) if config.c2c_window is None else ctx_t - config.c2c_window + 1
    )
    lo = torch.searchsorted(order_key, ctx_b * T + first_t.clamp(min=0))
    v = torch.arange(C, device=device)
    counts = v - lo + 1
    dst = v.repeat_interleave(counts)
    starts = torch.cumsum(counts, 0) - counts
    src = lo[dst] + torch.arange(dst.numel(), device=device) - starts[dst]
    return torch.stack([src, dst])


def _layout_kind(config: GraphConfig) -> LayoutKind:
    if config.deduplicate:
        return "irregular"
    return "shared" if config.share_windows else "grid"


def build_context_graph(
    neighbour_ids: Tensor,
    corpus_tokens: Column,
    corpus_doc_ids: Column,
    config: GraphConfig,
    query_positions: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> ContextGraph:
    r"""Builds one batched heterogeneous context graph (GNN-LM, `Meng et al.
    <https://arxiv.org/abs/2110.08743>`_) for a batch of query positions.

    Every query position becomes a ``ctx`` node; every corpus token of the
    window :math:`[o - l, o + r]` around each retrieved datastore row :math:`o`
    becomes an ``nbr`` node (windows are clipped at the corpus ends and, with
    ``config.window_clip="document"``, at document boundaries; the official
    GNN-LM code clips only at the corpus ends). Edge types ``('nbr', 'n2n', 'nbr')``,
    ``('nbr', 'n2c', 'ctx')`` and ``('ctx', 'c2c', 'ctx')`` are always present
    (empty ``[2, 0]`` int64 tensors where unused). Fully vectorised: no Python
    loop over tokens, neighbours or sequences.

    Args:
        neighbour_ids: ``[B, T, k]`` int datastore rows retrieved for each
            position; ``-1`` marks a missing neighbour (creates no node).
        corpus_tokens: ``[N]`` token id of every datastore row: a tensor, or a numpy
            array such as the datastore's memmap (read at the rows the graph needs only,
            on the CPU, and those rows moved to ``neighbour_ids``' device).
        corpus_doc_ids: ``[N]`` document id of every datastore row (the same).
        config: The :class:`GraphConfig`.
        query_positions: ``[B, T]`` datastore row of each query position when
            the query text is itself in the datastore (``-1`` otherwise).
            Neighbours ``o`` with ``|query_pos - o| < config.leakage_radius``
            (of the same document, unless ``config.leakage_scope="corpus"``, as
            the official code) are dropped and not replaced.
        query_mask: ``[B, T]`` bool; only positions where it is ``True``
            become ``ctx`` nodes.

    Returns:
        A :class:`ContextGraph`; its node, edge and layout attributes are listed
        there. Batching graphs with
        :meth:`~torch_geometric.data.Batch.from_data_list` gives an
        ``"irregular"`` graph (edge-list path only).
    """
    if neighbour_ids.dim() != 3:
        raise ValueError(
            f"neighbour_ids must be [B, T, k] (got shape {tuple(neighbour_ids.shape)})"
        )
    device = neighbour_ids.device
    B, T, K = neighbour_ids.shape
    corpus = _Corpus(_as_column(corpus_tokens), _as_column(corpus_doc_ids), device)
    if column_length(corpus.tokens) != corpus.size:
        raise ValueError(
            f"corpus_tokens ({column_length(corpus.tokens)}) and corpus_doc_ids ({corpus.size}) "
            "differ in length"
        )

    ctx_b, ctx_t = _ctx_nodes(B, T, query_mask, device)
    centre, valid = _retrieved_centres(neighbour_ids, ctx_b, ctx_t, corpus, config, query_positions)
    offsets = torch.arange(-config.left, config.right + 1, device=device)
    kind = _layout_kind(config)
    clip = config.window_clip
    if kind == "shared":
        nbr = _shared_windows(centre, valid, ctx_b, B, corpus, offsets, clip)
    elif kind == "grid":
        nbr = _grid_windows(centre, valid, ctx_b, corpus, offsets, clip)
    else:
        nbr = _deduplicated_windows(centre, valid, ctx_b, corpus, offsets, clip)
    M = nbr.corpus_id.numel()
    n2c, n2c_slots = _n2c_edges(nbr.node_grid, config, M)
    edges = {
        N2N: _n2n_edges(nbr.windows, M, coalesce=config.deduplicate),
        N2C: n2c,
        C2C: _c2c_edges(ctx_b, ctx_t, T, config),
    }
    num_windows = nbr.windows.size(0) if kind != "irregular" else 0
    layout = WindowLayout(
        kind,
        K,
        config.window_size,
        config.left,
        config.n2c,
        num_windows,
        c2c=config.c2c,
        c2c_window=config.c2c_window if config.c2c else None,
    )
    token_id = corpus.lookup(corpus.tokens, nbr.corpus_id)
    return _assemble(layout, ctx_b, ctx_t, nbr, token_id, edges, n2c_slots, (B, T))


def _assemble(
    layout: WindowLayout,
    ctx_b: Tensor,
    ctx_t: Tensor,
    nbr: _Windows,
    token_id: Tensor,
    edges: dict[EdgeType, Tensor],
    n2c_slots: tuple[Tensor, Tensor] | None,
    query_shape: tuple[int, int],
) -> ContextGraph:
    graph = ContextGraph()
    graph[CTX].num_nodes = ctx_b.numel()
    graph[CTX].batch_index = ctx_b.long()
    graph[CTX].seq_index = ctx_t.long()
    graph[NBR].num_nodes = nbr.corpus_id.numel()
    graph[NBR].corpus_id = nbr.corpus_id
    graph[NBR].token_id = token_id
    graph[NBR].batch_index = nbr.batch_index
    for edge_type, edge_index in edges.items():
        graph[edge_type].edge_index = edge_index
    if n2c_slots is not None:
        # Maps each n2c edge (and its attention weight) back to its query's neighbour slot.
        graph[N2C].nbr_slot, graph[N2C].window_slot = n2c_slots
    if layout.is_dense:
        graph[NBR].grid_index = nbr.grid_index
        graph[CTX].nbr_window = nbr.nbr_window
    graph.query_shape = query_shape
    graph.layout = layout
    return graph
