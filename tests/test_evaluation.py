"""Base-LM and kNN-LM evaluation through strided windows on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.evaluation import (
    EvalConfig,
    NeighbourSearch,
    collect_lm_outputs,
    evaluate_base_knn,
    results_table,
    score_knn,
    score_lm,
)
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.knnlm import interpolate_log_probs, knn_log_probs
from hetgraph.testing import FAMILIES, byte_tokenizer, tiny_causal_lm


def make_split(num_tokens: int, seed: int, name: str) -> TokenizedSplit:
    tokens = np.random.default_rng(seed).integers(0, 256, num_tokens).astype(np.int32)
    doc_ids = (np.arange(num_tokens) * 2 // num_tokens).astype(np.int32)
    return TokenizedSplit(name, tokens, doc_ids, ["a", "b"])


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_base_ppl_equals_direct_full_context(family):
    model = tiny_causal_lm(family)
    split = make_split(90, 0, "test")
    out = collect_lm_outputs(
        model, split, EvalConfig(context_length=128, stride=64, batch_size=2), show_progress=False
    )
    ids = torch.from_numpy(split.tokens[None].astype(np.int64))
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    direct = lp.gather(1, ids[0, 1:, None]).squeeze(1)
    np.testing.assert_array_equal(out.positions.numpy(), np.arange(89))
    np.testing.assert_allclose(out.lm_log_probs.numpy(), direct.numpy(), atol=1e-5)
    scores = score_lm(out)
    assert scores["ppl"] == pytest.approx(math.exp(-direct.double().mean().item()), rel=1e-5)
    assert scores["acc"] == pytest.approx((lp.argmax(-1) == ids[0, 1:]).float().mean().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_strided_positions_scored_once(family):
    model = tiny_causal_lm(family)
    out = collect_lm_outputs(
        model,
        make_split(200, 1, "test"),
        EvalConfig(context_length=40, stride=16, batch_size=3),
        show_progress=False,
    )
    np.testing.assert_array_equal(out.positions.numpy(), np.arange(199))
    assert len(out) == 199 and out.lm_log_probs.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_layer", [None, 0])
def test_queries_equal_datastore_keys(family, key_layer, tokenizer, tmp_path):
    """Queries and keys come from the same capture code: same windows give identical bytes."""
    model = tiny_causal_lm(family)
    split = make_split(150, 2, "train")
    ds = build_datastore(
        model,
        tokenizer,
        split,
        tmp_path / "ds",
        DatastoreConfig(context_length=48, stride=16, batch_size=2, key_layer=key_layer),
        show_progress=False,
    )
    out = collect_lm_outputs(
        model,
        split,
        EvalConfig(48, 16, 2),
        key_layer=key_layer,
        keep_queries=True,
        show_progress=False,
    )
    np.testing.assert_array_equal(out.queries.numpy(), np.asarray(ds.keys))


@pytest.mark.parametrize("family", FAMILIES)
def test_knn_scores_equal_full_distribution(family, tokenizer, tmp_path):
    model = tiny_causal_lm(family)
    train = make_split(600, 3, "train")
    ds = build_datastore(
        model,
        tokenizer,
        train,
        tmp_path / "ds",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(ds, IndexConfig(factory="Flat"), show_progress=False)
    # Test text overlapping the datastore text, so neighbours are informative.
    test = TokenizedSplit("test", train.tokens[100:180], np.zeros(80, np.int32), ["t"])
    out = collect_lm_outputs(
        model,
        test,
        EvalConfig(context_length=128, stride=64, k=8),
        search=NeighbourSearch(index, ds),
        show_progress=False,
    )
    assert out.knn_distances.shape == out.knn_ids.shape == (79, 8)
    np.testing.assert_array_equal(
        out.knn_tokens.numpy(), np.asarray(ds.next_tokens)[out.knn_ids.numpy()]
    )
    ids = torch.from_numpy(test.tokens[None].astype(np.int64))
    with torch.no_grad():
        lm = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    lam, temp = 0.4, float(out.knn_distances.median())
    mix = interpolate_log_probs(
        lm, knn_log_probs(out.knn_distances, out.knn_tokens, lm.shape[1], temp), lam
    )
    targets = ids[0, 1:]
    scores = score_knn(out, lam, temp)
    direct_ppl = math.exp(-mix.gather(1, targets[:, None]).double().mean().item())
    assert scores["ppl"] == pytest.approx(direct_ppl, rel=1e-5)
    assert scores["acc"] == pytest.approx((mix.argmax(-1) == targets).float().mean().item())


def test_evaluate_base_knn_end_to_end(tokenizer, tmp_path):
    model = tiny_causal_lm("qwen2")
    train = make_split(800, 4, "train")
    ds = build_datastore(
        model,
        tokenizer,
        train,
        tmp_path / "ds",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(ds, IndexConfig(), show_progress=False)
    # Valid/test repeat datastore text: the kNN-LM must beat the random base LM there.
    valid = TokenizedSplit("valid", train.tokens[:200], np.zeros(200, np.int32), ["v"])
    test = TokenizedSplit("test", train.tokens[300:500], np.zeros(200, np.int32), ["t"])
    results = evaluate_base_knn(
        model,
        tokenizer,
        ds,
        index,
        valid,
        test,
        config=EvalConfig(context_length=64, stride=32, k=8),
        show_progress=False,
    )
    assert results["tokens"] == 199
    assert set(results["base"]) == {"ppl", "acc"}
    assert {"ppl", "acc", "lambda", "temperature", "k"} <= set(results["knn"])
    assert results["knn"]["lambda"] > 0 and results["knn"]["ppl"] < results["base"]["ppl"] / 2
    assert results["knn"]["acc"] > results["base"]["acc"]
    assert results["knn"]["valid_ppl"] <= results["valid_base"]["ppl"] + 1e-9
    table = results_table(results, title="tiny")
    assert "| base LM |" in table and "| kNN-LM |" in table and "199" in table
    with pytest.raises(ValueError, match="k must be"):
        collect_lm_outputs(
            model,
            test,
            EvalConfig(k=len(ds) + 1),
            search=NeighbourSearch(index, ds),
            show_progress=False,
        )
