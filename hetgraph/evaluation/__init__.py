"""Evaluation over strided windows: base LM, kNN-LM, GNN-LM and GNN-LM + kNN on the same tokens."""

from hetgraph.evaluation.gnn import (
    add_intervals,
    evaluate_four_way,
    gnn_forward,
    model_perplexity,
)
from hetgraph.evaluation.intervals import (
    BootstrapSpec,
    PerplexityInterval,
    RatioInterval,
    bootstrap_perplexities,
    perplexity_intervals,
)
from hetgraph.evaluation.knn import (
    default_temperatures,
    evaluate_base_knn,
    knn_mixture_log_probs,
    score_knn,
    score_lm,
    tuned_knn,
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
from hetgraph.evaluation.per_token import (
    PerTokenError,
    PerTokenResults,
    paired_ratio,
    read_per_token,
)
from hetgraph.evaluation.rekeyed import REKEYED_METHOD, rekeyed_knn_row
from hetgraph.evaluation.report import (
    METHOD_NAMES,
    plot_results,
    ratio_sentences,
    results_table,
    write_per_token,
)
from hetgraph.evaluation.results import EvaluationResults, MethodScore
from hetgraph.evaluation.sampling import (
    segment_windows,
    stratified_segments,
)

__all__ = [
    "METHOD_NAMES",
    "REKEYED_METHOD",
    "BootstrapSpec",
    "EvalConfig",
    "EvaluationResults",
    "ForwardFn",
    "LMOutputs",
    "MethodScore",
    "NeighbourSearch",
    "NonFiniteError",
    "PerTokenError",
    "PerTokenResults",
    "PerplexityInterval",
    "RatioInterval",
    "TrimmedForward",
    "add_intervals",
    "bootstrap_perplexities",
    "collect_lm_outputs",
    "default_forward",
    "default_temperatures",
    "evaluate_base_knn",
    "evaluate_four_way",
    "gnn_forward",
    "knn_mixture_log_probs",
    "model_perplexity",
    "paired_ratio",
    "perplexity_intervals",
    "plot_results",
    "ratio_sentences",
    "read_per_token",
    "rekeyed_knn_row",
    "results_table",
    "score_knn",
    "score_lm",
    "segment_windows",
    "stratified_segments",
    "tuned_knn",
    "write_per_token",
]
