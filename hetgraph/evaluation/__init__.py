"""Evaluation of the base LM and the kNN-LM over strided windows."""
from hetgraph.evaluation.gnn import (
    METHOD_NAMES,
    evaluate_four_way,
    gnn_forward,
    model_perplexity,
    plot_results,
    results_table,
)
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
    "METHOD_NAMES", "evaluate_four_way", "gnn_forward", "model_perplexity", "plot_results",
    "results_table",
    "EvalConfig", "ForwardFn", "LMOutputs", "collect_lm_outputs", "default_forward",
    "default_temperatures", "evaluate_base_knn", "results_markdown_table", "score_knn", "score_lm",
]
