"""kNN-LM on the embedded default, and datastore build speed vs a plain forward pass.

Builds a datastore of ``--tokens`` train tokens (default 100k) of the embedded Python docs
with the embedded SmolLM2-135M, an exact L2 index, and evaluates the base LM and the
kNN-LM (k = 32; λ and T tuned on ``--eval-tokens`` valid tokens) on ``--eval-tokens``
test tokens. The build's tokens/s is reported as a ratio to a plain, hook-free forward
of the full model over exactly the same windows, measured in the same run.

Usage: python benchmarks/knnlm.py [--model PATH] [--tokens 100000] [--eval-tokens 4096]
Writes benchmarks/results/knnlm.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hetgraph.corpus import tokenize_corpus
from hetgraph.corpus.windows import sliding_windows
from hetgraph.datastore import DatastoreConfig, build_datastore, split_arrays, window_batches
from hetgraph.datastore.build import batch_input_ids
from hetgraph.evaluation import EvalConfig, evaluate_base_knn, results_table
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.models.layers import model_device
from hetgraph.models.loading import load_model


def plain_forward_seconds(model, tokens, config: DatastoreConfig) -> float:
    batches = window_batches(
        sliding_windows(len(tokens) - 1, config.context_length, config.stride), config.batch_size
    )
    device = model_device(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch_input_ids(tokens, batch, device), use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument(
        "--speed-tokens",
        type=int,
        default=12_000,
        help="tokens of the interleaved build-vs-plain-forward speed comparison",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved build/forward pairs (median kept)"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    corpus = tokenize_corpus(None, tokenizer, show_progress=False)
    config = DatastoreConfig(context_length=512, stride=256, batch_size=4, max_tokens=args.tokens)
    tokens, _, _ = split_arrays(corpus.train, args.tokens)
    plain_forward_seconds(model, tokens[:600], config)  # warm-up
    work = Path(tempfile.mkdtemp(prefix="hetgraph-bench-"))
    try:
        # Speed: plain forward and build alternate over the same windows, so load drift on
        # a shared machine hits both alike; the median ratio is reported.
        speed_config = DatastoreConfig(
            context_length=512, stride=256, batch_size=4, max_tokens=args.speed_tokens
        )
        speed_tokens = tokens[: args.speed_tokens]
        runs = []
        for repeat in range(args.repeats):
            plain = plain_forward_seconds(model, speed_tokens, speed_config)
            target = work / f"speed{repeat}"
            start = time.perf_counter()
            build_datastore(
                model, tokenizer, corpus.train, target, speed_config, show_progress=False
            )
            build = time.perf_counter() - start
            shutil.rmtree(target, ignore_errors=True)
            runs.append({"plain_forward_s": plain, "build_s": build, "ratio": plain / build})
        # The datastore that kNN-LM uses: all --tokens train tokens.
        start = time.perf_counter()
        ds = build_datastore(
            model, tokenizer, corpus.train, work / "ds", config, show_progress=False
        )
        full_build_s = time.perf_counter() - start
        index = DatastoreIndex.build(ds, IndexConfig(), show_progress=False)
        # Same windows for valid and test; max_tokens limits both splits.
        eval_config = EvalConfig(
            context_length=512,
            stride=256,
            batch_size=4,
            k=32,
            max_tokens=args.eval_tokens + 1,
            valid_tokens=args.eval_tokens + 1,
        )
        start = time.perf_counter()
        results = evaluate_base_knn(
            model,
            tokenizer,
            ds,
            index,
            corpus.valid,
            corpus.test,
            config=eval_config,
            show_progress=False,
        )
        eval_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "model": type(model).__name__,
        "device": str(model_device(model)),
        "threads": args.threads,
        "datastore_tokens": len(ds),
        "dim": ds.dim,
        "runs": runs,
        "speed_tokens": args.speed_tokens,
        "build_over_plain_forward_speed_ratio": sorted(r["ratio"] for r in runs)[len(runs) // 2],
        "build_tokens_per_s": len(ds) / full_build_s,
        "eval": {k: v for k, v in results.items() if k != "grid"},
        "eval_seconds": eval_s,
    }
    path = Path(__file__).parent / "results" / "knnlm.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(results_table(results, title=f"kNN-LM, {len(ds)}-token datastore"))


if __name__ == "__main__":
    main()
