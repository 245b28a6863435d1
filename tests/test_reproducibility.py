"""Identical runs give identical bytes on one machine ("Reliability, round two", item 3): the
neighbour search does not depend on FAISS's thread count or on the order it finds ties in,
and two ``hetgraph train`` runs with the default settings write the same adapter file."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pytest
import torch

from hetgraph.cli import main
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.io import ADAPTER_WEIGHTS, TRAINING_RESULT
from hetgraph.testing import save_tiny_model, tiny_run_config, write_word_corpus


@pytest.fixture
def blas_threshold():
    """FAISS's exhaustive search as older releases run it: one BLAS product for every batch
    of at least 20 queries (1.15.1 only from 128,000)."""
    previous = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    yield
    faiss.cvar.distance_compute_blas_threshold = previous


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_results_do_not_depend_on_the_faiss_threads(blas_threshold, metric):
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3000, 32)).astype(np.float16)
    queries = keys[rng.integers(0, len(keys), 2000)].astype(np.float32)
    queries += rng.standard_normal(queries.shape).astype(np.float32) * 0.1
    results = []
    for threads in (1, 2, 1):
        config = IndexConfig(factory="Flat", metric=metric, num_threads=threads)
        index = DatastoreIndex.build(keys, config, show_progress=False)
        results.append(index.search(queries, 8))
    # Exact by construction: every distance is computed per query, whatever the threads
    # (on the BLAS path 1 and 2 threads differed in the last bits of about 5 % of them).
    for distances, ids in results[1:]:
        np.testing.assert_array_equal(ids, results[0][1])
        np.testing.assert_array_equal(distances, results[0][0])
    assert faiss.cvar.distance_compute_blas_threshold == 20  # restored after each search
    found = keys[results[0][1]].astype(np.float32)
    exact = (
        ((found - queries[:, None]) ** 2).sum(-1)
        if metric == "l2"
        else -(found * queries[:, None]).sum(-1)
    )
    np.testing.assert_allclose(results[0][0], exact, rtol=1e-4, atol=1e-4)
    assert (np.diff(results[0][0], axis=1) >= 0).all()  # nearest first


class _ShuffledTies:
    """Stands in for a FAISS index that returns tied neighbours in an arbitrary order (GPU
    FAISS, partial results merged as threads finish)."""

    ntotal, d = 100, 4

    def search(self, queries, k):
        distances = np.array([[0.0, 1.0, 1.0, 1.0, 2.0, np.inf]] * len(queries), np.float32)
        ids = np.array([[7, 42, 3, 19, 5, -1]] * len(queries), np.int64)
        return distances[:, :k], ids[:, :k]


def test_tied_neighbours_come_in_id_order():
    index = DatastoreIndex.build(
        np.zeros((100, 4), np.float16), IndexConfig(factory="Flat"), show_progress=False
    )
    index.index = _ShuffledTies()
    distances, ids = index.search(np.zeros((3, 4), np.float32), 6)
    assert ids.tolist() == [[7, 3, 19, 42, 5, -1]] * 3
    assert distances[0].tolist() == [0.0, 1.0, 1.0, 1.0, 2.0, np.inf]


@pytest.fixture
def all_threads():
    """torch (and so FAISS, whose default follows it) on every CPU, at least 2, as an
    unconstrained ``hetgraph train`` runs (the test suite runs with OMP_NUM_THREADS=1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("search", ["default", "blas"])
def test_two_default_train_runs_write_the_same_adapter_bytes(
    tmp_path, capsys, all_threads, request, search
):
    if search == "blas":  # the searches of a larger model or batch (exact_top_k)
        request.getfixturevalue("blas_threshold")
    save_tiny_model(tmp_path / "model", "qwen2")
    write_word_corpus(tmp_path / "corpus", num_documents=8, length=40)
    config = tiny_run_config(dropout=0.1)  # dropout draws too
    (tmp_path / "run.json").write_text(json.dumps(config))
    common = ["--model", tmp_path / "model", "--corpus", tmp_path / "corpus"]
    assert (
        main(
            [
                str(a)
                for a in [
                    "datastore",
                    "build",
                    *common,
                    "--out",
                    tmp_path / "ds",
                    "--context-length",
                    "64",
                    "--stride",
                    "32",
                    "--batch-size",
                    "4",
                ]
            ]
        )
        == 0
    )
    outputs = []
    for run in ("a", "b"):  # the default settings: no --threads
        out = tmp_path / run
        assert (
            main(
                [
                    str(a)
                    for a in [
                        "train",
                        *common,
                        "--datastore",
                        tmp_path / "ds",
                        "--out",
                        out,
                        "--config",
                        tmp_path / "run.json",
                    ]
                ]
            )
            == 0
        )
        outputs.append(out)
    a, b = outputs
    assert (a / ADAPTER_WEIGHTS).read_bytes() == (b / ADAPTER_WEIGHTS).read_bytes()
    results = [json.loads((out / TRAINING_RESULT).read_text())["result"] for out in outputs]
    assert results[0]["valid_ppl"] == results[1]["valid_ppl"]
    assert results[0]["train_losses"] == results[1]["train_losses"]
    capsys.readouterr()
