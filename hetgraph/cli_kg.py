"""The ``hetgraph kg`` commands: ``kg build`` (triples and aliases into a knowledge-graph
directory) and ``kg embed`` (KGE entity features stored with it). Heavy imports live inside
the command functions, so parsing stays light."""

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
  hetgraph kg embed --kg runs/kg --model auto --dim 64 --epochs 20"""


def add_kg_commands(commands: Any, add_model: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``hetgraph kg build`` and ``hetgraph kg embed``; ``add_model`` adds the
    ``--model`` options every command shares."""
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
        help="the shipped WordNet 3.0 (benchmarks/data/wordnet-*.tsv.xz)",
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


def _existing(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Whether ``out`` already holds this build (complete); refuses to replace anything
    else without ``--overwrite``."""
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
            f"--out {out} holds a knowledge graph built from other inputs "
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
