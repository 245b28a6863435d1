"""Rendering evaluation results: one Markdown table and one bar chart for every evaluation."""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Row labels of :func:`results_table`, in display order.
METHOD_NAMES = {"base": "base LM", "knn": "kNN-LM", "gnn": "GNN-LM", "gnn_knn": "GNN-LM + kNN"}


def _cell(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(results: Mapping[str, Any], title: str | None = None) -> str:
    """Markdown table of evaluation results (:func:`~hetgraph.evaluation.evaluate_four_way`
    or :func:`~hetgraph.evaluation.evaluate_base_knn`): one row per method present, with
    its ratio to the base LM and the tuned kNN-LM λ / T / k.

    Raises:
        NonFiniteError: a perplexity or accuracy is NaN or infinite (never printed as ``nan``).
    """
    from hetgraph.evaluation.lm import NonFiniteError

    for key, name in METHOD_NAMES.items():
        row = results.get(key)
        if isinstance(row, Mapping) and not all(math.isfinite(float(row[m]))
                                                for m in ("ppl", "acc")):
            raise NonFiniteError(f"results: {name} has perplexity {row['ppl']} and accuracy "
                                 f"{row['acc']}; a table of non-finite results is refused",
                                 stage=name)
    lines = [f"**{title}**", ""] if title else []
    lines += ["| method | perplexity | vs base | accuracy | λ | T | k |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    base = results["base"]["ppl"]
    for key, name in METHOD_NAMES.items():
        row = results.get(key)
        if not isinstance(row, Mapping):
            continue
        lines.append(f"| {name} | {row['ppl']:.3f} | {row['ppl'] / base:.3f} "
                     f"| {100 * row['acc']:.2f} % "
                     f"| {_cell(row.get('lambda'), '.2f')} "
                     f"| {_cell(row.get('temperature'), '.3g')} "
                     f"| {_cell(row.get('k'), 'd')} |")
    footer = f"Test tokens: {results['tokens']:,}"
    if "valid_tokens" in results:
        footer += f" (λ and T tuned on {results['valid_tokens']:,} valid tokens)"
    return "\n".join([*lines, "", footer]) + "\n"


def plot_results(results: Mapping[str, Any], path: str | Path, format: str | None = None) -> Path:
    """Bar chart of perplexity and accuracy per method, written to ``path`` atomically
    (:func:`hetgraph.io.atomic_path`: a reader never sees half a chart, and an existing file
    is replaced only once the new one is complete) in ``format`` (default: ``path``'s suffix,
    else PNG)."""
    import matplotlib

    from hetgraph.io import atomic_path

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
    # The temporary's name ends in ".tmp", so the format is given, never guessed from it.
    format = format or path.suffix.lower().lstrip(".") or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format=format)
    finally:
        plt.close(fig)
    return path
