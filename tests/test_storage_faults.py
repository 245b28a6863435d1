"""Storage faults: full disks and file-size limits in every writer's own error form, the
best adapter kept when its replacement cannot be saved, temporaries of killed writers,
readers racing a writer, ``--overwrite`` and symbolic links, and damaged adapter files.

No test fills a real disk: a file-size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored) in a
child process makes real writers fail with ``EFBIG``, and the free space is patched
(:func:`hetgraph.storage.free_bytes`) to stand for a full disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from hetgraph import storage
from hetgraph.cli import main
from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import Datastore, DatastoreConfig, build_datastore
from hetgraph.fusion import FusionConfig, HetGraphLM, persistence
from hetgraph.fusion.persistence import AdapterFileError, adapter_problems, read_adapter_weights
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.index.files import read_index_metadata
from hetgraph.index.ondisk import build_ondisk_index
from hetgraph.integrity import atomic_write_json_record, read_json_record
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INDEX_DIR,
    INTEGRITY_KEY,
    atomic_directory,
    atomic_save_npy,
)
from hetgraph.limits import ResourceLimitError
from hetgraph.locking import LockError
from hetgraph.storage import StorageError, remove_stale_temporaries, storage_errors, storage_reason
from hetgraph.testing import byte_tokenizer, save_tiny_model, tiny_causal_lm, write_word_corpus


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


# ------------------------------------------------------- one mechanism for "no space left"
@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
        (OSError("1000000 requested and 78832 written"), "stopped short"),  # numpy, no errno
        (
            RuntimeError(
                "Error in faiss::write_InvertedLists: 'ret == (n * ails->code_size)' failed: "
                "write error in x.tmp: 8581 != 18304 (No space left on device)"
            ),
            "disk is full",
        ),
        (
            SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            ),
            "disk is full",
        ),
        (
            SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
            "too large",
        ),
    ],
)
def test_every_writers_form_of_a_full_disk_is_recognised(error, reason):
    assert reason in storage_reason(error)
    with (
        pytest.raises(
            StorageError, match=f"cannot write /data/x: .*{reason}.* free .*then build it again"
        ),
        storage_errors("/data/x", "build it again"),
    ):
        raise error


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOENT, "missing"),
        OSError("other"),
        RuntimeError("Error: 'd == index->d' failed"),
        SafetensorError("invalid header"),
        KeyError("x"),
    ],
)
def test_other_errors_are_not_storage_errors(error):
    assert storage_reason(error) is None
    with pytest.raises(type(error)), storage_errors("/data/x", "build it again"):
        raise error


FILE_SIZE_LIMIT = """
import json, resource, signal, sys
from pathlib import Path
import faiss, numpy as np, torch
from hetgraph.io import atomic_directory, atomic_path, atomic_save_npy, atomic_save_safetensors
root = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
big = np.ones(50_000, np.float32)  # 200 kB


def faiss_write(path):
    index = faiss.IndexFlatL2(8)
    index.add(np.ones((10_000, 8), np.float32))
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def cache_dir(path):
    with atomic_directory(path) as tmp:
        np.save(tmp / "train.npy", big)


writers = {"a.npy": lambda p: atomic_save_npy(p, big),
           "a.safetensors": lambda p: atomic_save_safetensors(p, {"w": torch.ones(50_000)}),
           "a.faiss": faiss_write, "cache": cache_dir}
for name, write in writers.items():
    try:
        write(root / name)
    except Exception as error:
        print(json.dumps([name, type(error).__name__, str(error)]))
"""


def test_a_file_size_limit_is_a_storage_error_naming_the_file_for_every_writer(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"old")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "old").write_bytes(b"old")
    out = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    results = {name: (kind, message) for name, kind, message in map(json.loads, out.splitlines())}
    assert sorted(results) == ["a.faiss", "a.npy", "a.safetensors", "cache"], out
    for name, (kind, message) in results.items():
        assert kind == "StorageError", (name, message)
        assert f"cannot write {tmp_path / name}: " in message and "Errno" not in message
    assert (tmp_path / "a.npy").read_bytes() == b"old"  # the previous content stays
    assert (tmp_path / "cache" / "old").read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_write_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    target = tmp_path / "a.npy"
    atomic_save_npy(target, np.arange(3))
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(
        StorageError,
        match=rf"cannot write {target}: .*needs 804.1 KB, "
        r"1.0 KB free\)",
    ):
        atomic_save_npy(target, np.zeros(100_000, np.float64))
    assert np.load(target).tolist() == [0, 1, 2] and leftovers(tmp_path) == []


# -------------------------------------------- on-disk index: no SIGBUS, the old index stays
def test_an_ondisk_merge_without_room_is_refused_before_mapping_and_resumes(tmp_path, monkeypatch):
    keys = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    directory = tmp_path / "index"
    DatastoreIndex.build(keys, IndexConfig(factory="Flat"), show_progress=False).save(directory)
    config = IndexConfig(factory="IVF8,Flat", on_disk=True, shard_rows=500, num_threads=1)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 40_000)  # blocks fit, the lists not
    with pytest.raises(
        StorageError,
        match=rf"cannot write {directory / 'index.ivfdata'}: .*"
        r"needs .*40.0 KB free.*index build again",
    ):
        build_ondisk_index(keys, directory, config, show_progress=False)
    assert leftovers(directory) == []
    assert DatastoreIndex.load(directory).factory == "Flat"  # the previous index stays
    monkeypatch.undo()
    index = build_ondisk_index(keys, directory, config, show_progress=False)
    assert index.on_disk and index.ntotal == 2000
    assert not (directory / "shards").exists()


# ------------------------------------------------------------ adapters: the best one stays
@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage-lm")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 400).astype(np.int32)
    split = TokenizedSplit("train", tokens, np.repeat(np.arange(4), 100), list("abcd"))
    model = tiny_causal_lm("qwen2")
    store = build_datastore(
        model,
        byte_tokenizer(),
        split,
        root / "ds",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    torch.manual_seed(0)
    fusion = FusionConfig(k=4, adapter=dict(hidden_channels=16, num_layers=1, heads=2))
    return HetGraphLM(model, store, index, fusion)


def test_a_failed_adapter_save_keeps_the_previous_adapter_loadable(lm, tmp_path, monkeypatch):
    lm.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in read_adapter_weights(tmp_path).items()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    monkeypatch.setattr(persistence, "save_file", full_disk, raising=False)
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.add_(1.0)
    with pytest.raises(
        StorageError,
        match=rf"cannot write {tmp_path / ADAPTER_WEIGHTS}: the "
        r"disk is full.*previous one is kept",
    ):
        lm.save_pretrained(tmp_path)
    after = read_adapter_weights(tmp_path)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert adapter_problems(tmp_path)[1] == [] and leftovers(tmp_path) == []
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.sub_(1.0)


# ------------------------------------------------------ temporaries of killed writers
def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_temporary_directories_of_killed_writers_go_and_live_ones_stay(tmp_path):
    dead = tmp_path / f".checkpoint.{dead_pid()}-0badcafe.tmp"
    dead_other = tmp_path / f".adapter.{dead_pid()}-0badcafd.tmp"
    live = tmp_path / f".checkpoint.{os.getpid()}-12345678.tmp"
    partial_file = tmp_path / f".training.json.{dead_pid()}-87654321.tmp"
    for path in (dead, dead_other, live):
        path.mkdir()
        (path / "adapter.safetensors").write_bytes(b"partial")
    partial_file.write_bytes(b"partial")
    with atomic_directory(tmp_path / "checkpoint") as tmp:  # a new checkpoint: dead goes
        (tmp / "state").write_text("new")
    assert not dead.exists() and dead_other.exists() and live.is_dir()
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([dead_other, partial_file])
    assert live.is_dir() and (tmp_path / "checkpoint" / "state").read_text() == "new"


# ----------------------------------------------------------- readers racing a writer
HOLD = """
import sys, time
from hetgraph.locking import directory_lock
from hetgraph.testing import one_error_line
with directory_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("what", ["datastore", "index", "adapter"])
def test_a_reader_racing_a_writer_is_told_to_retry(tmp_path, what):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        read = {
            "datastore": lambda: Datastore.open(tmp_path),
            "index": lambda: read_index_metadata(tmp_path),
            "adapter": lambda: read_adapter_weights(tmp_path),
        }[what]
        with pytest.raises(
            LockError,
            match=rf"{tmp_path} is being written by process "
            rf"{holder.pid} right now .*retry when it finishes",
        ):
            read()
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(Exception) as info:  # the writer is gone: the problem itself
        read()
    assert not isinstance(info.value, LockError)


# ------------------------------------------------------------ --overwrite and links
def test_overwrite_never_deletes_through_a_linked_index(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HETGRAPH_CACHE", str(tmp_path / "cache"))
    save_tiny_model(tmp_path / "model")
    write_word_corpus(tmp_path / "corpus", num_documents=4, length=40)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("index.faiss", "index.json"):
        (outside / name).write_text("precious")
    common = [
        "datastore",
        "build",
        "--model",
        str(tmp_path / "model"),
        "--corpus",
        str(tmp_path / "corpus"),
        "--out",
        str(tmp_path / "ds"),
        "--threads",
        "1",
        "--context-length",
        "32",
        "--stride",
        "16",
        "--batch-size",
        "4",
    ]
    assert main(common) == 0
    shutil.rmtree(tmp_path / "ds" / INDEX_DIR)
    (tmp_path / "ds" / INDEX_DIR).symlink_to(outside, target_is_directory=True)
    assert main([*common, "--overwrite", "--stride", "32"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in outside.iterdir()) == ["index.faiss", "index.json"]
    assert not (tmp_path / "ds" / INDEX_DIR).is_symlink()  # the link went, not its target


# ------------------------------------------------------------------- adapter files
@pytest.fixture
def adapter(lm, tmp_path):
    lm.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def rewrite_config(directory: Path, change) -> None:
    config = read_json_record(directory / ADAPTER_CONFIG)
    change(config)
    atomic_write_json_record(directory / ADAPTER_CONFIG, config)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(format_version="1; rm -rf /"), "unsupported adapter format '1; rm"),
        (lambda c: c.update(format_version=2), "unsupported adapter format 2"),
        (lambda c: c.update({INTEGRITY_KEY: {"files": {ADAPTER_WEIGHTS: "ok"}}}), "damaged"),
        (lambda c: c.update({INTEGRITY_KEY: {"files": []}}), "damaged"),
    ],
)
def test_a_bad_format_version_or_integrity_section_is_refused(adapter, change, message):
    rewrite_config(adapter, change)
    problems = adapter_problems(adapter)[1]
    assert len(problems) == 1 and message in problems[0], problems
    with pytest.raises(AdapterFileError, match="train it again"):
        read_adapter_weights(adapter)


def sparse_safetensors(path: Path, shape: list[int]) -> None:
    """A safetensors file declaring one float32 tensor ``gates.head`` of ``shape`` over a
    sparse file: a few bytes on disk."""
    nbytes = int(np.prod(shape)) * 4
    header = json.dumps(
        {"gates.head": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + nbytes)


def test_a_legacy_adapter_declaring_huge_tensors_is_refused_before_loading(adapter, capsys):
    rewrite_config(adapter, lambda c: c.pop(INTEGRITY_KEY))  # legacy: no record
    sparse_safetensors(adapter / ADAPTER_WEIGHTS, [1 << 30])  # 4 GB declared
    assert os.stat(adapter / ADAPTER_WEIGHTS).st_blocks * 512 < 1 << 20
    problems = adapter_problems(adapter)[1]
    assert len(problems) == 1 and "does not match" in problems[0], problems
    assert "gates.head has shape [1073741824], the config implies [32]" in problems[0]
    assert main(["verify", str(adapter)]) != 0
    assert "does not match" in capsys.readouterr().out


def test_an_adapter_config_implying_huge_tensors_is_refused(adapter, monkeypatch):
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "64M")
    rewrite_config(
        adapter, lambda c: c["adapters"]["head"].update(hidden_channels=1 << 20, heads=2)
    )
    with pytest.raises(ResourceLimitError, match=r"adapter_config\.json: an adapter of about"):
        read_adapter_weights(adapter)
