"""Evaluation over strided windows: base LM, kNN-LM, GNN-LM and GNN-LM + kNN on the same tokens."""
from hetgraph.evaluation.gnn import evaluate_four_way, gnn_forward, model_perplexity
from hetgraph.evaluation.knn import (
    default_temperatures,
    evaluate_base_knn,
    score_knn,
    score_lm,
)
from hetgraph.evaluation.lm import (
    EvalConfig,
    ForwardFn,
    LMOutputs,
    NeighbourSearch,
    NonFiniteError,
    TrimmedForward,
    collect_lm_outputs,
    default_forward,
)
from hetgraph.evaluation.report import METHOD_NAMES, plot_results, results_table

__all__ = [
    "METHOD_NAMES", "EvalConfig", "ForwardFn", "LMOutputs", "NeighbourSearch", "NonFiniteError",
    "TrimmedForward", "collect_lm_outputs", "default_forward",
    "default_temperatures", "evaluate_base_knn", "evaluate_four_way", "gnn_forward",
    "model_perplexity", "plot_results", "results_table", "score_knn",
    "score_lm",
]
