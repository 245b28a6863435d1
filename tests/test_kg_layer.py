"""The knowledge-graph branch of the layer and the adapter: the zero-initialised gate keeps an
untrained branch bit for bit the adapter without it, the gated messages against a naive
per-node reference, the fact encoder and the KGE tables it reads."""

from __future__ import annotations

import math

import pytest
import torch

from hetgraph.graph import (
    C2C,
    CTX,
    K2C,
    K2K,
    K2N,
    KG,
    N2C,
    N2N,
    NBR,
    GraphConfig,
    KGGraphConfig,
    build_context_graph,
    context_graph_metadata,
)
from hetgraph.kg import (
    EmbeddingConfig,
    FactIndex,
    KnowledgeGraph,
    add_facts,
    embed_knowledge_graph,
    load_kge_embeddings,
)
from hetgraph.kg.embeddings import KGE_MODELS
from hetgraph.nn import AdapterConfig, GraphAdapter, HeteroGraphAttention, KGFactEncoder
from hetgraph.testing import byte_tokenizer

E, R, D_E, D_R = 10, 3, 6, 4


def kg_inputs(seed: int, c2c: bool, kg_config: KGGraphConfig):
    """A context graph, the same graph with kg nodes, and the node features."""
    gen = torch.Generator().manual_seed(seed)
    N, B, T, K = 50, 2, 5, 3
    tokens = torch.randint(0, 40, (N,), generator=gen, dtype=torch.int32)
    docs = (torch.arange(N) // 25).to(torch.int32)
    ids = torch.randint(0, N, (B, T, K), generator=gen)
    graphs = [build_context_graph(ids, tokens, docs, GraphConfig(c2c=c2c)) for _ in range(2)]
    triples = torch.stack(
        [
            torch.randint(0, E, (30,), generator=gen),
            torch.randint(0, R, (30,), generator=gen),
            torch.randint(0, E, (30,), generator=gen),
        ],
        dim=1,
    )
    entities = torch.randint(-1, E, (B, T, 2), generator=gen)
    nbr_entities = torch.randint(-1, E, (graphs[1][NBR].num_nodes, 2), generator=gen)
    add_facts(graphs[1], FactIndex(triples, E, kg_config), entities, nbr_entities)
    ctx_x = torch.randn(B, T, 16, generator=gen)[
        graphs[0][CTX].batch_index, graphs[0][CTX].seq_index
    ]
    nbr_x = torch.randn(N, 12, generator=gen)[graphs[0][NBR].corpus_id]
    tables = torch.randn(E, D_E, generator=gen), torch.randn(R, D_R, generator=gen)
    return graphs[0], graphs[1], ctx_x, nbr_x, tables


def kg_adapter(tables, **kw) -> GraphAdapter:
    torch.manual_seed(0)
    config = AdapterConfig(
        ctx_channels=16,
        nbr_channels=12,
        hidden_channels=16,
        out_channels=8,
        heads=2,
        num_layers=2,
        kg_channels=2 * D_E + D_R,
        **kw,
    )
    adapter = GraphAdapter(config).eval()
    adapter.kg_in.set_embeddings(*tables)
    return adapter


def perturb(adapter: GraphAdapter, gates: bool = False) -> None:
    """Random weights everywhere (a "trained" adapter); the gates too with ``gates``."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if gates or "rel_gate" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


ZERO_GATE_CASES = [
    dict(normalization="joint"),
    dict(normalization="per_relation"),
    dict(normalization="per_relation", relation_mean="all", use_c2c=True),
    dict(normalization="joint", use_c2c=True, use_k2n=True, use_k2k=True),
    dict(normalization="per_relation", relation_mean="all", use_k2n=True, use_k2k=True),
    dict(normalization="per_relation", use_c2c=True, tie_intra=True, feed_forward=False),
]


@pytest.mark.parametrize("kw", ZERO_GATE_CASES, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("trained", [False, True])
def test_zero_gate_leaves_the_adapter_output_bit_for_bit_unchanged(kw, trained):
    kg_config = KGGraphConfig(k_kg=3, tails=True, kg2nbr=True, kg2kg=True)
    plain, with_kg, ctx_x, nbr_x, tables = kg_inputs(0, kw.get("use_c2c", False), kg_config)
    assert with_kg[K2C].edge_index.size(1) > 0 and with_kg[K2N].edge_index.size(1) > 0
    adapter = kg_adapter(tables, **kw)
    if trained:
        perturb(adapter)
    assert not adapter.use_dense(plain) and not adapter.use_dense(with_kg)
    out = adapter(plain, ctx_x, nbr_x)
    assert torch.equal(adapter(with_kg, ctx_x, nbr_x), out)
    # The kg messages do reach ctx: once the gates open, the output moves.
    perturb(adapter, gates=True)
    assert not torch.allclose(adapter(with_kg, ctx_x, nbr_x), adapter(plain, ctx_x, nbr_x))


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
def test_an_adapter_without_kg_branch_ignores_kg_nodes(normalization):
    plain, with_kg, ctx_x, nbr_x, _ = kg_inputs(1, False, KGGraphConfig(kg2kg=True))
    torch.manual_seed(0)
    config = AdapterConfig(
        ctx_channels=16, nbr_channels=12, hidden_channels=16, heads=2, normalization=normalization
    )
    adapter = GraphAdapter(config).eval()
    assert adapter.use_dense(plain) and adapter.use_dense(with_kg)  # dense path, both
    assert torch.equal(adapter(with_kg, ctx_x, nbr_x), adapter(plain, ctx_x, nbr_x))
    sparse = adapter(with_kg, ctx_x, nbr_x, path="sparse")
    assert torch.equal(sparse, adapter(plain, ctx_x, nbr_x, path="sparse"))


def test_kg_adapter_refuses_the_dense_path_and_neighbour_states():
    plain, _, ctx_x, nbr_x, tables = kg_inputs(0, False, KGGraphConfig())
    adapter = kg_adapter(tables)
    with pytest.raises(ValueError, match="knowledge-graph branch"):
        adapter(plain, ctx_x, nbr_x, path="dense")
    with pytest.raises(ValueError, match="knowledge-graph branch"):
        adapter.window_key_values(plain, nbr_x)


def test_only_the_gates_learn_first():
    _, with_kg, ctx_x, nbr_x, tables = kg_inputs(0, False, KGGraphConfig())
    adapter = kg_adapter(tables)
    adapter(with_kg, ctx_x, nbr_x).square().sum().backward()
    gates = [p for n, p in adapter.named_parameters() if "rel_gate" in n]
    assert len(gates) == 2  # k2c in each of the 2 layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates)
    # Behind a closed gate the fact encoder gets no gradient yet.
    assert adapter.kg_in.lin.weight.grad is None or not adapter.kg_in.lin.weight.grad.any()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_k2n": True, "use_k2k": True},
        {"use_c2c": True, "tie_intra": True, "use_k2k": True},
        {"output_bias": True, "use_k2n": True, "feed_forward": False},
        {"use_n2c": False},
        {"use_n2c": False, "use_c2c": True, "token_channels": 6},
        {"use_n2c": False, "use_k2n": True, "token_channels": 6},
    ],
)
def test_parameter_count_counts_the_kg_branch(kw):
    config = AdapterConfig(
        ctx_channels=16, nbr_channels=12, out_channels=8, num_layers=2, kg_channels=10, **kw
    )
    adapter = GraphAdapter(config)
    assert config.parameter_count() == sum(p.numel() for p in adapter.parameters())
    assert "kg=10" in repr(adapter)


@pytest.mark.parametrize("use_c2c", [False, True])
def test_the_kg_alone_adapter_reads_no_corpus_neighbour(use_c2c):
    # use_n2c=False: the "KG alone" control. Whatever the neighbours' features, the output
    # is the same; the facts still move it once the gates open.
    _, with_kg, ctx_x, nbr_x, tables = kg_inputs(2, use_c2c, KGGraphConfig(k_kg=3, kg2kg=True))
    adapter = kg_adapter(tables, use_n2c=False, use_c2c=use_c2c, use_k2k=True)
    assert NBR not in adapter.node_types and N2C not in adapter.edge_types
    assert adapter.nbr_in is None and "n2c=False" in repr(adapter)
    perturb(adapter)
    closed = adapter(with_kg, ctx_x, nbr_x)
    assert torch.equal(adapter(with_kg, ctx_x, torch.randn_like(nbr_x)), closed)
    perturb(adapter, gates=True)
    opened = adapter(with_kg, ctx_x, nbr_x)
    assert not torch.allclose(opened, closed)
    assert torch.equal(adapter(with_kg, ctx_x, torch.randn_like(nbr_x)), opened)


def test_kg_alone_needs_a_knowledge_graph():
    config = AdapterConfig(ctx_channels=16, nbr_channels=12, hidden_channels=16, use_n2c=False)
    with pytest.raises(ValueError, match=r"use_n2c=False.*--kg"):
        GraphAdapter(config)
    with pytest.raises(ValueError, match="needs the kg node type"):
        context_graph_metadata(kg=False, n2c=False)
    assert context_graph_metadata(kg=True, n2c=False) == ([CTX, KG], [K2C])
    assert context_graph_metadata(kg=True, k2n=True, n2c=False) == (
        [CTX, NBR, KG],
        [N2N, K2C, K2N],
    )


# ----------------------------------------------------------------- layer vs naive reference
METADATA = context_graph_metadata(True, kg=True, k2n=True, k2k=True)
GATED = [K2C, K2N]


def random_kg_hetero(seed: int):
    gen = torch.Generator().manual_seed(seed)
    sizes = {CTX: 6, NBR: 8, KG: 5}
    x = {t: torch.randn(n, 16, generator=gen) for t, n in sizes.items()}
    counts = {N2N: 20, N2C: 10, C2C: 8, K2C: 9, K2N: 6, K2K: 7}
    ei = {}
    for (src, rel, dst), count in counts.items():
        ei[(src, rel, dst)] = torch.stack(
            [
                torch.randint(0, sizes[src], (count,), generator=gen),
                torch.randint(0, sizes[dst] - 1, (count,), generator=gen),  # last: no edge
            ]
        )
    return x, ei


def relation_messages(conv, qkv, ei, edge_type, v):
    """Per-head softmax-normalised message of one relation into node ``v`` (or None)."""
    H, D = conv.heads, conv.head_channels
    src_type, _, dst_type = edge_type
    sources = [int(u) for u, w in ei[edge_type].t().tolist() if w == v]
    if not sources:
        return None, None
    rel = conv.relation_parameters(edge_type)
    q = qkv[dst_type][v, 0]  # [H, D]
    scores, values = [], []
    for u in sources:
        k, val = qkv[src_type][u, 1], qkv[src_type][u, 2]
        key = torch.stack([k[h] @ rel.att[h] for h in range(H)])
        scores.append((q * key).sum(-1) * rel.prior / math.sqrt(D))
        values.append(torch.stack([val[h] @ rel.msg[h] for h in range(H)]))
    return torch.stack(scores), torch.stack(values)  # [S, H], [S, H, D]


def reference_node(conv, qkv, x, ei, t, v):
    H, D = conv.heads, conv.head_channels
    base = [e for e in conv.edge_types if e[2] == t and e not in conv.gated_relations]
    parts = [relation_messages(conv, qkv, ei, e, v) for e in base]
    parts = [(s, m) for s, m in parts if s is not None]
    m = torch.zeros(H, D)
    if parts and conv.normalization == "joint":
        alpha = torch.cat([s for s, _ in parts]).softmax(0)
        m = (alpha[..., None] * torch.cat([val for _, val in parts])).sum(0)
    elif parts:
        m = sum((s.softmax(0)[..., None] * val).sum(0) for s, val in parts)
        if conv.relation_mean == "reached":
            m = m / len(parts)
        else:
            m = m / sum(1 for e in base if ei[e].size(1) > 0)
    for e in conv.gated_relations:
        if e[2] == t:
            s, val = relation_messages(conv, qkv, ei, e, v)
            if s is not None:
                gate = conv.rel_gate["__".join(e)].view(H, D)
                m = m + gate * (s.softmax(0)[..., None] * val).sum(0)
    out = conv.lin_out[t](m.reshape(-1))
    return conv.norm[t](x[t][v] + out)


@pytest.mark.parametrize("normalization", ["joint", "per_relation"])
@pytest.mark.parametrize("relation_mean", ["reached", "all"])
@pytest.mark.parametrize("gate", ["ones", "random"])
def test_gated_kg_messages_match_naive_reference(normalization, relation_mean, gate):
    torch.manual_seed(0)
    conv = HeteroGraphAttention(
        16,
        METADATA,
        heads=2,
        normalization=normalization,
        relation_mean=relation_mean,
        gated_relations=GATED,
    ).eval()
    assert all(not p.any() for p in conv.rel_gate.values())  # zero-initialised
    with torch.no_grad():
        for p in conv.rel_gate.values():
            p.copy_(torch.ones_like(p) if gate == "ones" else torch.randn_like(p))
    x, ei = random_kg_hetero(0)
    out, attention = conv(x, ei, return_attention_weights=True)
    assert set(attention) == set(METADATA[1])
    assert attention[K2C][1].shape == (ei[K2C].size(1), 2)
    with torch.no_grad():
        qkv = {t: conv.project(t, x[t]) for t in x}
        for t in x:
            ref = torch.stack([reference_node(conv, qkv, x, ei, t, v) for v in range(x[t].size(0))])
            torch.testing.assert_close(out[t], ref, rtol=1e-5, atol=1e-5)


def test_zero_gate_layer_equals_the_layer_without_kg_edges():
    torch.manual_seed(0)
    conv = HeteroGraphAttention(16, METADATA, heads=2, gated_relations=GATED).eval()
    x, ei = random_kg_hetero(1)
    without = {e: ei[e] for e in (N2N, N2C, C2C, K2K)}
    out, ref = conv(x, ei), conv(x, without)
    assert torch.equal(out[CTX], ref[CTX]) and torch.equal(out[NBR], ref[NBR])
    with pytest.raises(ValueError, match="gated relation"):
        HeteroGraphAttention(16, context_graph_metadata(), gated_relations=[K2C])


# ------------------------------------------------------------------------ fact encoder
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_fact_encoder_projects_the_combined_embeddings(combine):
    gen = torch.Generator().manual_seed(0)
    entity = torch.randn(E, 6, generator=gen)
    relation = torch.randn(R, 6, generator=gen)
    encoder = KGFactEncoder.from_embeddings(entity, relation, 8, combine)
    head, rel, tail = torch.tensor([0, 3, 9]), torch.tensor([2, 0, 1]), torch.tensor([1, 1, 4])
    parts = (entity[head], relation[rel], entity[tail])
    raw = torch.cat(parts, -1) if combine == "concat" else parts[0] + parts[1] + parts[2]
    torch.testing.assert_close(encoder(head, rel, tail), encoder.lin(raw))
    # The tables are frozen and not saved: the knowledge-graph directory holds them.
    assert set(encoder.state_dict()) == {"lin.weight", "lin.bias"}
    assert [n for n, _ in encoder.named_parameters()] == ["lin.weight", "lin.bias"]
    assert "entities=10" in repr(encoder)
    with pytest.raises(ValueError, match="width"):
        encoder.set_embeddings(entity[:, :4], relation)
    with pytest.raises(ValueError, match="no embeddings"):
        KGFactEncoder(encoder.in_channels, 8, combine)(head, rel, tail)
    with pytest.raises(ValueError, match="one width"):
        KGFactEncoder.from_embeddings(entity, relation[:, :2], 8, "sum")


@pytest.fixture(scope="module")
def tiny_kg(tmp_path_factory):
    root = tmp_path_factory.mktemp("kg-layer")
    lines = [f"e{i}\tr{s}\te{(i + s) % 8}" for s in (1, 3) for i in range(8)]
    (root / "t.tsv").write_text("\n".join(lines) + "\n")
    KnowledgeGraph.build(root / "t.tsv", None, byte_tokenizer()).save_pretrained(root / "kg")
    return root / "kg"


@pytest.mark.parametrize("model", KGE_MODELS)
def test_kge_tables_feed_the_fact_encoder(tiny_kg, model):
    config = EmbeddingConfig(model=model, dim=4, epochs=1, batch_size=8, valid_fraction=0.2)
    embed_knowledge_graph(tiny_kg, config)
    entity, relation = load_kge_embeddings(tiny_kg)
    assert entity.shape == (8, 8 if model in ("rotate", "complex") else 4)
    assert relation.shape == (2, entity.size(1))  # RotatE phases as (cos, sin)
    for combine in ("concat", "sum"):
        encoder = KGFactEncoder.from_embeddings(entity, relation, 16, combine)
        assert encoder(torch.tensor([0]), torch.tensor([1]), torch.tensor([2])).shape == (1, 16)


def test_adapter_config_round_trips_with_a_kg_branch():
    config = AdapterConfig(kg_channels=12, kg_combine="sum", use_k2n=True, use_k2k=True)
    assert AdapterConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="kg_channels"):
        AdapterConfig(use_k2k=True)
    assert AdapterConfig.from_dict({"num_layers": 2}).kg_channels == 0


def test_resolved_fills_the_kg_branch():
    config = AdapterConfig().resolved(
        ctx_channels=16, nbr_channels=12, kg_channels=10, use_k2n=True, use_k2k=False
    )
    assert (config.kg_channels, config.use_k2n, config.use_k2k) == (10, True, False)
    assert AdapterConfig().resolved(ctx_channels=16, nbr_channels=12).kg_channels == 0
