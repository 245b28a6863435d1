"""Tokenizing a corpus into train / valid / test token streams (cached on disk)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .cache import (
    cache_key,
    default_cache_dir,
    load_cached,
    remove_dead_temporaries,
    store_atomically,
)
from .chunking import LONG_DOCUMENT_CHARS, encode, encode_long
from .config import SPLITS, CorpusConfig
from .documents import Document, read_corpus
from .errors import CorpusError
from .split import split_documents
from .tokenized import TokenizedCorpus, TokenizedSplit

logger = logging.getLogger(__name__)

#: Documents per call to the (fast, batched) tokenizer.
TOKENIZE_BATCH_SIZE = 32
#: Characters per call to the tokenizer (a longer document is tokenized alone, in pieces).
TOKENIZE_BATCH_CHARS = 1_048_576


def tokenize_documents(
    documents: Sequence[Document],
    tokenizer: Any,
    name: str = "train",
    *,
    batch_size: int = TOKENIZE_BATCH_SIZE,
    show_progress: bool = True,
) -> TokenizedSplit:
    """Tokenize documents (no special tokens) and concatenate them, each followed by EOS.

    Documents are tokenized in batches of at most ``batch_size`` documents and
    :data:`TOKENIZE_BATCH_CHARS` characters; a document longer than
    :data:`~hetgraph.corpus.chunking.LONG_DOCUMENT_CHARS` characters is tokenized alone, in
    pieces cut at verified points (:func:`~hetgraph.corpus.chunking.encode_long`), so memory
    stays bounded whatever the documents' lengths.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token, which separates documents; "
            "set `tokenizer.eos_token = ...` (hetgraph.load_model does this for you)."
        )
    pieces: list[np.ndarray] = []
    total_chars = sum(len(doc.text) for doc in documents)
    with tqdm(
        total=total_chars,
        desc=f"tokenizing {name}",
        unit="char",
        unit_scale=True,
        disable=not show_progress,
    ) as progress:
        for batch in _batches(documents, batch_size):
            for token_ids in _encode_batch(tokenizer, [documents[i] for i in batch]):
                array = np.empty(len(token_ids) + 1, dtype=np.int32)
                array[:-1] = token_ids
                array[-1] = eos
                pieces.append(array)
            progress.update(sum(len(documents[i].text) for i in batch))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int32), lengths)
    return TokenizedSplit(name, tokens, doc_ids, [doc.name for doc in documents])


def _batches(documents: Sequence[Document], batch_size: int) -> Iterator[list[int]]:
    """Indices of consecutive documents, at most ``batch_size`` of them and (unless one
    document alone is longer) :data:`TOKENIZE_BATCH_CHARS` characters per batch."""
    batch: list[int] = []
    chars = 0
    for index, doc in enumerate(documents):
        if batch and (len(batch) >= batch_size or chars + len(doc.text) > TOKENIZE_BATCH_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(index)
        chars += len(doc.text)
    if batch:
        yield batch


def _encode_batch(tokenizer: Any, batch: list[Document]) -> list[Sequence[int]]:
    short = [i for i, doc in enumerate(batch) if len(doc.text) <= LONG_DOCUMENT_CHARS]
    result: list[Sequence[int]] = [()] * len(batch)
    if short:
        for i, ids in zip(short, encode(tokenizer, [batch[i].text for i in short]), strict=True):
            result[i] = ids
    for i, doc in enumerate(batch):
        if len(doc.text) > LONG_DOCUMENT_CHARS:
            result[i] = encode_long(tokenizer, doc.text, doc.name)
    return result


def tokenize_corpus(
    source: str | Path | CorpusConfig | Any | None,
    tokenizer: Any,
    *,
    config: CorpusConfig | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    show_progress: bool = True,
) -> TokenizedCorpus:
    """Read, split and tokenize a corpus, reusing a cached result when one exists.

    Args:
        source: a path (directory, text file, JSON lines file, Parquet file or 🤗 datasets
            ``save_to_disk`` directory), a :class:`CorpusConfig`, a ``datasets.Dataset`` or
            ``DatasetDict`` (one document per row), or ``None`` for the embedded Python 3.11
            documentation.
        tokenizer: a Hugging Face tokenizer with an EOS token (a fast one is much quicker).
        config: with a ``datasets`` object as ``source``: how to read and split it
            (``text_field``, ``dataset_splits``, ``fractions`` …; its ``path`` is replaced by
            a description of the object, which is what the result records).
        cache_dir: directory holding cached corpora (default: ``$HETGRAPH_CACHE/corpus`` or
            ``~/.cache/hetgraph/corpus``); each entry is named by a hash of the tokenizer, the
            documents and the configuration.
        use_cache: read and write the cache (``False`` always tokenizes and writes nothing).
        show_progress: show tqdm progress bars while tokenizing.

    Returns:
        The tokenized train / valid / test splits (documents split as by
        :func:`split_documents`, or a ``DatasetDict``'s own splits when
        ``config.dataset_splits`` maps them).

    Raises:
        CorpusError: for unreadable or empty input, or a tokenizer without EOS token.
        TypeError: ``config`` given with a ``source`` that is not a ``datasets`` object.
    """
    from hetgraph.models.fingerprint import tokenizer_fingerprint

    config, dataset = _resolve_source(source, config)
    documents, given_splits = read_corpus(config, dataset)

    entry: Path | None = None
    if use_cache:
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        remove_dead_temporaries(root)
        entry = root / cache_key(tokenizer, documents, config)
        cached = load_cached(entry)
        if cached is not None:
            logger.info("loaded tokenized corpus from %s", entry)
            return cached

    if given_splits is not None:
        split_docs = given_splits
        for name in SPLITS:
            if not split_docs[name] and name in (config.dataset_splits or {}):
                logger.warning(
                    "the %s split of %s is empty: its dataset split %r has no rows with text",
                    name,
                    config.resolved_path,
                    (config.dataset_splits or {})[name],
                )
    else:
        split_docs = split_documents(documents, config.fractions, config.seed)
    for name in SPLITS if given_splits is None else ():
        if not split_docs[name] and config.fractions[SPLITS.index(name)] > 0:
            logger.warning(
                "the %s split of %s is empty (%d documents in all); use a corpus with more "
                "documents or set CorpusConfig.document_separator to split files into documents",
                name,
                config.resolved_path,
                len(documents),
            )
    splits = {
        name: tokenize_documents(split_docs[name], tokenizer, name, show_progress=show_progress)
        for name in SPLITS
    }
    corpus = TokenizedCorpus(
        **splits,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        eos_token_id=int(tokenizer.eos_token_id),
        config=config,
    )
    if entry is not None:
        store_atomically(corpus, entry)
        logger.info("cached tokenized corpus in %s", entry)
    return corpus


def _resolve_source(source: Any, config: CorpusConfig | None) -> tuple[CorpusConfig, Any]:
    """``(config, dataset)`` of :func:`tokenize_corpus`: ``dataset`` is the ``datasets``
    object given as ``source`` (``config.path`` then describes it), else ``None``."""
    from .hf_datasets import describe_object, is_dataset_object

    if (
        source is not None
        and not isinstance(source, (str, Path, CorpusConfig))
        and is_dataset_object(source)
    ):
        return CorpusConfig.from_dict(
            {**(config or CorpusConfig()).to_dict(), "path": describe_object(source)}
        ), source
    if config is not None:
        raise TypeError(
            "tokenize_corpus: config= describes a datasets.Dataset / DatasetDict "
            "source; for a path, pass a CorpusConfig as the source instead"
        )
    if isinstance(source, CorpusConfig):
        return source, None
    return CorpusConfig(path=None if source is None else str(source)), None
