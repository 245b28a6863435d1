"""Retrieval through a relation encoder from the command line: ``train``, ``eval``,
``generate`` and ``inspect`` take ``--encoder ENC``; an adapter records the encoder it was
trained with, and using it without that encoder (or with another) is refused in one line."""

from __future__ import annotations

import json

import pytest

from hetgraph.datastore import Datastore
from hetgraph.encoder import EncodedIndex
from hetgraph.testing import one_error_line, run_cli, write_cli_workspace


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    w = write_cli_workspace(tmp_path_factory.mktemp("encoder-cli"))
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    build = ["--context-length", "64", "--stride", "32", "--batch-size", "4"]
    assert run_cli("datastore", "build", *common, "--out", w / "ds", *build) == 0
    assert run_cli("index", "build", "--datastore", w / "ds") == 0
    for name, seed in (("enc", "0"), ("other-enc", "1")):
        encoder = ["--dim", "8", "--steps", "3", "--batch-size", "16", "--valid-rows", "40"]
        args = ["--datastore", w / "ds", "--out", w / name, "--seed", seed, *encoder]
        assert run_cli("encoder", "train", *args) == 0
        assert run_cli("index", "build", "--datastore", w / "ds", "--encoder", w / name) == 0
    train = [*common, "--datastore", w / "ds", "--config", w / "run.json"]
    assert run_cli("train", *train, "--encoder", w / "enc", "--out", w / "adapter") == 0
    assert run_cli("train", *train, "--out", w / "raw-adapter") == 0
    return w, common


def test_eval_through_the_encoder_scores_every_method(encoded, tmp_path):
    w, common = encoded
    argv = ["eval", *common, "--datastore", w / "ds", "--config", w / "run.json"]
    target = tmp_path / "eval.json"
    assert run_cli(*argv, "--encoder", w / "enc", "--adapter", w / "adapter", "--json", target) == 0
    result = json.loads(target.read_text())
    assert {"base", "knn", "gnn", "gnn_knn"} <= set(result)
    assert result["gnn"]["ppl"] > 1 and result["knn"]["ppl"] > 1


def test_generate_and_inspect_retrieve_through_the_encoder(encoded, capsys):
    w, _ = encoded
    model = ["--model", w / "model", "--datastore", w / "ds", "--encoder", w / "enc"]
    generate = ["--adapter", w / "adapter", "--prompt", "alpha", "--max-new-tokens", "3"]
    assert run_cli("generate", *model, *generate) == 0
    capsys.readouterr()
    assert run_cli("inspect", *model, "--adapter", w / "adapter", "--text", "alpha beta") == 0
    assert capsys.readouterr().out.strip()  # the retrieved contexts are shown


def test_the_encoded_index_searches_encoded_queries(encoded):
    w, _ = encoded
    store = Datastore.open(w / "ds")
    index = EncodedIndex.load(w / "enc", store)
    keys = store.keys[:5].astype("float32")
    distances, ids = index.search(keys, 4)
    assert ids.shape == (5, 4) and distances.shape == (5, 4)
    assert (ids >= 0).all() and (ids < len(store)).all()


@pytest.mark.parametrize(
    "encoder, adapter, message",
    [
        (None, "adapter", "was trained with the relation encoder"),
        ("other-enc", "adapter", "was trained with the relation encoder"),
        ("enc", "raw-adapter", "was trained without a relation encoder"),
    ],
)
def test_an_adapter_is_refused_with_another_retrieval(encoded, capsys, encoder, adapter, message):
    w, common = encoded
    argv = ["eval", *common, "--datastore", w / "ds", "--config", w / "run.json"]
    argv += ["--adapter", w / adapter] + (["--encoder", w / encoder] if encoder else [])
    capsys.readouterr()
    assert run_cli(*argv) == 2
    assert message in one_error_line(capsys)
