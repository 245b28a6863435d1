"""Retrieval cost of an encoded index against the raw one (issue 21, item 4).

For a datastore ``DS`` with its raw index (``DS/index``) and an encoder ``ENC`` with its
encoded index (``ENC/index``, ``hetgraph index build --datastore DS --encoder ENC``): index
bytes per row, search latency per 1,000 queries at k = 32 on one thread (torch and FAISS),
best of ``--repeats``, and the recall@32 of each index against its own exact search (1.0 for
a ``Flat`` index). The queries are the keys of 1,000 seeded random rows (raw for the raw
index, encoded through ``ENC`` for the encoded one: the encoder's time is included).

Usage: python benchmarks/encoder_retrieval.py --datastore DS --encoder ENC [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from hetgraph.datastore import Datastore
from hetgraph.encoder import EncodedIndex
from hetgraph.index import DatastoreIndex


def best_time(search, queries, k: int, repeats: int) -> tuple[float, np.ndarray]:
    times, ids = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = search(queries, k)
        times.append(time.perf_counter() - start)
    return min(times), ids


def exact_ids(keys: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(keys.shape[1])
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float((found[:, :, None] == exact[:, None, :]).any(2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datastore", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    store = Datastore.open(args.datastore)
    raw = DatastoreIndex.load(args.datastore / "index", store)
    raw.config.num_threads = 1
    encoded = EncodedIndex.load(args.encoder, store)
    faiss.omp_set_num_threads(1)
    rows = np.sort(np.random.default_rng(0).choice(len(store), args.queries, replace=False))
    queries = np.array(store.keys[rows], dtype=np.float32)
    raw_s, raw_ids = best_time(raw.search, queries, args.k, args.repeats)
    enc_s, enc_ids = best_time(encoded.search, queries, args.k, args.repeats)
    encoded_keys = np.load(args.encoder / "index" / "encoded_keys.npy", mmap_mode="r")
    figures = {}
    for name, index, seconds, ids, keys, q in (
        ("raw", raw, raw_s, raw_ids, np.asarray(store.keys), queries),
        (
            "encoded",
            encoded.index,
            enc_s,
            enc_ids,
            np.asarray(encoded_keys),
            encoded.encode_queries(queries).numpy(),
        ),
    ):
        size = (index.directory / "index.faiss").stat().st_size
        figures[name] = {
            "factory": index.factory,
            "dim": index.dim,
            "metric": index.metric,
            "index_bytes_per_row": size / len(store),
            "search_ms_per_1000_queries": 1000 * seconds * 1000 / len(queries),
            f"recall@{args.k}_vs_own_exact": recall(ids, exact_ids(keys, q, args.k, index.metric)),
        }
    figures["ratio"] = {
        "bytes": figures["encoded"]["index_bytes_per_row"] / figures["raw"]["index_bytes_per_row"],
        "speedup": figures["raw"]["search_ms_per_1000_queries"]
        / figures["encoded"]["search_ms_per_1000_queries"],
    }
    text = json.dumps(
        {"rows": len(store), "queries": len(queries), "k": args.k, "threads": 1, **figures},
        indent=2,
    )
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
