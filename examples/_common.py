"""Shared plumbing of the examples (not an example itself).

Every example accepts ``--tiny`` (or the environment variable ``HETGRAPH_EXAMPLES_TINY=1``):
it then uses a tiny randomly initialised Qwen2 from :mod:`hetgraph.testing`, the byte-level
tokenizer, and a small synthetic corpus written to a temporary directory, so that it runs
end to end in seconds on a CPU. Without ``--tiny`` the examples use the embedded default
(SmolLM2-135M and the Python 3.11 documentation) with modest sizes, and keep their results
under ``runs/examples`` so that later examples reuse the datastore of earlier ones.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TINY_ENV = "HETGRAPH_EXAMPLES_TINY"

_WORDS = [
    "the",
    "list",
    "sort",
    "key",
    "value",
    "returns",
    "a",
    "new",
    "object",
    "when",
    "called",
    "with",
    "an",
    "iterable",
    "dict",
    "string",
    "format",
    "module",
    "import",
    "function",
    "class",
    "method",
    "raises",
    "error",
    "if",
]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every example shares."""
    p = argparse.ArgumentParser(
        description=(doc or "").strip().splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help=f"tiny random model and synthetic corpus (also: {TINY_ENV}=1)",
    )
    p.add_argument(
        "--model", default=None, help="model directory or .gguf (default: embedded SmolLM2-135M)"
    )
    p.add_argument(
        "--corpus", default=None, help="text folder (default: embedded Python 3.11 docs)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="work directory (default: runs/examples, or a temp dir with --tiny)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse arguments; honour ``HETGRAPH_EXAMPLES_TINY`` and set threads."""
    args = p.parse_args()
    args.tiny = args.tiny or os.environ.get(TINY_ENV, "") not in ("", "0")
    from hetgraph.pipeline import set_threads

    set_threads(args.threads)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="hetgraph-example-") if args.tiny else "runs/examples"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def write_tiny_corpus(directory: str | Path, num_documents: int = 40, seed: int = 0) -> Path:
    """Write a small synthetic "own text folder": ``num_documents`` ``.txt`` files.

    The documents repeat phrases across files, so retrieval finds useful neighbours.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    phrases = [" ".join(rng.choice(_WORDS) for _ in range(6)) for _ in range(12)]
    for i in range(num_documents):
        sentences = [f"{rng.choice(phrases)} {rng.choice(_WORDS)}." for _ in range(8)]
        (directory / f"doc{i:03d}.txt").write_text(f"Document {i}.\n" + " ".join(sentences) + "\n")
    return directory


@dataclass
class Sizes:
    """Sizes of one run: tiny (seconds on CPU) or modest (minutes on CPU with SmolLM2)."""

    datastore_tokens: int
    context_length: int
    stride: int
    k: int
    adapter: dict[str, Any]
    train_steps: int
    train_context: int
    eval_tokens: int


TINY = Sizes(
    datastore_tokens=6000,
    context_length=128,
    stride=64,
    k=8,
    adapter={
        "hidden_channels": 32,
        "num_layers": 1,
        "heads": 4,
        "dropout": 0.0,
        "attn_dropout": 0.0,
    },
    train_steps=4,
    train_context=64,
    eval_tokens=300,
)
MODEST = Sizes(
    datastore_tokens=20000,
    context_length=512,
    stride=384,
    k=16,
    adapter={
        "hidden_channels": 256,
        "num_layers": 2,
        "heads": 8,
        "dropout": 0.1,
        "attn_dropout": 0.1,
    },
    train_steps=40,
    train_context=128,
    eval_tokens=2048,
)


def sizes(args: argparse.Namespace) -> Sizes:
    """The sizes of this run: ``args.sizes`` when an example sets it, else tiny or modest."""
    return getattr(args, "sizes", None) or (TINY if args.tiny else MODEST)


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a tiny random Qwen2 + byte tokenizer, or
    :func:`hetgraph.load_model`."""
    if args.tiny and args.model is None:
        from hetgraph.testing import byte_tokenizer, tiny_causal_lm

        return tiny_causal_lm("qwen2"), byte_tokenizer()
    from hetgraph import load_model

    return load_model(args.model, device="cuda" if torch.cuda.is_available() else "cpu")


def corpus(args: argparse.Namespace, tokenizer: Any):
    """Tokenize ``--corpus`` (a synthetic text folder with ``--tiny``, else the embedded docs)."""
    from hetgraph import CorpusConfig, tokenize_corpus

    path = args.corpus
    if path is None and args.tiny:
        path = str(write_tiny_corpus(Path(args.out) / "corpus"))
    cache = Path(args.out) / "corpus-cache" if args.tiny else None
    return tokenize_corpus(
        CorpusConfig(path=path, fractions=(0.8, 0.1, 0.1)),
        tokenizer,
        cache_dir=cache,
        show_progress=not args.tiny,
    )


def datastore_and_index(args: argparse.Namespace, model: Any, tokenizer: Any, tokenized: Any):
    """Build (or reuse) the datastore of the train split and its FAISS index under ``--out``."""
    from hetgraph import DatastoreConfig, DatastoreIndex, IndexConfig, build_datastore

    s = sizes(args)
    out = Path(args.out) / "datastore"
    config = DatastoreConfig(
        context_length=s.context_length,
        stride=s.stride,
        batch_size=4,
        max_tokens=s.datastore_tokens,
    )
    store = build_datastore(
        model,
        tokenizer,
        tokenized.train,
        out,
        config,
        corpus_fingerprint=tokenized.fingerprint,
        show_progress=not args.tiny,
    )
    if (out / "index" / "index.json").is_file():
        index = DatastoreIndex.load(out / "index", store)
    else:
        index = DatastoreIndex.build(
            store, IndexConfig(factory="auto"), show_progress=not args.tiny
        )
        index.save(out / "index")
    return store, index


def fusion_config(args: argparse.Namespace):
    """GNN-LM on top of the last layer (the paper's site) with this run's sizes."""
    from hetgraph import FusionConfig

    s = sizes(args)
    return FusionConfig(
        fusion_layers=("head",), k=s.k, graph={"left": 1, "right": 1}, adapter=s.adapter
    )


def hetgraph_lm(args: argparse.Namespace, model: Any, tokenizer: Any, store: Any, index: Any):
    """The adapter trained by example 02 if it exists under ``--out``, else an untrained one
    (zero gates: the base model's outputs, but retrieval still runs)."""
    from hetgraph import HetGraphLM

    adapter_dir = Path(args.out) / "adapter"
    if (adapter_dir / "training.json").is_file():
        return HetGraphLM.from_pretrained(adapter_dir, model, store, index, tokenizer=tokenizer)
    return HetGraphLM(model, store, index, fusion_config(args), tokenizer=tokenizer)


def train(args: argparse.Namespace, lm: Any, tokenized: Any, store: Any) -> Path:
    """Train (or resume) ``lm``'s adapter under ``--out/adapter``; returns that directory."""
    from hetgraph import EvalConfig, TrainingConfig, train_adapter

    s = sizes(args)
    config = TrainingConfig(
        max_steps=s.train_steps,
        batch_size=2,
        context_length=s.train_context,
        lr=1e-3,
        warmup_steps=max(1, s.train_steps // 10),
        eval_every=0,
        eval_tokens=s.eval_tokens,
        checkpoint_every=0,
        seed=0,
    )
    out = Path(args.out) / "adapter"
    train_split = tokenized.train.truncate(len(store) + 1)
    windows = EvalConfig(context_length=s.context_length, stride=s.stride, batch_size=4)
    result = train_adapter(
        lm,
        train_split,
        tokenized.valid,
        config,
        out,
        show_progress=not args.tiny,
        eval_config=windows,
    )
    print(f"trained {result.steps} steps; best valid perplexity {result.best_valid_ppl:.2f}")
    return out
