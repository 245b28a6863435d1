"""The error raised for unreadable or unusable corpus input."""
from __future__ import annotations


class CorpusError(ValueError):
    """Corpus input that cannot be used; the message names the file (and line) and the fix."""
