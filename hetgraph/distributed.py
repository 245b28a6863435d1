r"""torch.distributed glue: the process group torchrun describes, and the collectives used.

hetgraph never launches processes itself. Under ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) :func:`init_distributed`
joins the default process group — NCCL when the process owns a CUDA device, Gloo otherwise —
and returns a :class:`DistributedContext`; without those variables it returns the
single-process context, for which every collective is a no-op, so library code calls the
same methods either way. Library functions that take ``distributed=None`` use
:func:`current_context`: the initialised default process group, else one process.

What runs distributed, and how:

- ``hetgraph datastore build``: the deterministic batch schedule is split into contiguous
  shares (:func:`shard_range`); every rank writes its rows straight into the shared,
  preallocated memmaps (see :mod:`hetgraph.datastore.build`), keeps its own progress record,
  and rank 0 writes the completed metadata once every rank has finished. The files are
  byte-identical to a one-process build.
- ``hetgraph eval`` (and the valid evaluations during training): the strided windows are
  split across ranks and the per-token results gathered
  (:meth:`DistributedContext.all_gather_rows`), so every number — λ and T tuned on valid
  included — is the one-process number.
- ``hetgraph train``: ``DistributedDataParallel`` over the adapter parameters only; each rank
  takes its share of every seeded global batch (``training.batch_size`` is the *global*
  batch); rank 0 writes checkpoints, which resume with any number of processes.

Running under torchrun
----------------------

Every rank must see the same files (datastore, corpus, output directories): one machine, or
a shared file system across nodes. Commands (``$ARGS`` are the usual options, e.g.
``--model M --corpus C --datastore runs/ds``)::

    # one GPU (or CPU): plain commands, no torchrun needed
    hetgraph datastore build --model M --corpus C --out runs/ds

    # 8 GPUs of one machine (NCCL); on CPUs torchrun uses Gloo the same way
    torchrun --nproc_per_node=8 -m hetgraph datastore build --model M --corpus C --out runs/ds
    torchrun --nproc_per_node=8 -m hetgraph train $ARGS --out runs/adapter
    torchrun --nproc_per_node=8 -m hetgraph eval $ARGS --adapter runs/adapter --json runs/eval.json

    # several nodes (here 2 × 8 GPUs): the same command on every node, its --node_rank differing
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \
        --rdzv-backend=c10d --rdzv-endpoint=node0.example:29500 \
        -m hetgraph train $ARGS --out runs/adapter
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 \
        --rdzv-backend=c10d --rdzv-endpoint=node0.example:29500 \
        -m hetgraph train $ARGS --out runs/adapter

Only rank 0 prints results and writes reports, checkpoints and metadata. When one rank fails,
torchrun stops the others; run the same command again (with any ``--nproc_per_node``) to
resume. A datastore build across nodes needs a file system on which memory-mapped writes of
different nodes to one file are coherent (a local disk, Lustre, GPFS); otherwise build on one
node with many processes.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hetgraph.errors import HetgraphError

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedContext",
    "DistributedEnvironmentError",
    "DistributedError",
    "current_context",
    "init_distributed",
    "shard_range",
]

T = TypeVar("T")

#: dtypes :meth:`DistributedContext.all_gather_rows` carries (index = code sent between ranks).
_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)
_MAX_DIMS = 4


class DistributedError(HetgraphError):
    """Another rank of a ``torchrun`` job failed with an expected error (its message follows)."""


class DistributedEnvironmentError(HetgraphError):
    """The ``torchrun`` environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) is half set or
    not integers."""


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

    @property
    def device(self) -> torch.device:
        """Where collective tensors must live: this rank's GPU under NCCL, else the CPU."""
        if self.is_distributed and dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def share(self, n: int) -> range:
        """This rank's contiguous share of ``n`` ordered items (:func:`shard_range`)."""
        return shard_range(n, self.rank, self.world_size)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (float64 sums stay exact) and return it."""
        if self.is_distributed:
            moved = tensor.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def sum_float(self, value: float) -> float:
        """``value`` summed over ranks, in float64."""
        if not self.is_distributed:
            return value
        return float(self.all_reduce_sum(torch.tensor([value], dtype=torch.float64))[0])

    def broadcast_object(self, value: object) -> object:
        """Rank 0's ``value`` on every rank (JSON-like values only; nothing is unpickled
        from files — the object travels between processes of one job)."""
        if not self.is_distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 only, its result (JSON-like) broadcast to every rank.

        An expected error on rank 0 (:class:`~hetgraph.errors.HetgraphError`) is raised there
        as it is and on every other rank as a :class:`DistributedError` with its message, so
        no rank waits forever for a rank that failed. One process: ``fn()``.
        """
        if not self.is_distributed:
            return fn()
        outcome: dict[str, Any] = {}
        error: HetgraphError | None = None
        if self.is_main:
            try:
                outcome["value"] = fn()
            except HetgraphError as failure:
                error, outcome["error"] = failure, str(failure)
        outcome = self.broadcast_object(outcome)  # type: ignore[assignment]
        if error is not None:
            raise error
        if "error" in outcome:
            raise DistributedError(f"rank 0 failed: {outcome['error']}")
        return outcome["value"]

    def all_gather_rows(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The ``[n_r, ...]`` tensors of all ranks concatenated along dim 0 in rank order.

        Ranks may hold different numbers of rows, and a rank with nothing passes ``None``
        (it still receives the others' rows; ``None`` when no rank has any). Values travel
        as raw bytes, so every dtype is gathered exactly. Returns a CPU tensor.
        """
        if not self.is_distributed:
            return tensor
        header = torch.zeros(3 + _MAX_DIMS, dtype=torch.int64)
        if tensor is not None:
            if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
                raise ValueError(
                    f"all_gather_rows: unsupported tensor {tensor.dtype} {tuple(tensor.shape)}"
                )
            header[:3] = torch.tensor([1, _DTYPES.index(tensor.dtype), tensor.dim()])
            header[3 : 3 + tensor.dim()] = torch.tensor(tensor.shape)
        headers = self._gather_equal(header)
        present = [h for h in headers if h[0] == 1]
        if not present:
            return None
        code, ndim = int(present[0][1]), int(present[0][2])
        dtype, trailing = _DTYPES[code], tuple(int(d) for d in present[0][4 : 3 + ndim])
        rows = [int(h[3]) if h[0] == 1 else 0 for h in headers]
        local = (
            (tensor if tensor is not None else torch.empty((0, *trailing), dtype=dtype))
            .detach()
            .cpu()
            .contiguous()
        )
        row_bytes = local.element_size() * max(1, int(torch.tensor(trailing).prod()))
        flat = local.reshape(-1).view(torch.uint8).reshape(rows[self.rank], row_bytes)
        padded = torch.zeros(max(rows), row_bytes, dtype=torch.uint8)
        padded[: rows[self.rank]] = flat
        parts = [p[:n] for p, n in zip(self._gather_equal(padded), rows, strict=True)]
        joined = torch.cat(parts).reshape(-1).view(dtype)
        return joined.reshape(sum(rows), *trailing)

    def _gather_equal(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        moved = tensor.to(self.device)
        out = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(out, moved)
        return [t.cpu() for t in out]


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous share ``[start, stop)`` of ``n`` ordered items that ``rank`` owns.

    Shares differ in size by at most one and concatenate, in rank order, to ``range(n)``.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def current_context() -> DistributedContext:
    """The context of the default process group when one is initialised (by
    :func:`init_distributed` or by the caller), else the single-process context."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0)
    )


def processes_on_this_node() -> int:
    """How many processes of this job share this machine: ``LOCAL_WORLD_SIZE`` under
    ``torchrun``, else 1.

    Raises:
        DistributedEnvironmentError: ``LOCAL_WORLD_SIZE`` is set but not a positive integer.
    """
    processes = _env_int("LOCAL_WORLD_SIZE", 1)
    if processes < 1:
        raise DistributedEnvironmentError(
            f"environment variable LOCAL_WORLD_SIZE is {processes} but must be at least 1; "
            "launch with torchrun, or unset it to run one process"
        )
    return processes


def require_single_process(command: str) -> None:
    """Refuse to run ``command`` as one rank of a ``torchrun`` job (``WORLD_SIZE`` > 1).

    Commands with no distributed form would otherwise run once per rank, every rank writing
    the same files.

    Raises:
        DistributedEnvironmentError: ``WORLD_SIZE`` > 1.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size > 1:
        raise DistributedEnvironmentError(
            f"hetgraph {command} runs in one process but WORLD_SIZE={world_size} (torchrun): "
            f"run it without torchrun, or use the distributed commands (datastore build, "
            f"index build, train, eval) under torchrun"
        )


def init_distributed(backend: str | None = None) -> DistributedContext:
    """Join the process group ``torchrun`` describes, or return the single-process context.

    Without ``WORLD_SIZE`` > 1 in the environment nothing is initialised. The group is
    destroyed when the process exits.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; by default NCCL when CUDA is available, else Gloo.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext()
    rank, local_rank = _env_int("RANK", None), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size or local_rank < 0:
        raise DistributedEnvironmentError(
            f"RANK={rank} / LOCAL_RANK={local_rank} are outside WORLD_SIZE={world_size}; "
            "launch with torchrun, or unset WORLD_SIZE to run one process"
        )
    if not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistributedEnvironmentError(
                f"WORLD_SIZE={world_size} asks for a torchrun job but {' and '.join(missing)} "
                "are unset; launch with torchrun, or unset WORLD_SIZE to run one process"
            )
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if chosen == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=chosen)
        atexit.register(_destroy)
        logger.info("joined a %s process group: rank %d of %d", chosen, rank, world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def _env_int(name: str, default: int | None) -> int:
    """The integer environment variable ``name`` (``default`` when unset, required if None)."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        shown = "unset" if text is None else f"{text!r}"
        raise DistributedEnvironmentError(
            f"environment variable {name} is {shown} but must be an integer (WORLD_SIZE="
            f"{os.environ.get('WORLD_SIZE')!r} asks for a torchrun job); launch with torchrun, "
            "or unset WORLD_SIZE to run one process"
        ) from None


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
