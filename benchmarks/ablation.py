"""Ablation of GNN-LM's choices on two real corpora, arm by arm, and a learning curve.

Corpora (:data:`ablation_report.CORPORA`): the embedded Python 3.11 docs, with the 200k-token
store of the issue (``python``) and the demo's 60k-token store (``python60k``), and a sample of
the GNU Collaborative International Dictionary of English (``gcide``, 60k tokens,
``benchmarks/data/gcide.jsonl.xz``, built by ``scripts/extract_debian_corpus.py`` from
Debian's ``dict-gcide``). Each has ONE datastore under ``runs/ablation-<corpus>/datastore``
(built once and reused), read by the embedded SmolLM2-135M. Every arm of a corpus is
evaluated on the same valid and test tokens; base LM and kNN-LM are computed once per process
(λ and T of every kNN mixture tuned on valid only) and every arm is trained with the same
budget (``--steps`` × 4 × 128 tokens, from the stored keys when the arm allows it, else with
full forwards).

Arms (:data:`ARMS`): fusion sites (head, top 4 layers, every 4th layer, every layer), the
official network shrunk to 2 × 256 (``paper_2x256``; not paper mode, whose own size is
measured by ``benchmarks/paper_mode.py``) and single differences from the default (replace
vs gated residual, c2c, FFN),
l = r = 2, k = 128, the paper's two-stage schedule, adapter depth 3, width 576, stored
per-layer neighbour features at the top 4 layers, the retrieval-aware gate when
:class:`~hetgraph.FusionConfig` has one, and the head and every 4th layer trained in bfloat16
mixed precision (:data:`TRAINING_ARMS`; every other arm trains in float32).

Each arm's record goes to ``runs/ablation-<corpus>/arms/<arm>.json`` (atomic) when it is
done; a re-run skips finished arms and resumes an interrupted training from its checkpoint.
``--curve ARM …`` trains those arms for longer with checkpoints at log-spaced steps
(24 · 2^i) and records valid and test perplexity at each (resumable point by point).
After every arm the combined ``benchmarks/results/ablation.json`` and its two SVG plots are
rewritten from everything on disk (``--report-only`` only rewrites them). ``--generate ARM …``
times greedy ``generate`` (KV cache on) with those trained adapters against the base model.

Usage: python benchmarks/ablation.py --corpus python [--arms head paper_2x256 ...] [--steps 48]
       [--eval-tokens 2048] [--threads 2]
       python benchmarks/ablation.py --corpus python --curve head default_c2c
       python benchmarks/ablation.py --corpus python60k --generate head every4th all
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
from ablation_report import ARMS, CORPORA, write_report
from gnnlm import PROMPTS as GENERATE_PROMPTS, generate_seconds

TOP4 = (26, 27, 28, 29)
#: The official network shrunk to 2 layers at width 256 (arms paper_2x256*): NOT paper mode —
#: at a width other than the model's, the official rule adds random input and output maps.
PAPER_2X256 = {"hidden_channels": 256, "num_layers": 2}
#: Arms that differ from another arm in their training settings only: the same fusion
#: configuration trained in bfloat16 mixed precision (every other arm trains in float32).
TRAINING_ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "head_bf16": ("head", {"mixed_precision": "bf16"}),
    "every4th_bf16": ("every4th", {"mixed_precision": "bf16"}),
}
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
    paper = FusionConfig.paper(adapter=AdapterConfig.paper(**PAPER_2X256))
    single = {
        "head": default,
        "top4": replace(default, fusion_layers=TOP4),
        "every4th": replace(default, fusion_layers=tuple(range(0, 30, 4))),
        # Without checkpointing the 30 sites' activations passed 20 GB (OOM-killed here).
        "all": replace(default, fusion_layers=tuple(range(30)), gradient_checkpointing=True),
        "paper_2x256": paper,
        "paper_2x256_gated": replace(paper, fusion_mode="gated_residual"),
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
        return [
            ("two_stage_1", default, 2 / 3),
            ("two_stage_2", _graph(replace(default, k=128), left=2, right=2), 1 / 3),
        ]
    fusion = single[TRAINING_ARMS[name][0] if name in TRAINING_ARMS else name]
    return [] if fusion is None else [(name, fusion, 1.0)]


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
    lam, temperature, _ = tune_knn(
        valid.lm_log_probs,
        valid.knn_distances,
        valid.knn_tokens,
        valid.targets,
        DEFAULT_LAMBDAS,
        default_temperatures(valid.knn_distances),
    )
    valid_ppl = score_knn(valid, lam, temperature, "kNN valid")["ppl"]
    test_scores = score_knn(test, lam, temperature, "kNN")
    return {
        "valid_ppl": valid_ppl,
        "test_ppl": test_scores["ppl"],
        "test_acc": test_scores["acc"],
        "lambda": float(lam),
        "temperature": float(temperature),
    }


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
        # float32 unless an arm says otherwise (TRAINING_ARMS), as the arms were measured
        run.training = replace(
            run.training,
            max_steps=args.steps,
            eval_every=0,
            checkpoint_every=max(1, args.steps // 4),
            mixed_precision="no",
        )
        self.run = run
        set_threads(args.threads)
        self.model, self.tokenizer = load_model(run.model, device=torch.device("cpu"))
        self.corpus = tokenize_corpus(run.corpus, self.tokenizer, show_progress=False)
        self.store, self.index = prepare_datastore(
            self.model, self.tokenizer, self.corpus, run, self.out
        )
        self.train = self.corpus.train.truncate(len(self.store) + 1)
        self.valid = self.corpus.valid.truncate(tokens)
        self.test = self.corpus.test.truncate(tokens)
        self.windows = replace(run.evaluation, max_tokens=None)
        self._base: dict[str, Any] | None = None
        training = run.training
        budget = training.max_steps * training.batch_size * training.context_length
        atomic_write_json(
            self.out / "setup.json",
            {
                "corpus": spec["corpus"] or "embedded Python 3.11 docs",
                "model": "embedded SmolLM2-135M-Instruct (fp32)",
                "datastore_rows": len(self.store),
                "index": self.index.factory,
                "datastore_windows": (
                    f"{run.datastore.context_length} / stride {run.datastore.stride}"
                ),
                "feature_layers": ", ".join(map(str, run.datastore.feature_layers)) or "none",
                "budget": (
                    f"{training.max_steps} steps x {training.batch_size} x "
                    f"{training.context_length} = {budget} training tokens per arm, lr "
                    f"{training.lr}, {training.schedule}, no early stopping inside it"
                ),
                "evaluation": (
                    f"{args.eval_tokens} valid + {args.eval_tokens} test tokens, windows "
                    f"{run.evaluation.context_length} / stride {run.evaluation.stride}; "
                    "lambda and T tuned on valid"
                ),
                "machine": (
                    f"{platform.machine()}, {args.threads} torch threads, CPU only, "
                    "2 cores shared with other jobs: wall-clock is not comparable "
                    "across arms, CPU seconds are closer"
                ),
                "resume": f"python benchmarks/ablation.py --corpus {corpus_name} --threads 1",
            },
        )

    def base(self) -> dict[str, Any]:
        """Base-LM and kNN-LM outputs on valid and test (computed once, kept in memory), and
        their record written to ``<out>/base.json``."""
        if self._base is None:
            search = NeighbourSearch(self.index, self.store)
            started = time.perf_counter()
            valid = collect_lm_outputs(
                self.model, self.valid, self.windows, search=search, show_progress=False
            )
            test = collect_lm_outputs(
                self.model, self.test, self.windows, search=search, show_progress=False
            )
            seconds = time.perf_counter() - started
            record = {
                "valid_ppl": score_lm(valid, "base valid")["ppl"],
                "test_ppl": score_lm(test, "base")["ppl"],
                "test_acc": score_lm(test, "base")["acc"],
                "knn": tuned_knn(valid, test),
                "valid_tokens": len(valid),
                "test_tokens": len(test),
                "k": int(self.windows.k),
                "seconds": round(seconds, 1),
            }
            atomic_write_json(self.out / "base.json", record)
            self._base = {"valid": valid, "test": test, "record": record}
        return self._base

    def evaluate(self, lm: HetGraphLM) -> dict[str, Any]:
        """GNN-LM and GNN-LM + kNN (λ, T tuned on valid) on the same tokens as the base."""
        base = self.base()
        forward = gnn_forward(lm)
        started = time.perf_counter()
        valid = collect_lm_outputs(
            self.model,
            self.valid,
            self.windows,
            forward=forward,
            neighbours_from=base["valid"],
            show_progress=False,
        )
        test = collect_lm_outputs(
            self.model,
            self.test,
            self.windows,
            forward=forward,
            neighbours_from=base["test"],
            show_progress=False,
        )
        seconds = time.perf_counter() - started
        gnn_test = score_lm(test, "GNN")
        mixed = tuned_knn(valid, test)
        record = base["record"]
        return {
            "gnn_valid_ppl": score_lm(valid, "GNN valid")["ppl"],
            "gnn_test_ppl": gnn_test["ppl"],
            "gnn_test_acc": gnn_test["acc"],
            "gnn_knn_valid_ppl": mixed["valid_ppl"],
            "gnn_knn_test_ppl": mixed["test_ppl"],
            "gnn_knn_lambda": mixed["lambda"],
            "gnn_knn_temperature": mixed["temperature"],
            "gnn_over_base": gnn_test["ppl"] / record["test_ppl"],
            "gnn_knn_over_knn": mixed["test_ppl"] / record["knn"]["test_ppl"],
            "gnn_knn_over_base": mixed["test_ppl"] / record["test_ppl"],
            "eval_seconds": round(seconds, 1),
        }

    def train_stage(
        self, stage: str, fusion: FusionConfig, steps: int, init_from: Path | None
    ) -> tuple[HetGraphLM, dict[str, Any]]:
        """Train (or resume, or reuse) one stage's adapter under ``<out>/adapters/<stage>``."""
        changes = TRAINING_ARMS.get(stage, ("", {}))[1]
        training = replace(
            self.run.training,
            **changes,
            max_steps=steps,
            warmup_steps=min(self.run.training.warmup_steps, steps),
            checkpoint_every=max(1, steps // 4),
            init_from=None if init_from is None else str(init_from),
        )
        adapter_dir = self.out / "adapters" / stage
        torch.manual_seed(training.seed)
        lm = HetGraphLM(self.model, self.store, self.index, fusion, tokenizer=self.tokenizer)
        cpu = cpu_seconds()
        if (adapter_dir / "training.json").is_file():
            lm = HetGraphLM.from_pretrained(
                adapter_dir, self.model, self.store, self.index, tokenizer=self.tokenizer
            )
        else:
            train_adapter(lm, self.train, None, training, adapter_dir, show_progress=False)
        saved = read_json(adapter_dir / "training.json")["result"]
        tokens = steps * training.batch_size * training.context_length
        return lm, {
            "steps": saved["steps"],
            "tokens": tokens,
            "seconds": saved["seconds"],
            "cpu_seconds": cpu_seconds() - cpu,
            "from_datastore": bool(lm.engine.can_run_from_datastore),
            "trained_parameters": sum(p.numel() for p in lm.parameters() if p.requires_grad),
        }

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
        record.update(
            {
                "training_tokens": totals["tokens"],
                "training_seconds": round(totals["seconds"], 1),
                "training_cpu_seconds": round(totals["cpu_seconds"], 1),
                "training_tokens_per_s": totals["tokens"] / max(totals["seconds"], 1e-9),
                "from_datastore": parts[-1]["from_datastore"],
                "trained_parameters": parts[-1]["trained_parameters"],
                "peak_rss_mb": round(peak_rss_mb()),
            }
        )
        return record

    @staticmethod
    def describe(fusion: FusionConfig) -> dict[str, Any]:
        sites = fusion.fusion_layers
        return {
            "sites": ", ".join(str(s) for s in sites)
            if len(sites) <= 8
            else f"{len(sites)} decoder layers",
            "fusion_mode": fusion.fusion_mode,
            "k": fusion.k,
            "left": fusion.graph.left,
            "right": fusion.graph.right,
            "c2c": fusion.graph.c2c,
            "feed_forward": fusion.adapter.feed_forward,
            "num_layers": fusion.adapter.num_layers,
            "hidden_channels": fusion.adapter.hidden_channels or 0,
            "neighbour_features": fusion.neighbour_features,
            "gradient_checkpointing": fusion.gradient_checkpointing,
            "gate": str(getattr(fusion, "gate", "constant")),
        }


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
            train_adapter(
                lm,
                bench.train,
                None,
                training,
                adapter_dir,
                show_progress=False,
                stop_after=step - done if step < points[-1] else None,
            )
        except KeyboardInterrupt:  # stop_after: the checkpoint at `step` is on disk
            pass
        done = step
        lm.eval()
        result = bench.evaluate(lm)
        curve[str(step)] = {
            "training_tokens": step * training.batch_size * training.context_length,
            "valid_ppl": result["gnn_valid_ppl"],
            "test_ppl": result["gnn_test_ppl"],
            "gnn_over_base": result["gnn_over_base"],
            "gnn_knn_test_ppl": result["gnn_knn_test_ppl"],
            "training_seconds_this_leg": round(time.perf_counter() - started, 1),
        }
        atomic_write_json(path, curve)
        logging.info(
            "curve %s step %d: valid %.3f test %.3f",
            name,
            step,
            result["gnn_valid_ppl"],
            result["gnn_test_ppl"],
        )
        write_report()


def run_generate(bench: Bench, names: list[str], new_tokens: int = 24, rounds: int = 2) -> None:
    """Greedy ``generate`` tokens/s of the trained arms ``names`` against the base model
    (``gnnlm.py``'s prompts and timing), interleaved over ``rounds`` rounds (best of each),
    into ``<out>/generate.json``."""
    lms = {"base LM": bench.model}
    for name in names:
        adapter_dir = bench.out / "adapters" / name
        if not (adapter_dir / "training.json").is_file():
            logging.info("generate %s: no trained adapter in %s, skipped", name, adapter_dir)
            continue
        lms[name] = HetGraphLM.from_pretrained(
            adapter_dir, bench.model, bench.store, bench.index, tokenizer=bench.tokenizer
        ).eval()
    device = next(bench.model.parameters()).device
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, lm in lms.items():
            seconds, produced = generate_seconds(lm.generate, bench.tokenizer, new_tokens, device)
            best[name] = max(best.get(name, 0.0), produced / seconds)
    record = {
        name: {"tokens_per_s": tps, "over_base": tps / best["base LM"]}
        for name, tps in best.items()
    }
    record["setup"] = {
        "prompts": len(GENERATE_PROMPTS),
        "new_tokens": new_tokens,
        "rounds": rounds,
        "threads": bench.args.threads,
        "kv_cache": True,
        "greedy": True,
    }
    atomic_write_json(bench.out / "generate.json", record)
    logging.info("generate: %s", record)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="python")
    parser.add_argument(
        "--arms",
        nargs="*",
        choices=ARMS,
        default=None,
        help="arms to run, in this order (default: all)",
    )
    parser.add_argument(
        "--steps", type=int, default=48, help="training budget per arm in steps of 4 x 128 tokens"
    )
    parser.add_argument(
        "--eval-tokens", type=int, default=2048, help="valid and test tokens scored per arm"
    )
    parser.add_argument(
        "--curve",
        nargs="*",
        choices=ARMS,
        default=None,
        help="learning curve of these arms instead of the arms",
    )
    parser.add_argument("--curve-steps", type=int, default=384)
    parser.add_argument(
        "--generate",
        nargs="*",
        choices=ARMS,
        default=None,
        help="greedy generate tokens/s of these trained arms vs the base model",
    )
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
    if args.generate is not None:
        run_generate(bench, args.generate)
        write_report()
        return
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
