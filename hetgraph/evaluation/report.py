"""Rendering evaluation results: one Markdown table and one bar chart for every evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetgraph.errors import NonFiniteError
from hetgraph.io import atomic_path, atomic_save_safetensors

#: Row labels of :func:`results_table`, in display order.
METHOD_NAMES = {
    "base": "base LM",
    "knn": "kNN-LM",
    "gnn": "GNN-LM",
    "gnn_knn": "GNN-LM + kNN",
    "gnn_knn_rekeyed": "GNN-LM + kNN (re-keyed)",
    "lora": "LoRA (control)",
    "lora_knn": "LoRA + kNN",
}


def _cell(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(results: Mapping[str, Any], title: str | None = None) -> str:
    """Markdown table of evaluation results (:func:`~hetgraph.evaluation.evaluate_four_way`
    or :func:`~hetgraph.evaluation.evaluate_base_knn`): one row per method present, with
    its ratio to the base LM and the tuned kNN-LM λ / T / k.

    Raises:
        NonFiniteError: a perplexity or accuracy is NaN or infinite (never printed as ``nan``).
    """
    for key, name in METHOD_NAMES.items():
        row = results.get(key)
        if isinstance(row, Mapping) and not all(
            math.isfinite(float(row[m])) for m in ("ppl", "acc")
        ):
            raise NonFiniteError(
                f"results: {name} has perplexity {row['ppl']} and accuracy "
                f"{row['acc']}; a table of non-finite results is refused",
                stage=name,
            )
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| method | perplexity | 95 % CI | vs base | 95 % CI | accuracy | λ | T | k |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results["base"]["ppl"]
    ratios = results.get("ratios", {})
    for key, name in METHOD_NAMES.items():
        row = results.get(key)
        if not isinstance(row, Mapping):
            continue
        ratio = ratios.get(f"{key}/base", {}).get("ci95")
        lines.append(
            f"| {name} | {row['ppl']:.3f} | {_interval(row.get('ppl_ci95'), '.3f')} "
            f"| {row['ppl'] / base:.3f} | {_interval(ratio, '.3f')} "
            f"| {100 * row['acc']:.2f} % "
            f"| {_cell(row.get('lambda'), '.2f')} "
            f"| {_cell(row.get('temperature'), '.3g')} "
            f"| {_cell(row.get('k'), 'd')} |"
        )
    footer = f"Test tokens: {results['tokens']:,}"
    if "documents" in results:
        footer += f" from {results['documents']:,} documents"
    if "valid_tokens" in results:
        footer += f" (λ and T tuned on {results['valid_tokens']:,} valid tokens)"
    notes = [footer]
    if "bootstrap" in results:
        spec = results["bootstrap"]
        notes.append(
            f"Intervals: {100 * spec['level']:.0f} % from {spec['resamples']:,} "
            f"bootstrap resamples of the test documents (seed {spec['seed']}; "
            "ratios paired)."
        )
        notes += [f"- {line}" for line in ratio_sentences(results)]
    return "\n".join([*lines, "", *notes]) + "\n"


def _interval(bounds: Any, spec: str) -> str:
    return "–" if bounds is None else f"{bounds[0]:{spec}}–{bounds[1]:{spec}}"


#: The comparisons :func:`ratio_sentences` states, in order: what each method adds.
KEY_RATIOS = (
    "knn/base",
    "gnn/base",
    "gnn_knn/base",
    "gnn_knn/knn",
    "gnn_knn/gnn",
    "gnn_knn_rekeyed/gnn_knn",
    "gnn_knn_rekeyed/knn",
    "lora/base",
    "lora_knn/knn",
)


def ratio_sentences(results: Mapping[str, Any]) -> list[str]:
    """One sentence per key ratio present in ``results["ratios"]``: the ratio with its
    interval, or "no detectable difference" when the interval contains 1."""
    from hetgraph.evaluation.intervals import RatioInterval

    sentences = []
    for key in KEY_RATIOS:
        entry = results.get("ratios", {}).get(key)
        if entry is None:
            continue
        a, b = key.split("/")
        sentences.append(
            RatioInterval(entry["ratio"], tuple(entry["ci95"])).describe(
                METHOD_NAMES[a], METHOD_NAMES[b]
            )
        )
    return sentences


def write_per_token(
    path: str | Path, outputs: Any, log_probs: Mapping[str, Any], split: Any
) -> Path:
    r"""Write every scored token of an evaluation to ``path`` (safetensors, atomically): its
    ``doc_ids``, split ``positions``, ``doc_positions`` (offset inside its document),
    ``targets``, and ``log_prob.<method>`` per method (float32, natural log); the metadata
    entry ``"hetgraph"`` holds the format and the document names (JSON), so that two runs can
    be compared token by token and the intervals recomputed. The same evaluation writes the
    same bytes.

    Args:
        path: the file to write.
        outputs: the :class:`~hetgraph.evaluation.LMOutputs` of the scored tokens.
        log_probs: method -> ``[M]`` log-probabilities of those tokens.
        split: the evaluated split (its ``doc_names`` and ``positions``).
    """
    import json

    import numpy as np
    import torch

    positions = outputs.positions.to(torch.int64)
    within = getattr(split, "positions", None)
    tensors = {
        "doc_ids": outputs.doc_ids.to(torch.int64).contiguous(),
        "positions": positions.contiguous(),
        "targets": outputs.targets.to(torch.int64).contiguous(),
    }
    if within is not None:  # the predicted token's offset inside its document
        tensors["doc_positions"] = torch.from_numpy(
            np.asarray(within)[positions.numpy() + 1].astype(np.int64)
        )
    for name, values in log_probs.items():
        tensors[f"log_prob.{name}"] = values.to(torch.float32).contiguous()
    names = list(getattr(split, "doc_names", []))
    # One metadata entry: safetensors keeps metadata in a hash map, so several keys would be
    # written in an order that changes from process to process.
    metadata = {
        "hetgraph": json.dumps(
            {"format": "hetgraph-per-token", "format_version": 1, "doc_names": names},
            ensure_ascii=False,
        )
    }
    atomic_save_safetensors(path, tensors, metadata=metadata)
    return Path(path)


def plot_results(results: Mapping[str, Any], path: str | Path, format: str | None = None) -> Path:
    """Bar chart of perplexity and accuracy per method, written to ``path`` atomically
    (:func:`hetgraph.io.atomic_path`: a reader never sees half a chart, and an existing file
    is replaced only once the new one is complete) in ``format`` (default: ``path``'s suffix,
    else PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [key for key in METHOD_NAMES if isinstance(results.get(key), Mapping)]
    names = [METHOD_NAMES[key] for key in keys]
    colours = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b"][: len(keys)]
    fig, (ax_ppl, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in (
        (ax_ppl, "ppl", "test perplexity (lower is better)"),
        (ax_acc, "acc", "next-token accuracy (higher is better)"),
    ):
        values = [results[key][metric] * (100 if metric == "acc" else 1) for key in keys]
        errors = None
        if metric == "ppl" and all("ppl_ci95" in results[key] for key in keys):
            errors = np.array(
                [
                    [v - results[key]["ppl_ci95"][0], results[key]["ppl_ci95"][1] - v]
                    for key, v in zip(keys, values, strict=True)
                ]
            ).T
        bars = ax.bar(
            names,
            values,
            color=colours,
            yerr=errors,
            capsize=4 if errors is not None else 0,
            error_kw={"elinewidth": 1},
        )
        ax.bar_label(bars, fmt="%.2f")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        low, high = min(values), max(values)
        if errors is not None:  # room for the whiskers
            low, high = low - errors[0].max(), high + errors[1].max()
        ax.set_ylim(max(0.0, low - 0.25 * (high - low + 1e-9) - 0.05 * high), high * 1.08)
    covered = f" from {results['documents']:,} documents" if "documents" in results else ""
    whiskers = ", 95 % document-bootstrap intervals" if "bootstrap" in results else ""
    fig.suptitle(f"hetgraph — {results['tokens']:,} test tokens{covered}{whiskers}", fontsize=10)
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
