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

#: ``dataset_splits`` when ``--hf-splits`` is given without a map: the usual names of a
#: 🤗 ``DatasetDict``'s splits for hetgraph's train / valid / test.
DEFAULT_DATASET_SPLITS: dict[str, str] = {"train": "train", "valid": "validation", "test": "test"}
#: The option that sets ``dataset_splits``, named in its messages.
DATASET_SPLITS_OPTION = "--hf-splits (CorpusConfig.dataset_splits)"


@dataclass
class CorpusConfig(JSONConfigMixin):
    """Where a corpus lives, how to read it and how to split it into train/valid/test.

    Args:
        path: a directory of text files (read recursively), a single text file, a JSON
            lines file (``.jsonl`` / ``.ndjson``, optionally ``.gz`` / ``.xz`` compressed),
            a Parquet file, or a directory written by 🤗 ``Dataset.save_to_disk`` /
            ``DatasetDict.save_to_disk`` (needs the ``hf-datasets`` extra; one document per
            row, see :mod:`hetgraph.corpus.hf_datasets`). ``None`` means the embedded Python
            3.11 documentation (:data:`hetgraph.corpus.EMBEDDED_CORPUS`).
        text_field: JSON lines: the field holding a document's text; datasets and Parquet:
            the column (of strings) holding it.
        id_field: JSON lines: the field holding a document's name (optional per line; a line
            without it is named ``<file>:<line>``). ``None`` always uses ``<file>:<line>``.
            Datasets and Parquet: the column naming a row's document, when it exists
            (otherwise rows are named by their index).
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
        dataset_splits: a ``DatasetDict``: use its own splits instead of hetgraph's split by
            document, mapping hetgraph's split names to the dataset's (e.g.
            :data:`DEFAULT_DATASET_SPLITS`, ``{"train": "train", "valid": "validation",
            "test": "test"}``); a hetgraph split left out stays empty, and ``fractions`` /
            ``seed`` are not used. ``max_documents`` then applies to each split. ``None``
            pools every split and splits the documents as usual.

    Raises:
        ConfigError: fractions that are not three non-negative numbers summing to 1,
            ``max_documents < 1``, a ``glob`` that is empty, absolute or climbs out of the
            directory with ``..``, or a ``document_separator`` that is not a valid regular
            expression (or matches the empty string), or ``dataset_splits`` that does not
            map some of ``"train"`` / ``"valid"`` / ``"test"`` to distinct split names.
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
    dataset_splits: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            self.path = str(self.path)
        fractions = tuple(float(f) for f in self.fractions)
        if len(fractions) != 3:
            raise ConfigError(
                f"fractions must be (train, valid, test), got {self.fractions!r}", "fractions"
            )
        if any(f < 0 or not math.isfinite(f) for f in fractions) or not math.isclose(
            sum(fractions), 1.0, abs_tol=1e-6
        ):
            raise ConfigError(
                f"fractions must be non-negative and sum to 1, got {self.fractions!r}", "fractions"
            )
        self.fractions = fractions  # type: ignore[assignment]
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(
                f"max_documents must be >= 1 or None, got {self.max_documents}", "max_documents"
            )
        if self.glob is not None:
            _check_glob(self.glob)
        if self.document_separator is not None:
            self.separator_pattern()
        if self.dataset_splits is not None:
            _check_dataset_splits(self.dataset_splits)
            self.dataset_splits = dict(self.dataset_splits)

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
                "lines",
                "document_separator",
            ) from None
        if pattern.fullmatch(""):
            raise ConfigError(
                f"document_separator {self.document_separator!r} matches the empty string; "
                "give a pattern that matches at least one character",
                "document_separator",
            )
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
        raise ConfigError(
            f"glob {pattern!r} is absolute, but only files inside the corpus "
            f"directory are read; {fix}",
            "glob",
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise ConfigError(
            f"glob {pattern!r} climbs out of the corpus directory with '..'; "
            f"{fix}, or point the corpus at a directory that holds the files",
            "glob",
        )


def parse_dataset_splits(text: str) -> dict[str, str]:
    r"""The ``dataset_splits`` that ``--hf-splits`` gives: ``""`` for
    :data:`DEFAULT_DATASET_SPLITS`, else ``"train=train,valid=dev"`` (a hetgraph split left
    out stays empty).

    Raises:
        ConfigError: ``text`` is not such a list, or names a split twice or one that is not
            ``train`` / ``valid`` / ``test``.
    """
    if not text.strip():
        return dict(DEFAULT_DATASET_SPLITS)
    mapping: dict[str, str] = {}
    for item in text.split(","):
        ours, sep, theirs = (part.strip() for part in item.partition("="))
        if not sep or not ours or not theirs or ours in mapping:
            raise ConfigError(
                f"--hf-splits {text!r}: expected OURS=THEIRS pairs separated by commas, each "
                "hetgraph split once, e.g. --hf-splits train=train,valid=validation,test=test",
                "dataset_splits",
            )
        mapping[ours] = theirs
    _check_dataset_splits(mapping)
    return mapping


def _check_dataset_splits(mapping: object) -> None:
    example = "e.g. {'train': 'train', 'valid': 'validation', 'test': 'test'}"
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(
            f"{DATASET_SPLITS_OPTION} must map hetgraph's splits to the "
            f"dataset's, {example}; got {mapping!r}",
            "dataset_splits",
        )
    unknown = sorted(str(key) for key in mapping if key not in SPLITS)
    if unknown:
        raise ConfigError(
            f"{DATASET_SPLITS_OPTION}: {', '.join(unknown)} is not a hetgraph "
            f"split; map train, valid and test ({example})",
            "dataset_splits",
        )
    names = list(mapping.values())
    if any(not isinstance(name, str) or not name.strip() for name in names):
        raise ConfigError(
            f"{DATASET_SPLITS_OPTION}: every dataset split name must be a "
            f"non-empty string, got {mapping!r}",
            "dataset_splits",
        )
    if len(set(names)) < len(names):
        raise ConfigError(
            f"{DATASET_SPLITS_OPTION} {mapping!r} uses one dataset split for two "
            "of hetgraph's (their documents would overlap); give each its own "
            "split",
            "dataset_splits",
        )
