r"""Knowledge graphs as data: triples and aliases read from files, stored with their aliases
tokenised for the LM, linked to token ids, and embedded with PyG's KGE models.

``hetgraph kg build`` and ``hetgraph kg embed`` (``hetgraph/cli_kg.py``) drive these; the
``kg`` node type of the context graph that consumes them is built elsewhere.
"""

from __future__ import annotations

from hetgraph.kg.aliases import AliasConfig, AliasSequences, token_flags, tokenize_aliases
from hetgraph.kg.embeddings import (
    KGE_MODELS,
    EmbeddingConfig,
    embed_knowledge_graph,
    load_entity_features,
    train_embeddings,
)
from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.kg.linking import EntityLinker, EntityLinks
from hetgraph.kg.store import KnowledgeGraph
from hetgraph.kg.triples import read_aliases, read_triples
from hetgraph.kg.wordnet import shipped_wordnet

__all__ = [
    "KGE_MODELS",
    "AliasConfig",
    "AliasSequences",
    "EmbeddingConfig",
    "EntityLinker",
    "EntityLinks",
    "KnowledgeGraph",
    "KnowledgeGraphError",
    "embed_knowledge_graph",
    "load_entity_features",
    "read_aliases",
    "read_triples",
    "shipped_wordnet",
    "token_flags",
    "tokenize_aliases",
    "train_embeddings",
]
