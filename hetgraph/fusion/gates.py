r"""The retrieval-aware gate of a gated-residual site (``FusionConfig(gate="retrieval")``).

kNN-LM falls back to the base model by tuning λ to 0 where retrieval has nothing to
offer; a graph adapter fused with a fixed gate :math:`\mathbf{g}` cannot, so it hurts
where the neighbours are useless. With the retrieval gate the residual of position
:math:`t` at a site is

.. math::
    \mathbf{h}_t + \mathbf{g} \odot \sigma(\mathbf{a} \cdot \mathbf{s}_t + b)
    \odot \mathrm{Adapter}(\mathcal{G})_t

where :math:`\mathbf{s}_t` (:func:`retrieval_statistics`) describes how close the
neighbours retrieved for :math:`t` are, and :math:`\mathbf{a}` (``weight``) and :math:`b`
(``bias``) are learned per site. :math:`\mathbf{g}` starts at zero, so an untrained model is
exactly the base model; :math:`\mathbf{a} = 0, b = 0` start the factor at 0.5.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Names of the statistics in :func:`retrieval_statistics`, in order.
STATISTICS = ("nearest_distance", "mean_distance", "found_fraction")


def _signed_log(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def retrieval_statistics(distances: Tensor, neighbour_ids: Tensor, dim: int) -> Tensor:
    r"""Per-position statistics of a retrieval, ``[..., 3]`` float32:

    - the distance of the nearest neighbour and the mean distance of the neighbours found,
      each divided by the key width ``dim`` (squared L2 per channel) and compressed with
      :math:`\mathrm{sign}(x) \log(1 + |x|)` (so inner-product scores work too); 0 where
      no neighbour was found;
    - the fraction of the ``k`` neighbours that were found, i.e. that survived the leakage
      filter (``-1`` ids are missing ones).

    Args:
        distances: ``[..., k]`` FAISS distances (``inf`` where missing).
        neighbour_ids: ``[..., k]`` datastore rows (``-1`` where missing).
        dim: the width of the datastore keys.
    """
    found = neighbour_ids >= 0
    count = found.sum(-1)
    scaled = torch.where(found, distances.float(), torch.zeros((), device=distances.device)) / dim
    mean = scaled.sum(-1) / count.clamp(min=1)
    # FAISS returns neighbours nearest first and the leakage filter keeps that order,
    # but take the extreme explicitly so the statistic does not rely on it.
    nearest = torch.where(found, scaled, torch.full_like(scaled, float("inf"))).amin(-1)
    nearest = torch.where(count > 0, nearest, torch.zeros_like(nearest))
    fraction = count.float() / neighbour_ids.shape[-1]
    return torch.stack([_signed_log(nearest), _signed_log(mean), fraction], dim=-1)


class RetrievalGate(nn.Module):
    r""":math:`\sigma(\mathbf{a} \cdot \mathbf{s} + b)`: one factor per position from its
    retrieval statistics ``s`` (``[..., 3]``); ``weight`` and ``bias`` start at zero."""

    def __init__(self, num_statistics: int = len(STATISTICS)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_statistics))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, statistics: Tensor | None) -> Tensor:
        """``[...]`` factors in (0, 1) for ``[..., num_statistics]`` statistics.

        Raises:
            ValueError: ``statistics`` is ``None`` (the caller did not compute them).
        """
        if statistics is None:
            raise ValueError(
                "gate='retrieval' needs the retrieval statistics of the positions "
                "(FusionEngine.gate_statistics)"
            )
        statistics = statistics.to(device=self.weight.device, dtype=self.weight.dtype)
        return torch.sigmoid(statistics @ self.weight + self.bias)

    def extra_repr(self) -> str:
        return f"statistics={list(STATISTICS[: self.weight.numel()])}"
