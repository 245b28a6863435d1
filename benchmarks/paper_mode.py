"""Exact GNN-LM paper mode against hetgraph's default, on the embedded default.

One datastore (the demo's 60k train tokens of the embedded Python docs, read by the
embedded SmolLM2-135M, exact ``Flat`` index) is built once under ``--out`` and shared by
every arm; every arm is evaluated four ways on the same 4,096 test tokens (λ and T tuned
on the same 4,096 valid tokens) with the same training budget (the demo's steps × batch ×
context, trained from the stored keys):

* ``default``: the demo's fusion section (gated residual at the head, l = r = 1, no ``c2c``,
  2 layers × 8 heads at width 256 with FFN, hetgraph's maps, relations and features);
* ``paper``: :meth:`FusionConfig.paper() <hetgraph.FusionConfig.paper>` (the official model
  function) with the graph network shrunk to the default arm's 2 layers at width 256
  (the paper: 3 layers at the model's width, 576), which is what 2 CPU cores afford;
* ``paper_two_stage``: the same model trained in two stages as in the paper, stage 1 at
  k = 32, l = r = 1 for the first two thirds of the budget, stage 2 at ``--stage2-k``
  (128), l = r = 2 for the last third, started from stage 1 (``training.init_from``);
  evaluated at k = ``--stage2-k`` (so its kNN-LM rows use that k as well).
* ``paper_gated``: the ``paper`` arm with one difference ablated, hetgraph's gated residual
  (``fusion_mode="gated_residual"``) instead of replacing the last hidden state.

Each arm's result is written to ``<out>/arms/<arm>.json`` as soon as it is done, and a run
started again skips the arms already there (and resumes an interrupted training from its
checkpoint). The combined table goes to ``benchmarks/results/paper_mode.json`` after
every arm, so a partial run leaves a partial, honest file.

Usage: python benchmarks/paper_mode.py [--out runs/bench-paper-mode] [--threads 2]
       [--arms default paper paper_two_stage paper_gated] [--stage2-k 128]
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hetgraph.corpus import tokenize_corpus
from hetgraph.evaluation import evaluate_four_way, results_table
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.graph import GraphConfig
from hetgraph.io import atomic_write_json, read_json
from hetgraph.models.loading import load_model
from hetgraph.nn import AdapterConfig
from hetgraph.pipeline import RunConfig, prepare_datastore, set_threads
from hetgraph.training import train_adapter

RESULT = Path(__file__).parent / "results" / "paper_mode.json"
ARMS = ("default", "paper", "paper_two_stage", "paper_gated")
#: Graph-network size of the paper arms: the default arm's, not the paper's 3 × width 576.
PAPER_SIZE = {"hidden_channels": 256, "num_layers": 2}

DISCUSSION = (
    "Paper mode is the official model function (FusionConfig.paper(): replace-mode fusion at the "
    "head, causal c2c, no FFN, official maps, tied intra relation, output bias, DGL mean, stored "
    "features alone, official leakage and init), shrunk to the default arm's 2 layers at width "
    "256 and trained with the same small budget (lr, steps, batch, context) as hetgraph's "
    "default. The difference that matters most at this budget is how the graph output enters "
    "the LM: the default's gated residual h + g * out(adapter(h)) starts as the base model "
    "(g = 0) and can only move away from it as far as training pays, while replace mode starts "
    "from a random function of h (its step-0 valid perplexity is in the hundreds of thousands) "
    "and must first learn to rebuild the LM's own last hidden state through the graph network "
    "before retrieval can help. The paper affords that with ~10^5 GPU updates; 150 CPU steps do "
    "not, so paper mode stays well above the base LM here, and stage 2 of the two-stage "
    "schedule (a third of the budget at k = 128, l = r = 2) only continues that recovery. The "
    "paper_gated arm changes that one option and keeps every other official choice (c2c edges, "
    "no FFN, official maps, tied relations, DGL mean, stored features alone, official leakage "
    "and init): it lands next to hetgraph's default, so at this budget the other differences "
    "are second order and the fusion mode is what separates the two. This measures the "
    "training budget each fusion needs, not the official model's quality at convergence; the "
    "official orig_prob_ratio mixture is the paper's other way to keep the base distribution "
    "available. The same collapse of replace mode at this budget shows on a second corpus of "
    "another domain, the GCIDE dictionary (benchmarks/ablation.py, its 'paper' arm). "
    "Wall-clock seconds were measured on 2 CPU cores shared with other jobs and "
    "are not comparable across arms; the token budgets are equal.")


def _measured(combined: dict[str, Any]) -> str:
    """One sentence per finished arm: its test perplexities against the base LM's."""
    parts = []
    for name in ARMS:
        arm = combined.get(name, {})
        if "gnn" not in arm:
            parts.append(f"{name}: not run yet.")
            continue
        parts.append(
            f"{name}: GNN-LM test ppl {arm['gnn']['ppl']:.3f} vs base {arm['base']['ppl']:.3f} "
            f"(x{arm['gnn_over_base_ppl']:.3f}), GNN-LM + kNN {arm['gnn_knn']['ppl']:.3f} vs "
            f"kNN-LM {arm['knn']['ppl']:.3f} (k = {arm['evaluation_k']}), trained "
            f"{arm['training_tokens']:,} tokens in {arm['training_seconds']:.0f} s.")
    return "Measured here: " + " ".join(parts)


def _arm_settings(name: str, run: RunConfig, stage2_k: int) -> list[tuple[str, FusionConfig,
                                                                       Any]]:
    """``[(stage name, fusion, training)]`` of arm ``name`` (two stages for the two-stage arm)."""
    training = run.training
    paper = FusionConfig.paper(adapter=AdapterConfig.paper(**PAPER_SIZE))
    if name == "default":
        return [("default", run.fusion, training)]
    if name == "paper":
        return [("paper", paper, training)]
    if name == "paper_gated":  # one difference ablated: the default's fusion, all else official
        return [("paper_gated", replace(paper, fusion_mode="gated_residual"), training)]
    first = training.max_steps * 2 // 3
    stage1 = replace(training, max_steps=first)
    stage2 = replace(training, max_steps=training.max_steps - first,
                     warmup_steps=min(training.warmup_steps, training.max_steps - first))
    stage2_fusion = FusionConfig.paper(k=stage2_k, graph=GraphConfig.paper(left=2, right=2),
                                       adapter=AdapterConfig.paper(**PAPER_SIZE))
    return [("paper_stage1", paper, stage1), ("paper_stage2", stage2_fusion, stage2)]


def _run_arm(name: str, ctx: dict[str, Any], run: RunConfig, stage2_k: int) -> dict[str, Any]:
    out_dir: Path = ctx["out"]
    stages, record = _arm_settings(name, run, stage2_k), {}
    init_from = None
    lm = None
    total_seconds, total_tokens = 0.0, 0
    for stage, fusion, training in stages:
        if init_from is not None:
            training = replace(training, init_from=str(init_from))
        torch.manual_seed(training.seed)  # the adapter's initialisation is part of the run
        lm = HetGraphLM(ctx["model"], ctx["store"], ctx["index"], fusion,
                        tokenizer=ctx["tokenizer"])
        adapter_dir = out_dir / "adapters" / stage
        logging.info("arm %s: training %s in %s", name, stage, adapter_dir)
        if (adapter_dir / "training.json").is_file():  # trained before: its record is kept
            lm = HetGraphLM.from_pretrained(adapter_dir, ctx["model"], ctx["store"],
                                            ctx["index"], tokenizer=ctx["tokenizer"])
        else:
            train_adapter(lm, ctx["train"], ctx["corpus"].valid, training, adapter_dir,
                          eval_config=run.evaluation, show_progress=False)
        saved = read_json(adapter_dir / "training.json")["result"]
        tokens = training.max_steps * training.batch_size * training.context_length \
            * training.grad_accumulation
        total_seconds += saved["seconds"]
        total_tokens += tokens
        record[stage] = {
            "k": fusion.k, "left": fusion.graph.left, "right": fusion.graph.right,
            "c2c": fusion.graph.c2c, "fusion_mode": fusion.fusion_mode,
            "feed_forward": fusion.adapter.feed_forward, "num_layers": fusion.adapter.num_layers,
            "hidden_channels": fusion.adapter.hidden_channels, "heads": fusion.adapter.heads,
            "dropout": fusion.adapter.dropout, "trained_parameters": sum(
                p.numel() for p in lm.parameters() if p.requires_grad),
            "steps": saved["steps"], "training_tokens": tokens,
            "training_seconds": round(saved["seconds"], 1),
            "best_step": saved["best_step"], "best_valid_ppl": saved["best_valid_ppl"],
            "valid_ppl_by_step": saved["valid_ppl"],
        }
        init_from = adapter_dir
    evaluation = run.evaluation
    if lm.config.k != evaluation.k:  # evaluate the stage-2 model with the k it was trained at
        evaluation = replace(evaluation, k=lm.config.k, batch_size=1)
    started = time.perf_counter()
    results = evaluate_four_way(lm, ctx["corpus"].valid, ctx["corpus"].test, evaluation,
                                show_progress=False)
    print(results_table(results, title=f"arm {name}"))  # refuses non-finite results
    record["evaluation_k"] = evaluation.k
    record["training_tokens"] = total_tokens
    record["training_seconds"] = round(total_seconds, 1)
    record["evaluation_seconds"] = round(time.perf_counter() - started, 1)
    for method in ("base", "knn", "gnn", "gnn_knn"):
        record[method] = {key: results[method][key] for key in ("ppl", "acc")}
        if "lambda" in results[method]:
            record[method]["lambda"] = results[method]["lambda"]
    record["gnn_over_base_ppl"] = results["gnn"]["ppl"] / results["base"]["ppl"]
    record["test_tokens"] = results["tokens"]
    record["valid_tokens"] = results["valid_tokens"]
    return record


def _write_combined(setup: dict[str, Any], arms_dir: Path) -> dict[str, Any]:
    combined: dict[str, Any] = {"setup": setup}
    for name in ARMS:
        path = arms_dir / f"{name}.json"
        combined[name] = read_json(path) if path.is_file() else {"status": "not run yet"}
    combined["discussion"] = {"text": f"{DISCUSSION} {_measured(combined)}"}
    atomic_write_json(RESULT, combined)
    return combined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-paper-mode"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--stage2-k", type=int, default=128,
                        help="neighbours per position in stage 2 of the two-stage arm")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[paper_mode] %(message)s")

    run = RunConfig.default()
    run.index = replace(run.index, factory="Flat")  # exact search, as in the demo's size
    run.out_dir = str(args.out)
    set_threads(args.threads)
    model, tokenizer = load_model(run.model, device=torch.device("cpu"))
    corpus = tokenize_corpus(run.corpus, tokenizer, show_progress=False)
    store, index = prepare_datastore(model, tokenizer, corpus, run, args.out)
    ctx = {"out": args.out, "model": model, "tokenizer": tokenizer, "store": store,
           "index": index, "corpus": corpus, "train": corpus.train.truncate(len(store) + 1)}
    training = run.training
    setup = {
        "model": "embedded SmolLM2-135M (fp32)", "corpus": "embedded Python 3.11 docs",
        "datastore_tokens": len(store), "index": index.factory, "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU",
        "training_budget": (f"{training.max_steps} steps x {training.batch_size} x "
                            f"{training.context_length} tokens = "
                            f"{training.max_steps * training.batch_size * training.context_length}"
                            f" tokens per arm, lr {training.lr}, {training.schedule}, from the "
                            "stored keys"),
        "evaluation": (f"{run.evaluation.max_tokens - 1} test tokens, λ and T tuned on "
                       f"{run.evaluation.valid_tokens - 1} valid tokens, windows "
                       f"{run.evaluation.context_length} / stride {run.evaluation.stride}"),
        "paper_arm_deviation": ("graph network 2 layers at width 256 (paper: 3 layers at the "
                                "model width 576); training settings are the demo's, not the "
                                "official Adam lr 2e-5 / clip 0.1 for ~10^5 updates"),
    }
    arms_dir = args.out / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    for name in args.arms:
        path = arms_dir / f"{name}.json"
        if path.is_file():
            logging.info("arm %s: done before (%s), skipped", name, path)
            continue
        record = _run_arm(name, ctx, run, args.stage2_k)
        atomic_write_json(path, record)
        _write_combined(setup, arms_dir)
    print(json.dumps(_write_combined(setup, arms_dir), indent=2))


if __name__ == "__main__":
    main()
