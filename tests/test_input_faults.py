"""Reliability, round two — inputs: a damaged corpus cache, leftovers of killed writers, model
folders that ask for too much memory, damaged weight files, hostile corpus globs, deeply
nested JSON lines and symlinks out of the corpus. Each ends in a rebuilt cache or in one
``error:`` line naming the file or option (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hetgraph.cli import main
from hetgraph.corpus import TokenizedCorpus
from hetgraph.corpus.cache import corpus_cache_problems, remove_dead_temporaries
from hetgraph.corpus.tokenization import tokenize_corpus
from hetgraph.io import CORPUS_METADATA, read_json
from hetgraph.testing import byte_tokenizer, save_tiny_model, write_word_corpus


def run(*argv) -> int:
    return main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _dead_pid() -> int:
    # A child that has exited and been reaped: its pid names no process.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _tokenize(corpus: Path, cache: Path) -> TokenizedCorpus:
    return tokenize_corpus(corpus, byte_tokenizer(), cache_dir=cache, show_progress=False)


# -- item 1: a damaged corpus cache ---------------------------------------------------------
@pytest.mark.parametrize("damage", ["tokens", "doc_ids", "names", "metadata", "truncate"])
def test_damaged_corpus_cache_is_rebuilt(tmp_path: Path, damage: str, caplog) -> None:
    corpus = write_word_corpus(tmp_path / "corpus", num_documents=12)
    cache = tmp_path / "cache"
    first = _tokenize(corpus, cache)
    entry = first.path
    assert entry is not None and corpus_cache_problems(entry) == []
    assert corpus_cache_problems(cache) == []
    if damage in ("tokens", "doc_ids"):
        path = entry / f"train.{damage}.npy"
        array = np.load(path)
        array[:100] = (array[:100] + 1) % 12  # still valid ids: only a checksum can tell
        np.save(path, array)
    elif damage == "names":
        path = entry / "train.docs.json"
        path.write_text(json.dumps(list(reversed(json.loads(path.read_text())))))
    elif damage == "metadata":
        path = entry / CORPUS_METADATA
        path.write_text(path.read_text().replace('"eos_token_id": 256', '"eos_token_id": 255'))
    else:
        path = entry / "valid.tokens.npy"
        path.write_bytes(path.read_bytes()[:-8])
    problems = corpus_cache_problems(cache)
    assert len(problems) == 1 and path.name in problems[0] and "\n" not in problems[0]

    with caplog.at_level("WARNING", logger="hetgraph"):
        again = _tokenize(corpus, cache)
    assert path.name in caplog.text and "rebuilding" in caplog.text
    assert again.fingerprint == first.fingerprint and again.eos_token_id == 256
    for name, split in first.splits.items():
        np.testing.assert_array_equal(again.split(name).tokens, split.tokens)
        np.testing.assert_array_equal(again.split(name).doc_ids, split.doc_ids)
        assert again.split(name).doc_names == split.doc_names
    assert corpus_cache_problems(cache) == []  # rebuilt in place


def test_cache_without_checksums_is_stale(tmp_path: Path, caplog) -> None:
    corpus = write_word_corpus(tmp_path / "corpus", num_documents=6)
    cache = tmp_path / "cache"
    entry = _tokenize(corpus, cache).path
    meta = read_json(entry / CORPUS_METADATA)
    # What an older hetgraph wrote: no per-file record, no checksum of its own.
    del meta["integrity"], meta["checksum"]
    (entry / CORPUS_METADATA).write_text(json.dumps(meta))
    problems = corpus_cache_problems(entry)
    assert len(problems) == 1 and "records no checksums" in problems[0]
    with caplog.at_level("WARNING", logger="hetgraph"):
        _tokenize(corpus, cache)
    assert "records no checksums" in caplog.text
    assert corpus_cache_problems(entry) == []


def test_corpus_cache_problems_of_nothing(tmp_path: Path) -> None:
    assert "does not exist" in corpus_cache_problems(tmp_path / "missing")[0]
    assert "no corpus cache entry" in corpus_cache_problems(tmp_path)[0]


def test_cli_damaged_corpus_cache_is_rebuilt(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HETGRAPH_CACHE", str(tmp_path / "hg"))
    model = save_tiny_model(tmp_path / "model")
    corpus = write_word_corpus(tmp_path / "corpus", num_documents=8)
    args = ["datastore", "build", "--model", model, "--corpus", corpus, "--threads", "1",
            "--context-length", "32", "--stride", "32", "--batch-size", "8", "--no-index"]
    assert run(*args, "--out", tmp_path / "ds1") == 0
    (entry,) = (tmp_path / "hg" / "corpus").iterdir()
    tokens = np.load(entry / "train.tokens.npy")
    tokens[10:110] = (tokens[10:110] + 1) % 200
    np.save(entry / "train.tokens.npy", tokens)
    capsys.readouterr()
    assert run(*args, "--out", tmp_path / "ds2") == 0
    err = capsys.readouterr().err
    assert "train.tokens.npy" in err and "rebuilding it from the corpus" in err
    first, second = (read_json(tmp_path / ds / "metadata.json") for ds in ("ds1", "ds2"))
    assert first["corpus_fingerprint"] == second["corpus_fingerprint"]
    for name in ("tokens.npy", "next_tokens.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "ds2" / name),
                                      np.load(tmp_path / "ds1" / name))


# -- item 6: leftovers of killed writers ----------------------------------------------------
def test_dead_writers_corpus_cache_temporaries_are_removed(tmp_path: Path) -> None:
    corpus = write_word_corpus(tmp_path / "corpus", num_documents=6)
    cache = tmp_path / "cache"
    entry = _tokenize(corpus, cache).path
    dead, alive = _dead_pid(), os.getppid()
    leftovers = [cache / f".{entry.name}.{dead}-0123abcd.tmp",      # atomic_directory's
                 cache / f".{'f' * 24}.{dead}-89abcdef.tmp",
                 cache / f".{entry.name}.old-4567cdef"]             # killed between renames
    for path in leftovers:
        path.mkdir()
        np.save(path / "train.tokens.npy", np.zeros(1000, dtype=np.int32))
    file_leftover = cache / f".x.json.{dead}-0000ffff.tmp"          # atomic_path's
    file_leftover.write_text("{")
    live = cache / f".{entry.name}.{alive}-feedbeef.tmp"            # a live writer's
    live.mkdir()
    orphan_old = cache / ".gone.old-12345678"                       # nothing to restore it to
    orphan_old.mkdir()

    _tokenize(corpus, cache)
    assert not any(p.exists() for p in [*leftovers, file_leftover])
    assert live.is_dir() and orphan_old.is_dir() and entry.is_dir()
    assert remove_dead_temporaries(cache) == []


def test_dead_writers_model_cache_temporary_is_removed(tmp_path: Path, monkeypatch) -> None:
    from hetgraph.models import loading

    try:
        gguf = loading.embedded_gguf_path()
    except loading.ModelLoadError:
        pytest.skip("the embedded model's wheel is not installed")
    monkeypatch.setenv("HETGRAPH_CACHE", str(tmp_path / "hg"))
    models = tmp_path / "hg" / "models"
    cached = save_tiny_model(models / loading._EMBEDDED_CACHE_NAME)
    (cached / "hetgraph-source.json").write_text(json.dumps(
        {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size,
         "distribution_version": loading._distribution_version()}))
    leftover = models / f".{loading._EMBEDDED_CACHE_NAME}.{_dead_pid()}-0badcafe.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    loading.load_model(None)
    assert not leftover.exists() and cached.is_dir()
