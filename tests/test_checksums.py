"""Checksums on training checkpoints and datastore progress records ("Reliability, round two",
items 1 and 2): a changed byte is refused on resume or never trusted by a build, and
``hetgraph verify`` names the file; an intact checkpoint or record is used as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.datastore.progress import read_done, write_prefix, write_rank
from hetgraph.integrity import atomic_write_json_record, file_record, read_json_record
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_DIR,
    DATASTORE_PROGRESS,
    DATASTORE_RANK_PROGRESS,
    INTEGRITY_KEY,
    OPTIMIZER_WEIGHTS,
    TRAINER_STATE,
)
from hetgraph.storage import temporary_target
from hetgraph.testing import (
    byte_tokenizer,
    one_error_line,
    run_cli as run,
    save_tiny_model,
    tiny_causal_lm,
    tiny_run_config,
    write_word_corpus,
)
from hetgraph.verify import verify


def train_argv(root: Path, out: Path) -> list:
    return [
        "train",
        "--model",
        root / "model",
        "--corpus",
        root / "corpus",
        "--datastore",
        root / "ds",
        "--out",
        out,
        "--config",
        root / "run.json",
        "--threads",
        "1",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny Qwen2 workspace with a datastore and a finished training run (``out``, whose
    ``checkpoint/`` holds step 4)."""
    root = tmp_path_factory.mktemp("checksums")
    save_tiny_model(root / "model", "qwen2")
    write_word_corpus(root / "corpus", num_documents=8, length=40)
    (root / "run.json").write_text(json.dumps(tiny_run_config()))
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
            "--batch-size",
            "4",
            "--threads",
            "1",
        )
        == 0
    )
    assert run(*train_argv(root, root / "out")) == 0
    return root


def _set_exp_avg(checkpoint: Path) -> None:
    # What the tester did: exp_avg = 50.0, written as a well-formed safetensors file.
    path = checkpoint / OPTIMIZER_WEIGHTS
    tensors = load_file(str(path))
    tensors = {
        k: torch.full_like(v, 50.0) if k.endswith("exp_avg") else v for k, v in tensors.items()
    }
    save_file(tensors, str(path))


def _edit_state(checkpoint: Path) -> None:
    # Valid JSON, but no longer what was written (its checksum is kept).
    path = checkpoint / TRAINER_STATE
    data = json.loads(path.read_text())
    data["step"] = 2
    path.write_text(json.dumps(data))


def _swap_adapter(checkpoint: Path) -> None:
    # Other adapter weights with a consistent adapter_config.json record: only the
    # checkpoint's own record (in trainer_state.json, of both files) can tell.
    path = checkpoint / ADAPTER_WEIGHTS
    save_file({k: v + 0.25 for k, v in load_file(str(path)).items()}, str(path))
    config = read_json_record(checkpoint / ADAPTER_CONFIG)
    config[INTEGRITY_KEY] = {"files": {ADAPTER_WEIGHTS: file_record(path)}}
    atomic_write_json_record(checkpoint / ADAPTER_CONFIG, config)


@pytest.mark.parametrize(
    "damage, name",
    [
        (_set_exp_avg, OPTIMIZER_WEIGHTS),
        (_edit_state, TRAINER_STATE),
        (_swap_adapter, ADAPTER_CONFIG),
    ],
)
def test_a_damaged_checkpoint_is_refused_on_resume_and_by_verify(
    trained, tmp_path, capsys, damage, name
):
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    damage(out / CHECKPOINT_DIR)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    assert run(*train_argv(trained, out)) == 2
    line = one_error_line(capsys)
    assert str(out / CHECKPOINT_DIR / name) in line, line
    assert "delete the checkpoint directory" in line
    # Nothing already written is lost or changed, and no temporary file is left.
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    names = [p.name for p in out.iterdir()] + [p.name for p in (out / CHECKPOINT_DIR).iterdir()]
    assert not [n for n in names if temporary_target(n) or ".old-" in n], names

    assert run("verify", out) == 2
    report = capsys.readouterr().out
    assert report.startswith("DAMAGED") and str(out / CHECKPOINT_DIR / name) in report, report
    assert verify(out / CHECKPOINT_DIR).problems  # the checkpoint directory itself, too

    # The fix the message gives works: delete the checkpoint, train again.
    shutil.rmtree(out / CHECKPOINT_DIR)
    assert run(*train_argv(trained, out)) == 0
    assert verify(out).ok


def test_an_intact_checkpoint_resumes_and_verifies(trained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    report = verify(out)
    assert report.ok and report.kinds == ["adapter", "checkpoint"], str(report)
    assert {out / CHECKPOINT_DIR / n for n in (TRAINER_STATE, OPTIMIZER_WEIGHTS)} <= set(
        report.checked
    )
    state = read_json_record(out / CHECKPOINT_DIR / TRAINER_STATE)  # checksum checked
    assert set(state[INTEGRITY_KEY]["files"]) == {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        OPTIMIZER_WEIGHTS,
    }
    assert run(*train_argv(trained, out)) == 0
    capsys.readouterr()


# -- progress records ---------------------------------------------------------------------

CONFIG = DatastoreConfig(context_length=32, stride=16, batch_size=2)


def _split() -> TokenizedSplit:
    tokens = np.random.default_rng(0).integers(0, 256, 160).astype(np.int32)
    return TokenizedSplit(
        "train", tokens, np.repeat(np.arange(4, dtype=np.int32), 40), [f"doc{i}" for i in range(4)]
    )


def _build(out: Path, **kwargs):
    return build_datastore(
        tiny_causal_lm("qwen2"),
        byte_tokenizer(),
        _split(),
        out,
        CONFIG,
        show_progress=False,
        **kwargs,
    )


def test_a_damaged_progress_record_is_not_trusted_by_the_build_nor_by_verify(tmp_path, capsys):
    reference = np.array(_build(tmp_path / "reference").keys)
    out = tmp_path / "ds"
    partial = _build(out, max_batches=1)
    num_batches = partial.metadata.num_batches
    assert not partial.complete and num_batches > 2
    # What the tester did: mark every batch as written, the checksum left as it was.
    path = out / DATASTORE_PROGRESS
    data = json.loads(path.read_text())
    data["batches_done"] = num_batches
    path.write_text(json.dumps(data))

    assert read_done(out, num_batches) == set()  # not trusted: computed again
    assert run("verify", out) == 2
    report = capsys.readouterr().out
    assert str(path) in report and "does not trust it" in report, report

    store = _build(out)  # the same build again: it starts from its first batch
    assert store.complete
    keys = np.array(store.keys)
    assert not (keys == 0).all(axis=1).any()
    np.testing.assert_array_equal(keys, reference)  # same process, same kernels
    assert verify(out).ok


def test_progress_records_carry_a_checksum_and_old_ones_still_read(tmp_path):
    write_prefix(tmp_path, 3, 10)
    write_rank(tmp_path, 1, {5, 6, 8}, 10)
    assert read_done(tmp_path, 10) == {0, 1, 2, 5, 6, 8}
    rank = tmp_path / DATASTORE_RANK_PROGRESS.format(rank=1)
    data = json.loads(rank.read_text())
    assert "checksum" in data
    data["done"] = [[0, 10]]
    rank.write_text(json.dumps(data))
    assert read_done(tmp_path, 10) == {0, 1, 2}  # the damaged rank record is ignored
    assert "does not trust it" in " ".join(_progress_problems(tmp_path))
    # Records written before checksums existed (no "checksum" key) are read as before.
    (tmp_path / DATASTORE_PROGRESS).write_text(json.dumps({"batches_done": 4, "num_batches": 10}))
    rank.unlink()
    assert read_done(tmp_path, 10) == {0, 1, 2, 3}


def _progress_problems(directory: Path) -> list[str]:
    from hetgraph.datastore.integrity import progress_problems

    return progress_problems(directory, complete=False)[1]


# -- verify: corpus cache ------------------------------------------------------------------


def test_verify_checks_a_corpus_cache_directory_and_entry(tmp_path, capsys):
    from hetgraph.corpus.tokenization import tokenize_corpus

    corpus = write_word_corpus(tmp_path / "corpus", num_documents=6)
    cache = tmp_path / "cache"
    entry = tokenize_corpus(corpus, byte_tokenizer(), cache_dir=cache, show_progress=False).path
    for path in (cache, entry):
        report = verify(path)
        assert report.ok and report.kinds == ["corpus cache"], str(report)
        assert entry / "corpus.json" in report.checked
    damaged = entry / "train.tokens.npy"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))
    for path in (cache, entry):
        assert run("verify", path) == 2
        out = capsys.readouterr().out
        assert out.startswith("DAMAGED") and "train.tokens.npy" in out, out
