r"""The on-disk cache of tokenized corpora.

A tokenized corpus is stored under ``<cache root>/<key>``, where the cache root is the
``cache_dir`` argument, else ``$HETGRAPH_CACHE/corpus``, else ``~/.cache/hetgraph/corpus``,
and the key hashes everything that determines the result: the tokenizer, the documents'
names and texts, and the corpus configuration. Entries are written into a temporary
directory that is renamed into place (:func:`hetgraph.io.atomic_directory`), so an
interrupted run never leaves a partial entry.

An entry's ``corpus.json`` records the size and SHA-256 of every file (and its own
checksum); they are checked whenever the entry is read. A damaged entry, or one written
before the record existed, is only a cache: it is rebuilt from the corpus with a warning
naming the file. :func:`corpus_cache_problems` reports the same checks without rebuilding
(``hetgraph verify``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetgraph.io import (
    CORPUS_CACHE_DIR,
    CORPUS_METADATA,
    StreamingHash,
    atomic_directory,
    cache_root,
    json_fingerprint,
)
from hetgraph.storage import process_alive

from .config import CorpusConfig
from .documents import Document
from .errors import CorpusError
from .tokenized import (
    FORMAT_VERSION,
    TokenizedCorpus,
    file_records,
    integrity_problems,
    read_metadata,
)

logger = logging.getLogger(__name__)

# What hetgraph.io.atomic_directory / atomic_path leave behind when killed: the temporary
# ".<name>.<pid>-<8 hex>.tmp" and, killed between its two renames, the old content
# ".<name>.old-<8 hex>".
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
_OLD_COPY = re.compile(r"^\.(?P<name>.+)\.old-[0-9a-f]{8}$")
_DELETE_HINT = re.compile(r"; delete (it|its directory|the directory) and tokenize again$")
_REBUILT = "it is rebuilt from the corpus when next used (or delete it)"


def default_cache_dir() -> Path:
    r"""``corpus`` under :func:`hetgraph.io.cache_root` (``$HETGRAPH_CACHE`` if set, else
    ``~/.cache/hetgraph``)."""
    return cache_root() / CORPUS_CACHE_DIR


def documents_fingerprint(documents: Sequence[Document]) -> str:
    r"""SHA-256 (16 hex digits) of the documents' names and texts, in order, each preceded
    by its length."""
    h = StreamingHash()
    for doc in documents:
        for part in (doc.name, doc.text):
            # surrogatepass: text read with surrogateescape may hold lone surrogates.
            h.update_framed(part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def tokenizer_cache_fingerprint(tokenizer: Any) -> str:
    """Vocabulary and special tokens, plus the full backend definition of fast tokenizers."""
    from hetgraph.models.fingerprint import tokenizer_fingerprint

    h = StreamingHash(tokenizer_fingerprint(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str())
    h.update(f"{type(tokenizer).__name__}:{tokenizer.eos_token_id}")
    return h.hexdigest()


def cache_key(tokenizer: Any, documents: Sequence[Document], config: CorpusConfig) -> str:
    """The cache entry's name: a hash of tokenizer, documents and configuration."""
    settings = config.to_dict()
    settings.pop("path")  # the documents' content is hashed instead
    if settings.get("dataset_splits") is None:  # keeps the keys of entries written before it
        settings.pop("dataset_splits", None)
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_cache_fingerprint(tokenizer),
        "documents": documents_fingerprint(documents),
        "config": settings,
    }
    return json_fingerprint(payload, length=24)


def load_cached(directory: Path) -> TokenizedCorpus | None:
    r"""The corpus stored in ``directory``; ``None`` if absent, or (with a warning naming the
    file) damaged, unreadable or written without checksums, so that the caller rebuilds it."""
    if not directory.is_dir():
        return None
    try:
        if file_records(read_metadata(directory)) is None:
            raise CorpusError(
                f"{directory / CORPUS_METADATA} records no checksums (written by an older hetgraph)"
            )
        return TokenizedCorpus.load(directory)
    except (OSError, CorpusError) as error:
        logger.warning(
            "not using corpus cache entry %s: %s; rebuilding it from the corpus",
            directory.name,
            _without_hint(error),
        )
        return None


def corpus_cache_problems(directory: str | Path) -> list[str]:
    r"""What is wrong with a corpus cache: one line per problem, naming the file; empty
    when it is sound.

    ``directory`` is one cache entry (it holds ``corpus.json``) or a cache root holding
    entries (e.g. ``$HETGRAPH_CACHE/corpus``). Every file is compared with the sizes and
    full SHA-256 checksums recorded in ``corpus.json``, whose own checksum is checked too;
    an entry without that record (written by an older hetgraph) is reported as stale. A
    damaged entry does no harm (it is rebuilt when next used), so each line says so.
    """
    directory = Path(directory)
    if (directory / CORPUS_METADATA).exists():
        return _entry_problems(directory)
    if not directory.is_dir():
        return [f"{directory} is not a corpus cache directory (it does not exist)"]
    entries = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not entries:
        return [
            f"{directory} holds no corpus cache entry (no {CORPUS_METADATA}, no entry directories)"
        ]
    return [problem for entry in entries for problem in _entry_problems(entry)]


def _entry_problems(entry: Path) -> list[str]:
    try:
        metadata = read_metadata(entry)
    except (OSError, CorpusError) as error:
        return [f"{_without_hint(error)}; {_REBUILT}"]
    if file_records(metadata) is None:
        return [
            f"{entry / CORPUS_METADATA} records no checksums (written by an older "
            f"hetgraph), so the entry cannot be checked; {_REBUILT}"
        ]
    problems = integrity_problems(entry, metadata, full=True)
    if not problems:
        try:  # the files match their record; check that they also parse
            TokenizedCorpus.load(entry, mmap=True)
        except (OSError, CorpusError) as error:
            problems = [_without_hint(error)]
    return [f"{problem}; {_REBUILT}" for problem in problems]


def _without_hint(error: Exception) -> str:
    # The cache rebuilds an entry itself: the loader's "delete ... and tokenize again" is moot.
    return _DELETE_HINT.sub("", str(error))


def remove_dead_temporaries(directory: str | Path) -> list[Path]:
    r"""Delete what killed writers left in a cache directory; return what was removed.

    Removed: temporaries of :func:`~hetgraph.io.atomic_directory` and
    :func:`~hetgraph.io.atomic_path` (``.<name>.<pid>-<hex>.tmp``, files or directories)
    whose writer process ``<pid>`` no longer runs on this machine, and old copies
    (``.<name>.old-<hex>``) left by a writer killed while swapping ``<name>``, once
    ``<name>`` is in place again. A temporary whose writer is alive
    (:func:`hetgraph.storage.process_alive`) is kept. Caches are not locked (so
    :func:`hetgraph.storage.remove_stale_temporaries`, which assumes a lock, does not fit): this
    relies on the process id, and on a cache shared between machines another machine's
    live writer could lose its temporary (and then fail, without damage).
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        temporary = _TEMPORARY.match(path.name)
        old = _OLD_COPY.match(path.name)
        if temporary is not None:
            stale = not process_alive(int(temporary["pid"]))
        else:
            stale = old is not None and (directory / old["name"]).exists()
        if not stale:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if not path.exists():
            removed.append(path)
    if removed:
        logger.info(
            "removed %d leftover(s) of interrupted writes in %s: %s",
            len(removed),
            directory,
            ", ".join(p.name for p in removed),
        )
    return removed


def store_atomically(corpus: TokenizedCorpus, directory: Path) -> None:
    r"""Save ``corpus`` to ``directory`` via a temporary directory and a rename, replacing an
    (unreadable) entry already there; another process storing the same entry first wins."""
    with atomic_directory(directory, accept_existing=lambda d: load_cached(d) is not None) as tmp:
        corpus.save(tmp)
    corpus.path = directory
