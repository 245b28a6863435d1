"""Four-way evaluation: base LM, kNN-LM, GNN-LM and GNN-LM + kNN over the same tokens."""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from hetgraph.allocator import available_memory_bytes
from hetgraph.configuration import ConfigError
from hetgraph.distributed import processes_on_this_node
from hetgraph.evaluation.knn import default_temperatures, score_knn, score_lm
from hetgraph.evaluation.lm import (
    EvalConfig,
    ForwardFn,
    LMOutputs,
    NeighbourSearch,
    TrimmedForward,
    accepts_logits_to_keep,
    collect_lm_outputs,
)
from hetgraph.fusion.neighbour_states import NeighbourStates
from hetgraph.knnlm import DEFAULT_LAMBDAS, perplexity, tune_knn
from hetgraph.limits import check_memory

#: Bytes an evaluation holds per (scored position, neighbour): distances and log-probs
#: (float32), ids and tokens (int64), GNN-LM's own log-probs, and the λ / T tuning's
#: float32 working copies.
NEIGHBOUR_BYTES = 4 + 8 + 8 + 4 + 4 + 16


def check_neighbour_memory(positions: int, k: int) -> None:
    r"""Refuse an evaluation whose ``positions × k`` neighbour table would not fit the memory
    budget (:func:`hetgraph.limits.check_memory`), before any forward pass.

    Raises:
        ResourceLimitError: naming k, the positions and the options that lower them.
    """
    check_memory(f"the kNN-LM neighbours of {positions:,} evaluated positions × k {k}",
                 positions * k * NEIGHBOUR_BYTES,
                 "lower --k (evaluation.k) or evaluate fewer tokens (--max-tokens, "
                 "--tune-tokens)")


def _limit(split: Any, max_tokens: int | None) -> Any:
    # As everywhere in hetgraph, ``max_tokens`` counts tokens used (max_tokens - 1 are scored).
    if max_tokens is None or len(split) <= max_tokens:
        return split
    return split.truncate(max_tokens)


def gnn_forward(lm: Any, k: int | None = None,
                neighbour_states: NeighbourStates | None = None) -> ForwardFn | TrimmedForward:
    """``input_ids -> logits`` of a :class:`~hetgraph.HetGraphLM` retrieving ``k`` neighbours
    per position (default: its config's ``k``), reading its adapters' window side from
    ``neighbour_states`` if given; hooks are attached per call. A
    :class:`~hetgraph.TrimmedForward` when the base model takes ``logits_to_keep``
    and the positions are fused independently
    (:attr:`~hetgraph.HetGraphLM.fuses_positions_independently`): then the positions whose
    logits are not kept are not retrieved for, nor put in the head's graph."""
    def forward(input_ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        return lm(input_ids, use_cache=False, k=k, neighbour_states=neighbour_states,
                  **kwargs).logits
    if lm.fuses_positions_independently and accepts_logits_to_keep(lm.model):
        return TrimmedForward(forward)
    return forward


def evaluation_neighbour_states(lm: Any, config: EvalConfig, tokens: int,
                                k: int) -> NeighbourStates | None:
    """The :class:`~hetgraph.NeighbourStates` an evaluation of ``tokens`` positions by ``lm``
    with ``k`` neighbours each uses, as ``config.neighbour_states`` says, or ``None``.
    ``"auto"``: the graphs have windows (not ``deduplicate``), the table fits a quarter of
    the available memory shared by this node's processes (``LOCAL_WORLD_SIZE`` under
    ``torchrun``: each builds its own) and ``tokens × k ≥ 2 × rows``.

    Raises:
        ConfigError: ``"on"`` with ``graph.deduplicate`` (no windows to tabulate).
    """
    if config.neighbour_states == "off":
        return None
    if lm.graph_config.deduplicate:
        if config.neighbour_states == "on":
            raise ConfigError("evaluation.neighbour_states is 'on' but fusion.graph.deduplicate "
                              "is true: its graphs have no windows to tabulate; set "
                              "neighbour_states to 'auto' or 'off' (--neighbour-states off)")
        return None
    if config.neighbour_states == "auto":
        budget = available_memory_bytes() // (4 * processes_on_this_node())
        if NeighbourStates.estimate_nbytes(lm) > budget or tokens * k < 2 * len(lm.datastore):
            return None
    return NeighbourStates.build(lm, show_progress=False)


def model_perplexity(lm: Any, split: Any, config: EvalConfig | None = None,
                     max_tokens: int | None = None) -> float:
    """Perplexity of a :class:`~hetgraph.HetGraphLM` on a split, through ``config``'s
    windows, over its first ``max_tokens`` tokens (default ``config.max_tokens``, else all).
    The model retrieves its own ``FusionConfig.k`` neighbours (as in training). Under
    ``torchrun`` the windows are shared across ranks and the result is the one-process
    perplexity on every rank (:func:`~hetgraph.evaluation.collect_lm_outputs`)."""
    config = config or EvalConfig()
    if max_tokens is not None:
        config = dataclasses.replace(config, max_tokens=max_tokens)
    tokens = min(len(split), config.max_tokens or len(split))
    states = evaluation_neighbour_states(lm, config, tokens, lm.config.k)
    outputs = collect_lm_outputs(lm.model, split, config, forward=gnn_forward(lm, None, states),
                                 show_progress=False)
    return perplexity(outputs.lm_log_probs)


def _tuned_knn(valid: LMOutputs, test: LMOutputs, k: int, lambdas: Any,
               stage: str) -> dict[str, Any]:
    temperatures = default_temperatures(valid.knn_distances)
    lam, temperature, grid = tune_knn(valid.lm_log_probs, valid.knn_distances, valid.knn_tokens,
                                      valid.targets, lambdas, temperatures)
    return {**score_knn(test, lam, temperature, stage), "lambda": float(lam),
            "temperature": float(temperature), "k": int(k), "valid_ppl": float(np.nanmin(grid))}


def evaluate_four_way(
    lm: Any,
    valid_split: Any,
    test_split: Any,
    config: EvalConfig | None = None,
    *,
    include_gnn: bool = True,
    lambdas: Any = DEFAULT_LAMBDAS,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate base, kNN-LM, GNN-LM and GNN-LM + kNN on exactly the same test tokens.

    The kNN-LM λ and temperature are tuned on the valid split, separately for the base LM
    and for GNN-LM. GNN-LM retrieves with the base model's query states, so its
    neighbours are the base run's, and they are reused rather than searched again.
    Under ``torchrun`` every rank calls this with the same arguments; each scores a share of
    the windows, and every rank returns the one-process results.

    Args:
        lm: a :class:`~hetgraph.HetGraphLM` (its model, datastore and index are used).
        valid_split: split for tuning λ and T (first ``config.valid_tokens`` tokens).
        test_split: split reported (first ``config.max_tokens`` tokens).
        config: windows, ``k`` and token limits.
        include_gnn: also evaluate ``gnn`` and ``gnn_knn`` (needs a trained adapter).
        lambdas: λ grid.
        show_progress: tqdm bars.

    Raises:
        NonFiniteError: a method's perplexity or accuracy is not finite (its ``stage`` names
            the method); nothing is returned, so no table with ``nan`` is ever written.

    Returns:
        ``{"base", "knn", "gnn", "gnn_knn"}`` rows with ``ppl`` and ``acc`` (kNN rows also
        ``lambda``, ``temperature``, ``k``), ``tokens``, ``valid_tokens`` and ``speed``
        (tokens/s of base and GNN-LM evaluation, and their ratio). JSON-serialisable.
    """
    config = config or EvalConfig()
    model = lm.model
    k = int(config.k)
    windows = dataclasses.replace(config, max_tokens=None)
    valid_split = _limit(valid_split, config.valid_tokens)
    test_split = _limit(test_split, config.max_tokens)
    check_neighbour_memory(max(len(valid_split) - 1, 0) + max(len(test_split) - 1, 0), k)
    states, states_seconds = None, 0.0
    if include_gnn:  # first: a setting that cannot hold fails before any work
        started = time.perf_counter()
        states = evaluation_neighbour_states(lm, config, len(valid_split) + len(test_split), k)
        states_seconds = time.perf_counter() - started
    search = NeighbourSearch(lm.index, lm.datastore)
    base_valid = collect_lm_outputs(model, valid_split, windows, search=search,
                                    show_progress=show_progress)
    started = time.perf_counter()
    base_test = collect_lm_outputs(model, test_split, windows, search=search,
                                   show_progress=show_progress)
    base_seconds = time.perf_counter() - started
    results: dict[str, Any] = {
        "base": score_lm(base_test, "base"),
        "knn": _tuned_knn(base_valid, base_test, k, lambdas, "kNN"),
    }
    speed: dict[str, float] = {"base_with_search_tokens_per_s": len(base_test) / base_seconds}
    if include_gnn:
        if states is not None:
            speed["neighbour_states_seconds"] = states_seconds
        forward = gnn_forward(lm, k, states)
        gnn_valid = collect_lm_outputs(model, valid_split, windows, forward=forward,
                                       neighbours_from=base_valid, show_progress=show_progress)
        started = time.perf_counter()
        gnn_test = collect_lm_outputs(model, test_split, windows, forward=forward,
                                      neighbours_from=base_test, show_progress=show_progress)
        gnn_seconds = time.perf_counter() - started
        results["gnn"] = score_lm(gnn_test, "GNN")
        results["gnn_knn"] = _tuned_knn(gnn_valid, gnn_test, k, lambdas, "GNN+kNN")
        speed["gnn_tokens_per_s"] = len(gnn_test) / gnn_seconds
        speed["gnn_over_base_with_search"] = (
            speed["gnn_tokens_per_s"] / speed["base_with_search_tokens_per_s"]
        )
    results["tokens"] = len(base_test)
    results["valid_tokens"] = len(base_valid)
    results["speed"] = speed
    return results
