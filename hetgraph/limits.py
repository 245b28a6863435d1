r"""Size checks against what the files and the machine can hold, made *before* allocating.

A small file can ask for a huge allocation: a 132 KB model folder whose ``config.json``
says a 40M vocabulary, an adapter config with a 10⁸-token window, ``--k 100000``. Each
reader estimates the bytes its request would take and calls :func:`check_memory` first,
so the answer is one :class:`ResourceLimitError` line naming the file or option and the
fix instead of gigabytes of swapping and an allocator's traceback. Counts that no memory
estimate bounds well (layers, heads, nesting depth) are checked by :func:`check_count`.

The budget is the memory available now (:func:`hetgraph.allocator.available_memory_bytes`)
times :data:`MEMORY_FRACTION`; ``HETGRAPH_MEMORY_LIMIT`` (bytes, or with a ``K``/``M``/``G``
suffix) replaces it, for tests and for users who share a machine.
"""

from __future__ import annotations

import json
import os

from hetgraph.allocator import available_memory_bytes
from hetgraph.errors import HetgraphError

#: Share of the available memory one request may take.
MEMORY_FRACTION = 0.9
#: Environment variable that replaces the budget (bytes; ``K``, ``M``, ``G`` suffixes).
MEMORY_LIMIT_ENV = "HETGRAPH_MEMORY_LIMIT"

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ResourceLimitError(HetgraphError):
    """A request (from a file or an option) that would take more memory, or more of some
    count, than the machine or the format allows; raised before anything is allocated."""


def format_bytes(n: float) -> str:
    r"""``n`` bytes for a message: ``"5.4 GB"``, ``"132 KB"``, ``"12 bytes"``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def memory_budget() -> int:
    r"""Bytes one request may take: ``$HETGRAPH_MEMORY_LIMIT`` if set, else
    :data:`MEMORY_FRACTION` of the memory available now."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip().upper().removesuffix("B")
    if text:
        suffix = text[-1] if text[-1] in _SUFFIXES else ""
        number = text[: len(text) - len(suffix)]
        try:
            value = float(number) * _SUFFIXES[suffix]
        except ValueError:
            raise ResourceLimitError(
                f"{MEMORY_LIMIT_ENV}={os.environ[MEMORY_LIMIT_ENV]!r} is not a size; give "
                "bytes, optionally with a K, M or G suffix (e.g. 8G)"
            ) from None
        if value > 0:
            return int(value)
    return int(available_memory_bytes() * MEMORY_FRACTION)


def check_memory(what: str, nbytes: float, fix: str) -> None:
    r"""Refuse a request of ``nbytes`` beyond :func:`memory_budget`.

    Args:
        what: the request and where it comes from, e.g. ``"the embedding table of
            model/config.json (vocab_size 40000000 × hidden_size 2048)"``.
        nbytes: its estimated size in bytes.
        fix: what to change, e.g. ``"check vocab_size"``.

    Raises:
        ResourceLimitError: one line, naming ``what``, the size, the budget and ``fix``.
    """
    budget = memory_budget()
    if nbytes > budget:
        raise ResourceLimitError(
            f"{what} would need {format_bytes(nbytes)}, more than the "
            f"{format_bytes(budget)} of memory available; {fix}"
        )


def check_count(what: str, value: int, maximum: int, fix: str, *, minimum: int = 0) -> None:
    r"""Refuse an integer ``value`` outside ``[minimum, maximum]`` with one line naming
    ``what`` (a file's field or an option) and ``fix``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResourceLimitError(f"{what} must be an integer, got {value!r}; {fix}")
    if not minimum <= value <= maximum:
        raise ResourceLimitError(f"{what} is {value}, outside [{minimum}, {maximum}]; {fix}")


def naming(error: ResourceLimitError, source: object) -> ResourceLimitError:
    r"""``error`` if its message names ``source`` (a file or an option), else an error of the
    same kind with ``"{source}: "`` in front: for checks made where the source is unknown
    (a config's own size checks, re-raised by the reader of its file)."""
    if str(source) in str(error):
        return error
    return type(error)(f"{source}: {error}")


def json_depth(value: object, limit: int) -> int:
    r"""Nesting depth of the JSON value ``value`` (a scalar is 0, ``[]`` and ``{}`` are 1),
    counted without recursion and only up to ``limit`` (deeper values return ``limit``)."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level and depth < limit:
        depth += 1
        level = [
            item
            for node in level
            for item in (node.values() if isinstance(node, dict) else node)
            if isinstance(item, (dict, list))
        ]
    return depth


#: Deepest nesting of objects and lists accepted in a JSON file or text hetgraph reads: its
#: own files and configs nest a few levels; thousands of levels exhaust the recursion of
#: Python's JSON reader (a ``RecursionError`` traceback, not an answer).
MAX_JSON_DEPTH = 32


class JSONDepthError(json.JSONDecodeError):
    """JSON nested deeper than :data:`MAX_JSON_DEPTH`: malformed to a reader that handles
    ``json.JSONDecodeError``, recognisable to one that says more."""


def loads_json(text: str | bytes) -> object:
    r"""``json.loads(text)``, refused like malformed JSON if it nests deeper than
    :data:`MAX_JSON_DEPTH`, so that every reader's handling of damaged JSON applies.

    Raises:
        json.JSONDecodeError: ``text`` is not JSON; :class:`JSONDepthError` (a subclass) when
            it nests too deep.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        depth = MAX_JSON_DEPTH + 1
    else:
        depth = json_depth(value, MAX_JSON_DEPTH + 1)
    if depth > MAX_JSON_DEPTH:
        doc = text if isinstance(text, str) else "<bytes>"
        raise JSONDepthError(f"objects or lists nested more than {MAX_JSON_DEPTH} deep", doc, 0)
    return value
