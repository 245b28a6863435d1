r"""Reading a user's knowledge graph: triples and aliases from TSV or JSON-lines files.

A **triples** file holds one fact per line, either ``head<TAB>relation<TAB>tail`` (TSV) or
``{"head": …, "relation": …, "tail": …}`` (JSON lines); an **aliases** file one surface
form per line, ``entity<TAB>alias`` or ``{"entity": …, "alias": …}``. The format follows
the name (``.jsonl`` / ``.json`` for JSON lines, anything else TSV), after an optional
``.xz``, ``.gz`` or ``.bz2`` suffix, which is decompressed. Blank lines and TSV lines
starting with ``#`` are skipped. Every problem is one :class:`KnowledgeGraphError` naming
the file, the line and what is wrong, raised while reading (before anything is written).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.limits import check_memory

TRIPLE_FIELDS = ("head", "relation", "tail")
ALIAS_FIELDS = ("entity", "alias")
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
#: Bytes of Python objects per byte of a triples file while it is read (strings, tuples,
#: dict entries): the estimate :func:`read_triples` checks against the memory budget.
_OBJECT_OVERHEAD = 12
#: Decompressed bytes assumed per compressed byte for the estimate.
_COMPRESSION_RATIO = {".xz": 8, ".gz": 6, ".bz2": 8}


def _open(path: Path) -> IO[bytes]:
    opener = _OPENERS.get(path.suffix.lower())
    return opener(path, "rb") if opener is not None else open(path, "rb")  # type: ignore[operator]


def is_jsonl(path: str | Path) -> bool:
    r"""Whether ``path`` names JSON lines (``.jsonl`` or ``.json``, before a compression
    suffix) rather than TSV."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix.lower() in _OPENERS else path
    return stem.suffix.lower() in (".jsonl", ".json")


def _fields_of_json(text: str, fields: tuple[str, ...]) -> list[str]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        msg = getattr(error, "msg", "nested too deep")
        raise ValueError(f"not valid JSON ({msg})") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"expected a JSON object with keys {', '.join(fields)}, got a {type(value).__name__}"
        )
    missing = [f for f in fields if f not in value]
    if missing:
        raise ValueError(
            f"the JSON object lacks {', '.join(repr(m) for m in missing)} "
            f"(expected keys {', '.join(fields)})"
        )
    bad = [f for f in fields if not isinstance(value[f], str)]
    if bad:
        raise ValueError(f"{bad[0]!r} must be a string, got {json.dumps(value[bad[0]])[:40]}")
    return [value[f] for f in fields]


def _fields_of_tsv(text: str, fields: tuple[str, ...]) -> list[str]:
    parts = text.split("\t")
    if len(parts) != len(fields):
        raise ValueError(
            f"expected {len(fields)} tab-separated fields ({', '.join(fields)}), got {len(parts)}"
        )
    return parts


def read_rows(path: str | Path, fields: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    r"""The rows of a TSV or JSON-lines file with the given ``fields``, stripped of
    surrounding white space.

    Raises:
        KnowledgeGraphError: the file is missing or unreadable, not UTF-8, or a line has
            the wrong number of fields, is not a JSON object with ``fields``, or has an
            empty field — ``"<file> line <n>: <what>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise KnowledgeGraphError(
            f"{path}: file not found; give an existing "
            f"{' / '.join(fields)} file (TSV or JSON lines)"
        )
    parse = _fields_of_json if is_jsonl(path) else _fields_of_tsv
    number = 0
    try:
        with _open(path) as f:
            for raw in f:
                number += 1
                text = raw.decode("utf-8").rstrip("\r\n")
                if not text.strip() or (parse is _fields_of_tsv and text.startswith("#")):
                    continue
                values = [v.strip() for v in parse(text, fields)]
                empty = [name for name, v in zip(fields, values, strict=True) if not v]
                if empty:
                    raise ValueError(f"the {empty[0]} field is empty")
                yield tuple(values)
    except UnicodeDecodeError:
        raise KnowledgeGraphError(
            f"{path.name} line {number + 1}: not UTF-8 text; save the file as UTF-8"
        ) from None
    except ValueError as error:
        raise KnowledgeGraphError(f"{path.name} line {number}: {error}") from None
    except (OSError, EOFError, lzma.LZMAError) as error:
        what = getattr(error, "strerror", None) or error
        raise KnowledgeGraphError(
            f"{path}: cannot be read ({what}); check the file "
            "(a truncated or damaged compressed file?)"
        ) from None


def estimated_bytes(path: str | Path) -> int:
    r"""Memory that reading ``path`` into Python objects may take (an estimate from its
    size, decompressed sizes assumed from typical ratios)."""
    path = Path(path)
    ratio = _COMPRESSION_RATIO.get(path.suffix.lower(), 1)
    return os.path.getsize(path) * ratio * _OBJECT_OVERHEAD if path.is_file() else 0


def read_triples(path: str | Path) -> list[tuple[str, str, str]]:
    r"""Every ``(head, relation, tail)`` of a triples file (see the module docstring).

    Raises:
        KnowledgeGraphError: as :func:`read_rows`, or the file holds no triple.
        ResourceLimitError: the file is too large to read in the memory available.
    """
    check_memory(
        f"reading the triples file {path}",
        estimated_bytes(path),
        "split the graph or use a machine with more memory",
    )
    triples = list(read_rows(path, TRIPLE_FIELDS))
    if not triples:
        raise KnowledgeGraphError(
            f"{path}: holds no triples; give one head<TAB>relation"
            "<TAB>tail (or a JSON object) per line"
        )
    return triples  # type: ignore[return-value]


def read_aliases(path: str | Path) -> list[tuple[str, str]]:
    r"""Every ``(entity, alias)`` of an aliases file (see the module docstring).

    Raises:
        KnowledgeGraphError: as :func:`read_rows`.
        ResourceLimitError: the file is too large to read in the memory available.
    """
    check_memory(
        f"reading the aliases file {path}",
        estimated_bytes(path),
        "split the aliases or use a machine with more memory",
    )
    return list(read_rows(path, ALIAS_FIELDS))  # type: ignore[arg-type]
