r"""GNN-LM + kNN over a re-keyed store: the paper's GNN-LM + kNN.

hetgraph's ``gnn_knn`` mixes GNN-LM with a kNN-LM over the base model's keys, searched with
the base model's query states. The paper's searches a datastore keyed by GNN-LM's own
features (:func:`~hetgraph.fusion.rekey.rekey_datastore`) with GNN-LM's own query: the
fused LM-head state. :func:`rekeyed_knn_row` runs GNN-LM over the valid and test tokens
again with its hooks attached *before* the evaluation's capture, so the capture (a later
pre-hook on the LM head) records the fused head input, searches the re-keyed index with
it, and tunes λ and T on valid like every other kNN mixture
(:func:`~hetgraph.evaluation.tuned_knn`). GNN-LM's own graph still retrieves through the
datastore's index with the base model's states, as it was trained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hetgraph.configuration import ConfigError
from hetgraph.evaluation.knn import tuned_knn
from hetgraph.evaluation.lm import EvalConfig, collect_lm_outputs
from hetgraph.fusion.rekey import RekeyedIndex

#: The method's name in :class:`~hetgraph.evaluation.EvaluationResults` and per-token files.
REKEYED_METHOD = "gnn_knn_rekeyed"


def open_rekeyed(lm: Any, directory: str | Path | None, include_gnn: bool) -> RekeyedIndex | None:
    """The re-keyed store at ``directory`` checked against ``lm``'s datastore and adapter
    (``None`` when no directory is given), before any evaluation work.

    Raises:
        ConfigError: a re-keyed store without an adapter to evaluate.
        RekeyError: the store is incomplete or was built from another datastore or adapter.
    """
    if directory is None:
        return None
    if not include_gnn:
        raise ConfigError(
            f"a re-keyed store ({directory}) is searched with the adapter's fused states: "
            "evaluate it with the adapter it was re-keyed with (--adapter)"
        )
    return RekeyedIndex.load(directory, lm.engine.datastore, engine=lm.engine)


def rekeyed_knn_row(
    lm: Any,
    rekeyed: RekeyedIndex,
    forward: Any,
    splits: tuple[Any, Any],
    configs: tuple[EvalConfig, EvalConfig],
    k: int,
    lambdas: Any,
    show_progress: bool = True,
) -> tuple[dict[str, Any], torch.Tensor, float]:
    """GNN-LM + kNN over the re-keyed store: the method's row (λ and T tuned on the valid
    split, with the store's directory), its ``[M]`` test log-probabilities and its test
    tokens/s.

    Args:
        lm: the :class:`~hetgraph.HetGraphLM` whose adapter re-keyed the store.
        rekeyed: the opened store (:func:`open_rekeyed`).
        forward: GNN-LM's forward (:func:`~hetgraph.evaluation.gnn_forward`).
        splits, configs: (valid, test) splits and their sampled configs.
        k: neighbours per position of the kNN-LM.
        lambdas: λ grid.
    """
    search = rekeyed.retriever(lm.engine.datastore)
    outputs, seconds = [], 0.0
    # Attached first, the fusion hooks precede collect_lm_outputs' capture on the LM head, so
    # the captured query is the fused head input (gnn_forward's calls keep them attached).
    attached_here = not lm.is_attached
    lm.attach()
    try:
        for split, config in zip(splits, configs, strict=True):
            started = time.perf_counter()
            outputs.append(
                collect_lm_outputs(
                    lm.model,
                    split,
                    config,
                    forward=forward,
                    search=search,
                    show_progress=show_progress,
                )
            )
            seconds = time.perf_counter() - started
    finally:
        if attached_here:
            lm.detach()
    valid, test = outputs
    row, log_probs = tuned_knn(valid, test, k, lambdas, "GNN+kNN (re-keyed)")
    row["rekeyed"] = str(rekeyed.directory)
    return row, log_probs, len(test) / seconds
