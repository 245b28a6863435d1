"""Corpus reading, splitting, tokenization and caching, on real files in tmp_path."""

from __future__ import annotations

import gzip
import json
import lzma
import random
from pathlib import Path

import numpy as np
import pytest

from hetgraph.corpus import (
    EMBEDDED_CORPUS,
    EMBEDDED_CORPUS_LICENSE,
    CorpusConfig,
    CorpusError,
    Document,
    TokenizedCorpus,
    TokenizedSplit,
    read_documents,
    split_documents,
    tokenize_corpus,
)
from hetgraph.models.fingerprint import tokenizer_fingerprint
from hetgraph.testing import byte_tokenizer

EOS = 256


def _texts(n: int) -> dict[str, str]:
    return {f"doc{i:03d}": f"Document {i}.\n" + "word " * (i % 7 + 1) for i in range(n)}


def _write_dir(root: Path, texts: dict[str, str]) -> Path:
    for i, (name, text) in enumerate(texts.items()):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def _jsonl_lines(texts: dict[str, str]) -> str:
    return "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items())


def _write_jsonl(path: Path, texts: dict[str, str]) -> Path:
    data = _jsonl_lines(texts).encode()
    if path.name.endswith(".xz"):
        path.write_bytes(lzma.compress(data))
    elif path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- reading


def test_read_directory_recursive_sorted(tmp_path: Path) -> None:
    texts = _texts(5)
    _write_dir(tmp_path, texts)
    (tmp_path / "b" / "ignored.bin").write_bytes(b"\xff\x00")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    docs = read_documents(tmp_path)
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert {n.split("/")[-1].removesuffix(".txt") for n in names} == set(texts)
    assert all("/" in n for n in names)  # relative paths, including the sub-directory
    assert {d.text for d in docs} == set(texts.values())


def test_read_directory_glob(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("print('hi')\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    docs = read_documents(tmp_path, glob="**/*.py")
    assert [d.name for d in docs] == ["pkg/m.py"]


def test_read_directory_of_jsonl_and_text(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "part1.jsonl.xz", {"x1": "one", "x2": "two"})
    (tmp_path / "z.md").write_text("# three\n")
    docs = read_documents(tmp_path)
    assert [(d.name, d.text) for d in docs] == [("x1", "one"), ("x2", "two"), ("z.md", "# three\n")]


def test_read_single_file(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("\ufeffHello world\n", encoding="utf-8")
    assert read_documents(path) == [Document("book.txt", "Hello world\n")]


def test_document_separator(tmp_path: Path) -> None:
    path = tmp_path / "wiki.txt"
    path.write_text("one\n\n\ntwo\n\n\n\nthree\n")
    docs = read_documents(CorpusConfig(path=str(path), document_separator=r"\n\n\n+"))
    assert [d.name for d in docs] == ["wiki.txt#0", "wiki.txt#1", "wiki.txt#2"]
    assert [d.text.strip() for d in docs] == ["one", "two", "three"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_read_jsonl(tmp_path: Path, suffix: str) -> None:
    texts = _texts(4)
    path = _write_jsonl(tmp_path / f"c{suffix}", texts)
    docs = read_documents(path)
    assert [(d.name, d.text) for d in docs] == list(texts.items())


def test_read_jsonl_custom_fields_and_missing_id(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "first", "key": "k1"}\n\n{"body": "second"}\n')
    docs = read_documents(path, text_field="body", id_field="key")
    assert [(d.name, d.text) for d in docs] == [("k1", "first"), ("c.jsonl:3", "second")]


def test_max_documents(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "c.jsonl", _texts(10))
    assert len(read_documents(path, max_documents=3)) == 3


@pytest.mark.parametrize(
    "case, expected",
    [
        ("non_utf8", "not valid utf-8"),
        ("empty_file", "is empty"),
        ("empty_dir", "contains no files"),
        ("invalid_json", "line 2: invalid JSON"),
        ("missing_field", "line 1: no field 'text'"),
        ("not_object", "line 1: expected a JSON object"),
        ("missing_path", "does not exist"),
    ],
)
def test_bad_inputs_raise_corpus_error(tmp_path: Path, case: str, expected: str) -> None:
    if case == "non_utf8":
        path = tmp_path / "latin1.txt"
        path.write_bytes("café\n".encode("latin-1"))
    elif case == "empty_file":
        path = tmp_path / "empty.txt"
        path.write_text("  \n")
    elif case == "empty_dir":
        path = tmp_path / "nothing"
        path.mkdir()
    elif case == "invalid_json":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"text": "ok"}\n{"text": \n')
    elif case == "missing_field":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"body": "x"}\n')
    elif case == "not_object":
        path = tmp_path / "bad.jsonl"
        path.write_text('["x"]\n')
    else:
        path = tmp_path / "missing"
    with pytest.raises(CorpusError, match=expected) as info:
        read_documents(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_non_utf8_file_inside_directory_is_named(tmp_path: Path) -> None:
    _write_dir(tmp_path, _texts(3))
    bad = tmp_path / "a" / "zz.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(CorpusError, match=r"zz\.txt.*line 2"):
        read_documents(tmp_path)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        CorpusConfig(fractions=(0.5, 0.2, 0.2))
    config = CorpusConfig(path="x", fractions=[0.8, 0.1, 0.1], max_documents=5)
    assert CorpusConfig.from_json(config.to_json()) == config


# ----------------------------------------------------------------------------- splitting


def _docs(n: int) -> list[Document]:
    return [Document(name, text) for name, text in _texts(n).items()]


@pytest.mark.parametrize("seed", [0, 1])
def test_split_deterministic_order_independent_no_leak(seed: int) -> None:
    docs = _docs(200)
    first = split_documents(docs, (0.8, 0.1, 0.1), seed)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    second = split_documents(shuffled, (0.8, 0.1, 0.1), seed)
    names = {k: {d.name for d in v} for k, v in first.items()}
    assert names == {k: {d.name for d in v} for k, v in second.items()}
    assert set().union(*names.values()) == {d.name for d in docs}
    assert sum(len(v) for v in names.values()) == len(docs)  # disjoint
    # Order inside a split follows the input order.
    assert [d.name for d in first["train"]] == sorted(names["train"])


def test_split_fractions_roughly_respected() -> None:
    docs = _docs(999) + [Document(f"extra{i}", "x") for i in range(3001)]
    splits = split_documents(docs, (0.7, 0.2, 0.1))
    sizes = {k: len(v) / len(docs) for k, v in splits.items()}
    assert sizes["train"] == pytest.approx(0.7, abs=0.03)
    assert sizes["valid"] == pytest.approx(0.2, abs=0.03)
    assert sizes["test"] == pytest.approx(0.1, abs=0.03)


def test_split_seed_changes_assignment() -> None:
    docs = _docs(100)
    a = {d.name for d in split_documents(docs, seed=0)["train"]}
    b = {d.name for d in split_documents(docs, seed=1)["train"]}
    assert a != b


@pytest.mark.parametrize("n", [3, 4, 5, 10])
def test_small_corpora_fill_every_split(n: int) -> None:
    docs = _docs(n)
    splits = split_documents(docs, (0.98, 0.01, 0.01))
    assert all(len(v) >= 1 for v in splits.values())
    assert sum(len(v) for v in splits.values()) == n
    shuffled = list(reversed(docs))
    again = split_documents(shuffled, (0.98, 0.01, 0.01))
    assert {k: {d.name for d in v} for k, v in splits.items()} == {
        k: {d.name for d in v} for k, v in again.items()
    }


def test_fewer_than_three_documents() -> None:
    splits = split_documents(_docs(1), (0.9, 0.05, 0.05))
    assert sum(len(v) for v in splits.values()) == 1


# ----------------------------------------------------------------------------- tokenizing


def test_tokenized_streams_line_up(tmp_path: Path) -> None:
    texts = _texts(12)
    _write_dir(tmp_path / "corpus", texts)
    corpus = tokenize_corpus(
        tmp_path / "corpus", byte_tokenizer(), cache_dir=tmp_path / "cache", show_progress=False
    )
    total_docs = 0
    for name, split in corpus.splits.items():
        assert split.name == name
        assert split.tokens.dtype == np.int32 and split.doc_ids.dtype == np.int32
        assert split.positions.dtype == np.int32
        assert len(split) == len(split.doc_ids) == len(split.positions) >= 1
        # Each document: its UTF-8 bytes then EOS; positions count from 0 inside it.
        for doc_id, doc_name in enumerate(split.doc_names):
            mask = split.doc_ids == doc_id
            tokens = split.tokens[mask]
            text = texts[Path(doc_name).stem]
            assert tokens[-1] == EOS
            assert bytes(tokens[:-1].astype(np.uint8)).decode() == text
            np.testing.assert_array_equal(split.positions[mask], np.arange(mask.sum()))
        assert (split.tokens == EOS).sum() == split.num_documents
        assert np.all(np.diff(split.doc_ids) >= 0)
        total_docs += split.num_documents
    assert total_docs == 12
    assert corpus.tokenizer_fingerprint == tokenizer_fingerprint(byte_tokenizer())
    assert corpus.eos_token_id == EOS


def test_truncate() -> None:
    split = TokenizedSplit("train", [1, 2, EOS, 3, 4, 5, EOS], [0, 0, 0, 1, 1, 1, 1], ["a", "b"])
    np.testing.assert_array_equal(split.positions, [0, 1, 2, 0, 1, 2, 3])
    short = split.truncate(2)
    assert len(short) == 2 and short.doc_names == ["a"]
    np.testing.assert_array_equal(short.positions, [0, 1])
    assert split.truncate(100) is split


def _assert_same(a: TokenizedCorpus, b: TokenizedCorpus) -> None:
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.splits.values(), b.splits.values(), strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.doc_ids, y.doc_ids)
        np.testing.assert_array_equal(x.positions, y.positions)
        assert x.doc_names == y.doc_names


def test_cache_hit_and_misses(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "c.jsonl", _texts(20))
    cache = tmp_path / "cache"
    tok = byte_tokenizer()
    first = tokenize_corpus(source, tok, cache_dir=cache, show_progress=False)
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and first.path == entries[0]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # The cache holds only .npy and .json files, readable without pickle.
    assert {p.suffix for p in entries[0].iterdir()} == {".npy", ".json"}

    hit = tokenize_corpus(source, tok, cache_dir=cache, show_progress=False)
    assert hit.path == first.path
    _assert_same(first, hit)
    uncached = tokenize_corpus(source, tok, use_cache=False, show_progress=False)
    _assert_same(first, uncached)

    # Another configuration, another tokenizer or other content: a new entry.
    tokenize_corpus(
        CorpusConfig(path=str(source), seed=5), tok, cache_dir=cache, show_progress=False
    )
    other_tok = byte_tokenizer()
    other_tok.add_special_tokens({"additional_special_tokens": ["<|sep|>"]})
    tokenize_corpus(source, other_tok, cache_dir=cache, show_progress=False)
    _write_jsonl(source, _texts(21))
    changed = tokenize_corpus(source, tok, cache_dir=cache, show_progress=False)
    assert changed.fingerprint != first.fingerprint
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 4


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETGRAPH_CACHE", str(tmp_path / "hg"))
    source = _write_jsonl(tmp_path / "c.jsonl", _texts(5))
    corpus = tokenize_corpus(source, byte_tokenizer(), show_progress=False)
    assert corpus.path is not None and corpus.path.parent == tmp_path / "hg" / "corpus"


def test_corrupt_cache_entry_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    source = _write_jsonl(tmp_path / "c.jsonl", _texts(6))
    cache = tmp_path / "cache"
    first = tokenize_corpus(source, byte_tokenizer(), cache_dir=cache, show_progress=False)
    assert first.path is not None
    (first.path / "train.tokens.npy").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="hetgraph"):
        again = tokenize_corpus(source, byte_tokenizer(), cache_dir=cache, show_progress=False)
    assert "train.tokens.npy" in caplog.text and "rebuilding it" in caplog.text
    _assert_same(first, again)


def test_save_load_round_trip_memory_mapped(tmp_path: Path) -> None:
    source = _write_jsonl(tmp_path / "c.jsonl", _texts(8))
    corpus = tokenize_corpus(source, byte_tokenizer(), use_cache=False, show_progress=False)
    corpus.save(tmp_path / "saved")
    loaded = TokenizedCorpus.load(tmp_path / "saved", mmap=True)
    _assert_same(corpus, loaded)
    assert loaded.config == corpus.config
    assert loaded.split("valid") is loaded.valid
    with pytest.raises(KeyError):
        loaded.split("dev")


# ----------------------------------------------------------------------------- embedded


def test_embedded_corpus() -> None:
    assert EMBEDDED_CORPUS.is_file() and EMBEDDED_CORPUS_LICENSE.is_file()
    assert "PSF LICENSE AGREEMENT" in EMBEDDED_CORPUS_LICENSE.read_text(encoding="utf-8")
    docs = read_documents(None)
    assert len(docs) >= 400
    names = [d.name for d in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "library/os.rst.txt" in names
    splits = split_documents(docs)
    assert all(len(v) >= 10 for v in splits.values())


def test_embedded_corpus_tokenizes(tmp_path: Path) -> None:
    config = CorpusConfig(path=None, max_documents=30)
    corpus = tokenize_corpus(config, byte_tokenizer(), cache_dir=tmp_path, show_progress=False)
    assert sum(s.num_documents for s in corpus.splits.values()) == 30
    assert all(len(s) > 0 for s in corpus.splits.values())
