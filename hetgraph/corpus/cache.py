"""The on-disk cache of tokenized corpora.

A tokenized corpus is stored under ``<cache root>/<key>``, where the cache root is the
``cache_dir`` argument, else ``$HETGRAPH_CACHE/corpus``, else ``~/.cache/hetgraph/corpus``,
and the key hashes everything that determines the result: the tokenizer, the documents'
names and texts, and the corpus configuration. Entries are written into a temporary
directory that is renamed into place, so an interrupted run never leaves a partial entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import CorpusConfig
from .documents import Document
from .tokenized import FORMAT_VERSION, TokenizedCorpus


def default_cache_dir() -> Path:
    """``$HETGRAPH_CACHE/corpus`` if the variable is set, else ``~/.cache/hetgraph/corpus``."""
    env = os.environ.get("HETGRAPH_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "hetgraph"
    return root / "corpus"


def documents_fingerprint(documents: Sequence[Document]) -> str:
    """SHA-256 (16 hex digits) of the documents' names and texts, in order."""
    h = hashlib.sha256()
    for doc in documents:
        for part in (doc.name, doc.text):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()[:16]


def tokenizer_cache_fingerprint(tokenizer: Any) -> str:
    """Vocabulary and special tokens, plus the full backend definition of fast tokenizers."""
    from hetgraph.models.fingerprint import tokenizer_fingerprint

    h = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    h.update(f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}".encode())
    return h.hexdigest()[:16]


def cache_key(tokenizer: Any, documents: Sequence[Document], config: CorpusConfig) -> str:
    """The cache entry's name: a hash of tokenizer, documents and configuration."""
    settings = config.to_dict()
    settings.pop("path")  # the documents' content is hashed instead
    payload = json.dumps(
        {
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer_cache_fingerprint(tokenizer),
            "documents": documents_fingerprint(documents),
            "config": settings,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def load_cached(directory: Path) -> TokenizedCorpus | None:
    """The corpus stored in ``directory``, or ``None`` if absent or unreadable."""
    if not directory.is_dir():
        return None
    try:
        return TokenizedCorpus.load(directory)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"ignoring unreadable corpus cache {directory}: {error}", stacklevel=3)
        return None


def store_atomically(corpus: TokenizedCorpus, directory: Path) -> None:
    """Save ``corpus`` to ``directory`` via a temporary directory and a rename."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        corpus.save(tmp)
        if directory.exists():  # unreadable leftover: replace it
            shutil.rmtree(directory, ignore_errors=True)
        try:
            os.rename(tmp, directory)
        except OSError:
            if load_cached(directory) is None:  # not a concurrent writer finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    corpus.path = directory
