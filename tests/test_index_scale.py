"""Indexes past RAM (on-disk IVF lists, shard-parallel builds), exact re-ranking, GPU
fallback and the ``auto`` layout rule."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest
import torch

from hetgraph.configuration import ConfigError
from hetgraph.distributed import DistributedContext, shard_range
from hetgraph.index import (
    DatastoreIndex,
    DatastoreIndexError,
    IndexConfig,
    build_ondisk_index,
    choose_layout,
    estimated_index_bytes,
    faiss_index as faiss_index_module,
    rerank,
)
from hetgraph.index.gpu import wants_gpu
from hetgraph.io import INDEX_FILE, INDEX_LISTS_FILE, INDEX_SHARDS_DIR
from hetgraph.verify import verify

N, D = 3000, 16


def _keys(n: int = N, d: int = D, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)).astype(np.float32) * 3
    x = centres[rng.integers(0, 20, n)] + rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float16)


def _queries(q: int = 40, d: int = D) -> np.ndarray:
    return _keys(q, d, seed=1).astype(np.float32)


def _config(factory: str = "IVF16,PQ4x4", **kw) -> IndexConfig:
    base = dict(
        factory=factory,
        nprobe=4,
        train_size=2000,
        shard_rows=700,
        add_chunk_size=256,
        num_threads=1,
    )
    return IndexConfig(**{**base, **kw})


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return sum(len(set(f) & set(e)) for f, e in zip(found, exact, strict=True)) / exact.size


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ4x4", "OPQ4,IVF16,PQ4x4"])
def test_ondisk_built_in_blocks_equals_in_memory(tmp_path, factory):
    keys = _keys()
    memory = DatastoreIndex.build(keys, _config(factory), show_progress=False)
    disk = build_ondisk_index(keys, tmp_path / "index", _config(factory))
    assert disk.on_disk and disk.ntotal == N
    assert sorted(p.name for p in (tmp_path / "index").iterdir() if not p.name.startswith(".")) == [
        "index.faiss",
        "index.ivfdata",
        "index.json",
    ]  # shards/ removed after the merge
    d_mem, i_mem = memory.search(_queries(), 10)
    d_disk, i_disk = disk.search(_queries(), 10)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_allclose(d_disk, d_mem, rtol=1e-5)


def test_ondisk_index_is_memory_mapped_not_loaded(tmp_path):
    build_ondisk_index(_keys(), tmp_path / "index", _config())
    index = DatastoreIndex.load(tmp_path / "index")
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert lists.filename == str(tmp_path / "index" / INDEX_LISTS_FILE)
    # index.faiss holds only the quantizers and the list header: the codes stay in the lists.
    assert (tmp_path / "index" / "index.faiss").stat().st_size < (
        tmp_path / "index" / INDEX_LISTS_FILE
    ).stat().st_size
    assert verify(tmp_path / "index").ok


@pytest.mark.parametrize("prefetch, threads, expected", [(None, 2, 2), (0, 2, 0), (5, 1, 5)])
def test_ondisk_prefetch_threads_follow_the_search_threads(tmp_path, prefetch, threads, expected):
    # FAISS's own default is 32 prefetch threads, whatever the cores
    build_ondisk_index(_keys(), tmp_path / "index", _config())
    config = _config(num_threads=threads, prefetch_threads=prefetch)
    index = DatastoreIndex.load(tmp_path / "index", config=config)
    index.search(_queries(4), 3)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index.index).invlists)
    assert lists.prefetch_nthread == expected


def test_prefetch_threads_must_be_a_count():
    with pytest.raises(ConfigError, match="prefetch_threads"):
        IndexConfig(prefetch_threads=-1)


class _SimulatedRank(DistributedContext):
    """A rank of a 2-process job played in one process: collectives are no-ops and
    ``run_on_main`` runs its function here (rank 0's work, done by whichever rank calls)."""

    def run_on_main(self, fn):
        return fn()

    def barrier(self) -> None:
        pass


def test_sharded_build_resumes_and_merges_to_same_results(tmp_path):
    keys, config = _keys(), _config()
    single = build_ondisk_index(keys, tmp_path / "single", config)
    # Rank 1 finishes its blocks first; the merge then names the block rank 0 still owes.
    with pytest.raises(DatastoreIndexError, match=r"shard-00000\.faiss is missing") as err:
        build_ondisk_index(keys, tmp_path / "two", config, distributed=_SimulatedRank(1, 2))
    assert "\n" not in str(err.value) and "again to resume" in str(err.value)
    blocks = sorted(p.name for p in (tmp_path / "two" / INDEX_SHARDS_DIR).glob("shard-*"))
    assert blocks == [f"shard-{b:05d}.faiss" for b in shard_range(5, 1, 2)]
    two = build_ondisk_index(keys, tmp_path / "two", config, distributed=_SimulatedRank(0, 2))
    for a, b in zip(single.search(_queries(), 10), two.search(_queries(), 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "two" / INDEX_SHARDS_DIR).exists()


def test_ondisk_build_shows_the_rows_rank_zero_adds(tmp_path, capsys):
    keys, config = _keys(), _config()
    build_ondisk_index(keys, tmp_path / "single", config)
    assert f"{N}/{N}" in capsys.readouterr().err
    with pytest.raises(DatastoreIndexError):  # rank 1: no bar, then rank 0 still owes blocks
        build_ondisk_index(keys, tmp_path / "two", config, distributed=_SimulatedRank(1, 2))
    assert "index IVF16,PQ4x4" not in capsys.readouterr().err
    build_ondisk_index(
        keys, tmp_path / "two", config, distributed=_SimulatedRank(0, 2), show_progress=True
    )
    mine = shard_range(5, 0, 2)
    rows = len(mine) * config.shard_rows
    assert f"{rows}/{rows}" in capsys.readouterr().err
    build_ondisk_index(keys, tmp_path / "quiet", config, show_progress=False)
    assert "index IVF16,PQ4x4" not in capsys.readouterr().err


_GLOO_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from hetgraph.distributed import init_distributed
    from hetgraph.index import IndexConfig, build_ondisk_index
    ctx = init_distributed("gloo")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 16)).astype(np.float16)
    config = IndexConfig(factory="IVF16,PQ4x4", nprobe=4, train_size=1500, shard_rows=400,
                         num_threads=1)
    index = build_ondisk_index(keys, sys.argv[1], config, distributed=ctx)
    ids = index.search(keys[:20].astype(np.float32), 5)[1]
    np.save(f"{sys.argv[1]}.rank{ctx.rank}.npy", ids)
""")


def test_two_process_gloo_build_matches_single_process(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(_GLOO_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    keys = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float16)
    config = IndexConfig(
        factory="IVF16,PQ4x4", nprobe=4, train_size=1500, shard_rows=400, num_threads=1
    )
    single = build_ondisk_index(keys, tmp_path / "one", config)
    expected = single.search(keys[:20].astype(np.float32), 5)[1]
    for rank in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / f"two.rank{rank}.npy"), expected)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rerank_recall_at_least_approximate_and_exact_when_all_candidates(tmp_path, metric):
    keys, queries = _keys(), _queries()
    exact = DatastoreIndex.build(
        keys, IndexConfig(factory="Flat", metric=metric), show_progress=False
    )
    d_exact, i_exact = exact.search(queries, 10)
    approx = DatastoreIndex.build(keys, _config(metric=metric), show_progress=False)
    recall_approx = _recall(approx.search(queries, 10)[1], i_exact)
    approx.config = dataclasses.replace(approx.config, rerank=300)
    recall_reranked = _recall(approx.search(queries, 10)[1], i_exact)
    assert recall_reranked >= recall_approx + 0.2, (recall_approx, recall_reranked)
    # Re-ranking every row is exact search, to the id.
    approx.config = dataclasses.replace(approx.config, rerank=N, nprobe=16)
    approx.index.nprobe = 16  # visit every list: all N rows are candidates
    d_all, i_all = approx.search(queries, 10)
    np.testing.assert_array_equal(i_all, i_exact)
    np.testing.assert_allclose(d_all, d_exact, rtol=1e-4, atol=1e-3)


def test_rerank_gathers_fp16_memmap_and_marks_missing(tmp_path):
    keys = _keys(50)
    np.save(tmp_path / "keys.npy", keys)
    memmap = np.load(tmp_path / "keys.npy", mmap_mode="r")
    q = _queries(3)
    candidates = np.array([[4, 7, -1, 2], [0, 1, 2, 3], [-1, -1, 9, 8]], dtype=np.int64)
    dist, ids = rerank(memmap, q, candidates, 3, "l2")
    full = ((q[:, None, :] - keys.astype(np.float32)[None]) ** 2).sum(-1)
    for row in range(3):
        valid = [c for c in candidates[row] if c >= 0]
        best = sorted(valid, key=lambda c: full[row, c])[:3]
        assert list(ids[row][ids[row] >= 0]) == best
    assert ids[2, 2] == -1 and np.isinf(dist[2, 2])
    np.testing.assert_allclose(dist[1], np.sort(full[1, :4])[:3], rtol=1e-5)


def test_rerank_needs_keys_and_loads_them_from_the_datastore(tmp_path):
    index = DatastoreIndex.build(_keys(), _config(rerank=40), show_progress=False)
    index.keys = None
    with pytest.raises(DatastoreIndexError, match="needs the datastore's keys"):
        index.search(_queries(), 5)


def test_ondisk_index_is_not_copied_elsewhere(tmp_path):
    index = build_ondisk_index(_keys(), tmp_path / "index", _config())
    assert index.save(tmp_path / "index") == tmp_path / "index"
    with pytest.raises(DatastoreIndexError, match="on-disk index lives in"):
        index.save(tmp_path / "other")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_lists_file_is_a_one_line_error_naming_it(tmp_path, damage):
    build_ondisk_index(_keys(), tmp_path / "index", _config())
    lists = tmp_path / "index" / INDEX_LISTS_FILE
    if damage == "truncate":
        with open(lists, "r+b") as f:
            f.truncate(lists.stat().st_size // 2)
    else:
        lists.unlink()
    with pytest.raises(DatastoreIndexError) as err:
        DatastoreIndex.load(tmp_path / "index")
    message = str(err.value)
    assert str(lists) in message and "\n" not in message and "rebuild it" in message
    report = verify(tmp_path / "index")
    assert not report.ok and any(str(lists) in p for p in report.problems)


def test_ondisk_needs_an_ivf_factory(tmp_path):
    with pytest.raises(DatastoreIndexError, match="on-disk lists need an IVF factory"):
        build_ondisk_index(_keys(), tmp_path / "index", _config("HNSW8"))


@pytest.mark.parametrize("keys", [np.zeros((0, 16), np.float16), np.zeros(16, np.float16)])
@pytest.mark.parametrize("build", ["on_disk", "in_memory"])
def test_empty_or_flat_keys_are_refused_by_both_builds(tmp_path, keys, build):
    # (the on-disk build used to fail in math.log2 while choosing the factory)
    with pytest.raises(DatastoreIndexError, match=r"keys must be a non-empty \[N, d\] array"):
        if build == "on_disk":
            build_ondisk_index(keys, tmp_path / "index", _config())
        else:
            DatastoreIndex.build(keys, _config(), show_progress=False)
    assert not (tmp_path / "index").exists()


def test_both_builds_name_a_factory_faiss_cannot_build(tmp_path):
    for build in (
        lambda c: build_ondisk_index(_keys(), tmp_path / "index", c),
        lambda c: DatastoreIndex.build(_keys(), c, show_progress=False),
    ):
        with pytest.raises(DatastoreIndexError, match="FAISS cannot build index 'IVF16,PQ5'"):
            build(_config("IVF16,PQ5"))


def test_auto_layout_rule():
    # Small: exact search in memory.
    assert choose_layout(10_000, 576, IndexConfig(), available=2**34) == ("Flat", False)
    # Flat over 900k × 1536 is 5.5 GB: more than half of 8 GiB free -> on-disk IVF-PQ.
    factory, on_disk = choose_layout(900_000, 1536, IndexConfig(), available=2**33)
    assert on_disk and factory.startswith("IVF") and factory.endswith("PQ64")
    # Beyond ONDISK_ROW_LIMIT rows always on disk; an explicit factory stays as asked.
    assert choose_layout(60_000_000, 576, IndexConfig(), available=2**40)[1]
    assert choose_layout(60_000_000, 576, IndexConfig(factory="IVF4096,PQ64"), available=2**40) == (
        "IVF4096,PQ64",
        False,
    )
    assert choose_layout(5000, 16, IndexConfig(on_disk=True))[1]
    assert estimated_index_bytes("IVF4096,PQ64", 10**6, 576) == 10**6 * 72 + 4 * 576 * 4096
    assert estimated_index_bytes("Flat", 10, 576) == 10 * 576 * 4
    assert estimated_index_bytes("IVF1024,SQfp16", 200_000, 576) == (
        200_000 * (2 * 576 + 8) + 4 * 576 * 1024
    )
    assert estimated_index_bytes("SQ8", 10, 576) == 10 * 576
    assert estimated_index_bytes("IVF16,SQ4", 10, 576) == 10 * (288 + 8) + 4 * 576 * 16


def test_gpu_is_used_only_for_cuda_queries_when_available(monkeypatch):
    index = DatastoreIndex.build(_keys(), _config(), show_progress=False)
    expected = index.search(_queries(), 5)
    # faiss-cpu: no GPU, CPU tensors and numpy arrays: the CPU path.
    assert not wants_gpu(torch.from_numpy(_queries()), "auto", on_disk=False)
    assert not wants_gpu(_queries(), "auto", on_disk=False)
    for a, b in zip(index.search(torch.from_numpy(_queries()), 5), expected, strict=True):
        np.testing.assert_array_equal(a, b)
    # With GPU FAISS (simulated): the index is copied once and the copy searched.
    copies = []
    monkeypatch.setattr(faiss_index_module, "wants_gpu", lambda q, setting, on_disk: True)
    monkeypatch.setattr(
        faiss_index_module, "to_all_gpus", lambda ix: copies.append(ix) or faiss.clone_index(ix)
    )
    for _ in range(2):
        for a, b in zip(index.search(_queries(), 5), expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(copies) == 1


def test_cli_builds_an_on_disk_index_with_reranking(tmp_path, capsys):
    from hetgraph.cli import main
    from hetgraph.datastore import Datastore
    from hetgraph.testing import save_tiny_model, write_word_corpus

    save_tiny_model(tmp_path / "model", "qwen2")
    write_word_corpus(tmp_path / "corpus")
    ds = tmp_path / "ds"
    assert (
        main(
            [
                "datastore",
                "build",
                "--model",
                str(tmp_path / "model"),
                "--corpus",
                str(tmp_path / "corpus"),
                "--threads",
                "1",
                "--out",
                str(ds),
                "--context-length",
                "64",
                "--stride",
                "32",
                "--no-index",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "index",
                "build",
                "--datastore",
                str(ds),
                "--factory",
                "IVF4,Flat",
                "--on-disk",
                "--rerank",
                "16",
                "--nprobe",
                "1",
                "--shard-rows",
                "500",
            ]
        )
        == 0
    )
    assert "(lists on disk)" in capsys.readouterr().out
    store = Datastore.open(ds)
    index = DatastoreIndex.load(ds / "index", store)
    assert index.on_disk and index.config.rerank == 16 and index.keys is not None
    exact = DatastoreIndex.build(store, IndexConfig(factory="Flat"), show_progress=False)
    queries = np.asarray(store.keys[:30], dtype=np.float32) + 0.01
    np.testing.assert_array_equal(index.search(queries, 1)[1], exact.search(queries, 1)[1])
    # Back to an in-memory index: the on-disk lists go with the old index.
    assert main(["index", "build", "--datastore", str(ds), "--factory", "Flat", "--in-memory"]) == 0
    assert not (ds / "index" / INDEX_LISTS_FILE).exists()
    assert not DatastoreIndex.load(ds / "index", store).on_disk


def test_the_pipeline_builds_the_layout_its_index_config_asks_for(tmp_path):
    # The run config's index section is what `hetgraph index build` takes: on_disk counts
    # (it was once ignored by the demo pipeline, which always built in memory).
    from hetgraph.corpus import tokenize_corpus
    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import RunConfig, prepare_datastore
    from hetgraph.testing import save_tiny_model, tiny_run_config, write_word_corpus

    save_tiny_model(tmp_path / "model", "qwen2")
    write_word_corpus(tmp_path / "corpus")

    def config(on_disk):
        return RunConfig.from_dict(
            {
                **tiny_run_config(),
                "model": str(tmp_path / "model"),
                "corpus": {"path": str(tmp_path / "corpus")},
                "out_dir": str(tmp_path / "run"),
                "index": {"factory": "IVF4,Flat", "nprobe": 4, "on_disk": on_disk},
            }
        )

    model, tokenizer = load_model(str(tmp_path / "model"))
    corpus = tokenize_corpus(config(True).corpus, tokenizer, show_progress=False)
    index_dir = tmp_path / "run" / "datastore" / "index"
    built = []
    for on_disk in (True, True, False, None):
        _, index = prepare_datastore(model, tokenizer, corpus, config(on_disk), tmp_path / "run")
        built.append((index_dir / INDEX_FILE).stat().st_mtime_ns)
        # None: the size rule, which keeps this tiny index in memory; the saved one is reused
        assert index.on_disk is (on_disk is True), on_disk
        assert (index_dir / INDEX_LISTS_FILE).exists() is (on_disk is True), on_disk
        assert index.factory == "IVF4,Flat"
    assert built[1] == built[0] and built[3] == built[2] != built[1]  # reused, rebuilt, reused


def test_the_pipeline_keeps_a_saved_index_when_the_free_memory_changes(tmp_path, monkeypatch):
    # Left to the size rule (factory auto, on_disk unset), a run must not rebuild its index
    # because less memory happens to be free now than when it was built.
    from hetgraph.corpus import tokenize_corpus
    from hetgraph.index import ondisk
    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import RunConfig, prepare_datastore
    from hetgraph.testing import save_tiny_model, tiny_run_config, write_word_corpus

    save_tiny_model(tmp_path / "model", "qwen2")
    write_word_corpus(tmp_path / "corpus")
    config = RunConfig.from_dict(
        {
            **tiny_run_config(),
            "model": str(tmp_path / "model"),
            "corpus": {"path": str(tmp_path / "corpus")},
            "out_dir": str(tmp_path / "run"),
        }
    )
    model, tokenizer = load_model(str(tmp_path / "model"))
    corpus = tokenize_corpus(config.corpus, tokenizer, show_progress=False)
    _, index = prepare_datastore(model, tokenizer, corpus, config, tmp_path / "run")
    saved = (tmp_path / "run" / "datastore" / "index" / INDEX_FILE).stat().st_mtime_ns
    assert index.factory == "Flat" and not index.on_disk
    monkeypatch.setattr(ondisk, "available_memory_bytes", lambda: 1)
    _, again = prepare_datastore(model, tokenizer, corpus, config, tmp_path / "run")
    assert again.factory == "Flat" and not again.on_disk
    assert (tmp_path / "run" / "datastore" / "index" / INDEX_FILE).stat().st_mtime_ns == saved
