"""The ``hetgraph encoder`` commands and ``hetgraph index build --encoder``: the parsers and
the command functions (heavy imports inside the functions, so parsing stays light)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetgraph.cli_options import POSITIVE, at_least, positive_float, seed_value, thread_count

ENCODER_EPILOG = """examples:
  hetgraph encoder train --datastore runs/ds --out runs/enc --dim 128 --steps 1000
  hetgraph index build --datastore runs/ds --encoder runs/enc   # writes runs/enc/index/"""

#: The validation figures printed by ``hetgraph encoder train``, in order.
SHOWN_FIGURES = ("recall@1", "recall@8", "recall@32", "knn_ppl", "knn_coverage")


def add_encoder_commands(commands: Any) -> None:
    """Register ``hetgraph encoder train`` on the CLI's sub-command parsers."""
    encoder = commands.add_parser("encoder", help="relation encoder commands").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    train = encoder.add_parser(
        "train",
        help="train a relation encoder contrastively from a datastore alone",
        epilog=ENCODER_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--datastore", required=True)
    train.add_argument(
        "--out",
        required=True,
        help="encoder directory (weights, config, "
        "validation.json; the encoded index goes to OUT/index)",
    )
    train.add_argument("--dim", type=POSITIVE, default=128, help="encoded width d′")
    train.add_argument(
        "--kind",
        choices=("linear", "mlp", "identity"),
        default="linear",
        help="linear, linear + GELU + linear, or identity (today's raw L2)",
    )
    train.add_argument("--hidden", type=POSITIVE, default=None, help="hidden width of mlp")
    train.add_argument("--steps", type=at_least(0), default=1000)
    train.add_argument("--batch-size", type=at_least(2), default=256)
    train.add_argument("--lr", type=positive_float, default=3e-3)
    train.add_argument(
        "--temperature", type=positive_float, default=0.05, help="InfoNCE temperature τ"
    )
    train.add_argument("--seed", type=seed_value, default=0)
    train.add_argument(
        "--hard-negatives",
        type=at_least(0),
        default=8,
        help="raw-key FAISS neighbours with another next token per anchor",
    )
    train.add_argument(
        "--next-tokens",
        type=int,
        choices=(1, 2),
        default=1,
        help="positives share the next token (1) or the next two (2)",
    )
    train.add_argument(
        "--leakage-radius",
        type=at_least(0),
        default=64,
        help="rows of the anchor's document this close are never positives",
    )
    train.add_argument(
        "--anchor-pool",
        type=at_least(2),
        default=16384,
        help="anchors whose hard negatives are mined before training",
    )
    train.add_argument(
        "--valid-rows", type=POSITIVE, default=1000, help="held-out rows for validation"
    )
    train.add_argument("--k", type=POSITIVE, default=32, help="neighbours in validation")
    train.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="torch and FAISS threads (at most the machine's CPUs)",
    )
    train.set_defaults(func=cmd_encoder_train)


def with_encoder(
    index_build: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """``hetgraph index build``: the encoded index when ``--encoder`` is given, else
    ``index_build`` (the raw index)."""

    def run(args: argparse.Namespace) -> int:
        if getattr(args, "encoder", None):
            return cmd_encoded_index_build(args)
        return index_build(args)

    return run


def cmd_encoder_train(args: argparse.Namespace) -> int:
    from hetgraph.datastore import Datastore
    from hetgraph.encoder import ContrastiveConfig, EncoderConfig, train_encoder
    from hetgraph.io import atomic_write_json
    from hetgraph.pipeline import set_threads

    set_threads(args.threads)
    store = Datastore.open(args.datastore)
    config = ContrastiveConfig(
        temperature=args.temperature,
        next_tokens=args.next_tokens,
        hard_negatives=args.hard_negatives,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        leakage_radius=args.leakage_radius,
        anchor_pool=args.anchor_pool,
        valid_rows=args.valid_rows,
        k=args.k,
    )
    architecture = EncoderConfig(
        input_dim=store.dim, dim=args.dim, kind=args.kind, hidden=args.hidden
    )
    result = train_encoder(store, config, architecture)
    out = Path(args.out)
    result.encoder.save_pretrained(out)
    summary = {
        **result.summary(),
        "datastore": str(store.path),
        "datastore_fingerprint": store.fingerprint,
    }
    atomic_write_json(out / "validation.json", summary)
    print(
        f"encoder: {result.encoder.config.kind} {store.dim} -> {result.encoder.dim} saved in "
        f"{out} ({len(result.losses)} steps, {result.seconds:.0f} s)"
    )
    print(f"{'held-out rows':<14}" + "".join(f"{name:>14}" for name in SHOWN_FIGURES))
    for name, figures in result.validation.items():
        print(
            f"{name:<14}"
            + "".join(
                f"{figures[f]:>14.4f}" if f in figures else f"{'-':>14}" for f in SHOWN_FIGURES
            )
        )
    print(
        f"validation written to {out / 'validation.json'}; build the index with: hetgraph "
        f"index build --datastore {store.path} --encoder {out}"
    )
    return 0


def cmd_encoded_index_build(args: argparse.Namespace) -> int:
    from hetgraph.datastore import Datastore
    from hetgraph.encoder import build_encoded_index
    from hetgraph.index import IndexConfig
    from hetgraph.pipeline import set_threads

    set_threads(args.threads)
    config = IndexConfig.from_dict(
        dict(
            factory=args.factory,
            num_threads=args.threads,
            on_disk=args.on_disk,
            nprobe=args.nprobe,
            rerank=args.rerank,
            shard_rows=args.shard_rows,
        )
    )
    store = Datastore.open(args.datastore)
    index = build_encoded_index(store, args.encoder, config)
    print(f"index: {index} saved in {Path(args.encoder) / 'index'}")
    return 0
