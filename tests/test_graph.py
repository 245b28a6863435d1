"""Tests of the context-graph builder against a slow loop-based reference."""

from __future__ import annotations

import json

import pytest
import torch

from hetgraph.graph import (
    C2C,
    CTX,
    EDGE_TYPES,
    N2C,
    N2N,
    NBR,
    GraphConfig,
    WindowLayout,
    build_context_graph,
    ctx_to_dense,
    n2c_to_dense,
)


def reference_graph(ids, tokens, docs, cfg: GraphConfig, qpos=None, qmask=None):
    """Loop-based reference: the graph as the formulas describe it."""
    B, T, K = ids.shape
    N = len(docs)
    l, r = cfg.left, cfg.right
    ctx = [(b, t) for b in range(B) for t in range(T) if qmask is None or bool(qmask[b, t])]
    node_pos: list[tuple[int, int]] = []  # (b, corpus row) per node
    node_of: dict[tuple[int, int], int] = {}
    n2n, n2c = [], []
    share = cfg.share_windows and not cfg.deduplicate
    shared: dict[int, dict[int, int]] = {}  # retrieved row -> {corpus row: node} of its one window
    window_key: list[tuple[int, int]] = []  # (retrieved row, corpus row) per node, when shared

    def new_node(b, p):
        if cfg.deduplicate:
            if (b, p) not in node_of:
                node_of[(b, p)] = len(node_pos)
                node_pos.append((b, p))
            return node_of[(b, p)]
        node_pos.append((b, p))
        return len(node_pos) - 1

    for c, (b, t) in enumerate(ctx):
        for j in range(K):
            o = int(ids[b, t, j])
            if o < 0:
                continue
            if qpos is not None:
                p = int(qpos[b, t])
                if p >= 0 and int(docs[p]) == int(docs[o]) and abs(p - o) < cfg.leakage_radius:
                    continue
            window = [
                p for p in range(o - l, o + r + 1) if 0 <= p < N and int(docs[p]) == int(docs[o])
            ]
            if share and o in shared:
                node = shared[o]
            else:
                node = {p: new_node(b, p) for p in window}
                for p in window:
                    n2n.append((node[p], node[p]))
                    if p + 1 in node:
                        n2n.append((node[p], node[p + 1]))
                        n2n.append((node[p + 1], node[p]))
                if share:
                    shared[o] = node
                    window_key.extend((o, p) for p in window)
            for p in window:
                if cfg.n2c == "window" or p == o:
                    n2c.append((node[p], c))
    c2c = []
    if cfg.c2c:
        for v, (bv, tv) in enumerate(ctx):
            for u, (bu, tu) in enumerate(ctx):
                if bu == bv and tu <= tv and (cfg.c2c_window is None or tv - tu < cfg.c2c_window):
                    c2c.append((u, v))
    if share:
        # The builder numbers windows by retrieved row (then offset); a window's
        # sequence is the first one that retrieved it (nodes are created in (b, t) order).
        order = sorted(range(len(node_pos)), key=lambda i: window_key[i])
        relabel = {old: new for new, old in enumerate(order)}
        node_pos = [node_pos[i] for i in order]
        n2n = [(relabel[a], relabel[b]) for a, b in n2n]
        n2c = [(relabel[a], b) for a, b in n2c]
    if cfg.deduplicate:
        # The builder numbers shared nodes by sorted (sequence, row); edges are sets.
        order = sorted(range(len(node_pos)), key=lambda i: node_pos[i])
        relabel = {old: new for new, old in enumerate(order)}
        node_pos = [node_pos[i] for i in order]
        n2n = sorted({(relabel[a], relabel[b]) for a, b in n2n})
        n2c = sorted({(relabel[a], b) for a, b in n2c})
    return ctx, node_pos, sorted(n2n), sorted(n2c), sorted(c2c)


def edges(graph, edge_type):
    ei = graph[edge_type].edge_index
    assert ei.dtype == torch.int64 and ei.dim() == 2 and ei.size(0) == 2
    return sorted(map(tuple, ei.t().tolist()))


def random_corpus(N: int, num_docs: int, gen: torch.Generator):
    cuts = torch.randperm(N - 1, generator=gen)[: num_docs - 1] + 1
    docs = torch.zeros(N, dtype=torch.long)
    docs[cuts] = 1
    docs = docs.cumsum(0).to(torch.int32)
    tokens = torch.randint(0, 257, (N,), generator=gen, dtype=torch.int32)
    return tokens, docs


CONFIGS = [
    GraphConfig(),
    GraphConfig(left=2, right=2, n2c="window"),
    GraphConfig(left=0, right=3),
    GraphConfig(c2c=True),
    GraphConfig(c2c=True, c2c_window=3, left=2, right=1),
    GraphConfig(deduplicate=True),
    GraphConfig(deduplicate=True, n2c="window", left=2, right=2, c2c=True),
    GraphConfig(leakage_radius=6),
    GraphConfig(leakage_radius=6, n2c="window", left=2, right=1),
    # the official one-window-per-(query, neighbour) layout
    GraphConfig(share_windows=False),
    GraphConfig(share_windows=False, left=2, right=2, n2c="window"),
    GraphConfig(share_windows=False, c2c=True, leakage_radius=6),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: json.dumps(c.to_dict()))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("masked", [False, True])
def test_builder_matches_reference(cfg: GraphConfig, seed: int, masked: bool):
    gen = torch.Generator().manual_seed(seed)
    N, B, T, K = 80, 3, 7, 5
    tokens, docs = random_corpus(N, 9, gen)
    ids = torch.randint(0, N, (B, T, K), generator=gen)
    ids[torch.rand(B, T, K, generator=gen) < 0.25] = -1
    ids[:, :, 0] = torch.tensor([0, N - 1, 1])[:, None]  # windows clipped at the corpus ends
    ids[0, 1] = ids[0, 2]  # two queries with the same neighbours (dedup must merge)
    ids[1, 3] = -1  # a query with no neighbours at all
    qpos = torch.randint(-1, N, (B, T), generator=gen)
    qmask = torch.rand(B, T, generator=gen) < 0.7 if masked else None

    graph = build_context_graph(ids, tokens, docs, cfg, query_positions=qpos, query_mask=qmask)
    ctx, node_pos, n2n, n2c, c2c = reference_graph(ids, tokens, docs, cfg, qpos, qmask)

    assert graph[CTX].num_nodes == len(ctx)
    assert (
        list(zip(graph[CTX].batch_index.tolist(), graph[CTX].seq_index.tolist(), strict=True))
        == ctx
    )
    assert graph[NBR].num_nodes == len(node_pos)
    assert graph[NBR].corpus_id.tolist() == [p for _, p in node_pos]
    assert graph[NBR].batch_index.tolist() == [b for b, _ in node_pos]
    assert graph[NBR].token_id.tolist() == [int(tokens[p]) for _, p in node_pos]
    for key in ("corpus_id", "token_id", "batch_index"):
        assert graph[NBR][key].dtype == torch.int64
    assert set(graph.edge_types) == set(EDGE_TYPES)
    assert edges(graph, N2N) == n2n
    assert edges(graph, N2C) == n2c
    assert edges(graph, C2C) == c2c
    assert graph.layout.is_dense == (not cfg.deduplicate)
    expected_layout = "irregular" if cfg.deduplicate else "shared" if cfg.share_windows else "grid"
    assert graph.layout.kind == expected_layout
    if not cfg.deduplicate:
        # n2c edges in (ctx, k, offset) order, each mapped back to its neighbour slot
        e = graph[N2C].edge_index
        key = (e[1] * K + graph[N2C].nbr_slot) * cfg.window_size + graph[N2C].window_slot
        assert torch.equal(key, key.sort().values)
        assert (
            ids[graph[CTX].batch_index[e[1]], graph[CTX].seq_index[e[1]], graph[N2C].nbr_slot]
            == graph[NBR].corpus_id[e[0]] - graph[N2C].window_slot + cfg.left
        ).all()


def shared_case(seed: int, N: int = 60, B: int = 2, T: int = 8, K: int = 4):
    """Neighbour ids with heavy repetition, -1 padding, corpus ends and leakage."""
    gen = torch.Generator().manual_seed(seed)
    tokens, docs = random_corpus(N, 6, gen)
    ids = torch.randint(0, N // 4, (B, T, K), generator=gen) * 4 % N  # few distinct rows
    ids[torch.rand(B, T, K, generator=gen) < 0.2] = -1
    ids[:, :2, 0] = torch.tensor([0, N - 1])  # clipped at the corpus ends, shared across sequences
    qpos = torch.randint(-1, N, (B, T), generator=gen)
    return ids, tokens, docs, qpos


@pytest.mark.parametrize("n2c", ["center", "window"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_windows_node_count_and_window_index(n2c, seed):
    ids, tokens, docs, qpos = shared_case(seed)
    cfg = GraphConfig(left=2, right=1, n2c=n2c, leakage_radius=5)
    g = build_context_graph(ids, tokens, docs, cfg, query_positions=qpos)
    official = build_context_graph(
        ids,
        tokens,
        docs,
        GraphConfig(**{**cfg.to_dict(), "share_windows": False}),
        query_positions=qpos,
    )
    # Distinct retrieved rows after the leakage filter, from the official graph's n2c edges.
    e = official[N2C].edge_index
    centre_rows = official[NBR].corpus_id[e[0][official[N2C].window_slot == cfg.left]]
    rows = sorted(set(centre_rows.tolist()))
    N = len(docs)
    sizes = [sum(1 for p in range(o - 2, o + 2) if 0 <= p < N and docs[p] == docs[o]) for o in rows]
    assert g.layout.num_windows == len(rows)
    assert g[NBR].num_nodes == sum(sizes)
    assert g[NBR].num_nodes < official[NBR].num_nodes
    # Each ctx's window index points at the window of its k-th neighbour (or -1 if missing/dropped).
    win = g[CTX].nbr_window
    assert win.shape == (g[CTX].num_nodes, ids.size(2)) and win.dtype == torch.int64
    window_rows = torch.tensor(rows, dtype=torch.long)
    query_ids = ids[g[CTX].batch_index, g[CTX].seq_index]
    assert (window_rows[win[win >= 0]] == query_ids[win >= 0]).all()
    # the nbr grid index: node i sits in slot (window, offset) of its corpus row
    slot = g[NBR].grid_index
    assert torch.equal(
        window_rows[slot // cfg.window_size] + slot % cfg.window_size - cfg.left, g[NBR].corpus_id
    )
    # same n2c edge list as the official graph, up to the node numbering
    assert torch.equal(g[N2C].edge_index[1], e[1])
    assert torch.equal(g[N2C].nbr_slot, official[N2C].nbr_slot)
    assert torch.equal(g[NBR].corpus_id[g[N2C].edge_index[0]], official[NBR].corpus_id[e[0]])


def test_leakage_filter_drops_near_neighbours_of_same_document():
    docs = torch.tensor([0] * 10 + [1] * 10)
    tokens = torch.arange(20)
    ids = torch.tensor([[[3, 7, 12, -1]]])
    cfg = GraphConfig(left=0, right=0, leakage_radius=3)
    # The query is row 5 of document 0: 3 (|5-3| = 2 < 3) leaks, 7 leaks, 12 is another document.
    g = build_context_graph(ids, tokens, docs, cfg, query_positions=torch.tensor([[5]]))
    assert g[NBR].corpus_id.tolist() == [12]
    g = build_context_graph(ids, tokens, docs, cfg, query_positions=torch.tensor([[-1]]))
    assert g[NBR].corpus_id.tolist() == [3, 7, 12]


def test_grid_index_and_layout():
    docs = torch.tensor([0, 0, 0, 1, 1, 1])
    ids = torch.tensor([[[1, 3], [-1, 5]]])
    g = build_context_graph(ids, torch.arange(6), docs, GraphConfig(share_windows=False))
    # windows: [0,1,2] full; [3]: row 2 is another doc -> slots (1,2); -1 -> none; [4,5] (end).
    assert (g.layout.kind, g.layout.k, g.layout.window, g.layout.center) == ("grid", 2, 3, 1)
    assert g[NBR].grid_index.tolist() == [0, 1, 2, 4, 5, 9, 10]
    assert g[NBR].corpus_id.tolist() == [0, 1, 2, 3, 4, 4, 5]


def test_shared_layout_small_example():
    docs = torch.tensor([0, 0, 0, 1, 1, 1])
    ids = torch.tensor([[[1, 3], [-1, 1]], [[5, 3], [5, 5]]])
    g = build_context_graph(ids, torch.arange(6), docs, GraphConfig())
    # distinct rows 1, 3, 5 -> windows [0,1,2], [3,4] (row 2 is another doc), [4,5] (corpus end)
    assert g.layout == WindowLayout("shared", k=2, window=3, center=1, n2c="center", num_windows=3)
    assert g[NBR].corpus_id.tolist() == [0, 1, 2, 3, 4, 4, 5]
    assert g[NBR].grid_index.tolist() == [0, 1, 2, 4, 5, 6, 7]
    assert g[NBR].batch_index.tolist() == [0, 0, 0, 0, 0, 1, 1]  # first sequence using the window
    assert g[CTX].nbr_window.tolist() == [[0, 1], [-1, 0], [2, 1], [2, 2]]
    assert g[N2C].edge_index.tolist() == [[1, 3, 1, 6, 3, 6, 6], [0, 0, 1, 2, 2, 3, 3]]
    assert g[N2C].nbr_slot.tolist() == [0, 1, 1, 0, 1, 0, 1]
    assert edges(g, N2N) == sorted(
        [(i, i) for i in range(7)]
        + [(0, 1), (1, 0), (1, 2), (2, 1), (3, 4), (4, 3), (5, 6), (6, 5)]
    )


def test_n2c_to_dense_maps_edges_to_neighbour_slots():
    docs = torch.zeros(10)
    ids = torch.tensor([[[4, -1, 7], [4, 2, -1]]])
    for n2c in ("center", "window"):
        g = build_context_graph(ids, torch.arange(10), docs, GraphConfig(n2c=n2c))
        rows = g[NBR].corpus_id[g[N2C].edge_index[0]].float().unsqueeze(-1)
        dense = n2c_to_dense(g, rows, fill_value=-1.0)[..., 0]
        assert dense.shape == (2, 3, 3)
        assert dense[:, :, 1].tolist() == [[4, -1, 7], [4, 2, -1]]
        if n2c == "window":
            assert dense[0, 0].tolist() == [3, 4, 5] and dense[1, 1].tolist() == [1, 2, 3]
        else:
            assert (dense[:, :, [0, 2]] == -1).all()
    with pytest.raises(ValueError):
        n2c_to_dense(
            build_context_graph(ids, torch.arange(10), docs, GraphConfig(deduplicate=True)), rows
        )


def test_empty_and_device_agnostic_inputs():
    docs = torch.zeros(5, dtype=torch.int32)
    g = build_context_graph(torch.full((2, 3, 4), -1), torch.arange(5), docs, GraphConfig(c2c=True))
    assert g[NBR].num_nodes == 0 and g[CTX].num_nodes == 6
    assert g[N2N].edge_index.shape == (2, 0) and g[N2N].edge_index.dtype == torch.int64
    assert g[C2C].edge_index.size(1) == 2 * 6  # 3 * 4 / 2 per sequence
    # numpy corpus arrays (datastore memmaps) are accepted
    g2 = build_context_graph(
        torch.tensor([[[1]]]), torch.arange(5).numpy(), docs.numpy(), GraphConfig()
    )
    assert g2[NBR].corpus_id.tolist() == [0, 1, 2]


def test_out_of_range_neighbour_raises():
    with pytest.raises(ValueError):
        build_context_graph(torch.tensor([[[7]]]), torch.arange(5), torch.zeros(5), GraphConfig())


def test_ctx_to_dense_scatters_back():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    g = build_context_graph(
        torch.full((2, 3, 1), -1), torch.arange(4), torch.zeros(4), GraphConfig(), query_mask=mask
    )
    x = torch.arange(1, 5, dtype=torch.float).view(4, 1)
    dense = ctx_to_dense(g, x)
    assert dense.shape == (2, 3, 1)
    assert dense[..., 0].tolist() == [[1, 0, 2], [0, 3, 4]]


def test_batching_keeps_all_edge_types():
    from torch_geometric.data import Batch

    docs = torch.zeros(10)
    g1 = build_context_graph(torch.full((1, 2, 2), -1), torch.arange(10), docs, GraphConfig())
    g2 = build_context_graph(
        torch.tensor([[[3, 4]]]), torch.arange(10), docs, GraphConfig(c2c=True)
    )
    batch = Batch.from_data_list([g1, g2])
    assert set(batch.edge_types) == set(EDGE_TYPES)
    # sequence ids stay consistent across graphs: g2's sequence 0 becomes sequence 1
    assert batch[CTX].batch_index.tolist() == [0, 0, 1]
    assert batch[NBR].batch_index.tolist() == [1] * 6
    assert batch.layout.kind == "irregular"


def test_config_roundtrip_and_validation():
    cfg = GraphConfig(left=2, right=3, n2c="window", c2c=True, c2c_window=4, deduplicate=True)
    assert GraphConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert GraphConfig().share_windows
    official = GraphConfig(share_windows=False)
    assert GraphConfig.from_dict(json.loads(json.dumps(official.to_dict()))) == official
    assert cfg.window_size == 6
    with pytest.raises(ValueError):
        GraphConfig(n2c="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GraphConfig.from_dict({"lefty": 1})


# ---------------------------------------------------------------- the typed window layout


def layout_case():
    docs = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    ids = torch.tensor([[[1, 3], [-1, 1]], [[5, 3], [9, -1]]])
    return ids, torch.arange(10), docs


@pytest.mark.parametrize("kind", ["grid", "shared", "irregular"])
@pytest.mark.parametrize("n2c", ["center", "window"])
def test_window_layout_of_each_kind(kind, n2c):
    ids, tokens, docs = layout_case()
    cfg = GraphConfig(
        left=2, right=1, n2c=n2c, share_windows=kind == "shared", deduplicate=kind == "irregular"
    )
    g = build_context_graph(ids, tokens, docs, cfg)
    layout = g.layout
    assert isinstance(layout, WindowLayout)
    assert (layout.kind, layout.k, layout.window, layout.center, layout.n2c) == (kind, 2, 4, 2, n2c)
    assert layout.is_dense == (kind != "irregular")
    assert layout.query_slots == ((0, 1, 2, 3) if n2c == "window" else (2,))
    num_windows = {"grid": 4 * 2, "shared": 4, "irregular": 0}[kind]  # 4 distinct rows: 1, 3, 5, 9
    assert layout.num_windows == num_windows
    if kind == "irregular":
        assert "grid_index" not in g[NBR] and "nbr_window" not in g[CTX]
        return
    # every nbr node sits in the slot of its corpus row, in the window of its query's neighbour
    slot, win = g[NBR].grid_index, g[CTX].nbr_window
    assert win.shape == (4, 2) and ((win >= 0) == (ids.view(4, 2) >= 0)).all()
    if kind == "grid":
        assert win[win >= 0].tolist() == [i for i, o in enumerate(ids.view(-1).tolist()) if o >= 0]
    centre_of_window = torch.full((num_windows,), -1)
    centre_of_window[win[win >= 0]] = ids.view(4, 2)[win >= 0]
    assert torch.equal(centre_of_window[slot // 4] + slot % 4 - 2, g[NBR].corpus_id)
    # the layout is immutable and moves (with its index tensors) with the graph
    with pytest.raises(AttributeError):
        layout.k = 3  # type: ignore[misc]
    for copy in (g.clone(), g.to("cpu")):
        assert copy.layout == layout and torch.equal(copy[NBR].grid_index, slot)
    edited = g.clone()
    edited.layout = layout.as_irregular()
    assert edited.layout == WindowLayout("irregular", k=2, window=4, center=2, n2c=n2c)


def test_batched_graph_layout_is_irregular():
    from torch_geometric.data import Batch

    ids, tokens, docs = layout_case()
    for cfg in (GraphConfig(n2c="window"), GraphConfig(n2c="window", share_windows=False)):
        parts = [build_context_graph(ids[b : b + 1], tokens, docs, cfg) for b in range(2)]
        batch = Batch.from_data_list(parts)
        assert batch.layout == WindowLayout("irregular", k=2, window=3, center=1, n2c="window")
        # per-edge values still map back to (ctx, neighbour slot, offset) across the batch
        values = [torch.randn(p[N2C].edge_index.size(1), 2) for p in parts]
        dense = n2c_to_dense(batch, torch.cat(values), fill_value=-9.0)
        expected = [n2c_to_dense(p, v, fill_value=-9.0) for p, v in zip(parts, values, strict=True)]
        assert torch.equal(dense, torch.cat(expected))
    # a batch reads as irregular with the largest k; different windows do not batch
    layouts = [WindowLayout("shared", k, 3, 1, "center", num_windows=5) for k in (2, 4)]
    assert WindowLayout.batched(layouts) == WindowLayout("irregular", 4, 3, 1, "center")
    mixed = Batch.from_data_list(
        [build_context_graph(ids, tokens, docs, GraphConfig(left=left)) for left in (1, 2)]
    )
    with pytest.raises(ValueError):
        _ = mixed.layout


def test_window_layout_validation():
    WindowLayout("grid", k=4, window=3, center=2, n2c="center", num_windows=8)
    good = {"kind": "shared", "k": 4, "window": 3, "center": 1, "n2c": "center", "num_windows": 2}
    for bad in (
        {"kind": "dense"},
        {"n2c": "all"},
        {"center": 3},
        {"kind": "irregular"},
        {"c2c": True, "c2c_window": 0},
    ):
        with pytest.raises(ValueError):
            WindowLayout(**{**good, **bad})


@pytest.mark.parametrize("c2c, c2c_window", [(False, None), (False, 3), (True, None), (True, 3)])
def test_layout_records_the_causal_c2c_edges(c2c, c2c_window):
    # The dense path trusts layout.c2c / c2c_window to stand for the builder's c2c edges.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (2, 6, 2), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, [1, 4]] = False
    g = build_context_graph(
        ids,
        torch.arange(50),
        torch.zeros(50, dtype=torch.long),
        GraphConfig(c2c=c2c, c2c_window=c2c_window),
        query_mask=mask,
    )
    assert g.layout.c2c == c2c
    assert g.layout.c2c_window == (c2c_window if c2c else None)
    b, t = g["ctx"].batch_index, g["ctx"].seq_index
    d = t.view(-1, 1) - t.view(1, -1)  # [v, u]
    rule = (b.view(-1, 1) == b.view(1, -1)) & (d >= 0) & (d < (c2c_window or 99))
    expected = rule.nonzero().flip(1).t() if c2c else torch.empty(2, 0, dtype=torch.long)
    got = g["ctx", "c2c", "ctx"].edge_index
    assert sorted(map(tuple, got.t().tolist())) == sorted(map(tuple, expected.t().tolist()))
