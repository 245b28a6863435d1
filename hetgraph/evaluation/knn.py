"""Base-LM and kNN-LM evaluation: tune λ and T on valid, report on test."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from hetgraph.datastore.store import Datastore
from hetgraph.evaluation.lm import (
    EvalConfig,
    ForwardFn,
    LMOutputs,
    NonFiniteError,
    collect_lm_outputs,
)
from hetgraph.fusion.retrieval import Retriever
from hetgraph.knnlm import (
    DEFAULT_LAMBDAS,
    interpolate_log_probs,
    knn_mixture_argmax,
    knn_target_log_probs,
    perplexity,
    tune_knn,
)


def default_temperatures(distances: Any, num: int = 9) -> list[float]:
    """A geometric temperature grid scaled to the distances: ``s · 2^{-6 … 2}``.

    ``s`` is the median finite neighbour distance, so the grid adapts to each model's
    hidden-state scale (squared L2 distances range from ~1 to ~10^4 across models).
    """
    d = torch.as_tensor(distances, dtype=torch.float32)
    finite = d[torch.isfinite(d)]
    scale = float(finite.abs().median()) if finite.numel() else 1.0
    scale = scale if scale > 0 else 1.0
    return [float(scale * 2.0**e) for e in np.linspace(-6, 2, num)]


def finite_scores(scores: dict[str, float], stage: str) -> dict[str, float]:
    """``scores`` unchanged when its perplexity and accuracy are finite.

    Raises:
        NonFiniteError: naming ``stage`` (``"base"``, ``"kNN"``, ``"GNN"``, ``"GNN+kNN"``).
    """
    bad = {name: value for name, value in scores.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteError(
            f"evaluation ({stage}): {', '.join(f'{k} = {v}' for k, v in bad.items())} is not "
            "finite, so no results are written; the model, datastore or adapter produces "
            "NaN/inf (run `hetgraph verify` on the datastore and adapter, or load the model in "
            "float32 with --dtype float32)",
            stage=stage,
        )
    return scores


def score_lm(outputs: LMOutputs, stage: str = "base") -> dict[str, float]:
    """``{"ppl", "acc"}`` of the LM alone.

    Raises:
        NonFiniteError: the perplexity is not finite (``stage`` names the method).
    """
    return finite_scores(
        {"ppl": perplexity(outputs.lm_log_probs), "acc": float(outputs.lm_correct.float().mean())},
        stage,
    )


def knn_mixture_log_probs(outputs: LMOutputs, lam: float, temperature: float) -> torch.Tensor:
    """float32 ``[M]``: each scored token's log-probability under the kNN-LM mixture of
    ``outputs``' LM and neighbours (λ ``lam``, temperature ``temperature``)."""
    if not outputs.has_neighbours:
        raise ValueError("these LM outputs hold no neighbours; collect them with an index")
    knn = knn_target_log_probs(
        outputs.knn_distances, outputs.knn_tokens, outputs.targets, temperature
    )
    return interpolate_log_probs(outputs.lm_log_probs, knn, lam)


def score_knn(
    outputs: LMOutputs, lam: float, temperature: float, stage: str = "kNN"
) -> dict[str, float]:
    """``{"ppl", "acc"}`` of the kNN-LM mixture over exactly the tokens of ``outputs``.

    Accuracy is the exact argmax of the full mixture (see :func:`knn_mixture_argmax`).

    Raises:
        NonFiniteError: the perplexity is not finite (``stage`` names the method).
    """
    mix = knn_mixture_log_probs(outputs, lam, temperature)
    pred = knn_mixture_argmax(
        outputs.lm_argmax,
        outputs.lm_neighbour_log_probs,
        outputs.knn_distances,
        outputs.knn_tokens,
        lam,
        temperature,
        lm_argmax_log_probs=outputs.lm_argmax_log_probs,
    )
    return finite_scores(
        {"ppl": perplexity(mix), "acc": float((pred == outputs.targets).float().mean())}, stage
    )


def tuned_knn(
    valid: LMOutputs, test: LMOutputs, k: int, lambdas: Sequence[float], stage: str
) -> tuple[dict[str, Any], torch.Tensor]:
    """Tune the kNN-LM mixture's λ and T on ``valid`` (grid search, minimum perplexity) and
    score it on ``test``: the method's row (``ppl``, ``acc``, ``lambda``, ``temperature``,
    ``k``, ``valid_ppl``) and the mixture's ``[M]`` log-probabilities of the test tokens.
    ``stage`` names the method in errors (:class:`~hetgraph.errors.NonFiniteError`)."""
    temperatures = default_temperatures(valid.knn_distances)
    lam, temperature, grid = tune_knn(
        valid.lm_log_probs,
        valid.knn_distances,
        valid.knn_tokens,
        valid.targets,
        lambdas,
        temperatures,
    )
    row = {
        **score_knn(test, lam, temperature, stage),
        "lambda": float(lam),
        "temperature": float(temperature),
        "k": int(k),
        "valid_ppl": float(np.nanmin(grid)),
    }
    return row, knn_mixture_log_probs(test, lam, temperature)


def evaluate_base_knn(
    model: nn.Module,
    tokenizer: Any,
    datastore: Datastore,
    index: Any,
    valid_split: Any,
    test_split: Any,
    *,
    config: EvalConfig | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    temperatures: Sequence[float] | None = None,
    forward: ForwardFn | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the base LM and the kNN-LM on the same test tokens.

    λ and T are tuned on ``valid_split`` by grid search (minimum perplexity), then
    applied to ``test_split``. ``config`` gives the windows, ``k`` and ``max_tokens`` (of
    the test split) and ``valid_tokens`` (of the valid split).

    Returns:
        ``{"base": {"ppl", "acc"}, "knn": {"ppl", "acc", "lambda", "temperature", "k",
        "valid_ppl"}, "valid_base": {"ppl", "acc"}, "tokens": M_test, "valid_tokens": M_valid,
        "grid": {"lambdas", "temperatures", "valid_ppl"}}`` (JSON-serialisable).
    """
    datastore.check(model=model, tokenizer=tokenizer)
    config = config or EvalConfig()
    k = int(config.k)
    common: dict[str, Any] = {
        "search": Retriever(datastore, index),
        "forward": forward,
        "show_progress": show_progress,
    }
    valid_config = dataclasses.replace(config, max_tokens=config.valid_tokens)
    valid = collect_lm_outputs(model, valid_split, valid_config, **common)
    test = collect_lm_outputs(model, test_split, config, **common)
    temps = (
        list(temperatures)
        if temperatures is not None
        else default_temperatures(valid.knn_distances)
    )
    lam, temp, grid = tune_knn(
        valid.lm_log_probs, valid.knn_distances, valid.knn_tokens, valid.targets, lambdas, temps
    )
    knn = score_knn(test, lam, temp)
    return {
        "base": score_lm(test),
        "knn": {
            **knn,
            "lambda": lam,
            "temperature": temp,
            "k": int(k),
            "valid_ppl": float(np.nanmin(grid)),
        },
        "valid_base": score_lm(valid, "base (valid)"),
        "tokens": len(test),
        "valid_tokens": len(valid),
        "grid": {
            "lambdas": [float(x) for x in lambdas],
            "temperatures": temps,
            "valid_ppl": grid.tolist(),
        },
    }
