"""The GNN-LM heterogeneous graph attention layer (HGT form), edge-list path."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import LayerNorm, Linear, Parameter
from torch_geometric.nn.conv import MessagePassing
from torch_geometric.nn.module_dict import ModuleDict
from torch_geometric.nn.parameter_dict import ParameterDict
from torch_geometric.typing import EdgeType, Metadata, NodeType
from torch_geometric.utils import softmax

from hetgraph.nn.config import Normalization, RelationInit, RelationMean
from hetgraph.nn.relations import (
    RelationParameters,
    StackedRelations,
    init_relation_parameters,
    mean_over_relations,
    relation_key,
)

AttentionDict = dict[EdgeType, tuple[Tensor, Tensor]]


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
    :math:`v` and the messages of all relations are summed (the aggregation of
    :class:`~torch_geometric.nn.conv.HGTConv`, tested to 1e-10; HGTConv's
    *update* differs: :math:`\sigma(\beta)\,\mathbf{W}_o\,\mathrm{GELU}(\mathbf{m}_v)
    + (1 - \sigma(\beta))\,\mathbf{x}_v` with a learned :math:`\beta` per node
    type, no skip at all when the widths differ, and no LayerNorm). With
    :obj:`"per_relation"` the softmax runs within each relation and the
    per-relation messages are averaged (the official GNN-LM code):
    :obj:`relation_mean="reached"` divides by the relations that have an
    in-edge to :math:`v`; :obj:`"all"` divides by every relation into
    :math:`v`'s node type that has at least one edge in the graph (DGL's
    ``multi_update_all(..., "mean")``, which skips relations without edges), so
    a node reached by one of two such relations gets half its message.
    :math:`\mathbf{W}_o` has a bias only with :obj:`out_bias=True` (official:
    yes); without it a node without in-edges gets
    :math:`\mathbf{x}_v^{\prime} = \mathrm{LayerNorm}(\mathbf{x}_v)`.
    :math:`\mu_\phi` is initialised to one. :obj:`relation_names` lets edge
    types share :math:`\mathbf{W}_{\mathrm{att}}`, :math:`\mathbf{W}_{\mathrm{msg}}`
    and :math:`\mu` (official GNN-LM: ``intra`` for ``tgt -> tgt`` and
    ``ntgt -> ntgt``); softmax groups and the mean stay per edge type.

    :obj:`gated_relations` (e.g. the knowledge-graph relations ``k2c``, ``k2n``) are kept
    out of that aggregation: each is softmax-normalised within itself and added to it,
    scaled per channel by a learnable gate :math:`\mathbf{g}_\phi` initialised to zero,

    .. math::
        \mathbf{m}_v \leftarrow \mathbf{m}_v + \sum_{\phi\ \mathrm{gated}}
            \mathbf{g}_\phi \odot \mathbf{m}^{\phi}_v,

    so that until the gates are trained the layer's outputs are *exactly* those without
    these relations' edges (their sources' own updates aside).

    Unlike :class:`~torch_geometric.nn.conv.HGTConv`, the result does not
    depend on the order of :obj:`edge_index_dict`, and every node type in
    :obj:`x_dict` comes back. Computation runs in the parameters' dtype; the
    output takes each input's dtype. :meth:`project`,
    :meth:`relation_parameters` and :meth:`node_update` expose the per-type
    and per-relation maps, so that the dense path
    (:func:`~hetgraph.nn.dense.dense_window_attention`) runs with the same
    weights.

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
        out_bias (bool, optional): Bias of :math:`\mathbf{W}_o`.
            (default: :obj:`False`)
        relation_mean (str, optional): :obj:`"reached"` or :obj:`"all"`, the
            divisor of :obj:`"per_relation"` (see above). (default: :obj:`"reached"`)
        relation_names (Dict[Tuple[str, str, str], str], optional): Parameter
            set of each edge type; edge types with the same name share it.
            (default: one set per edge type)
        relation_init (str, optional): :obj:`"glorot"` (per relation
            :math:`[H, d_k, d_k]`) or :obj:`"official"` (GNN-LM's
            ``xavier_uniform_`` on the stacked :math:`[R, H, d_k, d_k]`, bound
            :math:`\sqrt{6 / ((R + H) d_k^2)}`). (default: :obj:`"glorot"`)
        gated_relations (List[Tuple[str, str, str]], optional): Edge types (of the
            metadata) whose messages are added through a zero-initialised gate, see
            above. (default: none)
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
        out_bias: bool = False,
        relation_mean: RelationMean = "reached",
        relation_names: Mapping[EdgeType, str] | None = None,
        relation_init: RelationInit = "glorot",
        gated_relations: Sequence[EdgeType] | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("aggr", "sum")
        super().__init__(node_dim=0, **kwargs)
        if channels % heads != 0:
            raise ValueError(
                f"'channels' (got {channels}) must be divisible by 'heads' (got {heads})"
            )
        if normalization not in ("joint", "per_relation"):
            raise ValueError(
                f"normalization must be 'joint' or 'per_relation' (got {normalization!r})"
            )
        if relation_mean not in ("reached", "all"):
            raise ValueError(f"relation_mean must be 'reached' or 'all' (got {relation_mean!r})")
        if relation_init not in ("glorot", "official"):
            raise ValueError(
                f"relation_init must be 'glorot' or 'official' (got {relation_init!r})"
            )
        self.relation_mean = relation_mean
        self.relation_init = relation_init
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
                raise ValueError(
                    f"edge type {(src, _, dst)} uses a node type missing from metadata"
                )

        #: The edge types whose messages pass a zero-initialised gate (:attr:`rel_gate`).
        self.gated_relations: list[EdgeType] = [tuple(e) for e in gated_relations or ()]  # type: ignore[misc]
        for edge_type in self.gated_relations:
            if edge_type not in self.edge_types:
                raise ValueError(f"gated relation {edge_type} is not an edge type of metadata")
        names = dict(relation_names or {})
        #: The parameter set (key of :attr:`rel_att` / ``rel_msg`` / ``rel_prior``) of each
        #: edge type.
        self.relation_keys: dict[EdgeType, str] = {
            e: names.get(e, relation_key(e)) for e in self.edge_types
        }
        keys = list(dict.fromkeys(self.relation_keys.values()))
        H, D = heads, self.head_channels
        self.lin_qkv = ModuleDict(
            {t: Linear(channels, 3 * channels, bias=bias) for t in self.node_types}
        )
        self.lin_out = ModuleDict(
            {t: Linear(channels, channels, bias=out_bias) for t in self.node_types}
        )
        self.norm = ModuleDict({t: LayerNorm(channels) for t in self.node_types})
        self.rel_att = ParameterDict({k: Parameter(torch.empty(H, D, D)) for k in keys})
        self.rel_msg = ParameterDict({k: Parameter(torch.empty(H, D, D)) for k in keys})
        self.rel_prior = ParameterDict({k: Parameter(torch.empty(H)) for k in keys})
        self.rel_gate = ParameterDict(
            {relation_key(e): Parameter(torch.empty(channels)) for e in self.gated_relations}
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for t in self.node_types:
            self.lin_qkv[t].reset_parameters()
            self.lin_out[t].reset_parameters()
            self.norm[t].reset_parameters()
        init_relation_parameters(self.rel_att, self.rel_msg, self.rel_prior, self.relation_init)
        with torch.no_grad():
            for gate in self.rel_gate.values():
                gate.zero_()

    # -------------------------------------------------------- per-type and per-relation maps
    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype the layer computes in (that of its parameters)."""
        return self.lin_qkv[self.node_types[0]].weight.dtype

    def project(self, node_type: NodeType, x: Tensor) -> Tensor:
        r"""Query, key and value of nodes of type ``node_type``:
        :math:`[\ldots, F] \to [N, 3, H, d_k]` (``[:, 0]`` queries, ``[:, 1]``
        keys, ``[:, 2]`` values; leading dimensions flattened into :math:`N`),
        in :attr:`param_dtype`."""
        return self.lin_qkv[node_type](x.to(self.param_dtype)).view(
            -1, 3, self.heads, self.head_channels
        )

    def relation_parameters(self, edge_type: EdgeType) -> RelationParameters:
        """:math:`\\mathbf{W}_{\\mathrm{att}}`, :math:`\\mathbf{W}_{\\mathrm{msg}}` and
        :math:`\\mu` of relation ``edge_type`` (one of :attr:`edge_types`)."""
        key = self.relation_keys[tuple(edge_type)]  # type: ignore[index]
        return RelationParameters(self.rel_att[key], self.rel_msg[key], self.rel_prior[key])

    def node_update(self, node_type: NodeType, x: Tensor, m: Tensor) -> Tensor:
        r"""The residual update :math:`\mathrm{LayerNorm}(\mathbf{x} +
        \mathrm{Dropout}(\mathbf{W}_o \mathbf{m}))` of nodes of type
        ``node_type`` from their messages ``m`` :math:`[\ldots, F]` (heads
        concatenated, in :attr:`param_dtype`); returns ``x``'s dtype."""
        out = F.dropout(self.lin_out[node_type](m), p=self.dropout, training=self.training)
        return self.norm[node_type](x.to(m.dtype) + out).to(x.dtype)

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
        types = [t for t in self.node_types if t in x_dict]
        qkv = {t: self.project(t, x_dict[t]).unbind(1) for t in types}
        offsets, num_dst = self._destination_offsets(x_dict, types)
        present = self._present_relations(x_dict, edge_index_dict)
        gated = [(e, ei) for e, ei in present if e in self.gated_relations]
        present = [(e, ei) for e, ei in present if e not in self.gated_relations]
        relations = self._stack_relations(present, qkv, offsets, num_dst)
        query = torch.cat([qkv[t][0] for t in types]) if types else None
        if relations is not None:
            out, alpha = self._attend(relations, query)
            if self.normalization == "per_relation":
                sizes = {t: x_dict[t].size(0) for t in types}
                out = mean_over_relations(
                    out, relations.reached, self.edge_types, self.relation_mean, offsets, sizes
                )
        else:
            device = x_dict[types[0]].device if types else None
            out = torch.zeros(
                num_dst, self.heads, self.head_channels, dtype=self.param_dtype, device=device
            )
            alpha = torch.zeros(0, self.heads, dtype=self.param_dtype, device=device)
        out, gated_alpha = self._add_gated(gated, qkv, offsets, num_dst, query, out)
        out = out.reshape(num_dst, self.channels)
        out_dict = {
            t: self.node_update(t, x_dict[t], out[offsets[t] : offsets[t] + x_dict[t].size(0)])
            for t in types
        }
        if not return_attention_weights:
            return out_dict
        attention: AttentionDict = {}
        start = 0
        for edge_type, edge_index in present:
            attention[edge_type] = (edge_index, alpha[start : start + edge_index.size(1)])
            start += edge_index.size(1)
        for (edge_type, edge_index), weights in zip(gated, gated_alpha, strict=True):
            attention[edge_type] = (edge_index, weights)
        return out_dict, attention

    def _add_gated(
        self,
        gated: list[tuple[EdgeType, Tensor]],
        qkv: dict[NodeType, tuple[Tensor, Tensor, Tensor]],
        offsets: dict[NodeType, int],
        num_dst: int,
        query: Tensor | None,
        out: Tensor,
    ) -> tuple[Tensor, list[Tensor]]:
        """``out`` plus each gated relation's own softmax-normalised messages times its
        gate, and each one's attention coefficients (empty for a relation without edges)."""
        alphas = []
        for edge_type, edge_index in gated:
            stacked = self._stack_relations([(edge_type, edge_index)], qkv, offsets, num_dst)
            if stacked is None or query is None:
                alphas.append(out.new_zeros(0, self.heads))
                continue
            message, alpha = self._attend(stacked, query)
            gate = self.rel_gate[relation_key(edge_type)].to(message.dtype)
            out = out + gate.view(1, self.heads, self.head_channels) * message
            alphas.append(alpha)
        return out, alphas

    @staticmethod
    def _destination_offsets(
        x_dict: dict[NodeType, Tensor], types: list[NodeType]
    ) -> tuple[dict[str, int], int]:
        # Destinations of all types are concatenated in metadata order.
        offsets: dict[NodeType, int] = {}
        total = 0
        for t in types:
            offsets[t] = total
            total += x_dict[t].size(0)
        return offsets, total

    def _present_relations(
        self, x_dict: dict[NodeType, Tensor], edge_index_dict: dict[EdgeType, Tensor]
    ) -> list[tuple[EdgeType, Tensor]]:
        # Metadata order (not the dict's), so that the result does not depend on the dict.
        return [
            (edge_type, edge_index_dict[edge_type])
            for edge_type in self.edge_types
            if edge_type in edge_index_dict and edge_type[0] in x_dict and edge_type[2] in x_dict
        ]

    def _stack_relations(
        self,
        present: list[tuple[EdgeType, Tensor]],
        qkv: dict[NodeType, tuple[Tensor, Tensor, Tensor]],
        offsets: dict[NodeType, int],
        num_dst: int,
    ) -> StackedRelations | None:
        """Per-relation keys :math:`K W_{att}` and values :math:`V W_{msg}` of the source
        nodes, stacked, with the edges re-indexed into that stack and into the
        concatenated destinations; ``None`` without edges."""
        keys, values, src, dst, group, prior = [], [], [], [], [], []
        reached: list[tuple[int, Tensor]] = []
        num_src = 0
        for edge_type, edge_index in present:
            if edge_index.size(1) == 0:
                continue
            r = self.edge_types.index(edge_type)
            src_type, _, dst_type = edge_type
            rel = self.relation_parameters(edge_type)
            keys.append(torch.einsum("nhd,hde->nhe", qkv[src_type][1], rel.att))
            values.append(torch.einsum("nhd,hde->nhe", qkv[src_type][2], rel.msg))
            src.append(edge_index[0].long() + num_src)
            dst.append(edge_index[1].long() + offsets[dst_type])
            # per_relation: one softmax group per (relation, destination).
            group.append(dst[-1] if self.normalization == "joint" else dst[-1] + r * num_dst)
            prior.append(rel.prior.view(1, self.heads).expand(edge_index.size(1), self.heads))
            reached.append((r, dst[-1]))
            num_src += keys[-1].size(0)
        if not src:
            return None
        num_groups = num_dst if self.normalization == "joint" else num_dst * len(self.edge_types)
        return StackedRelations(
            torch.stack([torch.cat(src), torch.cat(dst)]),
            torch.cat(keys),
            torch.cat(values),
            torch.cat(prior),
            torch.cat(group),
            num_groups,
            reached,
        )

    def _attend(self, relations: StackedRelations, query: Tensor) -> tuple[Tensor, Tensor]:
        """Attention coefficients (:meth:`edge_update`) and the aggregated messages
        :math:`[N_{dst}, H, d_k]`."""
        size = (relations.key.size(0), query.size(0))
        alpha = self.edge_updater(
            relations.edge_index,
            q=query,
            k=relations.key,
            prior=relations.prior,
            group=relations.group,
            num_groups=relations.num_groups,
            size=size,
        )
        out = self.propagate(relations.edge_index, v=relations.value, alpha=alpha, size=size)
        return out, alpha

    def edge_update(
        self, q_i: Tensor, k_j: Tensor, prior: Tensor, group: Tensor, num_groups: int
    ) -> Tensor:
        score = (q_i * k_j).sum(dim=-1) * prior / math.sqrt(self.head_channels)
        return softmax(score, group, num_nodes=num_groups)

    def message(self, v_j: Tensor, alpha: Tensor) -> Tensor:
        alpha = F.dropout(alpha, p=self.attn_dropout, training=self.training)
        return v_j * alpha.unsqueeze(-1)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, heads={self.heads}, "
            f"normalization={self.normalization!r}, num_relations={len(self.edge_types)}"
            + (f", gated={len(self.gated_relations)})" if self.gated_relations else ")")
        )
