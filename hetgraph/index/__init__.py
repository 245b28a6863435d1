"""FAISS nearest-neighbour indexes over datastore keys (in memory or with on-disk lists)."""

from hetgraph.index.config import IndexConfig
from hetgraph.index.faiss_index import DatastoreIndex, set_faiss_threads
from hetgraph.index.files import DatastoreIndexError
from hetgraph.index.ondisk import (
    ONDISK_ROW_LIMIT,
    build_index,
    build_ondisk_index,
    choose_layout,
    estimated_index_bytes,
)
from hetgraph.index.rerank import rerank
from hetgraph.index.training import EXACT_SEARCH_LIMIT, auto_factory, ivf_pq_factory

__all__ = [
    "EXACT_SEARCH_LIMIT",
    "ONDISK_ROW_LIMIT",
    "DatastoreIndex",
    "DatastoreIndexError",
    "IndexConfig",
    "auto_factory",
    "build_index",
    "build_ondisk_index",
    "choose_layout",
    "estimated_index_bytes",
    "ivf_pq_factory",
    "rerank",
    "set_faiss_threads",
]
