r"""Per-position fact selection: which knowledge-graph triples each query position sees.

:class:`FactIndex` sorts the triples once into a CSR table, entity -> its triples in rank
order (relation priority, then triple id; see :class:`~hetgraph.graph.KGGraphConfig`).
:meth:`FactIndex.select` takes the first ``k_kg`` triples of every linked entity of every
position at once (``[P, m, k]`` gathers), and keeps each position's ``k_kg`` best distinct
ones by two sorts of the rank keys: no Python loop per position, entity or triple. The
``k_kg`` best of the union are always among each entity's ``k_kg`` best, so this is exact.

:func:`select_facts` merges the selections of one sequence into one fact per (sequence,
triple) (:class:`~hetgraph.graph.KGFacts`); :func:`add_facts` does both for a built
context graph and adds the ``kg`` nodes (:func:`~hetgraph.graph.add_kg_nodes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from hetgraph.graph.config import CTX, NBR, KGGraphConfig
from hetgraph.graph.kg import KGFacts, add_kg_nodes
from hetgraph.kg.linking import EntityLinker
from hetgraph.kg.store import KnowledgeGraph

_NONE = torch.iinfo(torch.long).max  # the rank key of an empty slot


def _relation_priority(
    num_relations: int, relation_names: Sequence[str] | None, config: KGGraphConfig
) -> Tensor:
    """``[R]`` priority of each relation (``-1``: not used)."""
    if config.relations is None:
        return torch.zeros(num_relations, dtype=torch.long)
    if relation_names is None:
        raise ValueError("KGGraphConfig.relations names relations: pass relation_names")
    unknown = sorted(set(config.relations) - set(relation_names))
    if unknown:
        raise ValueError(
            f"KGGraphConfig.relations names unknown relations {unknown}; this graph has "
            f"{', '.join(relation_names)}"
        )
    order = {name: i for i, name in enumerate(config.relations)}
    return torch.tensor([order.get(name, -1) for name in relation_names], dtype=torch.long)


class FactIndex:
    r"""The triples of a knowledge graph, per entity, in the rank order of a
    :class:`~hetgraph.graph.KGGraphConfig`.

    Args:
        triples: ``[N, 3]`` int (head, relation, tail).
        num_entities: Entities of the graph.
        config: ``k_kg``, ``relations`` (priority order) and ``tails``.
        relation_names: Name of each relation index (needed with ``config.relations``).
        num_relations: Relations of the graph (default: the largest id in ``triples`` + 1,
            or ``len(relation_names)``).

    Attributes:
        triples: ``[N, 3]`` int64.
        rank: ``[N]`` int64 rank key of each triple, ``priority * N + id`` (smaller first).
        ptr: ``[num_entities + 1]`` CSR offsets into :attr:`fact`.
        fact: the triple ids of each entity, in rank order.
    """

    def __init__(
        self,
        triples: Tensor,
        num_entities: int,
        config: KGGraphConfig,
        relation_names: Sequence[str] | None = None,
        num_relations: int | None = None,
    ) -> None:
        triples = torch.as_tensor(triples).long().reshape(-1, 3)
        N = triples.size(0)
        if num_relations is None:
            num_relations = len(relation_names) if relation_names is not None else 0
            num_relations = max(num_relations, int(triples[:, 1].max()) + 1 if N else 0)
        if N and (int(triples[:, [0, 2]].max()) >= num_entities or int(triples.min()) < 0):
            raise ValueError(f"a triple names an entity outside [0, {num_entities})")
        self.config = config
        self.num_entities = num_entities
        self.triples = triples
        priority = _relation_priority(num_relations, relation_names, config)[triples[:, 1]]
        self.rank = priority * N + torch.arange(N)
        used = (priority >= 0).nonzero().view(-1)
        entity, fact = triples[used, 0], used
        if config.tails:  # a self-loop's tail is its head: listed once
            tails = used[triples[used, 2] != triples[used, 0]]
            entity, fact = torch.cat([entity, triples[tails, 2]]), torch.cat([fact, tails])
        order = torch.argsort(self.rank[fact], stable=True)
        order = order[torch.argsort(entity[order], stable=True)]
        self.fact = fact[order]
        counts = torch.bincount(entity, minlength=num_entities)
        self.ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])

    @classmethod
    def from_graph(cls, graph: KnowledgeGraph, config: KGGraphConfig) -> FactIndex:
        r"""The index of a :class:`~hetgraph.kg.KnowledgeGraph`'s triples."""
        return cls(
            torch.as_tensor(graph.triples),
            graph.num_entities,
            config,
            graph.relations,
            graph.num_relations,
        )

    @property
    def num_triples(self) -> int:
        """Triples of the graph (used or not)."""
        return int(self.triples.size(0))

    def to(self, device: torch.device | str) -> FactIndex:
        r"""Move the tables to ``device`` (in place); returns ``self``."""
        for name in ("triples", "rank", "fact", "ptr"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def select(self, entities: Tensor) -> Tensor:
        r"""The ``k_kg`` best distinct triples of the entities of each position.

        Shapes:
            - **input:** ``entities`` :math:`(*, m)` entity ids (``-1``: none), as
              :attr:`EntityLinks.entities <hetgraph.kg.EntityLinks>`.
            - **output:** :math:`(*, k_{kg})` triple ids in rank order (``-1``: none).
        """
        k = self.config.k_kg
        lead, m = entities.shape[:-1], entities.shape[-1]
        e = entities.reshape(-1, m).long().to(self.ptr.device)
        if e.numel() and int(e.max()) >= self.num_entities:
            raise ValueError(f"entity id {int(e.max())} outside [0, {self.num_entities})")
        valid = e >= 0
        e = e.clamp(min=0)
        start = self.ptr[e]
        degree = torch.where(valid, self.ptr[e + 1] - start, 0)
        j = torch.arange(k, device=e.device)
        taken = j < degree[..., None]  # [P, m, k]
        if self.fact.numel() == 0:
            return torch.full((*lead, k), -1, dtype=torch.long, device=e.device)
        fact = self.fact[(start[..., None] + j).clamp(max=self.fact.numel() - 1)]
        key = torch.where(taken, self.rank[fact], _NONE).view(e.size(0), m * k)
        key = key.sort(dim=1).values
        repeated = torch.zeros_like(key, dtype=torch.bool)
        repeated[:, 1:] = key[:, 1:] == key[:, :-1]
        key = key.masked_fill(repeated, _NONE).sort(dim=1).values[:, :k]
        triple = torch.where(key == _NONE, -1, key % max(self.num_triples, 1))
        return triple.view(*lead, k)


def _merge(index: FactIndex, chosen: Tensor, seq: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Distinct (sequence, triple) of the ``[P, k]`` choices of owners in sequences ``seq``:
    ``(fact sequence, fact triple, owner of each mention, fact of each mention)``."""
    owner = torch.arange(chosen.size(0), device=chosen.device).view(-1, 1).expand_as(chosen)
    hit = chosen >= 0
    N = max(index.num_triples, 1)
    key = seq.view(-1, 1).expand_as(chosen)[hit] * N + chosen[hit]
    unique, inverse = torch.unique(key, return_inverse=True)
    return unique // N, unique % N, owner[hit], inverse


def select_facts(
    index: FactIndex,
    entities: Tensor,
    *,
    positions: tuple[Tensor, Tensor] | None = None,
    nbr_entities: Tensor | None = None,
    nbr_batch_index: Tensor | None = None,
) -> KGFacts:
    r"""The facts each position sees, merged into one fact per (sequence, triple).

    Args:
        index: The :class:`FactIndex` (its config's ``k_kg`` facts per position).
        entities: ``[B, T, m]`` entity ids of each position (``-1``: none), from
            :class:`~hetgraph.kg.EntityLinker`.
        positions: ``(batch, seq)`` ``[C]`` positions that see facts (the graph's ``ctx``
            nodes); default every position, row-major.
        nbr_entities: ``[M, m]`` entity ids of each ``nbr`` node (e.g.
            :func:`window_entities`), for ``k2n`` edges; ``nbr_batch_index`` ``[M]`` then
            gives each node's sequence (a fact seen by positions and window tokens of
            one sequence is one node).

    Returns:
        :class:`~hetgraph.graph.KGFacts`: mentions by position in the order of
        ``positions``, each position's facts in rank order.
    """
    B, T, _ = entities.shape
    device = index.ptr.device
    if positions is None:
        b = torch.arange(B, device=device).repeat_interleave(T)
        t = torch.arange(T, device=device).repeat(B)
    else:
        b, t = (p.to(device).long() for p in positions)
    chosen = index.select(entities.to(device)[b, t])
    seq = b
    C = chosen.size(0)
    if nbr_entities is not None:
        if nbr_batch_index is None:
            raise ValueError("nbr_entities needs nbr_batch_index (graph['nbr'].batch_index)")
        chosen = torch.cat([chosen, index.select(nbr_entities.to(device))])
        seq = torch.cat([seq, nbr_batch_index.to(device).long()])
    fact_seq, triple, owner, fact = _merge(index, chosen, seq)
    head, relation, tail = index.triples[triple].unbind(1)
    ctx = owner < C
    return KGFacts(
        fact_seq,
        triple,
        head,
        relation,
        tail,
        fact[ctx],
        b[owner[ctx]],
        t[owner[ctx]],
        fact[~ctx],
        owner[~ctx] - C,
    )


def window_entities(graph: HeteroData, linker: EntityLinker) -> Tensor:
    r"""``[M, m]`` the entities of each ``nbr`` node, by linking every window of a
    window-grid graph as a token sequence of its own (a mention cut by the window's edge
    is not found; empty slots read as token ``-1``, which no alias contains).

    Raises:
        ValueError: ``graph`` has no window grid (``"irregular"`` layout).
    """
    layout = graph.layout
    if not layout.is_dense:
        raise ValueError("window_entities needs a window-grid graph (not deduplicate/batched)")
    grid = graph[NBR].grid_index
    tokens = torch.full(
        (layout.num_windows * layout.window,), -1, dtype=torch.long, device=grid.device
    )
    tokens[grid] = graph[NBR].token_id.long()
    links = linker(tokens.view(layout.num_windows, layout.window))
    return links.entities.reshape(-1, links.entities.size(-1))[grid]


def add_facts(
    graph: HeteroData,
    index: FactIndex,
    entities: Tensor,
    nbr_entities: Tensor | None = None,
) -> HeteroData:
    r"""Selects the facts of ``graph``'s ``ctx`` positions (and, with
    ``index.config.kg2nbr`` and ``nbr_entities``, of its ``nbr`` nodes) and adds them as
    ``kg`` nodes (:func:`~hetgraph.graph.add_kg_nodes`); in place, returns ``graph``.

    Args:
        graph: A :class:`~hetgraph.graph.ContextGraph` from
            :func:`~hetgraph.graph.build_context_graph`.
        index: The :class:`FactIndex`.
        entities: ``[B, T, m]`` entity links of the graph's query batch
            (:attr:`EntityLinks.entities <hetgraph.kg.EntityLinks>`).
        nbr_entities: ``[M, m]`` entities of each ``nbr`` node (:func:`window_entities`).
    """
    config = index.config
    use_nbr = config.kg2nbr and nbr_entities is not None
    facts = select_facts(
        index,
        entities,
        positions=(graph[CTX].batch_index, graph[CTX].seq_index),
        nbr_entities=nbr_entities if use_nbr else None,
        nbr_batch_index=graph[NBR].batch_index if use_nbr else None,
    )
    return add_kg_nodes(graph, facts, config)
