"""FAISS nearest-neighbour indexes over datastore keys."""
from hetgraph.index.faiss_index import (
    EXACT_SEARCH_LIMIT,
    DatastoreIndex,
    IndexConfig,
    auto_factory,
    set_faiss_threads,
)
from hetgraph.index.files import DatastoreIndexError

__all__ = [
    "EXACT_SEARCH_LIMIT", "DatastoreIndex", "DatastoreIndexError", "IndexConfig", "auto_factory",
    "set_faiss_threads",
]
