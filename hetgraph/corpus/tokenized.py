"""Tokenized splits and corpora, stored as ``.npy`` arrays plus JSON (never pickles)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    read_json_record,
)
from hetgraph.io import (
    CORPUS_METADATA,
    INTEGRITY_KEY,
    StreamingHash,
    atomic_save_npy,
    atomic_write_text,
    read_json,
)

from .config import SPLITS, CorpusConfig
from .errors import CorpusError

#: Version of the on-disk layout written by :meth:`TokenizedCorpus.save`.
FORMAT_VERSION = 1

_REWRITE_HINT = "delete its directory and tokenize again"


def split_file_names(name: str) -> tuple[str, str, str]:
    r"""The files :meth:`TokenizedSplit.save` writes for the split ``name``."""
    return f"{name}.tokens.npy", f"{name}.doc_ids.npy", f"{name}.docs.json"


def _read_json_file(path: Path, kind: type) -> Any:
    """The JSON value of ``path``, which must be a ``kind``; a :class:`CorpusError` naming the
    file otherwise."""
    try:
        value = read_json(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorpusError(
            f"{path} is not valid JSON ({error}); delete its directory and tokenize again"
        ) from None
    if not isinstance(value, kind):
        raise CorpusError(
            f"{path} holds a JSON {type(value).__name__}, expected a "
            f"{kind.__name__}; delete its directory and tokenize again"
        )
    return value


def positions_from_doc_ids(doc_ids: np.ndarray) -> np.ndarray:
    """Offset of every token inside its document (documents are contiguous runs of ids)."""
    doc_ids = np.asarray(doc_ids)
    n = len(doc_ids)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    change = np.empty(n, dtype=bool)
    change[0] = True
    np.not_equal(doc_ids[1:], doc_ids[:-1], out=change[1:])
    starts = np.flatnonzero(change)
    run = np.cumsum(change) - 1
    return (np.arange(n, dtype=np.int64) - starts[run]).astype(np.int32)


@dataclass
class TokenizedSplit:
    """One split of a tokenized corpus: documents concatenated, each followed by EOS.

    Attributes:
        name: ``"train"``, ``"valid"`` or ``"test"``.
        tokens: int32 ``[N]`` token ids.
        doc_ids: int32 ``[N]`` index into :attr:`doc_names` of each token's document (the EOS
            after a document belongs to it). Documents are contiguous and in order.
        doc_names: name of every document.
        positions: int32 ``[N]`` offset of each token inside its document (derived from
            :attr:`doc_ids` when not given).
    """

    name: str
    tokens: np.ndarray
    doc_ids: np.ndarray
    doc_names: list[str]
    positions: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int32)
        self.doc_ids = np.asarray(self.doc_ids, dtype=np.int32)
        self.doc_names = list(self.doc_names)
        if self.tokens.ndim != 1 or self.tokens.shape != self.doc_ids.shape:
            raise ValueError(
                f"tokens {self.tokens.shape} and doc_ids {self.doc_ids.shape} must be 1-D and "
                "of equal length"
            )
        num_names = len(self.doc_names)
        if len(self.doc_ids) and (self.doc_ids.min() < 0 or self.doc_ids.max() >= num_names):
            raise ValueError(f"doc_ids must index doc_names ({len(self.doc_names)} names)")
        if self.positions is None:
            self.positions = positions_from_doc_ids(self.doc_ids)
        else:
            self.positions = np.asarray(self.positions, dtype=np.int32)
            if self.positions.shape != self.tokens.shape:
                raise ValueError("positions must have the same shape as tokens")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return len(self.doc_names)

    def truncate(self, max_tokens: int) -> TokenizedSplit:
        """The first ``max_tokens`` tokens (documents past the cut are dropped from the names)."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if max_tokens >= len(self):
            return self
        doc_ids = self.doc_ids[:max_tokens]
        keep = int(doc_ids.max()) + 1 if len(doc_ids) else 0
        return TokenizedSplit(
            self.name,
            self.tokens[:max_tokens],
            doc_ids,
            self.doc_names[:keep],
            self.positions[:max_tokens],
        )

    def save(self, directory: str | Path) -> None:
        """Write ``<name>.tokens.npy``, ``<name>.doc_ids.npy`` and ``<name>.docs.json``."""
        directory = Path(directory)
        tokens, doc_ids, docs = split_file_names(self.name)
        atomic_save_npy(directory / tokens, self.tokens)
        atomic_save_npy(directory / doc_ids, self.doc_ids)
        atomic_write_text(directory / docs, json.dumps(self.doc_names, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path, name: str, mmap: bool = False) -> TokenizedSplit:
        """Inverse of :meth:`save`; ``mmap=True`` maps the arrays read-only."""
        directory = Path(directory)
        mode = "r" if mmap else None
        tokens_file, doc_ids_file, docs_file = split_file_names(name)
        arrays = []
        for file in (tokens_file, doc_ids_file):
            try:
                arrays.append(np.load(directory / file, mmap_mode=mode, allow_pickle=False))
            except (OSError, ValueError, EOFError) as error:
                raise CorpusError(
                    f"{directory / file} cannot be read ({error}); {_REWRITE_HINT}"
                ) from None
        names = _read_json_file(directory / docs_file, list)
        try:
            return cls(name, *arrays, names)
        except ValueError as error:
            raise CorpusError(
                f"{directory}: the {name} split is inconsistent ({error}); {_REWRITE_HINT}"
            ) from None

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the split's tokens, document ids and names."""
        h = StreamingHash()
        for array in (self.tokens, self.doc_ids):
            h.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
            h.update(b"|")
        h.update(json.dumps(self.doc_names, ensure_ascii=False))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"TokenizedSplit(name={self.name!r}, tokens={len(self)}, "
            f"documents={self.num_documents})"
        )


@dataclass
class TokenizedCorpus:
    """The train / valid / test splits of a corpus, tokenized with one tokenizer.

    Attributes:
        train, valid, test: the splits.
        tokenizer_fingerprint: :func:`hetgraph.models.fingerprint.tokenizer_fingerprint` of the
            tokenizer used.
        eos_token_id: the id appended after every document.
        config: the corpus configuration (``None`` if unknown).
        fingerprint: identifies the tokenized content (all splits' tokens, doc ids and names).
        path: the directory this corpus was loaded from or saved to, if any.
    """

    train: TokenizedSplit
    valid: TokenizedSplit
    test: TokenizedSplit
    tokenizer_fingerprint: str
    eos_token_id: int
    config: CorpusConfig | None = None
    fingerprint: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        if not self.fingerprint:
            h = StreamingHash(self.tokenizer_fingerprint)
            for split in self.splits.values():
                h.update(f"{split.name}:{split.fingerprint()};")
            self.fingerprint = h.hexdigest()

    @property
    def splits(self) -> dict[str, TokenizedSplit]:
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def split(self, name: str) -> TokenizedSplit:
        """The split called ``name`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; choose one of {SPLITS}")
        return getattr(self, name)

    def summary(self) -> dict[str, Any]:
        """Documents and tokens per split (JSON-serialisable)."""
        return {
            name: {"documents": split.num_documents, "tokens": len(split)}
            for name, split in self.splits.items()
        }

    def save(self, directory: str | Path) -> None:
        r"""Write every split and ``corpus.json`` (metadata, written last) into ``directory``.

        ``corpus.json`` records every split file's size and SHA-256 (under ``integrity``)
        and carries its own checksum, so that :meth:`load` detects a changed byte."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for split in self.splits.values():
            split.save(directory)
        files = {
            file: file_record(directory / file)
            for name in SPLITS
            for file in split_file_names(name)
        }
        metadata = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "eos_token_id": int(self.eos_token_id),
            "config": None if self.config is None else self.config.to_dict(),
            "summary": self.summary(),
            INTEGRITY_KEY: {"files": files},
        }
        atomic_write_json_record(directory / CORPUS_METADATA, metadata)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = False) -> TokenizedCorpus:
        """Inverse of :meth:`save`.

        Every split file is checked against the sizes and checksums ``corpus.json`` records
        (in full; with ``mmap=True`` only sizes and sampled checksums, so that mapping a
        large corpus stays cheap). A corpus saved before the record existed loads unchecked.

        Raises:
            CorpusError: if the directory holds no corpus of a known format, one of its
                JSON files is malformed or a file differs from its record (named, with the
                fix).
        """
        directory = Path(directory)
        metadata = read_metadata(directory)
        problems = integrity_problems(directory, metadata, full=not mmap)
        if problems:
            raise CorpusError(f"{problems[0]}; {_REWRITE_HINT}")
        meta_path = directory / CORPUS_METADATA
        splits = {name: TokenizedSplit.load(directory, name, mmap=mmap) for name in SPLITS}
        config = metadata.get("config")
        try:
            return cls(
                **splits,
                tokenizer_fingerprint=metadata["tokenizer_fingerprint"],
                eos_token_id=int(metadata["eos_token_id"]),
                config=None if config is None else CorpusConfig.from_dict(config),
                fingerprint=metadata["fingerprint"],
                path=directory,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CorpusError(
                f"{meta_path} is malformed ({type(error).__name__}: {error}); "
                "delete the directory and tokenize again"
            ) from error

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{name}={len(split)} tokens/{split.num_documents} docs"
            for name, split in self.splits.items()
        )
        return f"TokenizedCorpus({parts}, fingerprint={self.fingerprint!r})"


def read_metadata(directory: str | Path) -> dict[str, Any]:
    r"""The ``corpus.json`` of the tokenized corpus in ``directory``, its own checksum (when
    it has one) checked, and its format version.

    Raises:
        CorpusError: it is missing, damaged, or of another format version.
    """
    directory = Path(directory)
    meta_path = directory / CORPUS_METADATA
    if not meta_path.is_file():
        raise CorpusError(
            f"{directory} holds no tokenized corpus ({CORPUS_METADATA} "
            "missing); delete it and tokenize again"
        )
    metadata = read_json_record(meta_path, CorpusError, _REWRITE_HINT)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CorpusError(
            f"{directory}: tokenized corpus format {metadata.get('format_version')}, "
            f"expected {FORMAT_VERSION}; delete it and tokenize again"
        )
    return metadata


def file_records(metadata: dict[str, Any]) -> dict[str, Any] | None:
    r"""The per-file records of a ``corpus.json``, or ``None`` when it has none."""
    integrity = metadata.get(INTEGRITY_KEY)
    files = integrity.get("files") if isinstance(integrity, dict) else None
    return files if isinstance(files, dict) else None


def integrity_problems(
    directory: str | Path, metadata: dict[str, Any], *, full: bool = True
) -> list[str]:
    r"""One line per split file of the tokenized corpus in ``directory`` that differs from
    the record in its ``metadata`` (:func:`read_metadata`), naming the file; empty when all
    match or when there is no record (a corpus saved by an older hetgraph).

    Args:
        full: compare whole-file SHA-256 checksums (else sizes and sampled checksums only).
    """
    directory = Path(directory)
    records = file_records(metadata)
    if records is None:
        return []
    problems = []
    for name in SPLITS:
        for file in split_file_names(name):
            record = records.get(file)
            if not isinstance(record, dict):
                problems.append(f"{directory / CORPUS_METADATA} records no checksum of {file}")
                continue
            problem = check_file_record(directory / file, record, full=full)
            if problem is not None:
                problems.append(f"{directory / file} {problem}")
    return problems
