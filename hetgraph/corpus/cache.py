r"""The on-disk cache of tokenized corpora.

A tokenized corpus is stored under ``<cache root>/<key>``, where the cache root is the
``cache_dir`` argument, else ``$HETGRAPH_CACHE/corpus``, else ``~/.cache/hetgraph/corpus``,
and the key hashes everything that determines the result: the tokenizer, the documents'
names and texts, and the corpus configuration. Entries are written into a temporary
directory that is renamed into place (:func:`hetgraph.io.atomic_directory`), so an
interrupted run never leaves a partial entry.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetgraph.io import (
    CORPUS_CACHE_DIR,
    StreamingHash,
    atomic_directory,
    cache_root,
    json_fingerprint,
)

from .config import CorpusConfig
from .documents import Document
from .tokenized import FORMAT_VERSION, TokenizedCorpus


def default_cache_dir() -> Path:
    r"""``corpus`` under :func:`hetgraph.io.cache_root` (``$HETGRAPH_CACHE`` if set, else
    ``~/.cache/hetgraph``)."""
    return cache_root() / CORPUS_CACHE_DIR


def documents_fingerprint(documents: Sequence[Document]) -> str:
    r"""SHA-256 (16 hex digits) of the documents' names and texts, in order, each preceded
    by its length."""
    h = StreamingHash()
    for doc in documents:
        for part in (doc.name, doc.text):
            # surrogatepass: text read with surrogateescape may hold lone surrogates.
            h.update_framed(part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def tokenizer_cache_fingerprint(tokenizer: Any) -> str:
    """Vocabulary and special tokens, plus the full backend definition of fast tokenizers."""
    from hetgraph.models.fingerprint import tokenizer_fingerprint

    h = StreamingHash(tokenizer_fingerprint(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str())
    h.update(f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}")
    return h.hexdigest()


def cache_key(tokenizer: Any, documents: Sequence[Document], config: CorpusConfig) -> str:
    """The cache entry's name: a hash of tokenizer, documents and configuration."""
    settings = config.to_dict()
    settings.pop("path")  # the documents' content is hashed instead
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_cache_fingerprint(tokenizer),
        "documents": documents_fingerprint(documents),
        "config": settings,
    }
    return json_fingerprint(payload, length=24)


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
    r"""Save ``corpus`` to ``directory`` via a temporary directory and a rename, replacing an
    (unreadable) entry already there; another process storing the same entry first wins."""
    with atomic_directory(directory,
                          accept_existing=lambda d: load_cached(d) is not None) as tmp:
        corpus.save(tmp)
    corpus.path = directory
