r"""🤗 ``datasets`` and Parquet as corpora: one document per row.

A corpus path may be a directory written by ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, a Parquet file, or a directory holding Parquet files (among
other corpus files); :func:`hetgraph.corpus.tokenize_corpus` also takes a ``datasets.Dataset``
or ``DatasetDict`` itself. Each row is one document: its text is the string column
``CorpusConfig.text_field`` (``--text-field``), its name the ``id_field`` column's value when
there is one, else the row's index from 0 (``row:<i>`` in a ``Dataset``, ``<split>:<i>`` in a
``DatasetDict``, whose split names also prefix ids, ``<file>:<i>`` in a Parquet file). Rows
whose text is null or blank are skipped, as blank JSON lines are.

A ``DatasetDict`` is pooled and split by document like any corpus, unless
``CorpusConfig.dataset_splits`` (``--hf-splits``) asks for its own splits.

Nothing here hashes paths or the dataset's ``_fingerprint`` (which changes with the
transforms that made it, not only with its content): the corpus cache key and fingerprint
hash the documents read, so the same rows saved again give the same corpus and any change
of a row's text, name or order gives another.

``datasets`` (the ``hf-datasets`` extra) and ``pyarrow`` are imported only when such a
corpus is read; without them, reading one is a :class:`CorpusError` naming the extra.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hetgraph.errors import HetgraphError
from hetgraph.limits import check_memory, loads_json

from .config import DATASET_SPLITS_OPTION, CorpusConfig
from .document import Document
from .errors import CorpusError

logger = logging.getLogger(__name__)

#: The optional dependency group that installs ``datasets`` (and ``pyarrow``).
EXTRA = "hf-datasets"
#: Suffix of Parquet files.
PARQUET_SUFFIX = ".parquet"
#: Rows per Arrow batch read.
BATCH_ROWS = 1024
# Estimated bytes per row beyond its text, and per text byte (a str of non-ASCII text takes
# up to twice its UTF-8 bytes), for the memory check before reading.
_ROW_OVERHEAD = 200
_BYTES_PER_TEXT_BYTE = 2
_TEXT_FIX = "set --text-field (CorpusConfig.text_field) to the column holding the text"
_DATASET_DICT_FILE = "dataset_dict.json"
_RESAVE = "check that it is complete, or save the dataset again with save_to_disk"


def _install_hint() -> str:
    return f"install it with pip install 'hetgraph[{EXTRA}]'"


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(
            f"{what} needs the {module} package, which is not installed; {_install_hint()}"
        ) from None


def is_saved_dataset(path: Path) -> bool:
    r"""Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or
    ``DatasetDict.save_to_disk`` (decided from its file names, without importing datasets)."""
    return path.is_dir() and (
        (path / _DATASET_DICT_FILE).is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def is_parquet(path: Path) -> bool:
    r"""Whether ``path`` is named as a Parquet file."""
    return path.name.lower().endswith(PARQUET_SUFFIX)


def is_dataset_object(source: object) -> bool:
    r"""Whether ``source`` is an object of the ``datasets`` package (a ``Dataset``,
    ``DatasetDict`` or one that :func:`dataset_documents` refuses by name, such as an
    ``IterableDataset``), decided without importing datasets."""
    module = type(source).__module__ or ""
    return module == "datasets" or module.startswith("datasets.")


def describe_object(source: Any) -> str:
    r"""How an in-memory dataset is named in messages and recorded as the corpus path."""
    fingerprint = getattr(source, "_fingerprint", None)
    if fingerprint is None and hasattr(source, "items"):  # a DatasetDict: its splits'
        fingerprint = ",".join(f"{k}={getattr(v, '_fingerprint', '?')}" for k, v in source.items())
    return f"<in-memory {type(source).__name__} {fingerprint or ''}>".replace(" >", ">")


def _unreadable(where: str, error: BaseException, fix: str) -> CorpusError:
    detail = " ".join(str(error).split()) or type(error).__name__
    return CorpusError(f"cannot read {where} ({type(error).__name__}: {detail}); {fix}")


def _read_errors() -> tuple[type[BaseException], ...]:
    pyarrow = importlib.import_module("pyarrow")
    return (OSError, ValueError, KeyError, TypeError, IndexError, pyarrow.ArrowException)


def load_saved_dataset(path: Path) -> Any:
    r"""``datasets.load_from_disk(path)``: a ``Dataset`` or ``DatasetDict``.

    Raises:
        CorpusError: datasets is not installed (naming the extra), or the directory is
            damaged (a truncated or corrupt Arrow file, broken JSON, a missing split).
    """
    datasets = _import("datasets", f"corpus {path} (a 🤗 datasets save_to_disk directory)")
    try:
        _check_layout(path)
        return datasets.load_from_disk(str(path), keep_in_memory=False)
    except HetgraphError:
        raise
    except (*_read_errors(), json.JSONDecodeError) as error:
        raise _unreadable(
            f"corpus {path}, a 🤗 datasets save_to_disk directory", error, _RESAVE
        ) from None


def _check_layout(path: Path) -> None:
    """Refuse split and Arrow file names (from the directory's JSON files, which datasets
    joins to the path) that would read files outside the directory."""
    listing = path / _DATASET_DICT_FILE
    if listing.is_file():
        splits = _json_object(listing).get("splits")
        if not isinstance(splits, list):
            raise CorpusError(f'{listing} lists no splits (no "splits" list); {_RESAVE}')
        for split in splits:
            _check_name(split, listing, "split")
            if (path / split / "state.json").is_file():
                _check_layout(path / split)
        return
    state = path / "state.json"
    files = _json_object(state).get("_data_files")
    for entry in files if isinstance(files, list) else ():
        _check_name(
            entry.get("filename") if isinstance(entry, dict) else entry, state, "Arrow file"
        )


def _json_object(file: Path) -> dict[str, Any]:
    value = loads_json(file.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise CorpusError(
            f"{file} holds a JSON {type(value).__name__}, not the object "
            f"save_to_disk writes; {_RESAVE}"
        )
    return value


def _check_name(name: object, listing: Path, what: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or any(sep in name for sep in ("/", "\\", "\0"))
    ):
        raise CorpusError(
            f"{listing} names the {what} {name!r}, which is no plain name inside "
            f"its directory (datasets would read it from elsewhere); {_RESAVE}"
        )


def saved_dataset_documents(path: Path, config: CorpusConfig) -> Iterator[Document]:
    r"""The documents of a save_to_disk directory, every split of a ``DatasetDict`` pooled
    (in the order it lists them)."""
    yield from dataset_documents(load_saved_dataset(path), config, str(path))


def dataset_documents(source: Any, config: CorpusConfig, where: str) -> Iterator[Document]:
    r"""The documents of a ``Dataset``, or of every split of a ``DatasetDict`` pooled."""
    _check_supported(source, where)
    if _is_dataset_dict(source):
        if config.dataset_splits is None:
            logger.warning(
                "corpus %s is a DatasetDict with splits %s; hetgraph pools them and splits the "
                "documents itself (pass --hf-splits to keep the dataset's splits)",
                where,
                ", ".join(source),
            )
        for split, dataset in source.items():
            yield from _rows(dataset, config, f"{where}/{split}", f"{split}:")
        return
    yield from _rows(source, config, where, None)


def dataset_split_documents(
    source: Any, config: CorpusConfig, where: str
) -> dict[str, Iterator[Document]]:
    r"""``{hetgraph split: its documents}`` of a ``DatasetDict`` as
    ``config.dataset_splits`` maps them; a split it leaves out is absent.

    Raises:
        CorpusError: ``source`` is no ``DatasetDict``, or lacks a split the map names.
    """
    assert config.dataset_splits is not None
    _check_supported(source, where)
    if not _is_dataset_dict(source):
        raise CorpusError(
            f"{DATASET_SPLITS_OPTION} uses a DatasetDict's own splits, but corpus {where} is "
            f"a single {type(source).__name__} without splits; leave the option out to let "
            "hetgraph split its documents, or give a DatasetDict.save_to_disk directory"
        )
    missing = [theirs for theirs in config.dataset_splits.values() if theirs not in source]
    if missing:
        mapping = ",".join(f"{ours}={theirs}" for ours, theirs in config.dataset_splits.items())
        raise CorpusError(
            f"corpus {where} has no split {missing[0]!r} (its splits: {', '.join(source)}); "
            f"{DATASET_SPLITS_OPTION} maps {mapping}: name existing splits, e.g. --hf-splits "
            "train=train,valid=validation (a hetgraph split left out stays empty)"
        )
    return {
        ours: _rows(source[theirs], config, f"{where}/{theirs}", f"{theirs}:")
        for ours, theirs in config.dataset_splits.items()
    }


def _check_supported(source: Any, where: str) -> None:
    datasets = importlib.import_module("datasets")
    if not isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        raise CorpusError(
            f"corpus {where}: hetgraph reads a datasets.Dataset or DatasetDict, "
            f"not the {type(source).__name__} given; convert a streamed one, "
            "e.g. with Dataset.from_generator"
        )


def _is_dataset_dict(source: Any) -> bool:
    datasets = importlib.import_module("datasets")
    return isinstance(source, datasets.DatasetDict)


def _rows(dataset: Any, config: CorpusConfig, where: str, prefix: str | None) -> Iterator[Document]:
    """One document per row of a ``datasets.Dataset``, read in Arrow batches."""
    _check_supported(dataset, where)
    schema = dataset.data.schema
    columns = _columns(schema, config, where)
    if config.max_documents is None and dataset.data.num_rows:
        text_bytes = dataset.data.column(config.text_field).nbytes
        _check_size(where, len(dataset), text_bytes * len(dataset) / dataset.data.num_rows)
    try:
        batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=BATCH_ROWS)
        yield from _documents(
            batches, config, prefix if prefix is not None else "row:", prefix is not None
        )
    except HetgraphError:
        raise
    except _read_errors() as error:
        raise _unreadable(f"corpus {where}", error, _RESAVE) from None


def parquet_documents(path: Path, name: str, config: CorpusConfig) -> Iterator[Document]:
    r"""One document per row of the Parquet file ``path`` (named ``<name>:<row>``, or by the
    ``id_field`` column)."""
    parquet = _import("pyarrow.parquet", f"Parquet corpus file {path}")
    errors = _read_errors()
    fix = "check that the file is complete, or write it again (e.g. Dataset.to_parquet)"
    try:
        file = parquet.ParquetFile(path)
        schema = file.schema_arrow
    except errors as error:
        raise _unreadable(f"Parquet corpus file {path}", error, fix) from None
    columns = _columns(schema, config, str(path))
    if config.max_documents is None:
        index = schema.get_field_index(config.text_field)
        try:
            text_bytes = sum(
                file.metadata.row_group(g).column(index).total_uncompressed_size
                for g in range(file.metadata.num_row_groups)
            )
        except errors:  # leave it to the reading below to name the damage
            text_bytes = 0
        _check_size(str(path), file.metadata.num_rows, text_bytes)
    try:
        batches = file.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        yield from _documents(batches, config, f"{name}:", False)
    except HetgraphError:
        raise
    except errors as error:
        raise _unreadable(f"Parquet corpus file {path}", error, fix) from None


def _columns(schema: Any, config: CorpusConfig, where: str) -> list[str]:
    """The columns to read: the text column (checked to hold strings) and the id column if
    there is one."""
    pyarrow = importlib.import_module("pyarrow")
    names = list(schema.names)
    if config.text_field not in names:
        raise CorpusError(
            f"corpus {where} has no column {config.text_field!r} (columns: "
            f"{', '.join(names) or 'none'}); {_TEXT_FIX}"
        )
    kind = schema.field(config.text_field).type
    string_types = [pyarrow.types.is_string, pyarrow.types.is_large_string]
    if hasattr(pyarrow.types, "is_string_view"):
        string_types.append(pyarrow.types.is_string_view)
    if not any(test(kind) for test in string_types):
        raise CorpusError(
            f"corpus {where}: column {config.text_field!r} holds {kind}, not "
            f"text; {_TEXT_FIX} (a column of strings)"
        )
    columns = [config.text_field]
    if (
        config.id_field is not None
        and config.id_field in names
        and config.id_field != config.text_field
    ):
        columns.append(config.id_field)
    return columns


def _check_size(where: str, rows: int, text_bytes: float) -> None:
    check_memory(
        f"reading the {rows} rows of corpus {where}",
        _BYTES_PER_TEXT_BYTE * text_bytes + _ROW_OVERHEAD * rows,
        "set max_documents in --corpus-config to read fewer rows, or give a "
        "smaller dataset (e.g. Dataset.shard)",
    )


def _documents(
    batches: Iterable[Any], config: CorpusConfig, prefix: str, prefix_ids: bool
) -> Iterator[Document]:
    """Documents from Arrow tables / record batches holding the text and maybe id column.

    Rows are named ``<prefix><row>``, or by their id (prefixed when ``prefix_ids``)."""
    row = 0
    skipped = 0
    for batch in batches:
        texts = batch.column(config.text_field).to_pylist()
        ids = (
            batch.column(config.id_field).to_pylist()
            if config.id_field is not None
            and config.id_field in batch.schema.names
            and config.id_field != config.text_field
            else None
        )
        for i, text in enumerate(texts):
            if text is None or not text.strip():
                skipped += 1
                continue
            doc_id = None if ids is None else ids[i]
            if doc_id is None:
                name = f"{prefix}{row + i}"
            else:
                name = f"{prefix}{doc_id}" if prefix_ids else str(doc_id)
            yield Document(name, text)
        row += len(texts)
    if skipped:
        logger.info("skipped %d rows whose %r is null or blank", skipped, config.text_field)
