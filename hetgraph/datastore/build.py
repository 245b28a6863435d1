"""Building a datastore: one frozen-LM pass over a split, resumable after interruption.

The same build runs in one process or under ``torchrun`` (see :mod:`hetgraph.distributed`).
Distributed, the deterministic batch schedule (:func:`window_batches`) is split into
contiguous shares, one per rank, and every rank writes the rows of its batches **directly
into the shared memmaps** that rank 0 preallocated. We chose this over per-rank shard files
merged by rank 0 because the row of every position is known from the schedule before any
batch runs: there is no merge pass (which would re-read and re-write every key, hours at
100M tokens), no second copy of the keys on disk while merging (the fp16 keys alone are
hundreds of GB at that size), and the files are the single-process files from the start — the
same code opens, checks and resumes them. Ranks write disjoint rows; each keeps its own
progress record (:mod:`hetgraph.datastore.progress`), so after a crash every rank — in a run
with any number of processes — skips exactly the batches already written. Rank 0 writes the
complete ``metadata.json`` once, atomically, after a barrier when every rank has finished.
The result is byte-identical to a one-process build.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hetgraph.corpus.windows import Window, sliding_windows
from hetgraph.datastore.capture import (
    HiddenStateCapture,
    model_dtype_name,
    normalize_layer,
    probe_dims,
    split_arrays,
)
from hetgraph.datastore.integrity import (
    array_path,
    array_problems,
    clear_datastore,
    foreign_entries,
    integrity_record,
    recorded_file_problems,
)
from hetgraph.datastore.metadata import FORMAT_VERSION, DatastoreError, DatastoreMetadata
from hetgraph.datastore.progress import (
    ProgressRecorder,
    from_intervals,
    mark_complete,
    read_done,
    to_intervals,
    write_prefix,
)
from hetgraph.datastore.store import Datastore, DatastoreConfig
from hetgraph.distributed import DistributedContext, current_context
from hetgraph.io import (
    DATASTORE_METADATA,
    DATASTORE_PROGRESS,
    DOC_NAMES,
    atomic_save_npy,
    atomic_write_text,
    json_fingerprint,
)
from hetgraph.locking import directory_lock
from hetgraph.models.checks import check_context_length, check_token_ids
from hetgraph.models.fingerprint import array_fingerprint, model_fingerprint
from hetgraph.models.layers import model_device
from hetgraph.storage import remove_stale_temporaries, reserve_blocks, storage_errors

logger = logging.getLogger(__name__)
#: How a CLI or Python user replaces a datastore, for messages.
OVERWRITE_HINT = "--overwrite (build_datastore(..., overwrite=True))"
#: What to do after a build stopped for lack of space.
RESUME_HINT = "run the same build command again: the build resumes where it stopped"


def window_batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Group consecutive windows of equal length into batches of at most ``batch_size``.

    The grouping depends on the window index only, so a resumed build processes exactly
    the same batches (and gets bitwise the same numbers) as an uninterrupted one. Equal
    lengths mean no padding and no attention mask is ever needed (with
    :func:`sliding_windows` every window has the same length anyway).
    """
    batches: list[list[Window]] = []
    for w in windows:
        if (
            batches
            and len(batches[-1]) < batch_size
            and (batches[-1][0].end - batches[-1][0].start) == (w.end - w.start)
        ):
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def batch_input_ids(tokens: np.ndarray, batch: list[Window], device: torch.device) -> torch.Tensor:
    """``[B, T]`` int64 input ids of a batch of equal-length windows."""
    ids = np.stack([tokens[w.start : w.end] for w in batch]).astype(np.int64)
    return torch.from_numpy(ids).to(device, non_blocking=True)


def build_datastore(
    model: nn.Module,
    tokenizer: Any,
    split: Any,
    out_dir: str | Path,
    config: DatastoreConfig | None = None,
    *,
    corpus_fingerprint: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    max_batches: int | None = None,
    distributed: DistributedContext | None = None,
) -> Datastore:
    """Run the frozen LM over a split and store a key per position.

    Entry ``i`` of the datastore is position ``i`` of the split: its hidden state at
    ``config.key_layer`` (fp16) and ``next_tokens[i] = tokens[i + 1]``. Windows come from
    :func:`~hetgraph.corpus.windows.sliding_windows`; the model runs batched under
    ``torch.inference_mode`` on its own device, and the forward pass stops as soon as
    the requested states are captured (the LM head's logits are never computed).

    The build is resumable: progress is saved after every flushed batch, and running the
    same call again (same model, tokenizer, split and config) continues where it stopped
    and gives a byte-identical datastore. A finished datastore is returned as is, after a
    cheap check of its files; a damaged one is rebuilt only with ``overwrite``. The build
    holds the directory's lock (:func:`hetgraph.locking.directory_lock`) throughout, and
    refuses batches whose hidden states are not finite (nothing of them is written).

    Args:
        model: a Hugging Face causal LM (frozen; put it on the device you want used).
        tokenizer: its tokenizer (fingerprinted into the metadata).
        split: a ``TokenizedSplit``-like object (``tokens``, ``doc_ids``, ``positions``).
        out_dir: datastore directory.
        config: :class:`DatastoreConfig` (defaults if None).
        corpus_fingerprint: identifies the split; default: a hash of its tokens and doc ids.
        overwrite: replace an existing datastore that was built with anything different, or
            is damaged, instead of raising. Only a datastore is ever replaced: a directory
            holding any file a datastore build does not write is refused, never deleted.
        show_progress: show a tqdm bar.
        max_batches: process at most this many batches per rank in this call and return the
            (incomplete) datastore; for chunked jobs under time limits and for tests.
        distributed: the ``torchrun`` job sharing the build (every rank calls with the same
            arguments); default :func:`~hetgraph.distributed.current_context`.

    Returns:
        the opened :class:`Datastore` (``complete`` is False only if ``max_batches`` stopped it).

    Raises:
        DatastoreError: ``out_dir`` holds something other than a datastore; or a datastore
            built differently, or damaged, and not ``overwrite``; or the model's hidden states
            are not finite.
        hetgraph.locking.LockError: another process is writing ``out_dir``.
        hetgraph.storage.StorageError: the disk is full (or a file-size limit is reached); the
            build resumes after the fact.
    """
    config = config or DatastoreConfig()
    out = Path(out_dir)
    tokens, doc_ids, positions = split_arrays(split, config.max_tokens)
    if len(tokens) < 2:
        raise DatastoreError(
            f"a datastore needs a split of at least 2 tokens, got {len(tokens)}; "
            "use a larger corpus (or a larger --max-tokens)"
        )
    check_context_length(model, config.context_length, "--context-length")
    check_token_ids(tokens, model, "the train split")
    num_entries = len(tokens) - 1
    key_layer = normalize_layer(model, config.key_layer)
    feature_layers = tuple(dict.fromkeys(normalize_layer(model, l) for l in config.feature_layers))
    windows = sliding_windows(num_entries, config.context_length, config.stride)
    batches = window_batches(windows, config.batch_size)
    if corpus_fingerprint is None:
        corpus_fingerprint = array_fingerprint(tokens, doc_ids)
    metadata = _build_metadata(
        model,
        tokenizer,
        config,
        int(tokens[0]),
        num_entries,
        key_layer,
        feature_layers,
        len(batches),
        corpus_fingerprint,
    )
    ctx = distributed or current_context()
    with ExitStack() as lock:
        plan = ctx.run_on_main(
            lambda: _start_build(lock, out, metadata, overwrite, tokens, doc_ids, positions, split)
        )
        if plan is None:  # already complete
            return Datastore.open(out)
        done = from_intervals(plan, len(batches))
        remaining = [b for b in range(len(batches)) if b not in done]  # this rank's share:
        todo = [remaining[i] for i in ctx.share(len(remaining))][:max_batches]
        prefix = not ctx.is_distributed and done == set(range(len(done)))
        recorder = ProgressRecorder(out, ctx.rank, done, len(batches), prefix)
        with storage_errors(out, RESUME_HINT):
            _run_batches(
                model,
                tokens,
                out,
                batches,
                todo,
                recorder,
                key_layer,
                feature_layers,
                show_progress and ctx.is_main,
            )
        ctx.barrier()  # every rank's rows and progress are on disk
        complete = ctx.run_on_main(lambda: _finish_build(out, metadata, len(batches)))
    return Datastore.open(out, allow_incomplete=not complete)


def _start_build(
    lock: ExitStack,
    out: Path,
    metadata: DatastoreMetadata,
    overwrite: bool,
    tokens: np.ndarray,
    doc_ids: np.ndarray,
    positions: np.ndarray,
    split: Any,
) -> list[list[int]] | None:
    """Rank 0: lock ``out`` (held until ``lock`` closes), check and prepare it, write the
    static arrays of a new build; return the batches already done as intervals (None: the
    datastore is complete)."""
    _refuse_foreign(out)  # before the lock file is created in someone else's directory
    lock.enter_context(directory_lock(out, "datastore"))
    remove_stale_temporaries(out)
    done = _prepare_directory(out, metadata, overwrite)
    if done is None:
        return None
    if not done:
        with storage_errors(out, RESUME_HINT):
            _write_static_arrays(
                out, metadata, tokens, doc_ids, positions, getattr(split, "doc_names", None)
            )
    return to_intervals(done)


def _finish_build(out: Path, metadata: DatastoreMetadata, num_batches: int) -> bool:
    """Rank 0, after every rank finished: when every batch is written, record it and write the
    complete metadata (atomically, once); returns whether the datastore is complete."""
    if len(read_done(out, num_batches)) < num_batches:
        return False
    with storage_errors(out, RESUME_HINT):
        mark_complete(out, num_batches)
        metadata.integrity = integrity_record(out, metadata)
        metadata.complete = True
        metadata.save(out / DATASTORE_METADATA)
    return True


def _build_metadata(
    model: nn.Module,
    tokenizer: Any,
    config: DatastoreConfig,
    probe_token: int,
    num_entries: int,
    key_layer: int | None,
    feature_layers: tuple[int, ...],
    num_batches: int,
    corpus_fingerprint: str,
) -> DatastoreMetadata:
    """What the build will record in ``metadata.json`` (widths probed with one token)."""
    dims = probe_dims(model, [key_layer, *feature_layers], token_id=probe_token)
    identity: dict[str, Any] = {
        "num_entries": num_entries,
        "dim": dims[key_layer],
        "key_layer": key_layer,
        "feature_dims": {str(l): dims[l] for l in feature_layers},
        "context_length": config.context_length,
        "stride": config.stride,
        "batch_size": config.batch_size,
        "max_tokens": config.max_tokens,
        "model": model_fingerprint(model, tokenizer),
        "model_dtype": model_dtype_name(model),
        "corpus_fingerprint": corpus_fingerprint,
        "key_dtype": "float16",
        "num_batches": num_batches,
        "format_version": FORMAT_VERSION,
    }
    return DatastoreMetadata(**identity, fingerprint=json_fingerprint(identity), complete=False)


def _run_batches(
    model: nn.Module,
    tokens: np.ndarray,
    out: Path,
    batches: list[list[Window]],
    todo: list[int],
    recorder: ProgressRecorder,
    key_layer: int | None,
    feature_layers: tuple[int, ...],
    show_progress: bool,
) -> None:
    """Store the states of the batches numbered ``todo``; record progress after each."""
    keys = np.load(array_path(out, "keys"), mmap_mode="r+", allow_pickle=False)
    feats = {
        l: np.load(array_path(out, f"features_{l}"), mmap_mode="r+", allow_pickle=False)
        for l in feature_layers
    }
    device = model_device(model)
    scored_before = sum(w.end - w.score_start for b in recorder.done for w in batches[b])
    total = scored_before + sum(w.end - w.score_start for b in todo for w in batches[b])
    bar = tqdm(
        total=total,
        initial=scored_before,
        desc="datastore",
        unit="tok",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    try:
        with (
            torch.inference_mode(),
            HiddenStateCapture(model, [key_layer, *feature_layers], stop_forward=True) as capture,
        ):
            for b in todo:
                batch = batches[b]
                states = capture.run(batch_input_ids(tokens, batch, device))
                halves = {
                    l: _finite_half(states[l], l, b, batch, out)
                    for l in [key_layer, *feature_layers]
                }
                _write_batch(batch, halves[key_layer], keys)
                for l in feature_layers:
                    _write_batch(batch, halves[l], feats[l])
                keys.flush()
                for f in feats.values():
                    f.flush()
                recorder.record(b)
                bar.update(sum(w.end - w.score_start for w in batch))
    finally:
        bar.close()
        del keys, feats
    seconds, scored = time.perf_counter() - started, total - scored_before
    logger.info(
        "datastore: rank %d wrote %d positions in %.1f s (%.0f tokens/s)",
        recorder.rank,
        scored,
        seconds,
        scored / max(seconds, 1e-9),
    )


def _finite_half(
    hidden: torch.Tensor, layer: int | None, b: int, batch: list[Window], out: Path
) -> torch.Tensor:
    """``hidden`` as float16, refused when any value is NaN or infinite (after the cast: a
    float32 value beyond ±65504 becomes ``inf``)."""
    half = hidden.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        what = "LM-head input" if layer is None else f"decoder layer {layer}"
        raise DatastoreError(
            f"datastore {out}: the model's hidden states at the {what} are not finite (NaN or "
            f"beyond the float16 range) in batch {b} (corpus positions {batch[0].start}-"
            f"{batch[-1].end}); nothing of that batch was written. Check the model's weights "
            "and dtype (--dtype float32), then run the same build command again to resume"
        )
    return half


def _write_batch(batch: list[Window], half: torch.Tensor, target: np.memmap) -> None:
    """Copy the scored positions of each window into the memmap rows they belong to."""
    for row, w in enumerate(batch):
        offset = w.score_start - w.start
        scored = w.end - w.score_start
        target[w.score_start : w.end] = half[row, offset : offset + scored].cpu().numpy()


def _refuse_foreign(out: Path) -> None:
    """Refuse an output directory that holds anything a datastore build does not write."""
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise DatastoreError(
            f"{out} is not a datastore directory (it holds {shown}); a build never deletes or "
            "writes into such a directory, not even with --overwrite: choose another --out "
            "directory (a new or empty one)"
        )


def _prepare_directory(out: Path, metadata: DatastoreMetadata, overwrite: bool) -> set[int] | None:
    """Validate ``out`` (locked, holding datastore files only); clear it if needed; return the
    batches already done (None = complete and intact)."""
    _refuse_foreign(out)
    meta_file = out / DATASTORE_METADATA
    if not meta_file.exists():
        if any(
            p.suffix == ".npy" or p.name in (DOC_NAMES, DATASTORE_PROGRESS) for p in out.iterdir()
        ):
            # A build stopped before its metadata was written ran no batch: start again.
            logger.info("%s holds a build stopped at its start; starting it again", out)
            clear_datastore(out)
        return set()
    try:
        existing: DatastoreMetadata | None = DatastoreMetadata.load(meta_file)
        damage = None
    except DatastoreError as error:
        existing, damage = None, str(error)
    if existing is not None and existing.identity() == metadata.identity():
        problems = array_problems(out, existing)
        if existing.complete and not problems:
            problems = recorded_file_problems(out, existing, full=False)
        if not problems:
            return None if existing.complete else read_done(out, metadata.num_batches)
        damage = str(out / problems[0].message)
    if not overwrite:
        if damage is not None:
            raise DatastoreError(
                f"the datastore in {out} is damaged ({damage.split('; ')[0]}); "
                f"rebuild it: run the same command with {OVERWRITE_HINT}"
            )
        raise DatastoreError(
            f"{out} already holds a datastore built with a different model, corpus or config "
            f"({_describe_difference(existing, metadata)}); pass {OVERWRITE_HINT} to replace "
            "it, or choose another directory"
        )
    clear_datastore(out)
    return set()


def _describe_difference(existing: DatastoreMetadata | None, new: DatastoreMetadata) -> str:
    if existing is None:
        return "unreadable metadata"
    a, b = existing.identity(), new.identity()
    keys = [k for k in b if a.get(k) != b.get(k)]
    return "differs in " + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])


def _write_static_arrays(
    out: Path,
    metadata: DatastoreMetadata,
    tokens: np.ndarray,
    doc_ids: np.ndarray,
    positions: np.ndarray,
    doc_names: list[str] | None = None,
) -> None:
    n = metadata.num_entries
    if doc_names is not None:
        # Names of the documents, so retrieved neighbours can be shown with their source.
        atomic_write_text(out / DOC_NAMES, json.dumps(list(doc_names), ensure_ascii=False) + "\n")
    for name, array in (
        ("tokens", tokens[:n]),
        ("next_tokens", tokens[1 : n + 1]),
        ("doc_ids", doc_ids[:n]),
        ("positions", positions[:n]),
    ):
        atomic_save_npy(array_path(out, name), np.ascontiguousarray(array, dtype=np.int32))
    for name, dim in (
        ("keys", metadata.dim),
        *((f"features_{l}", d) for l, d in metadata.feature_dims.items()),
    ):
        array = np.lib.format.open_memmap(
            array_path(out, name), mode="w+", dtype=np.float16, shape=(n, dim)
        )
        array.flush()
        del array
        reserve_blocks(array_path(out, name))
    write_prefix(out, 0, metadata.num_batches)
    metadata.save(out / DATASTORE_METADATA)
