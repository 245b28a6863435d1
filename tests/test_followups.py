"""Follow-ups of "Reliability, round two": an on-disk build refused before it creates
``shards/``, JSON files nested too deep read as damaged (not a RecursionError), and an absurd
``num_threads`` in ``index.json`` clamped at load (it made FAISS crash the interpreter)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hetgraph.configuration import ConfigError
from hetgraph.index import DatastoreIndex, IndexConfig, build_ondisk_index, set_faiss_threads
from hetgraph.index.files import DatastoreIndexError
from hetgraph.integrity import atomic_write_json_record, read_json_record
from hetgraph.io import (
    ADAPTER_CONFIG,
    CHECKPOINT_DIR,
    DATASTORE_METADATA,
    INDEX_DIR,
    INDEX_METADATA,
    INDEX_PLAN_FILE,
    INDEX_SHARDS_DIR,
    TRAINER_STATE,
    read_json,
)
from hetgraph.limits import MAX_JSON_DEPTH, JSONDepthError, loads_json
from hetgraph.testing import one_error_line, run_cli as run, save_tiny_model, write_word_corpus

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Qwen2 model and a datastore with its Flat index."""
    root = tmp_path_factory.mktemp("followups")
    save_tiny_model(root / "model", "qwen2")
    write_word_corpus(root / "corpus", num_documents=8, length=40)
    assert (
        run(
            "datastore",
            "build",
            "--model",
            root / "model",
            "--corpus",
            root / "corpus",
            "--out",
            root / "ds",
            "--context-length",
            "64",
            "--stride",
            "32",
            "--threads",
            "1",
        )
        == 0
    )
    return root


def _copy(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def _keys(n: int = 500, d: int = 16) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float16)


# ------------------------------------------------------- 1: on-disk build, refused factory
@pytest.mark.parametrize(
    "factory, match",
    [
        ("IVF9000,Flat", "needs at least 9000 training"),
        ("HNSW8", "on-disk lists need an IVF factory"),
        ("IVF16,PQ5", "FAISS cannot build"),
    ],
)
def test_a_refused_on_disk_factory_creates_nothing(tmp_path, factory, match):
    # The refusal used to come after shards/ (and the lock file) had been created.
    with pytest.raises(DatastoreIndexError, match=match):
        build_ondisk_index(_keys(), tmp_path / "index", IndexConfig(factory=factory))
    assert not (tmp_path / "index").exists()


def test_the_cli_on_disk_build_refused_leaves_the_index_directory_as_it_was(
    workspace, tmp_path, capsys
):
    ds = _copy(workspace / "ds", tmp_path / "ds")
    before = sorted(p.name for p in (ds / INDEX_DIR).iterdir())
    assert run("index", "build", "--datastore", ds, "--factory", "IVF9000,Flat", "--on-disk") == 2
    assert "--factory" in one_error_line(capsys)
    assert sorted(p.name for p in (ds / INDEX_DIR).iterdir()) == before
    assert not (ds / INDEX_DIR / INDEX_SHARDS_DIR).exists()


def test_an_unreadable_build_plan_starts_the_on_disk_build_again(tmp_path):
    config = IndexConfig(factory="IVF4,Flat", train_size=400, shard_rows=200, num_threads=1)
    shards = tmp_path / "index" / INDEX_SHARDS_DIR
    shards.mkdir(parents=True)
    (shards / INDEX_PLAN_FILE).write_text(DEEP)
    index = build_ondisk_index(_keys(), tmp_path / "index", config, show_progress=False)
    assert index.ntotal == 500 and not shards.exists()


# ---------------------------------------------------------------- 2: JSON nested too deep
def test_loads_json_refuses_deep_nesting_as_malformed_json():
    text = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_json(text) is not None and loads_json(text.encode()) is not None
    for deep in ("[" + text + "]", DEEP, DEEP.encode()):
        with pytest.raises(JSONDepthError) as raised:
            loads_json(deep)
        assert isinstance(raised.value, json.JSONDecodeError)
        assert f"more than {MAX_JSON_DEPTH} deep" in str(raised.value)


def test_read_json_refuses_deep_nesting(tmp_path):
    (tmp_path / "x.json").write_text(DEEP)
    with pytest.raises(json.JSONDecodeError):
        read_json(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"x\.json is damaged \(objects or lists nested"):
        read_json_record(tmp_path / "x.json")


def _deep_adapter(root: Path, tmp_path: Path) -> tuple[Path, Path, list]:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / ADAPTER_CONFIG).write_text(DEEP)
    return (
        out,
        out / ADAPTER_CONFIG,
        [
            "eval",
            "--model",
            root / "model",
            "--corpus",
            root / "corpus",
            "--datastore",
            root / "ds",
            "--adapter",
            out,
            "--threads",
            "1",
        ],
    )


def _deep_datastore(root: Path, tmp_path: Path) -> tuple[Path, Path, list]:
    ds = _copy(root / "ds", tmp_path / "ds")
    (ds / DATASTORE_METADATA).write_text(DEEP)
    return ds, ds / DATASTORE_METADATA, ["index", "build", "--datastore", ds]


def _deep_checkpoint(root: Path, tmp_path: Path) -> tuple[Path, Path, list]:
    out = tmp_path / "out"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / TRAINER_STATE).write_text(DEEP)
    return (
        out,
        out / CHECKPOINT_DIR / TRAINER_STATE,
        [
            "train",
            "--model",
            root / "model",
            "--corpus",
            root / "corpus",
            "--datastore",
            root / "ds",
            "--out",
            out,
            "--threads",
            "1",
            "--max-steps",
            "1",
        ],
    )


@pytest.mark.parametrize("make", [_deep_adapter, _deep_datastore, _deep_checkpoint])
def test_a_file_nested_too_deep_is_one_line_and_damaged_to_verify(
    workspace, tmp_path, capsys, make
):
    # 100,000 levels used to be a RecursionError traceback from the JSON reader.
    directory, path, argv = make(workspace, tmp_path)
    before = path.read_bytes()
    capsys.readouterr()
    assert run(*argv) == 2
    line = one_error_line(capsys)
    assert str(path) in line and f"more than {MAX_JSON_DEPTH} deep" in line, line
    assert path.read_bytes() == before
    assert run("verify", directory) == 2
    report = capsys.readouterr().out
    assert report.startswith("DAMAGED") and f"{path} is damaged" in report, report


def test_a_model_config_nested_too_deep_is_one_line(workspace, tmp_path, capsys):
    model = _copy(workspace / "model", tmp_path / "model")
    (model / "config.json").write_text(DEEP)
    assert run("inspect", "--model", model, "--datastore", workspace / "ds", "--text", "hello") == 2
    line = one_error_line(capsys)
    assert f"{model / 'config.json'} is not valid JSON" in line, line


# ------------------------------------------------------------ 3: num_threads in index.json
def test_index_config_refuses_more_threads_than_cpus():
    cpus = os.cpu_count() or 1
    for threads in (0, cpus + 1, 100_000):
        with pytest.raises(ConfigError, match=rf"num_threads is {threads}; give 1 to {cpus}"):
            IndexConfig(num_threads=threads)
    assert IndexConfig(num_threads=cpus).num_threads == cpus


def test_set_faiss_threads_is_at_most_the_cpu_count(caplog):
    import faiss

    cpus = os.cpu_count() or 1
    try:
        with caplog.at_level(logging.WARNING, logger="hetgraph.index.faiss_index"):
            assert set_faiss_threads(100_000) == cpus
        assert faiss.omp_get_max_threads() == cpus and "100000 FAISS threads" in caplog.text
    finally:
        set_faiss_threads(1)


def _record_threads(index_dir: Path, threads: int) -> None:
    record = read_json_record(index_dir / INDEX_METADATA)
    record["config"]["num_threads"] = threads
    atomic_write_json_record(index_dir / INDEX_METADATA, record)


def test_an_index_recording_absurd_threads_loads_clamped(workspace, tmp_path, caplog):
    ds = _copy(workspace / "ds", tmp_path / "ds")
    _record_threads(ds / INDEX_DIR, 100_000)
    with caplog.at_level(logging.WARNING, logger="hetgraph.index.faiss_index"):
        index = DatastoreIndex.load(ds / INDEX_DIR)
    assert index.config.num_threads == (os.cpu_count() or 1)
    assert "records num_threads 100000" in caplog.text


def test_a_model_runs_after_loading_an_index_recording_absurd_threads(workspace, tmp_path):
    # In a child process: before the fix, loading set the OpenMP threads (shared by FAISS and
    # torch) to 100,000 and the model's next forward killed the interpreter with SIGSEGV, as
    # every CLI command on the datastore did.
    ds = _copy(workspace / "ds", tmp_path / "ds")
    _record_threads(ds / INDEX_DIR, 100_000)
    script = (
        "import sys, torch; from hetgraph.testing import tiny_causal_lm; "
        "model = tiny_causal_lm('qwen2'); from hetgraph.index import DatastoreIndex; "
        "DatastoreIndex.load(sys.argv[1]); "
        "print(torch.get_num_threads(), model(torch.zeros(1, 12, dtype=torch.long))"
        ".logits.shape[-1])"
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(ds / INDEX_DIR)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == [str(os.cpu_count() or 1), "257"]
