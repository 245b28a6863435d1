"""Four-way evaluation: base LM, kNN-LM, GNN-LM and GNN-LM + kNN over the same tokens."""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from hetgraph.allocator import available_memory_bytes
from hetgraph.configuration import ConfigError
from hetgraph.distributed import current_context, processes_on_this_node
from hetgraph.evaluation.intervals import perplexity_intervals
from hetgraph.evaluation.knn import score_lm, tuned_knn
from hetgraph.evaluation.lm import (
    EvalConfig,
    ForwardFn,
    LMOutputs,
    TrimmedForward,
    accepts_logits_to_keep,
    collect_lm_outputs,
    default_forward,
)
from hetgraph.evaluation.rekeyed import REKEYED_METHOD, open_rekeyed, rekeyed_knn_row
from hetgraph.evaluation.report import write_per_token
from hetgraph.evaluation.results import EvaluationResults
from hetgraph.evaluation.sampling import scored_count
from hetgraph.fusion.context import Retrieval
from hetgraph.fusion.neighbour_states import NeighbourStates
from hetgraph.fusion.retrieval import Retriever
from hetgraph.knnlm import DEFAULT_LAMBDAS, perplexity
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
    check_memory(
        f"the kNN-LM neighbours of {positions:,} evaluated positions × k {k}",
        positions * k * NEIGHBOUR_BYTES,
        "lower --k (evaluation.k) or evaluate fewer tokens (--max-tokens, --tune-tokens)",
    )


def _limit(split: Any, max_tokens: int | None) -> Any:
    # As everywhere in hetgraph, ``max_tokens`` counts tokens used (max_tokens - 1 are scored).
    if max_tokens is None or len(split) <= max_tokens:
        return split
    return split.truncate(max_tokens)


def gnn_forward(
    lm: Any, k: int | None = None, neighbour_states: NeighbourStates | None = None
) -> ForwardFn | TrimmedForward:
    """``input_ids -> logits`` of a :class:`~hetgraph.HetGraphLM` retrieving ``k`` neighbours
    per position (default: its config's ``k``), reading its adapters' window side from
    ``neighbour_states`` if given; hooks are attached per call. A
    :class:`~hetgraph.TrimmedForward` when the base model takes ``logits_to_keep``
    and the positions are fused independently
    (:attr:`~hetgraph.FusionEngine.fuses_positions_independently`): then the positions whose
    logits are not kept are not retrieved for, nor put in the head's graph. The forward
    takes a ``retrieval`` (:class:`~hetgraph.Retrieval` of the window batch's positions,
    as :func:`~hetgraph.evaluation.collect_lm_outputs` passes from ``neighbours_from``):
    the positions it covers are not searched again (a retrieval with another ``k`` is
    ignored)."""
    wanted = k or lm.config.k

    def forward(
        input_ids: torch.Tensor, logits_to_keep: int = 0, retrieval: Retrieval | None = None
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        if retrieval is not None and retrieval.neighbour_ids.shape[-1] == wanted:
            kwargs["retrieval"] = retrieval
        return lm(
            input_ids, use_cache=False, k=k, neighbour_states=neighbour_states, **kwargs
        ).logits

    if lm.engine.fuses_positions_independently and accepts_logits_to_keep(lm.model):
        return TrimmedForward(forward)
    return forward


def evaluation_neighbour_states(
    lm: Any, config: EvalConfig, tokens: int, k: int
) -> NeighbourStates | None:
    """The :class:`~hetgraph.NeighbourStates` an evaluation of ``tokens`` positions by ``lm``
    with ``k`` neighbours each uses, as ``config.neighbour_states`` says, or ``None``.
    ``"auto"``: the graphs have windows (not ``deduplicate``), the table fits a quarter of
    the available memory shared by this node's processes (``LOCAL_WORLD_SIZE`` under
    ``torchrun``: each builds its own) and ``tokens × k ≥ 2 × rows``.

    A model with a knowledge graph (``lm.engine.knowledge``) reads no table (they hold no
    ``kg`` nodes).

    Raises:
        ConfigError: ``"on"`` with ``graph.deduplicate`` (no windows to tabulate) or with a
            knowledge graph.
    """
    if config.neighbour_states == "off":
        return None
    if lm.engine.knowledge is not None:  # the tables hold windows, not kg nodes
        if config.neighbour_states == "on":
            raise ConfigError(
                "evaluation.neighbour_states is 'on' but the model fuses a knowledge graph: "
                "the tables hold no kg nodes; set neighbour_states to 'auto' or 'off' "
                "(--neighbour-states off)"
            )
        return None
    if lm.engine.graph_config.deduplicate:
        if config.neighbour_states == "on":
            raise ConfigError(
                "evaluation.neighbour_states is 'on' but fusion.graph.deduplicate "
                "is true: its graphs have no windows to tabulate; set "
                "neighbour_states to 'auto' or 'off' (--neighbour-states off)"
            )
        return None
    if config.neighbour_states == "auto":
        budget = available_memory_bytes() // (4 * processes_on_this_node())
        rows = len(lm.engine.datastore)
        if NeighbourStates.estimate_nbytes(lm.engine) > budget or tokens * k < 2 * rows:
            return None
    return NeighbourStates.build(lm.engine, lm.model.get_input_embeddings(), show_progress=False)


def model_perplexity(
    lm: Any, split: Any, config: EvalConfig | None = None, max_tokens: int | None = None
) -> float:
    """Perplexity of a :class:`~hetgraph.HetGraphLM` on a split, through ``config``'s
    windows, over ``max_tokens`` of its tokens (default ``config.max_tokens``, else all;
    sampled as ``config.sample`` says).
    The model retrieves its own ``FusionConfig.k`` neighbours (as in training). Under
    ``torchrun`` the windows are shared across ranks and the result is the one-process
    perplexity on every rank (:func:`~hetgraph.evaluation.collect_lm_outputs`)."""
    config = config or EvalConfig()
    if max_tokens is not None:
        config = dataclasses.replace(config, max_tokens=max_tokens)
    states = evaluation_neighbour_states(lm, config, scored_count(len(split), config), lm.config.k)
    outputs = collect_lm_outputs(
        lm.model, split, config, forward=gnn_forward(lm, None, states), show_progress=False
    )
    return perplexity(outputs.lm_log_probs)


def add_intervals(
    results: dict[str, Any],
    log_probs: dict[str, torch.Tensor],
    doc_ids: torch.Tensor,
    config: EvalConfig,
) -> None:
    r"""Add to ``results`` each method's 95 % document-bootstrap interval and documents
    (``"ppl_ci95"``, ``"documents"`` in its row), every ratio between two methods with its
    paired interval (top-level ``"ratios"``, keyed ``"gnn/base"``, ``"gnn_knn/knn"``, …),
    and how they were drawn (``"bootstrap"``).

    Args:
        results: method rows (``{"ppl", "acc", …}``) keyed like ``log_probs``.
        log_probs: method -> ``[M]`` log-probabilities of the same scored tokens.
        doc_ids: ``[M]`` the document of each token.
        config: the bootstrap's resamples and seed.
    """
    spec = config.bootstrap
    methods, ratios = perplexity_intervals(
        {name: values.numpy() for name, values in log_probs.items()}, doc_ids.numpy(), spec
    )
    for name, stat in methods.items():
        results[name]["ppl_ci95"] = [stat.ci95[0], stat.ci95[1]]
        results[name]["documents"] = stat.documents
    results["ratios"] = {
        key: {"ratio": r.ratio, "ci95": [r.ci95[0], r.ci95[1]]} for key, r in ratios.items()
    }
    results["bootstrap"] = {
        "resamples": spec.resamples,
        "seed": spec.seed,
        "level": spec.level,
        "over": "documents",
    }


#: Stage names of a method's rows in errors (:class:`~hetgraph.errors.NonFiniteError`).
STAGES = {"gnn": "GNN", "lora": "LoRA"}


def _method_rows(
    name: str,
    model: Any,
    forward: Any,
    splits: tuple[Any, Any],
    configs: tuple[EvalConfig, EvalConfig],
    bases: tuple[LMOutputs, LMOutputs],
    k: int,
    lambdas: Any,
    show_progress: bool,
    results: dict[str, Any],
    log_probs: dict[str, torch.Tensor],
) -> float:
    # Rows `name` and `name_knn` (with the base run's neighbours) into `results` and
    # `log_probs`; returns the method's test tokens/s.
    valid = collect_lm_outputs(
        model,
        splits[0],
        configs[0],
        forward=forward,
        neighbours_from=bases[0],
        show_progress=show_progress,
    )
    started = time.perf_counter()
    test = collect_lm_outputs(
        model,
        splits[1],
        configs[1],
        forward=forward,
        neighbours_from=bases[1],
        show_progress=show_progress,
    )
    tokens_per_s = len(test) / (time.perf_counter() - started)
    results[name], log_probs[name] = score_lm(test, STAGES[name]), test.lm_log_probs
    results[f"{name}_knn"], log_probs[f"{name}_knn"] = tuned_knn(
        valid, test, k, lambdas, f"{STAGES[name]}+kNN"
    )
    return tokens_per_s


def _rekeyed_rows(
    lm: Any,
    rekeyed: Any,
    forward: Any,
    setup: tuple[tuple[Any, Any], tuple[EvalConfig, EvalConfig], int, Any, bool],
    into: tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, float]],
) -> None:
    # Row, log-probs and speed of GNN-LM + kNN over the re-keyed store into the results.
    (splits, configs, k, lambdas, show_progress), (results, log_probs, speed) = setup, into
    row, log_probs[REKEYED_METHOD], speed[f"{REKEYED_METHOD}_tokens_per_s"] = rekeyed_knn_row(
        lm, rekeyed, forward, splits, configs, k, lambdas, show_progress
    )
    results[REKEYED_METHOD] = row


def _sampled(config: EvalConfig, valid_split: Any, test_split: Any) -> tuple[Any, ...]:
    # (valid split, test split, valid config, test config): a stratified sample chooses its
    # positions among whole splits; "prefix" cuts each split to its first tokens.
    if config.sample == "prefix":
        whole = dataclasses.replace(config, max_tokens=None)
        return (
            _limit(valid_split, config.valid_tokens),
            _limit(test_split, config.max_tokens),
            whole,
            whole,
        )
    return (
        valid_split,
        test_split,
        dataclasses.replace(config, max_tokens=config.valid_tokens),
        config,
    )


def _sample_record(config: EvalConfig, outputs: LMOutputs) -> dict[str, Any]:
    return {
        "kind": config.sample,
        "seed": config.sample_seed,
        "tokens": len(outputs),
        "documents": int(torch.unique(outputs.doc_ids).numel()),
    }


def evaluate_four_way(
    lm: Any,
    valid_split: Any,
    test_split: Any,
    config: EvalConfig | None = None,
    *,
    include_gnn: bool = True,
    lambdas: Any = DEFAULT_LAMBDAS,
    show_progress: bool = True,
    per_token: str | Path | None = None,
    control: Any | None = None,
    rekeyed: str | Path | None = None,
) -> EvaluationResults:
    """Evaluate base, kNN-LM, GNN-LM and GNN-LM + kNN on exactly the same test tokens.

    The scored tokens are ``config.max_tokens`` positions spread over every test document
    (``config.sample``, :mod:`hetgraph.evaluation.sampling`); λ and T are tuned per method
    on ``config.valid_tokens`` valid positions sampled the same way. kNN-LM and GNN-LM use
    the base run's neighbours (one search per position). Every perplexity has a 95 %
    document-bootstrap interval, every ratio a paired one (:func:`add_intervals`). Under
    ``torchrun`` every rank calls this alike and returns the one-process results.

    Args:
        lm: a :class:`~hetgraph.HetGraphLM` (its model, datastore and index are used).
        valid_split, test_split: the split λ and T are tuned on, and the one reported.
        config: windows, ``k``, token budgets, the sample and the bootstrap.
        include_gnn: also evaluate ``gnn`` and ``gnn_knn`` (needs a trained adapter).
        lambdas: λ grid.
        show_progress: tqdm bars.
        per_token: also write every scored token's document, position, target and each
            method's log-probability there (:func:`~hetgraph.evaluation.write_per_token`;
            rank 0 only).
        control: a LoRA control injected into ``lm.model`` (``load_lora_control``): adds
            rows ``lora`` and ``lora_knn``; it is switched off for the others.
        rekeyed: a store re-keyed by this adapter: adds ``gnn_knn_rekeyed`` (the paper's kNN).

    Raises:
        NonFiniteError: a method's perplexity or accuracy is not finite (its ``stage`` names
            the method); nothing is returned, so no table with ``nan`` is ever written.
        RekeyError: ``rekeyed`` does not fit the datastore and adapter (before any work).

    Returns:
        Method rows (``ppl``, ``ppl_ci95``, ``documents``, ``acc``; kNN rows ``lambda``,
        ``temperature``, ``k``), ``ratios``, ``bootstrap``, ``sample``, ``neighbours``,
        ``tokens``, ``valid_tokens`` and ``speed`` (tokens/s), as an
        :class:`~hetgraph.evaluation.EvaluationResults` (typed; its ``to_dict()`` is the
        JSON ``hetgraph eval --json`` writes, and it reads as that mapping).
    """
    config, model = config or EvalConfig(), lm.model
    k = int(config.k)
    valid_split, test_split, valid_config, test_config = _sampled(config, valid_split, test_split)
    valid_positions = scored_count(len(valid_split), valid_config)
    test_positions = scored_count(len(test_split), test_config)
    # A re-keyed store adds a second set of neighbours of the same positions.
    check_neighbour_memory((valid_positions + test_positions) * (1 + (rekeyed is not None)), k)
    rekeyed_index = open_rekeyed(lm, rekeyed, include_gnn)
    states, states_seconds = None, 0.0
    if include_gnn:  # first: a setting that cannot hold fails before any work
        started = time.perf_counter()
        states = evaluation_neighbour_states(lm, config, valid_positions + test_positions, k)
        states_seconds = time.perf_counter() - started
    search = Retriever(lm.engine.datastore, lm.engine.index)
    with control.disable_adapter() if control is not None else nullcontext():  # the base LM
        base_valid = collect_lm_outputs(
            model, valid_split, valid_config, search=search, show_progress=show_progress
        )
        started = time.perf_counter()
        base_test = collect_lm_outputs(
            model, test_split, test_config, search=search, show_progress=show_progress
        )
    speed = {"base_with_search_tokens_per_s": len(base_test) / (time.perf_counter() - started)}
    splits, configs = (valid_split, test_split), (valid_config, test_config)
    results: dict[str, Any] = {"base": score_lm(base_test, "base")}
    log_probs = {"base": base_test.lm_log_probs}
    results["knn"], log_probs["knn"] = tuned_knn(base_valid, base_test, k, lambdas, "kNN")
    # The control first, with its LoRA on; GNN-LM on the base model, with it off.
    off = control.disable_adapter if control is not None else nullcontext
    for name, forward, context in (
        ("lora", default_forward(model) if control is not None else None, nullcontext),
        ("gnn", gnn_forward(lm, k, states) if include_gnn else None, off),
    ):
        if forward is not None:
            with context():
                speed[f"{name}_tokens_per_s"] = _method_rows(
                    name,
                    model,
                    forward,
                    splits,
                    configs,
                    (base_valid, base_test),
                    k,
                    lambdas,
                    show_progress,
                    results,
                    log_probs,
                )
            speed[f"{name}_over_base_with_search"] = (
                speed[f"{name}_tokens_per_s"] / speed["base_with_search_tokens_per_s"]
            )
    if rekeyed_index is not None:
        with off():  # GNN-LM on the base model, as for its own rows
            _rekeyed_rows(
                lm,
                rekeyed_index,
                gnn_forward(lm, k, states),
                (splits, configs, k, lambdas, show_progress),
                (results, log_probs, speed),
            )
    if states is not None:
        speed["neighbour_states_seconds"] = states_seconds
    add_intervals(results, log_probs, base_test.doc_ids, config)
    sample = {
        "test": _sample_record(test_config, base_test),
        "valid": _sample_record(valid_config, base_valid),
    }
    results.update(
        tokens=len(base_test),
        valid_tokens=len(base_valid),
        sample=sample,
        documents=sample["test"]["documents"],
        speed=speed,
        neighbours=lm.config.neighbours if include_gnn else "retrieved",
    )
    if per_token is not None and current_context().is_main:
        write_per_token(per_token, base_test, log_probs, test_split)
    return EvaluationResults.from_dict(results)
