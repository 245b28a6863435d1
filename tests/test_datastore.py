"""Datastore build / resume / open, on tiny random Qwen2, Llama and GPT-2 models."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.corpus.windows import sliding_windows
from hetgraph.datastore import (
    Datastore,
    DatastoreConfig,
    DatastoreError,
    HiddenStateCapture,
    build_datastore,
)
from hetgraph.io import DATASTORE_METADATA, DATASTORE_PROGRESS
from hetgraph.testing import FAMILIES, byte_tokenizer, tiny_causal_lm


def make_split(
    num_tokens: int = 300, num_docs: int = 3, seed: int = 0, name: str = "train"
) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, num_tokens).astype(np.int32)
    doc_ids = np.sort(rng.integers(0, num_docs, num_tokens)).astype(np.int32)
    doc_ids[:num_docs] = np.arange(num_docs)  # every document non-empty
    doc_ids.sort()
    return TokenizedSplit(name, tokens, doc_ids, [f"doc{i}" for i in range(num_docs)])


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_lm_head_keys_equal_final_hidden_states(family, tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    split = make_split(200)
    ds = build_datastore(
        model,
        tokenizer,
        split,
        tmp_path / "ds",
        DatastoreConfig(context_length=256, stride=128, batch_size=2, feature_layers=(0, -1)),
        show_progress=False,
    )
    n = len(split) - 1
    assert len(ds) == n and ds.dim == 32 and ds.key_layer is None and ds.complete
    np.testing.assert_array_equal(ds.tokens, split.tokens[:n])
    np.testing.assert_array_equal(ds.next_tokens, split.tokens[1:])
    np.testing.assert_array_equal(ds.doc_ids, split.doc_ids[:n])
    np.testing.assert_array_equal(ds.positions, split.positions[:n])
    assert ds.keys.dtype == np.float16 and ds.keys.shape == (n, 32) and not ds.keys.flags.writeable
    with torch.no_grad():
        out = model(
            torch.from_numpy(split.tokens[None, :n].astype(np.int64)), output_hidden_states=True
        )
    final = out.hidden_states[-1][0].to(torch.float16).numpy()
    np.testing.assert_allclose(
        ds.keys.astype(np.float32), final.astype(np.float32), atol=2e-3, rtol=2e-3
    )
    # Stored per-layer features are the decoder-layer outputs (hidden_states[i + 1]).
    assert ds.feature_layers == (0, 1)
    layer0 = out.hidden_states[1][0].to(torch.float16).numpy().astype(np.float32)
    np.testing.assert_allclose(ds.features(0).astype(np.float32), layer0, atol=2e-3, rtol=2e-3)
    with pytest.raises(DatastoreError, match="stores no features"):
        ds.features(5)
    meta = json.loads((tmp_path / "ds" / DATASTORE_METADATA).read_text())
    assert meta["complete"] and meta["num_entries"] == n and meta["key_layer"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layer_keys_and_strided_windows(family, tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    split = make_split(150, seed=1)
    config = DatastoreConfig(context_length=32, stride=12, batch_size=3, key_layer=0)
    ds = build_datastore(model, tokenizer, split, tmp_path / "ds", config, show_progress=False)
    assert ds.key_layer == 0
    # Each position's key is its hidden state inside the (unique) window that scores it.
    windows = sliding_windows(len(split) - 1, 32, 12)
    covered = np.zeros(len(ds), dtype=int)
    with torch.no_grad():
        for w in windows:
            ids = torch.from_numpy(split.tokens[None, w.start : w.end].astype(np.int64))
            h = model(ids, output_hidden_states=True).hidden_states[1][0]
            expected = h[w.score_start - w.start :].to(torch.float16).float().numpy()
            np.testing.assert_allclose(
                ds.keys[w.score_start : w.end].astype(np.float32), expected, atol=2e-3, rtol=2e-3
            )
            covered[w.score_start : w.end] += 1
            assert w.score_start - w.start >= min(w.score_start, 32 - 12)
    assert (covered == 1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_interrupted_then_resumed_build_is_byte_identical(family, tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    split = make_split(400, seed=2)
    config = DatastoreConfig(context_length=48, stride=16, batch_size=2, feature_layers=(1,))
    full = build_datastore(model, tokenizer, split, tmp_path / "full", config, show_progress=False)
    part = build_datastore(
        model, tokenizer, split, tmp_path / "part", config, show_progress=False, max_batches=3
    )
    assert not part.complete
    progress = json.loads((tmp_path / "part" / DATASTORE_PROGRESS).read_text())
    assert progress["batches_done"] == 3 < progress["num_batches"]
    with pytest.raises(DatastoreError, match=r"incomplete.*same build command"):
        Datastore.open(tmp_path / "part")
    # Resume in two more steps, then compare every file byte for byte.
    build_datastore(
        model, tokenizer, split, tmp_path / "part", config, show_progress=False, max_batches=2
    )
    resumed = build_datastore(
        model, tokenizer, split, tmp_path / "part", config, show_progress=False
    )
    assert resumed.complete and full.complete
    for name in (
        "keys.npy",
        "features_1.npy",
        "next_tokens.npy",
        "tokens.npy",
        "doc_ids.npy",
        "positions.npy",
        DATASTORE_METADATA,
    ):
        assert filecmp.cmp(tmp_path / "full" / name, tmp_path / "part" / name, shallow=False), name
    # Building again is a no-op that returns the finished datastore.
    again = build_datastore(model, tokenizer, split, tmp_path / "full", config, show_progress=False)
    assert again.fingerprint == full.fingerprint


def test_resume_with_other_config_or_model_is_refused(tokenizer, tmp_path):
    model = tiny_causal_lm("qwen2")
    split = make_split(200, seed=3)
    config = DatastoreConfig(context_length=32, stride=16, batch_size=2)
    build_datastore(
        model, tokenizer, split, tmp_path / "ds", config, show_progress=False, max_batches=1
    )
    with pytest.raises(DatastoreError, match=r"different model, corpus or config.*overwrite=True"):
        build_datastore(
            model,
            tokenizer,
            split,
            tmp_path / "ds",
            DatastoreConfig(context_length=32, stride=8, batch_size=2),
            show_progress=False,
        )
    with pytest.raises(DatastoreError, match="different"):
        build_datastore(
            tiny_causal_lm("llama"), tokenizer, split, tmp_path / "ds", config, show_progress=False
        )
    with pytest.raises(DatastoreError, match="different"):
        build_datastore(
            model, tokenizer, make_split(200, seed=4), tmp_path / "ds", config, show_progress=False
        )
    ds = build_datastore(
        model,
        tokenizer,
        split,
        tmp_path / "ds",
        DatastoreConfig(context_length=32, stride=8, batch_size=2),
        overwrite=True,
        show_progress=False,
    )
    assert ds.complete and ds.metadata.stride == 8


def test_open_checks_model_tokenizer_and_layer(tokenizer, tmp_path):
    model = tiny_causal_lm("qwen2")
    build_datastore(
        model,
        tokenizer,
        make_split(100),
        tmp_path / "ds",
        DatastoreConfig(context_length=64, stride=32),
        show_progress=False,
    )
    ds = Datastore.open(tmp_path / "ds", model=model, tokenizer=tokenizer, key_layer=None)
    assert ds.dim == 32
    with pytest.raises(DatastoreError, match="hidden size is 64"):
        Datastore.open(tmp_path / "ds", model=tiny_causal_lm("qwen2", hidden_size=64))
    with pytest.raises(DatastoreError, match="different model configuration"):
        Datastore.open(tmp_path / "ds", model=tiny_causal_lm("qwen2", num_layers=3))
    other_tok = byte_tokenizer()
    other_tok.add_tokens(["<extra>"])
    with pytest.raises(DatastoreError, match="different tokenizer"):
        Datastore.open(tmp_path / "ds", tokenizer=other_tok)
    with pytest.raises(DatastoreError, match="layer"):
        Datastore.open(tmp_path / "ds", model=model, key_layer=1)
    with pytest.raises(DatastoreError, match="no datastore"):
        Datastore.open(tmp_path / "missing")
    assert isinstance(DatastoreError("x"), ValueError)


def test_capture_stops_before_the_lm_head(tokenizer):
    """The build's capture never computes logits: the forward ends at the LM head's input."""
    model = tiny_causal_lm("llama")
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        with HiddenStateCapture(model, [None], stop_forward=True) as cap:
            states = cap.run(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert states[None].shape == (1, 3, 32) and not calls


def test_config_json_roundtrip(tmp_path):
    config = DatastoreConfig(context_length=128, stride=64, key_layer=-1, feature_layers=(0, 1))
    config.to_json_file(tmp_path / "c.json")
    assert DatastoreConfig.from_json_file(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="stride"):
        DatastoreConfig(context_length=8, stride=16)
