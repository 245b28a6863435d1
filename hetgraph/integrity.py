r"""Integrity records: per-file sizes and checksums, and JSON records that carry their own
checksum.

When a datastore, an index or an adapter is completed, hetgraph records every file's size,
full SHA-256 and *sampled* SHA-256 (:func:`file_record`) in its JSON metadata, which is
written with its own checksum (:func:`atomic_write_json_record`). Opening compares sizes
and sampled checksums only (:func:`check_file_record` with ``full=False``: a few fixed
blocks per file, so opening a large datastore stays cheap); :func:`hetgraph.verify.verify`
compares the full checksums too.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from hetgraph.errors import HetgraphError
from hetgraph.io import (
    CHECKSUM_KEY,
    StreamingHash,
    atomic_write_json,
    fsync_directory,
    json_fingerprint,
)
from hetgraph.limits import JSONDepthError, loads_json

#: Bytes read per block by :func:`sampled_digest`, and blocks read per file.
SAMPLE_BLOCK_SIZE = 65536
SAMPLE_BLOCKS = 16
_HASH_CHUNK = 1 << 24


def file_digest(path: str | Path) -> str:
    r"""The full SHA-256 (64 hex digits) of the file ``path``, read in 16 MiB chunks."""
    digest = StreamingHash()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest(None)


def sampled_digest(
    path: str | Path, blocks: int = SAMPLE_BLOCKS, block_size: int = SAMPLE_BLOCK_SIZE
) -> str:
    r"""SHA-256 of ``blocks`` fixed, evenly spaced blocks of ``block_size`` bytes of ``path``
    (first and last included; the whole file when it is at most ``blocks * block_size``
    bytes), framed with the file size: a cheap check of a large file on every open."""
    size = os.path.getsize(path)
    digest = StreamingHash(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= blocks * block_size:
            digest.update(f.read())
        else:
            for i in range(blocks):
                f.seek(i * (size - block_size) // (blocks - 1))
                digest.update(f.read(block_size))
    return digest.hexdigest(None)


def file_record(path: str | Path) -> dict[str, Any]:
    r"""What an integrity record stores about one file: ``size``, ``sha256`` (all of it)
    and ``sampled_sha256`` (:func:`sampled_digest`)."""
    return {
        "size": os.path.getsize(path),
        "sha256": file_digest(path),
        "sampled_sha256": sampled_digest(path),
    }


def check_file_record(path: str | Path, record: dict[str, Any], *, full: bool) -> str | None:
    r"""What is wrong with ``path`` against its :func:`file_record` ``record``, or ``None``.

    The size and the sampled checksum are always compared; the full checksum only when
    ``full`` (it reads the whole file)."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    try:
        size = path.stat().st_size
        if size != record.get("size"):
            return f"has {size} bytes, {record.get('size')} were recorded (truncated or replaced)"
        if record.get("sampled_sha256") not in (None, sampled_digest(path)):
            return "has changed content (sampled checksum mismatch)"
        if full and record.get("sha256") not in (None, file_digest(path)):
            return "has changed content (checksum mismatch)"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


def json_checksum(obj: dict[str, Any]) -> str:
    r"""The checksum of a JSON record: :func:`json_fingerprint` of ``obj`` without its
    :data:`CHECKSUM_KEY`."""
    return json_fingerprint({k: v for k, v in obj.items() if k != CHECKSUM_KEY}, None)


def atomic_write_json_record(
    path: str | Path, obj: dict[str, Any], *, sort_keys: bool = False
) -> None:
    r""":func:`atomic_write_json` of ``obj`` plus its own checksum under :data:`CHECKSUM_KEY`,
    which :func:`read_json_record` checks, so that a changed byte is detected."""
    atomic_write_json(path, {**obj, CHECKSUM_KEY: json_checksum(obj)}, sort_keys=sort_keys)


def read_json_record(
    path: str | Path, error: type[HetgraphError] = HetgraphError, fix: str = ""
) -> dict[str, Any]:
    r"""The JSON object in ``path``, its checksum (when it has one) checked and removed.

    Raises:
        error: ``path`` is missing, unreadable, not a JSON object, or fails its checksum; the
            message names the file and ends with ``fix``.
    """
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        data = loads_json(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing{fix}") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror or e}){fix}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is damaged (not UTF-8 text){fix}") from None
    except json.JSONDecodeError as e:
        what = (
            "is empty"
            if not e.doc.strip()
            else f"is damaged ({e.msg})"
            if isinstance(e, JSONDepthError)
            else f"is damaged (not valid JSON: {e.msg} at line {e.lineno} column {e.colno})"
        )
        raise error(f"{path} {what}{fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} is damaged (a JSON {type(data).__name__}, not an object){fix}")
    if CHECKSUM_KEY in data:
        if data[CHECKSUM_KEY] != json_checksum(data):
            raise error(f"{path} is damaged (its content does not match its checksum){fix}")
        data = {k: v for k, v in data.items() if k != CHECKSUM_KEY}
    return data


def open_resumable_rows(
    array_path: Path, progress_path: Path, identity: dict[str, Any], done_key: str
) -> tuple[np.ndarray, int]:
    r"""The float16 ``[identity["rows"], identity["dim"]]`` ``.npy`` memmap a resumable pass
    fills, and how far the last run got (``progress_path``'s ``done_key``, written with
    :func:`atomic_write_json_record` after each chunk) — ``0`` and a fresh file unless the
    progress record holds exactly ``identity`` and the array has its shape and dtype."""
    shape = (identity["rows"], identity["dim"])
    with contextlib.suppress(HetgraphError, OSError, ValueError):
        record = read_json_record(progress_path) if progress_path.is_file() else None
        if record is not None and {k: record.get(k) for k in identity} == identity:
            array = np.load(array_path, mmap_mode="r+", allow_pickle=False)
            if array.shape == shape and array.dtype == np.float16:
                return array, int(record[done_key])
    progress_path.unlink(missing_ok=True)
    fsync_directory(progress_path.parent)
    return np.lib.format.open_memmap(array_path, mode="w+", dtype=np.float16, shape=shape), 0
