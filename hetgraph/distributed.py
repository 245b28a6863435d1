"""torch.distributed glue: the process group torchrun describes, and the collectives used.

hetgraph never launches processes itself. Under ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) :func:`init_distributed`
joins the default process group — NCCL when the process owns a CUDA device, Gloo otherwise —
and returns a :class:`DistributedContext`; without those variables it returns the
single-process context, for which every collective is a no-op, so library code calls the
same methods either way.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["DistributedContext", "init_distributed", "shard_range"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torch.distributed`` job.

    Args:
        rank: global rank of this process (0 in a single-process run).
        world_size: number of processes.
        local_rank: rank on this node (selects the CUDA device under NCCL).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared metadata, checkpoints and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (float64 sums stay exact) and return it."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (JSON-like values only; nothing is unpickled
        from files — the object travels between processes of one job)."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous share ``[start, stop)`` of ``n`` ordered items that ``rank`` owns.

    Shares differ in size by at most one and concatenate, in rank order, to ``range(n)``.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the process group ``torchrun`` describes, or return the single-process context.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; by default NCCL when CUDA is available, else Gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=chosen)
        logger.info("joined a %s process group: rank %d of %d", chosen, rank, world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)
