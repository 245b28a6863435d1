"""The GNN-LM heterogeneous graph attention layer (HGT form)."""
from __future__ import annotations

import math
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import LayerNorm, Linear, Parameter
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.inits import glorot, ones
from torch_geometric.nn.module_dict import ModuleDict
from torch_geometric.nn.parameter_dict import ParameterDict
from torch_geometric.typing import EdgeType, Metadata, NodeType
from torch_geometric.utils import softmax

from hetgraph.graph.config import CTX, N2C, N2N, NBR
from hetgraph.nn.config import Normalization

AttentionDict = dict[EdgeType, tuple[Tensor, Tensor]]


def _rel_key(edge_type: EdgeType) -> str:
    return "__".join(edge_type)


def _masked_softmax(score: Tensor, allowed: Tensor) -> Tensor:
    # A finite fill keeps fully masked rows NaN-free (forward and backward);
    # zeroing afterwards turns them into "no message" (m = 0).
    score = score.masked_fill(~allowed, torch.finfo(score.dtype).min)
    return score.softmax(dim=-1).masked_fill(~allowed, 0.0)


class HeteroGraphAttention(MessagePassing):
    r"""The heterogeneous graph attention layer of GNN-LM from the
    `"GNN-LM: Language Modeling based on Global Contexts via GNN"
    <https://arxiv.org/abs/2110.08743>`_ paper (an HGT-style operator).

    For an edge :math:`u \to v` of relation :math:`\phi`, node types
    :math:`\tau(\cdot)`, head :math:`h` and :math:`d_k = F / H`:

    .. math::
        e^{h}_{uv} &= \frac{\mu^{h}_{\phi}}{\sqrt{d_k}}
            \left(\mathbf{W}_q^{\tau(v),h} \mathbf{x}_v\right)^{\top}
            \mathbf{W}_{\mathrm{att}}^{\phi,h\top}
            \left(\mathbf{W}_k^{\tau(u),h} \mathbf{x}_u\right)

        \alpha^{h}_{uv} &= \mathrm{softmax}_{u}\left(e^{h}_{uv}\right)

        \mathbf{m}^{h}_v &= \sum_{u} \alpha^{h}_{uv}\,
            \mathbf{W}_{\mathrm{msg}}^{\phi,h\top}
            \mathbf{W}_v^{\tau(u),h} \mathbf{x}_u

        \mathbf{x}_v^{\prime} &= \mathrm{LayerNorm}^{\tau(v)}\left(
            \mathbf{x}_v + \mathrm{Dropout}\left(\mathbf{W}_o^{\tau(v)}
            \big\Vert_{h} \mathbf{m}^{h}_v\right)\right)

    With :obj:`normalization="joint"` the softmax runs over all in-edges of
    :math:`v` (as :class:`~torch_geometric.nn.conv.HGTConv`); with
    :obj:`"per_relation"` it runs within each relation and the per-relation
    messages are averaged over the relations that have in-edges to :math:`v`
    (as the official GNN-LM DGL code). :math:`\mathbf{W}_o` has no bias, so a
    node without in-edges gets :math:`\mathbf{m}_v = 0`, i.e.
    :math:`\mathbf{x}_v^{\prime} = \mathrm{LayerNorm}(\mathbf{x}_v)`.
    :math:`\mu_\phi` is initialised to one.

    Unlike :class:`~torch_geometric.nn.conv.HGTConv`, the result does not
    depend on the order of :obj:`edge_index_dict`, and every node type in
    :obj:`x_dict` comes back. Computation runs in the parameters' dtype; the
    output takes each input's dtype.

    Args:
        channels (int): Size of each input and output sample (the residual
            needs both equal).
        metadata (Tuple[List[str], List[Tuple[str, str, str]]]): The node and
            edge types of the graph, see
            :meth:`torch_geometric.data.HeteroData.metadata`.
        heads (int, optional): Number of attention heads. (default: :obj:`8`)
        dropout (float, optional): Dropout on :math:`\mathbf{W}_o \mathbf{m}`.
            (default: :obj:`0.0`)
        attn_dropout (float, optional): Dropout on the attention
            coefficients. (default: :obj:`0.0`)
        normalization (str, optional): :obj:`"joint"` or
            :obj:`"per_relation"`. (default: :obj:`"joint"`)
        bias (bool, optional): Bias of the query/key/value maps.
            (default: :obj:`True`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:** node features :math:`\{(|\mathcal{V}_t|, F)\}`, edge
          indices :math:`\{(2, |\mathcal{E}_\phi|)\}`
        - **output:** node features :math:`\{(|\mathcal{V}_t|, F)\}`, and with
          :obj:`return_attention_weights=True` also
          :math:`\{\phi: ((2, |\mathcal{E}_\phi|), (|\mathcal{E}_\phi|, H))\}`
    """

    def __init__(
        self,
        channels: int,
        metadata: Metadata,
        heads: int = 8,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        normalization: Normalization = "joint",
        bias: bool = True,
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "sum")
        super().__init__(node_dim=0, **kwargs)
        if channels % heads != 0:
            raise ValueError(f"'channels' (got {channels}) must be divisible by 'heads' (got {heads})")
        if normalization not in ("joint", "per_relation"):
            raise ValueError(f"normalization must be 'joint' or 'per_relation' (got {normalization!r})")
        self.channels = channels
        self.heads = heads
        self.head_channels = channels // heads
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.normalization = normalization
        self.node_types: list[NodeType] = list(metadata[0])
        self.edge_types: list[EdgeType] = [tuple(e) for e in metadata[1]]  # type: ignore[misc]
        for src, _, dst in self.edge_types:
            if src not in self.node_types or dst not in self.node_types:
                raise ValueError(f"edge type {(src, _, dst)} uses a node type missing from metadata")

        H, D = heads, self.head_channels
        self.lin_qkv = ModuleDict({t: Linear(channels, 3 * channels, bias=bias) for t in self.node_types})
        self.lin_out = ModuleDict({t: Linear(channels, channels, bias=False) for t in self.node_types})
        self.norm = ModuleDict({t: LayerNorm(channels) for t in self.node_types})
        self.rel_att = ParameterDict({_rel_key(e): Parameter(torch.empty(H, D, D)) for e in self.edge_types})
        self.rel_msg = ParameterDict({_rel_key(e): Parameter(torch.empty(H, D, D)) for e in self.edge_types})
        self.rel_prior = ParameterDict({_rel_key(e): Parameter(torch.empty(H)) for e in self.edge_types})
        self._alpha: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for t in self.node_types:
            self.lin_qkv[t].reset_parameters()
            self.lin_out[t].reset_parameters()
            self.norm[t].reset_parameters()
        for key in self.rel_att:
            glorot(self.rel_att[key])
            glorot(self.rel_msg[key])
            ones(self.rel_prior[key])

    # ------------------------------------------------------------------ edge-list path
    @overload
    def forward(
        self,
        x_dict: dict[NodeType, Tensor],
        edge_index_dict: dict[EdgeType, Tensor],
        return_attention_weights: Literal[False] = False,
    ) -> dict[NodeType, Tensor]: ...

    @overload
    def forward(
        self,
        x_dict: dict[NodeType, Tensor],
        edge_index_dict: dict[EdgeType, Tensor],
        return_attention_weights: Literal[True],
    ) -> tuple[dict[NodeType, Tensor], AttentionDict]: ...

    def forward(
        self,
        x_dict: dict[NodeType, Tensor],
        edge_index_dict: dict[EdgeType, Tensor],
        return_attention_weights: bool = False,
    ) -> dict[NodeType, Tensor] | tuple[dict[NodeType, Tensor], AttentionDict]:
        r"""Runs the layer on an edge-list graph (the reference path).

        Args:
            x_dict (Dict[str, torch.Tensor]): Node features per node type.
            edge_index_dict (Dict[Tuple[str, str, str], torch.Tensor]): Edge
                indices per edge type, in any order; types not in the
                metadata are ignored, missing ones mean "no edges".
            return_attention_weights (bool, optional): Also return, per edge
                type, the edge index and the attention coefficients
                :math:`[|\mathcal{E}_\phi|, H]` (after normalisation, before
                attention dropout). (default: :obj:`False`)
        """
        H, D = self.heads, self.head_channels
        dtype = self.lin_qkv[self.node_types[0]].weight.dtype
        types = [t for t in self.node_types if t in x_dict]

        q_dict: dict[NodeType, Tensor] = {}
        k_dict: dict[NodeType, Tensor] = {}
        v_dict: dict[NodeType, Tensor] = {}
        dst_offset: dict[NodeType, int] = {}
        num_dst = 0
        for t in types:
            x = x_dict[t].to(dtype)
            q_dict[t], k_dict[t], v_dict[t] = self.lin_qkv[t](x).view(-1, 3, H, D).unbind(1)
            dst_offset[t] = num_dst
            num_dst += x.size(0)

        # Relations in metadata order (not the dict's), so the result is order-free.
        # Source features are transformed per relation and stacked; edges are
        # re-indexed into that stack and into the concatenation of all queries.
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        srcs: list[Tensor] = []
        dsts: list[Tensor] = []
        groups: list[Tensor] = []
        priors: list[Tensor] = []
        rel_ids: list[int] = []
        present: list[tuple[EdgeType, Tensor, int, int]] = []
        num_src = 0
        num_edges = 0
        for r, edge_type in enumerate(self.edge_types):
            edge_index = edge_index_dict.get(edge_type)
            src_type, _, dst_type = edge_type
            if edge_index is None or src_type not in x_dict or dst_type not in x_dict:
                continue
            E = edge_index.size(1)
            present.append((edge_type, edge_index, num_edges, r))
            num_edges += E
            if E == 0:
                continue
            key = _rel_key(edge_type)
            ks.append(torch.einsum("nhd,hde->nhe", k_dict[src_type], self.rel_att[key]))
            vs.append(torch.einsum("nhd,hde->nhe", v_dict[src_type], self.rel_msg[key]))
            src = edge_index[0].long() + num_src
            dst = edge_index[1].long() + dst_offset[dst_type]
            srcs.append(src)
            dsts.append(dst)
            rel_ids.append(r)
            # per_relation: one softmax group per (relation, destination).
            groups.append(dst if self.normalization == "joint" else dst + r * num_dst)
            priors.append(self.rel_prior[key].view(1, H).expand(E, H))
            num_src += ks[-1].size(0)

        ref = x_dict[types[0]] if types else None
        if num_edges > 0:
            edge_index = torch.stack([torch.cat(srcs), torch.cat(dsts)])
            num_groups = num_dst if self.normalization == "joint" else num_dst * len(self.edge_types)
            out = self.propagate(
                edge_index,
                q=torch.cat([q_dict[t] for t in types]),
                k=torch.cat(ks),
                v=torch.cat(vs),
                prior=torch.cat(priors),
                group=torch.cat(groups),
                num_groups=num_groups,
                size=(num_src, num_dst),
            )
            alpha = self._alpha
            self._alpha = None
            if self.normalization == "per_relation":
                # Mean over the relations that reach each node (sum of per-relation messages / count).
                reached = torch.zeros(len(self.edge_types), num_dst, dtype=torch.bool, device=out.device)
                for r, dst in zip(rel_ids, dsts):
                    reached[r, dst] = True
                out = out / reached.sum(0).clamp(min=1).to(out.dtype).view(-1, 1, 1)
        else:
            device = ref.device if ref is not None else None
            out = torch.zeros(num_dst, H, D, dtype=dtype, device=device)
            alpha = torch.zeros(0, H, dtype=dtype, device=device)
        out = out.reshape(num_dst, H * D)

        out_dict: dict[NodeType, Tensor] = {}
        for t in types:
            x = x_dict[t]
            m = out[dst_offset[t] : dst_offset[t] + x.size(0)]
            out_dict[t] = self._update(t, x.to(dtype), m).to(x.dtype)

        if return_attention_weights:
            attn: AttentionDict = {
                edge_type: (ei, alpha[start : start + ei.size(1)])
                for edge_type, ei, start, _ in present
            }
            return out_dict, attn
        return out_dict

    def message(
        self,
        q_i: Tensor,
        k_j: Tensor,
        v_j: Tensor,
        prior: Tensor,
        group: Tensor,
        num_groups: int,
    ) -> Tensor:
        score = (q_i * k_j).sum(dim=-1) * prior / math.sqrt(self.head_channels)
        alpha = softmax(score, group, num_nodes=num_groups)
        self._alpha = alpha
        alpha = F.dropout(alpha, p=self.attn_dropout, training=self.training)
        return v_j * alpha.unsqueeze(-1)

    def _update(self, node_type: NodeType, x: Tensor, m: Tensor) -> Tensor:
        out = F.dropout(self.lin_out[node_type](m), p=self.dropout, training=self.training)
        return self.norm[node_type](x + out)

    # ------------------------------------------------------------------ dense fast path
    def forward_grid(
        self,
        ctx_x: Tensor,
        nbr_x: Tensor,
        nbr_mask: Tensor,
        n2c_mode: Literal["center", "window"] = "center",
        center: int = 1,
        update_nbr: bool = True,
        window: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""Dense masked-attention path over the regular GNN-LM window layouts:
        ``nbr`` nodes sit in windows of :math:`W` slots; ``n2n`` links
        adjacent valid slots of a window (plus self-loops), ``n2c`` links the
        valid centre slot (or every valid slot) of each of a ``ctx`` node's
        :math:`k` windows to it, and there are no ``c2c`` edges. ``n2n``
        attention runs once per window; each ``ctx`` node attends over the
        gathered keys/values of its windows. Gives the same result as
        :meth:`forward` on the equivalent edge list (for either
        normalisation, since each node then has one incoming relation).

        Two layouts:

        * per (query, neighbour) (``share_windows=False``): :obj:`nbr_x` is
          :math:`[C, k, W, F]`, :obj:`nbr_mask` :math:`[C, k, W]`, each
          ``ctx`` node owns its :math:`k` windows and :obj:`window` is
          :obj:`None`;
        * shared (``share_windows=True``): :obj:`nbr_x` is :math:`[U, W, F]`
          over :math:`U` distinct windows, :obj:`nbr_mask` :math:`[U, W]`,
          and :obj:`window` :math:`[C, k]` gives the window of each ``ctx``
          node's :math:`k`-th neighbour (``-1``: none).

        Args:
            ctx_x (torch.Tensor): :math:`[C, F]` ``ctx`` features.
            nbr_x (torch.Tensor): ``nbr`` slot features (values in masked
                slots are ignored), :math:`[C, k, W, F]` or :math:`[U, W, F]`.
            nbr_mask (torch.Tensor): bool, valid slots, :obj:`nbr_x` without
                the feature dimension.
            n2c_mode (str, optional): :obj:`"center"` or :obj:`"window"`.
            center (int, optional): Window slot of the retrieved token
                (:obj:`left`).
            update_nbr (bool, optional): If :obj:`False`, skip the ``n2n``
                attention and return :obj:`nbr_x` unchanged (the last layer
                of a stack only needs the ``ctx`` output).
            window (torch.Tensor, optional): :math:`[C, k]` int64 window
                index for the shared layout.

        :rtype: (:class:`torch.Tensor`, :class:`torch.Tensor`) - the new
            ``ctx`` features :math:`[C, F]` and ``nbr`` slots (shape of :obj:`nbr_x`).
        """
        H, D = self.heads, self.head_channels
        C = ctx_x.size(0)
        if nbr_x.dim() == 4:
            if window is not None:
                raise ValueError("window is only used with [U, W, F] nbr features")
            K, W = nbr_x.size(1), nbr_x.size(2)
        elif nbr_x.dim() == 3:
            if window is None or window.dim() != 2 or window.size(0) != C:
                raise ValueError("[U, W, F] nbr features need a [C, k] window index")
            K, W = window.size(1), nbr_x.size(1)
        else:
            raise ValueError(f"nbr_x must be [C, k, W, F] or [U, W, F] (got shape {tuple(nbr_x.shape)})")
        U = nbr_mask.numel() // W
        dtype = self.lin_qkv[NBR].weight.dtype
        scale = 1.0 / math.sqrt(D)
        device = nbr_x.device
        xc, xn = ctx_x.to(dtype), nbr_x.to(dtype).reshape(U, W, nbr_x.size(-1))
        qc = self.lin_qkv[CTX](xc)[:, : H * D].view(C, H, D)  # ctx keys/values reach nothing here
        qkv_n = self.lin_qkv[NBR](xn)  # [U, W, 3 * H * D]
        mask = nbr_mask.reshape(U, W)

        if not update_nbr:
            mn = None
        elif N2N in self.edge_types:
            key = _rel_key(N2N)
            qn, kn, vn = qkv_n.view(U, W, 3, H, D).unbind(2)  # [U, W, H, D]
            kr = torch.einsum("nwhd,hde->nhwe", kn, self.rel_att[key])
            vr = torch.einsum("nwhd,hde->nhwe", vn, self.rel_msg[key])
            score = qn.transpose(1, 2) @ kr.transpose(-1, -2)  # [U, H, W_dst, W_src]
            score = score * (self.rel_prior[key].view(1, H, 1, 1) * scale)
            w = torch.arange(W, device=device)
            band = (w.view(-1, 1) - w.view(1, -1)).abs() <= 1
            alpha = _masked_softmax(score, band & mask.view(U, 1, 1, W))
            alpha = F.dropout(alpha, p=self.attn_dropout, training=self.training)
            mn = (alpha @ vr).transpose(1, 2).reshape(U, W, H * D)
        else:
            mn = xn.new_zeros(U, W, H * D)

        if N2C in self.edge_types:
            key = _rel_key(N2C)
            if window is None:  # per-(query, neighbour) layout: ctx c owns windows c*k .. c*k+k-1
                window = torch.arange(U, device=device).view(C, K)
            # The n sources of each ctx node: (window, slot) pairs, -1 windows masked out.
            slot = torch.arange(W, device=device) if n2c_mode == "window" else torch.tensor([center], device=device)
            rows = (window.clamp(min=0).unsqueeze(-1) * W + slot).view(C, -1)  # [C, n] into [U * W]
            n = rows.size(1)
            km = (window >= 0).unsqueeze(-1).expand(C, K, slot.numel()).reshape(C, n)
            if U > 0:
                km = km & mask.view(-1)[rows]
                # Gather the sources' keys and values straight from the qkv rows (one copy).
                kv_index = torch.stack([rows * 3 + 1, rows * 3 + 2]).view(-1)
                kv = qkv_n.view(U * W * 3, H * D).index_select(0, kv_index).view(2, C, n, H * D)
                ks, vs = kv.unbind(0)
            else:
                ks = vs = qkv_n.new_zeros(C, n, H * D)
            # q . (k W_att) = (W_att q) . k and sum(alpha v W_msg) = sum(alpha v) W_msg, so the
            # relation maps act once per ctx node, not per source. Heads are batched through a
            # block-diagonal query [C, H*D, H], so that every product is one plain bmm.
            qr = torch.einsum("che,hde->chd", qc, self.rel_att[key])
            qr = qr * (self.rel_prior[key].view(1, H, 1) * scale)
            eye = torch.eye(H, dtype=dtype, device=device)
            q_block = (qr.unsqueeze(-1) * eye.view(1, H, 1, H)).reshape(C, H * D, H)
            score = (ks @ q_block).transpose(1, 2)  # [C, H, n]
            alpha = _masked_softmax(score, km.view(C, 1, n))
            alpha = F.dropout(alpha, p=self.attn_dropout, training=self.training)
            m_all = alpha @ vs  # [C, H, H * D]: head h's weights applied to every head's values
            m = m_all.view(C, H, H, D).diagonal(dim1=1, dim2=2).permute(0, 2, 1)  # [C, H, D]
            mc = torch.einsum("chd,hde->che", m, self.rel_msg[key]).reshape(C, H * D)
        else:
            mc = xc.new_zeros(C, H * D)

        ctx_out = self._update(CTX, xc, mc).to(ctx_x.dtype)
        if mn is None:
            nbr_out = nbr_x
        else:
            nbr_out = self._update(NBR, xn, mn).to(nbr_x.dtype).view(nbr_x.shape)
        return ctx_out, nbr_out

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, heads={self.heads}, "
            f"normalization={self.normalization!r}, num_relations={len(self.edge_types)})"
        )
