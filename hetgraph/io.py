r"""Shared file I/O: atomic writers, the cache root, content fingerprints and file names.

Every file hetgraph writes goes through :func:`atomic_write`, :func:`atomic_path` or
:func:`atomic_directory`: the data is written under a temporary name in the target's
directory, flushed to disk with ``fsync`` and then renamed onto the target, so a reader
(or a run resumed after a crash) sees either the old version or the complete new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from hetgraph.limits import loads_json
from hetgraph.storage import (
    check_free_space,
    remove_dead_temporaries,
    storage_errors,
    temporary_name,
)

logger = logging.getLogger(__name__)

# -- file and directory names ------------------------------------------------------------

#: Sub-directory of :func:`cache_root` holding tokenized corpora.
CORPUS_CACHE_DIR = "corpus"
#: Sub-directory of :func:`cache_root` holding converted models.
MODEL_CACHE_DIR = "models"
#: What a converted model in :data:`MODEL_CACHE_DIR` was made from (JSON), to spot stale copies.
MODEL_CACHE_SOURCE = "hetgraph-source.json"
#: The model configuration of a Hugging Face model directory (not hetgraph's).
HF_MODEL_CONFIG = "config.json"
#: A Hugging Face tokenizer's settings (JSON); may name custom code in ``auto_map``.
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
#: Files that hold a Hugging Face tokenizer's vocabulary; a model directory needs one.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)
#: A tokenized corpus's metadata (JSON), written after its splits.
CORPUS_METADATA = "corpus.json"
#: A datastore's :class:`~hetgraph.datastore.DatastoreMetadata` (JSON).
DATASTORE_METADATA = "metadata.json"
#: A datastore build's progress (batches done), read to resume the build.
DATASTORE_PROGRESS = "progress.json"
#: One rank's progress in a distributed datastore build (``.format(rank=r)``); removed when
#: the build completes.
DATASTORE_RANK_PROGRESS = "progress.rank{rank}.json"
#: JSON list of a datastore's document names, indexed by ``doc_ids``.
DOC_NAMES = "doc_names.json"
#: Sub-directory of a datastore holding its nearest-neighbour index.
INDEX_DIR = "index"
#: The FAISS index inside :data:`INDEX_DIR`.
INDEX_FILE = "index.faiss"
#: What the index was built from and with (JSON), next to :data:`INDEX_FILE`.
INDEX_METADATA = "index.json"
#: On-disk inverted lists of an on-disk IVF index, next to :data:`INDEX_FILE` (mmap'd).
INDEX_LISTS_FILE = "index.ivfdata"
#: Sub-directory of an index directory holding the per-shard files of an unfinished build.
INDEX_SHARDS_DIR = "shards"
#: In :data:`INDEX_SHARDS_DIR`: the trained, empty index and what the build makes (JSON).
INDEX_TRAINED_FILE = "trained.faiss"
INDEX_PLAN_FILE = "plan.json"
#: In :data:`INDEX_SHARDS_DIR`: block ``b``'s index (``.format(block=b)``).
INDEX_BLOCK_FILE = "shard-{block:05d}.faiss"
#: Adapter weights written by ``HetGraphLM.save_pretrained`` (safetensors).
ADAPTER_WEIGHTS = "adapter.safetensors"
#: Adapter and fusion settings written by ``HetGraphLM.save_pretrained`` (JSON).
ADAPTER_CONFIG = "adapter_config.json"
#: Settings and result of a training run (JSON), in the adapter directory.
TRAINING_RESULT = "training.json"
#: Sub-directory of a training run holding its resumable checkpoint.
CHECKPOINT_DIR = "checkpoint"
#: Step, settings and optimiser scalars of a checkpoint (JSON).
TRAINER_STATE = "trainer_state.json"
#: Optimiser tensors of a checkpoint (safetensors).
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
#: A pipeline run directory's configuration (JSON).
RUN_CONFIG = "config.json"
#: A pipeline run's results (JSON).
RUN_RESULTS = "results.json"
#: A pipeline run's results as a Markdown table.
RUN_RESULTS_MARKDOWN = "results.md"
#: A pipeline run's results plot.
RUN_RESULTS_PLOT = "results.png"
#: Sub-directory of a pipeline run holding the datastore.
RUN_DATASTORE_DIR = "datastore"
#: Sub-directory of a pipeline run holding the trained adapter.
RUN_ADAPTER_DIR = "adapter"
#: Key of the per-file size and checksum record in metadata.json / index.json /
#: adapter_config.json (see :func:`file_record`).
INTEGRITY_KEY = "integrity"
#: Key of a JSON record's own checksum (see :func:`atomic_write_json_record`).
CHECKSUM_KEY = "checksum"


# -- the cache root ----------------------------------------------------------------------


def cache_root() -> Path:
    r"""hetgraph's cache directory: ``$HETGRAPH_CACHE`` if set (``~`` expanded), else
    ``~/.cache/hetgraph``. Read on every call, so changing the variable takes effect."""
    env = os.environ.get("HETGRAPH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hetgraph"


# -- fingerprints ------------------------------------------------------------------------


def _hex(digest: Any, length: int | None) -> str:
    text = digest.hexdigest()
    return text if length is None else text[:length]


def sha256_hex(data: bytes | str, length: int | None = 16) -> str:
    r"""The first ``length`` hex digits (all 64 for ``None``) of the SHA-256 of ``data``;
    ``str`` is encoded as UTF-8."""
    if isinstance(data, str):
        data = data.encode()
    return _hex(hashlib.sha256(data), length)


def json_fingerprint(
    obj: Any,
    length: int | None = 16,
    *,
    ensure_ascii: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> str:
    r""":func:`sha256_hex` of ``json.dumps(obj, sort_keys=True)`` (default separators), so
    independent of dict order. ``ensure_ascii`` and ``default`` are passed to
    :func:`json.dumps`; without ``default``, values JSON cannot represent raise."""
    return sha256_hex(
        json.dumps(obj, sort_keys=True, ensure_ascii=ensure_ascii, default=default), length
    )


class StreamingHash:
    r"""SHA-256 over a sequence of parts, for content too large or too varied for one
    :func:`sha256_hex` call (documents, weight tensors).

    :meth:`update` appends raw bytes; :meth:`update_framed` appends a part preceded by its
    length (8 bytes, little-endian), so that ``("ab", "c")`` and ``("a", "bc")`` differ.
    """

    def __init__(self, data: bytes | str = b"") -> None:
        self._hash = hashlib.sha256()
        if data:
            self.update(data)

    def update(self, data: bytes | str | memoryview) -> StreamingHash:
        r"""Append ``data`` (``str`` as UTF-8); returns ``self``."""
        self._hash.update(data.encode() if isinstance(data, str) else data)
        return self

    def update_framed(self, data: bytes) -> StreamingHash:
        r"""Append ``len(data)`` (8 bytes, little-endian) and then ``data``; returns ``self``."""
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)
        return self

    def hexdigest(self, length: int | None = 16) -> str:
        r"""The first ``length`` hex digits (all 64 for ``None``) of the digest so far."""
        return _hex(self._hash, length)


# -- atomic writers ----------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(directory: str | Path) -> None:
    r"""``fsync`` a directory so that renames inside it survive a crash; a no-op where the
    platform cannot open directories (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse to fsync directories; the rename is still atomic
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, size: int | None = None) -> Iterator[Path]:
    r"""A temporary path to write ``path``'s new content to, for writers that need a path.

    ``with atomic_path(p) as tmp: faiss.write_index(index, str(tmp))``. When the block
    ends normally, ``tmp`` is fsync'd and renamed onto ``p`` (and the directory fsync'd);
    if it raises, ``tmp`` is removed and ``p`` is left as it was. ``tmp`` does not exist
    when the block starts, and ``p``'s directory must exist.

    A full disk, a file-size limit, a quota or a read-only file system — in whatever form
    the writer reports it (see :func:`storage_errors`) — becomes a :class:`StorageError`
    naming ``p``. ``size``, the bytes the new content will take when known, is checked
    against the free space first (:func:`check_free_space`), so nothing is written then.
    """
    path = Path(path)
    remove_dead_temporaries(path)  # a killed writer's, also where no lock is held (--json)
    tmp = temporary_name(path)
    with storage_errors(path, needed=size):
        if size is not None:
            check_free_space(path, size)
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(tmp)
            raise
        fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_write(
    path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8", size: int | None = None
) -> Iterator[IO[Any]]:
    r"""An open file (``mode`` ``"w"`` or ``"wb"``) whose content replaces ``path``
    atomically when the block ends normally; see :func:`atomic_path` (and ``size``)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    # "x": the unique temporary name must not exist yet; permissions follow the umask.
    text_encoding = None if mode == "wb" else encoding
    with (
        atomic_path(path, size=size) as tmp,
        open(tmp, mode.replace("w", "x"), encoding=text_encoding) as f,
    ):
        yield f
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    r"""Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_write_json(
    path: str | Path, obj: Any, *, sort_keys: bool = False, ensure_ascii: bool = True
) -> None:
    r"""Write ``obj`` as JSON (``indent=2``, trailing newline) to ``path`` atomically."""
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    )


def read_json(path: str | Path) -> Any:
    r"""The JSON value stored in ``path`` (UTF-8); nested deeper than
    :data:`~hetgraph.limits.MAX_JSON_DEPTH` it is malformed (``json.JSONDecodeError``)."""
    return loads_json(Path(path).read_text(encoding="utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    r"""``np.save`` ``array`` to ``path`` atomically (``allow_pickle=False``: object arrays
    are refused). ``path`` is used as given; no ``.npy`` is appended."""
    # The header is under 4 KB; numpy reports a short write as an OSError without errno.
    with atomic_write(path, "wb", size=array.nbytes + 4096) as f:
        np.save(f, array, allow_pickle=False)


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    r"""Save torch ``tensors`` (contiguous) with ``safetensors.torch.save_file`` to ``path``
    atomically."""
    from safetensors.torch import save_file

    # The data, plus a generous bound on the JSON header.
    size = sum(int(t.numel()) * t.element_size() + len(k) + 128 for k, t in tensors.items()) + 4096
    with atomic_path(path, size=size) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _fsync_tree(directory: Path) -> None:
    for root, _, files in os.walk(directory):
        for name in files:
            _fsync_file(Path(root) / name)
        fsync_directory(root)


@contextlib.contextmanager
def atomic_directory(
    target: str | Path, *, accept_existing: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    r"""A fresh temporary directory whose content replaces the directory ``target``.

    When the block ends normally, every file below the temporary directory is fsync'd; an
    existing ``target`` is renamed aside, the temporary directory renamed to ``target`` and
    the old content deleted. If the block raises, the temporary directory is deleted and
    ``target`` left as it was. The one window in which ``target`` is missing lies between
    the two renames; a crash there leaves the old content in a hidden ``.<name>.old-*``
    sibling.

    Args:
        target: the directory to create or replace; its parent is created if missing.
        accept_existing: for caches written by concurrent processes: when the final rename
            fails because another writer put ``target`` in place first, the new content is
            discarded (instead of raising) if ``accept_existing(target)`` is true.

    Temporary directories of ``target`` left by writers that were killed (their process no
    longer runs) are deleted first; a full disk is a :class:`StorageError` naming ``target``.
    """
    target = Path(target)
    with storage_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(target)
        tmp = temporary_name(target)
        tmp.mkdir()  # not tempfile.mkdtemp: its 0o700 would become target's permissions
        try:
            yield tmp
            _fsync_tree(tmp)
            _swap_in(tmp, target, accept_existing)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, target: Path, accept_existing: Callable[[Path], bool] | None) -> None:
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        try:
            os.rename(target, old)
        except FileNotFoundError:  # a concurrent writer moved it first
            old = None
    try:
        os.rename(tmp, target)
    except OSError:
        if accept_existing is None or not accept_existing(target):
            if old is not None and not target.exists():
                os.rename(old, target)  # put the old content back
            raise
        logger.debug("kept %s, written by another process first", target)
    fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
