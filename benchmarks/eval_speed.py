"""GNN-LM evaluation speed against the base model's forward, with one retrieval per position
(``benchmarks/results/eval_speed.json``).

``hetgraph eval`` searches each position once, in the base model's pass, and hands those
neighbours to the GNN-LM pass (``lm(..., retrieval=...)``), which then builds the graph and
runs the adapter but does not search. This benchmark times, in one process and interleaved
(so that load on a shared machine hits all alike), on the same windows of test-split token
ids:

- ``base``: the base model's forward alone;
- ``search``: the base model's retrieval for those positions (the FAISS search);
- ``gnn_reused``: the GNN-LM forward given the base run's neighbours (what evaluation runs);
- ``gnn_searching``: the GNN-LM forward that searches itself (what evaluation ran before
  one retrieval per position, and what ``benchmarks/gnnlm.py`` still times).

No neighbour-state table is used. The adapter is the demo's (head, 2 × 256), untrained:
its cost does not depend on its weights. ``--datastore`` names a built store with its
index (default: the evidence protocol's 60k-row Python docs store).

    python benchmarks/eval_speed.py [--datastore runs/evidence-python/datastore] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hetgraph import Datastore, DatastoreIndex, FusionConfig, HetGraphLM
from hetgraph.io import atomic_write_json
from hetgraph.models.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "eval_speed.json"
ARMS = ("base", "search", "gnn_reused", "gnn_searching")


def timed(function) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datastore", type=Path, default=ROOT / "runs/evidence-python/datastore")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    store = Datastore.open(args.datastore, model=model, tokenizer=tokenizer)
    index = DatastoreIndex.load(args.datastore / "index", store)
    config = FusionConfig.from_dict(
        json.loads((ROOT / "hetgraph/configs/demo.json").read_text())["fusion"]
    )
    lm = HetGraphLM(model, store, index, config, tokenizer=tokenizer)
    # Token ids of stored text (a stand-in for test text: the timing does not depend on it).
    rows = args.batch_size * args.length
    ids = torch.from_numpy(store.tokens[:rows].astype("int64")).view(args.batch_size, -1)
    with torch.inference_mode():
        retrieval = lm(ids, output_retrieval=True).retrieval  # also warms every path up
        queries = model(ids, output_hidden_states=True).hidden_states[-1]
    arms = {
        "base": lambda: model(ids),
        "search": lambda: lm.engine.retrieve(queries),
        "gnn_reused": lambda: lm(ids, retrieval=retrieval),
        "gnn_searching": lambda: lm(ids),
    }
    seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats):
        for arm in ARMS:
            seconds[arm].append(timed(arms[arm]))
    median = {arm: statistics.median(values) for arm, values in seconds.items()}
    tokens = ids.numel()
    result = {
        "datastore_rows": len(store),
        "index": index.factory,
        "tokens_per_call": tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds": seconds,
        "tokens_per_s": {arm: tokens / value for arm, value in median.items()},
        "eval_ratio_gnn_over_base": median["base"] / median["gnn_reused"],
        "eval_ratio_gnn_searching_over_base": median["base"] / median["gnn_searching"],
        "search_share_of_gnn_searching": median["search"] / median["gnn_searching"],
    }
    result["discussion"] = (
        f"GNN-LM forwards over {args.batch_size} x {args.length} tokens on a "
        f"{len(store):,}-row store ({index.factory}), {args.threads} threads, median of "
        f"{args.repeats} interleaved repeats, no neighbour-state table: with the base run's "
        f"neighbours handed in (evaluation's GNN-LM pass) GNN-LM runs at "
        f"{result['eval_ratio_gnn_over_base']:.2f}x the base forward's tokens/s; searching "
        f"itself at {result['eval_ratio_gnn_searching_over_base']:.2f}x (the search is "
        f"{result['search_share_of_gnn_searching']:.0%} of that call). Measured on a shared "
        "machine: ratios within one run are comparable, absolute tokens/s are not."
    )
    atomic_write_json(OUT, result)
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
