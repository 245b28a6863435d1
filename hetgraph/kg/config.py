r"""How a fused model uses a knowledge graph: :class:`KnowledgeConfig`, the ``kg`` section of a
:class:`~hetgraph.FusionConfig` (saved with every adapter trained with a knowledge graph)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hetgraph.configuration import JSONConfigMixin
from hetgraph.graph.config import KGGraphConfig
from hetgraph.limits import check_count

#: Most entities one position may be linked to (``KnowledgeConfig.max_entities``).
MAX_ENTITIES_PER_POSITION = 64
#: Most positions one mention's facts may stay visible for (``KnowledgeConfig.visibility``).
MAX_VISIBILITY = 512


@dataclass
class KnowledgeConfig(JSONConfigMixin):
    r"""The per-position settings of the knowledge-graph branch (``FusionConfig.kg``).

    The knowledge graph itself (its directory) is not part of the config: it is opened
    outside the engine (:class:`~hetgraph.kg.KnowledgeSource`, ``--kg DIR``), and a saved
    adapter records its fingerprint instead.

    Args:
        facts: which facts each linked position sees (``k_kg``, relation priority, tails)
            and which extra edge types the graph gets (``kg2nbr``, ``kg2kg``), see
            :class:`~hetgraph.graph.KGGraphConfig`; ``kg2nbr`` / ``kg2kg`` also give the
            adapters the ``k2n`` / ``k2k`` relations.
        max_entities: entities kept per linked position (an alias naming more keeps the
            first ones).
        word_boundaries: link only mentions that start and end on word boundaries
            (``False`` matches inside words too).
        visibility: positions that see a mention's facts: its last token and the
            ``visibility - 1`` after it (linking is causal, see
            :meth:`~hetgraph.kg.EntityLinker.causal`: a position never sees a mention it
            is inside of before the mention is complete, which would reveal its next
            token). With head-only fusion, a fact can only change the predictions made
            at these positions. 8 is a first choice, not tuned.
    """

    facts: KGGraphConfig = field(default_factory=KGGraphConfig)
    max_entities: int = 4
    word_boundaries: bool = True
    visibility: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(
            "max_entities",
            self.max_entities,
            MAX_ENTITIES_PER_POSITION,
            "a mention names a few entities (e.g. 4)",
            minimum=1,
        )
        check_count(
            "visibility",
            self.visibility,
            MAX_VISIBILITY,
            "a mention's facts stay visible for a few positions (e.g. 8)",
            minimum=1,
        )
