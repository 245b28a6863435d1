r"""Input features of the ``kg`` nodes: a learned projection of a fact's KGE embeddings."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import Linear, Module

#: How a fact's head, relation and tail embeddings make one vector: side by side, or summed
#: (needs entity and relation embeddings of one width).
FactCombine = Literal["concat", "sum"]


def fact_feature_channels(entity_channels: int, relation_channels: int, combine: str) -> int:
    r"""Width of a fact's raw feature: :math:`2 D_e + D_r` (``"concat"``) or :math:`D_e`
    (``"sum"``, which needs :math:`D_e = D_r`)."""
    if combine == "concat":
        return 2 * entity_channels + relation_channels
    if combine != "sum":
        raise ValueError(f"combine must be 'concat' or 'sum' (got {combine!r})")
    if entity_channels != relation_channels:
        raise ValueError(
            f"combine='sum' needs entity and relation embeddings of one width (got "
            f"{entity_channels} and {relation_channels}); use 'concat'"
        )
    return entity_channels


class KGFactEncoder(Module):
    r"""The input features of ``kg`` nodes: the fact's frozen knowledge-graph embeddings
    (:math:`\mathbf{e}_h, \mathbf{r}, \mathbf{e}_t` from a PyG KGE model trained by
    ``hetgraph kg embed``, see :func:`~hetgraph.kg.load_kge_embeddings`), combined and
    projected into the adapter width by a learned Linear:

    .. math::
        \mathbf{x}_{(h, r, t)} = \mathbf{W} \left[\mathbf{e}_h \,\Vert\, \mathbf{r}
            \,\Vert\, \mathbf{e}_t\right] + \mathbf{b}
        \quad\text{or}\quad \mathbf{W} (\mathbf{e}_h + \mathbf{r} + \mathbf{e}_t)
            + \mathbf{b}.

    The embedding tables are non-persistent buffers (not in :meth:`state_dict`: the
    knowledge-graph directory holds them, and several adapters may share one copy); set
    them with :meth:`set_embeddings` (or build with :meth:`from_embeddings`) before a
    forward pass. Only the projection is trained.

    Args:
        in_channels (int): Width of the combined raw feature
            (:func:`fact_feature_channels`).
        out_channels (int): Width of the output (the adapter's hidden width).
        combine (str, optional): :obj:`"concat"` or :obj:`"sum"`. (default: :obj:`"concat"`)

    Shapes:
        - **input:** head, relation, tail ids :math:`(N,)`
        - **output:** :math:`(N, F_{out})`
    """

    entity: Tensor
    relation: Tensor

    def __init__(self, in_channels: int, out_channels: int, combine: FactCombine = "concat"):
        super().__init__()
        if combine not in ("concat", "sum"):
            raise ValueError(f"combine must be 'concat' or 'sum' (got {combine!r})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.combine = combine
        self.lin = Linear(in_channels, out_channels)
        self.register_buffer("entity", torch.empty(0, 0), persistent=False)
        self.register_buffer("relation", torch.empty(0, 0), persistent=False)
        self.reset_parameters()

    @classmethod
    def from_embeddings(
        cls, entity: Tensor, relation: Tensor, out_channels: int, combine: FactCombine = "concat"
    ) -> KGFactEncoder:
        r"""An encoder over the ``[num_entities, D_e]`` and ``[num_relations, D_r]``
        embedding tables (copied in as frozen buffers)."""
        width = fact_feature_channels(entity.size(1), relation.size(1), combine)
        encoder = cls(width, out_channels, combine)
        encoder.set_embeddings(entity, relation)
        return encoder

    def reset_parameters(self) -> None:
        self.lin.reset_parameters()

    def set_embeddings(self, entity: Tensor, relation: Tensor) -> None:
        r"""Set the frozen embedding tables (detached, in the projection's dtype and
        device).

        Raises:
            ValueError: their widths do not combine into :attr:`in_channels`.
        """
        width = fact_feature_channels(entity.size(1), relation.size(1), self.combine)
        if width != self.in_channels:
            raise ValueError(
                f"embeddings of widths {entity.size(1)} (entities) and {relation.size(1)} "
                f"(relations) give {self.combine} features of width {width}, this encoder "
                f"takes {self.in_channels}"
            )
        weight = self.lin.weight
        self.entity = entity.detach().to(weight.device, weight.dtype)
        self.relation = relation.detach().to(weight.device, weight.dtype)

    def features(self, head: Tensor, relation: Tensor, tail: Tensor) -> Tensor:
        r"""The raw (combined, not projected) features ``[N, in_channels]``.

        Raises:
            ValueError: no embeddings set.
        """
        if self.entity.numel() == 0 or self.relation.numel() == 0:
            raise ValueError(
                "KGFactEncoder has no embeddings: call set_embeddings(entity, relation) "
                "(hetgraph.kg.load_kge_embeddings reads them from a knowledge-graph directory)"
            )
        parts = (self.entity[head], self.relation[relation], self.entity[tail])
        if self.combine == "sum":
            return parts[0] + parts[1] + parts[2]
        return torch.cat(parts, dim=-1)

    def forward(self, head: Tensor, relation: Tensor, tail: Tensor) -> Tensor:
        return self.lin(self.features(head, relation, tail))

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"combine={self.combine!r}, entities={self.entity.size(0)}, "
            f"relations={self.relation.size(0)})"
        )
