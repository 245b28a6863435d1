"""Exact GNN-LM paper mode at the paper's own size, measured with the evidence protocol
(``benchmarks/results/paper_mode.json``).

``hetgraph train --preset paper`` is :meth:`FusionConfig.paper() <hetgraph.FusionConfig.paper>`,
the official model function: the graph network's ``ctx`` output replaces the last hidden
state before the LM head, 3 HGT layers × 8 heads at the model's own width (576 for
SmolLM2-135M), no FFN, dropout 0.3 / 0.1, causal ``c2c``, k = 32, l = r = 1. At that width the
official projection rule (``hgt.py``: an input map only when the input width differs from the
hidden width, an output map only when the hidden width differs from the output width) adds
neither projection, so each layer is ``LayerNorm(h + dropout(W_o m))`` with small initial
weights. Its step-0 valid perplexity is reported next to the base model's on the same valid
tokens (it is not close: see :data:`DISCUSSION`).

Optimisation is official-like: Adam β = (0.9, 0.98), clip-norm 0.1, no weight decay
(fairseq's default), inverse-square-root schedule after a linear warm-up of a tenth of the
steps (the official 2,000 warm-up updates are for ~10⁵ updates), and the learning rate chosen
on valid from a small grid around the official 2e-5 (``--lrs``). The budget is the demo's
(150 steps × 4 × 128 tokens from the stored keys), the same as hetgraph's default adapter in
``benchmarks/evidence.py``: the comparison is at equal tokens, not at convergence.

Everything runs through the CLI on the evidence protocol's Python datastore
(``runs/evidence-python/datastore``, built by ``benchmarks/evidence.py`` or here with the same
command), and the chosen learning rate's adapter is scored by ``hetgraph eval`` on the same
document-stratified 16,384 test tokens as the evidence arms (λ and T tuned on valid), with
document-bootstrap intervals. Where the evidence run's per-token file of seed 0 exists, paper
mode is compared with hetgraph's default adapter *paired* on the same tokens.

Each step resumes: a trained adapter or a finished evaluation is reused.

    python benchmarks/paper_mode.py [--lrs 2e-5 5e-5 1e-4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from evidence import ROOT, children_cpu_seconds, hetgraph

from hetgraph.evaluation.intervals import BootstrapSpec
from hetgraph.evaluation.per_token import paired_ratio, read_per_token
from hetgraph.io import atomic_write_json, read_json

RESULT = ROOT / "benchmarks" / "results" / "paper_mode.json"
EVIDENCE = ROOT / "runs" / "evidence-python"
OUT = ROOT / "runs" / "paper-mode"
#: The official optimisation, scaled to the demo's budget (see the module docstring).
PAPER_TRAINING = {
    "betas": [0.9, 0.98],
    "clip_norm": 0.1,
    "weight_decay": 0.0,
    "schedule": "inverse_sqrt",
    "warmup_steps": 15,
    "eval_every": 25,
    "patience": 0,
}

DISCUSSION = (
    "Paper mode here is the official model at its own size: 3 HGT layers at the model's width "
    "(576), so the official projection rule adds no input or output map and each layer is "
    "LayerNorm(h + dropout(W_o m)); it replaces the last hidden state before the LM head. "
    "The earlier 2 x 256 arm of this benchmark and of the ablation collapsed (step-0 valid "
    "perplexity about 1.2 million, test 30.9 against the base model's 9.45) for another "
    "reason than the one given then: at width 256 the official rule inserts a random "
    "Linear + GELU before the graph network and a random Linear after it, which cut the "
    "straight path from h to the LM head. That arm is renamed paper_2x256 in the ablation; "
    "it measures those projections, not paper mode. At the paper's size the network does not "
    "start close to the base model either: measured, its step-0 valid perplexity is several "
    "times the base model's (base_valid_ppl below: the default adapter's step 0, whose zero "
    "gates make it exactly the base model, on the same valid tokens), because replace mode "
    "sends the last hidden state through three post-LayerNorm layers (SmolLM2's head input "
    "follows an RMSNorm whose gain a LayerNorm re-normalises) with attention messages that "
    "are not zero at initialisation. At this budget it recovers only part of the way, so "
    "paper mode stays well above the base model; that is the official model at 76,800 "
    "training tokens, not at convergence."
)


def paper_config(out: Path) -> Path:
    """The demo's run config with the official-like training section (written to ``out``)."""
    config = read_json(ROOT / "hetgraph" / "configs" / "demo.json")
    config["training"].update(PAPER_TRAINING)
    path = out / "paper_training.json"
    atomic_write_json(path, config)
    return path


def trained_record(directory: Path) -> tuple[dict[str, Any], bool] | None:
    """``(result, finished)`` of a training: ``training.json`` when it finished, else the
    last checkpoint's (a grid point stopped for budget), else ``None``."""
    if (directory / "training.json").is_file():
        return read_json(directory / "training.json")["result"], True
    state = directory / "checkpoint" / "trainer_state.json"
    return (read_json(state)["result"], False) if state.is_file() else None


def train_grid(
    lrs: list[float], common: list[Any], config: Path, log: Path, *, train: bool
) -> dict[str, Any]:
    """Train one paper-mode adapter per learning rate (unless ``train`` is false: then only
    what is on disk is read); their valid curves and costs."""
    grid = {}
    for lr in lrs:
        directory = OUT / f"paper-lr{lr:g}"
        if train and not (directory / "training.json").is_file():
            cpu = children_cpu_seconds()
            hetgraph(
                "train",
                *common,
                "--config",
                config,
                "--preset",
                "paper",
                "--lr",
                lr,
                "--out",
                directory,
                log=log,
            )
            atomic_write_json(
                directory / "cost.json", {"cpu_seconds": round(children_cpu_seconds() - cpu, 1)}
            )
        record = trained_record(directory)
        if record is None:
            continue
        result, finished = record
        curve = {int(step): ppl for step, ppl in result["valid_ppl"].items()}
        grid[f"{lr:g}"] = {
            "lr": lr,
            "directory": str(directory.relative_to(ROOT)),
            "finished": finished,
            "steps": result["steps"],
            "step0_valid_ppl": curve.get(0),
            "valid_ppl_by_step": curve,
            "best_step": result["best_step"],
            "best_valid_ppl": result["best_valid_ppl"],
            "training_seconds": round(result["seconds"], 1),  # the trainer's own wall clock
            "cost": read_json(directory / "cost.json")
            if (directory / "cost.json").is_file()
            else None,
        }
    return grid


def choose_lr(grid: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The grid point with the lowest valid perplexity at the last step every point reached
    (points stopped early for budget are compared where they stopped), and that step."""
    step = min(max(arm["valid_ppl_by_step"]) for arm in grid.values())
    chosen = min(
        grid.values(),
        key=lambda arm: (
            arm["valid_ppl_by_step"].get(step, math.inf)
            if math.isfinite(arm["valid_ppl_by_step"].get(step, math.inf))
            else math.inf
        ),
    )
    return chosen, step


def base_valid_ppl() -> float | None:
    """The base model's valid perplexity on the training's valid tokens: step 0 of the
    evidence run's default adapter (its gates start at zero, so it is the base model)."""
    path = EVIDENCE / "graph-s0" / "training.json"
    return read_json(path)["result"]["valid_ppl"].get("0") if path.is_file() else None


def compare_with_default(paper_file: Path, bootstrap: dict[str, Any]) -> dict[str, Any]:
    """Paired ratios against the evidence run's default adapter (seed 0), if it is there."""
    default_file = EVIDENCE / "eval-graph-s0.safetensors"
    if not default_file.is_file():
        return {
            "status": f"{default_file.relative_to(ROOT)} not found: run "
            "benchmarks/evidence.py --corpora python --seeds 0 first"
        }
    paper, default = read_per_token(paper_file), read_per_token(default_file)
    spec = BootstrapSpec(resamples=bootstrap["resamples"], seed=bootstrap["seed"])
    ratios = {}
    for ours, theirs in (("gnn", "gnn"), ("gnn_knn", "gnn_knn"), ("gnn", "base")):
        ratio = paired_ratio(paper, ours, default, theirs, spec)
        ratios[f"paper_{ours}/default_{theirs}"] = {"ratio": ratio.ratio, "ci95": list(ratio.ci95)}
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 5e-5, 1e-4])
    parser.add_argument("--test-tokens", type=int, default=16384)
    parser.add_argument("--valid-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-train",
        action="store_true",
        help="train nothing: report the grid points on disk (one stopped "
        "for budget is compared at the step it reached)",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "commands.log"
    datastore = EVIDENCE / "datastore"
    common = ["--threads", args.threads, "--datastore", datastore]
    if not (datastore / "index" / "index.json").is_file():  # the evidence protocol's store
        hetgraph(
            "datastore",
            "build",
            "--threads",
            args.threads,
            "--out",
            datastore,
            "--max-tokens",
            60000,
            "--context-length",
            512,
            "--stride",
            384,
            log=log,
        )
    config = paper_config(OUT)
    grid = train_grid(args.lrs, common, config, log, train=not args.no_train)
    chosen, compared_at = choose_lr(grid)
    if not chosen["finished"]:
        raise SystemExit(
            f"the chosen lr {chosen['lr']:g} has not finished training; run "
            "again without --no-train"
        )
    target = OUT / f"eval-paper-lr{chosen['lr']:g}.json"
    if not target.is_file():
        hetgraph(
            "eval",
            *common,
            "--config",
            config,
            "--adapter",
            ROOT / chosen["directory"],
            "--max-tokens",
            args.test_tokens,
            "--tune-tokens",
            args.valid_tokens,
            "--json",
            target,
            "--per-token",
            target.with_suffix(".safetensors"),
            log=log,
        )
    test = json.loads(target.read_text())
    result = {
        "setup": {
            "model": "embedded SmolLM2-135M",
            "corpus": "embedded Python docs",
            "datastore": "the evidence protocol's (60k train tokens)",
            "preset": "paper: 3 layers x 8 heads at the model width 576, replace mode",
            "training": {
                **PAPER_TRAINING,
                "steps": 150,
                "batch": "4 x 128 tokens",
                "tokens": 150 * 4 * 128,
                "lr_grid": args.lrs,
                "chosen_on": "valid perplexity at the last step every grid point reached",
            },
            "evaluation": {
                "test_tokens": test["tokens"],
                "documents": test["documents"],
                "sample": test["sample"],
                "bootstrap": test["bootstrap"],
            },
        },
        "base_valid_ppl": base_valid_ppl(),
        "lr_grid": grid,
        "chosen_lr": chosen["lr"],
        "lr_compared_at_step": compared_at,
        "test": {m: test[m] for m in ("base", "knn", "gnn", "gnn_knn")},
        "test_ratios": test["ratios"],
        "paired_with_default": compare_with_default(
            target.with_suffix(".safetensors"), test["bootstrap"]
        ),
        "discussion": DISCUSSION,
    }
    atomic_write_json(RESULT, result)
    print(
        json.dumps(
            {k: result[k] for k in ("chosen_lr", "test_ratios", "paired_with_default")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
