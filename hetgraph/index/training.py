"""Creating, training and filling an index: the factory ``auto`` picks, the keys of a
datastore or an array, a seeded FAISS index from a factory string, the seeded training
sample, the float32 conversion of key blocks and the refusal of non-finite keys, shared by
the in-memory build (:meth:`~hetgraph.index.DatastoreIndex.build`) and the on-disk one
(:func:`~hetgraph.index.build_ondisk_index`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from hetgraph.index.config import IndexConfig
from hetgraph.index.files import FAISS_METRICS, DatastoreIndexError
from hetgraph.limits import ResourceLimitError, check_memory

#: Below this many vectors ``auto`` picks exact search.
EXACT_SEARCH_LIMIT = 1_000_000


def auto_factory(n: int, d: int) -> str:
    """A sensible FAISS factory string for ``n`` vectors of width ``d``.

    Exact ``Flat`` below :data:`EXACT_SEARCH_LIMIT` vectors (exact, and fast enough);
    above it ``IVF{nlist},PQ{m}`` with ``nlist ≈ 4·sqrt(n)`` (rounded to a power of two)
    and ``m`` the largest divisor of ``d`` that is at most 64 (``m`` bytes per vector).
    Prefix ``OPQ{m},`` for better recall at higher training cost.
    """
    if n < EXACT_SEARCH_LIMIT:
        return "Flat"
    return ivf_pq_factory(n, d)


def ivf_pq_factory(n: int, d: int) -> str:
    """``IVF{nlist},PQ{m}`` for ``n`` vectors of width ``d``: ``nlist ≈ 4·sqrt(n)`` (a power
    of two, at least 16, at most ``n // 39`` so k-means has data) and ``m`` the largest divisor
    of ``d`` that is at most 64."""
    nlist = 2 ** max(4, round(math.log2(4 * math.sqrt(n))))
    while nlist > 16 and nlist * 39 > n:
        nlist //= 2
    m = max(k for k in range(1, min(64, d) + 1) if d % k == 0)
    return f"IVF{nlist},PQ{m}"


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
        DatastoreIndexError: ``factory`` is not one of :data:`SUPPORTED_FACTORIES` or does not
            fit width ``d`` (checked before FAISS sees it: some strings crash the
            interpreter), or FAISS cannot build it (the message says why).
    """
    parse_factory(factory, d)
    try:
        index = faiss.index_factory(d, factory, FAISS_METRICS[metric])
    except RuntimeError as e:
        raise DatastoreIndexError(
            f"FAISS cannot build index {factory!r} for d={d} "
            f"({str(e).splitlines()[-1]}); choose another factory "
            "(--factory)"
        ) from None
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
    if (
        isinstance(ivf, faiss.IndexIVFScalarQuantizer)
        and ivf.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    ):
        ivf.by_residual = False


def as_float32(x: Any) -> np.ndarray:
    """``x`` (numpy array, memmap slice or tensor on any device) as a C-contiguous float32
    numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def training_sample(index: faiss.Index, n: int, config: IndexConfig) -> np.ndarray | None:
    """Sorted row numbers of the seeded training sample of ``n`` keys (None: no training
    needed): ``config.train_size`` rows, or 64 per IVF list and at least 65,536.

    Raises:
        DatastoreIndexError: ``config.factory`` needs more training keys than the sample
            holds (IVF lists, PQ / OPQ centroids, PCA dimensions) or more memory than is
            available for ``n`` keys (HNSW), see :func:`check_factory_rows`.
    """
    if config.factory != "auto":  # auto factories fit their keys by construction
        train = min(n, config.train_size or _default_train_size(index, n))
        check_factory_rows(config.factory, int(index.d), n, train)
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
            "hidden states"
        )
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


#: The factory strings :func:`new_index` builds, as one line for messages.
SUPPORTED_FACTORIES = (
    "Flat, PQ{m}[x{bits}], SQ{4|6|8|fp16|bf16}, IVF{nlist},{Flat|PQ…|SQ…} or "
    "HNSW{M}[,{Flat|PQ…|SQ…}], optionally after OPQ{m}[_{d}], PCA{d} or PCAR{d} "
    "(e.g. Flat, IVF1024,SQfp16, OPQ64,IVF4096,PQ64, HNSW32)"
)
#: FAISS's HNSW needs at least 2 links per node: ``HNSW1`` crashes the interpreter in
#: ``add`` (SIGSEGV) and ``HNSW0`` aborts it (faiss 1.15).
HNSW_MIN_M = 2
#: Bytes FAISS's ``ArrayInvertedLists`` allocates per IVF list before anything is added (two
#: empty ``std::vector``), besides the list's float32 centroid.
_BYTES_PER_LIST = 48
#: Largest integer a factory may hold: FAISS parses them as C ``int``.
_INT_MAX = 2**31 - 1
#: Centroids of the product quantizer that ``OPQ`` trains (8 bits per sub-vector).
_OPQ_CENTROIDS = 256

_NUMBER = r"([0-9]{1,10})"
_TRANSFORM = re.compile(rf"OPQ{_NUMBER}(?:_{_NUMBER})?|PCA(R?){_NUMBER}")
_ENCODING = re.compile(rf"Flat|PQ{_NUMBER}(?:x{_NUMBER})?|SQ(4|6|8|fp16|bf16)")
_COARSE = re.compile(rf"(IVF|HNSW){_NUMBER}")


@dataclass(frozen=True)
class FactorySpec:
    """The parts of a supported factory string (see :func:`parse_factory`).

    Attributes:
        dim: the width the encoding sees (after ``OPQ…_d`` / ``PCA d``).
        opq: sub-quantizers of an ``OPQ`` rotation (0: none).
        pca: output width of a ``PCA`` / ``PCAR`` (0: none).
        nlist: IVF lists (0: not IVF).
        hnsw: HNSW links per node, ``M`` (0: not HNSW).
        pq: PQ sub-quantizers (0: no PQ) and ``pq_bits`` bits per code.
    """

    dim: int
    opq: int = 0
    pca: int = 0
    nlist: int = 0
    hnsw: int = 0
    pq: int = 0
    pq_bits: int = 8


def _factory_error(factory: str, d: int | None, reason: str, fix: str) -> DatastoreIndexError:
    where = f" for d={d}" if d is not None else ""
    return DatastoreIndexError(
        f"FAISS cannot build index {factory!r}{where} ({reason}); {fix} (--factory)"
    )


def parse_factory(factory: str, d: int) -> FactorySpec:
    """Check ``factory`` against the forms hetgraph builds (:data:`SUPPORTED_FACTORIES`) and
    width ``d`` before FAISS sees it: wrappers such as ``IDMap`` (FAISS refuses ``add`` on
    them), ``HNSW0`` / ``HNSW1`` (they crash the interpreter), a PQ whose ``m`` does not divide
    the width, a PCA wider than the keys.

    Args:
        factory: the factory string (not ``"auto"``).
        d: the keys' width.

    Returns:
        its parts, for :func:`check_factory_rows`.

    Raises:
        DatastoreIndexError: one line naming ``factory``, ``--factory`` and the fix.
    """
    parts = factory.split(",")
    opq = pca = 0
    dim = d
    if (transform := _TRANSFORM.fullmatch(parts[0])) is not None:
        parts = parts[1:]
        m, out, rotated, width = transform.groups()
        numbers = [int(x) for x in (m, out, width) if x is not None]
        if any(not 1 <= x <= _INT_MAX for x in numbers):
            raise _factory_error(
                factory,
                d,
                f"{transform.group(0)} needs numbers from 1 to {_INT_MAX}",
                "use e.g. OPQ64,IVF4096,PQ64",
            )
        if m is not None:
            opq, dim = int(m), int(out) if out is not None else d
            if dim % opq:
                raise _factory_error(
                    factory,
                    d,
                    f"OPQ{opq} splits the width {dim} into {opq} sub-vectors, which must divide it",
                    f"use an OPQ m that divides {dim}",
                )
        else:
            pca = dim = int(width)
            if pca > d:
                raise _factory_error(
                    factory,
                    d,
                    f"PCA{rotated}{pca} cannot output more dimensions than the keys' {d}",
                    f"use PCA{rotated}{d} or fewer",
                )
    coarse = _COARSE.fullmatch(parts[0]) if parts else None
    nlist = hnsw = 0
    if coarse is not None:
        parts = parts[1:]
        kind, number = coarse.group(1), int(coarse.group(2))
        if kind == "IVF":
            nlist = number
            if not parts:
                raise _factory_error(
                    factory,
                    d,
                    "an IVF index needs an encoding after it",
                    f"use e.g. IVF{max(nlist, 1)},Flat or IVF{max(nlist, 1)},SQfp16",
                )
            if not 1 <= nlist <= _INT_MAX:
                raise _factory_error(
                    factory, d, f"IVF{nlist} needs at least 1 list", "use e.g. IVF1024,Flat"
                )
        else:
            hnsw = number
            if not HNSW_MIN_M <= hnsw <= _INT_MAX:
                raise _factory_error(
                    factory,
                    d,
                    f"HNSW needs M >= {HNSW_MIN_M} links per node (FAISS crashes with HNSW{hnsw})",
                    "use e.g. HNSW32",
                )
            if not parts:
                parts = ["Flat"]
    encoding = _ENCODING.fullmatch(parts[0]) if len(parts) == 1 else None
    if encoding is None:  # IDMap, IDMap2, RFlat, Refine(…), LSH, NSG…: not what hetgraph adds
        raise DatastoreIndexError(
            f"index factory {factory!r} is not one hetgraph builds; use "
            f"one of: {SUPPORTED_FACTORIES} (--factory)"
        )
    pq, bits = encoding.group(1), encoding.group(2)
    spec = FactorySpec(dim, opq, pca, nlist, hnsw, int(pq or 0), int(bits or 8))
    if pq is not None:
        if not 1 <= spec.pq <= dim or dim % spec.pq:
            raise _factory_error(
                factory,
                d,
                f"PQ{spec.pq} splits the width {dim} into "
                f"{spec.pq} sub-vectors, which must divide it",
                f"use a PQ m that divides {dim}",
            )
        if not 1 <= spec.pq_bits <= 16:
            raise _factory_error(
                factory,
                d,
                f"PQ codes have 1 to 16 bits, not {spec.pq_bits}",
                f"use PQ{spec.pq} (8 bits) or PQ{spec.pq}x4",
            )
    if nlist:
        try:  # the empty lists and centroids are allocated by index_factory
            check_memory(
                f"the {nlist} lists of index {factory!r}",
                nlist * (_BYTES_PER_LIST + 4 * dim),
                "use fewer IVF lists",
            )
        except ResourceLimitError as error:
            raise DatastoreIndexError(f"{error} (--factory)") from None
    return spec


def check_factory_rows(factory: str, d: int, n: int, train: int) -> None:
    """Check that ``factory`` can be trained on ``train`` of the ``n`` keys of width ``d`` and
    fits in memory: FAISS's k-means needs at least as many training keys as centroids (IVF
    lists, ``2^bits`` per PQ sub-quantizer, 256 for OPQ), PCA at least as many as its output
    width, and HNSW holds ``2·M`` links per key. (Fewer than 39 keys per IVF list only makes
    FAISS warn: the lists are then poorer, not wrong.)

    Raises:
        DatastoreIndexError: one line naming ``factory``, ``--factory`` and the fix.
    """
    spec = parse_factory(factory, d)
    needs = [
        (
            spec.nlist,
            f"IVF{spec.nlist} (a key per list)",
            f"use at most IVF{train}, better IVF{max(1, train // 39)}",
        ),
        (
            2**spec.pq_bits if spec.pq else 0,
            f"PQ{spec.pq}x{spec.pq_bits} ({2**spec.pq_bits} centroids per sub-quantizer)",
            "use fewer PQ bits (e.g. x4) or more keys",
        ),
        (
            _OPQ_CENTROIDS if spec.opq else 0,
            f"OPQ{spec.opq} (it trains a 256-centroid PQ)",
            "drop the OPQ prefix or use more keys",
        ),
        (
            spec.pca,
            f"PCA{spec.pca} (a key per output dimension)",
            f"use at most PCA{min(train, d)}",
        ),
    ]
    for need, what, fix in needs:
        if need > train:
            source = "keys" if train == n else f"training keys (of {n}; IndexConfig.train_size)"
            raise _factory_error(
                factory,
                d,
                f"{what} needs at least {need} training keys but there are only {train} {source}",
                fix,
            )
    if spec.hnsw:
        try:
            check_memory(
                f"the links of index {factory!r} over {n} keys",
                n * (8 * spec.hnsw + 4 * spec.dim),
                "use a smaller HNSW M",
            )
        except ResourceLimitError as error:
            raise DatastoreIndexError(f"{error} (--factory)") from None


def check_factory(factory: str, n: int, d: int, train_size: int | None = None) -> None:
    """Everything :func:`new_index` and :func:`training_sample` check about ``factory`` for
    ``n`` keys of width ``d`` (``train_size`` as :attr:`IndexConfig.train_size
    <hetgraph.index.IndexConfig.train_size>`), without building anything: for callers that
    want the answer before they create files (``"auto"`` always passes).

    Raises:
        DatastoreIndexError: one line naming ``factory``, ``--factory`` and the fix.
    """
    if factory != "auto":
        nlist = parse_factory(factory, d).nlist or 1  # as _default_train_size
        check_factory_rows(factory, d, n, min(n, train_size or max(64 * nlist, 65536)))
