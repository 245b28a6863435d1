"""Neighbour features for a fused decoder layer: stored per-layer states vs the projected key.

Fusing inside decoder layer L, a neighbour node needs a representation of its corpus
token at layer L. Two options (``FusionConfig.neighbour_features``):

* ``"stored"``: the datastore stores every token's layer-L output (fp16, N·d·2 bytes per
  layer, ``DatastoreConfig.feature_layers``);
* ``"key"``: only the retrieval key is stored and the adapter's input projection learns
  the map to layer L (no extra storage).

Both adapters are trained with the same settings and seed on the same datastore and
compared on valid and test perplexity.

Usage: python benchmarks/features.py [--tokens 60000] [--layer -6] [--steps 120]
Writes benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from hetgraph.corpus import tokenize_corpus
from hetgraph.datastore import build_datastore
from hetgraph.evaluation import model_perplexity
from hetgraph.fusion import HetGraphLM
from hetgraph.index import DatastoreIndex
from hetgraph.models.layers import resolve_layer_index
from hetgraph.models.loading import load_model
from hetgraph.pipeline import RunConfig, set_threads
from hetgraph.training import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--layer", type=int, default=-6, help="fused decoder layer")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--out", default="runs/bench-features")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    run = RunConfig.default()
    model, tokenizer = load_model(run.model)
    layer = resolve_layer_index(model, args.layer)
    corpus = tokenize_corpus(run.corpus, tokenizer, show_progress=False)
    out = Path(args.out)
    ds_config = replace(run.datastore, max_tokens=args.tokens + 1, feature_layers=(layer,))
    store = build_datastore(
        model,
        tokenizer,
        corpus.train,
        out / "datastore",
        ds_config,
        corpus_fingerprint=corpus.fingerprint,
    )
    index_dir = out / "datastore" / "index"
    if (index_dir / "index.json").is_file():
        index = DatastoreIndex.load(index_dir, store)
    else:
        index = DatastoreIndex.build(store)
        index.save(index_dir)
    evaluation = run.evaluation
    windows = replace(evaluation, max_tokens=args.eval_tokens + 1)
    training = replace(run.training, max_steps=args.steps, eval_every=0, checkpoint_every=0)
    results = {}
    for source in ("stored", "key"):
        torch.manual_seed(0)
        fusion = replace(run.fusion, fusion_layers=(layer,), neighbour_features=source)
        lm = HetGraphLM(model, store, index, fusion, tokenizer=tokenizer)
        started = time.perf_counter()
        trained = train_adapter(
            lm, corpus.train.truncate(len(store) + 1), None, training, out / f"adapter-{source}"
        )
        results[source] = {
            "train_seconds": time.perf_counter() - started,
            "final_train_loss": (
                sum(trained.train_losses[-10:]) / min(10, len(trained.train_losses))
            ),
            "valid_ppl": model_perplexity(lm, corpus.valid, windows),
            "test_ppl": model_perplexity(lm, corpus.test, windows),
            "extra_bytes_per_token": (
                2 * store.features(layer).shape[1] if source == "stored" else 0
            ),
        }
    base = HetGraphLM(model, store, index, replace(run.fusion, fusion_layers=(layer,)))
    report = {
        "fused_layer": layer,
        "datastore_tokens": len(store),
        "steps": args.steps,
        "base_valid_ppl": model_perplexity(base, corpus.valid, windows),
        "base_test_ppl": model_perplexity(base, corpus.test, windows),
        "results": results,
        "better": min(results, key=lambda s: results[s]["valid_ppl"]),
    }
    path = Path(__file__).parent / "results" / "features.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
