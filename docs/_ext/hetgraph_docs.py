"""Build-time pages of the hetgraph docs (a local Sphinx extension).

At ``builder-inited`` it writes

* ``_generated/api_members.rst``: one autodoc entry per name in ``hetgraph.__all__``,
  grouped by the stage package that defines it (so a new public name appears without
  editing the docs);
* ``_generated/results_body.rst``: tables of ``benchmarks/results/*.json`` (every file that
  exists; the known benchmarks that have not produced a file are listed as "not run yet");
  a top-level ``"discussion"`` (a string, or ``{"text": …}``) is shown as a paragraph and a
  top-level ``"plots"`` (``[{"file": "name.svg", "caption": "…"}]``, files next to the JSON)
  as figures, copied into ``_generated/``;
* ``_generated/evidence_body.rst``: the headline table of ``benchmarks/results/evidence.json``
  (the evidence protocol: each key figure's mean over seeds, its spread and the first
  seed's 95 % interval), or a note that it has not run yet;
* ``figures/context_graph.svg`` when missing (``figures/make_graph_figure.py``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
RESULTS = ROOT / "benchmarks" / "results"

#: Benchmarks whose results the results page reports: file stem -> (title, script).
BENCHMARKS = {
    "evidence": ("Evidence protocol: retrieval against its controls", "benchmarks/evidence.py"),
    "knnlm": ("kNN-LM on the embedded default", "benchmarks/knnlm.py"),
    "graph_layer": ("Graph construction and the attention layer", "benchmarks/graph_layer.py"),
    "gnnlm": ("GNN-LM four-way evaluation", "benchmarks/gnnlm.py"),
    "features": (
        "Neighbour features of a fused decoder layer: stored vs projected key",
        "benchmarks/features.py",
    ),
    "paper_mode": ("Exact GNN-LM paper mode vs hetgraph's default", "benchmarks/paper_mode.py"),
    "paper_norm_init": (
        "Paper mode's step 0 with norm_init='keys' (our option)",
        "benchmarks/paper_norm_init.py",
    ),
    "ablation": (
        "Ablation: fusion sites, paper mode, graph and adapter choices, learning curve",
        "benchmarks/ablation.py",
    ),
    "scaling": (
        "Scaling: index size, on-disk lists, distributed build and training",
        "benchmarks/scaling.py",
    ),
    "eval_speed": (
        "GNN-LM evaluation speed with one retrieval per position",
        "benchmarks/eval_speed.py",
    ),
    "eval_memory": (
        "Resident memory of evaluation against the datastore's size",
        "benchmarks/eval_memory.py",
    ),
    "encoder_curve": (
        "Relation encoder: learning curve, encoded vs raw keys (kNN-LM on held-out rows)",
        "benchmarks/encoder_curve.py",
    ),
    "kg_linking": (
        "Knowledge graph: entity-linking throughput against the base forward",
        "benchmarks/kg_linking.py",
    ),
    "kg_evidence": (
        "Knowledge graph: GCIDE + WordNet against GNN-LM without it (paired, seed 0)",
        "benchmarks/kg_evidence.py",
    ),
    "kg_cloze": (
        "Knowledge graph: a WordNet cloze probe (held-out triples as prompts)",
        "benchmarks/kg_cloze.py",
    ),
}

#: Benchmarks measured under the evidence protocol, with a section of their own on the page.
DEDICATED = (
    "evidence",
    "paper_mode",
    "paper_norm_init",
    "encoder_curve",
    "kg_linking",
    "kg_evidence",
    "kg_cloze",
)
#: Benchmarks of learned retrieval and the knowledge graph, in their own section.
RETRIEVAL_AND_KNOWLEDGE = ("encoder_curve", "kg_evidence", "kg_cloze", "kg_linking")

STAGES = [
    ("Configuration", "hetgraph.configuration"),
    ("Errors", "hetgraph.errors"),
    ("Corpus", "hetgraph.corpus"),
    ("Models", "hetgraph.models"),
    ("Datastore", "hetgraph.datastore"),
    ("Index", "hetgraph.index"),
    ("Relation encoder", "hetgraph.encoder"),
    ("kNN-LM", "hetgraph.knnlm"),
    ("Graph", "hetgraph.graph"),
    ("Graph network", "hetgraph.nn"),
    ("Fusion", "hetgraph.fusion"),
    ("Training", "hetgraph.training"),
    ("Knowledge graph", "hetgraph.kg"),
    ("Evaluation", "hetgraph.evaluation"),
    ("Inspection", "hetgraph.inspection"),
    ("Integrity", "hetgraph.verify"),
    ("Locks", "hetgraph.locking"),
    ("Pipeline", "hetgraph.pipeline"),
]


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _title(text: str, char: str) -> str:
    return f"{text}\n{char * len(text)}\n\n"


def api_members() -> str:
    import inspect

    import hetgraph

    exports: dict[str, str] = dict(hetgraph._EXPORTS)  # name -> defining module
    out = []
    for title, package in STAGES:
        names = [n for n, m in exports.items() if m == package or m.startswith(package + ".")]
        if not names:
            continue
        out.append(_title(title, "-"))
        out.append(f"Defined in :mod:`{package}`.\n\n")
        for name in names:
            obj = getattr(hetgraph, name)
            if inspect.isclass(obj):
                directive = "autoexception" if issubclass(obj, BaseException) else "autoclass"
                out.append(f".. {directive}:: hetgraph.{name}\n\n")
            elif callable(obj):
                out.append(f".. autofunction:: hetgraph.{name}\n\n")
            else:
                value = repr(obj)
                if isinstance(obj, Path):  # no build machine's absolute path in the docs
                    relative = obj.relative_to(Path(hetgraph.__file__).parent)
                    value = f"<site-packages>/hetgraph/{relative}"
                out.append(f".. py:data:: {name}\n   :module: hetgraph\n   :value: {value}\n\n")
                doc = _data_doc(exports[name], name)
                if doc:
                    out.append(f"   {doc}\n\n")
    missing = set(exports) - {
        n for _, p in STAGES for n, m in exports.items() if m == p or m.startswith(p + ".")
    }
    if missing:
        raise RuntimeError(
            f"public names of no documented stage: {sorted(missing)}; add the stage to STAGES"
        )
    return "".join(out)


def _data_doc(module: str, name: str) -> str:
    """The ``#:`` comment above a module-level constant (Sphinx's own convention)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    lines = Path(spec.origin).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith((f"{name} ", f"{name}:")):
            doc = []
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#:"):
                doc.insert(0, lines[j].lstrip()[2:].strip())
                j -= 1
            return " ".join(doc)
    return ""


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        rows = []
        for key, value in data.items():
            rows.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    return [(prefix, data)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "/").replace("\n", " ")


def _table(rows: list[tuple[str, Any]]) -> str:
    if not rows:  # an empty section: a list-table needs at least one row
        return "(empty)\n\n"
    out = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 60 40",
        "",
        "   * - key",
        "     - value",
    ]
    for key, value in rows:
        out += [f"   * - ``{key}``", f"     - {_fmt(value) or '–'}"]
    return "\n".join(out) + "\n\n"


def _figures(plots: Any) -> str:
    """``.. figure::`` blocks for a results file's plots (files beside it in ``RESULTS``)."""
    out = []
    for plot in plots if isinstance(plots, list) else []:
        name = plot.get("file") if isinstance(plot, dict) else None
        source = RESULTS / str(name)
        if not name or not source.is_file():
            out.append(f"(plot ``{name}`` is missing; re-run the benchmark)\n\n")
            continue
        target = DOCS / "_generated" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        out.append(
            f".. figure:: /_generated/{source.name}\n   :width: 90%\n\n"
            f"   {plot.get('caption', '')}\n\n"
        )
    return "".join(out)


def results_body() -> str:
    out = []
    found = sorted(RESULTS.glob("*.json")) if RESULTS.is_dir() else []
    stems = [p.stem for p in found]
    order = [s for s in BENCHMARKS if s in stems] + [s for s in stems if s not in BENCHMARKS]
    order = [s for s in order if s not in DEDICATED]
    for stem in order:
        path = RESULTS / f"{stem}.json"
        title, script = BENCHMARKS.get(stem, (stem, None))
        out.append(_title(title, "-"))
        out.append(
            f"From ``benchmarks/results/{stem}.json``"
            + (f" (``{script}``)" if script else "")
            + ".\n\n"
        )
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            out.append(f"Could not read this file: ``{error}``.\n\n")
            continue
        discussion = data.pop("discussion", None) if isinstance(data, dict) else None
        if isinstance(discussion, dict):
            discussion = discussion.get("text")
        if isinstance(discussion, str):  # prose, not a one-cell table
            # One paragraph, wrapped: docutils refuses a line over 10,000 characters.
            out.append(
                textwrap.fill(discussion, 100, break_long_words=False, break_on_hyphens=False)
                + "\n\n"
            )
        plots = data.pop("plots", None) if isinstance(data, dict) else None
        out.append(_figures(plots))
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            for section, values in data.items():
                out.append(_title(str(section), "~"))
                out.append(_table(_flatten(values)))
        else:
            out.append(_table(_flatten(data if isinstance(data, dict) else {"value": data})))
    missing = [s for s in BENCHMARKS if s not in stems and s not in DEDICATED]
    if missing:
        out.append(_title("Not run yet", "-"))
        for stem in missing:
            title, script = BENCHMARKS[stem]
            out.append(
                f"* **{title}** (``benchmarks/results/{stem}.json``): not run yet; "
                f"run ``.venv/bin/python {script}`` (or ``make bench``).\n"
            )
        out.append("\n")
    return "".join(out)


#: Rows of the headline table: (key in evidence.json, label).
EVIDENCE_ROWS = [
    ("base", "base LM"),
    ("knn", "kNN-LM"),
    ("lora", "LoRA (control)"),
    ("lora_knn", "LoRA + kNN"),
    ("gnn_random", "GNN-LM, random neighbours (control)"),
    ("gnn", "GNN-LM"),
    ("gnn_knn", "GNN-LM + kNN"),
    ("gnn_knn_random", "GNN-LM + kNN, random neighbours (control)"),
    ("gnn/base", "ratio GNN-LM / base LM"),
    ("knn/base", "ratio kNN-LM / base LM"),
    ("gnn/lora", "ratio GNN-LM / LoRA"),
    ("gnn_knn/lora_knn", "ratio GNN-LM + kNN / LoRA + kNN"),
    ("gnn/gnn_random", "ratio GNN-LM / random neighbours"),
    ("gnn_knn/gnn_knn_random", "ratio GNN-LM + kNN / random neighbours + kNN"),
    ("gnn_knn/knn", "ratio GNN-LM + kNN / kNN-LM"),
]


def _interval(value: Any) -> str:
    bounds = value.get("ppl_ci95") or value.get("ci95") if isinstance(value, dict) else None
    return f"{bounds[0]:.3f}–{bounds[1]:.3f}" if bounds else "–"


def evidence_body() -> str:
    """The headline table: per corpus, each key figure's mean over seeds, spread, and the
    first seed's interval."""
    path = RESULTS / "evidence.json"
    if not path.is_file():
        return (
            "The evidence benchmark has not produced ``benchmarks/results/evidence.json`` "
            "yet; run ``.venv/bin/python benchmarks/evidence.py`` (it resumes).\n\n"
        )
    data = json.loads(path.read_text())
    out = [_figures(data.get("plots"))]
    for corpus, rows in data.get("corpora", {}).items():
        setup = next(iter(rows.get("_setup", {}).get("seeds", {}).values()), {})
        seeds = sorted(rows.get("base", {}).get("seeds", {}))
        out.append(
            _title(
                f"{corpus}: {setup.get('tokens', '?')} test tokens from "
                f"{setup.get('documents', '?')} documents, seeds "
                f"{', '.join(seeds) or '–'}",
                "~",
            )
        )
        out += [
            ".. list-table::",
            "   :header-rows: 1",
            "",
            "   * - figure",
            "     - mean over seeds",
            "     - spread over seeds",
            f"     - 95 % interval (seed {seeds[0] if seeds else '–'})",
        ]
        for key, label in EVIDENCE_ROWS:
            row = rows.get(key)
            if not row:
                continue
            first = row["seeds"][seeds[0]] if seeds else {}
            out += [
                f"   * - {label}",
                f"     - {row['mean']:.3f}",
                f"     - {row['spread'][0]:.3f}–{row['spread'][1]:.3f}",
                f"     - {_interval(first)}",
            ]
        out.append("")
    return "\n".join(out) + "\n"


def _list_table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:  # a list-table needs a body: a results file of another layout shows none
        return []
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        out += [f"   * - {row[0]}", *(f"     - {cell}" for cell in row[1:])]
    return [*out, ""]


def paper_mode_body() -> str:
    """Paper mode at its own size: the learning-rate grid (step-0 and best valid perplexity)
    and the chosen rate's test figures with intervals, paired against the default adapter."""
    path = RESULTS / "paper_mode.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if "lr_grid" not in data:
        return (
            "Not measured under the protocol yet: run ``.venv/bin/python "
            "benchmarks/paper_mode.py`` (it resumes).\n\n"
        )
    out = [textwrap.fill(data.get("discussion", ""), 100, break_long_words=False), ""]
    step = data.get("lr_compared_at_step")
    rows = [
        [
            f"{arm['lr']:g}",
            f"{arm['steps']}" + ("" if arm["finished"] else " (stopped)"),
            f"{arm['step0_valid_ppl']:.3f}",
            f"{arm['valid_ppl_by_step'].get(str(step), float('nan')):.3f}",
            f"{arm['best_valid_ppl']:.3f} (step {arm['best_step']})",
        ]
        for arm in data["lr_grid"].values()
    ]
    out += _list_table(
        [
            "lr",
            "steps trained",
            "valid ppl at step 0",
            f"valid ppl at step {step}",
            "best valid ppl",
        ],
        rows,
    )
    if data.get("base_valid_ppl"):
        out += [
            f"The base model's valid perplexity on the same valid tokens: "
            f"{data['base_valid_ppl']:.3f}.",
            "",
        ]
    test = data["test"]
    setup = data["setup"]["evaluation"]
    out.append(
        f"Test, lr {data['chosen_lr']:g} (chosen on valid): {setup['test_tokens']} tokens "
        f"from {setup['documents']} documents."
    )
    out.append("")
    rows = [
        [label, f"{test[key]['ppl']:.3f}", _interval(test[key])]
        for key, label in (
            ("base", "base LM"),
            ("knn", "kNN-LM"),
            ("gnn", "paper mode"),
            ("gnn_knn", "paper mode + kNN"),
        )
    ]
    ratios = {
        key: data["test_ratios"][key]
        for key in ("gnn/base", "knn/base", "gnn_knn/knn")
        if key in data["test_ratios"]
    }
    for key, value in {**ratios, **data.get("paired_with_default", {})}.items():
        if isinstance(value, dict) and "ratio" in value:
            rows.append([f"ratio {key}", f"{value['ratio']:.3f}", _interval(value)])
    out += _list_table(["figure", "value", "95 % interval"], rows)
    return "\n".join(out + _norm_init_section()) + "\n"


def _norm_init_section() -> list[str]:
    """Paper mode's step 0 with ``AdapterConfig.norm_init="keys"`` (paper_norm_init.json)."""
    path = RESULTS / "paper_norm_init.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    out = [
        "",
        "Paper mode's start with ``adapter.norm_init=\"keys\"`` (our option, not the paper's; "
        "``benchmarks/paper_norm_init.py``, untrained adapters):",
        "",
    ]
    rows = [[arm, f"{ppl:.3f}"] for arm, ppl in data["valid_ppl"].items()]
    out += _list_table(["valid perplexity at step 0", "value"], rows)
    out += [textwrap.fill(data.get("discussion", ""), 100, break_long_words=False), ""]
    return out


def _encoder_curve_rows(data: dict[str, Any]) -> list[str]:
    rows = [
        [
            name,
            str(arm["steps"]),
            f"{arm['last_loss']:.3f}",
            f"{arm['encoded']['recall@1']:.3f}",
            f"{arm['encoded']['knn_ppl']:.3f}",
            f"{arm['knn_ppl_encoded_over_raw']:.3f}",
        ]
        for name, arm in data.get("arms", {}).items()
    ]
    head = ["arm", "steps", "loss", "recall@1", "kNN-LM ppl (encoded)", "encoded / raw"]
    return _list_table(head, rows)


#: The comparisons of ``kg_evidence.json`` and the token subsets, as the table names them.
_KG_COMPARISONS = {
    "with_kg/without": "WordNet / none",
    "with_kg/shuffled_kg": "WordNet / shuffled",
    "shuffled_kg/without": "shuffled / none",
    "kg_only/without": "WordNet alone / GNN-LM",
    "kg_only/lora": "WordNet alone / LoRA",
    "kg_only/base": "WordNet alone / base LM",
}
_KG_SUBSETS = {
    "all_tokens": "all tokens",
    "fact_tokens": "facts visible",
    "mention_tokens": "in a mention",
}


def _kg_evidence_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    for name, label in _KG_COMPARISONS.items():
        for subset, tokens in _KG_SUBSETS.items():
            for method, row in data.get("comparisons", {}).get(name, {}).get(subset, {}).items():
                ratio = row["ratio"]
                rows.append(
                    [
                        f"{label}: {method}, {tokens}",
                        f"{row['ppl_a']:.3f}",
                        f"{row['ppl_b']:.3f}",
                        f"{ratio['ratio']:.3f}",
                        _interval(ratio),
                    ]
                )
    head = ["comparison: method, tokens", "ppl (first)", "ppl (second)", "ratio", "95 % interval"]
    return _list_table(head, rows)


def _kg_cloze_rows(data: dict[str, Any]) -> list[str]:
    def cell(metric: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
        low, high = (scale * x for x in metric["ci95"])
        return f"{scale * metric['value']:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"

    rows = [
        [
            name,
            cell(arm["top1"], 100),
            cell(arm["top10"], 100),
            cell(arm["mean_log_prob"], digits=3),
            f"{arm['median_rank']:.0f}",
        ]
        for name, arm in data.get("arms", {}).items()
    ]
    head = ["arm", "top-1 %", "top-10 %", "mean log-prob", "median rank"]
    out = _list_table(head, rows)
    pairs = [
        [
            name,
            cell(pair["top10_diff"], 100),
            cell(pair["mean_log_prob_diff"], digits=3),
            "; ".join(v.split(", ", 1)[-1] for v in pair.get("verdict", [])),
        ]
        for name, pair in data.get("pairs", {}).items()
    ]
    out += _list_table(["pair", "Δ top-10 (points)", "Δ mean log-prob", "verdict"], pairs)
    return out


def retrieval_and_knowledge_body() -> str:
    """Learned retrieval and the knowledge graph: each file's discussion and key table."""
    out = []
    tables = {
        "encoder_curve": _encoder_curve_rows,
        "kg_evidence": _kg_evidence_rows,
        "kg_cloze": _kg_cloze_rows,
    }
    for stem in RETRIEVAL_AND_KNOWLEDGE:
        title, script = BENCHMARKS[stem]
        out += [_title(title, "~"), f"From ``benchmarks/results/{stem}.json`` (``{script}``).", ""]
        path = RESULTS / f"{stem}.json"
        if not path.is_file():
            out += [f"Not run yet: ``.venv/bin/python {script}``.", ""]
            continue
        data = json.loads(path.read_text())
        text = str(data.get("discussion", ""))
        out += [textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False), ""]
        if stem in tables:
            out += tables[stem](data)
    return "\n".join(out) + "\n"


def generate(app: Any) -> None:
    generated = DOCS / "_generated"
    _write_if_changed(generated / "api_members.rst", api_members())
    _write_if_changed(generated / "evidence_body.rst", evidence_body())
    _write_if_changed(generated / "paper_mode_body.rst", paper_mode_body())
    _write_if_changed(generated / "results_body.rst", results_body())
    _write_if_changed(generated / "retrieval_knowledge_body.rst", retrieval_and_knowledge_body())
    figure = DOCS / "figures" / "context_graph.svg"
    if not figure.is_file():
        spec = importlib.util.spec_from_file_location(
            "make_graph_figure", DOCS / "figures" / "make_graph_figure.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.draw(figure)


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", generate)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
