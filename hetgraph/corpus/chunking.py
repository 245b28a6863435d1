r"""Tokenizing long documents in bounded pieces.

A fast tokenizer keeps, per token, offsets, type ids, masks and word ids while it encodes a
text; an 11 MB single-line document needs about 1.5 GB for that (measured with
SmolLM2's byte-level BPE). :func:`encode_long` cuts a document longer than
:data:`LONG_DOCUMENT_CHARS` into pieces of at most that many characters, tokenizes them one
at a time and concatenates the ids, so memory stays proportional to one piece.

Boundary effects, precisely: documents of at most :data:`LONG_DOCUMENT_CHARS` characters
are tokenized whole, exactly as before. A longer document is cut only at *verified* points:
a candidate point ``p`` (preferably a single space that follows a non-space and precedes a
letter or digit, else a newline between two non-spaces, searched backwards over the last
:data:`BOUNDARY_SEARCH_CHARS` characters of the piece) is accepted when tokenizing the
:data:`BOUNDARY_CHECK_CHARS` characters on each side of ``p`` in one call gives the same ids
as tokenizing both sides separately. For regex pre-tokenizers (GPT-2, Llama 3, Qwen2
byte-level BPE) a space before a word always starts a pre-token, so the pieces' ids equal
the whole document's ids unless a single pre-token is longer than the checked span. Where no
candidate passes (e.g. a tokenizer that prepends a marker to every call, or text without
spaces or newlines), the piece is cut at its nominal end and the cut counted; the number of
unverified cuts is logged as a warning, and each can change the ids of the tokens next to it.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Documents longer than this many characters are tokenized in pieces of at most this size.
LONG_DOCUMENT_CHARS = 262_144
#: How far back from a piece's nominal end a cut point is searched for.
BOUNDARY_SEARCH_CHARS = 4_096
#: Characters on each side of a candidate cut tokenized to verify it.
BOUNDARY_CHECK_CHARS = 512
#: Candidate cut points verified per piece before falling back to the nominal end.
MAX_CANDIDATES = 16


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)[
        "input_ids"
    ]


def _candidates(text: str, low: int, high: int) -> list[int]:
    """Cut points in ``(low, high]``, best first: a single space before a word, then a newline
    between non-spaces; each list from ``high`` backwards."""
    spaces: list[int] = []
    newlines: list[int] = []
    for p in range(high, low, -1):
        if p + 1 >= len(text) or text[p - 1].isspace():
            continue
        after = text[p + 1]
        if text[p] == " " and after.isalnum():
            spaces.append(p)
        elif text[p] == "\n" and not after.isspace():
            newlines.append(p)
        if len(spaces) >= MAX_CANDIDATES:
            break
    return (spaces + newlines)[:MAX_CANDIDATES]


def _verified(tokenizer: Any, text: str, p: int) -> bool:
    left, right = max(0, p - BOUNDARY_CHECK_CHARS), p + BOUNDARY_CHECK_CHARS
    whole, first, second = encode(tokenizer, [text[left:right], text[left:p], text[p:right]])
    return list(whole) == list(first) + list(second)


def cut_points(
    tokenizer: Any, text: str, piece_chars: int = LONG_DOCUMENT_CHARS
) -> tuple[list[int], int]:
    """Where :func:`encode_long` cuts ``text``, and how many cuts are unverified.

    Returns:
        ``(points, unverified)``: increasing offsets strictly inside ``text`` (empty when it
        has at most ``piece_chars`` characters), and the number of points that no
        verification backed (see the module docstring).
    """
    points: list[int] = []
    unverified = 0
    start = 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        low = max(start, end - BOUNDARY_SEARCH_CHARS)
        cut = next((p for p in _candidates(text, low, end) if _verified(tokenizer, text, p)), None)
        if cut is None:
            cut = end
            unverified += 1
        points.append(cut)
        start = cut
    return points, unverified


def encode_long(
    tokenizer: Any, text: str, name: str = "", piece_chars: int = LONG_DOCUMENT_CHARS
) -> np.ndarray:
    """int32 token ids of ``text`` (no special tokens), tokenized in pieces of at most
    ``piece_chars`` characters; a text that short is tokenized whole."""
    points, unverified = cut_points(tokenizer, text, piece_chars)
    if unverified:
        logger.warning(
            "document %r (%d characters) was tokenized in %d pieces with %d cut(s) that could "
            "not be verified (no space or newline near them gave the same ids both ways); the "
            "tokens next to those cuts may differ from tokenizing it whole",
            name,
            len(text),
            len(points) + 1,
            unverified,
        )
    bounds = [0, *points, len(text)]
    parts = [
        np.asarray(encode(tokenizer, [text[a:b]])[0], dtype=np.int32)
        for a, b in itertools.pairwise(bounds)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
