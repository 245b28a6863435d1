r"""Knowledge graphs as data: triples and aliases read from files, stored with their aliases
tokenised for the LM, linked to token ids, and embedded with PyG's KGE models.

``hetgraph kg build`` and ``hetgraph kg embed`` (``hetgraph/cli_kg.py``) drive these;
:mod:`hetgraph.kg.facts` chooses the facts each position sees and adds them to a context
graph as ``kg`` nodes (:func:`~hetgraph.graph.add_kg_nodes`); :class:`KnowledgeSource`
holds a graph ready to be fused (``FusionEngine(..., knowledge=...)``, ``--kg DIR``).
"""

from __future__ import annotations

from hetgraph.kg.aliases import AliasConfig, AliasSequences, token_flags, tokenize_aliases
from hetgraph.kg.config import KnowledgeConfig
from hetgraph.kg.embeddings import (
    KGE_MODELS,
    EmbeddingConfig,
    embed_knowledge_graph,
    load_entity_features,
    load_kge_embeddings,
    train_embeddings,
)
from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.kg.facts import FactIndex, add_facts, select_facts, window_entities
from hetgraph.kg.linking import EntityLinker, EntityLinks
from hetgraph.kg.source import KnowledgeSource, check_knowledge_directory
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
    "FactIndex",
    "KnowledgeConfig",
    "KnowledgeGraph",
    "KnowledgeGraphError",
    "KnowledgeSource",
    "add_facts",
    "check_knowledge_directory",
    "embed_knowledge_graph",
    "load_entity_features",
    "load_kge_embeddings",
    "read_aliases",
    "read_triples",
    "select_facts",
    "shipped_wordnet",
    "token_flags",
    "tokenize_aliases",
    "train_embeddings",
    "window_entities",
]
