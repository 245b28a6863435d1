"""Training and filling an index: the seeded training sample, the float32 conversion of key
blocks and the refusal of non-finite keys, shared by the in-memory build
(:meth:`~hetgraph.index.DatastoreIndex.build`) and the on-disk one
(:func:`~hetgraph.index.build_ondisk_index`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from hetgraph.index.files import DatastoreIndexError

if TYPE_CHECKING:
    from hetgraph.index.faiss_index import IndexConfig


def as_float32(x: Any) -> np.ndarray:
    """``x`` (numpy array, memmap slice or tensor on any device) as a C-contiguous float32
    numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def training_sample(index: faiss.Index, n: int, config: IndexConfig) -> np.ndarray | None:
    """Sorted row numbers of the seeded training sample of ``n`` keys (None: no training
    needed): ``config.train_size`` rows, or 64 per IVF list and at least 65,536."""
    if index.is_trained:
        return None
    size = min(n, config.train_size or _default_train_size(index, n))
    return np.sort(np.random.default_rng(config.seed).choice(n, size=size, replace=False))


def finite_rows(block: np.ndarray, rows: np.ndarray, source: str) -> np.ndarray:
    """``block`` (the keys' rows ``rows``), refused if any value is not finite."""
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        row = int(rows[int(np.argmax(bad))])
        raise DatastoreIndexError(
            f"{source} hold non-finite values (NaN or inf; the first in row {row}); an index "
            "over them would return garbage neighbours. Rebuild the "
            "datastore (hetgraph datastore build … --overwrite) with a model that gives finite "
            "hidden states")
    return block


def _default_train_size(index: faiss.Index, n: int) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 1
    return max(64 * nlist, 65536)


def seed_clustering(index: faiss.Index, seed: int) -> None:
    """Seed the IVF k-means of ``index`` (training is then reproducible)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = int(seed)
