"""The JSON-serialisable description of a corpus: where it is and how it is split."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from hetgraph.configuration import ConfigError, JSONConfigMixin

#: Names of the three splits, in order.
SPLITS: tuple[str, str, str] = ("train", "valid", "test")

#: File suffixes read from a directory when no ``glob`` is given.
DEFAULT_TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".text", ".md", ".markdown", ".rst")


@dataclass
class CorpusConfig(JSONConfigMixin):
    """Where a corpus lives, how to read it and how to split it into train/valid/test.

    Args:
        path: a directory of text files (read recursively), a single text file, or a JSON
            lines file (``.jsonl`` / ``.ndjson``, optionally ``.gz`` / ``.xz`` compressed).
            ``None`` means the embedded Python 3.11 documentation
            (:data:`hetgraph.corpus.EMBEDDED_CORPUS`).
        text_field: JSON lines: the field holding a document's text.
        id_field: JSON lines: the field holding a document's name (optional per line; a line
            without it is named ``<file>:<line>``). ``None`` always uses ``<file>:<line>``.
        glob: directories: the pattern of files to read, relative to the directory and
            recursive when it contains ``**`` (e.g. ``"**/*.py"``); it must stay inside the
            directory (no absolute pattern, no ``..``). ``None`` reads every file
            ending in one of :data:`DEFAULT_TEXT_SUFFIXES`, ``.jsonl`` or ``.ndjson``
            (optionally ``.gz`` / ``.xz`` compressed), recursively. Hidden files and directories
            are skipped. Matched JSON lines files are read as JSON lines.
        fractions: ``(train, valid, test)`` fractions of documents; non-negative, sum to 1.
        seed: mixed into the per-document hash that decides the split.
        max_documents: read at most this many documents (in reading order: sorted paths,
            then line order inside JSON lines files).
        encoding: text encoding of the input files.
        document_separator: a regular expression that splits each file's text into several
            documents (named ``<name>#<i>``), e.g. ``r"\\n\\s*\\n\\s*\\n"`` for a single file
            whose documents are separated by two blank lines. ``None`` keeps one document
            per file (or per JSON line).

    Raises:
        ConfigError: fractions that are not three non-negative numbers summing to 1,
            ``max_documents < 1``, a ``glob`` that is empty, absolute or climbs out of the
            directory with ``..``, or a ``document_separator`` that is not a valid regular
            expression (or matches the empty string).
    """

    path: str | None = None
    text_field: str = "text"
    id_field: str | None = "id"
    glob: str | None = None
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
    seed: int = 0
    max_documents: int | None = None
    encoding: str = "utf-8"
    document_separator: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = str(self.path)
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != 3:
            raise ConfigError(f"fractions must be (train, valid, test), got {self.fractions!r}",
                              "fractions")
        if any(f < 0 or not math.isfinite(f) for f in fractions) or not math.isclose(
            sum(fractions), 1.0, abs_tol=1e-6
        ):
            raise ConfigError(
                f"fractions must be non-negative and sum to 1, got {self.fractions!r}",
                "fractions")
        self.fractions = fractions  # type: ignore[assignment]
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"max_documents must be >= 1 or None, got {self.max_documents}",
                              "max_documents")
        if self.glob is not None:
            _check_glob(self.glob)
        if self.document_separator is not None:
            self.separator_pattern()

    def separator_pattern(self) -> re.Pattern[str] | None:
        """:attr:`document_separator` compiled, or ``None``.

        Raises:
            ConfigError: it is not a valid regular expression, or matches the empty string
                (which would split every file into single characters).
        """
        if self.document_separator is None:
            return None
        try:
            pattern = re.compile(self.document_separator)
        except re.error as error:
            raise ConfigError(
                f"document_separator {self.document_separator!r} is not a valid regular "
                f"expression ({error}); fix it, e.g. r'\\n\\s*\\n\\s*\\n' for two blank "
                "lines", "document_separator") from None
        if pattern.fullmatch(""):
            raise ConfigError(
                f"document_separator {self.document_separator!r} matches the empty string; "
                "give a pattern that matches at least one character", "document_separator")
        return pattern

    @property
    def resolved_path(self) -> Path:
        """The input path; the embedded corpus when :attr:`path` is ``None``."""
        if self.path is None:
            from .embedded import EMBEDDED_CORPUS

            return EMBEDDED_CORPUS
        return Path(self.path).expanduser()



def _check_glob(pattern: object) -> None:
    """Refuse a ``glob`` that is not a relative pattern inside the corpus directory."""
    fix = "give a pattern relative to the corpus directory, e.g. '**/*.txt'"
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(f"glob must be a non-empty string, got {pattern!r}; {fix}", "glob")
    posix, windows = PurePosixPath(pattern), PureWindowsPath(pattern)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise ConfigError(f"glob {pattern!r} is absolute, but only files inside the corpus "
                          f"directory are read; {fix}", "glob")
    if ".." in posix.parts or ".." in windows.parts:
        raise ConfigError(f"glob {pattern!r} climbs out of the corpus directory with '..'; "
                          f"{fix}, or point the corpus at a directory that holds the files",
                          "glob")
