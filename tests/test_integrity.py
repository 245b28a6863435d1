"""Integrity of datastores, indexes and adapters: records, cheap checks on open, ``verify``,
safe ``--overwrite``, recovery of damaged datastores, non-finite keys, locks, full disks."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import Datastore, DatastoreConfig, DatastoreError, build_datastore
from hetgraph.errors import HetgraphError
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.fusion.persistence import AdapterFileError
from hetgraph.index import DatastoreIndex, DatastoreIndexError, IndexConfig
from hetgraph.io import DATASTORE_METADATA, INDEX_DIR, read_json
from hetgraph.locking import LOCK_FILE, LockError
from hetgraph.storage import StorageError
from hetgraph.testing import byte_tokenizer, tiny_causal_lm
from hetgraph.verify import VerificationError, verify

CONFIG = DatastoreConfig(context_length=32, stride=16, batch_size=2, feature_layers=(0,))
ADAPTER = dict(hidden_channels=16, num_layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
DATASTORE_FILES = [
    "keys.npy",
    "next_tokens.npy",
    "tokens.npy",
    "doc_ids.npy",
    "positions.npy",
    "features_0.npy",
    "metadata.json",
    "doc_names.json",
]
ALL_FILES = [
    *DATASTORE_FILES,
    "index/index.faiss",
    "index/index.json",
    "adapter/adapter.safetensors",
    "adapter/adapter_config.json",
]


def make_split(num_tokens: int = 160, seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, num_tokens).astype(np.int32)
    doc_ids = np.repeat(np.arange(4, dtype=np.int32), num_tokens // 4)
    return TokenizedSplit("train", tokens, doc_ids, [f"doc{i}" for i in range(4)])


def build(out: Path, model=None, **kwargs) -> Datastore:
    return build_datastore(
        model or tiny_causal_lm("qwen2"),
        byte_tokenizer(),
        make_split(),
        out,
        CONFIG,
        show_progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A datastore with its index and an adapter saved into it (``adapter/``)."""
    root = tmp_path_factory.mktemp("pristine")
    model = tiny_causal_lm("qwen2")
    store = build(root / "ds", model)
    index = DatastoreIndex.build(store, IndexConfig(factory="Flat"), show_progress=False)
    index.save(root / "ds" / INDEX_DIR)
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=ADAPTER))
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.fill_(0.5)
    lm.save_pretrained(root / "ds" / "adapter")
    return root / "ds"


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    copy = tmp_path / "ds"
    shutil.copytree(pristine, copy)
    return copy


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- verify ---------------------------------------------------------------------------------


def test_verify_passes_a_sound_tree_and_covers_every_file(tree):
    report = verify(tree)
    assert report.ok, str(report)
    assert report.kinds == ["datastore", "index", "adapter"]
    assert {str(p.relative_to(tree)) for p in report.checked} >= set(ALL_FILES) - {"doc_names.json"}
    assert str(report).startswith("OK:")


@pytest.mark.parametrize("name", ALL_FILES)
@pytest.mark.parametrize("where", [0.0, 0.37, 0.5, 0.81, 1.0])
def test_verify_names_a_file_with_one_flipped_byte(tree, name, where):
    path = tree / name
    flip(path, min(int(where * path.stat().st_size), path.stat().st_size - 1))
    report = verify(tree)
    assert not report.ok
    assert any(path.name in problem for problem in report.problems), report.problems
    assert all(("rebuild it" in p or "train it again" in p) for p in report.problems), str(report)
    assert "DAMAGED" in str(report) and path.name in str(report)
    with pytest.raises(VerificationError, match=path.name.replace(".", r"\.")):
        report.raise_if_damaged()


def test_verify_refuses_a_directory_hetgraph_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    report = verify(tmp_path)
    assert not report.ok and "holds no hetgraph datastore" in report.problems[0]
    assert not verify(tmp_path / "absent").ok


# -- cheap checks on open -------------------------------------------------------------------

DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size)),
    "body": lambda p: flip(p, p.stat().st_size - 3),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["keys.npy", "tokens.npy", "features_0.npy"])
def test_open_refuses_a_damaged_array_naming_the_file_and_the_fix(tree, damage, name):
    DAMAGE[damage](tree / name)
    with pytest.raises(DatastoreError) as info:
        store = Datastore.open(tree)
        store.features(0)
    message = str(info.value)
    assert name in message and "--overwrite" in message
    assert "allow_pickle" not in message and "mmap length" not in message


@pytest.mark.parametrize(
    "damage, message",
    [("deleted", "keys.npy is missing"), ("truncated", "keys.npy is damaged (truncated)")],
)
def test_file_problems_are_typed_records_and_name_each_file_once(tree, damage, message):
    from hetgraph.datastore.integrity import (
        FileProblem,
        array_problems,
        datastore_problems,
        recorded_file_problems,
    )
    from hetgraph.datastore.metadata import DatastoreMetadata, rebuild_hint

    DAMAGE[damage](tree / "keys.npy")
    metadata = DatastoreMetadata.load(tree / DATASTORE_METADATA)
    assert array_problems(tree, metadata) == [FileProblem("keys.npy", message)]
    recorded = recorded_file_problems(tree, metadata, full=True)
    assert [problem.file for problem in recorded] == ["keys.npy"]
    assert str(recorded[0]) == recorded[0].message and recorded[0].message.startswith("keys.npy ")
    # The header problem and the recorded-size problem are one problem of one file.
    assert datastore_problems(tree)[1] == [f"{tree}/{message}; {rebuild_hint(tree)}"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[1, 2]",
        '{"format_version": 1}',
        '{"format_version": 1, "num_entries": "ten", "dim": 4}',
    ],
)
def test_malformed_metadata_json_is_a_typed_error_naming_it(tree, text):
    (tree / DATASTORE_METADATA).write_text(text)
    with pytest.raises(DatastoreError, match=r"metadata\.json") as info:
        Datastore.open(tree)
    assert "Expecting value" not in str(info.value) and "--overwrite" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "body"])
def test_damaged_index_faiss_is_a_typed_error_naming_it(tree, damage):
    DAMAGE[damage](tree / INDEX_DIR / "index.faiss")
    with pytest.raises(DatastoreIndexError, match=r"index\.faiss.*hetgraph index build"):
        DatastoreIndex.load(tree / INDEX_DIR, Datastore.open(tree))


def test_old_index_faiss_without_record_still_gives_a_typed_error(tree):
    meta = read_json(tree / INDEX_DIR / "index.json")
    del meta["integrity"], meta["checksum"]
    (tree / INDEX_DIR / "index.json").write_text(json.dumps(meta))
    DatastoreIndex.load(tree / INDEX_DIR)  # an older index, sound: loads
    for damage in ("truncated", "empty", "garbage"):
        DAMAGE[damage](tree / INDEX_DIR / "index.faiss")
        with pytest.raises(DatastoreIndexError, match=r"index\.faiss is damaged"):
            DatastoreIndex.load(tree / INDEX_DIR)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"format_version": 1}',
        '{"format_version": 1, "factory": "Flat", "metric": "cos", '
        '"num_vectors": 3, "dim": 4, "config": {}}',
    ],
)
def test_malformed_index_json_is_a_typed_error_naming_it(tree, text):
    (tree / INDEX_DIR / "index.json").write_text(text)
    with pytest.raises(DatastoreIndexError, match=r"index\.json"):
        DatastoreIndex.load(tree / INDEX_DIR)


def test_index_whose_metric_disagrees_with_index_json_is_refused(tree, tmp_path):
    store = Datastore.open(tree)
    DatastoreIndex.build(store, IndexConfig(factory="Flat", metric="ip"), show_progress=False).save(
        tmp_path / "ip"
    )
    # An older index.json (no record) next to an index.faiss of the other metric.
    meta = read_json(tree / INDEX_DIR / "index.json")
    del meta["integrity"], meta["checksum"]
    (tree / INDEX_DIR / "index.json").write_text(json.dumps(meta))
    shutil.copy(tmp_path / "ip" / "index.faiss", tree / INDEX_DIR / "index.faiss")
    with pytest.raises(DatastoreIndexError, match=r"metric ip vs l2"):
        DatastoreIndex.load(tree / INDEX_DIR, store)


# -- adapters ---------------------------------------------------------------------------------


def _load_adapter(tree: Path) -> HetGraphLM:
    store = Datastore.open(tree)
    index = DatastoreIndex.load(tree / INDEX_DIR, store)
    return HetGraphLM.from_pretrained(tree / "adapter", tiny_causal_lm("qwen2"), store, index)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "body", "deleted"])
def test_damaged_adapter_weights_are_refused_naming_the_file(tree, damage):
    DAMAGE[damage](tree / "adapter" / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match=r"adapter\.safetensors.*train it again"):
        _load_adapter(tree)


@pytest.mark.parametrize("text", ["", "{", '{"format_version": 1}', '{"fusion": 3, "model": {}}'])
def test_malformed_adapter_config_is_a_typed_error_naming_it(tree, text):
    (tree / "adapter" / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json"):
        _load_adapter(tree)


def test_old_adapter_without_record_loads_and_nan_weights_are_refused(tree):
    from safetensors.torch import load_file, save_file

    path = tree / "adapter" / "adapter_config.json"
    config = read_json(path)
    del config["integrity"], config["checksum"]
    path.write_text(json.dumps(config))
    lm = _load_adapter(tree)
    assert all(float(g.detach().mean()) == 0.5 for g in lm.engine.gates.values())
    weights = load_file(tree / "adapter" / "adapter.safetensors")
    key = next(k for k in weights if k.startswith("adapters."))
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, tree / "adapter" / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match="non-finite"):
        _load_adapter(tree)


# -- overwrite, recovery --------------------------------------------------------------------


def test_overwrite_never_deletes_a_directory_that_is_not_a_datastore(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "doc.txt").write_text("precious")
    (corpus / "keys.npy").write_bytes(b"looks like ours")  # a datastore-like name is not enough
    before = sorted(p.name for p in corpus.iterdir())
    with pytest.raises(DatastoreError, match=r"not a datastore directory.*doc\.txt.*--overwrite"):
        build(corpus, overwrite=True)
    assert sorted(p.name for p in corpus.iterdir()) == before  # no lock file either
    assert (corpus / "doc.txt").read_text() == "precious"


def test_an_on_disk_index_and_its_unfinished_shards_belong_to_the_datastore(tree):
    # A datastore with an on-disk index (index.ivfdata) or an interrupted on-disk build
    # (index/shards/) is still a datastore: built again, reused; overwritten, replaced.
    shutil.rmtree(tree / "adapter")
    index = tree / INDEX_DIR
    (index / "index.ivfdata").write_bytes(b"lists")
    shards = index / "shards"
    shards.mkdir()
    for name in (
        "trained.faiss",
        "plan.json",
        "shard-00000.faiss",
        ".shard-00001.faiss.123-0badc0de.tmp",
    ):  # a block being written
        (shards / name).write_bytes(b"x")
    assert build(tree).complete
    (shards / "notes.txt").write_text("mine")
    with pytest.raises(DatastoreError, match=r"not a datastore directory \(it holds index\)"):
        build(tree, tiny_causal_lm("llama"), overwrite=True)
    (shards / "notes.txt").unlink()
    store = build(tree, tiny_causal_lm("llama"), overwrite=True)
    assert store.metadata.model["model_type"] == "llama" and not shards.exists()
    assert not (index / "index.ivfdata").exists()


def test_overwrite_refuses_a_datastore_with_foreign_files_and_replaces_a_pure_one(tree):
    (tree / "adapter" / "notes.txt").write_text("mine")
    with pytest.raises(DatastoreError, match="adapter"):
        build(tree, tiny_causal_lm("llama"), overwrite=True)
    assert (tree / "adapter" / "notes.txt").is_file() and (tree / "keys.npy").is_file()
    shutil.rmtree(tree / "adapter")
    store = build(tree, tiny_causal_lm("llama"), overwrite=True)
    assert store.complete and store.metadata.model["model_type"] == "llama"
    assert not (tree / INDEX_DIR / "index.faiss").exists()  # the old index went with it
    assert verify(tree).ok


@pytest.mark.parametrize("damage", ["deleted", "truncated", "body"])
def test_a_damaged_datastore_is_rebuilt_by_the_command_the_error_suggests(tree, pristine, damage):
    shutil.rmtree(tree / "adapter")
    DAMAGE[damage](tree / "keys.npy")
    with pytest.raises(DatastoreError, match=r"damaged.*keys\.npy.*--overwrite"):
        build(tree)
    store = build(tree, overwrite=True)
    assert store.complete and verify(tree).ok
    for name in DATASTORE_FILES:
        assert filecmp.cmp(tree / name, pristine / name, shallow=False), name


def test_a_build_stopped_before_its_metadata_restarts_without_overwrite(tmp_path, pristine):
    build(tmp_path / "ds", max_batches=1)
    (tmp_path / "ds" / DATASTORE_METADATA).unlink()  # as if killed before metadata.json
    (tmp_path / "ds" / "keys.npy").write_bytes(b"\x93NUMPY")  # and mid-way through keys.npy
    store = build(tmp_path / "ds")
    assert store.complete
    for name in DATASTORE_FILES:
        assert filecmp.cmp(tmp_path / "ds" / name, pristine / name, shallow=False), name


# -- non-finite keys --------------------------------------------------------------------------


def test_non_finite_hidden_states_are_refused_before_anything_is_written(tmp_path):
    model = tiny_causal_lm("qwen2")
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")
    with pytest.raises(DatastoreError, match=r"not finite.*batch 0.*--dtype float32"):
        build(tmp_path / "ds", model)
    assert json.loads((tmp_path / "ds" / "progress.json").read_text())["batches_done"] == 0


def test_index_build_refuses_non_finite_keys_naming_the_datastore(pristine):
    store = Datastore.open(pristine)
    keys = np.array(store.keys)
    keys[7, 2] = np.nan

    class Fake:
        path, fingerprint = pristine, "x"

    Fake.keys = keys
    with pytest.raises(DatastoreIndexError, match=rf"datastore {pristine} .*non-finite.*row 7"):
        DatastoreIndex.build(Fake(), IndexConfig(factory="Flat"), show_progress=False)
    with pytest.raises(DatastoreIndexError, match="non-finite"):
        DatastoreIndex.build(keys, IndexConfig(factory="IVF4,Flat"), show_progress=False)


# -- locks, temporaries, full disks -----------------------------------------------------------

HOLD = """
import sys, time
from hetgraph.locking import directory_lock
with directory_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("what", ["datastore", "index"])
def test_a_second_writer_is_refused(tree, what):
    locked = tree if what == "datastore" else tree / INDEX_DIR
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(locked)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"{what} {locked} is being written"):
            if what == "datastore":
                shutil.rmtree(tree / "adapter")
                build(tree)
            else:
                DatastoreIndex.load(tree / INDEX_DIR).save(tree / INDEX_DIR)
    finally:
        holder.kill()
        holder.wait()


def test_partial_temporaries_of_killed_writers_are_removed(tree):
    stale = [
        tree / INDEX_DIR / ".index.faiss.4242-0badcafe.tmp",
        tree / ".keys.npy.77-12345678.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    DatastoreIndex.load(tree / INDEX_DIR).save(tree / INDEX_DIR)
    shutil.rmtree(tree / "adapter")
    build(tree)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (tree / INDEX_DIR).iterdir()) == sorted(
        [LOCK_FILE, "index.faiss", "index.json"]
    )


FULL_DISK = """
import resource, sys
import numpy as np
from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.testing import byte_tokenizer, tiny_causal_lm
split = TokenizedSplit("train", np.arange(3000, dtype=np.int32) % 256,
                       np.zeros(3000, np.int32), ["d"])
model = tiny_causal_lm("qwen2", hidden_size=64)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # keys.npy needs ~384 kB
try:
    build_datastore(model, byte_tokenizer(), split, sys.argv[1],
                    DatastoreConfig(context_length=64, stride=32), show_progress=False)
except Exception as error:
    print(type(error).__name__, error)
"""


def test_a_file_size_limit_or_full_disk_is_a_typed_error_naming_the_file(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path / "ds")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("StorageError") and str(tmp_path / "ds") in out, out
    assert "too large" in out and "run the same build command again" in out
    assert "Errno" not in out
    assert issubclass(StorageError, HetgraphError)


def test_verify_tells_to_delete_a_checkpoint_whose_state_is_damaged(tree):
    from hetgraph.io import CHECKPOINT_DIR, OPTIMIZER_WEIGHTS, TRAINER_STATE

    checkpoint = tree / "adapter" / CHECKPOINT_DIR
    checkpoint.mkdir()
    (checkpoint / TRAINER_STATE).write_text('{"step": 2')  # cut short
    (checkpoint / OPTIMIZER_WEIGHTS).write_bytes(b"")
    report = verify(tree)
    problems = [p for p in report.problems if TRAINER_STATE in p]
    assert problems and all("delete the checkpoint directory" in p for p in problems), problems
