"""The report of :mod:`ablation` (``benchmarks/ablation.py``): what it covers (:data:`CORPORA`,
:data:`ARMS`) and :func:`write_report`, which rewrites ``benchmarks/results/ablation.json`` and
its two SVG plots from the run directories the benchmark wrote."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hetgraph.io import atomic_write_json, read_json

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

ARMS = ("head", "paper", "default_replace", "paper_gated", "default_c2c", "default_no_ffn",
        "lr2", "k128", "two_stage", "depth3", "width576", "top4", "every4th", "top4_stored",
        "all", "gate")


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


def _curve_targets(tables: dict[str, dict[str, Any]], curves: dict[str, Any]) -> dict[str, Any]:
    """The 200k-store targets along the learning curves: the longest-trained point (the
    budget the curve reached) and the point chosen on valid."""
    targets: dict[str, Any] = {}
    for name, points in curves.items():
        corpus = name.split()[0]
        table = tables.get(corpus, {})
        if "kNN-LM" not in table or not points:
            continue
        knn, base = table["kNN-LM"]["test_ppl"], table["base LM"]["test_ppl"]
        last = points[max(points, key=int)]
        chosen = min(points.values(), key=lambda p: p["valid_ppl"])
        for label, point in (("longest", last), ("chosen on valid", chosen)):
            tokens = point["training_tokens"]
            targets[f"{name} curve, {label} ({tokens:,} training tokens): GNN / base"] = (
                point["test_ppl"] / base)
            targets[f"{name} curve, {label} ({tokens:,} training tokens): GNN+kNN / kNN"] = (
                point["gnn_knn_test_ppl"] / knn)
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


CROSS_CORPUS = Path("runs/cross-corpus")


def _cross_corpus() -> dict[str, Any]:
    """``hetgraph eval --allow-other-corpus`` of python60k adapters on GCIDE text: a store
    with little to offer the text, the case where kNN-LM tunes lambda towards 0."""
    rows = {}
    for path in sorted(CROSS_CORPUS.glob("*.json")):
        data = read_json(path)
        rows[f"python60k store + {path.stem} adapter, GCIDE test text"] = {
            "command": ("hetgraph eval --corpus benchmarks/data/gcide.jsonl.xz --datastore "
                        "runs/ablation-python60k/datastore --adapter "
                        f"runs/ablation-python60k/adapters/{path.stem} --allow-other-corpus "
                        "--split test --max-tokens 4096 --tune-tokens 4096"),
            "test_tokens": data.get("tokens"), "base_ppl": data["base"]["ppl"],
            "knn_ppl": data["knn"]["ppl"], "knn_lambda": data["knn"]["lambda"],
            "gnn_ppl": data["gnn"]["ppl"], "gnn_knn_ppl": data["gnn_knn"]["ppl"],
            "gnn_over_base": data["gnn"]["ppl"] / data["base"]["ppl"],
            "knn_over_base": data["knn"]["ppl"] / data["base"]["ppl"],
            "gnn_knn_over_knn": data["gnn_knn"]["ppl"] / data["knn"]["ppl"]}
    return rows


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
    cross = _cross_corpus()
    targets = _targets(tables, cli)
    targets.update(_curve_targets(tables, curves))
    for name, row in cross.items():
        targets[f"{name}: kNN lambda {row['knn_lambda']:.2f}, GNN / base (target <= 1.000 "
                f"where lambda = 0)"] = row["gnn_over_base"]
    setup = {corpus: read_json(Path(spec["out"]) / "setup.json") for corpus, spec in CORPORA.items()
             if (Path(spec["out"]) / "setup.json").is_file()}
    report = {"setup": setup, **tables, "learning_curve": curves, "cli_default": cli,
              "retrieval_offers_little": cross,
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
