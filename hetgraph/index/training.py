"""Creating, training and filling an index: the keys of a datastore or an array, a seeded
FAISS index from a factory string, the seeded training sample, the float32 conversion of key
blocks and the refusal of non-finite keys, shared by the in-memory build
(:meth:`~hetgraph.index.DatastoreIndex.build`) and the on-disk one
(:func:`~hetgraph.index.build_ondisk_index`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch

from hetgraph.index.files import FAISS_METRICS, DatastoreIndexError

if TYPE_CHECKING:
    from hetgraph.index.faiss_index import IndexConfig


def key_array(keys: Any) -> tuple[Any, str | None, str]:
    """``(array, fingerprint, source)`` of ``keys``: a :class:`~hetgraph.datastore.Datastore`
    (its ``[N, d]`` keys memmap and fingerprint) or an ``[N, d]`` array (no fingerprint);
    ``source`` names them in error messages.

    Raises:
        DatastoreIndexError: the keys are not a non-empty ``[N, d]`` array.
    """
    fingerprint, source = None, "the keys"
    if hasattr(keys, "keys") and hasattr(keys, "fingerprint") and not isinstance(keys, np.ndarray):
        fingerprint, source = keys.fingerprint, f"the keys of datastore {getattr(keys, 'path', '')}"
        keys = keys.keys
    shape = tuple(getattr(keys, "shape", ()))
    if len(shape) != 2 or shape[0] < 1:
        raise DatastoreIndexError(f"keys must be a non-empty [N, d] array, got shape {shape}")
    return keys, fingerprint, source


def new_index(factory: str, d: int, metric: str, seed: int) -> faiss.Index:
    """An empty FAISS index ``factory`` for width ``d`` and ``metric`` (``"l2"``/``"ip"``),
    its IVF k-means seeded with ``seed``.

    Raises:
        DatastoreIndexError: FAISS cannot build ``factory`` (the message says why).
    """
    try:
        index = faiss.index_factory(d, factory, FAISS_METRICS[metric])
    except RuntimeError as e:
        raise DatastoreIndexError(f"FAISS cannot build index {factory!r} for d={d} "
                                  f"({str(e).splitlines()[-1]}); choose another factory "
                                  "(--factory)") from None
    seed_clustering(index, seed)
    _encode_keys_not_residuals(index)
    return index


def _encode_keys_not_residuals(index: faiss.Index) -> None:
    """fp16 scalar-quantizer lists store the keys themselves, not their residuals from the
    centroid (FAISS's default): the datastore's keys are float16, so these codes hold them
    exactly and ``IVF…,SQfp16`` finds the same neighbours at the same distances as
    ``IVF…,Flat`` in half the memory, its scan about twice as fast; residual codes would
    round them again."""
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:  # not an IVF index
        return
    if (isinstance(ivf, faiss.IndexIVFScalarQuantizer)
            and ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16):
        ivf.by_residual = False


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
