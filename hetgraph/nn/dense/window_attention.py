"""Dense masked-attention path of :class:`~hetgraph.nn.HeteroGraphAttention` over window grids."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch_geometric.typing import EdgeType

from hetgraph.nn.conv import HeteroGraphAttention
from hetgraph.nn.dense.common import (
    check_window_relations,
    check_window_shapes,
    combine_messages,
    window_and_query_messages,
)


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
    output_slots: slice | None = None,
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
        output_slots (slice, optional): Compute and return the window outputs of
            these slots only, :math:`(U, |\text{slots}|, F)`: a stack's later layers
            need only the slots within reach of the queries (:obj:`None`: all).

    Shapes:
        - **input:** query features :math:`(C, F)`, window features :math:`(U, W, F)`,
          window mask :math:`(U, W)` (bool), window index :math:`(C, k)` (int64)
        - **output:** query features :math:`(C, F)` and window features
          :math:`(U, W, F)` (:math:`(U, |\text{output\_slots}|, F)`), in the dtypes of
          the inputs
    """
    _, query_type = check_window_relations(layer, window_relation, query_relation)
    check_window_shapes(query_x, window_x, window_mask, window_index)
    query = layer.project(query_type, query_x)[:, 0]  # [C, H, D]; query keys/values reach nothing
    windows_out, part = window_and_query_messages(
        layer,
        query,
        window_x,
        window_mask,
        window_index,
        (window_relation, query_relation),
        query_slots,
        update_windows,
        output_slots,
    )
    m_query = combine_messages(layer, [part])  # zero where the relation reaches nothing
    return layer.node_update(query_type, query_x, m_query), windows_out
