"""Data-parallel training under ``torchrun``: DDP over the adapter parameters only.

The frozen base model is never wrapped (nor broadcast): :class:`DataParallelLoss` wraps a
module holding just the trainable parameters, whose forward computes this rank's loss, in
``torch.nn.parallel.DistributedDataParallel``. ``training.batch_size`` is the *global* batch:
every rank draws the same seeded global batch and keeps its contiguous share
(:func:`~hetgraph.distributed.shard_range`). Each rank's mean loss is weighted by
``world_size · share / batch_size`` so that DDP's gradient average is the gradient of the
global batch's mean loss, exactly as in one process (shares may differ by one sequence).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from hetgraph.distributed import DistributedContext


class _TrainableParameters(nn.Module):
    """The trainable parameters of a model, with ``forward(draw)`` = ``compute(draw)``."""

    def __init__(self, params: list[nn.Parameter], compute: Callable[[int], Tensor]) -> None:
        super().__init__()
        self.trainable = nn.ParameterList(params)
        self.compute = compute

    def forward(self, draw: int) -> Tensor:
        return self.compute(draw)


class DataParallelLoss:
    """This rank's weighted loss of every micro-batch; gradients averaged over ranks by DDP.

    In one process nothing is wrapped: :meth:`loss` is ``compute(draw)`` itself.

    Args:
        params: the trainable parameters (the adapters and gates), in the same order on
            every rank.
        compute: ``draw -> mean loss of this rank's share`` of micro-batch ``draw``.
        batch_size: the global batch (sequences per micro-batch over all ranks).
        ctx: the job.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        compute: Callable[[int], Tensor],
        batch_size: int,
        ctx: DistributedContext,
    ) -> None:
        self.ctx, self.compute = ctx, compute
        self.share = ctx.share(batch_size)
        self.weight = ctx.world_size * len(self.share) / batch_size
        self.ddp: DistributedDataParallel | None = None
        if ctx.is_distributed:
            on_gpu = params[0].device.type == "cuda"
            # DDP broadcasts rank 0's parameters here: every rank starts from the same adapter.
            self.ddp = DistributedDataParallel(
                _TrainableParameters(params, compute),
                device_ids=[params[0].device.index] if on_gpu else None,
                find_unused_parameters=True,
            )

    def sync(self, last_micro_batch: bool) -> AbstractContextManager[object]:
        """Reduce gradients only after the last micro-batch of an optimiser step."""
        if self.ddp is None or last_micro_batch:
            return nullcontext()
        return self.ddp.no_sync()

    def loss(self, draw: int) -> Tensor:
        """The loss to back-propagate for micro-batch ``draw`` (forward and backward must both
        run inside :meth:`sync`)."""
        if self.ddp is None:
            return self.compute(draw)
        return self.ddp(draw) * self.weight

    def global_value(self, loss: Tensor) -> float:
        """The global batch's mean loss from this rank's :meth:`loss` (a collective)."""
        value = float(loss.detach())
        if not self.ctx.is_distributed:
            return value
        return self.ctx.sum_float(value) / self.ctx.world_size
