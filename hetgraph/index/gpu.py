r"""GPU FAISS, used automatically when it is installed and the queries are on CUDA.

With ``faiss-gpu`` (or ``faiss-gpu-cu12``) installed instead of ``faiss-cpu``,
:meth:`~hetgraph.index.DatastoreIndex.search` given CUDA query tensors copies the index once
to every visible GPU (``faiss.index_cpu_to_all_gpus`` with its default options: a whole
replica on each GPU, the queries split among them — not sharded, so the index must fit in
one GPU's memory) and searches there. Everything else stays on the CPU path, the default:
numpy queries or CPU tensors, ``faiss-cpu`` (``faiss.get_num_gpus() == 0``),
``IndexConfig.gpu = "never"``, and on-disk indexes (copying one to a GPU would load it whole).
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import torch

logger = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with ``faiss-cpu``."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def wants_gpu(queries: Any, setting: str, on_disk: bool) -> bool:
    """Whether a search with ``queries`` runs on GPU FAISS (see the module docstring)."""
    return (
        setting != "never"
        and not on_disk
        and isinstance(queries, torch.Tensor)
        and queries.is_cuda
        and gpu_count() > 0
    )


def to_all_gpus(index: faiss.Index) -> faiss.Index:
    """A copy of the CPU ``index`` on every visible GPU."""
    logger.info("copying the FAISS index to %d GPU(s)", gpu_count())
    return faiss.index_cpu_to_all_gpus(index)
