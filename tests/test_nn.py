"""Tests of HeteroGraphAttention and GraphAdapter against naive references."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from torch_geometric.utils import scatter

from hetgraph.graph import (
    C2C,
    CTX,
    N2C,
    N2N,
    NBR,
    GraphConfig,
    build_context_graph,
    context_graph_metadata,
    n2c_to_dense,
    window_rows,
)
from hetgraph.nn import AdapterConfig, GraphAdapter, HeteroGraphAttention
from hetgraph.nn.dense import dense_window_attention
from hetgraph.nn.dense.common import _weighted_slot_values

METADATA = context_graph_metadata(c2c=True)


def random_hetero(seed: int, num_ctx: int = 6, num_nbr: int = 15, channels: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = {
        CTX: torch.randn(num_ctx, channels, generator=gen),
        NBR: torch.randn(num_nbr, channels, generator=gen),
    }
    ei = {
        N2N: torch.randint(0, num_nbr, (2, 30), generator=gen),
        N2C: torch.stack(
            [
                torch.randint(0, num_nbr, (12,), generator=gen),
                torch.randint(0, num_ctx - 1, (12,), generator=gen),
            ]
        ),
        C2C: torch.randint(0, num_ctx, (2, 8), generator=gen),
    }
    return x, ei


def reference_layer(conv: HeteroGraphAttention, x, ei):
    """Per-node Python loop over the formulas of the layer."""
    H, D, Fc = conv.heads, conv.head_channels, conv.channels
    qkv = {t: conv.lin_qkv[t](x[t]) for t in x}
    out = {}
    for t in x:
        rows = []
        for v in range(x[t].size(0)):
            q = qkv[t][v, :Fc].view(H, D)
            per_rel = []  # (scores [E, H], values [E, H, D]) per relation reaching v
            for et in conv.edge_types:
                if et not in ei or et[2] != t:
                    continue
                key = "__".join(et)
                scores, values = [], []
                for u, w in ei[et].t().tolist():
                    if w != v:
                        continue
                    k = qkv[et[0]][u, Fc : 2 * Fc].view(H, D)
                    val = qkv[et[0]][u, 2 * Fc :].view(H, D)
                    k_rel = torch.stack([k[h] @ conv.rel_att[key][h] for h in range(H)])
                    v_rel = torch.stack([val[h] @ conv.rel_msg[key][h] for h in range(H)])
                    scores.append((q * k_rel).sum(-1) * conv.rel_prior[key] / math.sqrt(D))
                    values.append(v_rel)
                if scores:
                    per_rel.append((torch.stack(scores), torch.stack(values)))
            if not per_rel:
                m = torch.zeros(H, D)
            elif conv.normalization == "joint":
                s = torch.cat([p[0] for p in per_rel]).softmax(0)
                m = (s.unsqueeze(-1) * torch.cat([p[1] for p in per_rel])).sum(0)
            else:
                m = sum((s.softmax(0).unsqueeze(-1) * vals).sum(0) for s, vals in per_rel) / len(
                    per_rel
                )
            rows.append(conv.norm[t](x[t][v] + conv.lin_out[t](m.reshape(Fc))))
        out[t] = torch.stack(rows)
    return out


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matches_naive_reference(normalization, seed):
    torch.manual_seed(seed)
    conv = HeteroGraphAttention(16, METADATA, heads=4, normalization=normalization).eval()
    with torch.no_grad():
        for p in conv.rel_prior.values():
            p.uniform_(0.5, 1.5)
    x, ei = random_hetero(seed)
    out = conv(x, ei)
    ref = reference_layer(conv, x, ei)
    for t in (CTX, NBR):
        torch.testing.assert_close(out[t], ref[t], atol=1e-5, rtol=1e-5)


def test_joint_attention_sums_to_one_per_destination():
    conv = HeteroGraphAttention(16, METADATA, heads=4, normalization="joint").eval()
    x, ei = random_hetero(3)
    _, attn = conv(x, ei, return_attention_weights=True)
    assert set(attn) == set(ei)
    n = x[CTX].size(0)
    total = sum(scatter(a, e[1], 0, n, reduce="sum") for et, (e, a) in attn.items() if et[2] == CTX)
    has_in = torch.zeros(n, dtype=torch.bool)
    has_in[torch.cat([ei[N2C][1], ei[C2C][1]])] = True
    torch.testing.assert_close(total[has_in], torch.ones(int(has_in.sum()), 4))
    assert (total[~has_in] == 0).all()


def test_per_relation_attention_sums_to_one_per_relation():
    conv = HeteroGraphAttention(16, METADATA, heads=4, normalization="per_relation").eval()
    x, ei = random_hetero(4)
    _, attn = conv(x, ei, return_attention_weights=True)
    for et, (e, a) in attn.items():
        sums = scatter(a, e[1], 0, x[et[2]].size(0), reduce="sum")[e[1].unique()]
        torch.testing.assert_close(sums, torch.ones_like(sums))


def naive_attention(conv: HeteroGraphAttention, x, ei):
    """Per-edge scores and a softmax per destination (within each relation for
    "per_relation", over all relations into the node for "joint"), in Python loops."""
    H, D, Fc = conv.heads, conv.head_channels, conv.channels
    qkv = {t: conv.lin_qkv[t](x[t]) for t in x}
    scores = {}
    for et, e in ei.items():
        rel = conv.relation_parameters(et)
        rows = []
        for u, v in e.t().tolist():
            q = qkv[et[2]][v, :Fc].view(H, D)
            k = qkv[et[0]][u, Fc : 2 * Fc].view(H, D)
            score = torch.stack([q[h] @ (k[h] @ rel.att[h]) for h in range(H)])
            rows.append(score * rel.prior / math.sqrt(D))
        scores[et] = torch.stack(rows)
    alpha = {}
    for et, e in ei.items():
        out = torch.empty_like(scores[et])
        for i, v in enumerate(e[1].tolist()):
            if conv.normalization == "per_relation":
                group = scores[et][e[1] == v]
            else:
                group = torch.cat([scores[o][ei[o][1] == v] for o in ei if o[2] == et[2]])
            out[i] = (scores[et][i] - group.logsumexp(0)).exp()
        alpha[et] = out
    return alpha


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
def test_returned_attention_equals_naive_softmax(normalization):
    kw = {"normalization": normalization, "attn_dropout": 0.5}
    conv = HeteroGraphAttention(16, METADATA, heads=4, **kw).eval()
    with torch.no_grad():
        for p in conv.rel_prior.values():
            p.uniform_(0.5, 1.5)
    x, ei = random_hetero(8)
    _, attn = conv(x, ei, return_attention_weights=True)
    ref = naive_attention(conv, x, ei)
    assert list(attn) == conv.edge_types  # metadata order
    for et in ei:
        assert torch.equal(attn[et][0], ei[et])
        torch.testing.assert_close(attn[et][1], ref[et], atol=1e-6, rtol=1e-5)
    # returned, not stashed on the module
    assert not any(isinstance(v, torch.Tensor) for k, v in vars(conv).items() if "alpha" in k)


def test_returned_attention_is_before_attention_dropout():
    torch.manual_seed(0)
    conv = HeteroGraphAttention(16, METADATA, heads=4, attn_dropout=0.5).train()
    x, ei = random_hetero(9)
    _, attn = conv(x, ei, return_attention_weights=True)
    ref = naive_attention(conv, x, ei)
    for et in ei:
        torch.testing.assert_close(attn[et][1], ref[et], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
def test_edge_dict_order_does_not_matter(normalization):
    conv = HeteroGraphAttention(16, METADATA, heads=4, normalization=normalization).eval()
    x, ei = random_hetero(5)
    out = conv(x, ei)
    for seed in range(3):
        keys = list(ei)
        random.Random(seed).shuffle(keys)
        shuffled = conv({NBR: x[NBR], CTX: x[CTX]}, {k: ei[k] for k in keys})
        assert list(shuffled) == [CTX, NBR]
        for t in out:
            assert torch.equal(out[t], shuffled[t])


def test_missing_edge_types_and_isolated_nodes():
    conv = HeteroGraphAttention(16, METADATA, heads=4).eval()
    x, ei = random_hetero(6)
    # Only n2n: ctx has no in-edges at all and still comes back, as LayerNorm(x).
    out = conv(x, {N2N: ei[N2N]})
    torch.testing.assert_close(out[CTX], conv.norm[CTX](x[CTX]))
    # Empty edge tensors behave like missing ones.
    empty = torch.empty(2, 0, dtype=torch.long)
    out2 = conv(x, {N2N: ei[N2N], N2C: empty, C2C: empty})
    assert torch.equal(out[CTX], out2[CTX]) and torch.equal(out[NBR], out2[NBR])
    # No edges at all.
    out3 = conv(x, {})
    torch.testing.assert_close(out3[NBR], conv.norm[NBR](x[NBR]))
    # The last ctx node of random_hetero gets no n2c edge; without c2c it is isolated.
    out4 = conv(x, {N2C: ei[N2C]})
    torch.testing.assert_close(out4[CTX][-1], conv.norm[CTX](x[CTX][-1:])[0])


def test_layer_dtype_follows_input():
    conv = HeteroGraphAttention(16, METADATA, heads=4).eval()
    x, ei = random_hetero(7)
    xb = {t: v.bfloat16() for t, v in x.items()}
    assert all(v.dtype == torch.bfloat16 for v in conv(xb, ei).values())
    conv_b = HeteroGraphAttention(16, METADATA, heads=4).eval().to(torch.bfloat16)
    out = conv_b(xb, ei)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in out.values())


def test_layer_repr_and_reset():
    conv = HeteroGraphAttention(16, METADATA, heads=4)
    assert repr(conv) == "HeteroGraphAttention(16, heads=4, normalization='joint', num_relations=3)"
    with torch.no_grad():
        conv.rel_prior["nbr__n2c__ctx"].fill_(3.0)
    conv.reset_parameters()
    assert torch.equal(conv.rel_prior["nbr__n2c__ctx"], torch.ones(4))
    with pytest.raises(ValueError):
        HeteroGraphAttention(10, METADATA, heads=4)


# ---------------------------------------------------------------- adapter


def corpus_and_graph(
    cfg: GraphConfig, seed: int = 0, B: int = 3, T: int = 9, K: int = 4, N: int = 120
):
    gen = torch.Generator().manual_seed(seed)
    docs = (torch.arange(N) // 17).to(torch.int32)
    tokens = torch.randint(0, 257, (N,), generator=gen)
    ids = torch.randint(0, N, (B, T, K), generator=gen)
    ids[torch.rand(B, T, K, generator=gen) < 0.2] = -1
    ids[0, 0] = -1  # a query without neighbours
    return ids, tokens, docs, build_context_graph(ids, tokens, docs, cfg)


def adapter_inputs(
    graph,
    seed: int = 0,
    ctx_c: int = 24,
    nbr_c: int = 20,
    tok_c: int = 12,
    N: int = 120,
    T: int = 9,
):
    gen = torch.Generator().manual_seed(seed + 100)
    # Features are functions of (sequence, position) / corpus row, so sub-graphs see the same
    # values.
    ctx_table = torch.randn(16, T, ctx_c, generator=gen)
    nbr_table = torch.randn(N, nbr_c, generator=gen)
    tok_table = torch.randn(257, tok_c, generator=gen)
    ctx_x = ctx_table[graph[CTX].batch_index, graph[CTX].seq_index]
    return ctx_x, nbr_table[graph[NBR].corpus_id], tok_table[graph[NBR].token_id]


def make_adapter(**kw) -> GraphAdapter:
    torch.manual_seed(0)
    cfg = AdapterConfig(
        ctx_channels=24,
        nbr_channels=20,
        token_channels=12,
        hidden_channels=32,
        out_channels=8,
        heads=4,
        **kw,
    )
    return GraphAdapter(cfg).eval()


@pytest.mark.parametrize(
    "gcfg",
    [
        GraphConfig(),
        GraphConfig(n2c="window"),
        GraphConfig(left=2, right=2),
        GraphConfig(left=0, right=2, n2c="window"),
    ],
    ids=["center", "window", "l2r2", "l0r2-window"],
)
@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-query"])
def test_dense_path_equals_edge_list_path(gcfg, normalization, share):
    gcfg = GraphConfig(**{**gcfg.to_dict(), "share_windows": share})
    *_, graph = corpus_and_graph(gcfg)
    assert graph.layout.kind == ("shared" if share else "grid")
    adapter = make_adapter(normalization=normalization)
    assert adapter.use_dense(graph)
    inputs = adapter_inputs(graph)
    dense = adapter(graph, *inputs)
    sparse = adapter(graph, *inputs, path="sparse")
    assert dense.shape == (graph[CTX].num_nodes, 8)
    assert (dense - sparse).abs().max() <= 1e-5
    # the query without neighbours still gets a finite output
    assert torch.isfinite(dense).all()


def repeated_neighbours(seed: int, B: int = 3, T: int = 10, K: int = 5, N: int = 120):
    """Neighbour ids as retrieval gives them: neighbouring positions share most rows,
    with -1 padding, windows clipped at the corpus ends and document boundaries, and
    query positions inside the datastore (so the leakage filter drops some)."""
    gen = torch.Generator().manual_seed(seed)
    docs = (torch.arange(N) // 17).to(torch.int32)
    tokens = torch.randint(0, 257, (N,), generator=gen)
    walk = torch.randint(0, 3, (B, T), generator=gen).cumsum(1) + torch.randint(
        0, N - 40, (B, 1), generator=gen
    )
    ids = walk[..., None] + torch.randperm(12, generator=gen)[:K] * 2
    ids[torch.rand(B, T, K, generator=gen) < 0.15] = -1
    ids[0, :3, 0] = 0
    ids[1, 2:5, 1] = N - 1
    ids[2, 4] = -1  # a query without neighbours
    qpos = torch.randint(-1, N, (B, T), generator=gen)
    return ids, tokens, docs, qpos


def build_pair(gcfg: GraphConfig, seed: int):
    ids, tokens, docs, qpos = repeated_neighbours(seed)
    qmask = torch.rand(ids.shape[:2], generator=torch.Generator().manual_seed(seed)) < 0.9
    kw = {"query_positions": qpos, "query_mask": qmask}
    shared = build_context_graph(
        ids, tokens, docs, GraphConfig(**{**gcfg.to_dict(), "share_windows": True}), **kw
    )
    official = build_context_graph(
        ids, tokens, docs, GraphConfig(**{**gcfg.to_dict(), "share_windows": False}), **kw
    )
    return shared, official


@pytest.mark.parametrize("n2c", ["center", "window"])
@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_windows_give_the_official_ctx_outputs(n2c, normalization, seed):
    shared, official = build_pair(GraphConfig(left=1, right=2, n2c=n2c, leakage_radius=4), seed)
    assert shared.layout.kind == "shared" and official.layout.kind == "grid"
    assert shared[NBR].num_nodes < 0.75 * official[NBR].num_nodes  # real sharing happens
    adapter = make_adapter(normalization=normalization)
    reference = adapter(official, *adapter_inputs(official, T=10), path="sparse")
    assert torch.isfinite(reference).all()
    for graph in (shared, official):
        for path in ("dense", "sparse"):
            out = adapter(graph, *adapter_inputs(graph, T=10), path=path)
            assert (out - reference).abs().max() <= 1e-5, (graph.layout.kind, path)


@pytest.mark.parametrize("n2c", ["center", "window"])
def test_shared_windows_attention_weights_match_official_edge_by_edge(n2c):
    shared, official = build_pair(GraphConfig(n2c=n2c, leakage_radius=4), 3)
    adapter = make_adapter()
    _, attn_s = adapter(shared, *adapter_inputs(shared, T=10), return_attention_weights=True)
    _, attn_o = adapter(official, *adapter_inputs(official, T=10), return_attention_weights=True)
    for layer_s, layer_o in zip(attn_s, attn_o, strict=True):
        (e_s, a_s), (e_o, a_o) = layer_s[N2C], layer_o[N2C]
        assert torch.equal(e_s[1], e_o[1])  # same ctx node per edge, same (ctx, k, offset) order
        torch.testing.assert_close(a_s, a_o, atol=1e-6, rtol=1e-5)
        dense_s, dense_o = n2c_to_dense(shared, a_s), n2c_to_dense(official, a_o)
        assert dense_s.shape == (shared[CTX].num_nodes, 5, 3, 4)
        torch.testing.assert_close(dense_s, dense_o, atol=1e-6, rtol=1e-5)


def test_shared_dense_layer_without_windows():
    # every neighbour missing: no windows at all, ctx outputs are LayerNorm-only updates
    ids = torch.full((2, 3, 4), -1)
    graph = build_context_graph(ids, torch.arange(10), torch.zeros(10), GraphConfig())
    assert graph.layout.kind == "shared" and graph.layout.num_windows == 0
    adapter = make_adapter()
    ctx_x = torch.randn(6, 24)
    nbr_x, tok_x = torch.zeros(0, 20), torch.zeros(0, 12)
    dense = adapter(graph, ctx_x, nbr_x, tok_x)
    torch.testing.assert_close(dense, adapter(graph, ctx_x, nbr_x, tok_x, path="sparse"))


# ---------------------------------------------------------------- dense unit, standalone

# A non-GNN-LM heterograph: words sit in windows of W slots ("next" links adjacent words),
# some slots of each window feed sentences ("in"); "cites" is never used by the dense unit.
WORD, SENT = "word", "sentence"
NEXT, IN, CITES = (WORD, "next", WORD), (WORD, "in", SENT), (SENT, "cites", SENT)


def windowed_case(seed: int, U: int = 7, W: int = 4, C: int = 5, K: int = 3, channels: int = 16):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(U, W, generator=gen) < 0.7
    mask[0] = False  # an empty window
    window_index = torch.randint(0, U, (C, K), generator=gen)  # windows shared by several queries
    window_index[torch.rand(C, K, generator=gen) < 0.25] = -1
    window_index[-1] = -1  # a query without sources
    query_x = torch.randn(C, channels, generator=gen)
    return query_x, torch.randn(U, W, channels, generator=gen), mask, window_index


def windowed_edge_list(mask, window_index, slots):
    """The edge list the dense unit stands for; words numbered by flat slot order."""
    U, W = mask.shape
    node = torch.full((U * W,), -1, dtype=torch.long)
    node[mask.view(-1)] = torch.arange(int(mask.sum()))
    node = node.view(U, W)
    nxt, into = [], []
    for u in range(U):
        for j in range(W):
            for i in (j - 1, j, j + 1):
                if 0 <= i < W and mask[u, i] and mask[u, j]:
                    nxt.append((int(node[u, i]), int(node[u, j])))
    for c, windows in enumerate(window_index.tolist()):
        for u in windows:
            into.extend((int(node[u, j]), c) for j in slots if u >= 0 and mask[u, j])

    def as_index(e):
        return torch.tensor(e, dtype=torch.long).view(-1, 2).t()

    return {NEXT: as_index(nxt), IN: as_index(into)}


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("slots", [(1,), (0, 2), None], ids=["one", "two", "all"])
def test_dense_unit_standalone_equals_edge_list(normalization, slots):
    torch.manual_seed(0)
    metadata = ([SENT, WORD], [NEXT, IN, CITES])
    conv = HeteroGraphAttention(16, metadata, heads=4, normalization=normalization).eval()
    with torch.no_grad():
        for p in conv.rel_prior.values():
            p.uniform_(0.5, 1.5)
    query_x, window_x, mask, window_index = windowed_case(1)
    q_out, w_out = dense_window_attention(
        conv,
        query_x,
        window_x,
        mask,
        window_index,
        window_relation=NEXT,
        query_relation=IN,
        query_slots=slots,
    )
    assert q_out.shape == query_x.shape and w_out.shape == window_x.shape
    edges = windowed_edge_list(mask, window_index, range(4) if slots is None else slots)
    ref = conv({SENT: query_x, WORD: window_x[mask]}, edges)
    torch.testing.assert_close(q_out, ref[SENT], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_out[mask], ref[WORD], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_out[-1], conv.norm[SENT](query_x[-1:])[0])  # no sources: m = 0
    # update_windows=False leaves the windows alone and gives the same query output
    q_only, same = dense_window_attention(
        conv, query_x, window_x, mask, window_index, NEXT, IN, slots, update_windows=False
    )
    assert same is window_x and torch.equal(q_only, q_out)


def test_dense_unit_relation_missing_from_metadata_sends_nothing():
    conv = HeteroGraphAttention(16, ([SENT, WORD], [IN]), heads=4).eval()
    query_x, window_x, mask, window_index = windowed_case(2)
    q_out, w_out = dense_window_attention(conv, query_x, window_x, mask, window_index, NEXT, IN)
    edges = windowed_edge_list(mask, window_index, range(4))
    ref = conv({SENT: query_x, WORD: window_x[mask]}, edges)
    torch.testing.assert_close(q_out, ref[SENT], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_out[mask], conv.norm[WORD](window_x[mask]))


def test_dense_unit_checks_arguments():
    conv = HeteroGraphAttention(16, ([SENT, WORD], [NEXT, IN]), heads=4)
    query_x, window_x, mask, window_index = windowed_case(3)
    good = (query_x, window_x, mask, window_index)
    for bad in [
        (query_x, window_x.unsqueeze(0), mask, window_index),  # [1, U, W, F]
        (query_x, window_x, mask[:, :-1], window_index),  # mask does not match the windows
        (query_x[:-1], window_x, mask, window_index),  # one window row per query
        (query_x, window_x, mask, window_index.view(-1)),
    ]:
        with pytest.raises(ValueError):
            dense_window_attention(conv, *bad, window_relation=NEXT, query_relation=IN)
    wrong = [
        (IN, IN),
        (NEXT, (SENT, "in", WORD)),
        ((WORD, "x", SENT), IN),
        ((NBR, "n2n", NBR), N2C),
    ]
    for relations in wrong:
        with pytest.raises(ValueError):
            dense_window_attention(conv, *good, *relations)
    with pytest.raises(ValueError):
        dense_window_attention(conv, *good, NEXT, IN, query_slots=(0, 4))  # W = 4


def test_dense_path_bf16_smoke():
    *_, graph = corpus_and_graph(GraphConfig())
    adapter = make_adapter().to(torch.bfloat16)
    inputs = [x.bfloat16() for x in adapter_inputs(graph)]
    dense = adapter(graph, *inputs)
    sparse = adapter(graph, *inputs, path="sparse")
    assert dense.dtype == torch.bfloat16 and torch.isfinite(dense).all()
    assert (dense.float() - sparse.float()).abs().max() < 0.25
    # fp32 adapter, bf16 LM states: output follows the input dtype
    out = make_adapter()(graph, *inputs)
    assert out.dtype == torch.bfloat16


def test_window_values_read_with_float32_weights_and_bfloat16_values():
    # Under CUDA autocast the attention weights stay float32 while the values are
    # bfloat16 (a Linear's output); the embedding_bag read must take both.
    gen = torch.Generator().manual_seed(0)
    U, S, H, D, C, K = 7, 2, 4, 8, 5, 3
    values = torch.randn(U, S, H * D, generator=gen).bfloat16()
    alpha = torch.rand(C, H, K * S, generator=gen)
    windows = torch.randint(0, U, (C, K), generator=gen)
    got = _weighted_slot_values(values, alpha, windows, S)
    gathered = values.float()[windows].view(C, K * S, H, D)  # [C, k * S, H, D]
    expected = torch.einsum("chn,cnhd->chd", alpha.bfloat16().float(), gathered)
    assert got.dtype == torch.bfloat16
    # bfloat16 rounding (u = 2^-8) of up to k * S + 1 sums bounds the error by a multiple
    # of sum |alpha| |v|, whatever order a kernel accumulates in.
    scale = torch.einsum("chn,cnhd->chd", alpha.abs(), gathered.abs())
    assert ((got.float() - expected).abs() <= 2**-5 * scale + 1e-6).all()


def test_dense_not_taken_for_irregular_graphs():
    adapter = make_adapter(use_c2c=True)
    *_, g = corpus_and_graph(GraphConfig(c2c=True))
    assert adapter.use_dense(g)  # the builder's causal c2c edges have a dense path
    g.layout = dataclasses.replace(g.layout, c2c=False)  # e.g. c2c edges edited by hand
    assert not adapter.use_dense(g)
    with pytest.raises(ValueError, match="causal edges"):
        adapter(g, *adapter_inputs(g), path="dense")
    *_, g = corpus_and_graph(GraphConfig(deduplicate=True))
    assert not adapter.use_dense(g)
    # an adapter without the c2c relation ignores c2c edges on both paths
    *_, g = corpus_and_graph(GraphConfig(c2c=True))
    plain = make_adapter()
    assert plain.use_dense(g)
    torch.testing.assert_close(
        plain(g, *adapter_inputs(g)),
        plain(g, *adapter_inputs(g), path="sparse"),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "gcfg",
    [
        GraphConfig(),
        GraphConfig(c2c=True, c2c_window=4),
        GraphConfig(deduplicate=True, n2c="window"),
    ],
    ids=["grid", "c2c", "dedup"],
)
def test_batched_equals_per_sequence(gcfg):
    ids, tokens, docs, graph = corpus_and_graph(gcfg)
    adapter = make_adapter(use_c2c=gcfg.c2c)
    out = adapter(graph, *adapter_inputs(graph))
    for b in range(ids.size(0)):
        g_b = build_context_graph(ids[b : b + 1], tokens, docs, gcfg)
        ctx_x, nbr_x, tok_x = adapter_inputs(graph)
        ctx_x = adapter_inputs(graph)[0][graph[CTX].batch_index == b]
        _, nbr_x, tok_x = adapter_inputs(g_b)
        out_b = adapter(g_b, ctx_x, nbr_x, tok_x)
        torch.testing.assert_close(out_b, out[graph[CTX].batch_index == b], atol=1e-5, rtol=1e-5)


def test_graphs_batched_by_pyg_take_the_edge_list_path():
    from torch_geometric.data import Batch

    ids, tokens, docs, _ = corpus_and_graph(GraphConfig())
    parts = [build_context_graph(ids[b : b + 1], tokens, docs, GraphConfig()) for b in range(3)]
    batch = Batch.from_data_list(parts)
    adapter = make_adapter()
    assert batch.layout.kind == "irregular" and not adapter.use_dense(batch)
    with pytest.raises(ValueError):
        adapter(batch, *adapter_inputs(batch), path="dense")
    ctx_x, nbr_x, tok_x = adapter_inputs(batch)
    cp, npt = batch[CTX].ptr.tolist(), batch[NBR].ptr.tolist()
    expected = torch.cat(
        [
            adapter(
                g, ctx_x[cp[i] : cp[i + 1]], nbr_x[npt[i] : npt[i + 1]], tok_x[npt[i] : npt[i + 1]]
            )
            for i, g in enumerate(parts)
        ]
    )
    torch.testing.assert_close(adapter(batch, ctx_x, nbr_x, tok_x), expected, atol=1e-5, rtol=1e-5)
    # graphs with different windows batch too; their batch is simply not dense
    wider = build_context_graph(ids[:1], tokens, docs, GraphConfig(left=2))
    mixed = Batch.from_data_list([parts[0], wider])
    assert not adapter.use_dense(mixed)


@pytest.mark.parametrize("use_c2c", [False, True])
def test_permuting_nbr_nodes_changes_nothing(use_c2c):
    *_, graph = corpus_and_graph(GraphConfig(c2c=use_c2c, n2c="window"))
    adapter = make_adapter(use_c2c=use_c2c)
    ctx_x, nbr_x, tok_x = adapter_inputs(graph)
    out = adapter(graph, ctx_x, nbr_x, tok_x, path="sparse")
    perm = torch.randperm(graph[NBR].num_nodes, generator=torch.Generator().manual_seed(0))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    permuted = graph.clone()
    permuted.layout = graph.layout.as_irregular()
    permuted[N2N].edge_index = inv[graph[N2N].edge_index]
    e = graph[N2C].edge_index
    permuted[N2C].edge_index = torch.stack([inv[e[0]], e[1]])
    out_p = adapter(permuted, ctx_x, nbr_x[perm], tok_x[perm])
    torch.testing.assert_close(out_p, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["sparse", "dense", "dense-per-query", "dense-c2c"])
def test_gradients_reach_every_parameter(path):
    gcfg = GraphConfig(c2c=path in ("sparse", "dense-c2c"), share_windows=path != "dense-per-query")
    path = path.split("-")[0]
    *_, graph = corpus_and_graph(gcfg)
    adapter = make_adapter(use_c2c=gcfg.c2c, dropout=0.1, attn_dropout=0.1).train()
    out = adapter(graph, *adapter_inputs(graph), path=path)
    (out * torch.randn_like(out)).sum().backward()
    last = adapter.config.num_layers - 1
    # Parameters that only update nbr nodes in the last layer cannot reach the ctx output.
    dead = (
        f"convs.{last}.lin_out.nbr",
        f"convs.{last}.norm.nbr",
        f"convs.{last}.rel_att.nbr__n2n",
        f"convs.{last}.rel_msg.nbr__n2n",
        f"convs.{last}.rel_prior.nbr__n2n",
        f"ffns.{last}.nbr",
        f"ffn_norms.{last}.nbr",
    )
    for name, p in adapter.named_parameters():
        if name.startswith(dead) or (path == "dense" and not gcfg.c2c and "c2c" in name):
            assert p.grad is None or p.grad.abs().sum() == 0, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def per_row_inputs(graph, seed: int = 0):
    """:func:`adapter_inputs` (of :func:`repeated_neighbours`' graphs) as
    :class:`~hetgraph.fusion.GraphInputBuilder` gives them: each distinct corpus row's
    features once, each row's token once, each node's row."""
    ctx_x, nbr_x, tok_x = adapter_inputs(graph, seed, T=10)
    rows, nbr_index = graph[NBR].corpus_id.unique(return_inverse=True)
    first = torch.full((rows.numel(),), nbr_index.numel()).scatter_reduce(
        0, nbr_index, torch.arange(nbr_index.numel()), "amin"
    )
    row_tokens = graph[NBR].token_id[first]
    tokens, token_index = row_tokens.unique(return_inverse=True)
    token_x = torch.zeros(tokens.numel(), tok_x.size(1)).index_copy(0, token_index, tok_x[first])
    return ctx_x, nbr_x[first], token_x, token_index, nbr_index


@pytest.mark.parametrize(
    "gcfg",
    [GraphConfig(), GraphConfig(left=2, right=2, c2c=True), GraphConfig(share_windows=False)],
    ids=["shared", "l2r2-c2c", "per-query"],
)
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_per_row_inputs_equal_per_node_inputs(gcfg, num_layers, path):
    # Overlapping windows share corpus rows: the adapter maps each row once (and, on
    # the dense path, projects its first-layer keys and values once) and gathers.
    ids, tokens, docs, qpos = repeated_neighbours(1)
    graph = build_context_graph(ids, tokens, docs, gcfg, query_positions=qpos)
    ctx_x, rows_x, token_x, token_index, nbr_index = per_row_inputs(graph)
    assert rows_x.size(0) < graph[NBR].num_nodes  # rows are shared, or this tests nothing
    adapter = make_adapter(num_layers=num_layers, use_c2c=gcfg.c2c).double()
    per_node = [x.double() for x in adapter_inputs(graph, T=10)]
    per_row = [ctx_x.double(), rows_x.double(), token_x.double()]
    for x in (per_node[0], per_row[0]):
        x.requires_grad_()
    expected = adapter(graph, *per_node, path=path)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    expected_grads = [p.grad for p in adapter.parameters()]
    adapter.zero_grad(set_to_none=True)
    got = adapter(graph, *per_row, nbr_token_index=token_index, nbr_index=nbr_index, path=path)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(per_row[0].grad, per_node[0].grad, rtol=1e-10, atol=1e-10)
    for p, g in zip(adapter.parameters(), expected_grads, strict=True):
        if g is None:  # reaches nothing (the last layer's nbr-side maps)
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-10)
    if path == "dense":  # and what a neighbour-state table stores
        by_node = adapter.window_key_values(graph, *per_node[1:])
        by_row = adapter.window_key_values(graph, *per_row[1:], token_index, nbr_index)
        for (k0, v0), (k1, v1) in zip(by_node, by_row, strict=True):
            torch.testing.assert_close(k1, k0, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(v1, v0, rtol=1e-10, atol=1e-10)


def test_adapter_attention_weights_for_inspection():
    *_, graph = corpus_and_graph(GraphConfig())
    adapter = make_adapter()
    out, attn = adapter(graph, *adapter_inputs(graph), return_attention_weights=True)
    assert len(attn) == 3
    e, a = attn[-1][N2C]
    assert torch.equal(e, graph[N2C].edge_index) and a.shape == (e.size(1), 4)
    torch.testing.assert_close(out, adapter(graph, *adapter_inputs(graph)), atol=1e-5, rtol=1e-5)


def test_adapter_config_roundtrip_repr_and_token_check():
    cfg = AdapterConfig(ctx_channels=32, nbr_channels=16, num_layers=2, heads=4, use_c2c=True)
    assert cfg.hidden_channels == 32 and cfg.out_channels == 32
    assert AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    adapter = GraphAdapter(cfg)
    assert repr(adapter).startswith("GraphAdapter(ctx=32, nbr=16") and "layers=2" in repr(adapter)
    with pytest.raises(ValueError):
        AdapterConfig(ctx_channels=30, nbr_channels=16, heads=4)
    *_, graph = corpus_and_graph(GraphConfig())
    with pytest.raises(ValueError):
        make_adapter()(graph, *adapter_inputs(graph)[:2])
    # reset_parameters re-initialises the layers
    before = [p.clone() for p in adapter.parameters()]
    adapter.reset_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.parameters(), strict=True))


# ---------------------------------------------------------------- dense path with causal c2c


def causal_case(gcfg: GraphConfig, seed: int = 0, B: int = 3, T: int = 11, K: int = 4):
    """A c2c graph with padded queries: sequences of 11, 7 and 4 ctx nodes with gaps."""
    gen = torch.Generator().manual_seed(seed)
    N = 120
    docs = (torch.arange(N) // 17).to(torch.int32)
    tokens = torch.randint(0, 257, (N,), generator=gen)
    ids = torch.randint(0, N, (B, T, K), generator=gen)
    ids[torch.rand(B, T, K, generator=gen) < 0.2] = -1
    ids[0, 0] = -1  # a query without neighbours
    ids[1, 3:6] = -1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, [0, 2, 5, 9]] = False
    mask[2, 4:] = False
    mask[2, 1] = False
    return build_context_graph(ids, tokens, docs, gcfg, query_mask=mask)


CAUSAL_GRAPHS = [
    GraphConfig.paper(),
    GraphConfig.paper(c2c_window=3),
    GraphConfig.paper(left=2, right=2, n2c="window", share_windows=False),
]


@pytest.mark.parametrize("gcfg", CAUSAL_GRAPHS, ids=["paper", "c2c_window3", "l2r2-window-grid"])
@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("relation_mean", ["reached", "all"])
@pytest.mark.parametrize("tie_intra", [False, True])
def test_dense_c2c_equals_edge_list_path(gcfg, normalization, relation_mean, tie_intra):
    graph = causal_case(gcfg)
    assert graph.layout.c2c and graph[C2C].edge_index.size(1) > 0
    adapter = make_adapter(
        use_c2c=True,
        normalization=normalization,
        relation_mean=relation_mean,
        tie_intra=tie_intra,
        output_bias=True,
    )
    assert adapter.use_dense(graph)
    inputs = adapter_inputs(graph, T=11)
    dense = adapter(graph, *inputs)
    torch.testing.assert_close(dense, adapter(graph, *inputs, path="sparse"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("relation_mean", ["reached", "all"])
def test_dense_c2c_paper_adapter_float64_and_gradients(normalization, relation_mean):
    graph = causal_case(GraphConfig.paper(c2c_window=4), seed=1)
    torch.manual_seed(0)
    cfg = AdapterConfig.paper(
        ctx_channels=24,
        nbr_channels=20,
        hidden_channels=32,
        out_channels=8,
        heads=4,
        dropout=0.0,
        attn_dropout=0.0,
        normalization=normalization,
        relation_mean=relation_mean,
    )
    adapter = GraphAdapter(cfg).double()
    inputs = [x.double().requires_grad_() for x in adapter_inputs(graph, T=11)[:2]]
    parameters = assert_dense_equals_edge_list_float64(adapter, graph, inputs)
    assert any("intra" in n for n in parameters)


def assert_dense_equals_edge_list_float64(adapter, graph, inputs) -> list[str]:
    """Outputs, input gradients and every parameter gradient of the dense and the edge-list
    path agree to 1e-12 (float64, a fixed random output weighting); returns the names of
    the parameters that got a gradient."""
    results = []
    for path in ("dense", "sparse"):
        adapter.zero_grad(set_to_none=True)
        out = adapter(graph, *inputs, path=path)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        (out * weight).sum().backward()
        results.append(
            (
                out.detach(),
                [x.grad.clone() for x in inputs],
                {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None},
            )
        )
        for x in inputs:
            x.grad = None
    (out_d, in_d, par_d), (out_s, in_s, par_s) = results
    torch.testing.assert_close(out_d, out_s, atol=1e-12, rtol=1e-10)
    for a, b in zip(in_d, in_s, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert par_d.keys() == par_s.keys()
    for name in par_d:
        torch.testing.assert_close(par_d[name], par_s[name], atol=1e-12, rtol=1e-10)
    return list(par_d)


def test_dense_c2c_train_mode_dropout():
    graph = causal_case(GraphConfig.paper())
    inputs = adapter_inputs(graph, T=11)
    adapter = make_adapter(use_c2c=True, dropout=0.3, attn_dropout=0.1).train()
    a, b = adapter(graph, *inputs), adapter(graph, *inputs)
    assert a.shape == b.shape == (graph[CTX].num_nodes, 8) and torch.isfinite(a).all()
    assert not torch.equal(a, b)  # fresh dropout masks per call
    # attention dropout 1 drops every coefficient on both paths: m = 0 everywhere
    adapter = make_adapter(use_c2c=True, dropout=0.0, attn_dropout=1.0).train()
    torch.testing.assert_close(
        adapter(graph, *inputs), adapter(graph, *inputs, path="sparse"), atol=1e-5, rtol=1e-5
    )
    adapter.eval()
    assert not torch.allclose(adapter(graph, *inputs), adapter.train()(graph, *inputs))


# A non-GNN-LM heterograph for the causal unit: sentences also follow each other ("after").
AFTER = (SENT, "after", SENT)


def causal_edge_list(group, position, window=None):
    src, dst = [], []
    for v in range(group.numel()):
        for u in range(group.numel()):
            d = int(position[v] - position[u])
            if group[u] == group[v] and d >= 0 and (window is None or d < window):
                src.append(u)
                dst.append(v)
    return torch.tensor([src, dst], dtype=torch.long).view(2, -1)


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("relation_mean", ["reached", "all"])
@pytest.mark.parametrize("window", [None, 2])
def test_dense_causal_unit_standalone_equals_edge_list_and_naive(
    normalization, relation_mean, window
):
    from hetgraph.nn.dense import causal_layout, dense_causal_window_attention

    torch.manual_seed(0)
    metadata = ([SENT, WORD], [NEXT, IN, CITES, AFTER])
    conv = HeteroGraphAttention(
        16,
        metadata,
        heads=4,
        normalization=normalization,
        relation_mean=relation_mean,
        out_bias=True,
    ).eval()
    with torch.no_grad():
        for p in conv.rel_prior.values():
            p.uniform_(0.5, 1.5)
    query_x, window_x, mask, window_index = windowed_case(4, C=7)
    # queries in no particular order: groups 1, 0, 1, 2, 0, 1, 0 at scattered positions
    group = torch.tensor([1, 0, 1, 2, 0, 1, 0])
    position = torch.tensor([5, 2, 1, 7, 9, 2, 3])
    layout = causal_layout(group, position, window)
    q_out, w_out = dense_causal_window_attention(
        conv, query_x, window_x, mask, window_index, NEXT, IN, AFTER, layout, query_slots=(1, 2)
    )
    edges = windowed_edge_list(mask, window_index, (1, 2))
    edges[AFTER] = causal_edge_list(group, position, window)
    x = {SENT: query_x, WORD: window_x[mask]}
    ref = conv(x, edges)
    torch.testing.assert_close(q_out, ref[SENT], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_out[mask], ref[WORD], atol=1e-5, rtol=1e-5)
    if relation_mean == "reached":  # the naive reference divides by the reaching relations
        naive = reference_layer(conv, x, edges)
        torch.testing.assert_close(q_out, naive[SENT], atol=1e-5, rtol=1e-5)
    # without the causal relation in the metadata the unit is dense_window_attention
    plain = HeteroGraphAttention(
        16,
        ([SENT, WORD], [NEXT, IN]),
        heads=4,
        normalization=normalization,
        relation_mean=relation_mean,
    )
    q_plain, _ = dense_causal_window_attention(
        plain.eval(), query_x, window_x, mask, window_index, NEXT, IN, AFTER, layout
    )
    torch.testing.assert_close(
        q_plain, dense_window_attention(plain, query_x, window_x, mask, window_index, NEXT, IN)[0]
    )


def test_causal_layout_checks_and_empty():
    from hetgraph.nn.dense import causal_layout, dense_causal_window_attention

    empty = causal_layout(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert empty.groups == empty.length == 0 and empty.index.numel() == 0
    layout = causal_layout(torch.tensor([3, 3, 5]), torch.tensor([4, 0, 2]), window=4)
    assert (layout.groups, layout.length) == (2, 2)
    assert layout.allowed.sum() == 3  # 0->0, 4->4 in group 3 (4 - 0 = window); 2->2 in 5
    assert causal_layout(torch.tensor([3, 3, 5]), torch.tensor([4, 0, 2])).allowed.sum() == 4
    with pytest.raises(ValueError):
        causal_layout(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        causal_layout(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0)
    conv = HeteroGraphAttention(16, ([SENT, WORD], [NEXT, IN, AFTER]), heads=4)
    query_x, window_x, mask, window_index = windowed_case(3)
    good = causal_layout(torch.zeros(5, dtype=torch.long), torch.arange(5))
    with pytest.raises(ValueError):  # the causal relation must link the query type to itself
        dense_causal_window_attention(
            conv, query_x, window_x, mask, window_index, NEXT, IN, (WORD, "after", SENT), good
        )
    with pytest.raises(ValueError):  # a layout of other queries
        dense_causal_window_attention(
            conv, query_x, window_x, mask, window_index, NEXT, IN, AFTER, layout
        )


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "gcfg",
    [
        GraphConfig(left=2, right=2),
        GraphConfig(left=0, right=2, n2c="window"),
        GraphConfig.paper(left=2, right=2),
    ],
    ids=["l2r2-center", "l0r2-window", "paper-l2r2"],
)
def test_dense_skips_only_slots_out_of_reach(num_layers, gcfg):
    """The dense path computes window outputs only for slots within reach of the queries
    (fewer each layer, none in the last); outputs and every gradient still equal the
    edge-list path's, which updates every node, in float64."""
    graph = causal_case(gcfg) if gcfg.c2c else corpus_and_graph(gcfg)[-1]
    torch.manual_seed(0)
    cfg = AdapterConfig(
        ctx_channels=24,
        nbr_channels=20,
        token_channels=12,
        hidden_channels=32,
        out_channels=8,
        heads=4,
        num_layers=num_layers,
        dropout=0.0,
        attn_dropout=0.0,
        use_c2c=gcfg.c2c,
    )
    adapter = GraphAdapter(cfg).double()
    assert adapter.use_dense(graph)
    inputs = [x.double().requires_grad_() for x in adapter_inputs(graph, T=11 if gcfg.c2c else 9)]
    assert_dense_equals_edge_list_float64(adapter, graph, inputs)


# ---------------------------------------------------------------- window key/values, ctx side


@pytest.mark.parametrize(
    "gcfg",
    [
        GraphConfig(),
        GraphConfig(n2c="window"),
        GraphConfig(left=2, right=2, share_windows=False),
        GraphConfig.paper(),
        GraphConfig.paper(left=2, right=2, n2c="window"),
    ],
    ids=["center", "window", "l2r2-grid", "paper", "paper-l2r2-window"],
)
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
def test_ctx_forward_from_window_key_values_equals_forward(gcfg, layers, normalization):
    """The ctx side run on the windows' precomputed keys and values gives the full
    adapter's output (float64); a window's key/values do not depend on the queries: a
    graph of the same rows retrieved by other queries gives them row for row."""
    graph = causal_case(gcfg) if gcfg.c2c else corpus_and_graph(gcfg)[-1]
    torch.manual_seed(0)
    cfg = AdapterConfig(
        ctx_channels=24,
        nbr_channels=20,
        token_channels=12,
        hidden_channels=32,
        out_channels=8,
        heads=4,
        num_layers=layers,
        use_c2c=gcfg.c2c,
        normalization=normalization,
    )
    adapter = GraphAdapter(cfg).double().eval()
    ctx_x, nbr_x, tok_x = (x.double() for x in adapter_inputs(graph, T=11 if gcfg.c2c else 9))
    key_values = adapter.window_key_values(graph, nbr_x, tok_x)
    slots = len(graph.layout.query_slots)
    assert len(key_values) == layers
    assert all(k.shape == v.shape == (graph.layout.num_windows, slots, 32) for k, v in key_values)
    torch.testing.assert_close(
        adapter.ctx_forward(graph, ctx_x, key_values),
        adapter(graph, ctx_x, nbr_x, tok_x),
        atol=1e-12,
        rtol=1e-10,
    )
    # The windows of the same rows retrieved one per query: the same key/values per row.
    tokens, docs = corpus_and_graph(gcfg)[1:3]
    rows = window_rows(graph)
    valid = rows >= 0
    unique_rows = rows[valid].unique()
    single = build_context_graph(unique_rows.view(1, -1, 1), tokens, docs, gcfg)
    assert torch.equal(window_rows(single), unique_rows)
    at = torch.searchsorted(unique_rows, rows[valid])
    gen = torch.Generator().manual_seed(7)
    nbr_table, tok_table = torch.randn(120, 20, generator=gen), torch.randn(257, 12, generator=gen)

    def features(g):
        return (nbr_table[g[NBR].corpus_id].double(), tok_table[g[NBR].token_id].double())

    key_values = adapter.window_key_values(graph, *features(graph))
    alone = adapter.window_key_values(single, *features(single))
    for (k, v), (k1, v1) in zip(key_values, alone, strict=True):
        torch.testing.assert_close(k[valid], k1[at], atol=1e-12, rtol=0)
        torch.testing.assert_close(v[valid], v1[at], atol=1e-12, rtol=0)


def test_ctx_forward_checks_its_inputs():
    *_, graph = corpus_and_graph(GraphConfig())
    adapter = make_adapter()
    ctx_x, nbr_x, tok_x = adapter_inputs(graph)
    key_values = adapter.window_key_values(graph, nbr_x, tok_x)
    with pytest.raises(ValueError, match="1 layers, the adapter 3"):
        adapter.ctx_forward(graph, ctx_x, key_values[:1])
    irregular = corpus_and_graph(GraphConfig(deduplicate=True))[-1]
    with pytest.raises(ValueError, match="window-grid layout"):
        adapter.window_key_values(irregular, *adapter_inputs(irregular)[1:])
    with pytest.raises(ValueError, match="token embeddings"):
        adapter.window_key_values(graph, nbr_x)


def test_distinct_token_rows_give_the_per_node_result_and_gradients():
    """nbr_token_x holding each distinct token once plus nbr_token_index gives the output
    and every parameter gradient of per-node token features (float64)."""
    *_, graph = corpus_and_graph(GraphConfig())
    torch.manual_seed(0)
    adapter = make_adapter().double()
    ctx_x, nbr_x, _ = (x.double() for x in adapter_inputs(graph))
    table = torch.randn(257, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tokens, index = graph[NBR].token_id.unique(return_inverse=True)
    results = []
    for token_x, token_index in ((table[graph[NBR].token_id], None), (table[tokens], index)):
        adapter.zero_grad(set_to_none=True)
        out = adapter(graph, ctx_x, nbr_x, token_x, nbr_token_index=token_index)
        out.square().sum().backward()
        key_values = adapter.window_key_values(graph, nbr_x, token_x, token_index)
        results.append(
            (
                out.detach(),
                {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None},
                torch.cat([torch.cat(kv, -1) for kv in key_values], -1),
            )
        )
    (out_a, grads_a, kv_a), (out_b, grads_b, kv_b) = results
    torch.testing.assert_close(out_b, out_a, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(kv_b, kv_a, atol=1e-12, rtol=1e-10)
    assert grads_a.keys() == grads_b.keys() and any("token_in" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-12, rtol=1e-10)
