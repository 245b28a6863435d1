"""The relation encoder: its contrastive objective recovers a planted structure, the identity
encoder reproduces raw retrieval, the encoded index is resumable and fingerprint-checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hetgraph.datastore import Datastore
from hetgraph.datastore.store import DatastoreMetadata
from hetgraph.encoder import (
    ContrastiveConfig,
    EncodedIndex,
    EncoderConfig,
    EncoderError,
    RelationEncoder,
    build_encoded_index,
    info_nce,
    train_encoder,
)
from hetgraph.encoder.sampling import PairSampler, row_labels
from hetgraph.encoder.validation import exact_neighbours
from hetgraph.index import DatastoreIndex
from hetgraph.io import DATASTORE_METADATA
from hetgraph.testing import one_error_line, run_cli, write_cli_workspace


def synthetic_datastore(
    path: Path,
    n: int = 600,
    d: int = 16,
    vocab: int = 5,
    docs: int = 20,
    seed: int = 0,
    index: bool = True,
) -> Datastore:
    """Keys whose next-token signal lies in 4 dimensions, drowned by noise 3x larger in the
    other d - 4: raw L2 barely sees it, a linear map onto the 4 recovers it."""
    rng = np.random.default_rng(seed)
    nt = rng.integers(0, vocab, n).astype(np.int32)
    centres = rng.normal(size=(vocab, 4))
    keys = np.concatenate(
        [rng.normal(scale=4.0, size=(n, d - 4)), centres[nt] + rng.normal(scale=0.1, size=(n, 4))],
        1,
    )
    arrays = {
        "keys": keys.astype(np.float16),
        "next_tokens": nt,
        "tokens": np.roll(nt, 1),
        "doc_ids": np.repeat(np.arange(docs), n // docs).astype(np.int32),
        "positions": np.tile(np.arange(n // docs), docs).astype(np.int32),
    }
    path.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(path / f"{name}.npy", array)
    DatastoreMetadata(
        num_entries=n,
        dim=d,
        key_layer=None,
        feature_dims={},
        context_length=8,
        stride=4,
        batch_size=1,
        max_tokens=None,
        model={"config": "c"},
        model_dtype="float32",
        corpus_fingerprint="x",
        fingerprint=f"synthetic-{seed}-{n}",
        complete=True,
    ).save(path / DATASTORE_METADATA)
    store = Datastore.open(path)
    if index:
        DatastoreIndex.build(store, show_progress=False).save(path / "index")
    return store


TINY = dict(
    steps=120,
    batch_size=64,
    valid_rows=150,
    leakage_radius=2,
    k=8,
    lr=1e-2,
    temperature=0.1,
    anchor_pool=400,
    chunk_rows=256,
)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_planted_structure_is_recovered(tmp_path, kind):
    store = synthetic_datastore(tmp_path / "ds")
    result = train_encoder(
        store,
        ContrastiveConfig(**TINY),
        EncoderConfig(input_dim=16, dim=8, kind=kind, hidden=16),
        show_progress=False,
    )
    raw, encoded = result.validation["raw"], result.validation["encoded"]
    assert raw["recall@1"] < 0.5  # noise hides the next token from raw L2
    assert encoded["recall@1"] > 0.9 and encoded["recall@1"] > raw["recall@1"] + 0.4
    assert encoded["knn_ppl"] < 0.5 * raw["knn_ppl"]
    assert np.mean(result.losses[-10:]) < 0.25 * result.losses[0]


def test_identity_encoder_reproduces_the_raw_neighbours_exactly(tmp_path):
    store = synthetic_datastore(tmp_path / "ds")
    encoder = RelationEncoder(EncoderConfig(input_dim=16, kind="identity"))
    assert encoder.dim == 16 and encoder.metric == "l2"
    encoder.save_pretrained(tmp_path / "enc")
    encoded = build_encoded_index(store, tmp_path / "enc", show_progress=False, chunk_rows=100)
    raw = DatastoreIndex.load(store.path / "index", store)
    queries = np.asarray(store.keys[::7])
    d_raw, i_raw = raw.search(queries, 10)
    d_enc, i_enc = encoded.search(queries, 10)
    np.testing.assert_array_equal(i_enc, i_raw)
    # Two indexes may compute the same distances through different kernels: close, not equal.
    np.testing.assert_allclose(d_enc, d_raw, rtol=1e-5, atol=1e-5)


def test_save_and_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = RelationEncoder(EncoderConfig(input_dim=12, dim=6, kind="mlp", hidden=9))
    encoder.fit_input_statistics(np.random.default_rng(0).normal(3.0, 2.0, (50, 12)))
    encoder.save_pretrained(tmp_path / "enc")
    loaded = RelationEncoder.from_pretrained(tmp_path / "enc")
    x = torch.randn(5, 12)
    torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)
    assert loaded.fingerprint == encoder.fingerprint
    assert torch.linalg.vector_norm(loaded(x), dim=-1).sub(1).abs().max() < 1e-5
    assert "kind='mlp'" in repr(loaded)
    encoder.reset_parameters()
    assert encoder.fingerprint != loaded.fingerprint
    # Replaced weights are refused by the recorded fingerprint.
    encoder.save_pretrained(tmp_path / "other")
    (tmp_path / "enc" / "encoder.safetensors").write_bytes(
        (tmp_path / "other" / "encoder.safetensors").read_bytes()
    )
    with pytest.raises(EncoderError, match="does not match the fingerprint"):
        RelationEncoder.from_pretrained(tmp_path / "enc")
    with pytest.raises(EncoderError, match="no relation encoder"):
        RelationEncoder.from_pretrained(tmp_path / "nowhere")


def test_fingerprint_mismatch_is_refused(tmp_path):
    store = synthetic_datastore(tmp_path / "ds")
    other = synthetic_datastore(tmp_path / "ds2", seed=1, index=False)
    torch.manual_seed(0)
    RelationEncoder(EncoderConfig(input_dim=16, dim=4)).save_pretrained(tmp_path / "enc")
    build_encoded_index(store, tmp_path / "enc", show_progress=False)
    assert len(EncodedIndex.load(tmp_path / "enc", store)) == len(store)
    with pytest.raises(EncoderError, match=r"does not match encoder .*enc and datastore .*ds2"):
        EncodedIndex.load(tmp_path / "enc", other)
    torch.manual_seed(1)
    RelationEncoder(EncoderConfig(input_dim=16, dim=4)).save_pretrained(tmp_path / "enc")
    with pytest.raises(EncoderError, match=r"encoder fingerprint .* recorded.*rebuild it"):
        EncodedIndex.load(tmp_path / "enc", store)


def test_interrupted_re_embedding_resumes_to_the_same_index(tmp_path, monkeypatch):
    store = synthetic_datastore(tmp_path / "ds")
    torch.manual_seed(0)
    encoder = RelationEncoder(EncoderConfig(input_dim=16, dim=8))
    for name in ("whole", "resumed"):
        encoder.save_pretrained(tmp_path / name)
    whole = build_encoded_index(store, tmp_path / "whole", chunk_rows=128, show_progress=False)

    calls = {"n": 0}
    real = RelationEncoder.encode

    def failing(self, keys, batch_rows=65536):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # after one chunk is written and recorded
        return real(self, keys, batch_rows)

    monkeypatch.setattr(RelationEncoder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        build_encoded_index(store, tmp_path / "resumed", chunk_rows=128, show_progress=False)
    progress = json.loads((tmp_path / "resumed/index/encoding_progress.json").read_text())
    assert progress["chunks_done"] == 1
    with pytest.raises(EncoderError, match="interrupted"):
        EncodedIndex.load(tmp_path / "resumed", store)
    calls["n"] = 10  # no more failures; count the chunks the resumed build encodes
    resumed = build_encoded_index(store, tmp_path / "resumed", chunk_rows=128, show_progress=False)
    assert calls["n"] == 10 + math.ceil(len(store) / 128) - 1
    a = np.load(tmp_path / "whole/index/encoded_keys.npy")
    b = np.load(tmp_path / "resumed/index/encoded_keys.npy")
    np.testing.assert_array_equal(a, b)
    queries = np.asarray(store.keys[:40])
    np.testing.assert_array_equal(whole.search(queries, 5)[1], resumed.search(queries, 5)[1])
    assert not (tmp_path / "resumed/index/encoding_progress.json").exists()


def test_info_nce_matches_a_naive_reference():
    torch.manual_seed(0)
    b, h, d, tau = 4, 3, 5, 0.2
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s), dim=-1)  # noqa: E731
    q, p, hard = unit(b, d), unit(b, d), unit(b, h, d)
    valid = torch.rand(b, h) > 0.3
    same = torch.zeros(b, b, dtype=torch.bool)
    same[0, 2] = True
    expected = []
    for i in range(b):
        logits = [float(q[i] @ p[j]) / tau for j in range(b) if j == i or not same[i, j]]
        logits += [float(q[i] @ hard[i, j]) / tau for j in range(h) if valid[i, j]]
        positive = float(q[i] @ p[i]) / tau
        expected.append(-positive + math.log(sum(math.exp(x) for x in logits)))
    got = info_nce(q, p, hard, valid, same, tau)
    assert got.item() == pytest.approx(sum(expected) / b, rel=1e-5)


@pytest.mark.parametrize("radius", [0, 3])
def test_exact_neighbours_skip_leaked_rows_like_a_naive_search(radius):
    rng = np.random.default_rng(0)
    keys = torch.as_tensor(rng.normal(size=(50, 3)), dtype=torch.float32)
    docs = np.repeat(np.arange(5), 10)
    rows = np.array([0, 13, 27, 49])
    d, ids = exact_neighbours(
        keys[rows], rows, lambda a, b: keys[a:b], 50, docs, radius, 4, "l2", chunk_rows=7
    )
    for qi, r in enumerate(rows):
        dist = ((keys - keys[r]) ** 2).sum(1).numpy()
        leaked = (np.abs(np.arange(50) - r) < max(radius, 1)) & (docs == docs[r])
        expected = np.argsort(np.where(leaked, np.inf, dist), kind="stable")[:4]
        assert set(ids[qi].tolist()) == set(expected.tolist())
        np.testing.assert_allclose(d[qi].numpy(), np.sort(dist[expected]), rtol=1e-4, atol=1e-4)


def test_positives_share_the_label_and_stay_outside_the_leakage_radius():
    rng = np.random.default_rng(0)
    nt = rng.integers(0, 3, 300)
    docs = np.repeat(np.arange(6), 50)
    labels = row_labels(nt, docs, 2)
    assert labels[0] == labels[1] or (nt[0], nt[1]) != (nt[1], nt[2])
    sampler = PairSampler(labels, docs, radius=5, valid_rows=30, seed=0)
    anchors = sampler.anchor_pool(200)
    positives, found = sampler.positives(anchors)
    assert found.mean() > 0.9
    a, p = anchors[found], positives[found]
    assert (labels[a] == labels[p]).all() and sampler.training[p].all()
    assert not ((np.abs(a - p) < 5) & (docs[a] == docs[p])).any()
    assert not np.isin(anchors, sampler.held_out).any()


def test_encoder_cli_trains_validates_and_indexes(tmp_path, capsys):
    w = write_cli_workspace(tmp_path)
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    assert (
        run_cli(
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
    assert (
        run_cli(
            "encoder",
            "train",
            "--datastore",
            w / "ds",
            "--out",
            w / "enc",
            "--dim",
            "8",
            "--steps",
            "5",
            "--batch-size",
            "16",
            "--valid-rows",
            "40",
            "--leakage-radius",
            "4",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "recall@1" in out and "raw" in out and "encoded" in out
    figures = json.loads((w / "enc" / "validation.json").read_text())
    assert set(figures["validation"]) == {"raw", "encoded"}
    assert figures["steps"] == 5
    assert run_cli("index", "build", "--datastore", w / "ds", "--encoder", w / "enc") == 0
    store = Datastore.open(w / "ds")
    index = EncodedIndex.load(w / "enc", store)
    assert index.ntotal == len(store) and index.metric == "ip"
    capsys.readouterr()
    assert run_cli("index", "build", "--datastore", w / "ds", "--encoder", w / "nowhere") == 2
    assert "no relation encoder" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["encoder", "train", "--datastore", "{tmp}/nowhere", "--out", "{tmp}/enc"],
            "no datastore at",
        ),
        (
            ["index", "build", "--datastore", "{tmp}/ds", "--encoder", "{tmp}/missing"],
            "no relation encoder at",
        ),
    ],
)
def test_encoder_commands_refuse_bad_input_in_one_line(tmp_path, capsys, argv, message):
    synthetic_datastore(tmp_path / "ds", index=False)
    assert run_cli(*[a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in one_error_line(capsys)


def test_identity_training_keeps_the_raw_figures(tmp_path):
    store = synthetic_datastore(tmp_path / "ds", index=False)
    result = train_encoder(
        store,
        ContrastiveConfig(**TINY),
        EncoderConfig(input_dim=16, kind="identity"),
        show_progress=False,
    )
    assert result.losses == []
    raw, encoded = result.validation["raw"], result.validation["encoded"]
    for name in ("recall@1", "recall@8", "knn_coverage"):
        assert encoded[name] == raw[name]
    assert encoded["knn_ppl"] == pytest.approx(raw["knn_ppl"], rel=1e-5)
