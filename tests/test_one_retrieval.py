"""One FAISS search per evaluated position: the base run's neighbours feed GNN-LM's hooks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.datastore.build import window_batches
from hetgraph.evaluation import EvalConfig, collect_lm_outputs, evaluate_four_way
from hetgraph.evaluation.sampling import evaluation_windows
from hetgraph.fusion import FusionConfig, HetGraphLM, Retrieval
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.testing import byte_tokenizer, tiny_causal_lm

ADAPTER = dict(hidden_channels=32, num_layers=2, heads=4, dropout=0.0, attn_dropout=0.0)


def _split(name: str, docs: int, seed: int) -> TokenizedSplit:
    # Documents that repeat a random pattern, so retrieval finds informative neighbours.
    rng = np.random.default_rng(seed)
    tokens = [np.tile(rng.integers(0, 256, 16), 5) for _ in range(docs)]
    doc_ids = [np.full(len(t), d) for d, t in enumerate(tokens)]
    return TokenizedSplit(
        name,
        np.concatenate(tokens).astype(np.int32),
        np.concatenate(doc_ids).astype(np.int32),
        [f"d{i}" for i in range(docs)],
    )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    model = tiny_causal_lm("qwen2")
    store = build_datastore(
        model,
        byte_tokenizer(),
        _split("train", 5, 0),
        tmp_path_factory.mktemp("ds") / "ds",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    return model, store, index


def _lm(parts, sites) -> HetGraphLM:
    model, store, index = parts
    lm = HetGraphLM(model, store, index, FusionConfig(fusion_layers=sites, k=4, adapter=ADAPTER))
    with torch.no_grad():
        for number, gate in enumerate(lm.engine.gates.values()):
            gate.copy_(torch.rand(gate.shape, generator=torch.Generator().manual_seed(number)))
    return lm.eval()


def _count_searched_rows(monkeypatch, index) -> list[int]:
    rows, search = [0], index.search

    def counted(queries, k, *args, **kwargs):
        rows[0] += len(queries)
        return search(queries, k, *args, **kwargs)

    monkeypatch.setattr(index, "search", counted)
    return rows


def _unscored_columns(split: TokenizedSplit, config: EvalConfig, trimmed: bool) -> int:
    # Columns a GNN-LM forward retrieves for that its batch does not score: every column,
    # or with a trimmed forward (HF's logits_to_keep) the batch's widest scored span.
    batches = window_batches(evaluation_windows(split.doc_ids, config), config.batch_size)
    return sum(
        len(b) * (max(w.end - w.score_start for w in b) if trimmed else b[0].end - b[0].start)
        - sum(w.end - w.score_start for w in b)
        for b in batches
    )


@pytest.mark.parametrize("sites, stride", [(("head",), 32), ((0,), 32), (("head",), 16)])
def test_four_way_searches_each_scored_position_once(parts, monkeypatch, sites, stride):
    valid, test = _split("valid", 2, 1), _split("test", 2, 2)
    config = EvalConfig(context_length=32, stride=stride, batch_size=2, k=4)
    lm = _lm(parts, sites)
    # The reference: GNN-LM's hooks search on their own (the behaviour before).
    plain = collect_lm_outputs(
        lm.model,
        test,
        config,
        forward=lambda ids: lm(ids, use_cache=False, k=4).logits,
        show_progress=False,
    )
    searched = _count_searched_rows(monkeypatch, parts[2])
    results = evaluate_four_way(lm, valid, test, config, show_progress=False)
    scored = results["tokens"] + results["valid_tokens"]
    assert scored == len(valid) - 1 + len(test) - 1
    # Every scored position is searched once, by the base run; GNN-LM's hooks search only
    # the context columns its forward computes that no window scores (a fused head:
    # trimmed to the scored span; a fused layer: every column of the window).
    trimmed = sites == ("head",)
    extra = sum(_unscored_columns(split, config, trimmed) for split in (valid, test))
    assert searched[0] == scored + extra
    assert extra <= (2 if stride == 32 else scored // 2)
    reference = math.exp(-float(plain.lm_log_probs.double().mean()))
    assert results["gnn"]["ppl"] == pytest.approx(reference, rel=1e-5)


def _input_ids(length: int = 24) -> torch.Tensor:
    tokens = _split("x", 2, 3).tokens
    return torch.from_numpy(tokens[: 2 * length].astype(np.int64)).view(2, length)


@pytest.mark.parametrize("sites", [("head",), (0,)])
def test_a_retrieval_handed_in_is_not_searched_again(parts, monkeypatch, sites):
    lm, input_ids = _lm(parts, sites), _input_ids()
    with torch.no_grad():
        expected = lm(input_ids, output_retrieval=True, use_cache=False)
    given = expected.retrieval
    searched = _count_searched_rows(monkeypatch, parts[2])
    with torch.no_grad():
        reused = lm(input_ids, retrieval=given, use_cache=False).logits
    assert searched[0] == 0  # not even the prefetch pass runs
    torch.testing.assert_close(reused, expected.logits, rtol=0, atol=0)
    # Covering some positions: only the others are searched, with the same result.
    covered = torch.zeros(input_ids.shape, dtype=torch.bool)
    covered[:, 10:] = True
    partial = Retrieval(
        given.distances.masked_fill(~covered[..., None], 0.0),
        given.neighbour_ids.masked_fill(~covered[..., None], -1),
        covered,
    )
    with torch.no_grad():
        mixed = lm(input_ids, retrieval=partial, use_cache=False).logits
    assert searched[0] == int((~covered).sum())
    torch.testing.assert_close(mixed, expected.logits, rtol=1e-6, atol=1e-6)
    assert bool((partial.neighbour_ids[:, :10] == -1).all())  # the caller's is not written


def test_a_retrieval_of_the_wrong_shape_is_refused(parts):
    lm, input_ids = _lm(parts, ("head",)), _input_ids()
    wrong = Retrieval(torch.zeros(2, 24, 3), torch.zeros(2, 24, 3, dtype=torch.long))
    with torch.no_grad(), pytest.raises(ValueError, match=r"retrieval .*k=4"):
        lm(input_ids, retrieval=wrong, use_cache=False)
