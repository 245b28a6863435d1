"""🤗 datasets and Parquet as corpora ("Meet researchers where they already work"):
``--corpus`` takes a ``save_to_disk`` directory (``Dataset`` or ``DatasetDict``, its own
splits with ``--hf-splits``) or Parquet files, ``tokenize_corpus`` a ``Dataset`` /
``DatasetDict``; one document per row; the fingerprint follows the rows, not the files; bad
input is one ``error:`` line. Tiny data made here, never downloaded."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when datasets is imported
datasets = pytest.importorskip("datasets")

from hetgraph.configuration import ConfigError  # noqa: E402
from hetgraph.corpus import (  # noqa: E402
    CorpusConfig,
    CorpusError,
    TokenizedCorpus,
    read_documents,
    tokenize_corpus,
)
from hetgraph.datastore import Datastore  # noqa: E402
from hetgraph.limits import ResourceLimitError  # noqa: E402
from hetgraph.testing import (  # noqa: E402
    CORPUS_WORDS,
    byte_tokenizer,
    one_error_line,
    run_cli as run,
    save_tiny_model,
)

SPLITS = {"train": "train", "valid": "validation", "test": "test"}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    datasets.disable_progress_bars()
    monkeypatch.setenv("HETGRAPH_CACHE", str(tmp_path / "cache"))


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(CORPUS_WORDS) for _ in range(40)) for _ in range(n)]


def _dataset(n: int = 12, seed: int = 0, **columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"content": _texts(n, seed), **columns})


def _dataset_dict(**columns) -> datasets.DatasetDict:
    whole = _dataset(12, **columns)
    return datasets.DatasetDict(
        {
            "train": whole.select(range(8)),
            "validation": whole.select(range(8, 10)),
            "test": whole.select(range(10, 12)),
        }
    )


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Qwen2 model, a saved Dataset, a saved DatasetDict and a Parquet file."""
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("hf-datasets")
    save_tiny_model(root / "model")
    _dataset().save_to_disk(str(root / "ds"))
    _dataset_dict().save_to_disk(str(root / "dd"))
    (root / "pq").mkdir()
    _dataset().to_parquet(str(root / "pq" / "a.parquet"))
    return root


def build(ws, tmp_path, *corpus) -> int:
    return run(
        "datastore",
        "build",
        "--model",
        ws / "model",
        *corpus,
        "--out",
        tmp_path / "out",
        "--context-length",
        "64",
        "--stride",
        "32",
        "--batch-size",
        "4",
        "--threads",
        "1",
    )


# ------------------------------------------------------------------ the CLI reads datasets
@pytest.mark.parametrize(
    ("corpus", "documents"),
    [
        (["--corpus", "ds", "--text-field", "content"], None),
        (["--corpus", "dd", "--text-field", "content", "--hf-splits"], (8, 2, 2)),
        (
            [
                "--corpus",
                "dd",
                "--text-field",
                "content",
                "--hf-splits",
                "train=train,valid=validation",
            ],
            (8, 2, 0),
        ),
        (["--corpus", "pq/a.parquet", "--text-field", "content"], None),
        (["--corpus", "pq", "--text-field", "content"], None),
    ],
)
def test_datastore_build_reads_datasets_and_parquet(ws, tmp_path, corpus, documents):
    corpus[1] = ws / corpus[1]
    assert build(ws, tmp_path, *corpus) == 0
    store = Datastore.open(tmp_path / "out")
    (entry,) = (p for p in (tmp_path / "cache" / "corpus").iterdir() if not p.name.startswith("."))
    tokenized = TokenizedCorpus.load(entry)
    assert store.metadata.corpus_fingerprint == tokenized.fingerprint and len(store) > 0
    counts = tuple(split.num_documents for split in tokenized.splits.values())
    if documents is None:  # hetgraph's split of the 12 rows
        assert sum(counts) == 12 and min(counts) > 0
    else:
        assert counts == documents


def test_each_row_is_one_document_and_dataset_splits_are_kept(ws):
    docs = read_documents(ws / "ds", text_field="content")
    assert [d.text for d in docs] == _texts(12)
    assert [d.name for d in docs] == [f"row:{i}" for i in range(12)]
    config = CorpusConfig(path=str(ws / "dd"), text_field="content", dataset_splits=SPLITS)
    corpus = tokenize_corpus(config, byte_tokenizer(), show_progress=False)
    assert corpus.train.doc_names == [f"train:{i}" for i in range(8)]
    assert corpus.valid.doc_names == ["validation:0", "validation:1"]
    assert corpus.test.doc_names == ["test:0", "test:1"]
    # Without --hf-splits a DatasetDict is pooled (all 12 rows) and split by document.
    pooled = tokenize_corpus(
        CorpusConfig(path=str(ws / "dd"), text_field="content"),
        byte_tokenizer(),
        show_progress=False,
    )
    assert sum(s.num_documents for s in pooled.splits.values()) == 12
    # A split left out of the map stays empty; max_documents limits each split.
    partial = tokenize_corpus(
        CorpusConfig(
            path=str(ws / "dd"),
            text_field="content",
            dataset_splits={"train": "train", "test": "test"},
            max_documents=3,
        ),
        byte_tokenizer(),
        show_progress=False,
    )
    assert (
        partial.train.num_documents,
        partial.valid.num_documents,
        partial.test.num_documents,
    ) == (3, 0, 2)


def test_ids_blank_and_null_rows(tmp_path):
    texts = ["first text", "  ", None, "fourth text"]
    datasets.Dataset.from_dict({"text": texts, "id": ["a", "b", "c", None]}).save_to_disk(
        str(tmp_path / "ds")
    )
    docs = read_documents(tmp_path / "ds")
    assert [(d.name, d.text) for d in docs] == [("a", "first text"), ("row:3", "fourth text")]
    datasets.Dataset.from_dict({"text": ["", None]}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(CorpusError, match=r"empty\.parquet holds no documents.*--text-field"):
        read_documents(tmp_path / "empty.parquet")


def test_tokenize_corpus_takes_dataset_objects(ws):
    tokenizer = byte_tokenizer()
    from_disk = tokenize_corpus(
        CorpusConfig(path=str(ws / "ds"), text_field="content"), tokenizer, show_progress=False
    )
    in_memory = tokenize_corpus(
        _dataset(), tokenizer, config=CorpusConfig(text_field="content"), show_progress=False
    )
    assert in_memory.fingerprint == from_disk.fingerprint
    uncached = tokenize_corpus(
        _dataset(),
        tokenizer,
        config=CorpusConfig(text_field="content"),
        use_cache=False,
        show_progress=False,
    )
    assert uncached.config.path.startswith("<in-memory Dataset")  # what the corpus records
    config = CorpusConfig(text_field="content", dataset_splits=SPLITS)
    split = tokenize_corpus(_dataset_dict(), tokenizer, config=config, show_progress=False)
    assert split.summary()["valid"]["documents"] == 2
    assert read_documents(_dataset(), text_field="content")[0].text == _texts(1)[0]
    with pytest.raises(TypeError, match="config="):
        tokenize_corpus(ws / "ds", tokenizer, config=config)
    with pytest.raises(CorpusError, match="not the IterableDataset given"):
        read_documents(_dataset().to_iterable_dataset(), text_field="content")


def test_fingerprint_follows_rows_not_files(tmp_path):
    r"""The same rows saved again (elsewhere, after a no-op map that changes the dataset's own
    _fingerprint, in other shards) give the same corpus and reuse its cache entry; one changed
    row gives another."""
    tokenizer = byte_tokenizer()
    cache = tmp_path / "cache"

    def tokenize(directory):
        return tokenize_corpus(
            CorpusConfig(path=str(directory), text_field="content"),
            tokenizer,
            cache_dir=cache,
            show_progress=False,
        )

    first = _dataset()
    first.save_to_disk(str(tmp_path / "a"))
    again = first.map(lambda row: row)
    assert again._fingerprint != first._fingerprint
    again.save_to_disk(str(tmp_path / "b"), num_shards=3)
    a, b = tokenize(tmp_path / "a"), tokenize(tmp_path / "b")
    assert a.fingerprint == b.fingerprint and a.path == b.path
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    changed = first.map(
        lambda row, i: {"content": row["content"] + (" x" if i == 5 else "")}, with_indices=True
    )
    changed.save_to_disk(str(tmp_path / "c"))
    assert tokenize(tmp_path / "c").fingerprint != a.fingerprint


# ------------------------------------------------------------------ bad input: one line
def _truncate(directory):
    arrow = next(directory.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])


def _garbage(directory):
    next(directory.glob("*.arrow")).write_bytes(b"not arrow at all" * 8)


def _flip(directory):
    arrow = next(directory.glob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[200:400] = bytes(b ^ 0xFF for b in data[200:400])
    arrow.write_bytes(bytes(data))


def _climb(directory):
    (directory / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "../ds"]}))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_truncate, r"cannot read corpus .*ds.*save_to_disk"),
        (_garbage, r"cannot read corpus .*ds.*save_to_disk"),
        (_flip, r"cannot read corpus .*ds.*save_to_disk"),
    ],
)
def test_corrupt_arrow_file_is_one_line(ws, tmp_path, capsys, damage, expected):
    shutil.copytree(ws / "ds", tmp_path / "ds")
    damage(tmp_path / "ds")
    assert build(ws, tmp_path, "--corpus", tmp_path / "ds", "--text-field", "content") == 2
    assert re.search(expected, one_error_line(capsys))
    assert not (tmp_path / "out").exists()


def test_split_listing_that_leaves_the_directory_is_refused(ws, tmp_path, capsys):
    shutil.copytree(ws / "dd", tmp_path / "dd")
    _climb(tmp_path / "dd")
    assert build(ws, tmp_path, "--corpus", tmp_path / "dd", "--text-field", "content") == 2
    assert "dataset_dict.json names the split '../ds'" in one_error_line(capsys)


def test_corrupt_parquet_file_is_one_line(ws, tmp_path, capsys):
    data = (ws / "pq" / "a.parquet").read_bytes()
    (tmp_path / "b.parquet").write_bytes(data[: len(data) // 2])
    assert build(ws, tmp_path, "--corpus", tmp_path / "b.parquet", "--text-field", "content") == 2
    line = one_error_line(capsys)
    assert "cannot read Parquet corpus file" in line and "b.parquet" in line


@pytest.mark.parametrize(
    ("corpus", "expected"),
    [
        (["dd", "--hf-splits"], "no column 'text' (columns: content); set --text-field"),
        (
            ["ds", "--text-field", "missing"],
            "no column 'missing' (columns: content); set --text-field",
        ),
        (
            ["dd", "--text-field", "content", "--hf-splits", "train=train,valid=dev"],
            "has no split 'dev' (its splits: train, validation, test); --hf-splits",
        ),
        (
            ["ds", "--text-field", "content", "--hf-splits"],
            "--hf-splits (CorpusConfig.dataset_splits) uses a DatasetDict's own splits, but corpus",
        ),
        (
            ["dd", "--text-field", "content", "--hf-splits", "valid"],
            "--hf-splits 'valid': expected OURS=THEIRS pairs",
        ),
        (
            ["dd", "--text-field", "content", "--hf-splits", "train=train,test=train"],
            "uses one dataset split for two of hetgraph's",
        ),
        (
            ["dd", "--text-field", "content", "--hf-splits", "dev=validation"],
            "dev is not a hetgraph split",
        ),
        (["pq", "--text-field", "content", "--hf-splits"], "is no directory written by"),
    ],
)
def test_option_errors_are_one_line_naming_the_option(ws, tmp_path, capsys, corpus, expected):
    assert build(ws, tmp_path, "--corpus", ws / corpus[0], *corpus[1:]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_text_column_of_numbers_is_refused(tmp_path):
    datasets.Dataset.from_dict({"text": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(CorpusError, match=r"column 'text' holds int64, not text; set --text-field"):
        read_documents(tmp_path / "ds")


def test_dataset_too_large_for_memory_is_refused_before_reading(ws, monkeypatch):
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "1K")
    with pytest.raises(ResourceLimitError, match=r"rows of corpus .*ds would need"):
        read_documents(ws / "ds", text_field="content")
    assert len(read_documents(ws / "ds", text_field="content", max_documents=2)) == 2


def test_without_datasets_installed_the_error_names_the_extra(ws, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(CorpusError, match=r"needs the datasets package.*hetgraph\[hf-datasets\]"):
        read_documents(ws / "ds", text_field="content")


def test_dataset_splits_in_a_corpus_config_file(ws, tmp_path):
    (tmp_path / "corpus.json").write_text(
        json.dumps({"text_field": "content", "dataset_splits": {"train": "train", "test": "test"}})
    )
    assert (
        build(ws, tmp_path, "--corpus", ws / "dd", "--corpus-config", tmp_path / "corpus.json") == 0
    )
    config = CorpusConfig.from_dict(json.loads((tmp_path / "corpus.json").read_text()))
    assert CorpusConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="dataset_splits"):
        CorpusConfig(dataset_splits={})
