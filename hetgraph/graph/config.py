r"""Configuration of the heterogeneous context graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch_geometric.typing import EdgeType, Metadata, NodeType

from hetgraph.configuration import JSONConfigMixin
from hetgraph.limits import check_count

#: Node type of the query (original-context) positions.
CTX: NodeType = "ctx"
#: Node type of the retrieved neighbour window tokens.
NBR: NodeType = "nbr"
#: Adjacent tokens inside one neighbour window (both directions, plus self-loops).
N2N: EdgeType = (NBR, "n2n", NBR)
#: Retrieved neighbour token -> query position.
N2C: EdgeType = (NBR, "n2c", CTX)
#: Causal query -> query edges (u <= v in the same sequence).
C2C: EdgeType = (CTX, "c2c", CTX)
#: All edge types, in the canonical order used by the layers.
EDGE_TYPES: tuple[EdgeType, ...] = (N2N, N2C, C2C)
#: Node type of the knowledge-graph facts (one per (sequence, triple)), see
#: :func:`~hetgraph.graph.add_kg_nodes`.
KG: NodeType = "kg"
#: Fact -> the query positions that mention one of its entities (K-BERT's visibility matrix).
K2C: EdgeType = (KG, "k2c", CTX)
#: Fact -> the retrieved window tokens that mention one of its entities.
K2N: EdgeType = (KG, "k2n", NBR)
#: Fact -> fact, between facts of one sequence that share an entity (with self-loops).
K2K: EdgeType = (KG, "k2k", KG)
#: The knowledge-graph edge types, in the canonical order used by the layers.
KG_EDGE_TYPES: tuple[EdgeType, ...] = (K2C, K2N, K2K)
#: Most facts a position may see (``KGGraphConfig.k_kg``).
MAX_FACTS_PER_POSITION = 1024
#: Most corpus tokens a neighbour window may take on each side (GNN-LM: 1, then 2). A graph
#: holds k × (left + right + 1) ``nbr`` nodes per query position, and the windows' positions
#: are laid out before they are clipped: a 10⁸-token side asked for 558 GB at once.
MAX_WINDOW_SIDE = 256


def context_graph_metadata(
    c2c: bool = False, *, kg: bool = False, k2n: bool = False, k2k: bool = False, n2c: bool = True
) -> Metadata:
    """The ``(node_types, edge_types)`` metadata of a context graph, as taken by
    :class:`~hetgraph.nn.HeteroGraphAttention`. ``c2c`` adds the causal
    context relation; ``kg`` the ``kg`` node type and its ``k2c`` relation, with
    ``k2n`` / ``k2k`` also those relations (see :class:`KGGraphConfig`). ``n2c=False``
    (with ``kg``) drops the neighbours' relation into the queries, and the ``nbr`` type
    with its ``n2n`` relation unless ``k2n`` still reaches it: the knowledge graph alone."""
    if not kg:
        if not n2c:
            raise ValueError("a context graph without n2c needs the kg node type (kg=True)")
        return [CTX, NBR], [N2N, N2C] + ([C2C] if c2c else [])
    nbr = n2c or k2n
    edge_types = [N2N] if nbr else []
    edge_types += ([N2C] if n2c else []) + ([C2C] if c2c else [])
    edge_types += [K2C] + ([K2N] if k2n else []) + ([K2K] if k2k else [])
    return [CTX, NBR, KG] if nbr else [CTX, KG], edge_types


@dataclass
class GraphConfig(JSONConfigMixin):
    r"""How :func:`~hetgraph.graph.build_context_graph` builds a context graph.

    Args:
        left: Number of corpus tokens to the left of each retrieved position
            that join its window (official GNN-LM: 1, then 2).
        right: Number of corpus tokens to the right (``right >= 1`` brings in
            the retrieved next token).
        n2c: ``"center"`` links only the retrieved position to the query
            (official code); ``"window"`` links every window token.
        c2c: Add causal ``ctx -> ctx`` edges (``u <= v``, same sequence, with
            self-loops).
        c2c_window: If set, keep only causal edges with ``v - u < c2c_window``.
        deduplicate: Merge ``nbr`` nodes of the same corpus row retrieved by
            several queries of one sequence (the official code does not). This
            changes the model (windows then exchange messages); it takes
            precedence over ``share_windows``.
        share_windows: Build one window per *distinct* retrieved corpus row of
            the whole batch instead of one per (query, neighbour), and link it
            to every query that retrieved it. Since no edge enters an ``nbr``
            node from outside its own window, all windows centred on the same
            row compute identical states, so the ``ctx`` outputs are exactly
            those of the official per-(query, neighbour) graph (either
            normalisation, either ``n2c`` mode) at a fraction of the ``nbr``
            nodes (neighbouring queries retrieve largely the same rows). The
            one training-time difference: dropout masks on ``nbr`` states are
            shared by the queries that share a window.
        leakage_radius: With ``query_positions``, drop neighbours ``o`` with
            ``|p - o| < leakage_radius`` (see ``leakage_scope``).
        window_clip: ``"document"`` clips windows at document boundaries and the
            corpus ends; ``"corpus"`` only at the corpus ends (official code).
        leakage_scope: ``"document"``: only neighbours of the query's own document
            leak; ``"corpus"``: any neighbour within the radius, regardless of
            document (official code).

    :meth:`paper` gives the official GNN-LM graph.
    """

    left: int = 1
    right: int = 1
    n2c: Literal["center", "window"] = "center"
    c2c: bool = False
    c2c_window: int | None = None
    deduplicate: bool = False
    share_windows: bool = True
    leakage_radius: int = 3072
    window_clip: Literal["document", "corpus"] = "document"
    leakage_scope: Literal["document", "corpus"] = "document"

    @classmethod
    def paper(cls, **overrides: Any) -> GraphConfig:
        r"""The official GNN-LM graph (``GraphTokenBlockDataset.new_build_graph``):
        l = r = 1, ``n2c`` from the retrieved centre, causal ``c2c`` with self-loops and
        unlimited window, one window per (query, neighbour) (``share_windows`` gives the
        same ``ctx`` outputs), windows clipped only at the corpus ends, leakage radius 3072
        over corpus offsets regardless of document. ``overrides`` set other fields (e.g.
        ``left=2, right=2`` for stage 2), checked like :meth:`from_dict`."""
        base = {
            "left": 1,
            "right": 1,
            "n2c": "center",
            "c2c": True,
            "c2c_window": None,
            "deduplicate": False,
            "leakage_radius": 3072,
            "window_clip": "corpus",
            "leakage_scope": "corpus",
        }
        return cls.from_dict({**base, **overrides})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.left < 0 or self.right < 0:
            raise ValueError(f"left/right must be >= 0 (got {self.left}, {self.right})")
        for name in ("left", "right"):
            check_count(
                name,
                getattr(self, name),
                MAX_WINDOW_SIDE,
                "neighbour windows take a few tokens on each side (GNN-LM: 1 or 2)",
            )
        if self.n2c not in ("center", "window"):
            raise ValueError(f"n2c must be 'center' or 'window' (got {self.n2c!r})")
        if self.c2c_window is not None and self.c2c_window < 1:
            raise ValueError(f"c2c_window must be >= 1 or None (got {self.c2c_window})")
        for name in ("window_clip", "leakage_scope"):
            if getattr(self, name) not in ("document", "corpus"):
                raise ValueError(
                    f"{name} must be 'document' or 'corpus' (got {getattr(self, name)!r})"
                )
        if self.leakage_radius < 0:
            raise ValueError(f"leakage_radius must be >= 0 (got {self.leakage_radius})")

    @property
    def window_size(self) -> int:
        """Tokens per neighbour window, ``left + right + 1``."""
        return self.left + self.right + 1

    def metadata(self) -> Metadata:
        """Node and edge types of graphs built with this config."""
        return context_graph_metadata(self.c2c)


@dataclass
class KGGraphConfig(JSONConfigMixin):
    r"""Which knowledge-graph facts join a context graph as ``kg`` nodes
    (:class:`~hetgraph.kg.FactIndex`, :func:`~hetgraph.graph.add_kg_nodes`).

    Each ``ctx`` position linked to entities (:class:`~hetgraph.kg.EntityLinker`) sees up
    to ``k_kg`` triples of those entities, chosen by a fixed rule: relation priority
    (the order of ``relations``; every relation equal when ``None``), then triple id (the
    order of the triples file). A learned ranking is not implemented. A fact mentioned by
    several positions of one sequence is one node with an edge to each.

    Args:
        k_kg: Facts per position (at most).
        relations: Relation names to use, in priority order (``None``: all relations, by
            triple id alone).
        tails: Also take the triples whose *tail* is a mentioned entity (default: only
            those whose head is).
        kg2nbr: Also link facts to the retrieved window tokens that mention their entity
            (``('kg', 'k2n', 'nbr')``; needs the windows' entity links).
        kg2kg: Link the facts of one sequence that share an entity (head or tail), both
            ways, with self-loops (``('kg', 'k2k', 'kg')``).
    """

    k_kg: int = 4
    relations: tuple[str, ...] | None = None
    tails: bool = False
    kg2nbr: bool = False
    kg2kg: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(
            "k_kg",
            self.k_kg,
            MAX_FACTS_PER_POSITION,
            "a position sees a few facts (e.g. 4)",
            minimum=1,
        )
        if self.relations is not None:
            self.relations = tuple(self.relations)
            if len(set(self.relations)) != len(self.relations):
                raise ValueError(f"relations lists a name twice: {self.relations}")

    def metadata(self, c2c: bool = False) -> Metadata:
        """Node and edge types of context graphs with these ``kg`` nodes."""
        return context_graph_metadata(c2c, kg=True, k2n=self.kg2nbr, k2k=self.kg2kg)
