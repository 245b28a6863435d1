"""hetgraph.io: atomic writers, the cache root, fingerprints; and the training checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hetgraph.corpus import CorpusConfig, Document, TokenizedCorpus, TokenizedSplit, document_hash
from hetgraph.corpus.cache import (
    cache_key,
    default_cache_dir,
    documents_fingerprint,
    tokenizer_cache_fingerprint,
)
from hetgraph.datastore import DatastoreMetadata
from hetgraph.io import (
    ADAPTER_WEIGHTS,
    CHECKPOINT_DIR,
    DATASTORE_METADATA,
    TRAINER_STATE,
    StreamingHash,
    atomic_directory,
    atomic_path,
    atomic_save_npy,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    json_fingerprint,
    read_json,
    sha256_hex,
)
from hetgraph.models import loading
from hetgraph.models.fingerprint import array_fingerprint, config_fingerprint, tokenizer_fingerprint
from hetgraph.testing import byte_tokenizer, tiny_causal_lm


class Boom(Exception):
    pass


def _write_text(path: Path) -> None:
    atomic_write_text(path, "new")


def _write_json(path: Path) -> None:
    atomic_write_json(path, {"new": 1})


def _write_npy(path: Path) -> None:
    atomic_save_npy(path, np.arange(3))


def _write_safetensors(path: Path) -> None:
    atomic_save_safetensors(path, {"w": torch.ones(2)})


def _write_with_path(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")


WRITERS = [_write_text, _write_json, _write_npy, _write_safetensors, _write_with_path]


@pytest.mark.parametrize("writer", WRITERS)
def test_writer_replaces_the_file_and_leaves_no_temporary(tmp_path: Path, writer: Any) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"old")
    writer(target)
    assert target.read_bytes() != b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_failed_write_keeps_the_old_file(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_write(target, mode) as f:
        f.write("half" if mode == "w" else b"half")
        raise Boom
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["target"]


@pytest.mark.parametrize("create", [True, False])
def test_failed_third_party_writer_keeps_the_old_file(tmp_path: Path, create: bool) -> None:
    target = tmp_path / "index.faiss"
    target.write_bytes(b"old")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        if create:  # a writer that fails after writing part of its output
            tmp.write_bytes(b"half")
        raise Boom
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]


def test_object_arrays_are_refused_and_the_old_file_kept(tmp_path: Path) -> None:
    target = tmp_path / "a.npy"
    atomic_save_npy(target, np.arange(4))
    with pytest.raises(ValueError):
        atomic_save_npy(target, np.array([{"a": 1}], dtype=object))
    assert np.load(target, allow_pickle=False).tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_writes_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    atomic_write_text(tmp_path / "a.txt", "x")
    assert calls  # the file (and, where possible, its directory)


@pytest.mark.parametrize(
    "obj, sort_keys, text",
    [
        ({"b": 1, "a": "é"}, False, '{\n  "b": 1,\n  "a": "\\u00e9"\n}\n'),
        ({"b": 1, "a": "é"}, True, '{\n  "a": "\\u00e9",\n  "b": 1\n}\n'),
        ([1, [2, None]], False, "[\n  1,\n  [\n    2,\n    null\n  ]\n]\n"),
    ],
)
def test_json_round_trip(tmp_path: Path, obj: Any, sort_keys: bool, text: str) -> None:
    path = tmp_path / "x.json"
    atomic_write_json(path, obj, sort_keys=sort_keys)
    assert path.read_text(encoding="utf-8") == text
    assert read_json(path) == obj


def test_npy_and_safetensors_round_trip(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.float16).reshape(3, 4)
    atomic_save_npy(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), array)
    atomic_save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(3.0)}, {"k": "v"})
    assert load_file(tmp_path / "w.safetensors")["w"].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("existing", [True, False])
def test_atomic_directory_replaces_a_directory(tmp_path: Path, existing: bool) -> None:
    target = tmp_path / "entry"
    if existing:
        target.mkdir()
        (target / "stale").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "fresh").write_text("new")
    assert [p.name for p in target.iterdir()] == ["fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(Boom), atomic_directory(target) as tmp:
        (tmp / "half").write_text("half")
        raise Boom
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


@pytest.mark.parametrize("accept", [True, False])
def test_directory_finished_first_by_another_writer(
    tmp_path: Path, accept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "entry"
    real_rename = os.rename

    def racing_rename(src: Any, dst: Any) -> None:
        if Path(dst) == target:  # another process puts its copy in place just before us
            target.mkdir()
            (target / "theirs").write_text("x")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    context = atomic_directory(target, accept_existing=lambda d: accept)
    if accept:
        with context as tmp:
            (tmp / "ours").write_text("x")
    else:
        with pytest.raises(OSError), context as tmp:
            (tmp / "ours").write_text("x")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


# -- the cache root ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("{tmp}/cache", "{tmp}/cache"),
        ("~/hg", "{home}/hg"),
        (None, "{home}/.cache/hetgraph"),
    ],
)
def test_cache_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    if value is None:
        monkeypatch.delenv("HETGRAPH_CACHE", raising=False)
    else:
        monkeypatch.setenv("HETGRAPH_CACHE", value.format(tmp=tmp_path))
    root = Path(expected.format(tmp=tmp_path, home=home))
    assert cache_root() == root
    assert loading.cache_root() == root
    assert default_cache_dir() == root / "corpus"


# -- fingerprints: byte-identical to the values recorded by earlier versions ------------

DOCUMENTS = [
    Document("a/ü.txt", "héllo wörld \ud800 ☃"),
    Document("b", "plain text\n" * 5),
    Document("", ""),
]


def _old_documents_fingerprint(documents: list[Document]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        for part in (doc.name, doc.text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    "data, length", [(b"", 16), ("héllo", 16), (b"x" * 1000, None), ("abc", 24)]
)
def test_sha256_hex(data: bytes | str, length: int | None) -> None:
    raw = data.encode() if isinstance(data, str) else data
    full = hashlib.sha256(raw).hexdigest()
    assert sha256_hex(data, length) == (full if length is None else full[:length])
    assert StreamingHash(data).hexdigest(length) == sha256_hex(data, length)


@pytest.mark.parametrize("obj", [{"b": [1, 2], "a": {"z": None, "y": "é"}}, [("x", 1)], 3.5])
def test_json_fingerprint(obj: Any) -> None:
    old = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert json_fingerprint(obj) == old[:16]
    assert json_fingerprint(obj, length=24) == old[:24]
    old_unicode = hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode())
    assert json_fingerprint(obj, ensure_ascii=False) == old_unicode.hexdigest()[:16]


def test_recorded_fingerprints_are_unchanged() -> None:
    # Values computed by hetgraph before the fingerprints moved to hetgraph.io; saved
    # datastores, caches and adapters record them.
    assert [document_hash(d.name, s) for d in DOCUMENTS for s in (0, 7)] == [
        0.8970522325659528,
        0.1556898713514925,
        0.875512301340902,
        0.9225286819930391,
        0.7283713340583249,
        0.44133782941599264,
    ]
    assert documents_fingerprint(DOCUMENTS) == "f770cc8d25740162"
    assert documents_fingerprint(DOCUMENTS) == _old_documents_fingerprint(DOCUMENTS)
    assert tokenizer_fingerprint(byte_tokenizer()) == "7efa6b8e180f034e"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 257, 300).astype(np.int32)
    doc_ids = np.repeat(np.arange(3), 100).astype(np.int32)
    assert array_fingerprint(tokens, doc_ids) == "9de6cf33ffb6b731"
    assert array_fingerprint(tokens.astype(np.int64)) == "f2731c94fb25086f"
    splits = {
        name: TokenizedSplit(
            name, tokens[i * 100 : (i + 1) * 100], np.zeros(100, np.int32), [f"dö{name}"]
        )
        for i, name in enumerate(("train", "valid", "test"))
    }
    assert [s.fingerprint() for s in splits.values()] == [
        "2de5a7fd2da4c902",
        "18aa31343d593176",
        "0dddaa3a70b13497",
    ]
    corpus = TokenizedCorpus(**splits, tokenizer_fingerprint="7efa6b8e180f034e", eos_token_id=256)
    assert corpus.fingerprint == "c20f2ddde8cff139"


def test_tokenizer_and_config_fingerprints_match_the_old_computation() -> None:
    tokenizer = byte_tokenizer()
    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}".encode())
    assert tokenizer_cache_fingerprint(tokenizer) == h.hexdigest()[:16]
    config = CorpusConfig(path="x")
    settings = config.to_dict()
    settings.pop("path")
    settings.pop("dataset_splits")  # a later field, left out of the key while unset
    payload = json.dumps(
        {
            "format_version": 1,
            "tokenizer": h.hexdigest()[:16],
            "documents": _old_documents_fingerprint(DOCUMENTS[:2]),
            "config": settings,
        },
        sort_keys=True,
    )
    assert (
        cache_key(tokenizer, DOCUMENTS[:2], config)
        == hashlib.sha256(payload.encode()).hexdigest()[:24]
    )
    model = tiny_causal_lm("llama")
    stable = {
        k: v
        for k, v in model.config.to_dict().items()
        if k
        not in (
            "_name_or_path",
            "transformers_version",
            "torch_dtype",
            "dtype",
            "_attn_implementation",
            "_attn_implementation_autoset",
            "quantization_config",
            "use_cache",
            "architectures",
            "_commit_hash",
            "output_hidden_states",
            "return_dict",
        )
    }
    old = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()
    assert config_fingerprint(model) == old[:16]


# -- datastore metadata ------------------------------------------------------------------


def test_datastore_metadata_with_the_old_extra_field_loads(tmp_path: Path) -> None:
    metadata = DatastoreMetadata(
        num_entries=3,
        dim=4,
        key_layer=None,
        feature_dims={},
        context_length=8,
        stride=4,
        batch_size=1,
        max_tokens=None,
        model={"config": "c"},
        model_dtype="float32",
        corpus_fingerprint="x",
        fingerprint="y",
    )
    path = tmp_path / DATASTORE_METADATA
    metadata.save(path)
    data = read_json(path)
    assert list(data) == sorted(data)
    # Older versions wrote neither the checksum nor the integrity record, and some an "extra".
    old = {k: v for k, v in data.items() if k != "checksum"}
    atomic_write_json(path, {**old, "extra": {"note": 1}}, sort_keys=True)
    assert DatastoreMetadata.load(path) == metadata


# -- training checkpoints ----------------------------------------------------------------


class _TinyAdapterLM(torch.nn.Module):
    """Stands in for HetGraphLM's persistence: its parameters are the adapter weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def save_pretrained(self, directory: Path) -> None:
        atomic_save_safetensors(
            Path(directory) / ADAPTER_WEIGHTS, {"weight": self.weight.detach().clone()}
        )
        # The smallest adapter_config.json a checkpoint reader accepts (no integrity record).
        atomic_write_json(
            Path(directory) / "adapter_config.json",
            {"format_version": 1, "fusion": {}, "model": {}},
        )

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    # Imported here: hetgraph.training imports the whole model stack, the rest of this file not.
    from hetgraph.training.checkpoint import read_checkpoint, restore_checkpoint, write_checkpoint

    lm = _TinyAdapterLM()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=0.1)
    for _ in range(2):
        lm.weight.sum().backward()
        optimizer.step()
    assert read_checkpoint(tmp_path) is None
    write_checkpoint(lm, optimizer, tmp_path, {"step": 2})
    write_checkpoint(lm, optimizer, tmp_path, {"step": 2})  # replaces the first one
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_DIR]
    state = read_checkpoint(tmp_path)
    assert state is not None and state["step"] == 2

    other = _TinyAdapterLM()
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    restore_checkpoint(other, other_optimizer, tmp_path, state, "cpu")
    torch.testing.assert_close(other.weight, lm.weight)
    saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
    for name in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(restored["state"][0][name], saved["state"][0][name])


@pytest.mark.parametrize("damage", ["truncated", "not_an_object"])
def test_damaged_checkpoint_state_is_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    from hetgraph.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint

    lm = _TinyAdapterLM()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=0.1)
    write_checkpoint(lm, optimizer, tmp_path, {"step": 3})
    state = tmp_path / CHECKPOINT_DIR / TRAINER_STATE
    state.write_text('{"step": 3' if damage == "truncated" else "[3]")
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and str(state) in message and "delete" in message
    # A damaged set-aside copy (a save interrupted mid-write) is skipped, not recovered.
    (tmp_path / CHECKPOINT_DIR).rename(tmp_path / f".{CHECKPOINT_DIR}.old-0badc0de")
    assert read_checkpoint(tmp_path) is None
