"""How a FAISS index over the datastore keys is built and searched: :class:`IndexConfig`.

Read by the in-memory index (:mod:`hetgraph.index.faiss_index`), its training
(:mod:`hetgraph.index.training`) and the on-disk build (:mod:`hetgraph.index.ondisk`),
none of which it depends on.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Literal

from hetgraph.configuration import ConfigError, JSONConfigMixin

__all__ = ["IndexConfig"]


@dataclass
class IndexConfig(JSONConfigMixin):
    """How a FAISS index over the keys is built and searched.

    Attributes:
        factory: ``"auto"`` (:func:`~hetgraph.index.auto_factory`) or a factory string
            of the forms hetgraph builds (:data:`hetgraph.index.training.SUPPORTED_FACTORIES`:
            ``"Flat"``, ``"IVF4096,PQ64"``, ``"OPQ64,IVF4096,PQ64"``, ``"HNSW32"``, …),
            checked with the keys' width and count before FAISS sees it
            (:func:`~hetgraph.index.training.parse_factory`,
            :func:`~hetgraph.index.training.check_factory`).
            ``"IVF{nlist},SQfp16"`` is lossless here: its lists hold the float16 keys
            exactly (not their residuals), so it finds what ``"IVF{nlist},Flat"`` finds, in
            half the memory and about twice as fast.
        metric: ``"l2"`` (distances are squared L2) or ``"ip"`` (distances are negated
            inner products); smaller is closer in both.
        train_size: vectors sampled (seeded) to train IVF / PQ / OPQ; None = automatic.
        add_chunk_size: vectors cast fp16 -> fp32 and added per chunk.
        nprobe: IVF lists visited per query.
        ef_search: HNSW search breadth.
        seed: sampling seed (and FAISS k-means seed).
        num_threads: FAISS OpenMP threads, 1 to the CPU count; None =
            ``torch.get_num_threads()``. A larger count recorded in ``index.json`` is clamped
            with a warning when the index is loaded.
        on_disk: inverted lists on disk (:mod:`hetgraph.index.ondisk`): True, False, or None
            = decided by size when ``factory`` is ``auto``
            (:func:`hetgraph.index.ondisk.choose_layout`).
        shard_rows: rows per block file of an on-disk build (the unit of work of a rank, of
            resuming, and of the memory the build holds).
        rerank: ``k'``: when > ``k``, search ``k'`` candidates and re-rank them exactly
            against the datastore's keys (:mod:`hetgraph.index.rerank`); 0 = off.
        gpu: ``"auto"``: GPU FAISS when installed and the queries are CUDA tensors
            (:mod:`hetgraph.index.gpu`); ``"never"``: always the CPU.
        prefetch_threads: threads that page an on-disk index's probed lists in ahead of a
            search (FAISS's ``OnDiskInvertedLists.prefetch_nthread``, whose own default is
            32); None = as many as the search threads, since more only compete with the
            search for the cores; 0 = no prefetching.
    """

    factory: str = "auto"
    metric: Literal["l2", "ip"] = "l2"
    train_size: int | None = None
    add_chunk_size: int = 65536
    nprobe: int = 32
    ef_search: int = 128
    seed: int = 0
    num_threads: int | None = None
    on_disk: bool | None = None
    shard_rows: int = 1_000_000
    rerank: int = 0
    gpu: Literal["auto", "never"] = "auto"
    prefetch_threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # field types, as for every config
        if self.metric not in ("l2", "ip"):
            raise ValueError(f"metric must be 'l2' or 'ip', got {self.metric!r}")
        if self.add_chunk_size < 1:
            raise ValueError(f"add_chunk_size must be >= 1, got {self.add_chunk_size}")
        if self.on_disk not in (None, True, False):
            raise ConfigError(
                f"on_disk must be true, false or null (decide by size), got {self.on_disk!r}",
                "on_disk",
            )
        for name, low in (("shard_rows", 1), ("rerank", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}", name)
        if self.prefetch_threads is not None and (
            isinstance(self.prefetch_threads, bool) or self.prefetch_threads < 0
        ):
            raise ConfigError(
                f"prefetch_threads must be an integer >= 0 or null (as many as "
                f"num_threads), got {self.prefetch_threads!r}",
                "prefetch_threads",
            )
        if self.gpu not in ("auto", "never"):
            raise ConfigError(f"gpu must be 'auto' or 'never', got {self.gpu!r}", "gpu")
        cpus = os.cpu_count() or 1
        if self.num_threads is not None and not 1 <= self.num_threads <= cpus:
            # Each is an OS thread: FAISS started with 100,000 crashes the interpreter.
            raise ConfigError(
                f"num_threads is {self.num_threads}; give 1 to {cpus} (the CPUs "
                "of this machine) or null (torch's thread count)",
                "num_threads",
            )
