r"""The ``kg`` node type of the context graph: knowledge-graph facts seen by query positions.

:func:`add_kg_nodes` adds to a built :class:`~hetgraph.graph.ContextGraph` one ``kg`` node
per selected fact of each sequence (:class:`KGFacts`, chosen by
:func:`~hetgraph.kg.select_facts`) and the edges

* ``('kg', 'k2c', 'ctx')``: fact -> every query position that mentions one of its
  entities (the graph form of K-BERT's visibility matrix: a position sees a fact iff
  this edge exists);
* ``('kg', 'k2n', 'nbr')`` (``KGGraphConfig.kg2nbr``): fact -> retrieved window tokens
  that mention one of its entities;
* ``('kg', 'k2k', 'kg')`` (``KGGraphConfig.kg2kg``): between facts of one sequence that
  share an entity (head or tail), both ways, with self-loops.

All three edge types are always set (empty ``[2, 0]`` where unused), so graphs with and
without facts batch together. The ``ctx`` / ``nbr`` stores and their edges are not
touched: with no fact the graph is today's graph plus an empty ``kg`` node type.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch_geometric.data import HeteroData

from hetgraph.graph.config import CTX, K2C, K2K, K2N, KG, NBR, KGGraphConfig


class KGFacts(NamedTuple):
    r"""The knowledge-graph facts selected for a batch of ``[B, T]`` query positions, one
    per distinct (sequence, triple), ordered by that key; built by
    :func:`~hetgraph.kg.select_facts`.

    Shapes: :math:`F` facts, :math:`E` mentions by query positions, :math:`E'` by window
    tokens.
    """

    batch_index: Tensor  #: ``[F]`` sequence of each fact
    triple: Tensor  #: ``[F]`` its triple id (row of the knowledge graph's triples)
    head: Tensor  #: ``[F]`` head entity
    relation: Tensor  #: ``[F]`` relation
    tail: Tensor  #: ``[F]`` tail entity
    mention_fact: Tensor  #: ``[E]`` the fact each mention sees
    mention_batch: Tensor  #: ``[E]`` the mentioning position's sequence ``b``
    mention_seq: Tensor  #: ``[E]`` and its position ``t``
    nbr_fact: Tensor  #: ``[E']`` the fact each window-token mention sees
    nbr_node: Tensor  #: ``[E']`` the mentioning ``nbr`` node

    @property
    def num_facts(self) -> int:
        """:math:`F`."""
        return int(self.triple.numel())


def _empty_edges(device: torch.device) -> Tensor:
    return torch.empty(2, 0, dtype=torch.long, device=device)


def _k2c_edges(graph: HeteroData, facts: KGFacts) -> Tensor:
    """Mentions ``(b, t)`` -> ``ctx`` node ids (the builder's nodes are sorted by
    ``b * T + t``), as ``[2, E]`` (fact, ctx) in the order of the mentions."""
    T = int(graph.query_shape[1])
    ctx_key = graph[CTX].batch_index * T + graph[CTX].seq_index
    key = facts.mention_batch.long() * T + facts.mention_seq.long()
    node = torch.searchsorted(ctx_key, key)
    found = node < ctx_key.numel()
    found[found.clone()] = ctx_key[node[found]] == key[found]
    if not bool(found.all()):
        raise ValueError(
            "a fact is mentioned at a position that is not a ctx node of this graph: select "
            "the facts for the graph's own ctx positions (hetgraph.kg.add_facts does)"
        )
    return torch.stack([facts.mention_fact.long(), node])


def k2k_edges(batch_index: Tensor, head: Tensor, tail: Tensor) -> Tensor:
    r"""``[2, E]`` edges between the facts of one sequence that share an entity (head or
    tail), both ways, with a self-loop on every fact; sorted by (destination, source).
    Vectorised: every (sequence, entity) group of :math:`g` incidences gives its
    :math:`g^2` pairs at once."""
    F = head.numel()
    device = head.device
    if F == 0:
        return _empty_edges(device)
    node = torch.arange(F, device=device).repeat(2)
    entity = torch.cat([head, tail]).long()
    seq = batch_index.long().repeat(2)
    _, group = torch.unique(seq * (int(entity.max()) + 1) + entity, return_inverse=True)
    order = torch.argsort(group, stable=True)
    group, node = group[order], node[order]
    counts = torch.bincount(group)
    starts = torch.cumsum(counts, 0) - counts
    repeat = counts[group]
    src = node.repeat_interleave(repeat)
    first = torch.cumsum(repeat, 0) - repeat
    offset = torch.arange(src.numel(), device=device) - first.repeat_interleave(repeat)
    dst = node[starts[group].repeat_interleave(repeat) + offset]
    key = torch.unique(dst * F + src)  # two facts may share both entities
    return torch.stack([key % F, key // F])


def add_kg_nodes(graph: HeteroData, facts: KGFacts, config: KGGraphConfig) -> HeteroData:
    r"""Adds the ``kg`` nodes of ``facts`` and their edges to ``graph`` (in place; returns
    it), as the module docstring describes.

    Node attributes: ``graph['kg'].batch_index`` (offset by
    :meth:`~torch_geometric.data.Batch.from_data_list` like the other types'),
    ``triple``, ``head``, ``relation`` and ``tail`` (``[F]`` int64), from which
    :class:`~hetgraph.nn.KGFactEncoder` computes the node features. ``k2c`` edges are
    in the order of ``facts``' mentions (by position, then rank: a position's facts in
    the order the rule ranked them).

    Args:
        graph: A graph from :func:`~hetgraph.graph.build_context_graph` (not batched).
        facts: The facts selected for this graph's ``ctx`` positions (and, with
            ``config.kg2nbr``, its ``nbr`` nodes).
        config: Which edge types to fill (``kg2nbr``, ``kg2kg``).

    Raises:
        ValueError: a mention is at a position that is not a ``ctx`` node of ``graph``, or
            a window mention names a node that does not exist.
    """
    device = graph[CTX].batch_index.device
    facts = KGFacts(*(t.to(device) for t in facts))
    store = graph[KG]
    store.num_nodes = facts.num_facts
    store.batch_index = facts.batch_index.long()
    store.triple = facts.triple.long()
    store.head = facts.head.long()
    store.relation = facts.relation.long()
    store.tail = facts.tail.long()
    graph[K2C].edge_index = _k2c_edges(graph, facts)
    k2n = _empty_edges(device)
    if config.kg2nbr and facts.nbr_fact.numel() > 0:
        if int(facts.nbr_node.max()) >= graph[NBR].num_nodes:
            raise ValueError("a window mention names an nbr node this graph does not have")
        k2n = torch.stack([facts.nbr_fact.long(), facts.nbr_node.long()])
    graph[K2N].edge_index = k2n
    graph[K2K].edge_index = (
        k2k_edges(facts.batch_index, facts.head, facts.tail)
        if config.kg2kg
        else _empty_edges(device)
    )
    return graph
