"""The query side of the dense window paths, from precomputed window keys and values."""

from __future__ import annotations

from torch import Tensor
from torch_geometric.typing import EdgeType

from hetgraph.nn.conv import HeteroGraphAttention
from hetgraph.nn.dense.causal_attention import CausalLayout, causal_messages
from hetgraph.nn.dense.common import combine_messages, no_messages, query_window_messages


def dense_query_attention(
    layer: HeteroGraphAttention,
    query_x: Tensor,
    slot_key_values: tuple[Tensor, Tensor],
    slot_mask: Tensor,
    window_index: Tensor,
    query_relation: EdgeType,
    causal_relation: EdgeType | None = None,
    causal: CausalLayout | None = None,
) -> Tensor:
    r"""The query outputs of :func:`~hetgraph.nn.dense.dense_window_attention` (or, with
    :obj:`causal`, of :func:`~hetgraph.nn.dense.dense_causal_window_attention`) when the
    keys and values of the windows' linked slots are already known.

    The windows of a GNN-LM graph (`Meng et al. <https://arxiv.org/abs/2110.08743>`_)
    receive nothing from the queries, so what a layer's queries read from them,
    :math:`\mathbf{k}_u, \mathbf{v}_u` of the linked slots :math:`u`, is a function of
    the windows alone (see :meth:`~hetgraph.nn.GraphAdapter.window_key_values`). Given
    them, query :math:`c` attends over the linked slots :math:`\mathcal{S}(c)` of its
    :math:`k` windows exactly as the full layer does (the :math:`\alpha^h_{cu}` and
    :math:`\mathbf{m}^h_c` of :func:`~hetgraph.nn.dense.dense_window_attention`),
    plus, with :obj:`causal_relation` in the layer, the causal messages among the
    queries, aggregated as the layer's :obj:`normalization` says.

    Args:
        layer (HeteroGraphAttention): The layer whose parameters are used.
        query_x (torch.Tensor): Query node features.
        slot_key_values (Tuple[torch.Tensor, torch.Tensor]): Keys and values of the
            linked slots of every window (heads concatenated).
        slot_mask (torch.Tensor): Which linked slots hold a node.
        window_index (torch.Tensor): The window of each of a query's :math:`k`
            neighbours (``-1``: none).
        query_relation (Tuple[str, str, str]): The relation from window slots to
            queries.
        causal_relation (Tuple[str, str, str], optional): The relation among the
            queries. (default: :obj:`None`)
        causal (CausalLayout, optional): Its edges, from
            :func:`~hetgraph.nn.dense.causal_layout`. (default: :obj:`None`)

    Shapes:
        - **input:** query features :math:`(C, F)`, slot keys and values
          :math:`(U, S, H d_k)` each, slot mask :math:`(U, S)` (bool), window index
          :math:`(C, k)` (int64)
        - **output:** query features :math:`(C, F)` in the dtype of :obj:`query_x`
    """
    query_type = query_relation[2]
    C, H, D = query_x.size(0), layer.heads, layer.head_channels
    if window_index.dim() != 2 or window_index.size(0) != C:
        raise ValueError(
            f"window_index must be [C, k] with C = {C} queries (got {tuple(window_index.shape)})"
        )
    keys, values = slot_key_values
    if keys.shape != values.shape or keys.shape[:2] != slot_mask.shape:
        raise ValueError(
            f"slot keys and values must be [U, S, H * d_k] and slot_mask [U, S] "
            f"(got {tuple(keys.shape)}, {tuple(values.shape)} and "
            f"{tuple(slot_mask.shape)})"
        )
    use_causal = causal is not None and causal_relation in layer.edge_types
    qkv = layer.project(query_type, query_x)  # [C, 3, H, D]
    if query_relation in layer.edge_types:
        parts = [
            query_window_messages(
                layer,
                qkv[:, 0],
                (keys.to(qkv.dtype), values.to(qkv.dtype)),
                slot_mask,
                window_index,
                query_relation,
            )
        ]
    else:
        parts = [no_messages(qkv, C, H, D)]
    if use_causal:
        parts.append(causal_messages(layer, qkv, causal, causal_relation))  # type: ignore[arg-type]
    return layer.node_update(query_type, query_x, combine_messages(layer, parts))
