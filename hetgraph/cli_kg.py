"""The ``hetgraph kg`` commands: ``kg build`` (triples and aliases into a knowledge-graph
directory), ``kg embed`` (KGE entity features stored with it) and ``kg shuffle`` (a control
graph: the facts moved among the entities). Heavy imports live inside the command
functions, so parsing stays light."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetgraph.cli_options import (
    POSITIVE,
    at_least,
    fraction,
    positive_float,
    seed_value,
    thread_count,
)

KG_EPILOG = """examples:
  hetgraph kg build --wordnet --out runs/kg-wordnet          # the shipped WordNet 3.0
  hetgraph kg build --triples facts.tsv --aliases names.tsv --out runs/kg
  hetgraph kg embed --kg runs/kg --model auto --dim 64 --epochs 20
  hetgraph kg shuffle --kg runs/kg --out runs/kg-shuffled --seed 0   # the control, then
  hetgraph kg embed --kg runs/kg-shuffled --model auto --dim 64 --epochs 20"""

SHUFFLE_DESCRIPTION = """\
A control for knowledge-graph experiments: the same graph (entities, relations,
aliases as token ids, tokenizer) with every fact (h, r, t) moved to (pi(h), r, t) for a
seeded permutation pi of the entities, so a mention of an entity gets the facts of another
one (about one entity stays in place): the same relation mix and number of facts per
entity, about the wrong entity. Tails are not permuted (with --kg-tails an entity still
sees the facts naming it as their tail).

The output has no embeddings: embed it with `hetgraph kg embed` using the same settings as
the real graph, then train / eval with --kg on the output directory."""


def add_kg_commands(commands: Any, add_model: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``hetgraph kg build``, ``kg embed`` and ``kg shuffle``; ``add_model`` adds
    the ``--model`` options every command shares."""
    kg = commands.add_parser("kg", help="knowledge-graph commands").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    build = kg.add_parser(
        "build",
        help="read triples and aliases into a knowledge-graph "
        "directory, aliases tokenised for the model",
        epilog=KG_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(build)
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--triples",
        type=Path,
        help="head<TAB>relation<TAB>tail per line, or "
        'JSON lines {"head", "relation", "tail"} (.xz / .gz read too)',
    )
    source.add_argument(
        "--wordnet",
        action="store_true",
        help="the shipped WordNet 3.0 (benchmarks/data/wordnet-triples.tsv.xz and "
        "wordnet-aliases.tsv.xz)",
    )
    build.add_argument(
        "--aliases",
        type=Path,
        default=None,
        help='entity<TAB>alias per line, or JSON lines {"entity", "alias"}',
    )
    build.add_argument("--out", type=Path, required=True, help="knowledge-graph directory")
    build.add_argument(
        "--max-alias-tokens",
        type=POSITIVE,
        default=8,
        help="longer aliases (in tokens) are not linked",
    )
    build.add_argument(
        "--min-alias-chars",
        type=POSITIVE,
        default=3,
        help="shorter alias texts are skipped (function words)",
    )
    build.add_argument(
        "--overwrite", action="store_true", help="replace a knowledge graph built from other inputs"
    )
    build.set_defaults(func=cmd_kg_build)

    embed = kg.add_parser(
        "embed",
        help="train KGE entity embeddings (PyG TransE, DistMult, "
        "RotatE, ComplEx) and store them with the graph",
    )
    embed.add_argument("--kg", type=Path, required=True, help="knowledge-graph directory")
    embed.add_argument(
        "--model",
        choices=("auto", "transe", "distmult", "rotate", "complex"),
        default="auto",
        help="'auto': train each, keep the best valid MRR",
    )
    embed.add_argument("--dim", type=POSITIVE, default=64)
    embed.add_argument("--epochs", type=POSITIVE, default=20)
    embed.add_argument("--batch-size", type=POSITIVE, default=1024)
    embed.add_argument("--lr", type=positive_float, default=0.01)
    embed.add_argument("--valid-fraction", type=fraction, default=0.05)
    embed.add_argument(
        "--max-valid",
        type=at_least(1),
        default=500,
        help="valid triples scored (each ranked against every entity)",
    )
    embed.add_argument("--seed", type=seed_value, default=0)
    embed.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="torch threads (at most the machine's CPUs)",
    )
    embed.set_defaults(func=cmd_kg_embed)

    shuffle = kg.add_parser(
        "shuffle",
        help="a control graph: the facts shuffled among the entities (embed it with "
        "`hetgraph kg embed` using the real graph's settings)",
        description=SHUFFLE_DESCRIPTION,
        epilog="example:\n  hetgraph kg shuffle --kg runs/kg --out runs/kg-shuffled --seed 0\n"
        "  hetgraph kg embed --kg runs/kg-shuffled   # the same settings as runs/kg's",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    shuffle.add_argument(
        "--kg", type=Path, required=True, help="the knowledge-graph directory to shuffle"
    )
    shuffle.add_argument(
        "--out", type=Path, required=True, help="the control's knowledge-graph directory"
    )
    shuffle.add_argument(
        "--seed", type=seed_value, default=0, help="seed of the permutation of the entities (0)"
    )
    shuffle.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a knowledge graph of another source or seed in --out",
    )
    shuffle.set_defaults(func=cmd_kg_shuffle)


def _existing(
    out: Path, fingerprint: str, overwrite: bool, other: str = "built from other inputs"
) -> bool:
    """Whether ``out`` already holds this build (complete); refuses to replace anything
    else (``other`` says what, in the message) without ``--overwrite``."""
    from hetgraph.kg.errors import KnowledgeGraphError
    from hetgraph.kg.store import MANIFEST, KnowledgeGraph, read_manifest

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not (out / MANIFEST).is_file():
        raise KnowledgeGraphError(
            f"--out {out} exists and is not a knowledge-graph directory; "
            "choose a new or empty directory"
        )
    if overwrite:
        return False
    try:
        same = read_manifest(out).get("fingerprint") == fingerprint
        if same:
            KnowledgeGraph.from_pretrained(out)  # complete and undamaged
    except KnowledgeGraphError:
        same = False
    if not same:
        raise KnowledgeGraphError(
            f"--out {out} holds a knowledge graph {other} "
            "(or a damaged one); pass --overwrite to replace it"
        )
    return True


def cmd_kg_build(args: argparse.Namespace) -> int:
    """Read, tokenise and store; a complete directory of the same build is kept."""
    from hetgraph.kg.aliases import AliasConfig
    from hetgraph.kg.store import KnowledgeGraph, build_record
    from hetgraph.kg.wordnet import shipped_wordnet
    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import set_threads

    triples, aliases = args.triples, args.aliases
    if args.wordnet:
        triples, shipped_aliases = shipped_wordnet()
        aliases = aliases or shipped_aliases
    config = AliasConfig(
        max_alias_tokens=args.max_alias_tokens, min_alias_chars=args.min_alias_chars
    )
    set_threads(args.threads)
    _, tokenizer = load_model(args.model)  # the tokenizer's vocabulary is checked against it
    record = build_record(triples, aliases, tokenizer, config)
    if _existing(args.out, record["fingerprint"], args.overwrite):
        print(f"{args.out} is up to date (the same inputs, tokenizer and settings)")
        return 0
    graph = KnowledgeGraph.build(triples, aliases, tokenizer, config)
    graph.save_pretrained(args.out)
    print(json.dumps({"out": str(args.out), **graph.counts()}, indent=2))
    return 0


def cmd_kg_shuffle(args: argparse.Namespace) -> int:
    """Shuffle ``--kg``'s facts into ``--out``; a complete ``--out`` of the same shuffle (the
    same source content and seed) is kept."""
    import numpy as np

    from hetgraph.kg.errors import KnowledgeGraphError
    from hetgraph.kg.store import KnowledgeGraph, entity_permutation

    if args.out.resolve() == args.kg.resolve():
        raise KnowledgeGraphError(
            f"--out {args.out} is the --kg directory; write the shuffled control to another "
            "directory"
        )
    source = KnowledgeGraph.from_pretrained(args.kg)
    record = source.shuffle_record(args.seed)
    other = "of another source or seed"
    if _existing(args.out, record["fingerprint"], args.overwrite, other):
        print(f"{args.out} is up to date (the same graph shuffled with seed {args.seed})")
        return 0
    graph = source.shuffled(args.seed)
    graph.save_pretrained(args.out)
    permutation = entity_permutation(source.num_entities, args.seed)
    heads = source.triples[:, 0]
    summary = {
        "out": str(args.out),
        "from": str(args.kg),
        "seed": args.seed,
        "entities_in_place": int(np.count_nonzero(permutation == np.arange(len(permutation)))),
        "triples_moved": int(np.count_nonzero(permutation[heads] != heads)),
        **graph.counts(),
        "next": f"hetgraph kg embed --kg {args.out}  (the same settings as {args.kg})",
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_kg_embed(args: argparse.Namespace) -> int:
    """Train, choose and store the embeddings; prints the manifest's record."""
    from hetgraph.kg.embeddings import EmbeddingConfig, embed_knowledge_graph
    from hetgraph.pipeline import set_threads

    set_threads(args.threads)
    config = EmbeddingConfig(
        model=args.model,
        dim=args.dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        valid_fraction=args.valid_fraction,
        max_valid=args.max_valid,
        seed=args.seed,
    )
    record = embed_knowledge_graph(args.kg, config)
    print(json.dumps(record, indent=2))
    return 0


# ------------------------------------------------- --kg on train / eval / generate / inspect
#: ``train`` options of the per-position settings -> (section, field) of ``fusion.kg``.
KG_SETTINGS = {
    "--kg-facts": ("facts", "k_kg"),
    "--kg-relations": ("facts", "relations"),
    "--kg-tails": ("facts", "tails"),
    "--kg-windows": ("facts", "kg2nbr"),
    "--kg-links": ("facts", "kg2kg"),
    "--kg-entities": (None, "max_entities"),
    "--kg-visibility": (None, "visibility"),
}


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def add_kg_options(parser: argparse.ArgumentParser, *, settings: bool = False) -> None:
    """``--kg DIR`` (and, with ``settings``, the per-position options of ``train``)."""
    parser.add_argument(
        "--kg",
        type=Path,
        default=None,
        metavar="DIR",
        help="fuse this knowledge graph (hetgraph kg build, then kg embed) as kg nodes: "
        "each position also attends to the facts of the entities it mentions; an adapter "
        "records the graph it was trained with and needs it again",
    )
    if not settings:
        return
    parser.add_argument(
        "--kg-facts", type=POSITIVE, default=None, metavar="K", help="facts per position (4)"
    )
    parser.add_argument(
        "--kg-relations",
        nargs="+",
        default=None,
        metavar="REL",
        help="relations to use, in priority order (default: all, in file order)",
    )
    parser.add_argument(
        "--kg-tails",
        action="store_true",
        default=None,
        help="also the facts whose tail is a mentioned entity (default: head only)",
    )
    parser.add_argument(
        "--kg-windows",
        action="store_true",
        default=None,
        help="also link facts to retrieved window tokens that mention their entities (k2n)",
    )
    parser.add_argument(
        "--kg-links",
        action="store_true",
        default=None,
        help="link the facts of a text that share an entity (k2k)",
    )
    parser.add_argument(
        "--kg-entities",
        type=POSITIVE,
        default=None,
        metavar="M",
        help="entities kept per mention (4)",
    )
    parser.add_argument(
        "--kg-visibility",
        type=POSITIVE,
        default=None,
        metavar="N",
        help="positions that see a mention's facts, from its last token on (8; linking is "
        "causal: no position sees a mention before it is complete)",
    )
    parser.add_argument(
        "--kg-only",
        action="store_true",
        help="the knowledge graph alone: the adapter takes no message from the retrieved "
        "corpus neighbours (adapter.use_n2c false; a control — retrieval still runs for "
        "kNN-LM)",
    )


def check_kg_options(args: argparse.Namespace, adapter: str | None = None) -> None:
    """Before any model is loaded: ``--kg`` names a knowledge graph with embeddings, the
    per-position options come with it, and a graph ``adapter`` gets the graph it was trained
    with (or none, if it had none).

    Raises:
        HetgraphError: one line naming the option and the fix.
    """
    from hetgraph.cli_checks import CommandLineError
    from hetgraph.fusion.persistence import (
        AdapterFileError,
        check_knowledge,
        read_adapter_config,
    )
    from hetgraph.kg.source import check_knowledge_directory, knowledge_fingerprint

    given = [option for option in KG_SETTINGS if getattr(args, _dest(option), None) is not None]
    if getattr(args, "kg_only", False):
        given.append("--kg-only")
    if args.kg is None and given:
        raise CommandLineError(f"{given[0]} sets how a knowledge graph is fused; add --kg DIR")
    current = None
    if args.kg is not None:
        manifest = check_knowledge_directory(args.kg)
        current = {"fingerprint": knowledge_fingerprint(manifest), "directory": str(args.kg)}
    if adapter is None:
        return
    try:
        saved = read_adapter_config(adapter)
    except (AdapterFileError, OSError):
        return  # loading the adapter names the problem
    check_knowledge(saved, current, Path(adapter))


def apply_kg_settings(args: argparse.Namespace, fusion: dict[str, Any]) -> None:
    """Set ``fusion["kg"]`` (a :class:`~hetgraph.FusionConfig` dict) from ``--kg`` and the
    per-position options, on top of the run config's ``fusion.kg``.

    Raises:
        CommandLineError: the run config fuses a knowledge graph and ``--kg`` is missing.
    """
    from hetgraph.cli_checks import CommandLineError

    if args.kg is None:
        if fusion.get("kg") is not None:
            raise CommandLineError(
                "the run config's fusion.kg fuses a knowledge graph: give the graph with "
                "--kg DIR (or remove fusion.kg)"
            )
        return
    kg = dict(fusion.get("kg") or {})
    kg["facts"] = dict(kg.get("facts") or {})
    for option, (section, name) in KG_SETTINGS.items():
        value = getattr(args, _dest(option), None)
        if value is not None:
            (kg[section] if section else kg)[name] = value
    fusion["kg"] = kg
    if getattr(args, "kg_only", False):
        fusion["adapter"] = {**(fusion.get("adapter") or {}), "use_n2c": False}


def open_knowledge(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The :class:`~hetgraph.kg.KnowledgeSource` of ``--kg`` for ``tokenizer`` (``None``
    without ``--kg``); its per-position settings are bound by the engine."""
    if getattr(args, "kg", None) is None:
        return None
    from hetgraph.kg.source import KnowledgeSource

    return KnowledgeSource.open(args.kg, tokenizer)


def kg_evaluation(args: argparse.Namespace, evaluation: Any) -> Any:
    """The evaluation settings with ``--kg``: the neighbour-state tables hold no ``kg``
    nodes, so ``auto`` is ``off`` and ``on`` is refused."""
    from dataclasses import replace

    from hetgraph.cli_checks import CommandLineError

    if args.kg is None:
        return evaluation
    if evaluation.neighbour_states == "on":
        raise CommandLineError(
            "--neighbour-states on reads tables of windows without kg nodes; with --kg "
            "leave it at auto or off"
        )
    return replace(evaluation, neighbour_states="off")
