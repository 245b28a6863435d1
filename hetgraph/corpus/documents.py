"""Reading documents from a directory, a text file, a JSON lines file, a Parquet file or a
🤗 datasets directory (:mod:`hetgraph.corpus.hf_datasets`)."""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import hf_datasets
from .config import DATASET_SPLITS_OPTION, DEFAULT_TEXT_SUFFIXES, SPLITS, CorpusConfig
from .document import Document, safe_document_name
from .errors import CorpusError

logger = logging.getLogger(__name__)

_COMPRESSION_SUFFIXES = (".gz", ".xz")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_documents(
    source: str | Path | CorpusConfig | Any | None = None,
    *,
    text_field: str = "text",
    id_field: str | None = "id",
    glob: str | None = None,
    max_documents: int | None = None,
    encoding: str = "utf-8",
    document_separator: str | None = None,
) -> list[Document]:
    """Read the documents of a corpus.

    Args:
        source: a directory (files matching ``glob`` are read recursively, in sorted order of
            their relative paths, which become the document names), a single text file (one
            document named after the file), a JSON lines file (one document per line;
            ``.gz`` / ``.xz`` compression is recognised by the suffix), a Parquet file or a
            🤗 ``save_to_disk`` directory (one document per row of ``text_field``; Parquet
            files inside a directory are read too), a ``datasets.Dataset`` or
            ``DatasetDict`` (its splits pooled), a :class:`CorpusConfig` (its fields replace
            the keyword arguments), or ``None`` for the embedded Python 3.11 documentation.
        text_field, id_field, glob, max_documents, encoding, document_separator: as in
            :class:`CorpusConfig`.

    Returns:
        The documents in reading order. Empty files inside a directory are skipped with a
        warning, and so are files reached through a symbolic link whose target lies
        outside the directory (one warning with their number); blank lines of JSON lines
        files are skipped. Names have control characters
        escaped (:func:`safe_document_name`).

    Raises:
        CorpusError: if the path does not exist, a file is not valid text in ``encoding``, a
            single input file or a whole directory holds no text, a JSON line is invalid
            or lacks ``text_field``, a dataset or Parquet file lacks the ``text_field``
            column (or it holds no strings) or cannot be read, or reading a dataset needs
            the ``hf-datasets`` extra.
        ConfigError: an invalid ``document_separator`` (or other :class:`CorpusConfig` value).
    """
    if isinstance(source, CorpusConfig):
        return read_corpus(source)[0]
    dataset = source if source is not None and _is_dataset_object(source) else None
    config = CorpusConfig(
        path=None if source is None else _describe_source(source),
        text_field=text_field,
        id_field=id_field,
        glob=glob,
        max_documents=max_documents,
        encoding=encoding,
        document_separator=document_separator,
    )
    return read_corpus(config, dataset)[0]


def _is_dataset_object(source: object) -> bool:
    if isinstance(source, (str, Path, CorpusConfig)):
        return False

    return hf_datasets.is_dataset_object(source)


def _describe_source(source: Any) -> str:
    if _is_dataset_object(source):
        return hf_datasets.describe_object(source)
    return str(source)


def read_corpus(
    config: CorpusConfig,
    dataset: Any = None,
) -> tuple[list[Document], dict[str, list[Document]] | None]:
    r"""The documents of the corpus ``config`` describes and, when it asks for a
    ``DatasetDict``'s own splits (``dataset_splits``), those splits.

    Args:
        config: the corpus; its ``path`` is only a description when ``dataset`` is given.
        dataset: a ``datasets.Dataset`` or ``DatasetDict`` to read instead of ``config.path``.

    Returns:
        ``(documents, splits)``: ``splits`` is ``None`` without ``dataset_splits`` (the caller
        splits the documents), else ``{"train": [...], "valid": [...], "test": [...]}`` with
        ``documents`` their concatenation in that order. ``max_documents`` limits each split.

    Raises:
        CorpusError: as :func:`read_documents`; and with ``dataset_splits``, a corpus that
            is no ``DatasetDict`` or lacks a split it names.
    """
    separator = config.separator_pattern()
    if config.dataset_splits is None:
        return list(_iter_limited(_iter_documents(config, dataset), config, separator)), None
    sources = _dataset_split_sources(config, dataset)
    splits = {
        name: list(_iter_limited(sources[name], config, separator)) if name in sources else []
        for name in SPLITS
    }
    return [doc for name in SPLITS for doc in splits[name]], splits


def _dataset_split_sources(config: CorpusConfig, dataset: Any) -> dict[str, Iterator[Document]]:

    if dataset is not None:
        return hf_datasets.dataset_split_documents(dataset, config, str(config.path))
    path = _existing_path(config)
    if not hf_datasets.is_saved_dataset(path):
        raise CorpusError(
            f"{DATASET_SPLITS_OPTION} uses a DatasetDict's own splits, but corpus {path} is no "
            "directory written by DatasetDict.save_to_disk; leave the option out to let "
            "hetgraph split the documents, or point the corpus at such a directory"
        )
    return hf_datasets.dataset_split_documents(
        hf_datasets.load_saved_dataset(path), config, str(path)
    )


def _iter_limited(
    documents: Iterator[Document], config: CorpusConfig, separator: Any
) -> Iterator[Document]:
    count = 0
    for document in documents:
        document = Document(safe_document_name(document.name), document.text)
        parts = [document]
        if separator is not None:
            pieces = [p for p in separator.split(document.text) if p.strip()]
            parts = [Document(f"{document.name}#{i}", p) for i, p in enumerate(pieces)]
        for part in parts:
            if config.max_documents is not None and count >= config.max_documents:
                return
            count += 1
            yield part


def _existing_path(config: CorpusConfig) -> Path:
    path = config.resolved_path
    if not path.exists():
        raise CorpusError(
            f"corpus path {path} does not exist. Pass a directory of text files, a text file, "
            "a JSON lines file (.jsonl, optionally .gz/.xz), a Parquet file, a 🤗 datasets "
            "save_to_disk directory, or None for the embedded corpus."
        )
    return path


def _iter_documents(config: CorpusConfig, dataset: Any = None) -> Iterator[Document]:

    rows = f"no rows with text in column {config.text_field!r}"
    if dataset is not None:
        yield from _require_some(
            hf_datasets.dataset_documents(dataset, config, str(config.path)),
            f"dataset {config.path}",
            rows,
        )
        return
    path = _existing_path(config)
    if path.is_dir():
        if hf_datasets.is_saved_dataset(path):
            yield from _require_some(
                hf_datasets.saved_dataset_documents(path, config),
                f"🤗 datasets directory {path}",
                rows,
            )
        else:
            yield from _iter_directory(path, config)
    elif _is_jsonl(path):
        yield from _require_some(_iter_jsonl(path, path.name, config), f"JSON lines file {path}")
    elif hf_datasets.is_parquet(path):
        yield from _require_some(
            hf_datasets.parquet_documents(path, path.name, config), f"Parquet file {path}", rows
        )
    else:
        text = _read_text(path, config.encoding)
        if not text.strip():
            raise CorpusError(
                f"corpus file {path} is empty (or only whitespace). Put text into it, or "
                "point the corpus at another file or directory."
            )
        yield Document(path.name, text)


def _iter_directory(root: Path, config: CorpusConfig) -> Iterator[Document]:
    files = _list_files(root, config.glob)
    if not files:
        what = (
            f"matching glob {config.glob!r}"
            if config.glob
            else (
                "with a text suffix (" + ", ".join(DEFAULT_TEXT_SUFFIXES) + "), .jsonl or .parquet"
            )
        )
        raise CorpusError(
            f"corpus directory {root} contains no files {what}. Add text files, or set "
            "CorpusConfig.glob (e.g. glob='**/*.py') to choose which files to read."
        )
    produced = 0
    for path in files:
        name = path.relative_to(root).as_posix()
        if _is_jsonl(path) or _is_parquet(path):
            if _is_jsonl(path):
                documents = _iter_jsonl(path, name, config)
            else:
                documents = hf_datasets.parquet_documents(path, name, config)
            for document in documents:
                produced += 1
                yield document
            continue
        text = _read_text(path, config.encoding)
        if not text.strip():
            warnings.warn(f"skipping empty corpus file {path}", stacklevel=4)
            continue
        produced += 1
        yield Document(name, text)
    if produced == 0:
        raise CorpusError(
            f"all {len(files)} matching files in corpus directory {root} are empty "
            f"(e.g. {files[0]}). Put text into them or point the corpus elsewhere."
        )


def _list_files(root: Path, pattern: str | None) -> list[Path]:
    if pattern is None:
        candidates = (
            p for p in root.rglob("*") if _has_text_suffix(p) or _is_jsonl(p) or _is_parquet(p)
        )
    else:
        candidates = root.glob(pattern)
    files = [
        p
        for p in candidates
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    # A symbolic link (to a file, or a linked directory a glob names) may lead out of the
    # corpus: like linked directories, which the recursive walk never enters, skip it.
    real_root = root.resolve()
    inside = [p for p in files if p.resolve().is_relative_to(real_root)]
    if len(inside) < len(files):
        outside = sorted(set(files) - set(inside))
        logger.warning(
            "skipped %d file(s) of corpus directory %s that are symbolic links to outside "
            "it (e.g. %s -> %s); copy the files into the directory to read them",
            len(outside),
            root,
            outside[0].relative_to(root),
            outside[0].resolve(),
        )
    return sorted(inside, key=lambda p: p.relative_to(root).as_posix())


def _strip_compression(name: str) -> str:
    for suffix in _COMPRESSION_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _has_text_suffix(path: Path) -> bool:
    return _strip_compression(path.name).lower().endswith(DEFAULT_TEXT_SUFFIXES)


def _is_jsonl(path: Path) -> bool:
    return _strip_compression(path.name).lower().endswith(_JSONL_SUFFIXES)


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(hf_datasets.PARQUET_SUFFIX)


def _read_bytes(path: Path) -> bytes:
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        if name.endswith(".xz"):
            with lzma.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise CorpusError(
            f"cannot read corpus file {path}: {error}. Check that the file is complete and "
            "that its suffix (.gz / .xz) matches its compression."
        ) from error


def _decode(data: bytes, path: Path, encoding: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise CorpusError(
            f"corpus file {path} is not valid {encoding} text (byte {error.start}, line {line}: "
            f"{error.reason}). Convert it, e.g. `iconv -f latin1 -t utf-8`, or set "
            "CorpusConfig.encoding to its encoding."
        ) from error
    except LookupError as error:
        raise CorpusError(f"unknown encoding {encoding!r} for corpus file {path}") from error
    return text.removeprefix("\ufeff")


def _read_text(path: Path, encoding: str) -> str:
    return _decode(_read_bytes(path), path, encoding)


def _require_some(
    documents: Iterator[Document], what: str, empty: str = "no non-empty lines with text"
) -> Iterator[Document]:
    produced = False
    for document in documents:
        produced = True
        yield document
    if not produced:
        fix = (
            "Add one JSON object per line"
            if what.startswith("JSON")
            else "Set --text-field (CorpusConfig.text_field) to the column holding the text"
        )
        raise CorpusError(
            f"{what} holds no documents ({empty}). {fix}, or point the corpus elsewhere."
        )


def _iter_jsonl(path: Path, name: str, config: CorpusConfig) -> Iterator[Document]:
    text = _read_text(path, config.encoding)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise CorpusError(
                f"{path}, line {number}: the JSON value is nested too deeply to read. Each "
                "line of a JSON lines file must be one JSON object, e.g. "
                f'{{"{config.text_field}": "..."}}.'
            ) from None
        except json.JSONDecodeError as error:
            raise CorpusError(
                f"{path}, line {number}: invalid JSON ({error.msg} at column {error.colno}). "
                "Each line of a JSON lines file must be one JSON object, e.g. "
                f'{{"{config.text_field}": "..."}}.'
            ) from error
        if not isinstance(record, dict):
            raise CorpusError(
                f"{path}, line {number}: expected a JSON object, got {type(record).__name__}. "
                f'Write one object per line, e.g. {{"{config.text_field}": "..."}}.'
            )
        if config.text_field not in record:
            raise CorpusError(
                f"{path}, line {number}: no field {config.text_field!r} (fields: "
                f"{sorted(record)}). Set CorpusConfig.text_field to the field holding the text."
            )
        value = record[config.text_field]
        if not isinstance(value, str):
            raise CorpusError(
                f"{path}, line {number}: field {config.text_field!r} is a "
                f"{type(value).__name__}, not a string."
            )
        if not value.strip():
            continue
        doc_id = record.get(config.id_field) if config.id_field is not None else None
        yield Document(str(doc_id) if doc_id is not None else f"{name}:{number}", value)
