"""The adapter's model card (``README.md`` with Hub-style YAML metadata): written by
``save_pretrained``, updated with the training tokens at the end of training and with the
results of ``hetgraph eval --adapter``; never needed by loading or ``verify``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hetgraph.cli import main
from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import Datastore, DatastoreConfig, build_datastore
from hetgraph.fusion import FusionConfig, HetGraphLM, model_card as card_module
from hetgraph.fusion.model_card import (
    ADAPTER_EVALUATION,
    CARD_END,
    MODEL_CARD,
    read_model_card_metadata,
    record_evaluation_in_card,
    render_model_card,
    write_model_card,
)
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_DIR, read_json
from hetgraph.storage import StorageError
from hetgraph.testing import byte_tokenizer, tiny_causal_lm, write_cli_workspace
from hetgraph.verify import verify

ADAPTER = dict(hidden_channels=16, num_layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
#: What ``evaluate_four_way`` returns, in the shape ``hetgraph eval`` passes on.
RESULTS = {
    "base": {"ppl": 20.0, "acc": 0.25},
    "knn": {"ppl": 12.5, "acc": 0.4, "lambda": 0.3, "temperature": 1.0, "k": 4},
    "gnn": {"ppl": 15.0, "acc": 0.3},
    "gnn_knn": {"ppl": 11.0, "acc": 0.42, "lambda": 0.2, "temperature": 1.0, "k": 4},
    "tokens": 300,
    "valid_tokens": 200,
    "speed": {},
    "provenance": {"eval_corpus": "c0ffee", "datastore_corpus": "c0ffee"},
}


def front_matter(directory: Path) -> dict:
    text = (directory / MODEL_CARD).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    data = yaml.safe_load(text.split("\n---\n", 1)[0][4:])
    assert data == read_model_card_metadata(directory)
    return data


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny datastore with its index and an adapter saved into ``ds/adapter``."""
    root = tmp_path_factory.mktemp("card")
    rng = np.random.default_rng(0)
    split = TokenizedSplit(
        "train",
        rng.integers(0, 256, 160).astype(np.int32),
        np.repeat(np.arange(4, dtype=np.int32), 40),
        list("abcd"),
    )
    model = tiny_causal_lm("qwen2")
    store = build_datastore(
        model,
        byte_tokenizer(),
        split,
        root / "ds",
        DatastoreConfig(context_length=32, stride=16, batch_size=2),
        show_progress=False,
    )
    index = DatastoreIndex.build(store, IndexConfig(factory="Flat"), show_progress=False)
    index.save(root / "ds" / INDEX_DIR)
    torch.manual_seed(0)
    HetGraphLM(model, store, index, FusionConfig(k=4, adapter=ADAPTER)).save_pretrained(
        root / "ds" / "adapter"
    )
    return root / "ds"


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "ds")
    return tmp_path / "ds"


def load(tree: Path) -> HetGraphLM:
    store = Datastore.open(tree)
    index = DatastoreIndex.load(tree / INDEX_DIR, store)
    return HetGraphLM.from_pretrained(tree / "adapter", tiny_causal_lm("qwen2"), store, index)


def test_save_pretrained_writes_a_model_card_with_hub_metadata(tree):
    adapter = tree / "adapter"
    meta = front_matter(adapter)
    config = read_json(adapter / ADAPTER_CONFIG)
    assert meta["library_name"] == "hetgraph" and meta["pipeline_tag"] == "text-generation"
    assert "hetgraph" in meta["tags"]
    section = meta["hetgraph"]
    assert section["base_model"]["model_type"] == "qwen2"
    assert section["base_model"]["fingerprint"]["weights"] == config["model"]["weights"]
    assert section["datastore"]["fingerprint"] == config["datastore"]["fingerprint"]
    assert section["fusion_sites"] == list(config["adapters"]) == ["head"]
    assert section["adapter_sha256"] == config["integrity"]["files"][ADAPTER_WEIGHTS]["sha256"]
    assert "training" not in section and "model-index" not in meta  # not trained, not evaluated
    # The card is not part of the adapter's integrity record.
    assert set(config["integrity"]["files"]) == {ADAPTER_WEIGHTS}
    # huggingface_hub reads it (and validates its metadata).
    assert ModelCard.load(adapter / MODEL_CARD).data.library_name == "hetgraph"
    assert "HetGraphLM.from_pretrained" in (adapter / MODEL_CARD).read_text()


@pytest.mark.parametrize(
    "name, hub_id",
    [
        ("Qwen/Qwen2-0.5B", "Qwen/Qwen2-0.5B"),
        ("/models/tiny", None),  # a local path: not Hub metadata
        ("evil\n---\nlibrary_name: other\nx: '\"\u2028]", None),
    ],
)
def test_base_model_name_is_quoted_and_only_hub_ids_are_base_model(tree, name, hub_id):
    lm = load(tree)
    lm.model.config._name_or_path = name
    lm.save_pretrained(tree / "adapter")
    meta = front_matter(tree / "adapter")
    assert meta["library_name"] == "hetgraph" and "x" not in meta
    assert meta.get("base_model") == hub_id
    recorded = meta["hetgraph"]["base_model"]["name_or_path"]
    assert "\n" not in recorded and recorded.startswith(name.split("\n")[0])
    assert read_json(tree / "adapter" / ADAPTER_CONFIG)["base_model_name_or_path"] == name


@pytest.mark.parametrize("damage", ["delete", "garbage", "bad yaml", "directory"])
def test_a_missing_or_damaged_card_never_affects_load_or_verify(tree, damage):
    card = tree / "adapter" / MODEL_CARD
    card.unlink()
    if damage == "garbage":
        card.write_bytes(b"\xff\xfe\x00" * 100)
    elif damage == "bad yaml":
        card.write_text("---\nlibrary_name: [unclosed\n---\n")
    elif damage == "directory":
        card.mkdir()
    report = verify(tree / "adapter")
    assert report.ok, report
    assert card not in report.checked
    assert verify(tree).ok
    lm = load(tree)
    assert lm.engine.adapters  # loaded
    assert main(["verify", str(tree / "adapter")]) == 0


def test_card_is_updated_with_evaluation_results_of_this_adapter_only(tree):
    adapter = tree / "adapter"
    assert record_evaluation_in_card(adapter, RESULTS, split="valid") == adapter / MODEL_CARD
    meta = front_matter(adapter)
    assert meta["hetgraph"]["evaluation"] == {
        "split": "valid",
        "tokens": 300,
        "corpus_fingerprint": "c0ffee",
    }
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["dataset"]["split"] == "valid"
    metrics = {(m["config"], m["type"]): m["value"] for m in result["metrics"]}
    assert metrics[("gnn", "perplexity")] == pytest.approx(15.0)
    assert metrics[("gnn_knn", "accuracy")] == pytest.approx(0.42)
    assert "| GNN-LM | 15.000 |" in (adapter / MODEL_CARD).read_text()
    assert ModelCard.load(adapter / MODEL_CARD).data.eval_results
    # The same adapter saved again keeps its results; other weights (retrained) do not.
    lm = load(tree)
    lm.save_pretrained(adapter)
    assert "model-index" in front_matter(adapter)
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.fill_(0.25)
    lm.save_pretrained(adapter)
    assert "model-index" not in front_matter(adapter)
    assert (adapter / ADAPTER_EVALUATION).is_file()
    assert verify(adapter).ok


def test_text_below_the_marker_is_kept_and_a_persons_readme_is_left(tree, caplog):
    adapter = tree / "adapter"
    card = adapter / MODEL_CARD
    card.write_text(card.read_text() + "\n## Notes\n\nTrained for the demo.\n")
    record_evaluation_in_card(adapter, RESULTS)
    text = card.read_text()
    assert text.endswith("## Notes\n\nTrained for the demo.\n")
    assert text.count(CARD_END) == 1 and "## Evaluation" in text
    card.write_text("# My own adapter notes\n")
    with caplog.at_level(logging.WARNING):
        assert write_model_card(adapter) is None
    assert card.read_text() == "# My own adapter notes\n"
    assert "delete it" in caplog.text


def test_a_card_that_cannot_be_written_does_not_fail_the_save(tree, monkeypatch, caplog):
    def full_disk(path, text):
        raise StorageError(f"{path}: no space left on the device")

    monkeypatch.setattr(card_module, "atomic_write_text", full_disk)
    before = (tree / "adapter" / MODEL_CARD).read_bytes()
    with caplog.at_level(logging.WARNING):
        load(tree).save_pretrained(tree / "adapter")
    assert "could not write the model card" in caplog.text
    assert (tree / "adapter" / MODEL_CARD).read_bytes() == before
    assert verify(tree / "adapter").ok
    assert not [p for p in (tree / "adapter").iterdir() if p.name.endswith(".tmp")]


def test_train_and_eval_through_the_cli_fill_the_card(tmp_path, capsys):
    ws = write_cli_workspace(tmp_path)
    inputs = ["--model", str(ws / "model"), "--corpus", str(ws / "corpus"), "--threads", "1"]
    assert (
        main(
            [
                "datastore",
                "build",
                *inputs,
                "--out",
                str(ws / "ds"),
                "--context-length",
                "64",
                "--stride",
                "32",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    common = [*inputs, "--config", str(ws / "run.json")]
    assert (
        main(["train", *common, "--datastore", str(ws / "ds"), "--out", str(ws / "adapter")]) == 0
    )
    meta = front_matter(ws / "adapter")
    training = read_json(ws / "adapter" / "training.json")
    config = training["config"]
    assert meta["hetgraph"]["training"]["steps"] == training["result"]["steps"] == 4
    assert meta["hetgraph"]["training"]["tokens"] == (
        4 * config["batch_size"] * config["context_length"] * config["grad_accumulation"]
    )
    assert meta["hetgraph"]["base_model"]["name_or_path"] == str(ws / "model")
    assert "model-index" not in meta
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                *common,
                "--datastore",
                str(ws / "ds"),
                "--adapter",
                str(ws / "adapter"),
                "--max-tokens",
                "200",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    meta = front_matter(ws / "adapter")
    assert meta["hetgraph"]["training"]["tokens"] > 0  # kept
    metrics = {
        (m["config"], m["type"]): m["value"]
        for m in meta["model-index"][0]["results"][0]["metrics"]
    }
    assert {key for key, _ in metrics} == {"base", "knn", "gnn", "gnn_knn"}
    gnn_row = next(line for line in printed.splitlines() if line.startswith("| GNN-LM |"))
    assert gnn_row in (ws / "adapter" / MODEL_CARD).read_text()
    assert main(["verify", str(ws / "adapter")]) == 0


def test_evaluation_results_that_cannot_be_recorded_are_a_warning(tree, monkeypatch, caplog):
    def read_only(path, record):
        raise StorageError(f"{path}: the file system is read-only")

    monkeypatch.setattr(card_module, "atomic_write_json_record", read_only)
    before = (tree / "adapter" / MODEL_CARD).read_bytes()
    with caplog.at_level(logging.WARNING):
        assert record_evaluation_in_card(tree / "adapter", RESULTS) is None
    assert "could not record the evaluation results" in caplog.text
    assert (tree / "adapter" / MODEL_CARD).read_bytes() == before
    assert record_evaluation_in_card(None, RESULTS) is None  # eval without --adapter


@pytest.mark.parametrize(
    "record, flags",
    [
        ({}, []),
        ({"retrieval": {"encoder": "e1", "encoder_dir": "runs/enc"}}, ["--encoder ENCODER"]),
        ({"knowledge": {"fingerprint": "k1"}}, ["--kg KNOWLEDGE_GRAPH"]),
    ],
)
def test_the_card_names_the_options_its_retrieval_needs(tree, record, flags):
    config = {**read_json(tree / "adapter" / ADAPTER_CONFIG), **record}
    card = render_model_card(tree / "adapter", config)
    commands = [line for line in card.splitlines() if line.startswith("hetgraph ")]
    assert len(commands) == 2
    for command in commands:
        assert all(flag in command for flag in flags)
        assert ("--encoder" in command) == bool(record.get("retrieval"))
        assert ("--kg" in command) == bool(record.get("knowledge"))
