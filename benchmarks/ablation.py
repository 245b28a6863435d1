"""Ablation of GNN-LM's choices on two real corpora, arm by arm, and a learning curve.

Corpora: the embedded Python 3.11 docs (``python``) and a sample of the GNU Collaborative
International Dictionary of English (``gcide``, ``benchmarks/data/gcide.jsonl.xz``, built by
``scripts/extract_debian_corpus.py`` from Debian's ``dict-gcide``). Each corpus has ONE
datastore of 200k train tokens under ``runs/ablation-<corpus>/datastore`` (built once and
reused), read by the embedded SmolLM2-135M. Every arm of a corpus is evaluated on the same
valid and test tokens; base LM and kNN-LM are computed once per process (λ and T of every
kNN mixture tuned on valid only) and every arm is trained with the same budget (``--steps``
× 4 × 128 tokens, from the stored keys when the arm allows it, else with full forwards).

Arms (:data:`ARMS`): fusion sites (head, top 4 layers, every 4th layer, every layer), paper
mode and its single differences from the default (replace vs gated residual, c2c, FFN),
l = r = 2, k = 128, the paper's two-stage schedule, adapter depth 3, width 576, stored
per-layer neighbour features at the top 4 layers, and the retrieval-aware gate when
:class:`~hetgraph.FusionConfig` has one.

Each arm's record goes to ``runs/ablation-<corpus>/arms/<arm>.json`` (atomic) when it is
done; a re-run skips finished arms and resumes an interrupted training from its checkpoint.
``--curve ARM …`` trains those arms for longer with checkpoints at log-spaced steps
(24 · 2^i) and records valid and test perplexity at each (resumable point by point).
After every arm the combined ``benchmarks/results/ablation.json`` and its two SVG plots are
rewritten from everything on disk (``--report-only`` only rewrites them).

Usage: python benchmarks/ablation.py --corpus python [--arms head paper ...] [--steps 48]
       [--eval-tokens 2048] [--threads 2]
       python benchmarks/ablation.py --corpus python --curve head default_c2c
       python benchmarks/ablation.py --report-only
"""
from __future__ import annotations

import argparse
import logging
import platform
import resource
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from hetgraph.corpus import CorpusConfig, tokenize_corpus
from hetgraph.evaluation import (
    collect_lm_outputs,
    default_temperatures,
    gnn_forward,
    score_knn,
    score_lm,
)
from hetgraph.evaluation.lm import NeighbourSearch
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.io import atomic_write_json, read_json
from hetgraph.knnlm import DEFAULT_LAMBDAS, tune_knn
from hetgraph.models.loading import load_model
from hetgraph.nn import AdapterConfig
from hetgraph.pipeline import RunConfig, prepare_datastore, set_threads
from hetgraph.training import train_adapter

sys.path.insert(0, str(Path(__file__).parent))
from paper_mode import PAPER_SIZE

#: Corpora: run directory, corpus file (None: embedded) and datastore settings. ``python`` is
#: the 200k-token store of the issue; ``python60k`` the demo's 60k-token store (its settings,
#: exact index) that a shared 2-core machine affords for a full sweep; ``gcide`` is the store
#: ``hetgraph datastore build --corpus benchmarks/data/gcide.jsonl.xz --max-tokens 60000``
#: builds with the CLI's defaults (the CLI check of ``cli_default`` uses the same store).
CORPORA: dict[str, dict[str, Any]] = {
    "python60k": {"out": "runs/ablation-python60k", "corpus": None, "datastore": {},
                  "index": {"factory": "Flat"}},
    "python": {"out": "runs/ablation-python", "corpus": None,
               "datastore": {"max_tokens": 200_001, "feature_layers": (26, 27, 28, 29)},
               "index": {"factory": "IVF1024,Flat", "nprobe": 32}},
    "gcide": {"out": "runs/ablation-gcide", "corpus": "benchmarks/data/gcide.jsonl.xz",
              "datastore": {"max_tokens": 60_000, "stride": 256, "batch_size": 8,
                            "context_length": 512},
              "index": {"factory": "auto"}},
}
TOP4 = (26, 27, 28, 29)
CURVE_STEPS = (24, 48, 96, 192, 384, 768)


def _graph(fusion: FusionConfig, **changes: Any) -> FusionConfig:
    return replace(fusion, graph=replace(fusion.graph, **changes))


def _adapter(fusion: FusionConfig, **changes: Any) -> FusionConfig:
    return replace(fusion, adapter=replace(fusion.adapter, **changes))


def _gate_arm(fusion: FusionConfig) -> FusionConfig | None:
    """The default with the retrieval-aware gate, when FusionConfig offers one."""
    if "gate" not in {f.name for f in fields(FusionConfig)}:
        return None
    return replace(fusion, gate="retrieval")


def arm_stages(name: str, default: FusionConfig) -> list[tuple[str, FusionConfig, float]]:
    """``[(stage, fusion, share of the budget)]`` of arm ``name`` (two stages for the
    two-stage arm); ``[]`` when the arm cannot run with this version of hetgraph."""
    paper = FusionConfig.paper(adapter=AdapterConfig.paper(**PAPER_SIZE))
    single = {
        "head": default,
        "top4": replace(default, fusion_layers=TOP4),
        "every4th": replace(default, fusion_layers=tuple(range(0, 30, 4))),
        "all": replace(default, fusion_layers=tuple(range(30))),
        "paper": paper,
        "paper_gated": replace(paper, fusion_mode="gated_residual"),
        "default_replace": replace(default, fusion_mode="replace"),
        "default_c2c": _graph(default, c2c=True),
        "default_no_ffn": _adapter(default, feed_forward=False),
        "lr2": _graph(default, left=2, right=2),
        "k128": replace(default, k=128),
        "depth3": _adapter(default, num_layers=3),
        "width576": _adapter(default, hidden_channels=576),
        "top4_stored": replace(default, fusion_layers=TOP4, neighbour_features="stored"),
        "gate": _gate_arm(default),
    }
    if name == "two_stage":
        return [("two_stage_1", default, 2 / 3),
                ("two_stage_2", _graph(replace(default, k=128), left=2, right=2), 1 / 3)]
    fusion = single[name]
    return [] if fusion is None else [(name, fusion, 1.0)]


ARMS = ("head", "paper", "default_replace", "paper_gated", "default_c2c", "default_no_ffn",
        "lr2", "k128", "two_stage", "depth3", "width576", "top4", "every4th", "top4_stored",
        "all", "gate")


def peak_rss_reset() -> None:
    """Reset this process's peak resident set (Linux ``clear_refs`` 5); ignored elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set since the last reset (``VmHWM``), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tuned_knn(valid: Any, test: Any) -> dict[str, float]:
    """kNN mixture with λ and T tuned on ``valid`` only, scored once on ``test``."""
    lam, temperature, _ = tune_knn(valid.lm_log_probs, valid.knn_distances, valid.knn_tokens,
                                   valid.targets, DEFAULT_LAMBDAS,
                                   default_temperatures(valid.knn_distances))
    valid_ppl = score_knn(valid, lam, temperature, "kNN valid")["ppl"]
    test_scores = score_knn(test, lam, temperature, "kNN")
    return {"valid_ppl": valid_ppl, "test_ppl": test_scores["ppl"], "test_acc": test_scores["acc"],
            "lambda": float(lam), "temperature": float(temperature)}


class Bench:
    """One corpus: model, corpus, datastore, index, and the base / kNN-LM outputs once."""

    def __init__(self, corpus_name: str, args: argparse.Namespace) -> None:
        spec = CORPORA[corpus_name]
        self.name, self.args, self.out = corpus_name, args, Path(spec["out"])
        run = RunConfig.default()
        run.datastore = replace(run.datastore, **spec["datastore"])
        run.index = replace(run.index, **spec["index"])
        if spec["corpus"] is not None:
            run.corpus = CorpusConfig(path=spec["corpus"])
        tokens = args.eval_tokens + 1
        run.evaluation = replace(run.evaluation, max_tokens=tokens, valid_tokens=tokens)
        run.training = replace(run.training, max_steps=args.steps, eval_every=0,
                               checkpoint_every=max(1, args.steps // 4))
        self.run = run
        set_threads(args.threads)
        self.model, self.tokenizer = load_model(run.model, device=torch.device("cpu"))
        self.corpus = tokenize_corpus(run.corpus, self.tokenizer, show_progress=False)
        self.store, self.index = prepare_datastore(self.model, self.tokenizer, self.corpus, run,
                                                   self.out)
        self.train = self.corpus.train.truncate(len(self.store) + 1)
        self.valid = self.corpus.valid.truncate(tokens)
        self.test = self.corpus.test.truncate(tokens)
        self.windows = replace(run.evaluation, max_tokens=None)
        self._base: dict[str, Any] | None = None
        training = run.training
        budget = training.max_steps * training.batch_size * training.context_length
        atomic_write_json(self.out / "setup.json", {
            "corpus": spec["corpus"] or "embedded Python 3.11 docs",
            "model": "embedded SmolLM2-135M-Instruct (fp32)",
            "datastore_rows": len(self.store), "index": self.index.factory,
            "datastore_windows": f"{run.datastore.context_length} / stride {run.datastore.stride}",
            "feature_layers": ", ".join(map(str, run.datastore.feature_layers)) or "none",
            "budget": (f"{training.max_steps} steps x {training.batch_size} x "
                       f"{training.context_length} = {budget} training tokens per arm, lr "
                       f"{training.lr}, {training.schedule}, no early stopping inside it"),
            "evaluation": (f"{args.eval_tokens} valid + {args.eval_tokens} test tokens, windows "
                           f"{run.evaluation.context_length} / stride {run.evaluation.stride}; "
                           "lambda and T tuned on valid"),
            "machine": (f"{platform.machine()}, {args.threads} torch threads, CPU only, "
                        "2 cores shared with other jobs: wall-clock is not comparable "
                        "across arms, CPU seconds are closer"),
            "resume": f"python benchmarks/ablation.py --corpus {corpus_name} --threads 1"})

    def base(self) -> dict[str, Any]:
        """Base-LM and kNN-LM outputs on valid and test (computed once, kept in memory), and
        their record written to ``<out>/base.json``."""
        if self._base is None:
            search = NeighbourSearch(self.index, self.store)
            started = time.perf_counter()
            valid = collect_lm_outputs(self.model, self.valid, self.windows, search=search,
                                       show_progress=False)
            test = collect_lm_outputs(self.model, self.test, self.windows, search=search,
                                      show_progress=False)
            seconds = time.perf_counter() - started
            record = {"valid_ppl": score_lm(valid, "base valid")["ppl"],
                      "test_ppl": score_lm(test, "base")["ppl"],
                      "test_acc": score_lm(test, "base")["acc"],
                      "knn": tuned_knn(valid, test), "valid_tokens": len(valid),
                      "test_tokens": len(test), "k": int(self.windows.k),
                      "seconds": round(seconds, 1)}
            atomic_write_json(self.out / "base.json", record)
            self._base = {"valid": valid, "test": test, "record": record}
        return self._base

    def evaluate(self, lm: HetGraphLM) -> dict[str, Any]:
        """GNN-LM and GNN-LM + kNN (λ, T tuned on valid) on the same tokens as the base."""
        base = self.base()
        forward = gnn_forward(lm)
        started = time.perf_counter()
        valid = collect_lm_outputs(self.model, self.valid, self.windows, forward=forward,
                                   neighbours_from=base["valid"], show_progress=False)
        test = collect_lm_outputs(self.model, self.test, self.windows, forward=forward,
                                  neighbours_from=base["test"], show_progress=False)
        seconds = time.perf_counter() - started
        gnn_test = score_lm(test, "GNN")
        mixed = tuned_knn(valid, test)
        record = base["record"]
        return {
            "gnn_valid_ppl": score_lm(valid, "GNN valid")["ppl"], "gnn_test_ppl": gnn_test["ppl"],
            "gnn_test_acc": gnn_test["acc"], "gnn_knn_valid_ppl": mixed["valid_ppl"],
            "gnn_knn_test_ppl": mixed["test_ppl"], "gnn_knn_lambda": mixed["lambda"],
            "gnn_knn_temperature": mixed["temperature"],
            "gnn_over_base": gnn_test["ppl"] / record["test_ppl"],
            "gnn_knn_over_knn": mixed["test_ppl"] / record["knn"]["test_ppl"],
            "gnn_knn_over_base": mixed["test_ppl"] / record["test_ppl"],
            "eval_seconds": round(seconds, 1),
        }

    def train_stage(self, stage: str, fusion: FusionConfig, steps: int,
                    init_from: Path | None) -> tuple[HetGraphLM, dict[str, Any]]:
        """Train (or resume, or reuse) one stage's adapter under ``<out>/adapters/<stage>``."""
        training = replace(self.run.training, max_steps=steps,
                           warmup_steps=min(self.run.training.warmup_steps, steps),
                           checkpoint_every=max(1, steps // 4),
                           init_from=None if init_from is None else str(init_from))
        adapter_dir = self.out / "adapters" / stage
        torch.manual_seed(training.seed)
        lm = HetGraphLM(self.model, self.store, self.index, fusion, tokenizer=self.tokenizer)
        cpu = cpu_seconds()
        if (adapter_dir / "training.json").is_file():
            lm = HetGraphLM.from_pretrained(adapter_dir, self.model, self.store, self.index,
                                            tokenizer=self.tokenizer)
        else:
            train_adapter(lm, self.train, None, training, adapter_dir, show_progress=False)
        saved = read_json(adapter_dir / "training.json")["result"]
        tokens = steps * training.batch_size * training.context_length
        return lm, {"steps": saved["steps"], "tokens": tokens, "seconds": saved["seconds"],
                    "cpu_seconds": cpu_seconds() - cpu,
                    "from_datastore": bool(lm.can_run_from_datastore),
                    "trained_parameters": sum(p.numel() for p in lm.parameters()
                                              if p.requires_grad)}

    def run_arm(self, name: str) -> dict[str, Any] | None:
        stages = arm_stages(name, self.run.fusion)
        if not stages:
            logging.info("arm %s: not available in this version of hetgraph, skipped", name)
            return None
        peak_rss_reset()
        self.base()
        lm, init_from, totals = None, None, {"tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        parts = []
        for stage, fusion, share in stages:
            steps = max(1, round(self.args.steps * share))
            logging.info("[%s] arm %s: training %s for %d steps", self.name, name, stage, steps)
            lm, done = self.train_stage(stage, fusion, steps, init_from)
            init_from = self.out / "adapters" / stage
            for key in totals:
                totals[key] += done[key]
            parts.append(done)
        logging.info("[%s] arm %s: evaluating", self.name, name)
        record = {**self.describe(lm.config), **self.evaluate(lm)}
        record.update({
            "training_tokens": totals["tokens"], "training_seconds": round(totals["seconds"], 1),
            "training_cpu_seconds": round(totals["cpu_seconds"], 1),
            "training_tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
            "from_datastore": parts[-1]["from_datastore"],
            "trained_parameters": parts[-1]["trained_parameters"],
            "peak_rss_mb": round(peak_rss_mb()),
        })
        return record

    @staticmethod
    def describe(fusion: FusionConfig) -> dict[str, Any]:
        sites = fusion.fusion_layers
        return {"sites": ", ".join(str(s) for s in sites) if len(sites) <= 8
                else f"{len(sites)} decoder layers",
                "fusion_mode": fusion.fusion_mode, "k": fusion.k, "left": fusion.graph.left,
                "right": fusion.graph.right, "c2c": fusion.graph.c2c,
                "feed_forward": fusion.adapter.feed_forward,
                "num_layers": fusion.adapter.num_layers,
                "hidden_channels": fusion.adapter.hidden_channels or 0,
                "neighbour_features": fusion.neighbour_features,
                "gate": str(getattr(fusion, "gate", "constant"))}


def run_curve(bench: Bench, name: str, max_steps: int) -> None:
    """Valid and test perplexity of arm ``name`` at log-spaced steps (24 · 2^i ≤ max_steps),
    one training run checkpointed at each; points already on disk are skipped."""
    stages = arm_stages(name, bench.run.fusion)
    if len(stages) != 1:
        logging.info("curve %s: only single-stage arms have a curve, skipped", name)
        return
    fusion = stages[0][1]
    points = [s for s in CURVE_STEPS if s <= max_steps]
    path = bench.out / "curves" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    curve = read_json(path) if path.is_file() else {}
    training = replace(bench.run.training, max_steps=points[-1], checkpoint_every=CURVE_STEPS[0])
    adapter_dir = bench.out / "curves" / name
    torch.manual_seed(training.seed)
    lm = HetGraphLM(bench.model, bench.store, bench.index, fusion, tokenizer=bench.tokenizer)
    done = 0
    for step in points:
        if str(step) in curve:
            done = step
            continue
        started = time.perf_counter()
        try:
            train_adapter(lm, bench.train, None, training, adapter_dir, show_progress=False,
                          stop_after=step - done if step < points[-1] else None)
        except KeyboardInterrupt:  # stop_after: the checkpoint at `step` is on disk
            pass
        done = step
        lm.eval()
        result = bench.evaluate(lm)
        curve[str(step)] = {
            "training_tokens": step * training.batch_size * training.context_length,
            "valid_ppl": result["gnn_valid_ppl"], "test_ppl": result["gnn_test_ppl"],
            "gnn_over_base": result["gnn_over_base"],
            "gnn_knn_test_ppl": result["gnn_knn_test_ppl"],
            "training_seconds_this_leg": round(time.perf_counter() - started, 1)}
        atomic_write_json(path, curve)
        logging.info("curve %s step %d: valid %.3f test %.3f", name, step,
                     result["gnn_valid_ppl"], result["gnn_test_ppl"])
        write_report()

RESULT = Path(__file__).parent / "results" / "ablation.json"
#: Per-arm fields shown in the results table (the arm files under runs/ keep every field).
SHOWN = ("sites", "gnn_valid_ppl", "gnn_test_ppl", "gnn_knn_valid_ppl", "gnn_knn_test_ppl",
         "gnn_over_base", "gnn_knn_over_knn", "gnn_knn_over_base", "gnn_knn_lambda",
         "training_tokens", "training_seconds", "training_cpu_seconds", "training_tokens_per_s",
         "peak_rss_mb")
DISCUSSION = (
    'What ran, and the compromise: the sweep ran on a 2-core machine shared with four other '
    "engineers' jobs (load average 12-14), where a head-only training step of 4 x 128 tokens "
    'took about 15 s of wall-clock instead of about 2 s, and a 200k-token datastore was '
    'projected at over an hour per corpus. The 200k-token builds were therefore stopped (they'
    " resume with the same command) and the arms ran on 60k-token stores instead: the demo's "
    'store of the Python docs (python60k, exact index) and the CLI-default store of the GCIDE'
    ' dictionary sample (gcide, 60k tokens, the same store as the CLI check). Every arm has '
    'the same budget, 48 steps x 4 x 128 = 24,576 training tokens, and is scored on the same '
    '2,048 valid and 2,048 test tokens of its corpus; base LM and kNN-LM are computed once '
    'per corpus; lambda and T of both kNN mixtures and the choice of the best arm use valid '
    'only. Wall-clock seconds are dominated by the other jobs; with one torch thread per run,'
    ' training CPU seconds measure the compute. What helps and what does not, at this budget:'
    " fusing at the LM-head input (hetgraph's default, trained from the stored keys) beats "
    "every other site that finished. Dropping the adapter's feed-forward blocks is as good or"
    ' marginally better (valid 4.863 vs 4.871, within noise) with 38 % fewer trained '
    'parameters and 15 % less training compute, so the FFN earns nothing here. Fusing into '
    'the top four decoder layers instead is worse (it trains four adapters with full forwards'
    ' and a backward pass through the frozen layers, 3.3x the training CPU, 2.2x the '
    'evaluation time and 1.5x the peak memory) and lands between the base and the head arm: '
    'at 24k training tokens the extra sites cost more optimisation than they add. Causal c2c '
    'edges change nothing measurable at the head (the ctx states already carry the context). '
    "The retrieval-aware gate (FusionConfig(gate='retrieval')) is worse than the static gate "
    'on both corpora at this budget (GNN/base 0.951 vs 0.933 on the Python docs, 0.955 vs '
    '0.939 on GCIDE): its sigmoid starts at one half, which halves the effective step of the '
    'residual until the gate parameters move, so it learns more slowly; it is meant for '
    "stores where retrieval has nothing to offer, and no store here had kNN-LM's tuned lambda"
    ' at 0 (the 60k GCIDE store gives lambda = 0.2), so that case was not measured. On the '
    'second corpus the default head arm reaches GNN/base 0.939 (target <= 0.95, met on this '
    '60k store with 2,048 test tokens) and GNN+kNN/kNN 0.969. Replacing the hidden state by '
    "the graph output (replace mode, the paper's fusion) is catastrophic at this budget: "
    'GNN/base 5.11 on the Python docs (default graph network) and 7.11 for the full paper '
    'mode on GCIDE, because the network starts as a random function of h and must first '
    "relearn the LM's own last state; the gated residual starts as the base model and only "
    'moves as far as training pays. The budget, not the design, is what limits the numbers: '
    'the learning curve of the head arm (one of the two best arms on valid; it was started '
    'before the others finished, and the other, no-FFN, has no curve yet) keeps falling at '
    'every log-spaced point up to 98,304 training tokens (192 steps, 1.6 passes over the 60k '
    'store): valid 5.03, 4.87, 4.66, 4.46 and test GNN/base 0.970, 0.933, 0.874, 0.819 at '
    '12k, 25k, 49k and 98k tokens, with GNN+kNN/kNN 0.925 at the last point. So GNN/base <= '
    '0.85 is reached on the 60k store with 4x the arm budget, and GNN+kNN/kNN <= 0.90 is not '
    'reached yet but is still falling; the 200k-store figures the issue asks for were not '
    'measured. The arms at 24k tokens are therefore far from converged and their differences '
    '(except replace mode) are within the noise of 2,048 test tokens; GNN+kNN stays at '
    '0.97-0.98 x kNN-LM there because an under-trained adapter mostly learns what kNN-LM '
    "already adds (both use the same neighbours' next tokens). The arms that did not finish "
    'are listed per corpus with the command that resumes them. The CLI check with default '
    'settings on GCIDE (60k-token store, 150 steps, 4,096 test tokens) gives GNN/base 0.873 '
    "and GNN+kNN/kNN 0.938 with kNN-LM's lambda tuned to 0.2; the 200k-token CLI check was "
    'not run (its build alone was projected at well over an hour on the shared machine).'
)


def _read_dir(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        return {}
    return {p.stem: read_json(p) for p in sorted(directory.glob("*.json"))}


def _corpus_table(corpus: str) -> dict[str, Any]:
    out = Path(CORPORA[corpus]["out"])
    table: dict[str, Any] = {}
    if (out / "base.json").is_file():
        base = read_json(out / "base.json")
        knn = base["knn"]
        table["base LM"] = {"valid_ppl": base["valid_ppl"], "test_ppl": base["test_ppl"],
                            "test_tokens": base["test_tokens"],
                            "valid_tokens": base["valid_tokens"]}
        table["kNN-LM"] = {"valid_ppl": knn["valid_ppl"], "test_ppl": knn["test_ppl"],
                           "over_base": knn["test_ppl"] / base["test_ppl"],
                           "lambda": knn["lambda"], "temperature": knn["temperature"],
                           "k": base["k"]}
    arms = _read_dir(out / "arms")
    for name in ARMS:
        if name in arms:
            row = table[name] = {key: arms[name][key] for key in SHOWN if key in arms[name]}
            # One torch thread per run, so CPU seconds are the compute a step took, while
            # wall-clock on the shared machine also counts the other jobs' time.
            row["training_tokens_per_cpu_s"] = (arms[name]["training_tokens"]
                                                / max(arms[name]["training_cpu_seconds"], 1e-9))
    missing = [name for name in ARMS if name not in arms]
    if missing:
        table["not run yet"] = {"arms": ", ".join(missing),
                                "resume": f"python benchmarks/ablation.py --corpus {corpus} "
                                          f"--threads 1 --arms {' '.join(missing)}"}
    return table


def _best(table: dict[str, Any]) -> str | None:
    arms = [n for n, row in table.items() if "gnn_valid_ppl" in row]
    return min(arms, key=lambda n: table[n]["gnn_valid_ppl"]) if arms else None


def _targets(tables: dict[str, dict[str, Any]], cli: dict[str, Any]) -> dict[str, Any]:
    """The issue's target ratios, from the arm chosen on valid (and the CLI runs)."""
    targets: dict[str, Any] = {}
    gcide = tables.get("gcide", {})
    for corpus in ("python", "python60k"):
        table = tables.get(corpus, {})
        best = _best(table)
        if best is None:
            continue
        row = table[best]
        targets[f"{corpus}: arm chosen on valid"] = best
        targets[f"{corpus}: GNN+kNN / kNN (target <= 0.90 at 200k)"] = row["gnn_knn_over_knn"]
        targets[f"{corpus}: GNN / base (target <= 0.85 at 200k)"] = row["gnn_over_base"]
        targets[f"{corpus}: lowest GNN+kNN / kNN of any arm (test, not a selection)"] = min(
            r["gnn_knn_over_knn"] for r in table.values() if "gnn_knn_over_knn" in r)
    best = _best(gcide)
    if best is not None:
        targets["gcide: arm chosen on valid"] = best
        targets["gcide: GNN / base (target <= 0.95)"] = gcide[best]["gnn_over_base"]
        targets["gcide: GNN+kNN / kNN"] = gcide[best]["gnn_knn_over_knn"]
    for name, row in cli.items():
        targets[f"cli {name}: GNN / base (target <= 0.95)"] = row.get("gnn_over_base")
        if row.get("knn_lambda") == 0:
            targets[f"cli {name}: kNN lambda = 0, GNN / base (target <= 1.000)"] = row.get(
                "gnn_over_base")
    return targets


def _cli_default() -> dict[str, Any]:
    """``hetgraph eval --split test --json`` results of the CLI check on gcide."""
    cli = {}
    for path in sorted(Path(CORPORA["gcide"]["out"], "cli").glob("eval-*.json")):
        data = read_json(path)
        cli[f"gcide {path.stem[5:]}"] = {
            "commands": ("hetgraph datastore build --corpus benchmarks/data/gcide.jsonl.xz "
                         "--max-tokens 60000; hetgraph train; hetgraph eval --split test "
                         "(defaults; --threads 1)"),
            "test_tokens": data.get("tokens"), "valid_tokens": data.get("valid_tokens"),
            "base_ppl": data["base"]["ppl"], "knn_ppl": data["knn"]["ppl"],
            "gnn_ppl": data["gnn"]["ppl"], "gnn_knn_ppl": data["gnn_knn"]["ppl"],
            "gnn_over_base": data["gnn"]["ppl"] / data["base"]["ppl"],
            "gnn_knn_over_knn": data["gnn_knn"]["ppl"] / data["knn"]["ppl"],
            "knn_lambda": data["knn"]["lambda"], "gnn_knn_lambda": data["gnn_knn"]["lambda"]}
    return cli


def _plots(tables: dict[str, dict[str, Any]], curves: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {c: t for c, t in tables.items() if any("gnn_over_base" in r for r in t.values())}
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.5), squeeze=False)
    for ax, (corpus, table) in zip(axes[0], shown.items(), strict=True):
        names = [n for n in ARMS if "gnn_over_base" in table.get(n, {})]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [table[n]["gnn_over_base"] for n in names], 0.4,
               label="GNN-LM / base")
        ax.bar([x + 0.2 for x in xs], [table[n]["gnn_knn_over_knn"] for n in names], 0.4,
               label="GNN-LM + kNN / kNN-LM")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0.6, 1.3)
        ax.set_title(f"{corpus}: test perplexity ratios (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULT.with_name("ablation_arms.svg"), metadata={"Date": None})
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        steps = sorted(points, key=int)
        tokens = [points[s]["training_tokens"] for s in steps]
        ax.plot(tokens, [points[s]["valid_ppl"] for s in steps], "o-", label=f"{name} valid")
        ax.plot(tokens, [points[s]["test_ppl"] for s in steps], "s--", label=f"{name} test")
    for corpus in {name.split()[0] for name in curves}:
        base = tables.get(corpus, {}).get("base LM")
        if base:
            ax.axhline(base["test_ppl"], color="grey", lw=0.8, label=f"{corpus} base LM test")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("GNN-LM perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULT.with_name("ablation_learning_curve.svg"), metadata={"Date": None})
    plt.close(fig)


def _measured(tables: dict[str, dict[str, Any]], targets: dict[str, Any]) -> str:
    parts = []
    for corpus, table in tables.items():
        best = _best(table)
        if "base LM" in table and best is not None:
            parts.append(f"{corpus}: base {table['base LM']['test_ppl']:.3f}, kNN-LM "
                         f"{table['kNN-LM']['test_ppl']:.3f} (lambda "
                         f"{table['kNN-LM']['lambda']:.2f}); best arm on valid {best}: GNN-LM "
                         f"{table[best]['gnn_test_ppl']:.3f} (x{table[best]['gnn_over_base']:.3f}"
                         f" base), GNN-LM + kNN {table[best]['gnn_knn_test_ppl']:.3f} "
                         f"(x{table[best]['gnn_knn_over_knn']:.3f} kNN-LM).")
    parts += [f"{key}: {value:.3f}." if isinstance(value, float) else f"{key}: {value}."
              for key, value in targets.items()]
    return " ".join(parts)


def write_report() -> dict[str, Any]:
    """Rewrite ``benchmarks/results/ablation.json`` and its plots from the run directories."""
    tables = {corpus: _corpus_table(corpus) for corpus in CORPORA}
    curves = {f"{corpus} {name}": points for corpus in CORPORA
              for name, points in _read_dir(Path(CORPORA[corpus]["out"]) / "curves").items()}
    cli = _cli_default()
    targets = _targets(tables, cli)
    setup = {corpus: read_json(Path(spec["out"]) / "setup.json") for corpus, spec in CORPORA.items()
             if (Path(spec["out"]) / "setup.json").is_file()}
    report = {"setup": setup, **tables, "learning_curve": curves, "cli_default": cli,
              "targets": targets,
              "discussion": f"{DISCUSSION} Measured here: {_measured(tables, targets)}",
              "plots": [
                  {"file": "ablation_learning_curve.svg", "caption": (
                      "GNN-LM valid and test perplexity against training tokens (log scale) "
                      "for the arms chosen on valid (corpus and arm in the legend).")},
                  {"file": "ablation_arms.svg", "caption": (
                      "Test perplexity of GNN-LM over the base LM and of GNN-LM + kNN over "
                      "kNN-LM, per arm, on both corpora, at the equal training budget.")}]}
    _plots(tables, curves)
    atomic_write_json(RESULT, report)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="python")
    parser.add_argument("--arms", nargs="*", choices=ARMS, default=None,
                        help="arms to run, in this order (default: all)")
    parser.add_argument("--steps", type=int, default=48,
                        help="training budget per arm in steps of 4 x 128 tokens")
    parser.add_argument("--eval-tokens", type=int, default=2048,
                        help="valid and test tokens scored per arm")
    parser.add_argument("--curve", nargs="*", choices=ARMS, default=None,
                        help="learning curve of these arms instead of the arms")
    parser.add_argument("--curve-steps", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[ablation] %(asctime)s %(message)s")
    if args.report_only:
        write_report()
        return
    bench = Bench(args.corpus, args)
    arms_dir = bench.out / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    if args.curve is not None:
        for name in args.curve:
            run_curve(bench, name, args.curve_steps)
        write_report()
        return
    for name in args.arms if args.arms is not None else ARMS:
        path = arms_dir / f"{name}.json"
        if path.is_file():
            logging.info("[%s] arm %s: done before (%s), skipped", args.corpus, name, path)
            continue
        record = bench.run_arm(name)
        if record is None:
            continue
        record["machine"] = f"{platform.machine()}, {args.threads} threads, CPU"
        atomic_write_json(path, record)
        logging.info("[%s] arm %s: %s", args.corpus, name, record)
        write_report()
    write_report()


if __name__ == "__main__":
    main()
