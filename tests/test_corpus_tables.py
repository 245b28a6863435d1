"""The datastore's token, document and next-token columns stay memmaps: read per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.graph import CorpusTable, GraphConfig, build_context_graph, gather_rows, leakage_mask
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.testing import byte_tokenizer, tiny_causal_lm

ADAPTER = dict(hidden_channels=32, num_layers=2, heads=4, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.tile(rng.integers(0, 256, 16), 6) for _ in range(4)])
    split = TokenizedSplit(
        "train", tokens.astype(np.int32), np.repeat(np.arange(4), 96).astype(np.int32), list("abcd")
    )
    model = tiny_causal_lm("llama")
    store = build_datastore(
        model,
        byte_tokenizer(),
        split,
        tmp_path_factory.mktemp("ds") / "ds",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    return model, store, index, split


def _in_memory(store) -> CorpusTable:
    # The tables as hetgraph held them before: whole int64 tensors.
    as_long = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return CorpusTable(as_long(store.tokens), as_long(store.doc_ids), as_long(store.next_tokens))


def _tensors(owner) -> list[torch.Tensor]:
    return [v for v in vars(owner).values() if isinstance(v, torch.Tensor)]


def test_a_fused_model_holds_no_per_row_table(parts):
    model, store, index, _ = parts
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(0, "head"), k=4, adapter=ADAPTER)
    )
    rows = len(store)
    per_row = [name for name, t in lm.named_buffers() if t.shape and t.shape[0] == rows]
    per_row += [
        t.shape
        for owner in (lm, lm.engine, lm.engine.graph_inputs, lm.engine.retriever)
        for t in _tensors(owner)
        if t.shape and t.shape[0] == rows
    ]
    assert per_row == []
    corpus = lm.engine.graph_inputs.corpus
    assert corpus is lm.engine.retriever.corpus  # one table, shared
    for column, stored in (
        (corpus.tokens, store.tokens),
        (corpus.doc_ids, store.doc_ids),
        (corpus.next_tokens, store.next_tokens),
    ):
        assert column is stored and isinstance(column, np.memmap) and column.dtype == np.int32
    lm.to(torch.float64)
    assert lm.engine.graph_inputs.corpus.tokens is store.tokens  # .to() moves no table


@pytest.mark.parametrize(
    "graph",
    [
        {},
        {"share_windows": False},
        {"deduplicate": True},
        {"window_clip": "corpus"},
        {"c2c": True, "leakage_scope": "corpus"},
    ],
)
def test_graphs_from_memmaps_equal_graphs_from_tensors(parts, graph):
    _, store, _, _ = parts
    config = GraphConfig(**{"left": 2, "right": 2, "leakage_radius": 5, **graph})
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(-1, len(store), (2, 7, 3), generator=generator)
    positions = torch.randint(0, len(store), (2, 7), generator=generator)
    reference = _in_memory(store)
    expected = build_context_graph(
        ids, reference.tokens, reference.doc_ids, config, query_positions=positions
    )
    graph_ = build_context_graph(
        ids, store.tokens, store.doc_ids, config, query_positions=positions
    )
    assert graph_.node_types == expected.node_types and graph_.edge_types == expected.edge_types
    for store_, other in zip(graph_.stores, expected.stores, strict=True):
        assert set(store_.keys()) == set(other.keys())
        for key, value in store_.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), key
    assert graph_["nbr"].token_id.dtype == torch.long


@pytest.mark.parametrize("same_document", [True, False])
def test_leakage_filter_reads_the_memmap_rows_it_needs(parts, same_document):
    _, store, _, _ = parts
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(-1, len(store), (20, 6), generator=generator)
    own = torch.randint(-1, len(store), (20,), generator=generator)
    docs = np.asarray(store.doc_ids, dtype=np.int64)
    expected = (ids >= 0) & (own[:, None] >= 0) & ((own[:, None] - ids).abs() < 40)
    if same_document:
        expected &= torch.from_numpy(docs[own.clamp(min=0)][:, None] == docs[ids.clamp(min=0)])
    found = leakage_mask(ids, own, store.doc_ids, 40, same_document=same_document)
    assert torch.equal(found, expected)
    assert torch.equal(
        found, leakage_mask(ids, own, torch.from_numpy(docs), 40, same_document=same_document)
    )


def test_gathered_rows_and_next_tokens(parts):
    _, store, _, _ = parts
    rows = torch.tensor([[0, 5, -1], [len(store) - 1, -1, 3]])
    next_tokens = CorpusTable.of(store).next_tokens_of(rows)
    expected = np.asarray(store.next_tokens, dtype=np.int64)[rows.clamp(min=0).numpy()]
    assert next_tokens.dtype == torch.long
    assert torch.equal(next_tokens, torch.from_numpy(np.where(rows.numpy() < 0, -1, expected)))
    assert torch.equal(
        gather_rows(store.tokens, rows.clamp(min=0)),
        gather_rows(torch.from_numpy(np.array(store.tokens)), rows.clamp(min=0)),
    )
    with pytest.raises(ValueError, match="one length"):
        CorpusTable(store.tokens, store.doc_ids[:-1])


@pytest.mark.parametrize("sites, embedding", [(("head",), "own_token"), ((0, "head"), "label")])
def test_fused_logits_equal_those_from_in_memory_tables(parts, sites, embedding):
    model, store, index, split = parts
    config = FusionConfig(
        fusion_layers=sites,
        k=4,
        adapter=ADAPTER,
        neighbour_embedding=embedding,
        graph={"c2c": True},
    )
    lm = HetGraphLM(model, store, index, config)
    with torch.no_grad():
        for number, gate in enumerate(lm.engine.gates.values()):
            gate.copy_(torch.rand(gate.shape, generator=torch.Generator().manual_seed(number)))
    input_ids = torch.from_numpy(split.tokens[:60].astype(np.int64)).view(2, 30)
    rows = torch.arange(60).view(2, 30)  # the text is the datastore's: the filter runs
    with torch.no_grad():
        fused = lm(input_ids, query_positions=rows, use_cache=False).logits
        lm.engine.graph_inputs.corpus = lm.engine.retriever.corpus = _in_memory(store)
        expected = lm(input_ids, query_positions=rows, use_cache=False).logits
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)
