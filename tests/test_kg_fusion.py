"""A knowledge graph fused through the engine, the hooks, saved adapters and the CLI: an
untrained KG branch is the base model, calls whose tokens mention an alias get ``kg``
nodes, adapters record the graph they were trained with and refuse another, ``generate``
links on the KV-cache history, and ``--kg`` works on train / eval / generate / inspect."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.fusion.persistence import AdapterMismatchError
from hetgraph.graph import CTX, K2C, KG, KGGraphConfig
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.io import ADAPTER_CONFIG
from hetgraph.kg import (
    EmbeddingConfig,
    KnowledgeConfig,
    KnowledgeGraph,
    KnowledgeGraphError,
    KnowledgeSource,
    embed_knowledge_graph,
)
from hetgraph.testing import (
    CORPUS_WORDS,
    FAMILIES,
    byte_tokenizer,
    one_error_line,
    run_cli,
    tiny_causal_lm,
    write_cli_workspace,
)

ADAPTER = dict(hidden_channels=16, num_layers=2, heads=2, dropout=0.0, attn_dropout=0.0)
TRIPLES = (
    "alpha\tnext\tbeta\nbeta\tnext\tgamma\ngamma\tnext\tdelta\ndelta\tnext\talpha\n"
    "alpha\tis_a\tletter\nbeta\tis_a\tletter\ngamma\tis_a\tletter\nos\tis_a\tmodule\n"
)
ALIASES = "alpha\talpha\nbeta\tbeta\ngamma\tgamma\ndelta\tdelta\nletter\tletter\nos\tos\n"


def write_kg(root: Path, name: str = "kg", seed: int = 0, triples: str = TRIPLES) -> Path:
    """A tiny knowledge graph over the words of the test corpus, built for the byte
    tokenizer and embedded (TransE, a few epochs)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.tsv").write_text(triples)
    (root / f"{name}-aliases.tsv").write_text(ALIASES)
    graph = KnowledgeGraph.build(
        root / f"{name}.tsv", root / f"{name}-aliases.tsv", byte_tokenizer()
    )
    graph.save_pretrained(root / name)
    config = EmbeddingConfig(model="transe", dim=8, epochs=2, batch_size=4, seed=seed)
    embed_knowledge_graph(root / name, config)
    return root / name


def word_split(num_docs: int = 6, length: int = 30) -> TokenizedSplit:
    rng = random.Random(0)
    tokenizer = byte_tokenizer()
    ids = [
        np.r_[
            tokenizer(" ".join(rng.choice(CORPUS_WORDS) for _ in range(length)))["input_ids"], 256
        ]
        for _ in range(num_docs)
    ]
    return TokenizedSplit(
        "train",
        np.concatenate(ids).astype(np.int32),
        np.concatenate([np.full(len(x), i) for i, x in enumerate(ids)]).astype(np.int32),
        [f"doc{i}" for i in range(num_docs)],
    )


def build_parts(root: Path, family: str):
    model = tiny_causal_lm(family)
    tokenizer = byte_tokenizer()
    config = DatastoreConfig(context_length=64, stride=32, batch_size=4)
    store = build_datastore(
        model, tokenizer, word_split(), root / f"ds-{family}", config, show_progress=False
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    return model, tokenizer, store, index


@pytest.fixture(scope="module")
def kg_dir(tmp_path_factory):
    return write_kg(tmp_path_factory.mktemp("kg-fusion"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return build_parts(tmp_path_factory.mktemp("kg-fusion-ds"), "qwen2")


def ids_of(text: str) -> torch.Tensor:
    return torch.tensor([byte_tokenizer()(text)["input_ids"]])


def open_gates(lm: HetGraphLM, seed: int = 0) -> None:
    """Random site gates and k2c / k2n gates: a "trained" model whose facts count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.engine.named_parameters():
            if name.startswith("gates.") or "rel_gate" in name:
                p.copy_(torch.rand(p.shape, generator=gen))


def fact_count(lm: HetGraphLM, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """kg nodes of the graph of ``ids``, and the positions their k2c edges reach."""
    with torch.no_grad():
        out = lm(ids, output_retrieval=True, use_cache=False)
    graph = lm.engine.build_graph(out.retrieval, ids.shape[1], input_ids=ids)
    positions = graph[CTX].seq_index[graph[K2C].edge_index[1]]
    return int(graph[KG].num_nodes), positions.unique()


# ------------------------------------------------------------------------------ engine
@pytest.mark.parametrize("family", FAMILIES)
def test_an_untrained_kg_branch_leaves_the_base_model(tmp_path, kg_dir, family):
    model, tokenizer, store, index = build_parts(tmp_path, family)
    ids = ids_of("alpha beta import os gamma").repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
    config = FusionConfig(fusion_layers=(0, "head"), k=4, adapter=ADAPTER)
    knowledge = KnowledgeSource.open(kg_dir, tokenizer)
    lm = HetGraphLM(model, store, index, config, tokenizer, knowledge=knowledge)
    assert lm.config.kg == KnowledgeConfig()  # the source's settings are taken
    assert all(a.kg_in is not None for a in lm.engine.adapters.values())
    with lm, torch.no_grad():
        fused = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fused, base, rtol=1e-5, atol=1e-5)
    assert fact_count(lm, ids[:1])[0] > 0  # the facts were there, behind closed gates


def test_positions_that_mention_an_alias_see_its_facts(parts, kg_dir):
    model, tokenizer, store, index = parts
    knowledge = KnowledgeSource.open(kg_dir, tokenizer)
    config = FusionConfig(k=4, adapter=ADAPTER, kg=KnowledgeConfig(facts=KGGraphConfig(k_kg=2)))
    lm = HetGraphLM(model, store, index, config, tokenizer, knowledge=knowledge)
    facts, positions = fact_count(lm, ids_of("alpha and beta"))
    assert facts == 4  # alpha and beta: two facts each (next, is_a)
    # Causal: "alpha" is seen from its last token (4) for 8 positions, " beta" from 13.
    assert positions.tolist() == [4, 5, 6, 7, 8, 9, 10, 11, 13]
    assert fact_count(lm, ids_of("import sys"))[0] == 0  # no alias: no kg node
    # The settings come from the config: one fact per position.
    lm1 = HetGraphLM(
        model,
        store,
        index,
        FusionConfig(k=4, adapter=ADAPTER, kg=KnowledgeConfig(facts=KGGraphConfig(k_kg=1))),
        tokenizer,
        knowledge=knowledge,
    )
    assert fact_count(lm1, ids_of("alpha and beta"))[0] == 2
    # ... and the visibility: each mention only at its last token.
    lm_last = HetGraphLM(
        model,
        store,
        index,
        FusionConfig(k=4, adapter=ADAPTER, kg=KnowledgeConfig(visibility=1)),
        tokenizer,
        knowledge=knowledge,
    )
    assert fact_count(lm_last, ids_of("alpha and beta"))[1].tolist() == [4, 13]


def test_open_facts_change_the_output_and_other_paths_refuse(parts, kg_dir):
    model, tokenizer, store, index = parts
    knowledge = KnowledgeSource.open(kg_dir, tokenizer)
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=ADAPTER), tokenizer)
    with_kg = HetGraphLM(
        model, store, index, FusionConfig(k=4, adapter=ADAPTER), tokenizer, knowledge=knowledge
    )
    open_gates(with_kg)
    ids = ids_of("alpha beta")
    with torch.no_grad():
        assert not torch.allclose(with_kg(ids).logits, lm(ids).logits)
        with pytest.raises(ValueError, match="NeighbourStates"):
            with_kg(ids, neighbour_states=object())
        with pytest.raises(ValueError, match="input_ids"), with_kg:
            model(inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(KnowledgeGraphError, match="--kg DIR"):
        HetGraphLM(model, store, index, with_kg.config, tokenizer)  # fusion.kg, no graph
    # From the datastore: the stored tokens of a span are linked; spans must be contiguous.
    rows = torch.arange(0, 24)[None]
    assert with_kg.forward_from_datastore(rows).shape == (1, 24, 257)
    with pytest.raises(ValueError, match="contiguous"):
        with_kg.forward_from_datastore(torch.tensor([[0, 5, 9]]))


def test_kge_tables_stay_out_of_the_saved_adapter(parts, kg_dir, tmp_path):
    model, tokenizer, store, index = parts
    knowledge = KnowledgeSource.open(kg_dir, tokenizer)
    config = FusionConfig(
        k=4, adapter=ADAPTER, kg=KnowledgeConfig(facts=KGGraphConfig(k_kg=3, kg2kg=True))
    )
    lm = HetGraphLM(model, store, index, config, tokenizer, knowledge=knowledge)
    open_gates(lm)
    lm.save_pretrained(tmp_path / "adapter")
    state = lm.adapter_state_dict()
    assert any(".kg_in.lin." in key for key in state)
    assert not any(key.endswith(("kg_in.entity", "kg_in.relation")) for key in state)
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["knowledge"]["fingerprint"] == knowledge.fingerprint
    assert saved["fusion"]["kg"]["facts"]["k_kg"] == 3
    # Reloaded with a source of default settings: bound to the saved ones, same logits.
    loaded = HetGraphLM.from_pretrained(
        tmp_path / "adapter",
        model,
        store,
        index,
        tokenizer,
        knowledge=KnowledgeSource.open(kg_dir, tokenizer),
    )
    assert loaded.config == lm.config and loaded.engine.knowledge.config.facts.k_kg == 3
    ids = ids_of("gamma delta alpha")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)
    # An adapter_config.json of before (no kg field, no knowledge record) still loads.
    plain = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=ADAPTER), tokenizer)
    plain.save_pretrained(tmp_path / "plain")
    path = tmp_path / "plain" / ADAPTER_CONFIG
    old = json.loads(path.read_text())
    del old["fusion"]["kg"]
    assert FusionConfig.from_dict(old["fusion"]).kg is None


def test_an_adapter_refuses_another_or_a_missing_knowledge_graph(parts, kg_dir, tmp_path):
    model, tokenizer, store, index = parts
    knowledge = KnowledgeSource.open(kg_dir, tokenizer)
    lm = HetGraphLM(
        model, store, index, FusionConfig(k=4, adapter=ADAPTER), tokenizer, knowledge=knowledge
    )
    lm.save_pretrained(tmp_path / "with-kg")
    HetGraphLM(model, store, index, FusionConfig(k=4, adapter=ADAPTER), tokenizer).save_pretrained(
        tmp_path / "without-kg"
    )
    other_dir = write_kg(tmp_path, "other", seed=1)  # same triples, other embeddings
    other = KnowledgeSource.open(other_dir, tokenizer)
    assert other.fingerprint != knowledge.fingerprint
    cases = [
        ("with-kg", None, "and none was given; pass --kg"),
        ("with-kg", other, "fingerprint"),
        ("without-kg", knowledge, "trained without a knowledge graph"),
    ]
    for adapter, source, message in cases:
        with pytest.raises(AdapterMismatchError, match=message):
            HetGraphLM.from_pretrained(
                tmp_path / adapter, model, store, index, tokenizer, knowledge=source
            )


def test_generate_links_entities_on_the_kv_cache_history(parts, kg_dir, monkeypatch):
    model, tokenizer, store, index = parts
    knowledge = KnowledgeSource.open(kg_dir, tokenizer)
    lm = HetGraphLM(
        model, store, index, FusionConfig(k=4, adapter=ADAPTER), tokenizer, knowledge=knowledge
    )
    open_gates(lm)
    seen: list[tuple[torch.Tensor, int]] = []
    add_facts = KnowledgeSource.add_facts

    def spy(self, graph, input_ids, attention_mask=None):
        seen.append((input_ids.clone(), int(graph.query_shape[1])))
        return add_facts(self, graph, input_ids, attention_mask)

    monkeypatch.setattr(KnowledgeSource, "add_facts", spy)
    prompt = ids_of("beta gam")
    out = lm.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=256)
    assert len(seen) == 4  # the prompt's call, then one per new token (the cache is on)
    # The head reads the last position only (HF's logits_to_keep=1): graphs of length 1.
    assert all(length == 1 for _, length in seen)
    for ids, _ in seen:  # each step links the whole text so far, not its new token alone
        assert torch.equal(ids, out[:, : ids.shape[1]])
    assert [ids.shape[1] for ids, _ in seen] == list(range(prompt.shape[1], out.shape[1]))


def test_fusion_config_round_trips_the_kg_section():
    config = FusionConfig(kg=KnowledgeConfig(facts=KGGraphConfig(k_kg=2, relations=("is_a",))))
    assert FusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert FusionConfig().kg is None and FusionConfig.from_dict({}).to_dict()["kg"] is None
    with pytest.raises(ValueError, match="deduplicate"):
        FusionConfig(
            graph=dict(deduplicate=True), kg=KnowledgeConfig(facts=KGGraphConfig(kg2nbr=True))
        )


# --------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = write_cli_workspace(tmp_path_factory.mktemp("kg-cli"))
    (root / "kg.tsv").write_text(TRIPLES)
    (root / "kg-aliases.tsv").write_text(ALIASES)
    kg = ["--triples", root / "kg.tsv", "--aliases", root / "kg-aliases.tsv"]
    for out in ("kg", "kg2", "unembedded"):  # aliases tokenised by the model's own tokenizer
        assert run_cli("kg", "build", "--model", root / "model", *kg, "--out", root / out) == 0
    embed = ["--model", "transe", "--dim", "8", "--epochs", "2", "--batch-size", "4"]
    for out, seed in (("kg", "0"), ("kg2", "1")):  # kg2: the same triples, other embeddings
        assert run_cli("kg", "embed", "--kg", root / out, *embed, "--seed", seed) == 0
    common = ["--model", root / "model", "--corpus", root / "corpus", "--threads", "1"]
    build = ["--context-length", "64", "--stride", "32", "--batch-size", "4"]
    assert run_cli("datastore", "build", *common, "--out", root / "ds", *build) == 0
    train = [*common, "--datastore", root / "ds", "--config", root / "run.json"]
    assert (
        run_cli(
            "train",
            *train,
            "--kg",
            root / "kg",
            "--kg-facts",
            "2",
            "--kg-visibility",
            "3",
            "--out",
            root / "adapter",
        )
        == 0
    )
    assert run_cli("train", *train, "--out", root / "plain") == 0
    return root, common


def test_cli_train_eval_generate_inspect_with_a_knowledge_graph(workspace, capsys, tmp_path):
    root, common = workspace
    saved = json.loads((root / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["fusion"]["kg"]["facts"]["k_kg"] == 2 and "knowledge" in saved
    assert saved["fusion"]["kg"]["visibility"] == 3
    argv = ["eval", *common, "--datastore", root / "ds", "--config", root / "run.json"]
    target = tmp_path / "eval.json"
    assert run_cli(*argv, "--kg", root / "kg", "--adapter", root / "adapter", "--json", target) == 0
    result = json.loads(target.read_text())
    assert {"base", "knn", "gnn", "gnn_knn"} <= set(result) and result["gnn"]["ppl"] > 1
    model = ["--model", root / "model", "--datastore", root / "ds", "--kg", root / "kg"]
    generate = ["--adapter", root / "adapter", "--prompt", "alpha", "--max-new-tokens", "3"]
    assert run_cli("generate", *model, *generate) == 0
    capsys.readouterr()
    text = ["--text", "gamma alpha", "--position", "-1"]  # where " alpha" is complete
    assert run_cli("inspect", *model, "--adapter", root / "adapter", *text, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["facts"]) == 2  # k_kg facts of alpha, with their attention
    assert {f["head"] for f in report["facts"]} == {"alpha"}
    assert all(0 <= f["attention"]["head"] <= 1 for f in report["facts"])
    assert run_cli("inspect", *model, "--adapter", root / "adapter", *text) == 0
    assert "fact att[head=" in capsys.readouterr().out


def test_cli_trains_evaluates_and_inspects_the_kg_alone_control(workspace, capsys, tmp_path):
    root, common = workspace
    train = [*common, "--datastore", root / "ds", "--config", root / "run.json"]
    train += ["--kg", root / "kg"]
    out = tmp_path / "kg-only"
    assert run_cli("train", *train, "--kg-only", "--max-steps", "2", "--out", out) == 0
    saved = json.loads((out / ADAPTER_CONFIG).read_text())
    assert saved["fusion"]["adapter"]["use_n2c"] is False
    target = tmp_path / "eval.json"
    assert run_cli("eval", *train, "--adapter", out, "--json", target) == 0
    assert json.loads(target.read_text())["gnn"]["ppl"] > 1
    model = ["--model", root / "model", "--datastore", root / "ds", "--kg", root / "kg"]
    text = ["--text", "gamma alpha", "--position", "-1", "--json"]
    capsys.readouterr()
    assert run_cli("inspect", *model, "--adapter", out, *text) == 0
    report = json.loads(capsys.readouterr().out)
    assert {f["head"] for f in report["facts"]} == {"alpha"}


def test_cli_refuses_a_bad_or_missing_knowledge_graph_in_one_line(workspace, capsys, tmp_path):
    root, common = workspace
    (tmp_path / "empty").mkdir()
    base = ["eval", *common, "--datastore", root / "ds", "--config", root / "run.json"]
    cases = [
        (["--kg", tmp_path / "missing"], "no such knowledge-graph directory"),
        (["--kg", tmp_path / "empty"], "is not a knowledge-graph directory"),
        (["--kg", root / "unembedded"], "run `hetgraph kg embed --kg"),
        (["--adapter", root / "adapter"], "pass --kg"),
        (["--adapter", root / "plain", "--kg", root / "kg"], "leave out --kg"),
        (["--kg", root / "kg", "--neighbour-states", "on"], "--neighbour-states"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert run_cli(*base, *extra) == 2
        assert message in one_error_line(capsys)
    train = ["train", *common, "--datastore", root / "ds", "--config", root / "run.json"]
    capsys.readouterr()
    assert run_cli(*train, "--out", tmp_path / "a", "--kg-facts", "2") == 2
    assert "add --kg DIR" in one_error_line(capsys)
    assert run_cli(*train, "--out", tmp_path / "a", "--kg-only") == 2
    assert "--kg-only sets how a knowledge graph is fused; add --kg DIR" in one_error_line(capsys)
    # Resuming the checkpoint of a run with another graph (re-embedded) is refused too.
    resume = [*train, "--out", root / "adapter", "--kg", root / "kg2", "--kg-facts", "2"]
    assert run_cli(*resume) == 2
    assert "/checkpoint was trained with the knowledge graph" in one_error_line(capsys)
