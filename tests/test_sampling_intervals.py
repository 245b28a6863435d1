"""The document-stratified evaluation sample and the document bootstrap, against naive
references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hetgraph.evaluation.intervals import (
    BootstrapSpec,
    RatioInterval,
    bootstrap_perplexities,
    perplexity_intervals,
)
from hetgraph.evaluation.sampling import (
    document_bounds,
    scored_positions,
    segment_windows,
    stratified_segments,
)


def _doc_ids(lengths):
    return np.repeat(np.arange(len(lengths)), lengths)


@pytest.mark.parametrize(
    "lengths, budget",
    [
        ([50, 3, 200, 17, 1, 90], 60),
        ([50, 3, 200, 17, 1, 90], 361),  # everything
        ([10] * 40, 25),  # fewer positions than documents
        ([1000], 100),
        ([5, 500, 5, 500], 400),
    ],
)
def test_stratified_sample_spreads_budget_over_every_document(lengths, budget):
    doc_ids = _doc_ids(lengths)
    segments = stratified_segments(doc_ids, budget, seed=3)
    positions = scored_positions(segments)
    assert len(positions) == min(budget, len(doc_ids))
    assert np.all(np.diff(positions) > 0)  # sorted, no position twice
    # One contiguous segment per covered document, inside it.
    assert np.array_equal(np.unique(doc_ids[positions]), np.unique(doc_ids[segments[:, 0]]))
    for start, end in segments:
        assert doc_ids[start] == doc_ids[end - 1]
    taken = np.bincount(doc_ids[positions], minlength=len(lengths))
    if budget >= len(lengths):
        # Every document is represented; shares are equal up to one, capped by length.
        assert np.all(taken >= 1)
        share = taken[taken < np.asarray(lengths)]
        assert share.size == 0 or share.max() - share.min() <= 1
        # Documents taken whole are those no longer than the share.
        whole = taken == np.asarray(lengths)
        assert share.size == 0 or np.all(np.asarray(lengths)[whole] <= share.max())
    else:
        assert np.count_nonzero(taken) == budget and taken.max() == 1


def test_stratified_sample_is_deterministic_and_seeded():
    doc_ids = _doc_ids([300, 120, 800, 45, 600])
    a = stratified_segments(doc_ids, 500, seed=1)
    assert np.array_equal(a, stratified_segments(doc_ids, 500, seed=1))
    assert not np.array_equal(a, stratified_segments(doc_ids, 500, seed=2))
    assert np.array_equal(stratified_segments(doc_ids, None), document_bounds(doc_ids))


@pytest.mark.parametrize("context_length, stride", [(16, 8), (16, 16), (16, 1), (5, 3)])
def test_segment_windows_score_each_sampled_position_once_with_context(context_length, stride):
    doc_ids = _doc_ids([40, 7, 100, 3, 60])
    segments = stratified_segments(doc_ids, 90, seed=0)
    windows = segment_windows(segments, context_length, stride)
    scored = np.concatenate([np.arange(w.score_start, w.end) for w in windows])
    assert np.array_equal(scored, scored_positions(segments))
    for w in windows:
        assert 0 <= w.start <= w.score_start < w.end
        assert w.end - w.start <= context_length
        # Left context: at least context_length - stride tokens where the text allows it.
        assert w.score_start - w.start >= min(context_length - stride, w.score_start)


def _naive_bootstrap(log_probs, doc_ids, resamples, seed):
    # The textbook cluster bootstrap: draw D documents with replacement, concatenate them.
    rng = np.random.default_rng(seed)
    docs = list(dict.fromkeys(doc_ids.tolist()))
    by_doc = {d: np.flatnonzero(doc_ids == d) for d in docs}
    out = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(docs), size=len(docs))
        rows = np.concatenate([by_doc[docs[i]] for i in drawn])
        out.append(np.exp(-log_probs[:, rows].mean(axis=1)))
    return np.stack(out, axis=1)


def test_document_bootstrap_matches_naive_reference():
    rng = np.random.default_rng(5)
    doc_ids = _doc_ids([13, 40, 7, 22, 1, 30, 9])
    lp = -rng.gamma(2.0, 1.0, size=(3, len(doc_ids)))
    got = bootstrap_perplexities(lp, doc_ids, BootstrapSpec(resamples=300, seed=11))
    want = _naive_bootstrap(lp, doc_ids, 300, 11)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_intervals_cover_the_estimate_and_pairing_narrows_ratios():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 200, size=30)
    doc_ids = _doc_ids(lengths)
    # Documents differ a lot in difficulty; "better" is uniformly 5 % better in log-prob.
    difficulty = np.repeat(rng.uniform(0.5, 4.0, size=len(lengths)), lengths)
    base = -(difficulty + rng.normal(0, 0.3, size=len(doc_ids)))
    better = base * 0.95
    methods, ratios = perplexity_intervals(
        {"base": base, "better": better}, doc_ids, BootstrapSpec(resamples=500)
    )
    for stat in methods.values():
        assert stat.ci95[0] < stat.ppl < stat.ci95[1]
        assert stat.documents == 30 and stat.tokens == len(doc_ids)
    ratio = ratios["better/base"]
    assert ratio.detectable and ratio.ci95[1] < 1.0
    # Paired: the ratio's interval is far narrower than either perplexity's relative width.
    rel = (methods["base"].ci95[1] - methods["base"].ci95[0]) / methods["base"].ppl
    assert (ratio.ci95[1] - ratio.ci95[0]) < rel / 5
    assert ratio.ratio == pytest.approx(math.exp(base.mean() - better.mean()))


def test_ratio_with_one_inside_is_no_detectable_difference():
    assert "no detectable difference" in RatioInterval(0.99, (0.97, 1.01)).describe("a", "b")
    assert "no detectable" not in RatioInterval(0.9, (0.85, 0.95)).describe("a", "b")
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSpec(resamples=0)
