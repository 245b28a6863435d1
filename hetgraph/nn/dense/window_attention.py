"""Dense masked-attention path of :class:`~hetgraph.nn.HeteroGraphAttention` over window grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.typing import EdgeType

from hetgraph.nn.conv import HeteroGraphAttention


def _masked_softmax(score: Tensor, allowed: Tensor) -> Tensor:
    # A finite fill keeps fully masked rows NaN-free (forward and backward);
    # zeroing afterwards turns them into "no message" (m = 0).
    score = score.masked_fill(~allowed, torch.finfo(score.dtype).min)
    return score.softmax(dim=-1).masked_fill(~allowed, 0.0)


def _check_relations(
    layer: HeteroGraphAttention, window_relation: EdgeType, query_relation: EdgeType
) -> tuple[str, str]:
    window_type, _, window_dst = window_relation
    src_type, _, query_type = query_relation
    if window_dst != window_type or src_type != window_type:
        raise ValueError(
            f"window_relation {window_relation} must link one node type to itself and "
            f"query_relation {query_relation} must start from it"
        )
    for t in (window_type, query_type):
        if t not in layer.node_types:
            raise ValueError(f"node type {t!r} is not in the layer's metadata")
    return window_type, query_type


def _check_shapes(
    query_x: Tensor, window_x: Tensor, window_mask: Tensor, window_index: Tensor
) -> None:
    if window_x.dim() != 3 or window_mask.shape != window_x.shape[:2]:
        raise ValueError(
            f"window_x must be [U, W, F] and window_mask [U, W] (got {tuple(window_x.shape)} "
            f"and {tuple(window_mask.shape)})"
        )
    if window_index.dim() != 2 or window_index.size(0) != query_x.size(0):
        raise ValueError(
            f"window_index must be [C, k] with C = {query_x.size(0)} queries "
            f"(got {tuple(window_index.shape)})"
        )


def _window_messages(
    layer: HeteroGraphAttention, qkv: Tensor, window_mask: Tensor, relation: EdgeType
) -> Tensor:
    """Messages ``[U, W, H * d_k]`` along the chain of adjacent valid slots (with
    self-loops) of each window: one ``[W, W]`` attention per window."""
    U, W = window_mask.shape
    H, D = layer.heads, layer.head_channels
    rel = layer.relation_parameters(relation)
    q, k, v = qkv.view(U, W, 3, H, D).unbind(2)  # [U, W, H, D]
    k = torch.einsum("nwhd,hde->nhwe", k, rel.att)
    v = torch.einsum("nwhd,hde->nhwe", v, rel.msg)
    score = q.transpose(1, 2) @ k.transpose(-1, -2)  # [U, H, W_dst, W_src]
    score = score * (rel.prior.view(1, H, 1, 1) * (1.0 / math.sqrt(D)))
    w = torch.arange(W, device=window_mask.device)
    chain = (w.view(-1, 1) - w.view(1, -1)).abs() <= 1
    alpha = _masked_softmax(score, chain & window_mask.view(U, 1, 1, W))
    alpha = F.dropout(alpha, p=layer.attn_dropout, training=layer.training)
    return (alpha @ v).transpose(1, 2).reshape(U, W, H * D)


def _query_messages(
    layer: HeteroGraphAttention,
    query: Tensor,
    qkv: Tensor,
    window_mask: Tensor,
    window_index: Tensor,
    slots: Tensor,
    relation: EdgeType,
) -> Tensor:
    """Messages ``[C, H * d_k]`` into each query from the ``slots`` of its ``k`` windows."""
    U, W = window_mask.shape
    C, K = window_index.shape
    H, D = layer.heads, layer.head_channels
    rel = layer.relation_parameters(relation)
    # The n sources of each query: (window, slot) pairs, flat rows into [U * W]; -1 windows masked.
    rows = (window_index.clamp(min=0).unsqueeze(-1) * W + slots).view(C, -1)
    n = rows.size(1)
    allowed = (window_index >= 0).unsqueeze(-1).expand(C, K, slots.numel()).reshape(C, n)
    if U > 0:
        allowed = allowed & window_mask.view(-1)[rows]
        # Gather the sources' keys and values straight from the qkv rows (one copy).
        kv_index = torch.stack([rows * 3 + 1, rows * 3 + 2]).view(-1)
        k, v = (
            qkv.reshape(U * W * 3, H * D).index_select(0, kv_index).view(2, C, n, H * D).unbind(0)
        )
    else:
        k = v = qkv.new_zeros(C, n, H * D)
    # q . (k W_att) = (W_att q) . k and sum(alpha v W_msg) = sum(alpha v) W_msg, so the
    # relation maps act once per query, not per source. Heads are batched through a
    # block-diagonal query [C, H*D, H], so that every product is one plain bmm.
    q = torch.einsum("che,hde->chd", query, rel.att)
    q = q * (rel.prior.view(1, H, 1) * (1.0 / math.sqrt(D)))
    eye = torch.eye(H, dtype=q.dtype, device=q.device)
    q_block = (q.unsqueeze(-1) * eye.view(1, H, 1, H)).reshape(C, H * D, H)
    score = (k @ q_block).transpose(1, 2)  # [C, H, n]
    alpha = _masked_softmax(score, allowed.view(C, 1, n))
    alpha = F.dropout(alpha, p=layer.attn_dropout, training=layer.training)
    m_all = alpha @ v  # [C, H, H * D]: head h's weights applied to every head's values
    m = m_all.view(C, H, H, D).diagonal(dim1=1, dim2=2).permute(0, 2, 1)  # [C, H, D]
    return torch.einsum("chd,hde->che", m, rel.msg).reshape(C, H * D)


def _slot_index(query_slots: Sequence[int] | None, W: int, device: torch.device) -> Tensor:
    # The window slots linked to the queries, as an index tensor (None: all W).
    if query_slots is None:
        return torch.arange(W, device=device)
    if not all(0 <= j < W for j in query_slots):
        raise ValueError(f"query_slots {tuple(query_slots)} must be slots of a {W}-slot window")
    return torch.tensor(list(query_slots), dtype=torch.long, device=device)


def dense_window_attention(
    layer: HeteroGraphAttention,
    query_x: Tensor,
    window_x: Tensor,
    window_mask: Tensor,
    window_index: Tensor,
    window_relation: EdgeType,
    query_relation: EdgeType,
    query_slots: Sequence[int] | None = None,
    update_windows: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""One :class:`~hetgraph.nn.HeteroGraphAttention` layer (GNN-LM, `Meng et
    al. <https://arxiv.org/abs/2110.08743>`_), run as dense masked attention
    on graphs whose source nodes sit in windows of :math:`W` slots, with the
    layer's own parameters (so the same weights serve both paths).

    The graph it reproduces: :math:`U` windows of one node type
    :math:`s` (:obj:`window_relation` :math:`= (s, \rho, s)` links adjacent
    valid slots of a window, both directions, plus self-loops), and :math:`C`
    query nodes of type :math:`t` (:obj:`query_relation` :math:`= (s, \psi, t)`
    links the valid :obj:`query_slots` of each of a query's :math:`k` windows
    to it); no other edges. A window may serve several queries. Window
    attention runs once per window; query :math:`c` attends over its gathered
    sources :math:`\mathcal{S}(c)`:

    .. math::
        \alpha^{h}_{cu} = \mathrm{softmax}_{u \in \mathcal{S}(c)}\left(
            \frac{\mu^{h}_{\psi}}{\sqrt{d_k}}
            \left(\mathbf{W}_{\mathrm{att}}^{\psi,h} \mathbf{q}^{h}_c\right)^{\top}
            \mathbf{k}^{h}_u\right), \qquad
        \mathbf{m}^{h}_c = \mathbf{W}_{\mathrm{msg}}^{\psi,h\top}
            \sum_{u \in \mathcal{S}(c)} \alpha^{h}_{cu}\, \mathbf{v}^{h}_u

    (the edge-list form, as :math:`\mathbf{q}^{\top}(\mathbf{k} \mathbf{W}_{\mathrm{att}})
    = (\mathbf{W}_{\mathrm{att}} \mathbf{q})^{\top} \mathbf{k}`). Every node has
    in-edges of one relation at most, so either normalisation gives the result of
    :meth:`HeteroGraphAttention.forward` on the equivalent edge list. A relation
    missing from the layer's metadata sends no messages.

    Args:
        layer (HeteroGraphAttention): The layer whose parameters are used.
        query_x (torch.Tensor): Query node features.
        window_x (torch.Tensor): Window slot features (values in masked slots
            are ignored).
        window_mask (torch.Tensor): Which window slots hold a node.
        window_index (torch.Tensor): The window of each of a query's
            :math:`k` source windows (``-1``: none).
        window_relation (Tuple[str, str, str]): The relation inside windows.
        query_relation (Tuple[str, str, str]): The relation from window slots
            to queries.
        query_slots (Sequence[int], optional): The window slots linked to the
            queries (:obj:`None`: all :math:`W`). (default: :obj:`None`)
        update_windows (bool, optional): If :obj:`False`, skip the window
            attention and return :obj:`window_x` unchanged (the last layer of
            a stack only needs the query output). (default: :obj:`True`)

    Shapes:
        - **input:** query features :math:`(C, F)`, window features :math:`(U, W, F)`,
          window mask :math:`(U, W)` (bool), window index :math:`(C, k)` (int64)
        - **output:** query features :math:`(C, F)` and window features
          :math:`(U, W, F)`, in the dtypes of the inputs
    """
    window_type, query_type = _check_relations(layer, window_relation, query_relation)
    _check_shapes(query_x, window_x, window_mask, window_index)
    U, W = window_mask.shape
    C, H, D = query_x.size(0), layer.heads, layer.head_channels
    query = layer.project(query_type, query_x)[:, 0]  # [C, H, D]; query keys/values reach nothing
    qkv = layer.project(window_type, window_x)  # [U * W, 3, H, D]
    slots = _slot_index(query_slots, W, window_x.device)

    # A fixed order of dropout draws (training): window messages, query messages, updates.
    if not update_windows:
        m_window = None
    elif window_relation in layer.edge_types:
        m_window = _window_messages(layer, qkv, window_mask, window_relation)
    else:
        m_window = qkv.new_zeros(U, W, H * D)
    if query_relation in layer.edge_types:
        m_query = _query_messages(
            layer, query, qkv, window_mask, window_index, slots, query_relation
        )
    else:
        m_query = query.new_zeros(C, H * D)
    query_out = layer.node_update(query_type, query_x, m_query)
    if m_window is None:
        return query_out, window_x
    return query_out, layer.node_update(window_type, window_x, m_window)
