"""The fusion engine stands alone: built and run without a base model; HetGraphLM is a shell."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fusion import SMALL_ADAPTER, build_store, randomise_gates, repeated_pattern_split
from torch import nn
from transformers import PreTrainedModel

import hetgraph
from hetgraph.fusion import CallOptions, FusionConfig, FusionEngine, HetGraphLM, ModelGeometry
from hetgraph.fusion.persistence import ADAPTER_PREFIXES
from hetgraph.inspection import inspect_positions
from hetgraph.models.layers import output_embedding_input_hook_target

FUSION = Path(hetgraph.__file__).parent / "fusion"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    split = repeated_pattern_split()
    model, tokenizer, store, index = build_store(tmp_path_factory.mktemp("engine"), "qwen2", split)
    return model, tokenizer, store, index, split


def test_hetgraph_lm_is_a_thin_shell():
    public = {n for n in set(dir(HetGraphLM)) - set(dir(nn.Module)) if not n.startswith("_")}
    assert len(public) <= 12, sorted(public)
    assert {"attach", "detach", "generate", "forward_from_datastore", "save_pretrained"} <= public


def test_shell_holds_the_model_and_the_engine_only(parts):
    model, _tokenizer, store, index, _split = parts
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER))
    assert dict(lm.named_children()) == {"model": model, "engine": lm.engine}
    assert {n for n in vars(lm) if not n.startswith("_")} <= {"config", "training"}
    assert lm.config is lm.engine.config
    # The engine holds no piece of the base model.
    assert not any(isinstance(m, PreTrainedModel) for m in lm.engine.modules())
    assert not {id(p) for p in model.parameters()} & {id(p) for p in lm.engine.parameters()}
    # The saved keys are the engine's own state_dict keys (no prefix).
    assert set(lm.adapter_state_dict()) == set(lm.engine.state_dict())
    assert all(k.startswith(ADAPTER_PREFIXES) for k in lm.adapter_state_dict())


def test_engine_runs_every_step_without_a_base_model(parts):
    model, _tokenizer, store, index, _split = parts
    geometry = ModelGeometry.of(model)
    config = FusionConfig(k=4, adapter=SMALL_ADAPTER, neighbour_embedding="none")
    # Built from the geometry alone: no model object reaches the engine.
    engine = FusionEngine(store, index, config, ModelGeometry(*vars(geometry).values()))
    assert engine.retrieval_site == "head" and engine.fusion_sites == ("head",)
    rows = torch.arange(10, 30)[None]
    queries = torch.from_numpy(np.asarray(store.keys[rows[0].numpy()], dtype=np.float32))[None]
    retrieval = engine.retrieve(queries)
    assert retrieval.neighbour_ids.shape == (1, 20, 4)
    assert torch.equal(retrieval.neighbour_ids[0, :, 0], rows[0])  # each key finds itself
    leak_free = engine.retrieve(queries, CallOptions(query_positions=rows))
    assert not (leak_free.neighbour_ids == rows[..., None]).any()
    graph = engine.build_graph(retrieval, 20)
    with torch.no_grad():
        assert torch.equal(engine.fuse("head", queries, graph), queries)  # zero gates
        engine.gates["head"].fill_(1.0)
        fused = engine.fuse("head", queries, graph, engine.gate_statistics(retrieval, 20))
    assert fused.shape == queries.shape and not torch.equal(fused, queries)
    logits = torch.randn(1, 20, 257)
    mixed = engine.knn_mixture_logits(logits, retrieval, engine.knn_mixture(0.5, 1.0))
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(1, 20), atol=1e-5)
    # A step that needs the token embedding says so when it is not given.
    own = FusionEngine(store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER), geometry)
    with pytest.raises(ValueError, match="token embedding"), torch.no_grad():
        own.fuse("head", queries, graph)
    with torch.no_grad():
        out = own.fuse("head", queries, graph, embedding=nn.Embedding(257, geometry.hidden_size))
    assert torch.equal(out, queries)


def test_engine_logits_from_datastore_equal_the_shell(parts):
    model, _tokenizer, store, index, _split = parts
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER))
    randomise_gates(lm)
    engine = FusionEngine(store, index, lm.config, ModelGeometry.of(model))
    engine.load_adapter_state_dict(lm.adapter_state_dict())
    rows = torch.arange(40, 56).view(2, 8)
    head = output_embedding_input_hook_target(model)
    with torch.no_grad():
        expected = lm.forward_from_datastore(rows)
        got = engine.logits_from_datastore(rows, head, embedding=model.get_input_embeddings())
    assert torch.equal(got, expected)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize(
    "path",
    sorted(p for p in FUSION.glob("*.py") if p.name not in ("lm.py", "__init__.py")),
    ids=lambda p: p.name,
)
def test_no_fusion_module_but_lm_imports_hetgraph_lm(path):
    # Not even for type checking: the hooks, persistence, neighbour states and the engine
    # depend on the engine, not on the shell.
    assert "hetgraph.fusion.lm" not in _imports(path)
    assert "hetgraph.fusion.HetGraphLM" not in _imports(path)


def test_inspection_depends_on_the_engine_not_the_shell():
    imports = _imports(FUSION.parent / "inspection.py")
    assert "hetgraph.fusion.lm" not in imports and "hetgraph.fusion.HetGraphLM" not in imports


def test_inspection_gives_the_same_reports_attached_or_not(parts):
    model, tokenizer, store, index, split = parts
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER))
    input_ids = torch.from_numpy(split.tokens[:30].astype(np.int64))
    with torch.no_grad():
        lm.engine.gates["head"].fill_(50.0)
        base = model(input_ids[None]).logits[0].argmax(-1)
        fused = lm(input_ids[None]).logits[0].argmax(-1)
    assert not torch.equal(base, fused)  # the gates make a difference
    detached = inspect_positions(model, lm.engine, tokenizer, input_ids, [3, 17, 29], 4)
    with lm:
        attached = inspect_positions(model, lm.engine, tokenizer, input_ids, [3, 17, 29], 4)
    assert [r.to_dict() for r in attached] == [r.to_dict() for r in detached]
    for report in detached:
        assert report.base_prediction == tokenizer.decode([int(base[report.position])])
        assert report.gnn_prediction == tokenizer.decode([int(fused[report.position])])
    assert not lm.is_attached
