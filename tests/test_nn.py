"""Tests of HeteroGraphAttention and GraphAdapter against naive references."""
from __future__ import annotations

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
)
from hetgraph.nn import AdapterConfig, GraphAdapter, HeteroGraphAttention

METADATA = context_graph_metadata(c2c=True)


def random_hetero(seed: int, num_ctx: int = 6, num_nbr: int = 15, channels: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = {CTX: torch.randn(num_ctx, channels, generator=gen), NBR: torch.randn(num_nbr, channels, generator=gen)}
    ei = {
        N2N: torch.randint(0, num_nbr, (2, 30), generator=gen),
        N2C: torch.stack([torch.randint(0, num_nbr, (12,), generator=gen), torch.randint(0, num_ctx - 1, (12,), generator=gen)]),
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
                m = sum((s.softmax(0).unsqueeze(-1) * vals).sum(0) for s, vals in per_rel) / len(per_rel)
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


def corpus_and_graph(cfg: GraphConfig, seed: int = 0, B: int = 3, T: int = 9, K: int = 4, N: int = 120):
    gen = torch.Generator().manual_seed(seed)
    docs = (torch.arange(N) // 17).to(torch.int32)
    tokens = torch.randint(0, 257, (N,), generator=gen)
    ids = torch.randint(0, N, (B, T, K), generator=gen)
    ids[torch.rand(B, T, K, generator=gen) < 0.2] = -1
    ids[0, 0] = -1  # a query without neighbours
    return ids, tokens, docs, build_context_graph(ids, tokens, docs, cfg)


def adapter_inputs(graph, seed: int = 0, ctx_c: int = 24, nbr_c: int = 20, tok_c: int = 12, N: int = 120, T: int = 9):
    gen = torch.Generator().manual_seed(seed + 100)
    # Features are functions of (sequence, position) / corpus row, so sub-graphs see the same values.
    ctx_table = torch.randn(16, T, ctx_c, generator=gen)
    nbr_table = torch.randn(N, nbr_c, generator=gen)
    tok_table = torch.randn(257, tok_c, generator=gen)
    ctx_x = ctx_table[graph[CTX].batch_index, graph[CTX].seq_index]
    return ctx_x, nbr_table[graph[NBR].corpus_id], tok_table[graph[NBR].token_id]


def make_adapter(**kw) -> GraphAdapter:
    torch.manual_seed(0)
    cfg = AdapterConfig(ctx_channels=24, nbr_channels=20, token_channels=12, hidden_channels=32, out_channels=8, heads=4, **kw)
    return GraphAdapter(cfg).eval()


@pytest.mark.parametrize(
    "gcfg", [GraphConfig(), GraphConfig(n2c="window"), GraphConfig(left=2, right=2), GraphConfig(left=0, right=2, n2c="window")],
    ids=["center", "window", "l2r2", "l0r2-window"],
)
@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("share", [True, False], ids=["shared", "per-query"])
def test_dense_path_equals_edge_list_path(gcfg, normalization, share):
    gcfg = GraphConfig(**{**gcfg.to_dict(), "share_windows": share})
    *_, graph = corpus_and_graph(gcfg)
    assert graph.layout == ("shared" if share else "grid")
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
    walk = torch.randint(0, 3, (B, T), generator=gen).cumsum(1) + torch.randint(0, N - 40, (B, 1), generator=gen)
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
    shared = build_context_graph(ids, tokens, docs, GraphConfig(**{**gcfg.to_dict(), "share_windows": True}), **kw)
    official = build_context_graph(ids, tokens, docs, GraphConfig(**{**gcfg.to_dict(), "share_windows": False}), **kw)
    return shared, official


@pytest.mark.parametrize("n2c", ["center", "window"])
@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_windows_give_the_official_ctx_outputs(n2c, normalization, seed):
    shared, official = build_pair(GraphConfig(left=1, right=2, n2c=n2c, leakage_radius=4), seed)
    assert shared.layout == "shared" and official.layout == "grid"
    assert shared[NBR].num_nodes < 0.75 * official[NBR].num_nodes  # real sharing happens
    adapter = make_adapter(normalization=normalization)
    reference = adapter(official, *adapter_inputs(official, T=10), path="sparse")
    assert torch.isfinite(reference).all()
    for graph in (shared, official):
        for path in ("dense", "sparse"):
            out = adapter(graph, *adapter_inputs(graph, T=10), path=path)
            assert (out - reference).abs().max() <= 1e-5, (graph.layout, path)


@pytest.mark.parametrize("n2c", ["center", "window"])
def test_shared_windows_attention_weights_match_official_edge_by_edge(n2c):
    shared, official = build_pair(GraphConfig(n2c=n2c, leakage_radius=4), 3)
    adapter = make_adapter()
    _, attn_s = adapter(shared, *adapter_inputs(shared, T=10), return_attention_weights=True)
    _, attn_o = adapter(official, *adapter_inputs(official, T=10), return_attention_weights=True)
    for layer_s, layer_o in zip(attn_s, attn_o):
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
    assert graph.layout == "shared" and graph.num_windows == 0
    adapter = make_adapter()
    ctx_x = torch.randn(6, 24)
    nbr_x, tok_x = torch.zeros(0, 20), torch.zeros(0, 12)
    dense = adapter(graph, ctx_x, nbr_x, tok_x)
    torch.testing.assert_close(dense, adapter(graph, ctx_x, nbr_x, tok_x, path="sparse"))


def test_forward_grid_checks_layout_arguments():
    conv = HeteroGraphAttention(16, context_graph_metadata(), heads=4)
    with pytest.raises(ValueError):
        conv.forward_grid(torch.randn(2, 16), torch.randn(3, 3, 16), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        conv.forward_grid(torch.randn(2, 16), torch.randn(2, 1, 3, 16), torch.ones(2, 1, 3, dtype=torch.bool),
                          window=torch.zeros(2, 1, dtype=torch.long))


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


def test_dense_not_taken_for_irregular_graphs():
    adapter = make_adapter(use_c2c=True)
    *_, g = corpus_and_graph(GraphConfig(c2c=True))
    assert not adapter.use_dense(g)
    with pytest.raises(ValueError):
        adapter(g, *adapter_inputs(g), path="dense")
    *_, g = corpus_and_graph(GraphConfig(deduplicate=True))
    assert not adapter.use_dense(g)
    # c2c requested but the adapter has no c2c relation: c2c edges are ignored, dense allowed only without them
    assert not make_adapter().use_dense(corpus_and_graph(GraphConfig(c2c=True))[-1])


@pytest.mark.parametrize(
    "gcfg", [GraphConfig(), GraphConfig(c2c=True, c2c_window=4), GraphConfig(deduplicate=True, n2c="window")],
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
    del permuted[NBR].grid_index
    permuted.layout = "irregular"
    permuted[N2N].edge_index = inv[graph[N2N].edge_index]
    e = graph[N2C].edge_index
    permuted[N2C].edge_index = torch.stack([inv[e[0]], e[1]])
    out_p = adapter(permuted, ctx_x, nbr_x[perm], tok_x[perm])
    torch.testing.assert_close(out_p, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["sparse", "dense", "dense-per-query"])
def test_gradients_reach_every_parameter(path):
    gcfg = GraphConfig(c2c=path == "sparse", share_windows=path != "dense-per-query")
    path = path.split("-")[0]
    *_, graph = corpus_and_graph(gcfg)
    adapter = make_adapter(use_c2c=gcfg.c2c, dropout=0.1, attn_dropout=0.1).train()
    out = adapter(graph, *adapter_inputs(graph), path=path)
    (out * torch.randn_like(out)).sum().backward()
    last = adapter.config.num_layers - 1
    # Parameters that only update nbr nodes in the last layer cannot reach the ctx output.
    dead = (f"convs.{last}.lin_out.nbr", f"convs.{last}.norm.nbr", f"convs.{last}.rel_att.nbr__n2n",
            f"convs.{last}.rel_msg.nbr__n2n", f"convs.{last}.rel_prior.nbr__n2n", f"ffns.{last}.nbr",
            f"ffn_norms.{last}.nbr")
    for name, p in adapter.named_parameters():
        if name.startswith(dead) or (path == "dense" and "c2c" in name):
            assert p.grad is None or p.grad.abs().sum() == 0, name
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


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
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.parameters()))
