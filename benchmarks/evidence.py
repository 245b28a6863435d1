"""The evidence protocol: does retrieval through the graph beat an equally large adapter
without retrieval? (``benchmarks/results/evidence.json``)

For each corpus — the embedded Python docs and GCIDE (another domain) — on SmolLM2-135M,
with the demo's settings (60k-token datastore, graph adapter at the head, 150 steps of
4 × 128 tokens in bfloat16 autocast where the CPU has it), and for each seed:

- ``graph``: the graph adapter on retrieved neighbours (GNN-LM, GNN-LM + kNN);
- ``random``: the same adapter, training and budget on random neighbours
  (``hetgraph train --neighbours random``): removes the retrieval;
- ``lora``: a PEFT LoRA with the graph adapter's trained parameters (within 10 %), the same
  tokens and schedule (``hetgraph train --control lora``): removes the graph, and with
  kNN-LM mixed in (``lora_knn``) is the baseline GNN-LM + kNN must beat.

All are scored by ``hetgraph eval`` on one document-stratified sample of ``--test-tokens``
test tokens spread over every test document (λ and T tuned on a sample of the valid split),
with 95 % intervals from a bootstrap over documents and paired intervals on every ratio;
per-token files are kept (under ``runs/``), so any comparison can be recomputed; the adapter
on retrieved neighbours and the one on random neighbours are compared paired from them
(:func:`hetgraph.evaluation.per_token.paired_ratio`). Seeds change the adapters'
initialisation and training order, not the sample. Training cost is recorded as wall and
CPU seconds (the CLI processes' user + system time). Everything goes through the command line
and resumes: a finished step (datastore, adapter, evaluation JSON) is reused, an interrupted
one resumes, so the whole protocol can run in the background over several sessions; each
finished corpus and seed is kept in ``benchmarks/results/evidence/<corpus>-s<seed>.json``
(in the repository), which a later run reuses instead of training that seed again.

    python benchmarks/evidence.py [--corpora python gcide] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hetgraph.evaluation.intervals import BootstrapSpec
from hetgraph.evaluation.per_token import paired_ratio, read_per_token
from hetgraph.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "evidence.json"
PLOT = RESULT.with_suffix(".svg")
#: One JSON per corpus and seed (both evaluations, costs, paired ratios), kept in git.
SEED_RECORDS = ROOT / "benchmarks" / "results" / "evidence"
CORPORA = {"python": None, "gcide": "benchmarks/data/gcide.jsonl.xz"}
#: The rows a reader compares, and what each isolates.
KEY_RATIOS = {
    "gnn/base": "GNN-LM over the base model (retrieval + domain adaptation)",
    "gnn/lora": "GNN-LM over an equally large adapter without a graph (the retrieval's share)",
    "gnn_knn/lora_knn": "GNN-LM + kNN over LoRA + kNN (the baseline to beat)",
    "gnn_knn/knn": "GNN-LM + kNN over kNN-LM",
    "knn/base": "kNN-LM over the base model",
}


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children (the CLI runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def hetgraph(*argv: Any, log: Path) -> None:
    """Run one ``hetgraph`` command (appending its output to ``log``); fail loudly."""
    command = [sys.executable, "-m", "hetgraph", *map(str, argv)]
    with open(log, "a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        started = time.perf_counter()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        out.write(f"# exit {code} after {time.perf_counter() - started:.0f} s\n")
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}; see {log}")


def run_corpus(name: str, seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    out = ROOT / "runs" / f"evidence-{name}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    corpus = ["--corpus", CORPORA[name]] if CORPORA[name] else []
    common = [*corpus, "--threads", str(args.threads)]
    datastore = out / "datastore"
    records = {seed: SEED_RECORDS / f"{name}-s{seed}.json" for seed in seeds}
    needed = any(not record.is_file() for record in records.values())
    if needed and not (datastore / "index" / "index.json").is_file():
        hetgraph(
            "datastore",
            "build",
            *common,
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
    runs: dict[str, Any] = {}
    SEED_RECORDS.mkdir(parents=True, exist_ok=True)
    for seed, record in records.items():
        if not record.is_file():  # kept in the repository: a new work tree skips the seed
            atomic_write_json(
                record, run_seed(seed, out, [*common, "--datastore", datastore], args, log)
            )
    # The summary covers every seed measured so far, not only the ones asked for this time.
    for record in sorted(SEED_RECORDS.glob(f"{name}-s*.json")):
        runs[record.stem.rsplit("-s", 1)[1]] = json.loads(record.read_text())
    return summarise(runs)


def run_seed(
    seed: int, out: Path, common: list[Any], args: argparse.Namespace, log: Path
) -> dict[str, Any]:
    """Train the three arms of one seed, evaluate them on the shared sample, and return both
    evaluations, the training costs, and the paired retrieved / random ratios."""
    config = ROOT / "hetgraph" / "configs" / "demo.json"
    arms = {
        "graph": out / f"graph-s{seed}",
        "random": out / f"random-s{seed}",
        "lora": out / f"lora-s{seed}",
    }
    extra = {"graph": [], "random": ["--neighbours", "random"], "lora": ["--control", "lora"]}
    for arm, directory in arms.items():
        if not (directory / "training.json").is_file():
            started, cpu = time.perf_counter(), children_cpu_seconds()
            hetgraph(
                "train",
                *common,
                "--config",
                config,
                "--out",
                directory,
                "--seed",
                seed,
                *extra[arm],
                log=log,
            )
            atomic_write_json(
                directory / "cost.json",
                {
                    "wall_seconds": round(time.perf_counter() - started, 1),
                    "cpu_seconds": round(children_cpu_seconds() - cpu, 1),
                },
            )
    evaluations = {
        "graph": ["--adapter", arms["graph"], "--control", arms["lora"]],
        "random": ["--adapter", arms["random"]],
    }
    for arm, options in evaluations.items():
        target = out / f"eval-{arm}-s{seed}.json"
        if not target.is_file():
            hetgraph(
                "eval",
                *common,
                "--config",
                config,
                *options,
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
    run = {arm: json.loads((out / f"eval-{arm}-s{seed}.json").read_text()) for arm in evaluations}
    for arm, directory in arms.items():
        cost = directory / "cost.json"
        run[f"{arm}_train_cost"] = json.loads(cost.read_text()) if cost.is_file() else None
    graph = read_per_token(out / f"eval-graph-s{seed}.safetensors")
    random = read_per_token(out / f"eval-random-s{seed}.safetensors")
    spec = BootstrapSpec(**{k: run["graph"]["bootstrap"][k] for k in ("resamples", "seed")})
    run["paired"] = {}
    for key in ("gnn", "gnn_knn"):  # retrieved vs random neighbours: two runs, same tokens
        ratio = paired_ratio(graph, key, random, key, spec)
        run["paired"][f"{key}/{key}_random"] = {"ratio": ratio.ratio, "ci95": list(ratio.ci95)}
    return run


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """Per figure: each seed's value and interval, and the mean and spread over seeds."""
    rows: dict[str, Any] = {}
    for seed, run in runs.items():
        graph, random = run["graph"], run["random"]
        figures = {m: graph[m] for m in ("base", "knn", "gnn", "gnn_knn", "lora", "lora_knn")}
        figures["gnn_random"], figures["gnn_knn_random"] = random["gnn"], random["gnn_knn"]
        ratios = {**graph["ratios"], **run["paired"]}
        for name, value in {**figures, **ratios}.items():
            rows.setdefault(name, {"seeds": {}})["seeds"][seed] = value
        rows.setdefault("_setup", {"seeds": {}})["seeds"][seed] = {
            "tokens": graph["tokens"],
            "documents": graph["documents"],
            "valid_tokens": graph["valid_tokens"],
            "bootstrap": graph["bootstrap"],
            "train_cost": {arm: run[f"{arm}_train_cost"] for arm in ("graph", "random", "lora")},
        }
    for name, row in rows.items():
        if name == "_setup":
            continue
        values = [v["ppl"] if "ppl" in v else v["ratio"] for v in row["seeds"].values()]
        row["mean"] = statistics.fmean(values)
        row["spread"] = [min(values), max(values)]
    return rows


#: The ratios drawn, top to bottom: the controls first, then the comparisons with baselines.
PLOTTED = {
    "gnn/gnn_random": "GNN-LM / random neighbours",
    "gnn_knn/gnn_knn_random": "GNN-LM+kNN / random+kNN",
    "gnn/lora": "GNN-LM / LoRA",
    "gnn_knn/lora_knn": "GNN-LM+kNN / LoRA+kNN",
    "gnn_knn/knn": "GNN-LM+kNN / kNN-LM",
    "gnn/base": "GNN-LM / base",
    "knn/base": "kNN-LM / base",
}
PLOT_CAPTION = (
    "Test-perplexity ratios per corpus: each seed's ratio (dot) with its 95 % paired "
    "document-bootstrap interval (bar); left of the dashed line the first method is better. "
    "An interval that crosses 1 is no detectable difference."
)


def plot(corpora: dict[str, Any]) -> None:
    """``evidence.svg``: the key ratios with every seed's paired interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(corpora), figsize=(5.2 * len(corpora), 3.6), sharey=True, squeeze=False
    )
    labels = list(PLOTTED.values())
    for ax, (corpus, rows) in zip(axes[0], corpora.items(), strict=True):
        for y, key in enumerate(PLOTTED):
            seeds = rows.get(key, {}).get("seeds", {})
            for offset, value in enumerate(seeds.values()):
                low, high = value["ci95"]
                ax.errorbar(
                    value["ratio"],
                    y + 0.15 * (offset - (len(seeds) - 1) / 2),
                    xerr=[[value["ratio"] - low], [high - value["ratio"]]],
                    fmt="o",
                    color=f"C{offset}",
                    markersize=4,
                    capsize=2,
                )
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
        seeds = ", ".join(sorted(rows.get("base", {}).get("seeds", {}))) or "-"
        ax.set_title(f"{corpus} (seeds {seeds})", fontsize=10)
        ax.set_xlabel("ratio of test perplexities")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(PLOT)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", choices=tuple(CORPORA), default=list(CORPORA))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--test-tokens", type=int, default=16384)
    parser.add_argument("--valid-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result: dict[str, Any] = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    result["protocol"] = {
        "test_tokens": args.test_tokens,
        "valid_tokens": args.valid_tokens,
        "sample": "document-stratified over every test document (seed 0)",
        "intervals": "95 %, bootstrap over test documents, paired for ratios",
        "arms": ["graph (retrieved)", "random neighbours", "LoRA (matched parameters)"],
        "settings": "hetgraph/configs/demo.json (head adapter, 150 steps x 4 x 128 tokens)",
        "key_ratios": KEY_RATIOS,
    }
    for name in args.corpora:
        result.setdefault("corpora", {})[name] = run_corpus(name, args.seeds, args)
        plot(result["corpora"])
        result["plots"] = [{"file": PLOT.name, "caption": PLOT_CAPTION}]
        atomic_write_json(RESULT, result)  # after each corpus
    print(
        json.dumps(
            {
                c: {k: r.get(k, {}).get("mean") for k in KEY_RATIOS}
                for c, r in result.get("corpora", {}).items()
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
