"""The error raised for unreadable or unusable corpus input."""

from __future__ import annotations

from hetgraph.errors import HetgraphError


class CorpusError(HetgraphError):
    """Corpus input that cannot be used; the message names the file (and line) and the fix.

    A :class:`~hetgraph.errors.HetgraphError`, hence a :class:`ValueError`.
    """
