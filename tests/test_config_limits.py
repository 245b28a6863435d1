r"""Values inside configs that would ask for more than the machine holds are refused at
construction, in one line naming the file and the field, before anything is allocated or
written: adapter widths, layers, heads and feed-forward multipliers, neighbour windows,
``k``, training batches, and JSON nested too deep to read."""

from __future__ import annotations

import json
import re

import pytest

from hetgraph.cli import main
from hetgraph.configuration import MAX_JSON_DEPTH, ConfigError, parse_json
from hetgraph.fusion import FusionConfig
from hetgraph.graph import GraphConfig
from hetgraph.limits import ResourceLimitError, json_depth, naming
from hetgraph.nn import AdapterConfig, GraphAdapter
from hetgraph.pipeline import RunConfig
from hetgraph.testing import tiny_run_config
from hetgraph.training import TrainingConfig

#: (section path, key, value, part of the error line); every value used to be a traceback
#: (an allocation of gigabytes to terabytes, or unbounded growth) or a hang.
HOSTILE_VALUES = [
    (("fusion", "graph"), "left", 10**8, "fusion.graph: left is 100000000, outside [0, 256]"),
    (("fusion", "graph"), "right", 257, "fusion.graph: right is 257, outside [0, 256]"),
    (("fusion", "adapter"), "hidden_channels", 2 * 10**9, "fusion.adapter: an adapter of about"),
    (
        ("fusion", "adapter"),
        "ff_multiplier",
        10**8,
        "fusion.adapter: ff_multiplier is 100000000, outside [1, 64]",
    ),
    (
        ("fusion", "adapter"),
        "num_layers",
        10**7,
        "fusion.adapter: num_layers is 10000000, outside [1, 1024]",
    ),
    (("fusion", "adapter"), "heads", 10**9, "fusion.adapter: heads is 1000000000"),
    (("fusion", "adapter"), "token_channels", 3 * 10**9, "fusion.adapter: an adapter of about"),
    (("fusion",), "k", 10**9, "fusion: the context graph of one position"),
    (("training",), "batch_size", 10**8, "training: batch_size is 100000000, outside [1, 65536]"),
    (
        ("training",),
        "context_length",
        10**8,
        "training: a micro-batch of batch_size × context_length = 200,000,000 tokens",
    ),
]


def _run_config_with(section: tuple[str, ...], key: str, value: int) -> dict:
    data = tiny_run_config()
    node = data
    for name in section:
        node = node.setdefault(name, {})
    node[key] = value
    return data


@pytest.mark.parametrize("section, key, value, message", HOSTILE_VALUES)
def test_cli_refuses_hostile_config_values_in_one_line(
    section, key, value, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1G")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_run_config_with(section, key, value)))
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--datastore",
                str(tmp_path / "ds"),
                "--out",
                str(out),
                "--config",
                str(path),
                "--threads",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: {path}: ") and message in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.parametrize("section, key, value, message", HOSTILE_VALUES)
def test_hostile_values_are_refused_from_python_too(section, key, value, message, monkeypatch):
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1G")
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_dict(_run_config_with(section, key, value))


def test_adapter_memory_is_estimated_from_its_config(monkeypatch):
    for kwargs in (
        {},
        {"use_c2c": True},
        {"feed_forward": False},
        {"token_channels": 24},
        {"use_c2c": True, "tie_intra": True},
        {"output_bias": True},
        {"hidden_channels": 64, "heads": 4, "ff_multiplier": 3},
    ):
        config = AdapterConfig(
            ctx_channels=32, nbr_channels=48, out_channels=40, num_layers=2, **kwargs
        )
        adapter = GraphAdapter(config)
        assert config.parameter_count() == sum(p.numel() for p in adapter.parameters())
    # 4 layers at width 256: about 4.2M float32 parameters (17 MB), beyond a 16 MB budget.
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "16M")
    with pytest.raises(
        ConfigError,
        match=r"adapter of about 4,\d{3},\d{3} float32 parameters "
        r"\(hidden_channels 256, num_layers 4, .*would need "
        r"1\d\.\d MB.*lower hidden_channels",
    ):
        AdapterConfig(hidden_channels=256, num_layers=4)
    AdapterConfig(hidden_channels=128, num_layers=4)  # a quarter of it fits
    # Widths left unset are checked once resolved() fills them from the model.
    unresolved = AdapterConfig(num_layers=4)
    with pytest.raises(ConfigError, match="adapter of about"):
        unresolved.resolved(ctx_channels=256, nbr_channels=256)


def test_window_bounds_are_inclusive():
    assert GraphConfig(left=256, right=256).window_size == 513
    for side in ("left", "right"):
        with pytest.raises(ConfigError, match=f"{side} is 257, outside"):
            GraphConfig(**{side: 257})


def test_a_large_k_is_refused_per_position(monkeypatch):
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1M")
    # 5,000 × 3 nodes of a 16-wide adapter, 72 bytes each: 1.08 MB per query position.
    with pytest.raises(
        ConfigError,
        match=r"one position \(k 5000 × .* = 15,000 neighbour "
        r"nodes\) would need 1.1 MB.*lower k",
    ):
        FusionConfig(k=5000, adapter={"hidden_channels": 16, "heads": 2})
    FusionConfig(k=4000, adapter={"hidden_channels": 16, "heads": 2})


def test_batch_bounds(monkeypatch):
    assert TrainingConfig(batch_size=1 << 16, context_length=1).batch_size == 1 << 16
    with pytest.raises(ConfigError, match="grad_accumulation gives larger batches"):
        TrainingConfig(batch_size=(1 << 16) + 1, context_length=1)
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1M")
    TrainingConfig(batch_size=4, context_length=256)  # 1 MB exactly
    with pytest.raises(ConfigError, match=r"1,028 tokens would need 1\.1 MB"):
        TrainingConfig(batch_size=4, context_length=257)


# ------------------------------------------------------------------------- JSON nesting
def test_json_depth():
    assert [json_depth(v, 10) for v in (1, [], {}, {"a": [1]}, {"a": {"b": {}}}, [[[[]]]])] == [
        0,
        1,
        1,
        2,
        3,
        4,
    ]
    assert json_depth([[[[[[]]]]]], 3) == 3


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_cli_refuses_a_config_nested_too_deep(depth, tmp_path, capsys):
    # 100,000 levels used to be a RecursionError traceback from the JSON reader.
    path = tmp_path / "deep.json"
    path.write_text('{"fusion": ' * depth + "1" + "}" * depth)
    out = tmp_path / "out"
    assert (
        main(
            ["train", "--datastore", str(tmp_path / "ds"), "--out", str(out), "--config", str(path)]
        )
        == 2
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"error: {path} nests objects or lists more than {MAX_JSON_DEPTH} deep" in lines[0]
    assert not out.exists()


def test_parse_json_accepts_the_depth_limit_and_names_the_source():
    text = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(parse_json(text, "x.json"), 100) == MAX_JSON_DEPTH
    with pytest.raises(ConfigError, match=r"^--corpus-config x\.json nests"):
        parse_json("[" + text + "]", "--corpus-config x.json")
    with pytest.raises(ConfigError, match="the JSON text of GraphConfig nests"):
        GraphConfig.from_json("[" * 50_000 + "]" * 50_000)


def test_size_refusals_are_both_config_and_resource_limit_errors():
    for build in (
        lambda: AdapterConfig(num_layers=2000),
        lambda: RunConfig.from_dict({"fusion": {"adapter": {"num_layers": 2000}}}),
    ):
        with pytest.raises(ResourceLimitError) as raised:
            build()
        assert isinstance(raised.value, ConfigError)
    assert naming(raised.value, "run.json") is not raised.value
    assert str(naming(raised.value, "run.json")).startswith("run.json: fusion.adapter: ")
    assert naming(raised.value, "fusion.adapter") is raised.value
