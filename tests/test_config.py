r"""Typed configs: nested sections are dataclasses, checked at construction with dotted paths,
and every config round-trips through JSON."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from hetgraph.cli import main
from hetgraph.configuration import ConfigError
from hetgraph.corpus import CorpusConfig
from hetgraph.datastore import DatastoreConfig
from hetgraph.evaluation import EvalConfig
from hetgraph.fusion import FusionConfig
from hetgraph.graph import GraphConfig
from hetgraph.index import IndexConfig
from hetgraph.nn import AdapterConfig
from hetgraph.pipeline import DEFAULT_CONFIG, RunConfig
from hetgraph.training import TrainingConfig

GRAPH_KEYS = (
    "c2c, c2c_window, deduplicate, leakage_radius, leakage_scope, left, n2c, right, "
    "share_windows, window_clip"
)


def _keys(cls: type) -> str:
    return ", ".join(sorted(f.name for f in fields(cls)))


def _load(how: str, data: Any, tmp_path: Path) -> RunConfig:
    if how == "dict":
        return RunConfig.from_dict(data)
    if how == "json":
        return RunConfig.from_json(json.dumps(data))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    return RunConfig.from_json_file(path)


HOWS = ["dict", "json", "file"]


# ----------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"fusion": {"graph": {"lefft": 1}}},
            f"unknown key 'fusion.graph.lefft'; valid keys of GraphConfig: {GRAPH_KEYS}",
        ),
        (
            {"fusion": {"adapter": {"head": 2}}},
            "unknown key 'fusion.adapter.head'; "
            f"valid keys of AdapterConfig: {_keys(AdapterConfig)}",
        ),
        (
            {"fusion": {"k": 4, "knn_lamda": 0.5}},
            f"unknown key 'fusion.knn_lamda'; valid keys of FusionConfig: {_keys(FusionConfig)}",
        ),
        ({"trainnig": {}}, f"unknown key 'trainnig'; valid keys of RunConfig: {_keys(RunConfig)}"),
        (
            {"index": {"nlist": 3, "mertic": "l2"}},
            (
                "unknown keys 'index.mertic', 'index.nlist'; "
                f"valid keys of IndexConfig: {_keys(IndexConfig)}"
            ),
        ),
        (
            {"training": {"max_step": 3}},
            "unknown key 'training.max_step'; "
            f"valid keys of TrainingConfig: {_keys(TrainingConfig)}",
        ),
    ],
)
def test_unknown_key_fails_at_construction_with_path_and_valid_keys(how, data, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(how, data, tmp_path)
    assert message in str(info.value)
    if how == "file":
        assert str(tmp_path / "run.json") in str(info.value)
        assert "print-config" in str(info.value)


def test_cli_reports_a_deep_typo_before_loading_anything(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"fusion": {"graph": {"lefft": 1}}}))
    assert main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"unknown key 'fusion.graph.lefft'; valid keys of GraphConfig: {GRAPH_KEYS}" in err


# ----------------------------------------------------------------------------- wrong types
@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize(
    "data, message",
    [
        ({"training": {"max_steps": "ten"}}, "training.max_steps: expected int, got 'ten'"),
        ({"training": {"max_steps": True}}, "training.max_steps: expected int, got True"),
        (
            {"evaluation": {"max_tokens": 4097.0}},
            "evaluation.max_tokens: expected int | None, got 4097.0",
        ),
        (
            {"fusion": {"graph": {"c2c_window": "4"}}},
            "fusion.graph.c2c_window: expected int | None, got '4'",
        ),
        (
            {"fusion": {"adapter": {"feed_forward": 1}}},
            "fusion.adapter.feed_forward: expected bool, got 1",
        ),
        (
            {"fusion": {"fusion_layers": ["head", "top"]}},
            "fusion.fusion_layers[1]: expected int | 'head' | 'all' | 'start:stop:step', got 'top'",
        ),
        (
            {"fusion": {"neighbour_features": "keys"}},
            "fusion.neighbour_features: expected 'key' | 'stored', got 'keys'",
        ),
        ({"fusion": {"graph": [1]}}, "fusion.graph: expected GraphConfig, got [1]"),
        (
            {"fusion": {"adapter": {"normalization": "both"}}},
            "fusion.adapter.normalization: expected 'joint' | 'per_relation', got 'both'",
        ),
        (
            {"corpus": {"fractions": [0.5, 0.5]}},
            "corpus.fractions: expected list of 3 (float, float, float), got [0.5, 0.5]",
        ),
        (
            {"datastore": {"feature_layers": [1, "2"]}},
            "datastore.feature_layers[1]: expected int, got '2'",
        ),
        ({"out_dir": None}, "out_dir: expected str, got None"),
    ],
)
def test_wrong_type_fails_with_path(how, data, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(how, data, tmp_path)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"fusion": {"k": 0}}, "fusion: k must be >= 1, got 0"),
        ({"fusion": {"graph": {"left": -1}}}, "fusion.graph: left/right must be >= 0"),
        (
            {"fusion": {"adapter": {"hidden_channels": 30, "heads": 4}}},
            "fusion.adapter: hidden_channels (30) must be divisible by heads (4)",
        ),
        ({"training": {"patience": -1}}, "training: patience must be >= 0, got -1"),
        ({"evaluation": {"max_tokens": 0}}, "evaluation: max_tokens must be >= 1 or None, got 0"),
        ({"datastore": {"stride": 0}}, "datastore: stride must be in"),
        ({"threads": 0}, "threads must be >= 1 or None, got 0"),
    ],
)
def test_rejected_value_is_named_by_its_section(data, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert message in str(info.value)


def test_json_values_are_converted_where_the_field_says():
    config = RunConfig.from_dict(
        {
            "training": {"lr": 1},
            "fusion": {"fusion_layers": [-2, "head"]},
            "datastore": {"feature_layers": [3]},
        }
    )
    assert config.training.lr == 1.0 and isinstance(config.training.lr, float)
    assert config.fusion.fusion_layers == (-2, "head")
    assert config.datastore.feature_layers == (3,)


# ----------------------------------------------------------------------------- round trips
CONFIGS = [
    RunConfig(),
    RunConfig(model="m", fusion=FusionConfig.paper(k=8), threads=2, device="cpu"),
    FusionConfig(),
    FusionConfig.paper(),
    FusionConfig(
        fusion_layers=(0, -1, "head"),
        neighbour_features="stored",
        prefetch=True,
        knn_lambda=0.25,
        knn_temperature=2.0,
        graph=GraphConfig(left=2, c2c=True),
        adapter=AdapterConfig(hidden_channels=64),
    ),
    CorpusConfig(),
    CorpusConfig(path="x", glob="**/*.py", fractions=(0.8, 0.1, 0.1), max_documents=5),
    DatastoreConfig(),
    DatastoreConfig(key_layer=-3, feature_layers=(1, 2), max_tokens=100),
    IndexConfig(),
    IndexConfig(factory="IVF16,Flat", metric="ip", train_size=1000, num_threads=1),
    GraphConfig(),
    GraphConfig(left=2, right=3, n2c="window", c2c=True, c2c_window=4, deduplicate=True),
    AdapterConfig(),
    AdapterConfig(ctx_channels=32, nbr_channels=16, token_channels=8, heads=4, use_c2c=True),
    TrainingConfig(),
    TrainingConfig(lr=1e-4, schedule="cosine", from_datastore=False),
    EvalConfig(),
    EvalConfig(max_tokens=100, valid_tokens=50, k=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_json_roundtrip(config, tmp_path):
    cls = type(config)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types all the way down
    assert cls.from_dict(data).to_dict() == data
    assert cls.from_dict(data) == config
    assert cls.from_json(config.to_json()) == config
    config.to_json_file(tmp_path / "c.json")
    assert cls.from_json_file(tmp_path / "c.json") == config


def test_to_json_file_replaces_a_file_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    import os

    from hetgraph.errors import HetgraphError

    path = tmp_path / "c.json"
    DatastoreConfig(stride=128).to_json_file(path)
    before = path.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises((OSError, HetgraphError)):
        DatastoreConfig(stride=64).to_json_file(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    assert DatastoreConfig.from_json_file(path) == DatastoreConfig(stride=128)


def test_nested_to_dict_is_plain_dicts():
    data = RunConfig().to_dict()
    assert type(data["fusion"]) is dict and type(data["fusion"]["graph"]) is dict
    assert data["fusion"]["graph"] == GraphConfig().to_dict()
    assert data["fusion"]["adapter"] == AdapterConfig().to_dict()
    assert data["training"] == TrainingConfig().to_dict()


# ----------------------------------------------------------------------------- old style
def test_old_style_dict_sections_still_load():
    config = RunConfig(
        fusion={"k": 4, "graph": {"left": 2}, "adapter": {"hidden_channels": 16, "heads": 2}},
        training={"max_steps": 3},
        index={"factory": "Flat"},
    )
    assert isinstance(config.fusion, FusionConfig) and isinstance(config.fusion.graph, GraphConfig)
    assert config.fusion.graph.left == 2 and config.fusion.adapter.hidden_channels == 16
    assert config.training == TrainingConfig(max_steps=3) and config.index.factory == "Flat"
    with pytest.raises(ConfigError, match=r"unknown key 'fusion\.graph\.lefft'"):
        RunConfig(fusion={"graph": {"lefft": 2}})


def test_old_adapter_config_json_fusion_section_loads():
    saved = {
        "fusion_layers": ["head"],
        "k": 4,
        "retrieval_margin": 32,
        "neighbour_features": "key",
        "graph": {"left": 1, "right": 1, "c2c": False},
        "adapter": {"hidden_channels": 16, "num_layers": 1, "heads": 2, "dropout": 0.0},
        "prefetch": None,
        "knn_lambda": None,
        "knn_temperature": None,
    }
    config = FusionConfig.from_dict(saved)
    assert config.adapter == AdapterConfig(hidden_channels=16, num_layers=1, heads=2, dropout=0.0)
    assert config.adapter.ctx_channels is None and config.graph == GraphConfig()


@pytest.mark.parametrize(
    "kwargs, graph, adapter",
    [
        ({"graph": {"left": 2}}, GraphConfig(left=2), AdapterConfig()),
        (
            {"adapter": {"heads": 2, "num_layers": 1}},
            GraphConfig(),
            AdapterConfig(heads=2, num_layers=1),
        ),
        (
            {"graph": GraphConfig(c2c=True), "adapter": AdapterConfig(dropout=0.0)},
            GraphConfig(c2c=True),
            AdapterConfig(dropout=0.0),
        ),
    ],
)
def test_fusion_config_coerces_dict_sub_configs(kwargs, graph, adapter):
    config = FusionConfig(**kwargs)
    assert config.graph == graph and config.adapter == adapter
    assert replace(FusionConfig(), **kwargs) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"graph": {"lefft": 2}},
            f"unknown key 'graph.lefft'; valid keys of GraphConfig: {GRAPH_KEYS}",
        ),
        ({"adapter": {"heads": "8"}}, "adapter.heads: expected int, got '8'"),
        ({"graph": {"left": -2}}, "graph: left/right must be >= 0"),
        ({"graph": 3}, "graph: expected GraphConfig, got 3"),
    ],
)
def test_fusion_config_checks_dict_sub_configs(kwargs, message):
    with pytest.raises(ConfigError) as info:
        FusionConfig(**kwargs)
    assert message in str(info.value)


def test_paper_config_and_overrides():
    paper = FusionConfig.paper()
    assert paper.graph == GraphConfig.paper() and paper.graph.c2c
    assert (paper.adapter.num_layers, paper.adapter.heads, paper.adapter.dropout) == (3, 8, 0.3)
    tuned = FusionConfig.paper(k=8, fusion_layers=[-1], graph={"left": 2})
    assert tuned.k == 8 and tuned.fusion_layers == (-1,) and tuned.graph == GraphConfig(left=2)
    assert tuned.adapter == paper.adapter
    with pytest.raises(ConfigError, match="unknown key 'kk'; valid keys of FusionConfig"):
        FusionConfig.paper(kk=8)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        FusionConfig.paper(k=0)


# ----------------------------------------------------------------------------- replace()
@pytest.mark.parametrize(
    "config, changes, name",
    [
        (FusionConfig(), {"k": 0}, "k"),
        (FusionConfig(), {"retrieval_margin": -1}, "retrieval_margin"),
        (FusionConfig(), {"knn_lambda": 1.5}, "knn_lambda"),
        (GraphConfig(), {"left": -1}, "left"),
        (GraphConfig(), {"c2c_window": 0}, "c2c_window"),
        (AdapterConfig(), {"heads": 3, "hidden_channels": 16}, "hidden_channels"),
        (AdapterConfig(), {"nbr_channels": 0}, "nbr_channels"),
        (TrainingConfig(), {"max_steps": 0}, "max_steps"),
        (TrainingConfig(), {"eval_every": -1}, "eval_every"),
        (TrainingConfig(), {"patience": -1}, "patience"),
        (TrainingConfig(), {"checkpoint_every": -1}, "checkpoint_every"),
        (TrainingConfig(), {"eval_tokens": -1}, "eval_tokens"),
        (EvalConfig(), {"max_tokens": 0}, "max_tokens"),
        (EvalConfig(), {"max_tokens": -5}, "max_tokens"),
        (EvalConfig(), {"k": 0}, "k"),
        (RunConfig(), {"threads": 0}, "threads"),
        (DatastoreConfig(), {"batch_size": 0}, "batch_size"),
        (IndexConfig(), {"metric": "cos"}, "metric"),
        (CorpusConfig(), {"fractions": (0.5, 0.2, 0.2)}, "fractions"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, (dict, str)) else str(v),
)
def test_replace_revalidates(config, changes, name):
    with pytest.raises(ValueError, match=name):
        replace(config, **changes)


def test_zero_means_off_in_training_config():
    config = TrainingConfig(eval_every=0, patience=0, checkpoint_every=0, eval_tokens=0)
    assert replace(config, max_steps=5).eval_every == 0


# ----------------------------------------------------------------------------- adapter widths
def test_adapter_config_resolved_fills_widths():
    config = AdapterConfig(num_layers=2, heads=4)
    widths = "ctx_channels, nbr_channels, hidden_channels, out_channels"
    with pytest.raises(ValueError, match=widths):
        config.validate_resolved()
    resolved = config.resolved(
        ctx_channels=64, nbr_channels=32, out_channels=64, token_channels=48, use_c2c=True
    )
    resolved.validate_resolved()
    assert (
        resolved.ctx_channels,
        resolved.nbr_channels,
        resolved.hidden_channels,
        resolved.out_channels,
        resolved.token_channels,
        resolved.use_c2c,
    ) == (64, 32, 64, 64, 48, True)
    assert resolved.num_layers == 2 and config.ctx_channels is None  # a copy


def test_adapter_config_explicit_values_win_or_must_agree():
    assert (
        AdapterConfig(hidden_channels=16, heads=2)
        .resolved(ctx_channels=64, nbr_channels=32)
        .hidden_channels
        == 16
    )
    same = AdapterConfig(ctx_channels=64).resolved(ctx_channels=64, nbr_channels=8)
    assert same.nbr_channels == 8
    with pytest.raises(ValueError, match="ctx_channels is 32"):
        AdapterConfig(ctx_channels=32).resolved(ctx_channels=64, nbr_channels=32)
    with pytest.raises(ValueError, match="divisible"):
        AdapterConfig(heads=8).resolved(ctx_channels=12, nbr_channels=12)


# ----------------------------------------------------------------------------- demo.json
def test_demo_json_loads_typed_and_unchanged(capsys):
    data = json.loads(DEFAULT_CONFIG.read_text())
    config = RunConfig.default()
    assert config == RunConfig.from_dict(data) == RunConfig.from_json_file(DEFAULT_CONFIG)
    assert isinstance(config.corpus, CorpusConfig) and isinstance(config.datastore, DatastoreConfig)
    assert isinstance(config.index, IndexConfig) and isinstance(config.evaluation, EvalConfig)
    assert isinstance(config.fusion.graph, GraphConfig)
    assert isinstance(config.fusion.adapter, AdapterConfig)
    assert config.fusion.adapter.hidden_channels == 256 and config.training.max_steps == 150
    assert RunConfig.from_json(config.to_json()) == config
    for section, values in data.items():  # every value written in demo.json is kept
        if isinstance(values, dict):
            full = config.to_dict()[section]
            for key, value in values.items():
                expected = (
                    full[key] if not isinstance(value, dict) else {k: full[key][k] for k in value}
                )
                assert expected == value, f"{section}.{key}"
    assert main(["demo", "--print-config"]) == 0
    assert capsys.readouterr().out == DEFAULT_CONFIG.read_text()
