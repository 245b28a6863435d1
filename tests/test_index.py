"""FAISS index over a real (tiny-model) datastore: exact self-retrieval, factories, persistence."""

from __future__ import annotations

import re
import shutil

import faiss
import numpy as np
import pytest
import torch

from hetgraph.cli import main
from hetgraph.configuration import ConfigError
from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.index import DatastoreIndex, IndexConfig, auto_factory
from hetgraph.index.files import DatastoreIndexError
from hetgraph.index.training import check_factory, parse_factory
from hetgraph.testing import FAMILIES, byte_tokenizer, tiny_causal_lm


def make_split(num_tokens: int, seed: int = 0) -> TokenizedSplit:
    tokens = np.random.default_rng(seed).integers(0, 256, num_tokens).astype(np.int32)
    return TokenizedSplit("train", tokens, np.zeros(num_tokens, np.int32), ["doc"])


@pytest.fixture(scope="module")
def datastores(tmp_path_factory):
    tok = byte_tokenizer()
    root = tmp_path_factory.mktemp("ds")
    return {
        family: build_datastore(
            tiny_causal_lm(family),
            tok,
            make_split(1200),
            root / family,
            DatastoreConfig(context_length=64, stride=32, batch_size=4),
            show_progress=False,
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_search_finds_each_key_itself(datastores, family, metric):
    ds = datastores[family]
    index = DatastoreIndex.build(
        ds, IndexConfig(factory="Flat", metric=metric), show_progress=False
    )
    assert index.ntotal == len(ds) and index.dim == ds.dim
    distances, ids = index.search(ds.keys, 4)
    assert distances.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (len(ds), 4)
    keys = ds.keys.astype(np.float32)
    if metric == "l2":
        np.testing.assert_array_equal(ids[:, 0], np.arange(len(ds)))
        np.testing.assert_allclose(distances[:, 0], 0.0, atol=1e-3)
        expected = ((keys[:, None, :] - keys[ids]) ** 2).sum(-1)
    else:
        expected = -(keys[:, None, :] * keys[ids]).sum(-1)
    np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-2)
    assert (np.diff(distances, axis=1) >= -1e-4).all()  # smaller = closer, sorted


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8x4", "OPQ8,IVF16,PQ8x4", "HNSW16"])
def test_approximate_factories_build_and_search(datastores, factory, tmp_path):
    ds = datastores["qwen2"]
    config = IndexConfig(factory=factory, nprobe=16, add_chunk_size=500, seed=1, num_threads=1)
    index = DatastoreIndex.build(ds, config, show_progress=False)
    queries = torch.from_numpy(ds.keys[:50].astype(np.float32)).to(torch.bfloat16)  # any dtype
    distances, ids = index.search(queries, 5)
    assert distances.shape == ids.shape == (50, 5)
    assert ((ids >= 0) & (ids < len(ds))).all()
    # Non-quantised indexes find the query itself; PQ ones find it among the top 5 mostly.
    recall = np.mean([i in row for i, row in enumerate(ids)])
    assert recall >= (0.9 if "PQ" not in factory else 0.5)
    index.save(tmp_path / "ix")
    loaded = DatastoreIndex.load(tmp_path / "ix", ds)
    assert loaded.factory == factory
    _, i2 = loaded.search(queries, 5)
    np.testing.assert_array_equal(i2, ids)


def test_save_load_checks_datastore(datastores, tmp_path):
    ds, other = datastores["qwen2"], datastores["llama"]
    index = DatastoreIndex.build(ds, IndexConfig(), show_progress=False)
    assert index.factory == "Flat"
    index.save(tmp_path / "ix")
    DatastoreIndex.load(tmp_path / "ix", ds)
    with pytest.raises(ValueError, match=r"another datastore.*fingerprint"):
        DatastoreIndex.load(tmp_path / "ix", other)
    with pytest.raises(ValueError, match="no index"):
        DatastoreIndex.load(tmp_path / "nothing")


def test_bad_k_and_queries_raise(datastores):
    ds = datastores["gpt2"]
    index = DatastoreIndex.build(ds.keys[:10], IndexConfig(), show_progress=False)
    with pytest.raises(ValueError, match="exceeds the 10 vectors"):
        index.search(ds.keys[:2], 11)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(ds.keys[:2], 0)
    with pytest.raises(ValueError, match="shape"):
        index.search(np.zeros((2, 7), np.float32), 1)
    _, ids = index.search(ds.keys[:3], 10)  # k == N is fine
    assert sorted(ids[0]) == list(range(10))


def test_auto_factory_and_config_json(tmp_path):
    assert auto_factory(10_000, 576) == "Flat"
    assert auto_factory(999_999, 32) == "Flat"
    assert auto_factory(4_000_000, 576) == "IVF8192,PQ64"
    assert auto_factory(100_000_000, 1536) == "IVF32768,PQ64"
    assert auto_factory(2_000_000, 40) == "IVF4096,PQ40"
    config = IndexConfig(factory="HNSW32", metric="ip", nprobe=8)
    config.to_json_file(tmp_path / "c.json")
    assert IndexConfig.from_json_file(tmp_path / "c.json") == config
    with pytest.raises(ValueError, match="metric"):
        IndexConfig(metric="cosine")
    with pytest.raises(ValueError, match="'NotAnIndex' is not one hetgraph builds"):
        DatastoreIndex.build(
            np.zeros((10, 30), np.float16), IndexConfig(factory="NotAnIndex"), show_progress=False
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("on_disk", "yes"),
        ("shard_rows", 0),
        ("shard_rows", "10"),
        ("shard_rows", True),
        ("rerank", -1),
        ("rerank", 1.5),
        ("gpu", "always"),
    ],
)
def test_index_config_rejects_bad_scale_fields_naming_them(field, value):
    for build in (
        lambda: IndexConfig(**{field: value}),
        lambda: IndexConfig.from_dict({field: value}),
    ):
        with pytest.raises(ConfigError) as raised:
            build()
        assert raised.value.key == field and field in str(raised.value)
    assert IndexConfig(on_disk=True, shard_rows=np.int64(5), rerank=64, gpu="never").rerank == 64


def test_fp16_scalar_quantizer_is_lossless_over_fp16_keys():
    """The datastore stores keys in float16, so ``SQfp16`` codes hold them exactly: every
    code decodes to its key bit for bit, and an ``IVF…,SQfp16`` index finds the same
    neighbours as ``IVF…,Flat`` (same seeded coarse quantizer) in half the memory. The
    distances agree to float32 rounding only: the two scan kernels add the squares in
    different orders, and which order depends on the CPU's SIMD width."""
    rng = np.random.default_rng(0)
    keys = (rng.standard_normal((2000, 32)) * 3).astype(np.float16)
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    found = {}
    for codes in ("Flat", "SQfp16"):
        index = DatastoreIndex.build(
            keys, IndexConfig(factory=f"IVF16,{codes}", nprobe=4), show_progress=False
        )
        found[codes] = index.search(queries, 8)
    # Exact by construction: fp16 -> fp16 codes -> float32 is a lossless round trip.
    ivf = faiss.extract_index_ivf(index.index)
    ivf.make_direct_map()
    decoded = ivf.reconstruct_n(0, len(keys))
    np.testing.assert_array_equal(decoded, keys.astype(np.float32))
    np.testing.assert_array_equal(found["SQfp16"][1], found["Flat"][1])
    np.testing.assert_allclose(found["SQfp16"][0], found["Flat"][0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- factory strings checked before FAISS
#: (factory, part of the one error line). HNSW0 aborts and HNSW1 segfaults the interpreter in
#: FAISS's add; IDMap wrappers refuse add; the rest were FAISS tracebacks at training time.
BAD_FACTORIES = [
    ("HNSW0", "HNSW needs M >= 2"),
    ("HNSW1", "HNSW needs M >= 2"),
    ("IDMap,Flat", "not one hetgraph builds"),
    ("IDMap2,Flat", "not one hetgraph builds"),
    ("Flat,IDMap", "not one hetgraph builds"),
    ("IVF4,Flat,RFlat", "not one hetgraph builds"),
    ("IVF4", "needs an encoding"),
    ("IVF0,Flat", "at least 1 list"),
    ("PQ5", "PQ5 splits the width 32"),
    ("IVF4,PQ8x0", "1 to 16 bits"),
    ("OPQ5,IVF4,PQ8", "OPQ5 splits the width 32"),
    ("PCA64,Flat", "cannot output more dimensions"),
    ("IVF99999,Flat", "IVF99999 (a key per list) needs at least 99999 training keys"),
    ("IVF2000000000,Flat", "lists of index 'IVF2000000000,Flat' would need"),
]


@pytest.mark.parametrize("factory, message", BAD_FACTORIES)
def test_cli_refuses_bad_factories_in_one_line_writing_nothing(
    datastores, factory, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1G")
    # parse_factory alone first: a regression must not reach FAISS and crash the interpreter.
    if "training keys" not in message:
        with pytest.raises(DatastoreIndexError, match=message):
            parse_factory(factory, 32)
    ds = datastores["qwen2"]
    copy = shutil.copytree(ds.path, tmp_path / "ds")
    assert (
        main(["index", "build", "--datastore", str(copy), "--factory", factory, "--threads", "1"])
        == 2
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0] and "--factory" in lines[0] and repr(factory) in lines[0]
    assert not (copy / "index").exists()


@pytest.mark.parametrize(
    "factory, train_size, message",
    [
        (
            "PQ4x10",
            500,
            "PQ4x10 (1024 centroids per sub-quantizer) needs at least 1024 training "
            "keys but there are only 500 training keys",
        ),
        ("OPQ8,Flat", 200, "OPQ8 (it trains a 256-centroid PQ) needs at least 256"),
        ("PCA16,Flat", 10, "PCA16 (a key per output dimension) needs at least 16"),
        ("IVF16,Flat", 10, "use at most IVF10"),
    ],
)
def test_factories_needing_more_training_keys_are_refused(factory, train_size, message):
    keys = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float16)
    with pytest.raises(DatastoreIndexError, match=re.escape(message)):
        DatastoreIndex.build(
            keys, IndexConfig(factory=factory, train_size=train_size), show_progress=False
        )


def test_hnsw_links_beyond_memory_are_refused_before_adding(monkeypatch):
    keys = np.zeros((1000, 32), np.float16)
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1M")
    with pytest.raises(
        DatastoreIndexError,
        match=r"links of index 'HNSW1000' over 1000 keys "
        r"would need 8.1 MB.*smaller HNSW M",
    ):
        DatastoreIndex.build(keys, IndexConfig(factory="HNSW1000"), show_progress=False)


@pytest.mark.parametrize(
    "factory", ["HNSW2", "HNSW8,SQ8", "OPQ8_16,IVF4,PQ8x4", "PCAR16,Flat", "IVF4,SQbf16"]
)
def test_supported_boundary_factories_build_and_search(factory):
    keys = np.random.default_rng(1).standard_normal((600, 32)).astype(np.float16)
    index = DatastoreIndex.build(
        keys, IndexConfig(factory=factory, nprobe=4, num_threads=1), show_progress=False
    )
    _, ids = index.search(keys[:20], 3)
    assert index.ntotal == 600 and ((ids >= 0) & (ids < 600)).all()


def test_check_factory_answers_before_anything_is_built():
    check_factory("auto", 10, 32)
    check_factory("IVF16,PQ8", 5000, 32)
    with pytest.raises(DatastoreIndexError, match="use at most IVF4224"):
        check_factory("IVF99999,Flat", 4224, 32)
    with pytest.raises(DatastoreIndexError, match=r"only 300 training keys \(of 5000; "):
        check_factory("IVF400,Flat", 5000, 32, train_size=300)
    with pytest.raises(DatastoreIndexError, match="HNSW needs M >= 2"):
        check_factory("HNSW1", 5000, 32)
