"""KGE entity embeddings (PyG's TransE / DistMult / RotatE / ComplEx) on a planted graph."""

from __future__ import annotations

import json

import pytest
import torch

from hetgraph.kg import EmbeddingConfig, KnowledgeGraph, KnowledgeGraphError, load_entity_features
from hetgraph.kg.embeddings import KGE_MODELS, random_metrics, train_embeddings
from hetgraph.testing import byte_tokenizer, one_error_line, run_cli

ENTITIES = 24


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    """A planted graph: three relations, each a fixed shift around a ring of entities."""
    root = tmp_path_factory.mktemp("kge")
    lines = [
        f"e{i}\tr{shift}\te{(i + shift) % ENTITIES}" for shift in (1, 2, 5) for i in range(ENTITIES)
    ]
    (root / "t.tsv").write_text("\n".join(lines) + "\n")
    KnowledgeGraph.build(root / "t.tsv", None, byte_tokenizer()).save_pretrained(root / "kg")
    return root / "kg"


CONFIG = dict(dim=16, epochs=40, batch_size=16, lr=0.05, valid_fraction=0.15, seed=0)


@pytest.fixture(scope="module")
def trained(graph_dir):
    """Every KGE model trained once (``auto``), on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graph = KnowledgeGraph.from_pretrained(graph_dir)
        return train_embeddings(graph, EmbeddingConfig(model="auto", **CONFIG))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model", KGE_MODELS)
def test_training_reduces_the_loss(trained, model):
    [result] = [t for t in trained[1] if t.name == model]
    assert len(result.losses) == CONFIG["epochs"]
    assert result.losses[-1] < 0.7 * result.losses[0]
    assert result.valid["triples"] == round(3 * ENTITIES * CONFIG["valid_fraction"])


def test_auto_chooses_the_best_valid_mrr_and_beats_random(trained):
    chosen, every = trained
    assert [t.name for t in every] == list(KGE_MODELS)
    assert chosen.valid["mrr"] == max(t.valid["mrr"] for t in every)
    random = random_metrics(ENTITIES)
    assert random["mrr"] == pytest.approx(sum(1 / r for r in range(1, 25)) / 24)
    assert chosen.valid["mrr"] > 2 * random["mrr"]
    assert chosen.valid["hits@10"] > random["hits@10"]


def test_embed_stores_features_with_the_graph(graph_dir, capsys):
    with pytest.raises(KnowledgeGraphError, match="no embeddings; train them"):
        load_entity_features(graph_dir)
    assert (
        run_cli(
            "kg",
            "embed",
            "--kg",
            graph_dir,
            "--model",
            "rotate",
            "--dim",
            8,
            "--epochs",
            3,
            "--batch-size",
            16,
            "--threads",
            1,
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["model"] == "rotate" and set(record["candidates"]) == {"rotate"}
    features = load_entity_features(graph_dir)
    assert features.shape == (ENTITIES, 16) and features.dtype == torch.float32  # re + im
    graph = KnowledgeGraph.from_pretrained(graph_dir, full=True)  # the manifest covers it
    assert graph.manifest["embeddings"]["config"]["dim"] == 8
    (graph_dir / "embeddings.safetensors").write_bytes(b"x")
    with pytest.raises(KnowledgeGraphError, match=r"embeddings\.safetensors has 1 bytes"):
        load_entity_features(graph_dir)
    assert run_cli("kg", "embed", "--kg", graph_dir / "missing") == 2
    assert "no such knowledge-graph directory" in one_error_line(capsys)
