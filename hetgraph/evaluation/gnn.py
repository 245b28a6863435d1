"""Four-way evaluation: base LM, kNN-LM, GNN-LM and GNN-LM + kNN over the same tokens."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hetgraph.evaluation.knn import default_temperatures, score_knn, score_lm
from hetgraph.evaluation.lm import EvalConfig, LMOutputs, collect_lm_outputs
from hetgraph.knnlm import DEFAULT_LAMBDAS, perplexity, tune_knn

#: Row labels of :func:`results_table`, in display order.
METHOD_NAMES = {"base": "base LM", "knn": "kNN-LM", "gnn": "GNN-LM", "gnn_knn": "GNN-LM + kNN"}


def _limit(split: Any, max_tokens: int | None) -> Any:
    # As everywhere in hetgraph, ``max_tokens`` counts tokens used (max_tokens - 1 are scored).
    if max_tokens is None or len(split) <= max_tokens:
        return split
    return split.truncate(max_tokens)


def gnn_forward(lm: Any):
    """``input_ids -> logits`` of a :class:`~hetgraph.HetGraphLM` (hooks attached per call)."""
    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return lm(input_ids, use_cache=False).logits
    return forward


def model_perplexity(
    lm: Any,
    split: Any,
    max_tokens: int | None = None,
    *,
    context_length: int = 512,
    stride: int = 256,
    batch_size: int = 8,
) -> float:
    """Perplexity of a :class:`~hetgraph.HetGraphLM` on the first ``max_tokens`` of a split."""
    config = EvalConfig(context_length=context_length, stride=stride, batch_size=batch_size)
    outputs = collect_lm_outputs(lm.model, _limit(split, max_tokens), config,
                                 forward=gnn_forward(lm), show_progress=False)
    return perplexity(outputs.lm_log_probs)


def _tuned_knn(valid: LMOutputs, test: LMOutputs, k: int, lambdas: Any) -> dict[str, Any]:
    temperatures = default_temperatures(valid.knn_distances)
    lam, temperature, grid = tune_knn(valid.lm_log_probs, valid.knn_distances, valid.knn_tokens,
                                      valid.targets, lambdas, temperatures)
    return {**score_knn(test, lam, temperature), "lambda": float(lam), "temperature": float(temperature),
            "k": int(k), "valid_ppl": float(np.nanmin(grid))}


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

    Args:
        lm: a :class:`~hetgraph.HetGraphLM` (its model, datastore and index are used).
        valid_split: split for tuning λ and T (first ``config.valid_tokens`` tokens).
        test_split: split reported (first ``config.max_tokens`` tokens).
        config: windows, ``k`` and token limits.
        include_gnn: also evaluate ``gnn`` and ``gnn_knn`` (needs a trained adapter).
        lambdas: λ grid.
        show_progress: tqdm bars.

    Returns:
        ``{"base", "knn", "gnn", "gnn_knn"}`` rows with ``ppl`` and ``acc`` (kNN rows also
        ``lambda``, ``temperature``, ``k``), ``tokens``, ``valid_tokens`` and ``speed``
        (tokens/s of base and GNN-LM evaluation, and their ratio). JSON-serialisable.
    """
    config = config or EvalConfig()
    model, datastore, index = lm.model, lm.datastore, lm.retriever.index
    k = int(config.k)
    windows = dataclasses.replace(config, max_tokens=None)
    valid_split = _limit(valid_split, config.valid_tokens)
    test_split = _limit(test_split, config.max_tokens)
    common = dict(index=index, datastore=datastore, k=k, show_progress=show_progress)
    base_valid = collect_lm_outputs(model, valid_split, windows, **common)
    started = time.perf_counter()
    base_test = collect_lm_outputs(model, test_split, windows, **common)
    base_seconds = time.perf_counter() - started
    results: dict[str, Any] = {
        "base": score_lm(base_test),
        "knn": _tuned_knn(base_valid, base_test, k, lambdas),
    }
    speed: dict[str, float] = {"base_with_search_tokens_per_s": len(base_test) / base_seconds}
    if include_gnn:
        previous_k = lm.config.k
        lm.config.k = k
        try:
            forward = gnn_forward(lm)
            gnn_valid = collect_lm_outputs(model, valid_split, windows, forward=forward,
                                           neighbours_from=base_valid, show_progress=show_progress)
            started = time.perf_counter()
            gnn_test = collect_lm_outputs(model, test_split, windows, forward=forward,
                                          neighbours_from=base_test, show_progress=show_progress)
            gnn_seconds = time.perf_counter() - started
        finally:
            lm.config.k = previous_k
        results["gnn"] = score_lm(gnn_test)
        results["gnn_knn"] = _tuned_knn(gnn_valid, gnn_test, k, lambdas)
        speed["gnn_tokens_per_s"] = len(gnn_test) / gnn_seconds
        speed["gnn_over_base_with_search"] = speed["gnn_tokens_per_s"] / speed["base_with_search_tokens_per_s"]
    results["tokens"] = len(base_test)
    results["valid_tokens"] = len(base_valid)
    results["speed"] = speed
    return results


def results_table(results: Mapping[str, Any], title: str | None = None) -> str:
    """Markdown table of :func:`evaluate_four_way` results, with ratios to the base LM."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| method | perplexity | vs base | accuracy | λ | T |", "|---|---:|---:|---:|---:|---:|"]
    base = results["base"]["ppl"]
    for key, name in METHOD_NAMES.items():
        row = results.get(key)
        if not isinstance(row, Mapping):
            continue
        lam = f"{row['lambda']:.2f}" if "lambda" in row else "–"
        temperature = f"{row['temperature']:.3g}" if "temperature" in row else "–"
        lines.append(f"| {name} | {row['ppl']:.3f} | {row['ppl'] / base:.3f} | {100 * row['acc']:.2f} % "
                     f"| {lam} | {temperature} |")
    lines += ["", f"Test tokens: {results['tokens']:,} (λ and T tuned on {results['valid_tokens']:,} "
                  "valid tokens)"]
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of perplexity and accuracy per method, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in METHOD_NAMES if isinstance(results.get(key), Mapping)]
    names = [METHOD_NAMES[key] for key in keys]
    colours = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728"][: len(keys)]
    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in ((ax_ppl, "ppl", "test perplexity (lower is better)"),
                              (ax_acc, "acc", "next-token accuracy (higher is better)")):
        values = [results[key][metric] * (100 if metric == "acc" else 1) for key in keys]
        bars = ax.bar(names, values, color=colours)
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        low, high = min(values), max(values)
        ax.set_ylim(max(0.0, low - 0.25 * (high - low + 1e-9) - 0.05 * high), high * 1.08)
    fig.suptitle(f"hetgraph — {results['tokens']:,} test tokens", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
