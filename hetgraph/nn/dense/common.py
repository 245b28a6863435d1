"""Building blocks of the dense paths of :class:`~hetgraph.nn.HeteroGraphAttention`.

Each function computes the messages of *one* relation into its destinations, softmax-
normalised within that relation, as a :class:`RelationMessages` (message, log-sum-exp of
the scores, which destinations it reaches); :func:`combine_messages` turns the
messages of several relations into the layer's ``"joint"`` or ``"per_relation"``
aggregation. The dense units (:func:`~hetgraph.nn.dense.dense_window_attention`,
:func:`~hetgraph.nn.dense.dense_causal_window_attention`) are made of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.typing import EdgeType

from hetgraph.nn.conv import HeteroGraphAttention


class RelationMessages(NamedTuple):
    r"""The messages of one relation into ``N`` destination nodes."""

    message: Tensor  #: ``[N, H, d_k]`` :math:`\mathbf{W}_{\mathrm{msg}}^\top \sum_u \alpha_u v_u`
    lse: Tensor  #: ``[N, H]`` log-sum-exp of the scores (about ``finfo.min`` if none)
    reached: Tensor  #: ``[N]`` bool, whether the node has an in-edge of this relation


def masked_softmax(score: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dimension restricted to ``allowed`` (broadcast to
    ``score``), and its log-sum-exp. A fully masked row gets zeros and a log-sum-exp
    near ``finfo.min``: a finite fill keeps it NaN-free, forward and backward."""
    score = score.masked_fill(~allowed, torch.finfo(score.dtype).min)
    lse = score.logsumexp(dim=-1)
    return score.softmax(dim=-1).masked_fill(~allowed, 0.0), lse


def combine_messages(layer: HeteroGraphAttention, parts: Sequence[RelationMessages]) -> Tensor:
    r"""The aggregated message ``[N, H * d_k]`` of destinations reached by the relations
    ``parts`` (each softmax-normalised within itself), as
    :meth:`HeteroGraphAttention.forward` aggregates them.

    ``"joint"``: one softmax over the sources of all relations, i.e. part :math:`r`
    weighted by :math:`\exp(\mathrm{lse}_r - \log\sum_s \exp \mathrm{lse}_s)`, summed.
    ``"per_relation"``: the mean over relations, divided by the relations that reach the
    node (``relation_mean="reached"``) or by those that reach any node (``"all"``).
    """
    N, H, D = parts[0].message.shape
    if len(parts) == 1:  # a relation's message is zero where it reaches nothing
        return parts[0].message.reshape(N, H * D)
    if layer.normalization == "joint":
        total = torch.stack([p.lse for p in parts]).logsumexp(dim=0)
        out = sum(torch.exp(p.lse - total).unsqueeze(-1) * p.message for p in parts)
        return out.reshape(N, H * D)  # type: ignore[union-attr]
    out = sum(p.message for p in parts)
    if layer.relation_mean == "all":
        count = sum(p.reached.any().to(out.dtype) for p in parts)  # type: ignore[union-attr]
        return (out / count.clamp(min=1)).reshape(N, H * D)  # type: ignore[union-attr]
    count = sum(p.reached.to(out.dtype) for p in parts)
    return (out / count.clamp(min=1).view(N, 1, 1)).reshape(N, H * D)  # type: ignore[union-attr]


def window_projection(
    layer: HeteroGraphAttention,
    node_type: str,
    x: Tensor,
    relation: EdgeType | None,
    output_slots: slice | None = None,
    slot_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Queries, keys and values ``[N, H, d_k]`` of nodes of type ``node_type``, as
    :meth:`HeteroGraphAttention.project` gives them, except that with ``relation`` the
    queries are :math:`(\mu_\phi / \sqrt{d_k})\, \mathbf{W}_{\mathrm{att}}^{\phi}
    \mathbf{q}` (so that :math:`\mathbf{q}'^{\top} \mathbf{k}` is the score of
    relation :math:`\phi`), folded into the query rows of the Linear: the relation map
    costs no pass over the nodes. Three Linears on the row blocks of the weight, so that
    each result is contiguous (cheaper in the backward pass than one Linear split in 3).
    With ``output_slots`` (``x`` a ``[U, W, F]`` window grid) only those slots' queries
    are computed (``[U * len, H, d_k]``): the others' outputs are not needed.

    With ``slot_rows`` (``[U, W]``), ``x`` is ``[R, F]``, each distinct input once, and
    the grid is ``x[slot_rows]``: keys and values are then computed once per row and
    gathered (overlapping windows share most of their rows), queries per output slot."""
    H, D = layer.heads, layer.head_channels
    weights, biases = _folded_projection(layer, node_type, relation)
    x = x.to(layer.param_dtype)
    if slot_rows is None:
        x_query = x if output_slots is None else x[:, output_slots]
        q = F.linear(x_query.reshape(-1, x.size(-1)), weights[0], biases[0]).view(-1, H, D)
        x = x.reshape(-1, x.size(-1))
        k, v = (
            F.linear(x, w, b).view(-1, H, D) for w, b in zip(weights[1:], biases[1:], strict=True)
        )
        return q, k, v
    query_rows = slot_rows if output_slots is None else slot_rows[:, output_slots]
    q = F.linear(x.index_select(0, query_rows.reshape(-1)), weights[0], biases[0]).view(-1, H, D)
    rows = slot_rows.reshape(-1)
    k, v = (
        F.linear(x, w, b).index_select(0, rows).view(-1, H, D)
        for w, b in zip(weights[1:], biases[1:], strict=True)
    )
    return q, k, v


def _folded_projection(
    layer: HeteroGraphAttention, node_type: str, relation: EdgeType | None
) -> tuple[list[Tensor], list[Tensor | None]]:
    r"""The query, key and value blocks of ``node_type``'s Linear, the query block folded
    with ``relation``'s :math:`\mathbf{W}_{\mathrm{att}}` and prior (see
    :func:`window_projection`)."""
    H, D, width = layer.heads, layer.head_channels, layer.channels
    lin = layer.lin_qkv[node_type]
    weights = list(lin.weight.split(width))
    biases = list(lin.bias.split(width)) if lin.bias is not None else [None] * 3
    if relation is not None:
        rel = layer.relation_parameters(relation)
        fold = rel.att * (rel.prior * (1.0 / math.sqrt(D))).view(H, 1, 1)  # [H, d_q', d_q]
        weights[0] = torch.einsum("hde,hei->hdi", fold, weights[0].view(H, D, -1))
        weights[0] = weights[0].reshape(width, -1)
        if biases[0] is not None:
            biases[0] = torch.einsum("hde,he->hd", fold, biases[0].view(H, D)).reshape(width)
    return weights, biases


def window_layer_inputs(
    layer: HeteroGraphAttention,
    window_type: str,
    window_x: Tensor,
    window_relation: EdgeType,
    update_windows: bool,
    output_slots: slice | None,
    slot_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`window_projection` of every slot when the windows are updated (queries
    folded with ``window_relation``'s W_att if the layer has it), else :obj:`None`: only the
    linked slots' keys and values are then needed (:func:`slot_keys_values`). With
    ``slot_rows``, ``window_x`` is ``[R, F]`` distinct rows (see :func:`window_projection`)."""
    if not update_windows:
        return None
    relation = window_relation if window_relation in layer.edge_types else None
    return window_projection(layer, window_type, window_x, relation, output_slots, slot_rows)


def window_messages(
    layer: HeteroGraphAttention,
    qkv: Sequence[Tensor],
    window_mask: Tensor,
    output_slots: slice | None = None,
) -> Tensor:
    r"""The attention-weighted sums of the *raw* values, :math:`\sum_u \alpha_u v_u`
    ``[U * W, H, d_k]`` (:math:`\mathbf{W}_{\mathrm{msg}}` not applied, see
    :func:`window_update`), along the chain of adjacent valid slots (with self-loops)
    of each window: one ``[W, W]`` attention per window. ``qkv``: the slots' folded
    queries, keys and values from :func:`window_projection` (queries of the
    ``output_slots`` only, when given: then ``[U * len, H, d_k]`` messages into them).
    Empty slots get zeros.
    (Measured: matmul + masked softmax beats
    ``scaled_dot_product_attention`` with a mask here by 2x at 2 threads.)"""
    U, W = window_mask.shape
    H, D = layer.heads, layer.head_channels
    dst = range(W)[output_slots] if output_slots is not None else range(W)
    q = qkv[0].view(U, len(dst), H, D).transpose(1, 2)  # [U, H, W_dst, D]
    k, v = (x.view(U, W, H, D).transpose(1, 2) for x in qkv[1:])  # [U, H, W, D]
    score = q @ k.transpose(-1, -2)  # [U, H, W_dst, W_src]
    w_dst = torch.arange(dst.start, dst.stop, device=window_mask.device)
    w_src = torch.arange(W, device=window_mask.device)
    chain = (w_dst.view(-1, 1) - w_src.view(1, -1)).abs() <= 1
    alpha, _ = masked_softmax(score, chain & window_mask.view(U, 1, 1, W))
    alpha = F.dropout(alpha, p=layer.attn_dropout, training=layer.training)
    return (alpha @ v).transpose(1, 2).reshape(U * len(dst), H, D)


def window_update(
    layer: HeteroGraphAttention, node_type: str, x: Tensor, m: Tensor, relation: EdgeType
) -> Tensor:
    r""":meth:`HeteroGraphAttention.node_update` of messages ``m`` ``[..., H, d_k]`` from
    :func:`window_messages`, with :math:`\mathbf{W}_{\mathrm{msg}}` of ``relation``
    folded into :math:`\mathbf{W}_o` (one Linear, no pass for the relation map)."""
    H, D = layer.heads, layer.head_channels
    lin = layer.lin_out[node_type]
    msg = layer.relation_parameters(relation).msg  # [H, d, e]: m_e = sum_d m_d msg[h, d, e]
    weight = torch.einsum("ohe,hde->ohd", lin.weight.view(-1, H, D), msg).reshape(-1, H * D)
    out = F.dropout(
        F.linear(m.reshape(*m.shape[:-2], H * D), weight, lin.bias),
        p=layer.dropout,
        training=layer.training,
    )
    return layer.norm[node_type](x.to(m.dtype) + out).to(x.dtype)


def window_outputs(
    layer: HeteroGraphAttention,
    node_type: str,
    window_x: Tensor,
    qkv: Sequence[Tensor],
    window_mask: Tensor,
    relation: EdgeType | None,
    output_slots: slice | None = None,
) -> Tensor:
    """The layer's outputs ``[U, W, F]`` of the window slots (``[U, len, F]`` of the
    ``output_slots`` only, when given): :func:`window_update` of :func:`window_messages`;
    with ``relation`` :obj:`None` (not in the layer's metadata) the update without
    messages."""
    U = window_mask.size(0)
    H, D = layer.heads, layer.head_channels
    x = window_x if output_slots is None else window_x[:, output_slots]
    if relation is None:
        m = x.new_zeros(*x.shape[:2], H * D, dtype=layer.param_dtype)
        return layer.node_update(node_type, x, m)
    m = window_messages(layer, qkv, window_mask, output_slots).view(U, x.size(1), H, D)
    return window_update(layer, node_type, x, m, relation)


def slot_keys_values(
    layer: HeteroGraphAttention,
    node_type: str,
    window_x: Tensor,
    slots: Tensor,
    qkv: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Keys and values ``[U, S, H * d_k]`` of the window ``slots`` linked to the queries.

    With ``qkv`` (every slot's projection, needed anyway when the windows are updated)
    they are sliced from it; without, only the linked slots are projected, and only to
    keys and values: in the last layer of a stack the other slots and the queries of
    the windows reach nothing (with l = r = 1, a third of the slots and two of the
    three maps)."""
    U, W = window_x.shape[:2]
    H, D = layer.heads, layer.head_channels
    S = slots.numel()
    lo = int(slots[0]) if S else 0
    contiguous = bool((slots == torch.arange(lo, lo + S, device=slots.device)).all())

    def pick(x: Tensor) -> Tensor:  # a slice where the slots are a range: cheaper backward
        return x[:, lo : lo + S] if contiguous else x[:, slots]

    if qkv is not None:
        k, v = (pick(x.view(U, W, H * D)) for x in qkv[1:])
        return k, v
    lin = layer.lin_qkv[node_type]
    width = layer.channels
    x = pick(window_x).to(layer.param_dtype)
    weights = lin.weight[width:].split(width)
    biases = lin.bias[width:].split(width) if lin.bias is not None else (None, None)
    k, v = (F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))
    return k, v


def query_window_messages(
    layer: HeteroGraphAttention,
    query: Tensor,
    slot_kv: tuple[Tensor, Tensor],
    slot_mask: Tensor,
    window_index: Tensor,
    relation: EdgeType,
) -> RelationMessages:
    """Messages into each of ``C`` queries (``query``: ``[C, H, d_k]``) from the linked
    slots of its ``k`` windows (``window_index`` ``[C, k]``, ``-1``: none; ``slot_kv``:
    the slots' keys and values ``[U, S, H * d_k]`` from :func:`slot_keys_values`;
    ``slot_mask`` ``[U, S]``: which of them hold a node)."""
    U, S = slot_mask.shape
    C, K = window_index.shape
    H, D = layer.heads, layer.head_channels
    rel = layer.relation_parameters(relation)
    n = K * S
    windows = window_index.clamp(min=0)
    allowed = (window_index >= 0).view(C, K, 1).expand(C, K, S).reshape(C, n)
    if U > 0:
        allowed = allowed & slot_mask[windows.view(-1)].view(C, n)
        k = slot_kv[0].index_select(0, windows.view(-1)).view(C, n, H * D)  # per (query, slot)
    else:
        k = query.new_zeros(C, n, H * D)
    # q . (k W_att) = (W_att q) . k and sum(alpha v W_msg) = sum(alpha v) W_msg, so the
    # relation maps act once per query, not per source. Heads are batched through a
    # block-diagonal query [C, H*D, H], so that every score is one plain bmm.
    q = torch.einsum("che,hde->chd", query, rel.att)
    q = q * (rel.prior.view(1, H, 1) * (1.0 / math.sqrt(D)))
    eye = torch.eye(H, dtype=q.dtype, device=q.device)
    q_block = (q.unsqueeze(-1) * eye.view(1, H, 1, H)).reshape(C, H * D, H)
    score = (k @ q_block).transpose(1, 2)  # [C, H, n]
    alpha, lse = masked_softmax(score, allowed.view(C, 1, n))
    alpha = F.dropout(alpha, p=layer.attn_dropout, training=layer.training)
    m = _weighted_slot_values(slot_kv[1], alpha, windows, S) if U > 0 else q.new_zeros(C, H, D)
    return RelationMessages(torch.einsum("chd,hde->che", m, rel.msg), lse, allowed.any(-1))


def _weighted_slot_values(values: Tensor, alpha: Tensor, windows: Tensor, S: int) -> Tensor:
    r""":math:`\sum_{j} \alpha^h_{cj} \mathbf{v}^h_{u(c,j)}` ``[C, H, d_k]`` for slot values
    ``[U, S, H * d_k]``, weights ``[C, H, k * S]`` and windows ``[C, k]``: one weighted
    ``embedding_bag`` over the rows ``(u, s, h)`` of the values, so that the ``C * k * S``
    gathered values are never materialised (memory traffic, not arithmetic, is the cost
    of this step)."""
    C, H, n = alpha.shape
    D = values.size(-1) // H
    slot = (windows.unsqueeze(-1) * S + torch.arange(S, device=windows.device)).view(C, 1, n)
    rows = slot * H + torch.arange(H, device=windows.device).view(1, H, 1)  # [C, H, n]
    m = F.embedding_bag(
        rows.view(C * H, n),
        values.reshape(-1, D),
        # Same dtype as the values, as a matmul under autocast would make them (CUDA
        # autocast keeps softmax outputs in float32; embedding_bag does not cast).
        per_sample_weights=alpha.reshape(C * H, n).to(values.dtype),
        mode="sum",
    )
    return m.view(C, H, D)


def window_and_query_messages(
    layer: HeteroGraphAttention,
    query: Tensor,
    window_x: Tensor,
    window_mask: Tensor,
    window_index: Tensor,
    relations: tuple[EdgeType, EdgeType],
    query_slots: Sequence[int] | None,
    update_windows: bool,
    output_slots: slice | None,
) -> tuple[Tensor, RelationMessages]:
    """The part every dense unit shares: the windows' outputs (``window_x`` unchanged
    without ``update_windows``; only the ``output_slots`` when given) and the messages of
    ``relations[1]`` from the linked slots into the queries (``query``: their ``[C, H, d_k]``
    projections; no messages if the layer lacks that relation). Dropout is drawn in this
    fixed order: windows, then queries."""
    window_relation, query_relation = relations
    window_type = window_relation[0]
    qkv = window_layer_inputs(
        layer, window_type, window_x, window_relation, update_windows, output_slots
    )  # 3 x [U * W, H, D] or None
    windows_out = window_x
    if qkv is not None:
        relation = window_relation if window_relation in layer.edge_types else None
        windows_out = window_outputs(
            layer, window_type, window_x, qkv, window_mask, relation, output_slots
        )
    if query_relation not in layer.edge_types:
        return windows_out, no_messages(query, query.size(0), layer.heads, layer.head_channels)
    slots = slot_index(query_slots, window_mask.size(1), window_x.device)
    slot_kv = slot_keys_values(layer, window_type, window_x, slots, qkv)
    return windows_out, query_window_messages(
        layer, query, slot_kv, window_mask[:, slots], window_index, query_relation
    )


def no_messages(like: Tensor, N: int, heads: int, head_channels: int) -> RelationMessages:
    """The messages of a relation without edges into ``N`` nodes."""
    return RelationMessages(
        like.new_zeros(N, heads, head_channels),
        like.new_full((N, heads), torch.finfo(like.dtype).min),
        torch.zeros(N, dtype=torch.bool, device=like.device),
    )


def check_window_relations(
    layer: HeteroGraphAttention, window_relation: EdgeType, query_relation: EdgeType
) -> tuple[str, str]:
    """``(window type, query type)``; raises :class:`ValueError` unless the window
    relation links a type to itself and the query relation starts from it."""
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


def check_window_shapes(
    query_x: Tensor, window_x: Tensor, window_mask: Tensor, window_index: Tensor
) -> None:
    """Raises :class:`ValueError` unless the shapes are ``[C, F]``, ``[U, W, F]``,
    ``[U, W]`` and ``[C, k]``."""
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


def slot_index(query_slots: Sequence[int] | None, W: int, device: torch.device) -> Tensor:
    """The window slots linked to the queries, as an index tensor (``None``: all ``W``)."""
    if query_slots is None:
        return torch.arange(W, device=device)
    if not all(0 <= j < W for j in query_slots):
        raise ValueError(f"query_slots {tuple(query_slots)} must be slots of a {W}-slot window")
    return torch.tensor(list(query_slots), dtype=torch.long, device=device)
