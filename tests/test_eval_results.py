"""Typed evaluation results: the JSON form round-trips, reads like the old dict, and marks
ratios whose interval contains 1."""

from __future__ import annotations

import json

import pytest

from hetgraph.evaluation.intervals import RatioInterval
from hetgraph.evaluation.results import EvaluationResults, MethodScore

JSON_FORM = {
    "base": {"ppl": 10.5, "acc": 0.4, "ppl_ci95": [9.0, 12.0], "documents": 36},
    "knn": {
        "ppl": 10.1,
        "acc": 0.41,
        "lambda": 0.25,
        "temperature": 3.0,
        "k": 32,
        "valid_ppl": 9.9,
        "ppl_ci95": [8.8, 11.7],
        "documents": 36,
    },
    "gnn": {"ppl": 9.9, "acc": 0.42, "ppl_ci95": [8.7, 11.5], "documents": 36},
    "ratios": {
        "gnn/base": {"ratio": 0.943, "ci95": [0.93, 0.957]},
        "knn/base": {"ratio": 0.962, "ci95": [0.94, 1.01]},
    },
    "bootstrap": {"resamples": 1000, "seed": 0, "level": 0.95, "over": "documents"},
    "sample": {"test": {"kind": "stratified", "tokens": 4096, "documents": 36}},
    "speed": {"base_with_search_tokens_per_s": 120.0},
    "tokens": 4096,
    "valid_tokens": 1024,
    "documents": 36,
    "neighbours": "retrieved",
    "grid": {"lambdas": [0.1, 0.25]},
}


def test_json_form_round_trips_and_survives_json():
    results = EvaluationResults.from_dict(JSON_FORM)
    assert results.to_dict() == JSON_FORM
    assert json.loads(json.dumps(results.to_dict())) == JSON_FORM
    assert EvaluationResults.from_dict(results.to_dict()) == results


def test_typed_fields_and_the_mapping_view_agree():
    results = EvaluationResults.from_dict(JSON_FORM)
    assert list(results.methods) == ["base", "knn", "gnn"]
    assert results.methods["knn"].lam == 0.25 and results.methods["knn"].k == 32
    assert results.methods["gnn"].ppl_ci95 == (8.7, 11.5)
    assert results["gnn"]["ppl"] == results.methods["gnn"].ppl == 9.9
    assert results["ratios"]["gnn/base"]["ci95"] == [0.93, 0.957]
    assert "gnn" in results and "lora" not in results and results.get("lora") is None
    assert results.extra == {"grid": {"lambdas": [0.1, 0.25]}}
    assert dict(results) == JSON_FORM


@pytest.mark.parametrize(
    "ci95, detectable", [((0.93, 0.957), True), ((0.94, 1.01), False), ((1.0, 1.2), False)]
)
def test_a_ratio_whose_interval_contains_one_is_not_detectable(ci95, detectable):
    assert RatioInterval(0.95, ci95).detectable is detectable


def test_a_method_row_without_intervals_writes_no_interval_keys():
    assert MethodScore(ppl=3.0, acc=0.5).to_dict() == {"ppl": 3.0, "acc": 0.5}
