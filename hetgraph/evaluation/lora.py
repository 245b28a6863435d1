r"""Evaluating the LoRA control (:mod:`hetgraph.training.lora`): rows ``lora`` and ``lora_knn``.

The control is scored through :func:`~hetgraph.evaluation.collect_lm_outputs` like every
other method, over the same windows and tokens. ``lora_knn`` mixes in kNN-LM's
distribution over the *base* model's neighbours (as ``gnn_knn`` does), λ and T tuned on
valid: the baseline GNN-LM + kNN has to beat.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from hetgraph.evaluation.knn import score_lm, tuned_knn
from hetgraph.evaluation.lm import (
    EvalConfig,
    ForwardFn,
    LMOutputs,
    TrimmedForward,
    collect_lm_outputs,
    default_forward,
)
from hetgraph.fusion.retrieval import Retriever
from hetgraph.knnlm import DEFAULT_LAMBDAS, perplexity


def base_of(lora_model: Any) -> nn.Module:
    """The HF model under a PEFT model (the LoRA layers are injected into it, so its own
    forward runs them); any other model as it is."""
    return lora_model.get_base_model() if hasattr(lora_model, "get_base_model") else lora_model


def lora_forward(lora_model: Any) -> ForwardFn | TrimmedForward:
    """``input_ids -> logits`` of the control, for ``collect_lm_outputs(base_of(m), …,
    forward=lora_forward(m))``: a :class:`TrimmedForward` when the base model takes
    ``logits_to_keep``."""
    return default_forward(base_of(lora_model))


def lora_perplexity(
    lora_model: Any, split: Any, config: EvalConfig | None = None, max_tokens: int | None = None
) -> float:
    """Perplexity of the control over ``config``'s windows of ``split``'s first
    ``max_tokens`` tokens (default ``config.max_tokens``), as
    :func:`~hetgraph.evaluation.model_perplexity` scores a :class:`~hetgraph.HetGraphLM`."""
    config = config or EvalConfig()
    if max_tokens is not None:
        config = dataclasses.replace(config, max_tokens=max_tokens)
    outputs = collect_lm_outputs(
        base_of(lora_model), split, config, forward=lora_forward(lora_model), show_progress=False
    )
    return perplexity(outputs.lm_log_probs)


def _limit(split: Any, max_tokens: int | None) -> Any:
    if max_tokens is None or len(split) <= max_tokens:
        return split
    return split.truncate(max_tokens)


def _base_outputs(
    lora_model: Any, split: Any, windows: EvalConfig, search: Retriever, show_progress: bool
) -> LMOutputs:
    # The base model's own query states and log-probs: the LoRA switched off.
    with lora_model.disable_adapter():
        return collect_lm_outputs(
            base_of(lora_model), split, windows, search=search, show_progress=show_progress
        )


def evaluate_lora_control(
    lora_model: Any,
    valid_split: Any,
    test_split: Any,
    config: EvalConfig | None = None,
    *,
    search: Retriever | None = None,
    base_outputs: tuple[LMOutputs, LMOutputs] | None = None,
    lambdas: Any = DEFAULT_LAMBDAS,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Rows ``lora`` (the control alone) and ``lora_knn`` (with kNN-LM over the base
    model's neighbours, λ and T tuned on valid), on the tokens
    :func:`~hetgraph.evaluation.evaluate_four_way` reports for the same ``config``.

    Args:
        lora_model: the control (:func:`~hetgraph.training.lora.load_lora_control`).
        valid_split, test_split: as in ``evaluate_four_way`` (``config.valid_tokens`` and
            ``config.max_tokens`` limit them).
        search: the base model's datastore and index; its neighbours are searched with the
            LoRA switched off. Or
        base_outputs: the base model's ``(valid, test)`` outputs collected with that search
            over the same splits and windows (as ``evaluate_four_way`` collects them).
        lambdas: λ grid.

    Returns:
        ``{"lora": {"ppl", "acc"}, "lora_knn": {"ppl", "acc", "lambda", "temperature", "k",
        "valid_ppl"}}``.

    Raises:
        NonFiniteError: a perplexity or accuracy is not finite (stage ``"LoRA"`` or
            ``"LoRA+kNN"``).
    """
    config = config or EvalConfig()
    if (search is None) == (base_outputs is None):
        raise ValueError("evaluate_lora_control: pass either search or base_outputs")
    windows = dataclasses.replace(config, max_tokens=None)
    valid_split = _limit(valid_split, config.valid_tokens)
    test_split = _limit(test_split, config.max_tokens)
    if base_outputs is None:
        base_outputs = (
            _base_outputs(lora_model, valid_split, windows, search, show_progress),
            _base_outputs(lora_model, test_split, windows, search, show_progress),
        )
    model, forward = base_of(lora_model), lora_forward(lora_model)
    valid, test = (
        collect_lm_outputs(
            model,
            split,
            windows,
            forward=forward,
            neighbours_from=base,
            show_progress=show_progress,
        )
        for split, base in zip((valid_split, test_split), base_outputs, strict=True)
    )
    lora_knn, _ = tuned_knn(valid, test, config.k, lambdas, "LoRA+kNN")
    return {"lora": score_lm(test, "LoRA"), "lora_knn": lora_knn}
