r"""One document of a corpus and the escaping of its name: the record every reader of
:mod:`hetgraph.corpus` (files, JSONL, 🤗 datasets) produces."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

# Characters escaped in document names besides controls (Cc) and lone surrogates (Cs):
# bidirectional overrides and isolates, and line / paragraph separators.
_UNSAFE_NAME_CHARS = frozenset(
    "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)


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
