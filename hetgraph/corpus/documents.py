"""Reading documents from a directory, a text file or a JSON lines file."""
from __future__ import annotations

import gzip
import json
import logging
import lzma
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_TEXT_SUFFIXES, CorpusConfig
from .errors import CorpusError

logger = logging.getLogger(__name__)

_COMPRESSION_SUFFIXES = (".gz", ".xz")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Characters escaped in document names besides controls (Cc) and lone surrogates (Cs):
# bidirectional overrides and isolates, and line / paragraph separators.
_UNSAFE_NAME_CHARS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                               "\u2066\u2067\u2068\u2069\u2028\u2029")


def safe_document_name(name: str) -> str:
    r"""``name`` with control characters escaped, so printing it cannot move the cursor,
    recolour a terminal or reorder text.

    ANSI escapes, other C0/C1 controls (``\n``, ``\t``, ``\x1b`` …), lone surrogates (from
    undecodable file names), bidirectional overrides and line separators become ``\xNN`` /
    ``\uNNNN`` escapes; a name without them is returned unchanged (so splits of existing
    corpora stay the same). Deterministic, and distinct names stay distinct unless one of
    them already spells such an escape literally.
    """
    if all(_is_safe(ch) for ch in name):
        return name
    return "".join(ch if _is_safe(ch) else _escape(ch) for ch in name)


def _is_safe(ch: str) -> bool:
    return ch not in _UNSAFE_NAME_CHARS and unicodedata.category(ch) not in ("Cc", "Cs")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable ``name`` (relative path or id, passed through
    :func:`safe_document_name` when read) and its ``text``."""

    name: str
    text: str

    def __repr__(self) -> str:
        preview = self.text[:40].replace("\n", " ")
        return f"Document(name={self.name!r}, chars={len(self.text)}, text={preview!r}...)"


def read_documents(
    source: str | Path | CorpusConfig | None = None,
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
            ``.gz`` / ``.xz`` compression is recognised by the suffix), a
            :class:`CorpusConfig` (its fields replace the keyword arguments), or ``None`` for
            the embedded Python 3.11 documentation.
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
            single input file or a whole directory holds no text, or a JSON line is invalid
            or lacks ``text_field``.
        ConfigError: an invalid ``document_separator`` (or other :class:`CorpusConfig` value).
    """
    if isinstance(source, CorpusConfig):
        config = source
    else:
        config = CorpusConfig(
            path=None if source is None else str(source), text_field=text_field,
            id_field=id_field, glob=glob, max_documents=max_documents, encoding=encoding,
            document_separator=document_separator,
        )
    return list(_iter_limited(config))


def _iter_limited(config: CorpusConfig) -> Iterator[Document]:
    separator = config.separator_pattern()
    count = 0
    for document in _iter_documents(config):
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


def _iter_documents(config: CorpusConfig) -> Iterator[Document]:
    path = config.resolved_path
    if not path.exists():
        raise CorpusError(
            f"corpus path {path} does not exist. Pass a directory of text files, a text file, "
            "or a JSON lines file (.jsonl, optionally .gz/.xz), or None for the embedded corpus."
        )
    if path.is_dir():
        yield from _iter_directory(path, config)
    elif _is_jsonl(path):
        yield from _require_some(_iter_jsonl(path, path.name, config), path)
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
        what = f"matching glob {config.glob!r}" if config.glob else (
            "with a text suffix (" + ", ".join(DEFAULT_TEXT_SUFFIXES) + ") or .jsonl"
        )
        raise CorpusError(
            f"corpus directory {root} contains no files {what}. Add text files, or set "
            "CorpusConfig.glob (e.g. glob='**/*.py') to choose which files to read."
        )
    produced = 0
    for path in files:
        name = path.relative_to(root).as_posix()
        if _is_jsonl(path):
            for document in _iter_jsonl(path, name, config):
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
        candidates = (p for p in root.rglob("*") if _has_text_suffix(p) or _is_jsonl(p))
    else:
        candidates = root.glob(pattern)
    files = [
        p for p in candidates
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
            len(outside), root, outside[0].relative_to(root), outside[0].resolve())
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


def _require_some(documents: Iterator[Document], path: Path) -> Iterator[Document]:
    produced = False
    for document in documents:
        produced = True
        yield document
    if not produced:
        raise CorpusError(
            f"JSON lines file {path} holds no documents (no non-empty lines with text). "
            "Add one JSON object per line, or point the corpus elsewhere."
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
