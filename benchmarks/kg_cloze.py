"""Factual completion with and without the knowledge graph: a WordNet cloze probe on GCIDE
(``benchmarks/results/kg_cloze.json``).

Probe set: the WordNet triples held out of the KG embedding training (the KGE valid split,
``split_triples`` with the settings and seed recorded in the KG's ``kg.json``) whose
relation has a template (``TEMPLATES``) and whose two entities have names. Each triple
becomes one prompt ending just before its answer, e.g. ``pegmatite is an`` -> the first
token of `` igneous rock``. Inverse relations (hyponym, part/member/substance meronym,
instance hyponym, member of domain) are read from the answer's side (``{tail} is a`` ->
``{head}``). No word after the subject is itself a WordNet alias, so with causal linking the
scored position sees the subject's facts (a later mention would replace them). Duplicate
(prompt, answer) pairs are kept once. ``--extra N`` adds ``N`` seeded triples drawn from
the whole graph (flagged ``held_out: false``; not held out of anything). The held-out
triples are still in the KG itself (the fused model may be shown them as facts), and
their inverse is usually in the KGE train split (``inverse_in_kge_train``).

Every prompt is scored, at its last position, by the rank (1 = best) and log-probability of
the answer's first token under each arm: the base LM alone (``base``), the fused model with
the GNN-LM adapter trained without a KG (``gnn``: ``runs/evidence-gcide/graph-s0``), the
same recipe trained with the WordNet KG and run with it (``gnn_kg``:
``runs/kg-gcide/graph-kg-s0`` + ``--kg runs/kg-gcide/kg``), and any ``--arm NAME ADAPTER
[KG]`` (repeatable; e.g. a shuffled-KG control). The adapter's logits are scored as they
are (no kNN-LM mixture). Prompts of one token length are batched together (no padding).

Intervals: 1,000 seeded bootstrap resamples over prompts (each prompt its own cluster:
``hetgraph.evaluation.intervals.resample_weights``), paired for the differences. For every
KG arm the script also records whether the subject's entity is linked in the prompt, whether
the last position sees it (``KnowledgeSource.link``: what the fused forward links), and
whether the answer's entity is in one of the facts that position is given.

Reproduce (after ``runs/evidence-gcide`` and ``runs/kg-gcide``, see
``benchmarks/kg_evidence.py``):

    OMP_NUM_THREADS=2 python benchmarks/kg_cloze.py --threads 2 \\
        --arm gnn_kg_shuffled runs/kg-gcide/graph-kg-shuffled-s0 runs/kg-gcide/kg-shuffled

(the ``--arm`` once the shuffled-KG control is trained; ``--limit 20 --out
/tmp/kg_cloze_small.json`` for a quick check). An adapter directory still being written by
``hetgraph train`` (its lock held, or no ``training.json``) is refused before any work.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetgraph.evaluation.intervals import BootstrapSpec, percentile_interval, resample_weights
from hetgraph.io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs"
RESULT = ROOT / "benchmarks" / "results" / "kg_cloze.json"

#: relation -> (template, subject role). The subject ("head" or "tail" of the triple) fills
#: ``{subject}``; ``{a}`` is "an" before an answer starting with a vowel letter, else "a"
#: (a mild hint, the same for every arm); the answer is the first token of " " + the other
#: entity's name. Nothing after the subject may be a WordNet alias: the causal linker
#: shows a position only the most recent mention, and "kind of" (an alias of "rather"),
#: "part", "member", "similar", "term", "used" are all aliases, so "X is a kind of" would
#: show the last position the facts of "rather", never X's.
TEMPLATES: dict[str, tuple[str, str]] = {
    "hypernym": ("{subject} is {a}", "head"),
    "hyponym": ("{subject} is {a}", "tail"),
    "instance_hypernym": ("{subject} is {a}", "head"),
    "instance_hyponym": ("{subject} is {a}", "tail"),
    "part_holonym": ("{subject} is in", "head"),
    "part_meronym": ("{subject} is in", "tail"),
    "member_holonym": ("{subject} belongs to", "head"),
    "member_meronym": ("{subject} belongs to", "tail"),
    "substance_holonym": ("{subject} is in", "head"),
    "substance_meronym": ("{subject} is in", "tail"),
    "antonym": ("The opposite of {subject} is", "head"),
    "similar_to": ("{subject}, or", "head"),
    "domain_topic": ("{subject} (in", "head"),
    "member_of_domain_topic": ("{subject} (in", "tail"),
    "domain_region": ("{subject} (in", "head"),
    "member_of_domain_region": ("{subject} (in", "tail"),
}
#: Each templated relation's inverse in WordNet (for the ``inverse_in_kge_train`` flag).
INVERSE = {
    "hypernym": "hyponym",
    "instance_hypernym": "instance_hyponym",
    "part_holonym": "part_meronym",
    "member_holonym": "member_meronym",
    "substance_holonym": "substance_meronym",
    "domain_topic": "member_of_domain_topic",
    "domain_region": "member_of_domain_region",
    "antonym": "antonym",
    "similar_to": "similar_to",
}
INVERSE.update({b: a for a, b in list(INVERSE.items())})
#: Batch size of one forward (prompts of one length).
BATCH = 32


@dataclass
class Prompt:
    """One cloze prompt: its text and ids, the answer's first token and the triple."""

    text: str
    ids: list[int]
    target: int
    relation: str
    subject: int
    answer: int
    subject_name: str
    answer_name: str
    held_out: bool
    inverse_in_kge_train: bool
    target_in_prompt: bool
    scores: dict[str, tuple[int, float]] = field(default_factory=dict)
    links: dict[str, dict[str, bool]] = field(default_factory=dict)


def _name(graph: Any, entity: int) -> str:
    name = graph.entity_names[entity].replace("_", " ").strip()
    return "" if name == graph.entity_ids[entity] else name  # unnamed: its id


def _triple_keys(triples: np.ndarray, num_entities: int, num_relations: int) -> np.ndarray:
    t = triples.astype(np.int64)
    return (t[:, 0] * num_relations + t[:, 1]) * num_entities + t[:, 2]


def build_prompts(
    graph: Any, manifest: dict[str, Any], tokenizer: Any, extra: int, seed: int, lead: str
) -> tuple[list[Prompt], dict[str, Any]]:
    """The probe prompts (held-out first, then ``extra``) and the counts of the selection."""
    from hetgraph.kg.embeddings import EmbeddingConfig, split_triples

    config = EmbeddingConfig(**manifest["embeddings"]["config"])
    triples = torch.as_tensor(graph.triples).long()
    train, valid = split_triples(triples, config)
    E, R = graph.num_entities, graph.num_relations
    train_keys = np.sort(_triple_keys(train.numpy(), E, R))
    valid_keys = set(_triple_keys(valid.numpy(), E, R).tolist())
    relation_id = {name: i for i, name in enumerate(graph.relations)}
    counts: dict[str, Any] = {
        "kge_valid_triples": int(valid.shape[0]),
        "kge_valid_by_relation": dict(Counter(graph.relations[r] for r in valid[:, 1].tolist())),
        "dropped_no_template": 0,
        "dropped_no_name": 0,
        "dropped_duplicate": 0,
    }
    seen: set[tuple[str, int]] = set()

    def make(rows: np.ndarray, held_out: bool) -> list[Prompt]:
        out = []
        for h, r, t in rows.tolist():
            relation = graph.relations[r]
            if relation not in TEMPLATES:
                counts["dropped_no_template"] += held_out
                continue
            template, role = TEMPLATES[relation]
            subject, answer = (h, t) if role == "head" else (t, h)
            subject_name, answer_name = _name(graph, subject), _name(graph, answer)
            if not subject_name or not answer_name:
                counts["dropped_no_name"] += held_out
                continue
            article = "an" if answer_name[:1].lower() in "aeiou" else "a"
            text = lead + template.format(subject=subject_name, a=article)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            target = tokenizer(" " + answer_name, add_special_tokens=False)["input_ids"][0]
            if (text, target) in seen:
                counts["dropped_duplicate"] += held_out
                continue
            seen.add((text, target))
            inverse = relation_id.get(INVERSE.get(relation, ""), -1)
            inverse_key = (t * R + inverse) * E + h
            position = np.searchsorted(train_keys, inverse_key)
            in_train = inverse >= 0 and bool(
                position < len(train_keys) and train_keys[position] == inverse_key
            )
            out.append(
                Prompt(
                    text,
                    ids,
                    target,
                    relation,
                    subject,
                    answer,
                    subject_name,
                    answer_name,
                    held_out,
                    in_train,
                    target in ids,
                )
            )
        return out

    prompts = make(valid.numpy(), held_out=True)
    if extra > 0:
        templated = np.isin(
            graph.triples[:, 1], [relation_id[r] for r in TEMPLATES if r in relation_id]
        )
        pool = np.flatnonzero(templated)
        pool = pool[~np.isin(_triple_keys(graph.triples[pool], E, R), list(valid_keys))]
        order = np.random.default_rng(seed).permutation(pool)
        added: list[Prompt] = []
        for start in range(0, len(order), 4 * extra):
            added += make(np.asarray(graph.triples[order[start : start + 4 * extra]]), False)
            if len(added) >= extra:
                break
        prompts += added[:extra]
    counts["held_out_available"] = sum(p.held_out for p in prompts)
    counts["extra_available"] = sum(not p.held_out for p in prompts)
    return prompts, counts


@torch.no_grad()
def score(forward: Any, prompts: list[Prompt], name: str) -> float:
    """Rank and log-probability of each prompt's target at its last position under
    ``forward`` (ids ``[B, T]`` -> logits); prompts of one length share a batch. Returns the
    seconds taken."""
    start = time.perf_counter()
    by_length: dict[int, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_length[len(p.ids)].append(p)
    for group in by_length.values():
        for i in range(0, len(group), BATCH):
            batch = group[i : i + BATCH]
            ids = torch.tensor([p.ids for p in batch], dtype=torch.long)
            logits = forward(ids)[:, -1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor([p.target for p in batch])
            target_logit = logits.gather(1, targets[:, None])
            ranks = 1 + (logits > target_logit).sum(1)
            chosen = log_probs.gather(1, targets[:, None])[:, 0]
            for p, rank, lp in zip(batch, ranks.tolist(), chosen.tolist(), strict=True):
                p.scores[name] = (int(rank), float(lp))
    return time.perf_counter() - start


@torch.no_grad()
def record_links(source: Any, prompts: list[Prompt], name: str) -> None:
    """Per prompt, with the arm's bound :class:`~hetgraph.kg.KnowledgeSource`: whether the
    subject's entity is linked at any position (the linker's mentions), whether the last
    position sees it and any entity (``source.link``, as the fused forward), and whether the
    answer's entity is in a fact that position is given."""
    triples = source.index.triples
    for p in prompts:
        ids = torch.tensor([p.ids], dtype=torch.long)
        mentioned = source.linker(ids).entities[0]  # [T, m]
        last = source.link(ids)[0, -1]  # [m]
        facts = source.index.select(last[None])[0]
        facts = facts[facts >= 0]
        fact_entities = set(triples[facts][:, [0, 2]].reshape(-1).tolist())
        p.links[name] = {
            "subject_mentioned": bool((mentioned == p.subject).any()),
            "subject_seen_at_last": bool((last == p.subject).any()),
            "any_entity_at_last": bool((last >= 0).any()),
            "answer_in_facts_at_last": p.answer in fact_entities,
        }


def _interval(values: np.ndarray, spec: BootstrapSpec) -> dict[str, Any]:
    n = len(values)
    resampled = np.concatenate([w @ values / n for w in resample_weights(n, spec)])
    return {"value": float(values.mean()), "ci95": list(percentile_interval(resampled, spec.level))}


def arm_metrics(prompts: list[Prompt], name: str, spec: BootstrapSpec) -> dict[str, Any]:
    ranks = np.array([p.scores[name][0] for p in prompts], dtype=np.float64)
    log_probs = np.array([p.scores[name][1] for p in prompts], dtype=np.float64)
    return {
        "top1": _interval((ranks <= 1).astype(np.float64), spec),
        "top10": _interval((ranks <= 10).astype(np.float64), spec),
        "mean_log_prob": _interval(log_probs, spec),
        "median_rank": float(np.median(ranks)),
        "mrr": float((1.0 / ranks).mean()),
    }


def _verdict(name: str, other: str, diff: dict[str, Any], what: str) -> str:
    low, high = diff["ci95"]
    if low <= 0.0 <= high:
        return f"{name} vs {other}, {what}: no detectable difference"
    return f"{name} vs {other}, {what}: {'higher' if low > 0 else 'lower'} (interval excludes 0)"


def pair_metrics(
    prompts: list[Prompt], name: str, other: str, spec: BootstrapSpec
) -> dict[str, Any]:
    """``name`` minus ``other`` on the same prompts, with paired intervals."""

    def column(arm: str, i: int) -> np.ndarray:
        return np.array([p.scores[arm][i] for p in prompts], dtype=np.float64)

    top10 = (column(name, 0) <= 10).astype(np.float64) - (column(other, 0) <= 10)
    log_prob = column(name, 1) - column(other, 1)
    out = {
        "top10_diff": _interval(top10, spec),
        "mean_log_prob_diff": _interval(log_prob, spec),
        "prompts_better_log_prob": int((log_prob > 0).sum()),
        "prompts_worse_log_prob": int((log_prob < 0).sum()),
    }
    out["verdict"] = [
        _verdict(name, other, out["top10_diff"], "top-10 rate"),
        _verdict(name, other, out["mean_log_prob_diff"], "mean log-prob"),
    ]
    return out


def _fmt(row: dict[str, Any], percent: bool = False) -> str:
    scale, unit = (100.0, "%") if percent else (1.0, "")
    low, high = row["ci95"]
    return f"{row['value'] * scale:.1f}{unit} ({low * scale:.1f}–{high * scale:.1f})"


def _fmt_lp(row: dict[str, Any]) -> str:
    low, high = row["ci95"]
    return f"{row['value']:.3f} ({low:.3f}–{high:.3f})"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['counts']['prompts']} prompts "
        f"({result['counts']['held_out_prompts']} held out, "
        f"{result['counts']['extra_prompts']} extra); 95 % bootstrap intervals over prompts",
        "",
        "| arm | top-1 | top-10 | mean log-prob | median rank | subject seen at last |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in result["arms"].items():
        links = result["linking"].get(name)
        seen = "—" if links is None else f"{100 * links['subject_seen_at_last']:.0f}%"
        lines.append(
            f"| {name} | {_fmt(row['top1'], True)} | {_fmt(row['top10'], True)} | "
            f"{_fmt_lp(row['mean_log_prob'])} | {row['median_rank']:.0f} | {seen} |"
        )
    lines += ["", "| pair | Δ top-10 | Δ mean log-prob | |", "|---|---|---|---|"]
    for pair, row in result["pairs"].items():
        lines.append(
            f"| {pair} | {_fmt(row['top10_diff'], True)} | "
            f"{_fmt_lp(row['mean_log_prob_diff'])} | {'; '.join(row['verdict'])} |"
        )
    return "\n".join(lines)


def _shown(path: Path | None) -> str | None:
    """``path`` as given on the command line (relative to the repository when inside it)."""
    if path is None:
        return None
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _open_store(path: Path, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    from hetgraph.datastore import Datastore
    from hetgraph.index import DatastoreIndex

    store = Datastore.open(path, model=model, tokenizer=tokenizer)
    return store, DatastoreIndex.load(path / "index", store)


def parse_arms(values: list[list[str]] | None) -> list[tuple[str, Path, Path | None]]:
    arms = []
    for value in values or []:
        if len(value) not in (2, 3):
            raise SystemExit(f"--arm takes NAME ADAPTER [KG], got {' '.join(value)}")
        arms.append((value[0], Path(value[1]), Path(value[2]) if len(value) == 3 else None))
    return arms


def discussion(result: dict[str, Any]) -> str:
    """One paragraph for the results page: the probe, each KG arm's linking, the verdicts."""
    n = len(result["prompts"])
    held = sum(p["held_out"] for p in result["prompts"])
    text = (
        f"{n} cloze prompts from WordNet triples ({held} held out of the KG embeddings' "
        "training, still present in the graph as facts), scored at the last position by the "
        "rank of the answer's first token; one seed, intervals over prompts."
    )
    for arm, shares in result["linking"].items():
        text += (
            f" {arm}: the last position sees the subject in {shares['subject_seen_at_last']:.0%}"
            f" of prompts and is given the answer's entity among its facts in "
            f"{shares['answer_in_facts_at_last']:.0%}."
        )
    for row in result["pairs"].values():
        text += " " + "; ".join(row["verdict"]) + "."
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kg", type=Path, default=RUNS / "kg-gcide" / "kg")
    parser.add_argument("--datastore", type=Path, default=RUNS / "evidence-gcide" / "datastore")
    parser.add_argument(
        "--adapter", type=Path, default=RUNS / "evidence-gcide" / "graph-s0", help="no-KG arm"
    )
    parser.add_argument(
        "--kg-adapter", type=Path, default=RUNS / "kg-gcide" / "graph-kg-s0", help="KG arm"
    )
    parser.add_argument(
        "--arm",
        nargs="+",
        action="append",
        metavar="NAME ADAPTER [KG]",
        help="another fused arm (repeatable), compared with the no-KG arm",
    )
    parser.add_argument("--extra", type=int, default=0, help="seeded non-held-out triples")
    parser.add_argument("--seed", type=int, default=0, help="seed of --extra")
    parser.add_argument("--lead", default="", help="text before every prompt (default none)")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    extra_arms = parse_arms(args.arm)
    names = ["base", "gnn", "gnn_kg", *(name for name, _, _ in extra_arms)]
    if len(set(names)) != len(names):
        raise SystemExit(f"arm names must differ: {names}")

    fused = [("gnn", args.adapter, None), ("gnn_kg", args.kg_adapter, args.kg), *extra_arms]
    from hetgraph.locking import lock_holder

    # Before any work. `hetgraph train` saves the adapter during training too (a readable
    # but unfinished adapter): refuse a directory whose lock is held or without
    # training.json (written when training ends).
    for name, adapter, kg in fused:
        if not (adapter / "adapter_config.json").is_file():
            raise SystemExit(f"arm {name}: {adapter} holds no adapter (adapter_config.json)")
        for directory in (adapter, kg):
            pid = None if directory is None else lock_holder(directory)
            if pid is not None:
                raise SystemExit(f"arm {name}: process {pid} is writing {directory}; wait")
        if not (adapter / "training.json").is_file():
            raise SystemExit(f"arm {name}: {adapter} has no training.json (still training?)")
        if kg is not None and not (kg / "kg.json").is_file():
            raise SystemExit(f"arm {name}: {kg} holds no knowledge graph (kg.json)")

    from hetgraph.fusion import HetGraphLM
    from hetgraph.kg import KnowledgeSource
    from hetgraph.kg.store import read_manifest
    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import set_threads

    set_threads(args.threads)
    model, tokenizer = load_model()
    sources: dict[Path, Any] = {}

    def knowledge(directory: Path | None) -> Any:
        if directory is None:
            return None
        if directory not in sources:
            sources[directory] = KnowledgeSource.open(directory, tokenizer)
        return sources[directory]

    probe_graph = knowledge(args.kg).graph
    prompts, counts = build_prompts(
        probe_graph, read_manifest(args.kg), tokenizer, args.extra, args.seed, args.lead
    )
    if args.limit is not None:
        prompts = prompts[: args.limit]
    counts["prompts"] = len(prompts)
    counts["held_out_prompts"] = sum(p.held_out for p in prompts)
    counts["extra_prompts"] = sum(not p.held_out for p in prompts)
    counts["prompts_by_relation"] = dict(Counter(p.relation for p in prompts))
    counts["inverse_in_kge_train"] = sum(p.inverse_in_kge_train for p in prompts)
    counts["target_in_prompt"] = sum(p.target_in_prompt for p in prompts)
    print(f"{len(prompts)} prompts", file=sys.stderr)

    store, index = _open_store(args.datastore, model, tokenizer)
    # Loading the index sets FAISS's OpenMP threads (and so torch's) to the count recorded
    # in its index.json (2 here), overriding --threads: set them again.
    set_threads(args.threads)
    threads = torch.get_num_threads()
    seconds = {"base": score(lambda ids: model(input_ids=ids).logits, prompts, "base")}
    linking: dict[str, dict[str, float]] = {}
    arms_info: dict[str, Any] = {"base": {"adapter": None, "kg": None}}
    for name, adapter, kg in fused:
        lm = HetGraphLM.from_pretrained(
            adapter, model, store, index, tokenizer=tokenizer, knowledge=knowledge(kg)
        )
        lm.eval()
        seconds[name] = score(lambda ids, lm=lm: lm(ids).logits, prompts, name)
        source = lm.engine.knowledge
        arms_info[name] = {
            "adapter": _shown(adapter),
            "adapter_config_sha256": hashlib.sha256(
                (adapter / "adapter_config.json").read_bytes()
            ).hexdigest(),
            "kg": _shown(kg),
            "kg_settings": None if source is None else asdict(source.config),
        }
        # Entity ids are the probe graph's: a KG numbered otherwise gets no link record.
        if source is not None and source.graph.entity_ids == probe_graph.entity_ids:
            record_links(source, prompts, name)
            keys = next(iter(prompts)).links[name] if prompts else {}
            linking[name] = {k: float(np.mean([p.links[name][k] for p in prompts])) for k in keys}
            if linking[name].get("subject_seen_at_last", 1.0) < 0.5:
                print(
                    f"warning: {name}: the last position sees the subject's entity in only "
                    f"{100 * linking[name]['subject_seen_at_last']:.0f}% of the prompts",
                    file=sys.stderr,
                )
        del lm
        print(f"{name}: {seconds[name]:.1f} s", file=sys.stderr)

    spec = BootstrapSpec()
    pairs = {"gnn_kg - gnn": ("gnn_kg", "gnn")}
    pairs.update({f"{name} - gnn": (name, "gnn") for name, _, _ in extra_arms})
    # The controls against the real graph too (e.g. real triples vs shuffled ones).
    pairs.update({f"gnn_kg - {name}": ("gnn_kg", name) for name, _, _ in extra_arms})
    pairs["gnn - base"] = ("gnn", "base")
    from hetgraph.kg.linking import EntityLinker

    result = {
        "command": shlex.join(["python", "benchmarks/kg_cloze.py", *sys.argv[1:]]),
        "threads": threads,
        "machine": platform.machine(),
        "seconds": seconds,
        "probe": {
            "kg": _shown(args.kg),
            "datastore": _shown(args.datastore),
            "held_out_from": "the KGE valid split of kg.json's embeddings config "
            f"({read_manifest(args.kg)['embeddings']['config']})",
            "templates": {r: {"template": t, "subject": s} for r, (t, s) in TEMPLATES.items()},
            "article": "{a}: 'an' before an answer starting with a vowel letter, else 'a'",
            "why_these_templates": "no word after the subject is a WordNet alias, so the "
            "causal linker shows the scored position the subject (a later mention, e.g. "
            "'kind of' = rather, 'part', 'member', 'similar', would replace it)",
            "lead": args.lead,
            "target": "first token of ' ' + the answer entity's name (underscores -> spaces)",
            "scored_at": "the prompt's last position; adapter logits, no kNN-LM mixture",
            "limit": args.limit,
            "extra_seed": args.seed if args.extra else None,
        },
        "counts": counts,
        "arms_info": arms_info,
        "linking_mode": "causal" if hasattr(EntityLinker, "causal") else "mention-covering",
        "bootstrap": {"resamples": spec.resamples, "seed": spec.seed, "over": "prompts"},
        "arms": {name: arm_metrics(prompts, name, spec) for name in names},
        "pairs": {k: pair_metrics(prompts, a, b, spec) for k, (a, b) in pairs.items()},
        "linking": linking,
        "prompts": [
            {
                "text": p.text,
                "answer": p.answer_name,
                "target": tokenizer.decode([p.target]),
                "relation": p.relation,
                "held_out": p.held_out,
                "inverse_in_kge_train": p.inverse_in_kge_train,
                "target_in_prompt": p.target_in_prompt,
                "scores": {k: {"rank": r, "log_prob": lp} for k, (r, lp) in p.scores.items()},
                "links": p.links,
            }
            for p in prompts
        ],
    }
    result["discussion"] = discussion(result)
    atomic_write_json(args.out, result)
    print(markdown(result))
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
