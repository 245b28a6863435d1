"""Scaling curve of the FAISS index: 10^5, 10^6 and 10^7 rows, on-disk IVF-PQ lists.

Sections (each saved to ``benchmarks/results/scaling.json`` as soon as it is done; running
the script again skips the sections already there — ``--redo NAME`` repeats one):

- ``datastore``: a real 100k-row datastore of the embedded Python docs read by the
  embedded SmolLM2-135M (width 576), and 1,000 real query states (the same LM over the
  valid split).
- ``rows_N`` for each size N: the keys are the real ones while N fits them; beyond that
  every row is a real key (drawn at random) plus Gaussian noise of 0.25 × that dimension's
  standard deviation (``"keys": "real+noise"``), written in chunks to an fp16 memmap on
  disk (never whole in RAM) and deleted after. For each: on-disk IVF-PQ build time
  (:func:`hetgraph.index.build_ondisk_index`: trained on a seeded sample, added in blocks),
  bytes per row, search latency per 1,000 queries at k = 32, recall@32 against exact search
  (exact = brute force on the same fp16 vectors, streamed in chunks), the same with exact
  re-ranking of 128 candidates, and the resident memory (RSS) of a fresh process that opens
  the on-disk index and searches it, next to the index size.
- ``past_ram``: a 2.2 GiB on-disk ``IVF1024,Flat`` index of 10^6 rows built inside a memory
  cgroup capped at 1 GiB and searched inside one capped at 512 MiB (:mod:`memory_cap`), with
  its resident and anonymous memory and recall; as a control, reading the lists file into
  memory under the same cap is killed. Skipped where no memory cgroup can be created.
- ``perplexity``: kNN-LM perplexity on the real 100k datastore with the exact index, the
  on-disk IVF-PQ index, and IVF-PQ + re-ranking.
- ``distributed``: ``benchmarks/results/distributed_throughput.json`` reported if present.

Usage: python benchmarks/scaling.py [--sizes 100000 1000000 10000000] [--threads 2]
Writes benchmarks/results/scaling.json and benchmarks/results/scaling.svg.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from hetgraph.index import DatastoreIndex, IndexConfig, build_ondisk_index
from hetgraph.index.rerank import rerank
from hetgraph.io import INDEX_FILE, INDEX_LISTS_FILE, atomic_write_json, cache_root, read_json

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "scaling.json"
K = 32
RERANK = 128
NOISE = 0.25
CHUNK = 262_144
#: Training sample (PQ64 k-means costs ~40 CPU-s per 8k rows here; 16k rows keep it short).
TRAIN_SIZE = 16_384

RSS_PROBE = r"""
import json, sys, time, numpy as np
def rss():
    # VmRSS counts the touched pages of the mmap'd lists file too (page cache, evictable);
    # RssAnon is the memory the process itself holds.
    fields = {}
    for line in open('/proc/self/status'):
        if line.startswith(('VmRSS', 'RssAnon', 'RssFile')):
            name, value = line.split(':')
            fields[name] = int(value.split()[0]) * 1024
    return fields
from hetgraph.index import DatastoreIndex, IndexConfig
base = rss()
index = DatastoreIndex.load(sys.argv[1], config=IndexConfig(nprobe=32, num_threads=2))
opened = rss()
q = np.load(sys.argv[2])
start = time.perf_counter(); _, ids = index.search(q, 32); elapsed = time.perf_counter() - start
searched = rss()
if len(sys.argv) > 3:
    np.save(sys.argv[3], ids)
print(json.dumps({"rss_after_imports": base["VmRSS"], "rss_after_open": opened["VmRSS"],
                  "rss_after_search": searched["VmRSS"],
                  "anon_after_search": searched.get("RssAnon"),
                  "anon_search_minus_imports": searched.get("RssAnon", 0) - base.get("RssAnon", 0),
                  "file_backed_after_search": searched.get("RssFile"),
                  "cold_search_s": elapsed}))
"""


BUILD_PROBE = r"""
import json, sys, time, numpy as np
from hetgraph.index import IndexConfig, build_ondisk_index
keys = np.load(sys.argv[1], mmap_mode="r")
config = IndexConfig(factory=sys.argv[3], train_size=16384, nprobe=32, num_threads=2,
                     shard_rows=int(sys.argv[4]), add_chunk_size=32768)
start = time.perf_counter()
build_ondisk_index(keys, sys.argv[2], config)
print(json.dumps({"build_s": time.perf_counter() - start}))
"""
#: Read the whole lists file into the process's own memory: what "loading the index" costs.
LOAD_WHOLE_PROBE = "import sys; data = open(sys.argv[1], 'rb').read(); print(len(data))"

#: The past-RAM section: IVF-Flat lists (2,304 B/row at width 576) make a 2.1 GiB index from
#: 10^6 rows, four times the search's memory cap and twice the build's.
PAST_RAM_ROWS = 1_000_000
PAST_RAM_FACTORY = "IVF1024,Flat"
PAST_RAM_SEARCH_CAP = 512 * 2**20
PAST_RAM_BUILD_CAP = 1024 * 2**20
PAST_RAM_SHARD_ROWS = 100_000


def save(results: dict) -> None:
    atomic_write_json(OUT, results)


def real_datastore(work: Path, threads: int) -> dict:
    from hetgraph.corpus import tokenize_corpus
    from hetgraph.datastore import DatastoreConfig, build_datastore
    from hetgraph.models.loading import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(None)
    corpus = tokenize_corpus(None, tokenizer, show_progress=False)
    start = time.perf_counter()
    config = DatastoreConfig(context_length=512, stride=256, batch_size=4, max_tokens=100_000)
    ds = build_datastore(model, tokenizer, corpus.train, work / "ds", config, show_progress=False)
    build_s = time.perf_counter() - start
    qcfg = dataclasses.replace(config, max_tokens=1001)
    qs = build_datastore(
        model, tokenizer, corpus.valid, work / "queries", qcfg, show_progress=False
    )
    np.save(work / "queries.npy", np.asarray(qs.keys[:1000], dtype=np.float32))
    return {
        "rows": len(ds),
        "dim": ds.dim,
        "build_s": build_s,
        "model": "SmolLM2-135M (embedded default)",
        "corpus": "embedded Python docs",
        "queries": "1000 real query states (the LM over the valid split)",
    }


def make_keys(work: Path, real: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` keys: the real ones, or real + noise written chunk by chunk to an fp16 memmap."""
    if n <= len(real):
        return real[:n], "real"
    path = work / f"keys_{n}.f16"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, real.shape[1]))
    std = np.asarray(real[:50_000], dtype=np.float32).std(axis=0)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        rng = np.random.default_rng([seed, lo])
        rows = np.asarray(real[np.sort(rng.integers(0, len(real), hi - lo))], dtype=np.float32)
        out[lo:hi] = rows + rng.standard_normal(rows.shape, dtype=np.float32) * (NOISE * std)
    out.flush()
    return np.load(path, mmap_mode="r"), "real+noise"


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids by squared L2, streaming the keys in chunks (never whole in RAM)."""
    heap = faiss.ResultHeap(len(queries), k)
    for lo in range(0, len(keys), CHUNK):
        block = np.asarray(keys[lo : lo + CHUNK], dtype=np.float32)
        dist, ids = faiss.knn(queries, block, k)
        heap.add_result(dist, ids + lo)
    heap.finalize()
    return heap.I


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(f[f >= 0]) & set(e)) for f, e in zip(found, exact, strict=True)]
    return float(np.sum(hits) / exact.size)


def factory_for(n: int) -> str:
    return "IVF1024,PQ64" if n <= 200_000 else "IVF2048,PQ64"


def size_section(work: Path, real: np.ndarray, queries: np.ndarray, n: int) -> dict:
    keys, kind = make_keys(work, real, n)
    start = time.perf_counter()
    exact = exact_topk(keys, queries, K)
    exact_s = time.perf_counter() - start
    factory = factory_for(n)
    config = IndexConfig(
        factory=factory,
        train_size=TRAIN_SIZE,
        nprobe=32,
        num_threads=2,
        shard_rows=1_000_000,
        add_chunk_size=65_536,
    )
    directory = work / f"index_{n}"
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    index = build_ondisk_index(keys, directory, config)
    build_s = time.perf_counter() - start
    index_bytes = sum((directory / f).stat().st_size for f in (INDEX_FILE, INDEX_LISTS_FILE))
    index.search(queries[:10], K)  # warm-up
    start = time.perf_counter()
    _, ids = index.search(queries, K)
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    _, candidates = index.search(queries, RERANK)
    _, reranked = rerank(keys, queries, candidates, K, "l2")
    rerank_s = time.perf_counter() - start
    np.save(work / "q.npy", queries)
    del index
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(directory), str(work / "q.npy")],
        check=True,
        capture_output=True,
        text=True,
    )
    rss = json.loads(probe.stdout.strip().splitlines()[-1])
    shutil.rmtree(directory, ignore_errors=True)
    if kind != "real":
        (work / f"keys_{n}.f16").unlink(missing_ok=True)
    return {
        "rows": n,
        "keys": kind,
        "factory": factory,
        "storage": "on-disk lists",
        "nprobe": 32,
        "train_size": TRAIN_SIZE,
        "build_s": build_s,
        "index_bytes": index_bytes,
        "bytes_per_row": index_bytes / n,
        "raw_fp16_bytes_per_row": 2 * real.shape[1],
        "search_ms_per_1000_queries": 1000 * search_s * 1000 / len(queries),
        "rerank_search_ms_per_1000_queries": 1000 * rerank_s * 1000 / len(queries),
        "recall_at_32": recall(ids, exact),
        "recall_at_32_reranked_128": recall(reranked, exact),
        "exact_search_s_per_1000_queries": exact_s * 1000 / len(queries),
        "rss": rss,
        "rss_search_minus_imports": rss["rss_after_search"] - rss["rss_after_imports"],
    }


def evict_from_page_cache(path: Path) -> None:
    """Drop a file's clean pages from the page cache, so a probe starts cold and every page it
    reads is charged to its own cgroup."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def past_ram_section(work: Path, real: np.ndarray, queries: np.ndarray) -> dict:
    """Build and search an on-disk index larger than the memory the process may hold.

    Both run in a memory cgroup (:mod:`memory_cap`) whose hard cap is below the index size;
    as a control, reading the lists file into memory under the search's cap is killed.
    """
    from memory_cap import capped_cgroup_root, run_capped

    if capped_cgroup_root() is None:
        return {
            "skipped": "no writable memory cgroup controller on this machine: the capped "
            "build and search need one (root, or a delegated cgroup)"
        }
    n = PAST_RAM_ROWS
    np.save(work / "q.npy", queries)
    keys, kind = make_keys(work, real, n, seed=1)
    exact = exact_topk(keys, queries, K)
    directory = work / "index_past_ram"
    shutil.rmtree(directory, ignore_errors=True)
    python = sys.executable
    build = run_capped(
        [
            python,
            "-c",
            BUILD_PROBE,
            str(work / f"keys_{n}.f16"),
            str(directory),
            PAST_RAM_FACTORY,
            str(PAST_RAM_SHARD_ROWS),
        ],
        PAST_RAM_BUILD_CAP,
    )
    if build["returncode"] != 0:
        raise RuntimeError(f"capped build failed: {build['stderr_tail']}")
    index_bytes = sum((directory / f).stat().st_size for f in (INDEX_FILE, INDEX_LISTS_FILE))
    ids_path = work / "past_ram_ids.npy"
    evict_from_page_cache(directory / INDEX_LISTS_FILE)
    search = run_capped(
        [python, "-c", RSS_PROBE, str(directory), str(work / "q.npy"), str(ids_path)],
        PAST_RAM_SEARCH_CAP,
    )
    if search["returncode"] != 0:
        raise RuntimeError(f"capped search failed: {search['stderr_tail']}")
    probe = json.loads(search.pop("stdout").strip().splitlines()[-1])
    evict_from_page_cache(directory / INDEX_LISTS_FILE)
    control = run_capped(
        [python, "-c", LOAD_WHOLE_PROBE, str(directory / INDEX_LISTS_FILE)], PAST_RAM_SEARCH_CAP
    )
    control.pop("stdout")
    result = {
        "rows": n,
        "keys": kind,
        "factory": PAST_RAM_FACTORY,
        "storage": "on-disk lists",
        "nprobe": 32,
        "index_bytes": index_bytes,
        "bytes_per_row": index_bytes / n,
        "build": {k: v for k, v in build.items() if k not in ("stdout", "stderr_tail")}
        | json.loads(build["stdout"].strip().splitlines()[-1])
        | {"shard_rows": PAST_RAM_SHARD_ROWS},
        "search": {k: v for k, v in search.items() if k != "stderr_tail"} | probe,
        "recall_at_32": recall(np.load(ids_path), exact),
        "control_read_lists_into_memory": {k: v for k, v in control.items() if k != "stderr_tail"},
    }
    shutil.rmtree(directory, ignore_errors=True)
    ids_path.unlink(missing_ok=True)
    (work / f"keys_{n}.f16").unlink(missing_ok=True)
    return result


def perplexity_section(work: Path, threads: int) -> dict:
    from hetgraph.corpus import tokenize_corpus
    from hetgraph.datastore import Datastore
    from hetgraph.evaluation import EvalConfig, evaluate_base_knn
    from hetgraph.models.loading import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(None)
    corpus = tokenize_corpus(None, tokenizer, show_progress=False)
    ds = Datastore.open(work / "ds")
    eval_config = EvalConfig(
        context_length=512, stride=256, batch_size=4, k=K, max_tokens=2049, valid_tokens=2049
    )
    ivf = IndexConfig(factory=factory_for(len(ds)), train_size=TRAIN_SIZE, nprobe=32, num_threads=2)
    indexes = {
        "exact (Flat)": DatastoreIndex.build(ds, IndexConfig(factory="Flat"), show_progress=False),
        "on-disk IVF-PQ": build_ondisk_index(ds, work / "ppl_index", ivf),
    }
    indexes["on-disk IVF-PQ + rerank 128"] = DatastoreIndex.load(
        work / "ppl_index", ds, config=dataclasses.replace(ivf, rerank=RERANK)
    )
    out = {"datastore_rows": len(ds), "eval_tokens": 2048}
    for name, index in indexes.items():
        res = evaluate_base_knn(
            model,
            tokenizer,
            ds,
            index,
            corpus.valid,
            corpus.test,
            config=eval_config,
            show_progress=False,
        )
        out[name] = {
            "base_ppl": res["base"]["ppl"],
            "knn_ppl": res["knn"]["ppl"],
            "lambda": res["knn"]["lambda"],
        }
    shutil.rmtree(work / "ppl_index", ignore_errors=True)
    return out


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "hetgraph-scaling"  # reproducible element ids
    import matplotlib.pyplot as plt

    rows = sorted((v for k, v in results.items() if k.startswith("rows_")), key=lambda r: r["rows"])
    if not rows:
        (RESULTS / "scaling.svg").unlink(missing_ok=True)
        return
    n = [r["rows"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(n, [r["search_ms_per_1000_queries"] for r in rows], "o-", label="IVF-PQ")
    axes[0].plot(
        n,
        [r["rerank_search_ms_per_1000_queries"] for r in rows],
        "s--",
        label="IVF-PQ + rerank 128",
    )
    axes[0].plot(
        n,
        [1000 * r["exact_search_s_per_1000_queries"] for r in rows],
        "^:",
        label="exact (brute force)",
    )
    axes[0].set_ylabel("ms per 1,000 queries (k=32)")
    axes[1].plot(n, [r["recall_at_32"] for r in rows], "o-", label="IVF-PQ")
    axes[1].plot(
        n, [r["recall_at_32_reranked_128"] for r in rows], "s--", label="IVF-PQ + rerank 128"
    )
    axes[1].set_ylabel("recall@32 vs exact")
    axes[1].set_ylim(0, 1)
    axes[2].plot(n, [r["index_bytes"] / 2**20 for r in rows], "o-", label="index on disk")
    axes[2].plot(
        n,
        [r["rss_search_minus_imports"] / 2**20 for r in rows],
        "s--",
        label="RSS to open + search",
    )
    axes[2].set_ylabel("MiB")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("rows")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.svg", metadata={"Date": None})
    plt.close(fig)


def discussion(results: dict) -> str:
    rows = sorted((v for k, v in results.items() if k.startswith("rows_")), key=lambda r: r["rows"])
    parts = [
        f"{r['rows']:,} rows ({r['keys']} keys, {r['factory']}): build {r['build_s']:.0f} s, "
        f"{r['bytes_per_row']:.1f} B/row on disk, {r['search_ms_per_1000_queries']:.0f} ms "
        f"per 1,000 queries, recall@32 {r['recall_at_32']:.3f} "
        f"({r['recall_at_32_reranked_128']:.3f} re-ranked from 128), RSS of a process "
        f"that opens and searches it {r['rss_search_minus_imports'] / 2**20:.0f} MiB "
        f"above its imports for a {r['index_bytes'] / 2**20:.0f} MiB index"
        for r in rows
    ]
    text = "; ".join(parts) + "." if parts else ""
    if parts:
        text += (
            " The RSS is VmRSS, which also counts the pages of the memory-mapped lists "
            "file that the search touched (page cache, which the kernel evicts and re-reads "
            "as needed); RssAnon, where recorded, is what the process holds itself. Most of "
            "that after opening an IVF-PQ index is FAISS's precomputed residual table "
            "(nlist x M x 256 floats: 128 MiB for IVF2048,PQ64), built on load whatever the "
            "number of rows; FAISS skips it above 2 GiB (precomputed_table_max_bytes)."
        )
    past = results.get("past_ram")
    if past and "skipped" not in past:
        search, build, control = (
            past["search"],
            past["build"],
            past["control_read_lists_into_memory"],
        )
        mib = 2**20
        text += (
            f" Past RAM: a {past['index_bytes'] / mib:,.0f} MiB on-disk {past['factory']} "
            f"index of {past['rows']:,} rows ({past['keys']} keys) was built in "
            f"{build['build_s']:.0f} s inside a memory cgroup capped at "
            f"{build['limit_bytes'] / mib:.0f} MiB (peak "
            f"{build['peak_cgroup_bytes'] / mib:.0f} MiB, page cache included) and "
            f"searched (1,000 queries, nprobe 32, recall@32 "
            f"{past['recall_at_32']:.3f}) inside a cap of {search['limit_bytes'] / mib:.0f} "
            f"MiB in {search['cold_search_s']:.1f} s, with "
            f"{(search['anon_after_search'] or 0) / mib:.0f} MiB of anonymous memory "
            f"({search['anon_search_minus_imports'] / mib:.0f} MiB above the imports); the "
            f"time is the price of the cap: each query's nprobe lists (about 70 MiB of "
            f"IVF-Flat codes) are mostly re-read from disk, where IVF-PQ's 32x smaller "
            f"codes would mostly stay cached; "
            f"reading the lists file into memory under the same cap was "
            + (
                "killed by the OOM killer"
                if control["killed_by_oom"]
                else f"not killed (exit {control['returncode']}): the cap did not hold"
            )
            + "."
        )
    elif past:
        text += f" Past-RAM section skipped: {past['skipped']}."
    missing = [s for s in results.get("sizes_requested", []) if f"rows_{s}" not in results]
    if missing:
        text += (
            f" Not measured (the run's time budget on a shared 2-core machine ran out "
            f"first; run the script again to add them): {missing} rows."
        )
    ppl = results.get("perplexity")
    if ppl:
        text += (
            " kNN-LM test perplexity on the real 100k datastore: "
            + ", ".join(f"{k} {v['knn_ppl']:.3f}" for k, v in ppl.items() if isinstance(v, dict))
            + f" (base LM {ppl['exact (Flat)']['base_ppl']:.3f})."
        )
    return (
        text + " Keys beyond the real datastore are real keys plus Gaussian noise, which "
        "spreads them more evenly than real states; recall on real keys at that size "
        "may differ. Measured on 2 shared CPU cores."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=cache_root() / "bench-scaling")
    parser.add_argument("--redo", nargs="*", default=[])
    parser.add_argument(
        "--budget-s", type=float, default=2400, help="start no new section after this many seconds"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    faiss.omp_set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    results = read_json(OUT) if OUT.is_file() else {}
    for name in args.redo:
        results.pop(name, None)
    results["sizes_requested"] = args.sizes
    if "datastore" not in results or not (args.work / "queries.npy").is_file():
        results["datastore"] = real_datastore(args.work, args.threads)
        save(results)
    from hetgraph.datastore import Datastore

    real = Datastore.open(args.work / "ds").keys
    queries = np.load(args.work / "queries.npy")
    # Real-key sizes and the perplexity first; then the noisy sizes while the budget lasts.
    sections = (
        [n for n in args.sizes if n <= len(real)]
        + ["perplexity", "past_ram"]
        + [n for n in args.sizes if n > len(real)]
    )
    for n in sections:
        name = n if isinstance(n, str) else f"rows_{n}"
        if name in results:
            continue
        if time.perf_counter() - started > args.budget_s:
            print(f"skipping {name}: past the --budget-s of {args.budget_s:.0f} s", flush=True)
            continue
        if n == "perplexity":
            results[name] = perplexity_section(args.work, args.threads)
        elif n == "past_ram":
            results[name] = past_ram_section(args.work, real, queries)
        else:
            results[name] = size_section(args.work, real, queries, n)
        save(results)
        print(name, json.dumps(results[name]), flush=True)
    dist_file = RESULTS / "distributed_throughput.json"
    results["distributed"] = (
        read_json(dist_file)
        if dist_file.is_file()
        else {"note": "benchmarks/results/distributed_throughput.json not written yet"}
    )
    results["discussion"] = discussion(results)
    plot(results)
    results["plots"] = (
        []
        if not (RESULTS / "scaling.svg").is_file()
        else [
            {
                "file": "scaling.svg",
                "caption": (
                    "On-disk IVF-PQ over 10^5-10^7 rows of width 576 (SmolLM2-135M keys; "
                    "beyond 10^5 real keys plus noise): search time per 1,000 queries at k=32, "
                    "recall@32 against exact search, and index size vs the resident memory of a "
                    "process that opens and searches it."
                ),
            }
        ]
    )
    save(results)
    print(results["discussion"])


if __name__ == "__main__":
    main()
