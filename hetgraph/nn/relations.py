"""Per-relation parameters of :class:`~hetgraph.nn.HeteroGraphAttention` and the
cross-relation mean of its ``"per_relation"`` normalisation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor
from torch_geometric.nn.inits import glorot, ones
from torch_geometric.typing import EdgeType, NodeType

from hetgraph.nn.config import RelationInit, RelationMean


def relation_key(edge_type: EdgeType) -> str:
    """The default parameter-set name of an edge type: ``"src__rel__dst"``."""
    return "__".join(edge_type)


class RelationParameters(NamedTuple):
    """The parameters of one relation :math:`\\phi` of :class:`HeteroGraphAttention`."""

    att: Tensor  #: :math:`\mathbf{W}_{\mathrm{att}}^{\phi}`, ``[H, d_k, d_k]`` (acts on keys)
    msg: Tensor  #: :math:`\mathbf{W}_{\mathrm{msg}}^{\phi}`, ``[H, d_k, d_k]`` (acts on values)
    prior: Tensor  #: :math:`\mu_{\phi}`, ``[H]``


class StackedRelations(NamedTuple):
    """The non-empty relations as one bipartite graph: sources are the per-relation
    transformed keys/values stacked in metadata order, destinations all node types
    concatenated in metadata order."""

    edge_index: Tensor  # [2, E]
    key: Tensor  # [S, H, D]
    value: Tensor  # [S, H, D]
    prior: Tensor  # [E, H]
    group: Tensor  # [E] softmax group of each edge
    num_groups: int
    reached: list[tuple[int, Tensor]]  # (relation id, destination of each edge) per relation


def init_relation_parameters(
    att: Mapping[str, Tensor],
    msg: Mapping[str, Tensor],
    prior: Mapping[str, Tensor],
    init: RelationInit,
) -> None:
    r"""Initialise :math:`\mathbf{W}_{\mathrm{att}}`, :math:`\mathbf{W}_{\mathrm{msg}}`
    (``[H, d, d]`` each, one per parameter set) and :math:`\mu` (ones).

    ``"glorot"``: glorot per ``[H, d, d]`` matrix (bound :math:`\sqrt{3 / d}`).
    ``"official"``: the official GNN-LM ``nn.init.xavier_uniform_`` on the stacked
    ``[R, H, d, d]`` tensor (fan in :math:`H d^2`, fan out :math:`R d^2`, bound
    :math:`\sqrt{6 / ((R + H) d^2)}`), about :math:`\sqrt{(R + H) d / 2}` times smaller.
    """
    with torch.no_grad():
        for weight in [*att.values(), *msg.values()]:
            if init == "glorot":
                glorot(weight)
            else:
                R = len(att)
                H, D = weight.shape[0], weight.shape[-1]
                bound = math.sqrt(6.0 / ((R + H) * D * D))
                weight.uniform_(-bound, bound)
        for p in prior.values():
            ones(p)


def mean_over_relations(
    out: Tensor,
    reached: list[tuple[int, Tensor]],
    edge_types: list[EdgeType],
    mode: RelationMean,
    offsets: dict[NodeType, int],
    sizes: dict[NodeType, int],
) -> Tensor:
    r"""Divide the summed per-relation messages ``out`` (``[N, H, d]``, all node types
    concatenated at ``offsets``) by the number of relations.

    Args:
        reached: ``(relation id, destination of each edge)`` of every relation with edges.
        mode: ``"reached"``: the relations with an in-edge to the node; ``"all"``: every
            relation into the node's type that has at least one edge (DGL's
            ``multi_update_all(..., cross_reducer="mean")``: a relation without edges
            produces no frame and is left out; one with edges gives zero to nodes it
            does not reach).
    """
    if mode == "all":
        count = torch.zeros(out.size(0), dtype=out.dtype, device=out.device)
        for r, _ in reached:
            dst_type = edge_types[r][2]
            count[offsets[dst_type] : offsets[dst_type] + sizes[dst_type]] += 1
        return out / count.clamp(min=1).view(-1, 1, 1)
    hit = torch.zeros(len(edge_types), out.size(0), dtype=torch.bool, device=out.device)
    for r, dst in reached:
        hit[r, dst] = True
    return out / hit.sum(0).clamp(min=1).to(out.dtype).view(-1, 1, 1)
