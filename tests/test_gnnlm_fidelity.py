"""hetgraph's paper mode against an independent port of the official GNN-LM code (float64).

The port (``tests/gnnlm_reference.py``) is written from ShannonAI/GNN-LM's ``hgt.py`` and
``token_block_dataset.py``; hetgraph's adapter loads the port's official-layout state dict
with :meth:`GraphAdapter.from_gnnlm_state_dict` and runs on graphs built with
:meth:`GraphConfig.paper`.
"""

from __future__ import annotations

import re

import pytest
import torch
from gnnlm_reference import HGT, batch_graphs, build_block_graph, randomize_
from test_fusion import build_store, repeated_pattern_split
from torch_geometric.nn import HGTConv

from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.graph import GraphConfig, build_context_graph, leakage_mask
from hetgraph.graph.config import C2C, CTX, N2C, N2N, NBR, context_graph_metadata
from hetgraph.nn import AdapterConfig, GraphAdapter, HeteroGraphAttention
from hetgraph.nn.gnnlm import GNNLMStateDictError
from hetgraph.testing import FAMILIES

TOL = 1e-10
# Three documents; windows near 11|12 and 26|27 cross document boundaries, rows 0 and 39
# touch the corpus ends.
DOCS = torch.tensor([0] * 12 + [1] * 15 + [2] * 13)
N = DOCS.numel()
B, T, K = 2, 6, 3


def _neighbours(case: str, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, N, (B, T, K), generator=generator)
    ids[0, 0] = torch.tensor([0, 39, 11])  # corpus ends and a document boundary
    ids[1, 2] = torch.tensor([12, 26, 27])
    ids[0, 5] = torch.tensor([12, 30, 9])  # query row 10 (doc 0): 12 (doc 1) leaks officially
    if case in ("partial", "no_neighbours"):
        ids[0, 1, 1:] = -1  # partially missing
        ids[1, 3, 0] = -1
    if case == "no_neighbours":
        ids[0, 4] = -1  # a query with no neighbour: official m = (m_c2c + 0) / 2
        ids[1, 0] = -1
    if case == "none_at_all":
        ids[:] = -1  # no n2c edge in the whole batch: DGL leaves `inter` out of the mean
    return ids


def _reference_output(ref: HGT, ids, query_rows, ctx_x, feats, left, right, radius):
    graphs = [
        build_block_graph(
            ids[b].tolist(),
            None if query_rows is None else query_rows[b].tolist(),
            N,
            left,
            right,
            radius,
        )
        for b in range(B)
    ]
    g = batch_graphs(graphs)
    with torch.no_grad():
        out = ref(g, {"tgt": ctx_x.reshape(B * T, -1), "ntgt": feats[g.ntgt_offsets]})
    return out["tgt"], g


CASES = [
    # (case, layers, in, hidden, out, left, right, leakage)
    ("full", 1, 8, 8, 8, 1, 1, False),
    ("full", 3, 8, 8, 8, 1, 1, False),
    ("partial", 2, 12, 8, 10, 1, 1, False),
    ("partial", 3, 12, 8, 10, 2, 2, True),
    ("no_neighbours", 2, 8, 8, 8, 2, 2, True),
    ("no_neighbours", 3, 12, 8, 10, 1, 1, True),
    ("no_neighbours", 1, 8, 8, 6, 2, 1, False),
    ("none_at_all", 2, 12, 8, 8, 1, 1, False),
]


@pytest.mark.parametrize("share_windows", [True, False])
@pytest.mark.parametrize(
    ("case", "layers", "width_in", "hidden", "width_out", "left", "right", "leakage"), CASES
)
def test_paper_mode_equals_official_code(
    case, layers, width_in, hidden, width_out, left, right, leakage, share_windows
):
    gen = torch.Generator().manual_seed(layers * 100 + width_in + left + 7 * right)
    ref = HGT(width_in, hidden, width_out, layers, n_heads=2).double()
    randomize_(ref, gen)
    ref.eval()
    ids = _neighbours(case, gen)
    ctx_x = torch.randn(B, T, width_in, generator=gen, dtype=torch.float64)
    feats = torch.randn(N, width_in, generator=gen, dtype=torch.float64)
    # Training: the query text is in the corpus (rows 5..10 and 20..25), radius 3.
    query_rows = torch.stack([torch.arange(5, 11), torch.arange(20, 26)]) if leakage else None
    radius = 3 if leakage else 0
    expected, g = _reference_output(ref, ids, query_rows, ctx_x, feats, left, right, radius)

    adapter = GraphAdapter.from_gnnlm_state_dict(ref.state_dict()).eval()
    config = GraphConfig.paper(
        left=left, right=right, leakage_radius=radius, share_windows=share_windows
    )
    graph = build_context_graph(
        ids, torch.zeros(N, dtype=torch.long), DOCS, config, query_positions=query_rows
    )
    # Both paths: the edge lists and the dense path (causal c2c as masked attention).
    for path in ("sparse", "dense"):
        with torch.no_grad():
            got = adapter(graph, ctx_x.reshape(B * T, -1), feats[graph[NBR].corpus_id], path=path)
        assert got.dtype == torch.float64 and got.shape == (B * T, width_out)
        torch.testing.assert_close(got, expected, rtol=0, atol=TOL)
    if not share_windows:  # one window per (query, neighbour), exactly the official nodes
        assert sorted(graph[NBR].corpus_id.tolist()) == sorted(g.ntgt_offsets)
        assert graph[N2C].edge_index.size(1) == len(g.edges[("ntgt", "inter", "tgt")][0])
        assert graph[N2N].edge_index.size(1) == len(g.edges[("ntgt", "intra", "ntgt")][0])
        assert graph[C2C].edge_index.size(1) == len(g.edges[("tgt", "intra", "tgt")][0])


def test_leakage_and_clipping_ignore_documents_in_paper_mode():
    # Row 11 is the last of document 0: official windows run on into document 1, and a query
    # at row 13 (document 1) drops neighbour 11 with radius 3; hetgraph's default does neither.
    ids = torch.tensor([[[11, 30]]])
    rows = torch.tensor([[13]])
    tokens = torch.zeros(N, dtype=torch.long)
    paper = build_context_graph(
        ids, tokens, DOCS, GraphConfig.paper(leakage_radius=3), query_positions=rows
    )
    assert sorted(paper[NBR].corpus_id.tolist()) == [29, 30, 31]
    ids = torch.tensor([[[11, 30]]])
    paper = build_context_graph(ids, tokens, DOCS, GraphConfig.paper(leakage_radius=3))
    assert sorted(paper[NBR].corpus_id.tolist()) == [10, 11, 12, 29, 30, 31]
    default = build_context_graph(
        ids, tokens, DOCS, GraphConfig(leakage_radius=3), query_positions=rows
    )
    assert sorted(default[NBR].corpus_id.tolist()) == [10, 11, 29, 30, 31]


def test_gnnlm_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    config = AdapterConfig.paper(
        ctx_channels=12, nbr_channels=12, hidden_channels=8, out_channels=10, num_layers=2, heads=2
    )
    adapter = GraphAdapter(config).double().eval()
    randomize_(adapter, gen)
    sd = adapter.to_gnnlm_state_dict(prefix="decoder.hgt_decoder.")
    assert sd["decoder.hgt_decoder.gcs.1.relation_att"].shape == (2, 2, 4, 4)
    assert "decoder.hgt_decoder.adapt_ws.1.weight" in sd and "decoder.hgt_decoder.out.bias" in sd
    ref = HGT(12, 8, 10, 2, n_heads=2).double()
    ref.load_state_dict({k.removeprefix("decoder.hgt_decoder."): v for k, v in sd.items()})
    back = GraphAdapter.from_gnnlm_state_dict(sd, prefix="decoder.hgt_decoder.").eval()
    ids = _neighbours("partial", gen)
    ctx_x = torch.randn(B * T, 12, generator=gen, dtype=torch.float64)
    feats = torch.randn(N, 12, generator=gen, dtype=torch.float64)
    graph = build_context_graph(ids, torch.zeros(N, dtype=torch.long), DOCS, GraphConfig.paper())
    with torch.no_grad():
        a = adapter(graph, ctx_x, feats[graph[NBR].corpus_id])
        b = back(graph, ctx_x, feats[graph[NBR].corpus_id])
    assert torch.equal(a, b)
    expected, _ = _reference_output(ref.eval(), ids, None, ctx_x, feats, 1, 1, 0)
    torch.testing.assert_close(a, expected, rtol=0, atol=TOL)


def test_gnnlm_state_dict_errors_name_the_key():
    ref = HGT(8, 8, 8, 1, n_heads=2)
    sd = ref.state_dict()
    with pytest.raises(GNNLMStateDictError, match=re.escape("prefix 'decoder.'")):
        GraphAdapter.from_gnnlm_state_dict(sd, prefix="decoder.")
    missing = {k: v for k, v in sd.items() if k != "gcs.0.norms.1.bias"}
    with pytest.raises(GNNLMStateDictError, match=re.escape("'gcs.0.norms.1.bias'")):
        GraphAdapter.from_gnnlm_state_dict(missing)
    with pytest.raises(GNNLMStateDictError, match="unexpected"):
        GraphAdapter.from_gnnlm_state_dict({**sd, "gcs.0.extra": torch.zeros(1)})
    with pytest.raises(GNNLMStateDictError, match="feed_forward=False"):
        GraphAdapter(AdapterConfig(ctx_channels=8, nbr_channels=8)).to_gnnlm_state_dict()


@pytest.mark.parametrize(
    "name, bad",
    [
        ("gcs.0.relation_att", torch.zeros(4)),  # was an IndexError traceback
        ("adapt_ws.0.weight", torch.zeros(8)),
        ("gcs.0.k_linears.0.weight", torch.zeros(8, 8, 1)),
    ],
)
def test_gnnlm_state_dict_with_a_misshapen_tensor_names_it(name, bad):
    sd = {**HGT(8, 8, 8, 1, n_heads=2).state_dict(), name: bad}
    with pytest.raises(GNNLMStateDictError, match=re.escape(f"{name!r} has shape")):
        GraphAdapter.from_gnnlm_state_dict(sd)


def test_official_init_is_xavier_on_the_stacked_relations():
    conv = HeteroGraphAttention(
        64,
        context_graph_metadata(True),
        heads=8,
        relation_names={N2N: "intra", C2C: "intra", N2C: "inter"},
        relation_init="official",
    )
    ours = torch.stack([conv.rel_att["intra"], conv.rel_att["inter"]]).detach()
    official = torch.empty(2, 8, 8, 8)
    torch.nn.init.xavier_uniform_(official)
    bound = (6 / ((2 + 8) * 8 * 8)) ** 0.5  # what xavier_uniform_ uses for [R, H, d, d]
    assert ours.abs().max() <= bound and official.abs().max() <= bound
    assert ours.abs().max() > 0.9 * bound
    assert float(ours.std() / official.std()) == pytest.approx(1.0, abs=0.15)
    assert set(conv.rel_att) == {"intra", "inter"}


@pytest.mark.parametrize("c2c", [False, True])
def test_joint_messages_equal_hgtconv_aggregation(c2c):
    """``normalization="joint"`` aggregates exactly like PyG's HGTConv (before their different
    updates: HGTConv applies GELU, its out Linear and a sigmoid-gated skip, no LayerNorm)."""
    torch.manual_seed(0)
    metadata = context_graph_metadata(c2c)
    F_, H = 8, 2
    ours = HeteroGraphAttention(F_, metadata, heads=H, normalization="joint").double()
    theirs = HGTConv(F_, F_, metadata, heads=H).double()
    gen = torch.Generator().manual_seed(1)
    randomize_(ours, gen)
    E = len(metadata[1])
    with torch.no_grad():
        for t in metadata[0]:
            q, k, v = ours.lin_qkv[t].weight.chunk(3)
            qb, kb, vb = ours.lin_qkv[t].bias.chunk(3)
            theirs.kqv_lin.lins[t].weight.copy_(torch.cat([k, q, v]))
            theirs.kqv_lin.lins[t].bias.copy_(torch.cat([kb, qb, vb]))
        for e, edge_type in enumerate(metadata[1]):
            rel = ours.relation_parameters(edge_type)
            for h in range(H):
                theirs.k_rel.weight[h * E + e].copy_(rel.att[h])
                theirs.v_rel.weight[h * E + e].copy_(rel.msg[h])
            theirs.p_rel["__".join(edge_type)].copy_(rel.prior.view(1, H))
    ids = _neighbours("partial", gen)
    graph = build_context_graph(
        ids, torch.zeros(N, dtype=torch.long), DOCS, GraphConfig(c2c=c2c, share_windows=False)
    )
    x = {
        CTX: torch.randn(B * T, F_, generator=gen, dtype=torch.float64),
        NBR: torch.randn(graph[NBR].num_nodes, F_, generator=gen, dtype=torch.float64),
    }
    edges = {e: graph[e].edge_index for e in metadata[1]}
    captured = []
    for conv in (ours, theirs):
        conv.register_propagate_forward_hook(lambda m, i, out: captured.append(out))
    with torch.no_grad():
        ours(x, edges)
        theirs(x, edges)
    mine, pyg = captured
    torch.testing.assert_close(mine.reshape(pyg.shape), pyg, rtol=0, atol=TOL)


# ------------------------------------------------------------------ end to end, in a HetGraphLM
PAPER_SMALL = dict(num_layers=2, heads=2, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def pattern_split():
    return repeated_pattern_split()


def _head_input(model, input_ids):
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: captured.append(args[0].detach())
    )
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_mode_lm_is_output_layer_of_official_hgt(tmp_path, pattern_split, family):
    """FusionConfig.paper(): logits = lm_head(HGT(h)) with the official graph and features."""
    model, _tok, store, index = build_store(tmp_path, family, pattern_split)
    lm = HetGraphLM(
        model, store, index, FusionConfig.paper(k=4, adapter=AdapterConfig.paper(**PAPER_SMALL))
    )
    adapter = lm.engine.adapter_at("head")
    assert adapter.token_in is None and not adapter.config.feed_forward
    width = model.config.hidden_size
    ref = HGT(width, width, width, 2, n_heads=2)
    ref.load_state_dict(adapter.to_gnnlm_state_dict())
    ref.eval()
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = lm(input_ids, output_retrieval=True)
    ids = out.retrieval.neighbour_ids
    h = _head_input(model, input_ids)
    keys = torch.from_numpy(store.keys[:].astype("float32"))
    graphs = [
        build_block_graph(ids[b].tolist(), None, len(store), 1, 1, 0) for b in range(ids.shape[0])
    ]
    g = batch_graphs(graphs)
    with torch.no_grad():
        hgt = ref(g, {"tgt": h.reshape(-1, width), "ntgt": keys[g.ntgt_offsets]})["tgt"]
        expected = model.get_output_embeddings()(hgt.view(*h.shape))
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
    assert not torch.allclose(out.logits, base, atol=1e-3)  # replace mode: no zero gate


@pytest.mark.parametrize("embedding", ["own_token", "none", "label"])
def test_neighbour_embedding_options(tmp_path, pattern_split, embedding):
    model, _tok, store, index = build_store(tmp_path, "qwen2", pattern_split)
    lm = HetGraphLM(
        model, store, index, FusionConfig(k=4, neighbour_embedding=embedding, adapter=PAPER_SMALL)
    )
    adapter = lm.engine.adapter_at("head")
    assert (adapter.token_in is not None) == (embedding == "own_token")
    ids = torch.tensor([[[3, 50], [7, -1]]])
    graph = lm.engine.graph_inputs.build_graph(ids)
    hidden = torch.randn(1, 2, model.config.hidden_size)
    emb = model.get_input_embeddings()
    inputs = lm.engine.graph_inputs.adapter_inputs(graph, hidden, "head", emb, torch.float32)
    rows = graph[NBR].corpus_id
    with torch.no_grad():
        if embedding == "label":
            next_tokens = torch.from_numpy(store.next_tokens[rows.numpy()].astype("int64"))
            assert torch.equal(inputs.nbr_x, emb(next_tokens))
        else:
            stored = torch.from_numpy(store.keys[rows.numpy()].astype("float32"))
            assert torch.equal(inputs.nbr_x, stored)
    assert (inputs.nbr_token_x is not None) == (embedding == "own_token")
    if embedding == "own_token":  # each distinct token once, and each node's row of them
        tokens = graph[NBR].token_id
        assert inputs.nbr_token_x.size(0) == tokens.unique().numel() < tokens.numel()
        with torch.no_grad():
            assert torch.equal(inputs.nbr_token_x[inputs.nbr_token_index], emb(tokens))


def test_paper_mode_trains_from_the_datastore_with_c2c(tmp_path, pattern_split):
    # The first datastore window saw exactly these 40 tokens, so its stored keys are the
    # head-input states of a forward over them (up to fp16 rounding).
    model, _tok, store, index = build_store(tmp_path, "llama", pattern_split)
    lm = HetGraphLM(
        model,
        store,
        index,
        FusionConfig.paper(
            k=4,
            graph=GraphConfig.paper(leakage_radius=4),
            adapter=AdapterConfig.paper(**PAPER_SMALL),
        ),
    )
    assert lm.engine.graph_config.c2c and lm.engine.can_run_from_datastore
    rows = torch.arange(40)[None]
    input_ids = torch.from_numpy(pattern_split.tokens[:40].astype("int64"))[None]
    with torch.no_grad():
        full = lm(input_ids, query_positions=rows).logits
        cached = lm.forward_from_datastore(rows)
    torch.testing.assert_close(cached, full, rtol=2e-2, atol=2e-2)
    assert (full.argmax(-1) == cached.argmax(-1)).float().mean() > 0.95
    with pytest.raises(ValueError, match="contiguous spans"):
        lm.forward_from_datastore(torch.tensor([[0, 5, 6]]))


def test_leakage_mask_scope():
    ids, rows = torch.tensor([[11, 12, 30]]), torch.tensor([13])
    assert leakage_mask(ids, rows, DOCS, 3).tolist() == [[False, True, False]]
    assert leakage_mask(ids, rows, DOCS, 3, same_document=False).tolist() == [[True, True, False]]


def test_paper_mode_saves_and_loads(tmp_path, pattern_split):
    model, _tok, store, index = build_store(tmp_path, "gpt2", pattern_split)
    config = FusionConfig.paper(k=4, adapter=AdapterConfig.paper(**PAPER_SMALL))
    lm = HetGraphLM(model, store, index, config)
    randomize_(lm.engine.adapter_at("head"), torch.Generator().manual_seed(5))
    lm.save_pretrained(tmp_path / "adapter")
    loaded = HetGraphLM.from_pretrained(tmp_path / "adapter", model, store, index)
    assert loaded.config == config
    input_ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(lm(input_ids).logits, loaded(input_ids).logits)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (AdapterConfig, "relation_mean", "none"),
        (AdapterConfig, "input_maps", "gelu"),
        (AdapterConfig, "relation_init", "xavier"),
        (GraphConfig, "window_clip", "doc"),
        (GraphConfig, "leakage_scope", "all"),
        (FusionConfig, "fusion_mode", "add"),
        (FusionConfig, "neighbour_embedding", "token"),
    ],
)
def test_paper_options_are_checked(cls, field, value):
    with pytest.raises(ValueError, match=field):
        cls(**{field: value})


def test_orig_prob_ratio_mixes_the_base_distribution(tmp_path, pattern_split):
    model, _tok, store, index = build_store(tmp_path, "qwen2", pattern_split)
    plain = HetGraphLM(
        model, store, index, FusionConfig.paper(k=4, adapter=AdapterConfig.paper(**PAPER_SMALL))
    )
    mixed = HetGraphLM(
        model,
        store,
        index,
        FusionConfig.paper(k=4, adapter=AdapterConfig.paper(**PAPER_SMALL), orig_prob_ratio=0.25),
    )
    mixed.load_adapter_state_dict(plain.adapter_state_dict())
    input_ids = torch.from_numpy(pattern_split.tokens[:40].astype("int64"))[None]
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
        graph = plain(input_ids).logits
        got = mixed(input_ids).logits
        rows = torch.arange(40)[None]
        full = mixed(input_ids, query_positions=rows).logits
        cached = mixed.forward_from_datastore(rows)
    expected = torch.log(0.25 * base.softmax(-1) + 0.75 * graph.softmax(-1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, full, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="orig_prob_ratio"):
        FusionConfig(fusion_layers=(0,), orig_prob_ratio=0.5)


def test_dense_path_keeps_paper_options_without_c2c():
    # Without c2c the dense path runs; the official mean, bias, tied relations and maps must
    # give the edge-list numbers there too.
    gen = torch.Generator().manual_seed(11)
    adapter = (
        GraphAdapter(
            AdapterConfig.paper(
                ctx_channels=12,
                nbr_channels=12,
                hidden_channels=8,
                out_channels=10,
                use_c2c=False,
                **PAPER_SMALL,
            )
        )
        .double()
        .eval()
    )
    randomize_(adapter, gen)
    ids = _neighbours("no_neighbours", gen)
    graph = build_context_graph(
        ids, torch.zeros(N, dtype=torch.long), DOCS, GraphConfig.paper(c2c=False)
    )
    ctx_x = torch.randn(B * T, 12, generator=gen, dtype=torch.float64)
    nbr_x = torch.randn(graph[NBR].num_nodes, 12, generator=gen, dtype=torch.float64)
    assert adapter.use_dense(graph)
    with torch.no_grad():
        dense = adapter(graph, ctx_x, nbr_x, path="dense")
        sparse = adapter(graph, ctx_x, nbr_x, path="sparse")
    torch.testing.assert_close(dense, sparse, rtol=0, atol=1e-12)
