r"""Indexes past RAM: IVF indexes whose inverted lists live on disk, built shard-parallel.

An on-disk index is FAISS's own layout: ``index.faiss`` holds the trained quantizer(s) and
an ``OnDiskInvertedLists`` header, ``index.ivfdata`` the inverted lists (codes and ids).
Opening reads ``index.faiss`` with ``faiss.IO_FLAG_ONDISK_SAME_DIR``: the lists are
memory-mapped, so a search pages in only the lists it probes and the process's resident
memory stays far below the index size.

Building (:func:`build_ondisk_index`):

1. rank 0 trains the index on a seeded sample of ``train_size`` rows and writes
   ``shards/trained.faiss`` and ``shards/plan.json`` (what is being built);
2. the rows are cut into blocks of ``IndexConfig.shard_rows``; each rank of a ``torchrun``
   job (:func:`hetgraph.distributed.shard_range` over the blocks; one process builds them
   all) adds its blocks, in chunks of ``add_chunk_size`` rows, to a copy of the trained
   index and writes ``shards/shard-NNNNN.faiss`` atomically — so memory holds one block's
   lists at a time, and a build that stops resumes from the blocks already written;
3. after a barrier rank 0 merges the blocks with ``faiss.contrib.ondisk.merge_ondisk``
   (which memory-maps them) into ``index.ivfdata``, writes ``index.faiss`` and, last,
   ``index.json`` with both files' integrity records, and removes ``shards/``.

Every file is written atomically (:func:`hetgraph.io.atomic_path`); ``index.json`` is removed
once the merged lists are written and before they are renamed into place, and written
after, so an interrupted build is never loaded. The merge first checks the free space
(FAISS writes the lists through a memory map, where a full disk would be a ``SIGBUS``). The result
does not depend on the number of processes (same training sample, same ids, lists merged in
block order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk
from tqdm.auto import tqdm

from hetgraph.allocator import available_memory_bytes
from hetgraph.distributed import DistributedContext, current_context
from hetgraph.index.config import IndexConfig
from hetgraph.index.faiss_index import DatastoreIndex, set_faiss_threads
from hetgraph.index.files import (
    INDEX_FORMAT_VERSION,
    DatastoreIndexError,
    write_ondisk_metadata,
)
from hetgraph.index.training import (
    as_float32,
    auto_factory,
    check_factory,
    finite_rows,
    ivf_pq_factory,
    key_array,
    new_index,
    parse_factory,
    training_sample,
)
from hetgraph.io import (
    INDEX_BLOCK_FILE,
    INDEX_FILE,
    INDEX_LISTS_FILE,
    INDEX_METADATA,
    INDEX_PLAN_FILE,
    INDEX_SHARDS_DIR,
    INDEX_TRAINED_FILE,
    atomic_path,
    atomic_write_json,
    fsync_directory,
    read_json,
)
from hetgraph.locking import directory_lock
from hetgraph.storage import (
    check_free_space,
    remove_stale_temporaries,
    storage_errors,
    storage_reason,
)

logger = logging.getLogger(__name__)

#: What to do after a full disk or an interrupted build: blocks already written are kept.
RESUME_HINT = "run the same index build again (it resumes from the index blocks written)"
#: ``auto`` keeps the lists on disk from this many rows on, whatever the free memory.
ONDISK_ROW_LIMIT = 50_000_000
#: ``auto`` also keeps them on disk when the in-memory index would take more than this
#: fraction of the memory available when the build starts.
RAM_FRACTION = 0.5


def estimated_index_bytes(factory: str, n: int, d: int) -> int:
    """Approximate bytes of a FAISS index ``factory`` over ``n`` vectors of width ``d``.

    ``Flat``: ``4·d`` per row; ``IVF…,PQm``: ``m`` code bytes + 8 id bytes per row plus the
    centroids (``4·d·nlist``) and an OPQ matrix (``4·d²``); ``IVF…,Flat``: ``4·d + 8`` per row;
    ``SQfp16`` / ``SQ8`` / ``SQ4`` codes: ``2·d`` / ``d`` / ``d/2`` bytes per row (``+ 8`` in
    IVF lists); ``HNSWM``: ``4·d + 8·M`` per row. Other factories are counted as ``Flat``.
    """
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", factory)) else 0
    fixed = 4 * d * nlist + (4 * d * d if factory.startswith("OPQ") else 0)
    if (pq := re.search(r"(?<!S)PQ(\d+)", factory)) and nlist:
        return n * (int(pq.group(1)) + 8) + fixed
    code = {"SQfp16": 2 * d, "SQ8": d, "SQ4": (d + 1) // 2}
    if (sq := re.search(r"SQ(fp16|8|4)\b", factory)) is not None:
        return n * (code["SQ" + sq.group(1)] + (8 if nlist else 0)) + fixed
    if nlist:
        return n * (4 * d + 8) + fixed
    if hnsw := re.match(r"HNSW(\d+)", factory):
        return n * (4 * d + 8 * int(hnsw.group(1)))
    return 4 * d * n


def choose_layout(
    n: int, d: int, config: IndexConfig, available: int | None = None
) -> tuple[str, bool]:
    """``(factory, on_disk)`` for ``n`` keys of width ``d`` under ``config``.

    ``on_disk=True`` uses ``config.factory`` (an IVF factory; ``auto`` becomes
    :func:`~hetgraph.index.training.ivf_pq_factory`); ``False`` keeps the index in memory.
    ``None`` (the default) with factory ``auto``: :func:`~hetgraph.index.auto_factory`
    in memory, unless ``n >= ONDISK_ROW_LIMIT`` or its estimated size
    (:func:`estimated_index_bytes`) exceeds ``RAM_FRACTION`` of ``available`` (default: the
    memory available now) — then on-disk IVF-PQ. An explicit factory stays in memory.
    """
    if config.on_disk is True:
        return (ivf_pq_factory(n, d) if config.factory == "auto" else config.factory), True
    if config.on_disk is False or config.factory != "auto":
        return auto_factory(n, d) if config.factory == "auto" else config.factory, False
    factory = auto_factory(n, d)
    available = available_memory_bytes() if available is None else available
    if n >= ONDISK_ROW_LIMIT or estimated_index_bytes(factory, n, d) > RAM_FRACTION * available:
        return ivf_pq_factory(n, d), True
    return factory, False


def build_ondisk_index(
    keys: Any,
    directory: str | Path,
    config: IndexConfig | None = None,
    *,
    datastore_fingerprint: str | None = None,
    distributed: DistributedContext | None = None,
    show_progress: bool = True,
) -> DatastoreIndex:
    """Build an IVF index with on-disk inverted lists into ``directory`` and open it.

    Args:
        keys: ``[N, d]`` array (typically the datastore's fp16 memmap) or a
            :class:`~hetgraph.datastore.Datastore`.
        directory: the index directory (``DATASTORE/index``); an index already there stays
            usable until the new lists are written (then its ``index.json`` is removed).
        config: :class:`IndexConfig`; ``factory`` must be an IVF factory or ``auto``
            (:func:`~hetgraph.index.training.ivf_pq_factory`); ``shard_rows`` rows per
            block file.
        datastore_fingerprint: recorded in ``index.json``; taken from a Datastore.
        distributed: the ``torchrun`` job (default :func:`~hetgraph.distributed.current_context`):
            every rank must call this; each adds its share of the blocks.
        show_progress: tqdm bar over the rows this rank adds (rank 0 only).

    Raises:
        DatastoreIndexError: not an IVF factory, non-finite keys, or a block file missing
            at the merge (a rank did not finish: run the build again to resume).
    """
    config = config or IndexConfig()
    ctx = distributed or current_context()
    keys, fingerprint, _ = key_array(keys)
    datastore_fingerprint = datastore_fingerprint or fingerprint
    directory = Path(directory)
    n, d = int(keys.shape[0]), int(keys.shape[1])
    set_faiss_threads(config.num_threads)
    factory = ivf_pq_factory(n, d) if config.factory == "auto" else config.factory
    # Refuse the factory before shards/ exists: a refusal must not leave an empty directory.
    if not parse_factory(factory, d).nlist:
        raise _not_ivf(factory)
    check_factory(config.factory, n, d, config.train_size)
    plan = {
        "format_version": INDEX_FORMAT_VERSION,
        "factory": factory,
        "metric": config.metric,
        "num_vectors": n,
        "dim": d,
        "seed": config.seed,
        "train_size": config.train_size,
        "shard_rows": config.shard_rows,
        "datastore_fingerprint": datastore_fingerprint,
    }
    shards = directory / INDEX_SHARDS_DIR
    # Rank 0 holds the index directory's lock for the whole build, so that a reader meanwhile
    # is told a build is running instead of "no index", and stale temporaries can go.
    with contextlib.ExitStack() as lock:
        ctx.run_on_main(lambda: _prepare(lock, keys, shards, plan, config))
        ctx.barrier()
        blocks = math.ceil(n / config.shard_rows)
        mine = ctx.share(blocks)
        rows = min(n, mine.stop * config.shard_rows) - mine.start * config.shard_rows if mine else 0
        with tqdm(
            total=rows,
            desc=f"index {factory} (on disk)",
            unit="vec",
            dynamic_ncols=True,
            disable=not (show_progress and ctx.is_main),
        ) as bar:
            for block in mine:
                _build_block(keys, shards, block, config)
                bar.update(min(n, (block + 1) * config.shard_rows) - block * config.shard_rows)
        ctx.barrier()
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "factory": factory,
            "metric": config.metric,
            "num_vectors": n,
            "dim": d,
            "datastore_fingerprint": datastore_fingerprint,
            "config": {**config.to_dict(), "on_disk": True},
        }
        ctx.run_on_main(lambda: _merge(directory, blocks, meta))
        ctx.barrier()
    index = DatastoreIndex.load(directory)
    index.keys = keys  # for exact re-ranking (IndexConfig.rerank)
    return index


def _prepare(
    lock: contextlib.ExitStack, keys: Any, shards: Path, plan: dict[str, Any], config: IndexConfig
) -> None:
    """Rank 0: lock the index directory (until ``lock`` closes); train the index (unless
    ``shards/`` holds this plan's training already)."""
    lock.enter_context(directory_lock(shards.parent, "index"))
    remove_stale_temporaries(shards.parent)
    remove_stale_temporaries(shards)
    with storage_errors(shards, RESUME_HINT):
        if _resumable(shards, plan):
            logger.info("resuming the index build in %s", shards)
            return
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
        index = _new_ivf_index(plan)
        sample = training_sample(index, plan["num_vectors"], config)
        if sample is not None:
            index.train(finite_rows(as_float32(keys[sample]), sample, "the keys"))
        with atomic_path(shards / INDEX_TRAINED_FILE) as tmp:
            faiss.write_index(index, str(tmp))
        atomic_write_json(shards / INDEX_PLAN_FILE, plan)


def _resumable(shards: Path, plan: dict[str, Any]) -> bool:
    """Whether ``shards/`` holds the trained index of ``plan`` (a damaged plan file: no, and
    the build starts again)."""
    try:
        return (
            (shards / INDEX_PLAN_FILE).is_file()
            and read_json(shards / INDEX_PLAN_FILE) == plan
            and (shards / INDEX_TRAINED_FILE).is_file()
        )
    except ValueError:  # not JSON, nested too deep, not UTF-8
        return False


def _new_ivf_index(plan: dict[str, Any]) -> faiss.Index:
    index = new_index(plan["factory"], plan["dim"], plan["metric"], plan["seed"])
    if faiss.try_extract_index_ivf(index) is None:
        raise _not_ivf(plan["factory"])
    return index


def _not_ivf(factory: str) -> DatastoreIndexError:
    return DatastoreIndexError(
        f"on-disk lists need an IVF factory (e.g. IVF4096,PQ64), got {factory!r}; "
        "choose one with --factory or drop --on-disk"
    )


def block_file(shards: Path, block: int) -> Path:
    """The file of block ``block`` of an unfinished on-disk build."""
    return shards / INDEX_BLOCK_FILE.format(block=block)


def _build_block(keys: Any, shards: Path, block: int, config: IndexConfig) -> None:
    """Add rows ``[block·shard_rows, …)`` to a copy of the trained index; write it."""
    target = block_file(shards, block)
    if target.is_file():
        return  # written atomically: complete
    index = faiss.read_index(str(shards / INDEX_TRAINED_FILE))
    n = int(keys.shape[0])
    start, stop = block * config.shard_rows, min(n, (block + 1) * config.shard_rows)
    for lo in range(start, stop, config.add_chunk_size):
        hi = min(stop, lo + config.add_chunk_size)
        rows = np.arange(lo, hi, dtype=np.int64)
        index.add_with_ids(finite_rows(as_float32(keys[lo:hi]), rows, "the keys"), rows)
    with storage_errors(shards, RESUME_HINT), atomic_path(target) as tmp:
        faiss.write_index(index, str(tmp))
    logger.info("index block %d (rows %d-%d) written to %s", block, start, stop, target)


def _merge(directory: Path, blocks: int, meta: dict[str, Any]) -> None:
    """Rank 0: merge the block files into ``index.ivfdata`` + ``index.faiss``; then
    ``index.json``; then remove ``shards/``."""
    shards = directory / INDEX_SHARDS_DIR
    files = [block_file(shards, b) for b in range(blocks)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatastoreIndexError(
            f"{missing[0]} is missing ({len(missing)} of {blocks} index blocks; a rank did not "
            "finish); run the same index build again to resume"
        )
    with storage_errors(directory, RESUME_HINT):
        # The lists are written through a memory map that FAISS grows as a sparse file: on
        # a full disk a page written there is a SIGBUS, not an error. Refuse it up front,
        # while the previous index (if any) is still whole.
        trained = shards / INDEX_TRAINED_FILE
        ivf = faiss.extract_index_ivf(faiss.read_index(str(trained)))
        lists_bytes = int(meta["num_vectors"]) * (int(ivf.code_size) + 8)
        check_free_space(
            directory / INDEX_LISTS_FILE, lists_bytes + 2 * trained.stat().st_size + (1 << 20)
        )
        with atomic_path(directory / INDEX_LISTS_FILE, size=lists_bytes) as tmp_lists:
            _write_merged(shards, files, tmp_lists, directory)
        write_ondisk_metadata(directory, meta)
        shutil.rmtree(shards, ignore_errors=True)


def _write_merged(shards: Path, files: list[Path], lists: Path, directory: Path) -> None:
    index = faiss.read_index(str(shards / INDEX_TRAINED_FILE))
    try:
        merge_ondisk(index, [str(f) for f in files], str(lists))
    except RuntimeError as e:
        if storage_reason(e) is not None:
            raise  # atomic_path names the file
        raise DatastoreIndexError(
            f"an index block in {shards} is damaged "
            f"({str(e).splitlines()[-1]}); delete {shards} and build the "
            "index again"
        ) from None
    # The new lists are complete: only now retire the old index (no stale pair if the
    # renames below are interrupted; a failed merge leaves the old index whole).
    with contextlib.suppress(FileNotFoundError):
        (directory / INDEX_METADATA).unlink()
    fsync_directory(directory)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    invlists.filename = str(directory / INDEX_LISTS_FILE)  # its name once renamed into place
    with atomic_path(directory / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    del index  # unmaps index.ivfdata before it is fsync'd and renamed


def build_index(
    keys: Any,
    directory: str | Path,
    config: IndexConfig | None = None,
    *,
    distributed: DistributedContext | None = None,
) -> DatastoreIndex:
    """Build the index ``config`` asks for over ``keys`` and save it in ``directory``: in
    memory or with on-disk lists as :func:`choose_layout` decides (under ``torchrun`` an
    on-disk build is shard-parallel; an in-memory one is built by rank 0). Every rank returns
    the saved index, opened with the datastore's keys for re-ranking."""
    config = config or IndexConfig()
    ctx = distributed or current_context()
    source = key_array(keys)[0]
    factory, on_disk = choose_layout(int(source.shape[0]), int(source.shape[1]), config)
    chosen = dataclasses.replace(config, factory=factory, on_disk=on_disk)
    logger.info("index %s, lists %s", factory, "on disk" if on_disk else "in memory")
    if on_disk:
        index = build_ondisk_index(keys, directory, chosen, distributed=ctx)
    else:
        ctx.run_on_main(lambda: DatastoreIndex.build(keys, chosen).save(directory) and None)
        ctx.barrier()
        index = DatastoreIndex.load(directory)
    index.keys = source
    return index
