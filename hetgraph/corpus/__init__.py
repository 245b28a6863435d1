"""Corpora: reading documents, splitting them by document, tokenizing and caching them."""

from .config import DEFAULT_TEXT_SUFFIXES, SPLITS, CorpusConfig
from .documents import Document, read_documents
from .embedded import EMBEDDED_CORPUS, EMBEDDED_CORPUS_LICENSE
from .errors import CorpusError
from .split import document_hash, split_documents
from .tokenization import tokenize_corpus, tokenize_documents
from .tokenized import TokenizedCorpus, TokenizedSplit
from .windows import Window, sliding_windows

__all__ = [
    "DEFAULT_TEXT_SUFFIXES",
    "EMBEDDED_CORPUS",
    "EMBEDDED_CORPUS_LICENSE",
    "SPLITS",
    "CorpusConfig",
    "CorpusError",
    "Document",
    "TokenizedCorpus",
    "TokenizedSplit",
    "Window",
    "document_hash",
    "read_documents",
    "sliding_windows",
    "split_documents",
    "tokenize_corpus",
    "tokenize_documents",
]
