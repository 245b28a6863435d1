"""Tokenizing a corpus into train / valid / test token streams (cached on disk)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .cache import cache_key, default_cache_dir, load_cached, store_atomically
from .config import SPLITS, CorpusConfig
from .documents import Document, read_documents
from .errors import CorpusError
from .split import split_documents
from .tokenized import TokenizedCorpus, TokenizedSplit

logger = logging.getLogger(__name__)

#: Documents per call to the (fast, batched) tokenizer.
TOKENIZE_BATCH_SIZE = 32


def tokenize_documents(
    documents: Sequence[Document],
    tokenizer: Any,
    name: str = "train",
    *,
    batch_size: int = TOKENIZE_BATCH_SIZE,
    show_progress: bool = True,
) -> TokenizedSplit:
    """Tokenize documents (no special tokens) and concatenate them, each followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token, which separates documents; "
            "set `tokenizer.eos_token = ...` (hetgraph.load_model does this for you)."
        )
    pieces: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    total_chars = sum(len(doc.text) for doc in documents)
    with tqdm(total=total_chars, desc=f"tokenizing {name}", unit="char", unit_scale=True,
              disable=not show_progress) as progress:
        for start in range(0, len(documents), batch_size):
            batch = documents[start:start + batch_size]
            encoded = tokenizer(
                [doc.text for doc in batch], add_special_tokens=False,
                return_attention_mask=False, verbose=False,
            )["input_ids"]
            for offset, token_ids in enumerate(encoded):
                array = np.empty(len(token_ids) + 1, dtype=np.int32)
                array[:-1] = token_ids
                array[-1] = eos
                pieces.append(array)
                ids.append(np.full(len(array), start + offset, dtype=np.int32))
            progress.update(sum(len(doc.text) for doc in batch))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    doc_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
    return TokenizedSplit(name, tokens, doc_ids, [doc.name for doc in documents])


def tokenize_corpus(
    source: str | Path | CorpusConfig | None,
    tokenizer: Any,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    show_progress: bool = True,
) -> TokenizedCorpus:
    """Read, split and tokenize a corpus, reusing a cached result when one exists.

    Args:
        source: a path (directory, text file or JSON lines file), a :class:`CorpusConfig`,
            or ``None`` for the embedded Python 3.11 documentation.
        tokenizer: a Hugging Face tokenizer with an EOS token (a fast one is much quicker).
        cache_dir: directory holding cached corpora (default: ``$HETGRAPH_CACHE/corpus`` or
            ``~/.cache/hetgraph/corpus``); each entry is named by a hash of the tokenizer, the
            documents and the configuration.
        use_cache: read and write the cache (``False`` always tokenizes and writes nothing).
        show_progress: show tqdm progress bars while tokenizing.

    Returns:
        The tokenized train / valid / test splits (documents split as by
        :func:`split_documents`).

    Raises:
        CorpusError: for unreadable or empty input, or a tokenizer without EOS token.
    """
    from hetgraph.models.fingerprint import tokenizer_fingerprint

    if isinstance(source, CorpusConfig):
        config = source
    else:
        config = CorpusConfig(path=None if source is None else str(source))
    documents = read_documents(config)

    entry: Path | None = None
    if use_cache:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        entry = root / cache_key(tokenizer, documents, config)
        cached = load_cached(entry)
        if cached is not None:
            logger.info("loaded tokenized corpus from %s", entry)
            return cached

    split_docs = split_documents(documents, config.fractions, config.seed)
    for name in SPLITS:
        if not split_docs[name] and config.fractions[SPLITS.index(name)] > 0:
            logger.warning(
                "the %s split of %s is empty (%d documents in all); use a corpus with more "
                "documents or set CorpusConfig.document_separator to split files into documents",
                name, config.resolved_path, len(documents),
            )
    splits = {
        name: tokenize_documents(split_docs[name], tokenizer, name, show_progress=show_progress)
        for name in SPLITS
    }
    corpus = TokenizedCorpus(
        **splits, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        eos_token_id=int(tokenizer.eos_token_id), config=config,
    )
    if entry is not None:
        store_atomically(corpus, entry)
        logger.info("cached tokenized corpus in %s", entry)
    return corpus
