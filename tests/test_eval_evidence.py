"""`hetgraph eval`'s evidence: a sample over every test document, intervals from a document
bootstrap on every figure and ratio, and a per-token file that reproduces them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from hetgraph.corpus import CorpusConfig, tokenize_corpus
from hetgraph.evaluation import BootstrapSpec, perplexity_intervals
from hetgraph.models.loading import load_model
from hetgraph.testing import run_cli as run, write_cli_workspace, write_word_corpus

METHODS = ("base", "knn", "gnn", "gnn_knn")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    w = write_cli_workspace(tmp_path_factory.mktemp("evidence"))
    write_word_corpus(w / "corpus", num_documents=50)  # several test documents
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
        )
        == 0
    )
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
    return w


def _eval(w, name, *extra):
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
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
            w / f"{name}.json",
            "--per-token",
            w / f"{name}.safetensors",
            *extra,
        )
        == 0
    )
    return json.loads((w / f"{name}.json").read_text()), w / f"{name}.safetensors"


def test_eval_reports_intervals_ratios_and_documents(workspace):
    results, per_token = _eval(workspace, "a", "--max-tokens", "150", "--tune-tokens", "120")
    _, tokenizer = load_model(workspace / "model")
    test = tokenize_corpus(CorpusConfig(path=str(workspace / "corpus")), tokenizer).test
    test_docs = len(np.unique(test.doc_ids))
    assert results["tokens"] == 150 and results["documents"] == test_docs
    assert results["sample"]["test"] == {
        "kind": "stratified",
        "seed": 0,
        "tokens": 150,
        "documents": test_docs,
    }
    assert results["bootstrap"] == {
        "resamples": 1000,
        "seed": 0,
        "level": 0.95,
        "over": "documents",
    }
    for method in METHODS:
        row = results[method]
        low, high = row["ppl_ci95"]
        assert low <= row["ppl"] * (1 + 1e-9) and row["ppl"] <= high * (1 + 1e-9)
        assert row["documents"] == test_docs > 1
    assert set(results["ratios"]) == {
        "knn/base",
        "gnn/base",
        "gnn/knn",
        "gnn_knn/base",
        "gnn_knn/knn",
        "gnn_knn/gnn",
    }
    for key, entry in results["ratios"].items():
        a, b = key.split("/")
        assert entry["ratio"] == pytest.approx(results[a]["ppl"] / results[b]["ppl"], rel=1e-6)
        assert entry["ci95"][0] <= entry["ratio"] * (1 + 1e-9)
        assert entry["ratio"] <= entry["ci95"][1] * (1 + 1e-9)
    # The per-token file reproduces every figure and interval.
    tensors = load_file(per_token)
    assert len(tensors["targets"]) == 150
    assert set(np.unique(tensors["doc_ids"])) == set(np.unique(test.doc_ids))
    assert np.array_equal(tensors["targets"], test.tokens[tensors["positions"] + 1])
    log_probs = {m: tensors[f"log_prob.{m}"] for m in METHODS}
    for method in METHODS:
        assert math.exp(-log_probs[method].astype(np.float64).mean()) == pytest.approx(
            results[method]["ppl"], rel=1e-5
        )
    methods, ratios = perplexity_intervals(log_probs, tensors["doc_ids"], BootstrapSpec())
    assert list(methods["gnn"].ci95) == pytest.approx(results["gnn"]["ppl_ci95"], rel=1e-5)
    assert list(ratios["gnn_knn/knn"].ci95) == pytest.approx(
        results["ratios"]["gnn_knn/knn"]["ci95"], rel=1e-5
    )


def test_two_runs_of_the_same_adapter_write_identical_per_token_files(workspace):
    _, first = _eval(workspace, "b1", "--max-tokens", "100", "--tune-tokens", "100")
    _, second = _eval(workspace, "b2", "--max-tokens", "100", "--tune-tokens", "100")
    assert first.read_bytes() == second.read_bytes()
    # Another seed scores other positions of the same documents.
    _, other = _eval(
        workspace, "b3", "--max-tokens", "100", "--tune-tokens", "100", "--sample-seed", "7"
    )
    assert not np.array_equal(load_file(first)["positions"], load_file(other)["positions"])


def test_all_and_prefix(workspace):
    whole, _ = _eval(workspace, "c1", "--max-tokens", "all", "--tune-tokens", "100")
    prefix, _ = _eval(
        workspace, "c2", "--max-tokens", "120", "--tune-tokens", "100", "--sample", "prefix"
    )
    assert prefix["tokens"] == 119 and prefix["sample"]["test"]["kind"] == "prefix"
    assert whole["tokens"] > prefix["tokens"] and whole["documents"] >= prefix["documents"]


def test_per_token_path_is_checked_before_any_work(workspace, capsys):
    w = workspace
    assert (
        run(
            "eval",
            "--model",
            w / "model",
            "--corpus",
            w / "corpus",
            "--threads",
            "1",
            "--datastore",
            w / "ds",
            "--json",
            w / "same.json",
            "--per-token",
            w / "same.json",
        )
        == 2
    )
    assert "same file" in capsys.readouterr().err
    assert not (w / "same.json").exists()


def test_lora_control_trains_and_evaluates_beside_the_graph_adapter(workspace, capsys):
    """`train --control lora` sizes a LoRA to the graph adapter; `eval --control` scores it
    on the same tokens with paired ratios against GNN-LM."""
    pytest.importorskip("peft")
    w = workspace
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    capsys.readouterr()
    assert (
        run(
            "train",
            *common,
            "--datastore",
            w / "ds",
            "--out",
            w / "lora",
            "--config",
            w / "run.json",
            "--control",
            "lora",
        )
        == 0
    )
    trained = json.loads(capsys.readouterr().out)
    assert abs(trained["trained_parameters"] / trained["graph_adapter_parameters"] - 1) <= 0.1
    results, per_token = _eval(
        w, "d", "--max-tokens", "120", "--tune-tokens", "100", "--control", w / "lora"
    )
    for method in ("lora", "lora_knn", "gnn", "gnn_knn"):
        assert math.isfinite(results[method]["ppl"]) and "ppl_ci95" in results[method]
    assert {"gnn_knn/lora_knn", "gnn/lora", "lora/base"} <= set(results["ratios"])
    assert "log_prob.lora_knn" in load_file(per_token)
    # The base rows are the base model's: the control is switched off for them.
    alone, _ = _eval(w, "d2", "--max-tokens", "120", "--tune-tokens", "100")
    assert results["base"]["ppl"] == pytest.approx(alone["base"]["ppl"], rel=1e-6)
    assert results["gnn"]["ppl"] == pytest.approx(alone["gnn"]["ppl"], rel=1e-6)
    # The control alone through --adapter.
    assert (
        run(
            "eval",
            *common,
            "--datastore",
            w / "ds",
            "--adapter",
            w / "lora",
            "--config",
            w / "run.json",
            "--max-tokens",
            "120",
            "--tune-tokens",
            "100",
            "--json",
            w / "d3.json",
        )
        == 0
    )
    only = json.loads((w / "d3.json").read_text())
    assert "lora" in only and "gnn" not in only
    assert only["lora"]["ppl"] == pytest.approx(results["lora"]["ppl"], rel=1e-6)
