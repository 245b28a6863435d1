"""The ``hetgraph`` command line, end to end on a tiny saved model and a tiny text corpus."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from hetgraph.cli import build_parser, main
from hetgraph.testing import write_cli_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_cli_workspace(tmp_path_factory.mktemp("cli"))


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "datastore", "index", "train", "eval", "generate", "inspect", "verify"):
        assert command in out


def test_round_trip(workspace, capsys):
    w = workspace
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    assert (
        run(
            "datastore",
            "build",
            *common,
            "--out",
            w / "ds",
            "--context-length",
            "64",
            "--stride",
            "32",
            "--batch-size",
            "4",
        )
        == 0
    )
    assert (w / "ds" / "index" / "index.faiss").is_file()
    assert run("index", "build", "--datastore", w / "ds", "--factory", "HNSW16") == 0
    assert run("index", "build", "--datastore", w / "ds", "--factory", "Flat") == 0
    assert (
        run(
            "train",
            *common,
            "--datastore",
            w / "ds",
            "--out",
            w / "adapter",
            "--config",
            w / "run.json",
        )
        == 0
    )
    assert (w / "adapter" / "adapter.safetensors").is_file() and (
        w / "adapter" / "training.json"
    ).is_file()
    capsys.readouterr()
    assert (
        run(
            "eval",
            *common,
            "--datastore",
            w / "ds",
            "--adapter",
            w / "adapter",
            "--config",
            w / "run.json",
            "--json",
            w / "eval.json",
            "--plot",
            w / "eval.png",
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "GNN-LM + kNN" in table and "kNN-LM" in table
    results = json.loads((w / "eval.json").read_text())
    assert set(results) >= {"base", "knn", "gnn", "gnn_knn", "tokens"}
    for method in ("base", "knn", "gnn", "gnn_knn"):
        assert math.isfinite(results[method]["ppl"]) and 0 <= results[method]["acc"] <= 1
    # kNN-LM is tuned on valid over a grid that includes λ = 0, so it is never far above base.
    assert results["knn"]["ppl"] <= results["base"]["ppl"] * 1.05
    assert (w / "eval.png").stat().st_size > 1000
    # The window side read from a table built once gives the same GNN-LM results.
    by_setting = {}
    for setting in ("on", "off"):
        assert (
            run(
                "eval",
                *common,
                "--datastore",
                w / "ds",
                "--adapter",
                w / "adapter",
                "--config",
                w / "run.json",
                "--neighbour-states",
                setting,
                "--json",
                w / f"eval-{setting}.json",
            )
            == 0
        )
        by_setting[setting] = json.loads((w / f"eval-{setting}.json").read_text())
    assert "neighbour_states_seconds" in by_setting["on"]["speed"]
    assert "neighbour_states_seconds" not in by_setting["off"]["speed"]
    for method in ("gnn", "gnn_knn"):
        assert by_setting["on"][method]["ppl"] == pytest.approx(
            by_setting["off"][method]["ppl"], rel=1e-5
        )
    capsys.readouterr()
    assert (
        run(
            "generate",
            "--model",
            w / "model",
            "--datastore",
            w / "ds",
            "--adapter",
            w / "adapter",
            "--prompt",
            "import os",
            "--max-new-tokens",
            "5",
            "--show-neighbours",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("import os") and "#0" in out
    assert (
        run(
            "inspect",
            "--model",
            w / "model",
            "--datastore",
            w / "ds",
            "--text",
            "alpha beta gamma",
            "--json",
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["neighbours"] and report["neighbours"][0]["document"].startswith("doc")
    for path in (w / "ds", w / "adapter"):
        assert run("verify", path) == 0
        assert capsys.readouterr().out.startswith(f"OK: {path}")
    damaged = w / "adapter-damaged"
    shutil.copytree(w / "adapter", damaged)
    weights = damaged / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    assert run("verify", damaged) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"DAMAGED: {damaged}") and "adapter.safetensors" in out


def test_bad_input_gives_a_clear_error_not_a_traceback(workspace, capsys):
    w = workspace
    assert (
        run("eval", "--model", w / "model", "--corpus", w / "corpus", "--datastore", w / "missing")
        == 2
    )
    assert "no datastore" in capsys.readouterr().err
    assert (
        run(
            "datastore",
            "build",
            "--model",
            w / "model",
            "--corpus",
            w / "nothing-here",
            "--out",
            w / "ds2",
        )
        == 2
    )
    assert "nothing-here" in capsys.readouterr().err
    assert run("demo", "--config", w / "absent.json") == 2
    assert "print-config" in capsys.readouterr().err
