"""Dense path of :class:`~hetgraph.nn.HeteroGraphAttention` over window grids plus a
causal relation among the queries (masked attention within each group of queries)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.typing import EdgeType

from hetgraph.nn.conv import HeteroGraphAttention
from hetgraph.nn.dense.common import (
    RelationMessages,
    check_window_relations,
    check_window_shapes,
    combine_messages,
    masked_softmax,
    window_and_query_messages,
)


class CausalLayout(NamedTuple):
    """Queries scattered into a ``[G, L]`` grid (one row per group, in position order)."""

    index: Tensor  #: ``[C]`` flat slot ``g * L + rank`` of each query
    groups: int  #: ``G``, the number of groups
    length: int  #: ``L``, the largest group
    allowed: Tensor  #: ``[G, 1, L, L]`` bool, ``[g, 0, v, u]``: edge ``u -> v``


def causal_layout(group: Tensor, position: Tensor, window: int | None = None) -> CausalLayout:
    r"""The grid of the causal edges :math:`u \to v` for :math:`g_u = g_v`,
    :math:`p_u \le p_v` and (with ``window``) :math:`p_v - p_u < w`.

    Args:
        group: ``[C]`` int group (e.g. sequence) of each query, any order.
        position: ``[C]`` int position of each query in its group.
        window: If set, the largest :math:`p_v - p_u` plus one.
    """
    if group.shape != position.shape or group.dim() != 1:
        raise ValueError(
            f"group and position must be [C] (got {tuple(group.shape)} and {tuple(position.shape)})"
        )
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None (got {window})")
    device = group.device
    C = group.numel()
    if C == 0:
        return CausalLayout(
            group.new_zeros(0, dtype=torch.long),
            0,
            0,
            torch.zeros(0, 1, 0, 0, dtype=torch.bool, device=device),
        )
    group, position = group.long(), position.long()
    span = int(position.max()) - int(position.min()) + 1
    order = torch.argsort(group * span + (position - position.min()), stable=True)
    groups, g_sorted, counts = torch.unique_consecutive(
        group[order], return_inverse=True, return_counts=True
    )
    G, L = groups.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(C, device=device) - starts[g_sorted]
    index = torch.empty(C, dtype=torch.long, device=device)
    index[order] = g_sorted * L + rank
    valid = torch.zeros(G * L, dtype=torch.bool, device=device)
    valid[index] = True
    pos = torch.zeros(G * L, dtype=torch.long, device=device)
    pos[index] = position
    valid, pos = valid.view(G, L), pos.view(G, L)
    delta = pos.view(G, L, 1) - pos.view(G, 1, L)  # [g, v, u]: p_v - p_u
    allowed = valid.view(G, L, 1) & valid.view(G, 1, L) & (delta >= 0)
    if window is not None:
        allowed = allowed & (delta < window)
    return CausalLayout(index, G, L, allowed.view(G, 1, L, L))


def causal_messages(
    layer: HeteroGraphAttention, qkv: Tensor, layout: CausalLayout, relation: EdgeType
) -> RelationMessages:
    """Messages of the causal ``relation`` into each query (``qkv``: the queries'
    ``[C, 3, H, d_k]`` projection), one masked ``[L, L]`` attention per group."""
    H, D = qkv.shape[2:]
    G, L = layout.groups, layout.length
    rel = layer.relation_parameters(relation)
    grid = qkv.new_zeros(G * L, 3, H, D).index_copy(0, layout.index, qkv)
    q, k, v = grid.view(G, L, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # [G, H, L, D]
    k = torch.einsum("ghld,hde->ghle", k, rel.att)
    score = q @ k.transpose(-1, -2)  # [G, H, L_dst, L_src]
    score = score * (rel.prior.view(1, H, 1, 1) * (1.0 / math.sqrt(D)))
    alpha, lse = masked_softmax(score, layout.allowed)
    alpha = F.dropout(alpha, p=layer.attn_dropout, training=layer.training)
    m = torch.einsum("ghld,hde->glhe", alpha @ v, rel.msg).reshape(G * L, H, D)
    lse = lse.transpose(1, 2).reshape(G * L, H)
    reached = layout.allowed.any(-1).view(G * L)
    return RelationMessages(m[layout.index], lse[layout.index], reached[layout.index])


def dense_causal_window_attention(
    layer: HeteroGraphAttention,
    query_x: Tensor,
    window_x: Tensor,
    window_mask: Tensor,
    window_index: Tensor,
    window_relation: EdgeType,
    query_relation: EdgeType,
    causal_relation: EdgeType,
    causal: CausalLayout,
    query_slots: Sequence[int] | None = None,
    update_windows: bool = True,
    output_slots: slice | None = None,
) -> tuple[Tensor, Tensor]:
    r""":func:`~hetgraph.nn.dense.dense_window_attention` plus a causal relation
    :obj:`causal_relation` :math:`= (t, \kappa, t)` among the :math:`C` queries: query
    :math:`v` also receives from the queries :math:`u` of its group with
    :math:`p_u \le p_v` (and :math:`p_v - p_u < w`), as laid out by
    :func:`causal_layout` (e.g. ``causal_layout(batch_index, seq_index, c2c_window)``
    for causal edges within each sequence, self-loops included).

    The causal attention runs as one masked :math:`[L, L]` attention per group. With
    :obj:`normalization="joint"` a query's softmax spans its window sources and its
    causal sources together (the per-relation softmaxes are merged through their
    log-sum-exps, exactly); with :obj:`"per_relation"` the two relations are averaged as
    the layer's :obj:`relation_mean` says (``"reached"``: by the relations that reach the
    query; ``"all"``: by the relations with at least one edge in the graph). Gives the
    ``ctx``/window outputs of :meth:`HeteroGraphAttention.forward` on the equivalent edge
    list; a relation missing from the layer's metadata sends no messages.

    Args:
        layer, query_x, window_x, window_mask, window_index, window_relation,
        query_relation, query_slots, update_windows, output_slots: As for
            :func:`~hetgraph.nn.dense.dense_window_attention`.
        causal_relation (Tuple[str, str, str]): The relation among the queries.
        causal (CausalLayout): The causal edges, from :func:`causal_layout` (computed once,
            shared by the layers of a stack).

    Shapes:
        - **input:** as :func:`~hetgraph.nn.dense.dense_window_attention`
        - **output:** query features :math:`(C, F)` and window features :math:`(U, W, F)`
    """
    _, query_type = check_window_relations(layer, window_relation, query_relation)
    check_window_shapes(query_x, window_x, window_mask, window_index)
    if causal_relation[0] != query_type or causal_relation[2] != query_type:
        raise ValueError(
            f"causal_relation {causal_relation} must link the query type {query_type!r} to itself"
        )
    if causal.index.numel() != query_x.size(0):
        raise ValueError(
            f"the causal layout has {causal.index.numel()} queries, query_x {query_x.size(0)}"
        )
    query_qkv = layer.project(query_type, query_x)  # [C, 3, H, D]
    # A fixed order of dropout draws (training): windows, query, causal messages, update.
    windows_out, part = window_and_query_messages(
        layer,
        query_qkv[:, 0],
        window_x,
        window_mask,
        window_index,
        (window_relation, query_relation),
        query_slots,
        update_windows,
        output_slots,
    )
    parts = [part]
    if causal_relation in layer.edge_types:
        parts.append(causal_messages(layer, query_qkv, causal, causal_relation))
    return layer.node_update(query_type, query_x, combine_messages(layer, parts)), windows_out
