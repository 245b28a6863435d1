"""FAISS indexes over datastore keys: exact (``Flat``), IVF-PQ, OPQ+IVF-PQ, HNSW; in memory or
with on-disk inverted lists (:mod:`hetgraph.index.ondisk`), optionally re-ranked exactly
(:mod:`hetgraph.index.rerank`) and searched on GPU FAISS (:mod:`hetgraph.index.gpu`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from hetgraph.index.config import IndexConfig
from hetgraph.index.files import (
    INDEX_FORMAT_VERSION,
    DatastoreIndexError,
    is_on_disk,
    read_faiss_index,
    read_index_metadata,
    rebuild_index_hint,
    write_index_files,
)
from hetgraph.index.gpu import to_all_gpus, wants_gpu
from hetgraph.index.rerank import (
    exact_top_k,
    exhaustive_vectors,
    order_ties,
    rerank,
    takes_blas_path,
)
from hetgraph.index.training import (
    as_float32,
    auto_factory,
    finite_rows,
    key_array,
    new_index,
    training_sample,
)

logger = logging.getLogger(__name__)
# IndexConfig lives in hetgraph.index.config (training and the on-disk build read it too).
__all__ = ["DatastoreIndex", "IndexConfig", "loadable_config", "set_faiss_threads"]


def set_faiss_threads(num_threads: int | None) -> int:
    """Set FAISS's OpenMP threads deliberately (None = torch's thread count), at most the
    CPU count (more is clamped with a warning: thousands of threads crash the interpreter);
    return it."""
    n = int(num_threads) if num_threads else max(1, torch.get_num_threads())
    cpus = os.cpu_count() or 1
    if n > cpus:
        logger.warning("%d FAISS threads asked for; using the %d CPUs of this machine", n, cpus)
        n = cpus
    faiss.omp_set_num_threads(n)
    return n


def loadable_config(recorded: dict[str, Any], directory: Path) -> IndexConfig:
    """The :class:`IndexConfig` recorded in ``directory``'s ``index.json``, its
    ``num_threads`` clamped to this machine's CPUs with a warning: an index built elsewhere
    (or recorded by an older hetgraph, by hand) stays loadable.

    Raises:
        DatastoreIndexError: a recorded setting is invalid (``index.json`` is damaged).
    """
    cpus = os.cpu_count() or 1
    threads = recorded.get("num_threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > cpus:
        logger.warning(
            "%s/index.json records num_threads %d; using the %d CPUs of this machine",
            directory,
            threads,
            cpus,
        )
        recorded = {**recorded, "num_threads": cpus}
    try:
        return IndexConfig.from_dict(recorded)
    except ValueError as error:
        raise DatastoreIndexError(
            f"{directory}/index.json is damaged ({error}); {rebuild_index_hint(directory)}"
        ) from None


class DatastoreIndex:
    """A FAISS index over datastore keys with its metadata (``index.faiss`` + ``index.json``).

    Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load`,
    query with :meth:`search`.
    """

    def __init__(
        self,
        index: faiss.Index,
        config: IndexConfig,
        factory: str,
        datastore_fingerprint: str | None = None,
        *,
        keys: Any = None,
        on_disk: bool = False,
        directory: Path | None = None,
    ):
        self.index = index
        self.config = config
        self.factory = factory
        self.datastore_fingerprint = datastore_fingerprint
        #: ``[N, d]`` keys the index was built over (the datastore's fp16 memmap), used by
        #: exact re-ranking; None when not known (then ``config.rerank`` is refused).
        self.keys = keys
        #: Whether the inverted lists are memory-mapped from ``directory/index.ivfdata``.
        self.on_disk = on_disk
        self.directory = directory
        self._gpu_index: faiss.Index | None = None
        self._apply_search_params()

    # -- properties -------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> str:
        return self.config.metric

    def __repr__(self) -> str:
        return (
            f"DatastoreIndex(factory={self.factory!r}, metric={self.metric!r}, "
            f"ntotal={self.ntotal}, dim={self.dim})"
        )

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        keys: Any,
        config: IndexConfig | None = None,
        *,
        datastore_fingerprint: str | None = None,
        show_progress: bool = True,
    ) -> DatastoreIndex:
        """Train (on a seeded random sample) and fill an index with ``keys``.

        Args:
            keys: ``[N, d]`` array (typically the datastore's fp16 memmap) or a
                :class:`~hetgraph.datastore.Datastore` (its keys and fingerprint are used).
            config: :class:`IndexConfig`.
            datastore_fingerprint: recorded in ``index.json``; taken from a Datastore.
            show_progress: tqdm bar over the add chunks.
        """
        config = config or IndexConfig()
        keys, fingerprint, source = key_array(keys)
        datastore_fingerprint = datastore_fingerprint or fingerprint
        n, d = int(keys.shape[0]), int(keys.shape[1])
        set_faiss_threads(config.num_threads)
        factory = auto_factory(n, d) if config.factory == "auto" else config.factory
        index = new_index(factory, d, config.metric, config.seed)
        sample = training_sample(index, n, config)
        if sample is not None:
            index.train(finite_rows(as_float32(keys[sample]), sample, source))
        chunk = config.add_chunk_size
        with tqdm(
            total=n,
            desc=f"index {factory}",
            unit="vec",
            disable=not show_progress,
            dynamic_ncols=True,
        ) as bar:
            for start in range(0, n, chunk):
                block = finite_rows(
                    as_float32(keys[start : start + chunk]),
                    np.arange(start, start + min(chunk, n - start)),
                    source,
                )
                index.add(block)
                bar.update(len(block))
        return cls(index, config, factory, datastore_fingerprint, keys=keys)

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` and ``index.json`` (with the file's size and checksums) into
        ``directory``, holding its lock (:func:`hetgraph.locking.directory_lock`).

        Raises:
            hetgraph.locking.LockError: another process is writing ``directory``.
            hetgraph.storage.StorageError: the disk is full; the old ``index.json`` is gone then,
                so the unfinished index is never loaded.
        """
        directory = Path(directory)
        if self.on_disk:
            if self.directory is not None and directory.resolve() == self.directory.resolve():
                return directory  # already saved where it was built
            raise DatastoreIndexError(
                f"an on-disk index lives in {self.directory}; it is not copied to {directory}: "
                "build it there (build_ondisk_index or hetgraph index build --on-disk)"
            )
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "factory": self.factory,
            "metric": self.metric,
            "num_vectors": self.ntotal,
            "dim": self.dim,
            "datastore_fingerprint": self.datastore_fingerprint,
            "config": self.config.to_dict(),
        }
        write_index_files(directory, self.index, meta)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        datastore: Any | None = None,
        *,
        config: IndexConfig | None = None,
    ) -> DatastoreIndex:
        """Read an index saved by :meth:`save`, checking it against ``datastore`` if given.

        Loading checks ``index.json``'s checksum and ``index.faiss``'s recorded size and
        sampled checksum, and refuses a file whose vectors, dimension or metric disagree with
        ``index.json``; :func:`hetgraph.verify.verify` compares the whole-file checksum too.

        Args:
            directory: where :meth:`save` wrote it.
            datastore: a :class:`~hetgraph.datastore.Datastore`; its size, width and
                fingerprint must match the index's.
            config: override the stored search-time settings (nprobe, ef_search, threads).

        Raises:
            DatastoreIndexError: missing or damaged files, or a datastore mismatch.
        """
        directory = Path(directory)
        meta = read_index_metadata(directory)
        if datastore is not None:
            problems = []
            if meta["num_vectors"] != len(datastore):
                problems.append(
                    f"{meta['num_vectors']} vectors vs {len(datastore)} datastore entries"
                )
            if meta["dim"] != datastore.dim:
                problems.append(f"dimension {meta['dim']} vs {datastore.dim}")
            fp = getattr(datastore, "fingerprint", None)
            if meta.get("datastore_fingerprint") and fp and meta["datastore_fingerprint"] != fp:
                problems.append(f"datastore fingerprint {meta['datastore_fingerprint']} vs {fp}")
            if problems:
                raise DatastoreIndexError(
                    f"index {directory} was built for another datastore ("
                    + "; ".join(problems)
                    + f"); {rebuild_index_hint(directory)}"
                )
        stored = loadable_config(meta["config"], directory)
        index = read_faiss_index(directory, meta)
        return cls(
            index,
            config or stored,
            meta["factory"],
            meta.get("datastore_fingerprint"),
            keys=getattr(datastore, "keys", None),
            on_disk=is_on_disk(meta),
            directory=directory,
        )

    # -- searching ----------------------------------------------------------------------------
    def _apply_search_params(self) -> None:
        threads = set_faiss_threads(self.config.num_threads)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = min(int(self.config.nprobe), int(ivf.nlist))
            lists = faiss.downcast_InvertedLists(ivf.invlists)
            if isinstance(lists, faiss.OnDiskInvertedLists):
                prefetch = self.config.prefetch_threads
                lists.prefetch_nthread = threads if prefetch is None else int(prefetch)
        base = self.index
        if isinstance(base, faiss.IndexPreTransform):
            base = faiss.downcast_index(base.index)
        if hasattr(base, "hnsw"):
            base.hnsw.efSearch = int(self.config.ef_search)

    def _faiss_index(self, queries: Any) -> faiss.Index:
        """The FAISS index that searches ``queries``: a GPU copy for CUDA queries when GPU
        FAISS is installed (:mod:`hetgraph.index.gpu`), else the CPU index."""
        if not wants_gpu(queries, self.config.gpu, self.on_disk):
            return self.index
        if self._gpu_index is None:
            self._gpu_index = to_all_gpus(self.index)
        return self._gpu_index

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored keys of each query.

        Args:
            queries: ``[Q, d]`` numpy array or torch tensor of any float dtype, any device.
            k: neighbours per query, ``1 <= k <= ntotal``.

        Returns:
            ``(distances float32 [Q, k], ids int64 [Q, k])``, nearest first. Distances are
            squared L2 (metric ``"l2"``) or negated inner products (``"ip"``): smaller is
            closer. An approximate index may return ``id = -1`` / ``distance = inf`` when it
            finds fewer than ``k`` candidates.

        Raises:
            ValueError: bad ``k`` or query shape.
        """
        k = int(k)
        if k < 1:
            raise DatastoreIndexError(f"k must be >= 1, got {k}")
        if k > self.ntotal:
            raise DatastoreIndexError(
                f"k={k} exceeds the {self.ntotal} vectors in the index; choose a smaller k"
            )
        q = as_float32(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DatastoreIndexError(
                f"queries must have shape [Q, {self.dim}], got {tuple(q.shape)}"
            )
        candidates = min(self.ntotal, max(k, int(self.config.rerank)))
        if candidates > k and self.keys is None:
            raise DatastoreIndexError(
                f"IndexConfig.rerank={self.config.rerank} needs the datastore's keys: open the "
                "index with DatastoreIndex.load(directory, datastore) or set index.keys"
            )
        index = self._faiss_index(queries)
        vectors = exhaustive_vectors(index) if index is self.index else None
        if vectors is not None and candidates == k and takes_blas_path(len(q), self.dim):
            return exact_top_k(index, vectors, q, k, self.metric)
        distances, ids = index.search(q, candidates)
        if candidates > k:
            metric_distances, ids = rerank(self.keys, q, ids.astype(np.int64), k, self.metric)
            return order_ties(metric_distances, ids)
        distances = distances.astype(np.float32, copy=False)
        ids = ids.astype(np.int64, copy=False)
        missing = ids < 0
        if self.metric == "ip":
            distances = -distances
        if missing.any():
            distances = np.where(missing, np.float32(np.inf), distances)
        return order_ties(distances, ids)
