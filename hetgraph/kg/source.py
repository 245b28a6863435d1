r"""A knowledge graph ready to be fused: the store, its entity linker, its fact index and its
KGE tables, in one object (:class:`KnowledgeSource`).

The fusion engine never holds the base model or its tokenizer, so the knowledge graph is
opened outside it, with the tokenizer (:meth:`KnowledgeSource.open`), and handed to
:class:`~hetgraph.FusionEngine` / :class:`~hetgraph.HetGraphLM` as ``knowledge=``. Per call the
engine links the call's token ids and adds the facts of the linked entities to the
context graph as ``kg`` nodes (:meth:`KnowledgeSource.add_facts`). The KGE tables are set
into each adapter's :class:`~hetgraph.nn.KGFactEncoder` as non-persistent buffers: a saved
adapter never holds them, it records :meth:`KnowledgeSource.identity` instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from hetgraph.io import INTEGRITY_KEY, json_fingerprint
from hetgraph.kg.config import KnowledgeConfig
from hetgraph.kg.embeddings import load_kge_embeddings
from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.kg.facts import FactIndex, add_facts, window_entities
from hetgraph.kg.linking import EntityLinker
from hetgraph.kg.store import EMBEDDINGS, MANIFEST, KnowledgeGraph, read_manifest
from hetgraph.nn.kg import fact_feature_channels

logger = logging.getLogger(__name__)


def check_knowledge_directory(directory: str | Path, option: str = "--kg") -> dict[str, Any]:
    r"""The manifest of a knowledge-graph directory that can be fused, checked cheaply
    (no array is read): it exists, is a knowledge graph of this format and has embeddings.

    Raises:
        KnowledgeGraphError: one line naming ``option``, the directory and the fix.
    """
    directory = Path(directory)
    if directory.is_dir() and not (directory / MANIFEST).is_file():
        raise KnowledgeGraphError(
            f"{option} {directory} is not a knowledge-graph directory (no {MANIFEST}); build "
            f"one with `hetgraph kg build --triples FILE --out {directory}`, then `hetgraph "
            f"kg embed --kg {directory}`"
        )
    try:
        manifest = read_manifest(directory)
    except KnowledgeGraphError as error:
        raise KnowledgeGraphError(f"{option} {error}") from None
    if "embeddings" not in manifest:
        raise KnowledgeGraphError(
            f"{option} {directory} has no entity embeddings yet; run "
            f"`hetgraph kg embed --kg {directory}` first"
        )
    return manifest


def knowledge_fingerprint(manifest: dict[str, Any]) -> str:
    r"""What an adapter trained with a knowledge graph depends on: its content (entities,
    relations, triples, aliases as token ids) and its embeddings file (a re-embedded graph
    gives the adapter other inputs)."""
    embeddings = manifest.get(INTEGRITY_KEY, {}).get(EMBEDDINGS, {})
    return json_fingerprint(
        {"content": manifest.get("content"), "embeddings": embeddings.get("sha256")}
    )


@dataclass
class KnowledgeSource:
    r"""A knowledge graph with what fusing it takes: the :class:`~hetgraph.kg.EntityLinker`
    and :class:`~hetgraph.kg.FactIndex` of one :class:`~hetgraph.kg.KnowledgeConfig` and
    the KGE ``(entity, relation)`` tables.

    Build one with :meth:`open`; :meth:`bind` gives the same graph and tables under other
    per-position settings (the engine binds the source to its ``FusionConfig.kg``).

    Attributes:
        graph: the store.
        config: the per-position settings the linker and index were built for.
        linker, index: the entity linker and the fact index.
        entity, relation: ``[num_entities, D_e]`` / ``[num_relations, D_r]`` float32 tables.
        directory: where the graph was read from (``None``: built in memory).
    """

    graph: KnowledgeGraph
    config: KnowledgeConfig
    linker: EntityLinker
    index: FactIndex
    entity: Tensor
    relation: Tensor
    directory: Path | None = None

    @classmethod
    def open(
        cls, directory: str | Path, tokenizer: Any, config: KnowledgeConfig | None = None
    ) -> KnowledgeSource:
        r"""Open the knowledge graph in ``directory`` (built by ``hetgraph kg build`` for
        ``tokenizer``'s vocabulary, embedded by ``hetgraph kg embed``).

        Raises:
            KnowledgeGraphError: missing, not a knowledge graph, damaged, built for another
                tokenizer, or without embeddings (one line with the fix).
        """
        directory = Path(directory)
        check_knowledge_directory(directory)
        graph = KnowledgeGraph.from_pretrained(directory, tokenizer)
        entity, relation = load_kge_embeddings(directory)
        if entity.size(0) != graph.num_entities or relation.size(0) != graph.num_relations:
            raise KnowledgeGraphError(
                f"{directory}: the embeddings cover {entity.size(0)} entities and "
                f"{relation.size(0)} relations, the graph has {graph.num_entities} and "
                f"{graph.num_relations}; train them again with `hetgraph kg embed --kg "
                f"{directory}`"
            )
        source = cls.from_graph(graph, entity, relation, config, directory)
        logger.info(
            "knowledge graph %s: %d entities, %d relations, %d triples, %d alias sequences",
            directory,
            graph.num_entities,
            graph.num_relations,
            graph.triples.shape[0],
            source.linker.num_keys,
        )
        return source

    @classmethod
    def from_graph(
        cls,
        graph: KnowledgeGraph,
        entity: Tensor,
        relation: Tensor,
        config: KnowledgeConfig | None = None,
        directory: str | Path | None = None,
    ) -> KnowledgeSource:
        r"""A source over an in-memory graph and its ``(entity, relation)`` tables."""
        config = config or KnowledgeConfig()
        return cls(
            graph,
            config,
            graph.linker(config.max_entities, word_boundaries=config.word_boundaries),
            FactIndex.from_graph(graph, config.facts),
            entity.float(),
            relation.float(),
            None if directory is None else Path(directory),
        )

    def bind(self, config: KnowledgeConfig) -> KnowledgeSource:
        r"""This source under the settings ``config`` (``self`` if they are its own): a new
        linker and fact index, the same graph and tables."""
        if config == self.config:
            return self
        return KnowledgeSource.from_graph(
            self.graph, self.entity, self.relation, config, self.directory
        )

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        r""":func:`knowledge_fingerprint` of the graph's manifest."""
        return knowledge_fingerprint(self.graph.manifest)

    def identity(self) -> dict[str, Any]:
        r"""What a saved adapter records of the knowledge graph it was trained with."""
        return {
            "fingerprint": self.fingerprint,
            "directory": None if self.directory is None else str(self.directory),
            "entities": self.graph.num_entities,
            "relations": self.graph.num_relations,
            "triples": int(self.graph.triples.shape[0]),
        }

    def feature_channels(self, combine: str) -> int:
        r"""Width of a fact's raw feature for the adapters' ``kg_combine``."""
        return fact_feature_channels(self.entity.size(1), self.relation.size(1), combine)

    # ------------------------------------------------------------------ per call
    def _on(self, device: torch.device) -> None:
        # The tables follow the calls' device, moved once (not per call).
        if self.index.ptr.device != device:
            self.linker.to(device)
            self.index.to(device)

    def link(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        r"""``[B, T, m]`` entity ids each position of ``input_ids`` ``[B, T]`` sees (``-1``:
        none), linked causally (:meth:`~hetgraph.kg.EntityLinker.causal` with the config's
        ``visibility``); padded positions (``attention_mask == 0``, when it has the ids'
        shape) are never part of a mention."""
        ids = input_ids.long()
        if attention_mask is not None and attention_mask.shape == ids.shape:
            ids = ids.masked_fill(attention_mask.to(ids.device) == 0, -1)  # no alias holds -1
        self._on(ids.device)
        return self.linker.causal(ids, self.config.visibility).entities

    def add_facts(
        self, graph: HeteroData, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> HeteroData:
        r"""Link ``input_ids`` ``[B, T' >= T]`` (the call's tokens after their history, so a
        mention that began before the graph's ``T`` positions is still found) and add the
        facts of the last ``T`` positions' entities to ``graph`` as ``kg`` nodes (and, with
        ``facts.kg2nbr``, of its window tokens); in place, returns ``graph``.

        Raises:
            ValueError: fewer ids than the graph's positions.
        """
        length = int(graph.query_shape[1])
        if input_ids.dim() != 2 or input_ids.shape[-1] < length:
            raise ValueError(
                f"the knowledge graph links the call's token ids: got ids of shape "
                f"{tuple(input_ids.shape)} for a graph of {length} positions"
            )
        device = graph["ctx"].batch_index.device
        entities = self.link(input_ids.to(device), attention_mask)[:, -length:]
        nbr = window_entities(graph, self.linker) if self.config.facts.kg2nbr else None
        return add_facts(graph, self.index, entities, nbr)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.directory or 'in memory'}, "
            f"entities={self.graph.num_entities}, relations={self.graph.num_relations}, "
            f"triples={int(self.graph.triples.shape[0])}, k_kg={self.config.facts.k_kg})"
        )
