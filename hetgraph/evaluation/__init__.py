"""Evaluation of the base LM and the kNN-LM over strided windows."""
from hetgraph.evaluation.knn import (
    default_temperatures,
    evaluate_base_knn,
    results_markdown_table,
    score_knn,
    score_lm,
)
from hetgraph.evaluation.lm import (
    EvalConfig,
    ForwardFn,
    LMOutputs,
    collect_lm_outputs,
    default_forward,
)

__all__ = [
    "EvalConfig", "ForwardFn", "LMOutputs", "collect_lm_outputs", "default_forward",
    "default_temperatures", "evaluate_base_knn", "results_markdown_table", "score_knn", "score_lm",
]
