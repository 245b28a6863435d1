"""The ``kg`` node type of the context graph: fact selection and the graph's kg nodes and
edges, against naive loop references on a small synthetic knowledge graph."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.data import Batch

from hetgraph.graph import (
    CTX,
    K2C,
    K2K,
    K2N,
    KG,
    NBR,
    GraphConfig,
    KGGraphConfig,
    add_kg_nodes,
    build_context_graph,
)
from hetgraph.kg import FactIndex, add_facts, select_facts, window_entities
from hetgraph.kg.linking import EntityLinker

RELATIONS = ["hypernym", "part_of", "antonym"]
NUM_ENTITIES = 12


def synthetic_kg(seed: int, num_triples: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    heads = torch.randint(0, NUM_ENTITIES, (num_triples,), generator=gen)
    rels = torch.randint(0, len(RELATIONS), (num_triples,), generator=gen)
    tails = torch.randint(0, NUM_ENTITIES, (num_triples,), generator=gen)
    heads[:6] = 3  # an entity with more facts than k_kg
    return torch.stack([heads, rels, tails], dim=1)


def random_links(gen: torch.Generator, *shape: int, m: int = 2) -> torch.Tensor:
    entities = torch.randint(0, NUM_ENTITIES, (*shape, m), generator=gen)
    entities[torch.rand(*shape, m, generator=gen) < 0.4] = -1
    return entities


def reference_select(triples, entities, config: KGGraphConfig) -> list[int]:
    """The k_kg best triples of one position's entities: a loop over every triple."""
    names = config.relations
    priority = {
        r: (names.index(n) if names else 0)
        for r, n in enumerate(RELATIONS)
        if names is None or n in names
    }
    ents = {int(e) for e in entities if e >= 0}
    found = []
    for i, (h, r, t) in enumerate(triples.tolist()):
        if r in priority and (h in ents or (config.tails and t in ents)):
            found.append((priority[r], i))
    return [i for _, i in sorted(found)[: config.k_kg]]


KG_CONFIGS = [
    KGGraphConfig(k_kg=1),
    KGGraphConfig(k_kg=3),
    KGGraphConfig(k_kg=4, relations=("part_of", "hypernym")),
    KGGraphConfig(k_kg=2, tails=True, kg2kg=True),
    KGGraphConfig(k_kg=5, relations=("antonym",), tails=True, kg2nbr=True, kg2kg=True),
]


@pytest.mark.parametrize("config", KG_CONFIGS, ids=lambda c: str(c.to_dict()))
@pytest.mark.parametrize("seed", [0, 1])
def test_fact_selection_matches_naive_reference(config, seed):
    triples = synthetic_kg(seed)
    index = FactIndex(triples, NUM_ENTITIES, config, RELATIONS)
    gen = torch.Generator().manual_seed(seed + 10)
    entities = random_links(gen, 3, 7, m=3)
    entities[0, 0] = torch.tensor([3, 3, -1])  # the same entity twice
    chosen = index.select(entities)
    assert chosen.shape == (3, 7, config.k_kg)
    for b in range(3):
        for t in range(7):
            ref = reference_select(triples, entities[b, t], config)
            got = chosen[b, t].tolist()
            assert got == ref + [-1] * (config.k_kg - len(ref)), (b, t)


def test_fact_index_rejects_bad_inputs():
    triples = synthetic_kg(0)
    with pytest.raises(ValueError, match="unknown relations"):
        FactIndex(triples, NUM_ENTITIES, KGGraphConfig(relations=("nope",)), RELATIONS)
    with pytest.raises(ValueError, match="relation_names"):
        FactIndex(triples, NUM_ENTITIES, KGGraphConfig(relations=("antonym",)))
    with pytest.raises(ValueError, match="outside"):
        FactIndex(triples, 3, KGGraphConfig())
    index = FactIndex(triples, NUM_ENTITIES, KGGraphConfig())
    with pytest.raises(ValueError, match="outside"):
        index.select(torch.tensor([[NUM_ENTITIES]]))
    empty = FactIndex(torch.empty(0, 3, dtype=torch.long), NUM_ENTITIES, KGGraphConfig(k_kg=2))
    assert empty.select(torch.tensor([[1, -1]])).tolist() == [[-1, -1]]


def make_graph(seed: int, masked: bool, graph_config: GraphConfig | None = None):
    gen = torch.Generator().manual_seed(seed)
    N, B, T, K = 60, 2, 6, 3
    tokens = torch.randint(0, 50, (N,), generator=gen, dtype=torch.int32)
    docs = (torch.arange(N) // 20).to(torch.int32)
    ids = torch.randint(0, N, (B, T, K), generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7 if masked else None
    graph = build_context_graph(ids, tokens, docs, graph_config or GraphConfig(), query_mask=mask)
    return graph, random_links(gen, B, T), gen


def reference_kg_graph(graph, triples, entities, nbr_entities, config: KGGraphConfig):
    """Facts as (sequence, triple) and the k2c / k2n / k2k edge sets, by loops."""
    positions = list(
        zip(graph[CTX].batch_index.tolist(), graph[CTX].seq_index.tolist(), strict=True)
    )
    owners = [(b, ("ctx", c), entities[b, t]) for c, (b, t) in enumerate(positions)]
    if config.kg2nbr:
        nbr_b = graph[NBR].batch_index.tolist()
        owners += [(nbr_b[n], ("nbr", n), nbr_entities[n]) for n in range(len(nbr_b))]
    chosen = [(b, who, reference_select(triples, ents, config)) for b, who, ents in owners]
    facts = sorted({(b, i) for b, _, picks in chosen for i in picks})
    node = {f: n for n, f in enumerate(facts)}
    k2c = [(node[b, i], who[1]) for b, who, picks in chosen if who[0] == "ctx" for i in picks]
    k2n = [(node[b, i], who[1]) for b, who, picks in chosen if who[0] == "nbr" for i in picks]
    k2k = set()
    if config.kg2kg:
        for u, (bu, iu) in enumerate(facts):
            for v, (bv, iv) in enumerate(facts):
                eu = {int(triples[iu, 0]), int(triples[iu, 2])}
                ev = {int(triples[iv, 0]), int(triples[iv, 2])}
                if bu == bv and eu & ev:
                    k2k.add((u, v))
    return facts, k2c, k2n, sorted(k2k)


@pytest.mark.parametrize("config", KG_CONFIGS, ids=lambda c: str(c.to_dict()))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_kg_nodes_match_loop_reference(config, masked, seed):
    triples = synthetic_kg(seed)
    graph, entities, gen = make_graph(seed, masked)
    nbr_entities = random_links(gen, graph[NBR].num_nodes)
    index = FactIndex(triples, NUM_ENTITIES, config, RELATIONS)
    add_facts(graph, index, entities, nbr_entities)
    facts, k2c, k2n, k2k = reference_kg_graph(graph, triples, entities, nbr_entities, config)

    store = graph[KG]
    assert store.num_nodes == len(facts)
    assert list(zip(store.batch_index.tolist(), store.triple.tolist(), strict=True)) == facts
    assert torch.equal(
        torch.stack([store.head, store.relation, store.tail], 1), triples[store.triple]
    )
    # k2c in mention order: by position, each position's facts in rank order.
    assert [tuple(e) for e in graph[K2C].edge_index.t().tolist()] == k2c
    assert [tuple(e) for e in graph[K2N].edge_index.t().tolist()] == k2n
    assert [tuple(e) for e in graph[K2K].edge_index.t().tolist()] == sorted(
        k2k, key=lambda e: (e[1], e[0])
    )
    for edge_type in (K2C, K2N, K2K):
        assert graph[edge_type].edge_index.dtype == torch.int64

    # The visibility matrix: a fact reaches only positions of its sequence that mention one
    # of its entities, and a position sees at most k_kg facts.
    src, dst = graph[K2C].edge_index
    b, t = graph[CTX].batch_index[dst], graph[CTX].seq_index[dst]
    assert torch.equal(store.batch_index[src], b)
    mentioned = (entities[b, t] == store.head[src, None]).any(1)
    if config.tails:
        mentioned |= (entities[b, t] == store.tail[src, None]).any(1)
    assert bool(mentioned.all())
    assert int(torch.bincount(dst, minlength=graph[CTX].num_nodes).max()) <= config.k_kg


def test_select_facts_deduplicates_mentions_of_one_sequence():
    triples = torch.tensor([[0, 0, 1], [1, 0, 2], [0, 1, 2]])
    index = FactIndex(triples, 3, KGGraphConfig(k_kg=2))
    entities = torch.tensor([[[0], [-1], [0], [1]], [[0], [-1], [-1], [-1]]])
    facts = select_facts(index, entities)
    # (sequence, triple): (0, 0), (0, 1), (0, 2), (1, 0), (1, 2)
    assert facts.batch_index.tolist() == [0, 0, 0, 1, 1]
    assert facts.triple.tolist() == [0, 1, 2, 0, 2]
    assert facts.mention_fact.tolist() == [0, 2, 0, 2, 1, 3, 4]
    assert facts.mention_batch.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert facts.mention_seq.tolist() == [0, 0, 2, 2, 3, 0, 0]


def test_graph_without_entities_is_todays_graph():
    for masked in (False, True):
        today, entities, _ = make_graph(3, masked, GraphConfig(c2c=True))
        graph, _, _ = make_graph(3, masked, GraphConfig(c2c=True))
        assert KG not in today.node_types
        index = FactIndex(synthetic_kg(0), NUM_ENTITIES, KGGraphConfig(kg2kg=True, kg2nbr=True))
        add_facts(graph, index, torch.full_like(entities, -1))
        assert graph[KG].num_nodes == 0
        for edge_type in (K2C, K2N, K2K):
            assert graph[edge_type].edge_index.shape == (2, 0)
        assert set(graph.node_types) - {KG} == set(today.node_types)
        assert set(graph.edge_types) - {K2C, K2N, K2K} == set(today.edge_types)
        mine = graph.to_dict()
        for key, value in today.to_dict().items():
            if isinstance(value, dict):
                assert set(value) == set(mine[key]), key
                for name, item in value.items():
                    if isinstance(item, torch.Tensor):
                        assert torch.equal(item, mine[key][name]), (key, name)
                    else:
                        assert item == mine[key][name], (key, name)
            else:
                assert value == mine[key], key


def test_kg_graphs_batch_with_offsets():
    index = FactIndex(synthetic_kg(0), NUM_ENTITIES, KGGraphConfig(k_kg=2, kg2kg=True))
    graphs = []
    for seed in (0, 1):
        graph, entities, _ = make_graph(seed, False)
        graphs.append(add_facts(graph, index, entities))
    batch = Batch.from_data_list(graphs)
    F0, C0 = graphs[0][KG].num_nodes, graphs[0][CTX].num_nodes
    assert batch[KG].num_nodes == F0 + graphs[1][KG].num_nodes
    assert torch.equal(batch[KG].batch_index[F0:], graphs[1][KG].batch_index + 2)
    E0 = graphs[0][K2C].edge_index.size(1)
    offset = torch.tensor([[F0], [C0]])
    assert torch.equal(batch[K2C].edge_index[:, E0:], graphs[1][K2C].edge_index + offset)


def test_add_kg_nodes_rejects_mentions_outside_the_graph():
    graph, entities, _ = make_graph(0, True)
    index = FactIndex(synthetic_kg(0), NUM_ENTITIES, KGGraphConfig())
    entities = torch.full_like(entities, 3)  # every position mentions entity 3
    facts = select_facts(index, entities)  # all positions, not only the graph's ctx nodes
    with pytest.raises(ValueError, match="not a ctx node"):
        add_kg_nodes(graph, facts, index.config)


def test_window_entities_link_each_window():
    graph, _, _ = make_graph(0, False, GraphConfig(left=1, right=1))
    token = int(graph[NBR].token_id[0])
    linker = EntityLinker(torch.tensor([token]), torch.tensor([0, 1]), torch.tensor([5]))
    links = window_entities(graph, linker)
    assert links.shape == (graph[NBR].num_nodes, 4)
    assert torch.equal(links[:, 0] == 5, graph[NBR].token_id == token)
    irregular, _, _ = make_graph(0, False, GraphConfig(deduplicate=True))
    with pytest.raises(ValueError, match="window-grid"):
        window_entities(irregular, linker)


def test_configs_round_trip_through_json():
    for config in KG_CONFIGS:
        assert KGGraphConfig.from_json(config.to_json()) == config
    config = KGGraphConfig.from_dict({"relations": ["a", "b"], "k_kg": 2})
    assert config.relations == ("a", "b")
    with pytest.raises(Exception, match="k_kg"):
        KGGraphConfig(k_kg=0)
    with pytest.raises(ValueError, match="twice"):
        KGGraphConfig(relations=("a", "a"))
    # The graph config of before keeps its keys.
    assert not any("kg" in key for key in GraphConfig().to_dict())
