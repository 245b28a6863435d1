r"""A knowledge graph on disk: entities, relations, triples and aliases as token ids.

A knowledge-graph directory (``hetgraph kg build``) holds

* ``kg.json`` — the manifest: format version, counts, the alias config, the source files'
  checksums, the tokenizer's fingerprints, a content fingerprint, every other file's size
  and checksums (``integrity``), and after ``hetgraph kg embed`` the embedding model, its
  settings and valid metrics; written last, with its own checksum;
* ``entities.json`` (ids and names), ``relations.json``, ``aliases.json`` (the alias
  texts and their entities, as read);
* ``triples.npy`` — ``int32 [N, 3]`` of (head, relation, tail) indices;
* ``alias_tokens.npy`` / ``alias_offsets.npy`` / ``alias_entities.npy`` — the aliases as
  token sequences of the LM's tokenizer (:mod:`hetgraph.kg.aliases`), and
  ``token_flags.npy``, the tokenizer's word-boundary flags;
* ``embeddings.safetensors`` after ``hetgraph kg embed``.

:meth:`KnowledgeGraph.shuffled` (``hetgraph kg shuffle``) gives the control graph of an
experiment: the same entities, aliases and relation mix, each entity's facts moved to
another entity by a seeded permutation.

The directory is written as a whole (:func:`~hetgraph.io.atomic_directory`); building the
same inputs with the same tokenizer again finds it complete and keeps it. Opening compares
sizes and sampled checksums (:func:`~hetgraph.integrity.check_file_record`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_digest,
    file_record,
    read_json_record,
)
from hetgraph.io import (
    INTEGRITY_KEY,
    atomic_directory,
    atomic_save_npy,
    atomic_write_json,
    json_fingerprint,
    read_json,
)
from hetgraph.kg.aliases import AliasConfig, AliasSequences, token_flags, tokenize_aliases
from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.kg.linking import EntityLinker
from hetgraph.kg.triples import read_aliases, read_triples
from hetgraph.models.fingerprint import (
    array_fingerprint,
    tokenizer_behaviour_fingerprint,
    tokenizer_fingerprint,
    tokenizer_matches,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "hetgraph-knowledge-graph"
MANIFEST = "kg.json"
EMBEDDINGS = "embeddings.safetensors"
_JSON_FILES = ("entities.json", "relations.json", "aliases.json")
_ARRAYS = {
    "triples": np.int32,
    "alias_tokens": np.int32,
    "alias_offsets": np.int64,
    "alias_entities": np.int32,
    "token_flags": np.uint8,
}


#: Manifest entries that do not decide a graph's content: derived from its arrays, written
#: by :meth:`KnowledgeGraph.save_pretrained`, or added later (``kg embed``).
_NOT_RECORD = (
    "format_version",
    "kind",
    "counts",
    "content",
    "fingerprint",
    "embeddings",
    INTEGRITY_KEY,
)


def entity_permutation(num_entities: int, seed: int) -> np.ndarray:
    r"""The seeded permutation :math:`\pi` of :meth:`KnowledgeGraph.shuffled`: ``int64
    [num_entities]``, entry ``e`` the entity that gets entity ``e``'s facts.

    The stable argsort of ``num_entities`` raw 64-bit words of numpy's ``PCG64(seed)``: a
    uniformly random permutation (ties have probability about :math:`n^2 / 2^{65}` and are
    broken by index) that depends on the bit generator's stream alone, which numpy keeps
    the same across versions and machines (``Generator.permutation``'s algorithm may
    change between versions).
    """
    words = np.random.PCG64(seed).random_raw(num_entities)
    return np.argsort(np.asarray(words, dtype=np.uint64), kind="stable").astype(np.int64)


def _rebuild(directory: Path) -> str:
    return f"rebuild it with `hetgraph kg build --out {directory} --overwrite`"


@dataclass
class KnowledgeGraph:
    r"""A knowledge graph with its aliases tokenised for one tokenizer.

    Build one with :meth:`build` (or ``hetgraph kg build``), write it with
    :meth:`save_pretrained`, open it with :meth:`from_pretrained`; :meth:`linker` links
    token ids to its entities.

    Attributes:
        entity_ids, entity_names: per entity index, its id in the source files and its
            name (its first alias, else its id).
        relations: per relation index, its name.
        triples: ``int32 [N, 3]`` (head, relation, tail).
        alias_entities, alias_texts: the aliases as read.
        sequences: the aliases as token sequences (:class:`AliasSequences`).
        flags: the tokenizer's :func:`~hetgraph.kg.aliases.token_flags`.
        manifest: what ``kg.json`` records (sources, tokenizer, config, embeddings …).
    """

    entity_ids: list[str]
    entity_names: list[str]
    relations: list[str]
    triples: np.ndarray
    alias_entities: list[int]
    alias_texts: list[str]
    sequences: AliasSequences
    flags: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_entities(self) -> int:
        r"""Entities."""
        return len(self.entity_ids)

    @property
    def num_relations(self) -> int:
        r"""Relation types."""
        return len(self.relations)

    @classmethod
    def build(
        cls,
        triples_path: str | Path,
        aliases_path: str | Path | None,
        tokenizer: Any,
        config: AliasConfig | None = None,
    ) -> KnowledgeGraph:
        r"""Read a triples file (and an aliases file) and tokenise the aliases.

        Entities are numbered in order of first appearance (triples, then aliases), as are
        relations. An entity's name is its first alias, else its id; entities without an
        alias cannot be linked (their facts are still there).

        Raises:
            KnowledgeGraphError: a file that cannot be read (its name and line).
        """
        config = config or AliasConfig()
        rows = read_triples(triples_path)
        alias_rows = read_aliases(aliases_path) if aliases_path is not None else []
        entities: dict[str, int] = {}
        relations: dict[str, int] = {}
        for head, relation, tail in rows:
            entities.setdefault(head, len(entities))
            relations.setdefault(relation, len(relations))
            entities.setdefault(tail, len(entities))
        for entity, _ in alias_rows:
            entities.setdefault(entity, len(entities))
        triples = np.array(
            [(entities[h], relations[r], entities[t]) for h, r, t in rows], dtype=np.int32
        ).reshape(-1, 3)
        names = list(entities)
        named: set[int] = set()
        for entity, alias in alias_rows:
            if entities[entity] not in named:
                named.add(entities[entity])
                names[entities[entity]] = alias
        pairs = [(entities[e], alias) for e, alias in alias_rows]
        alias_entities, alias_texts = [e for e, _ in pairs], [a for _, a in pairs]
        sequences = tokenize_aliases(pairs, tokenizer, config)
        manifest = build_record(triples_path, aliases_path, tokenizer, config)
        return cls(
            list(entities),
            names,
            list(relations),
            triples,
            alias_entities,
            alias_texts,
            sequences,
            token_flags(tokenizer),
            manifest,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        r"""The ``.npy`` arrays of the directory, by name."""
        return {
            "triples": self.triples,
            "alias_tokens": self.sequences.tokens,
            "alias_offsets": self.sequences.offsets,
            "alias_entities": self.sequences.entities,
            "token_flags": self.flags,
        }

    def counts(self) -> dict[str, int]:
        r"""Entities, relations, triples, aliases, alias token sequences, dropped aliases."""
        return {
            "entities": self.num_entities,
            "relations": self.num_relations,
            "triples": int(self.triples.shape[0]),
            "aliases": len(self.alias_texts),
            "alias_sequences": int(self.sequences.entities.shape[0]),
            "dropped_long_aliases": int(self.sequences.dropped),
            "vocabulary": int(self.flags.shape[0]),
        }

    def save_pretrained(self, directory: str | Path) -> None:
        r"""Write the directory as a whole (atomically; see the module docstring)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            atomic_write_json(
                tmp / "entities.json",
                {"ids": self.entity_ids, "names": self.entity_names},
                ensure_ascii=False,
            )
            atomic_write_json(tmp / "relations.json", {"names": self.relations}, ensure_ascii=False)
            atomic_write_json(
                tmp / "aliases.json",
                {"entities": self.alias_entities, "texts": self.alias_texts},
                ensure_ascii=False,
            )
            for name, array in self.arrays().items():
                atomic_save_npy(tmp / f"{name}.npy", np.ascontiguousarray(array, _ARRAYS[name]))
            manifest = {
                key: value
                for key, value in self.manifest.items()
                if key not in ("embeddings", INTEGRITY_KEY)
            }
            manifest.update(
                format_version=FORMAT_VERSION,
                kind=KIND,
                counts=self.counts(),
                content=array_fingerprint(*self.arrays().values()),
            )
            files = [*_JSON_FILES, *(f"{name}.npy" for name in _ARRAYS)]
            manifest[INTEGRITY_KEY] = {name: file_record(tmp / name) for name in files}
            atomic_write_json_record(tmp / MANIFEST, manifest)
        self.manifest = manifest

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, tokenizer: Any = None, *, full: bool = False
    ) -> KnowledgeGraph:
        r"""Open a knowledge-graph directory, checking every file's size and sampled
        checksum (all of each file with ``full``) and, given a ``tokenizer``, that the
        aliases were tokenised by the same one.

        Raises:
            KnowledgeGraphError: missing, damaged, of another format version, or built for
                another tokenizer; the message names the file and the fix.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        for name, record in manifest[INTEGRITY_KEY].items():
            problem = check_file_record(directory / name, record, full=full)
            if problem is not None:
                raise KnowledgeGraphError(f"{directory / name} {problem}; {_rebuild(directory)}")
        if tokenizer is not None:
            differs = tokenizer_matches(manifest["tokenizer"], tokenizer)
            if differs is not None:
                raise KnowledgeGraphError(
                    f"{directory} was built for another tokenizer than this model's ({differs}); "
                    f"build it for this model: hetgraph kg build --model … --out {directory} "
                    "--overwrite"
                )
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
        entities = read_json(directory / "entities.json")
        aliases = read_json(directory / "aliases.json")
        sequences = AliasSequences(
            arrays["alias_tokens"],
            arrays["alias_offsets"],
            arrays["alias_entities"],
            manifest["counts"]["dropped_long_aliases"],
        )
        return cls(
            entities["ids"],
            entities["names"],
            read_json(directory / "relations.json")["names"],
            arrays["triples"],
            aliases["entities"],
            aliases["texts"],
            sequences,
            arrays["token_flags"],
            manifest,
        )

    def shuffle_record(self, seed: int) -> dict[str, Any]:
        r"""The manifest record of :meth:`shuffled` ``(seed)``: this graph's build record
        (sources, alias config, tokenizer) with ``"shuffled": {"seed", "from"}`` (``from``:
        this graph's content fingerprint) and a ``fingerprint`` over all of it, so the
        control never looks like its source (``hetgraph kg shuffle`` compares it with an
        existing output directory before shuffling)."""
        record = {key: value for key, value in self.manifest.items() if key not in _NOT_RECORD}
        record["shuffled"] = {
            "seed": int(seed),
            "from": array_fingerprint(*self.arrays().values()),
        }
        return {**record, "fingerprint": json_fingerprint(record)}

    def shuffled(self, seed: int) -> KnowledgeGraph:
        r"""A control graph: every triple ``(h, r, t)`` becomes ``(π(h), r, t)`` for the
        seeded permutation :math:`\pi` of :func:`entity_permutation`, so a mention of
        entity ``e`` gets the facts of :math:`\pi^{-1}(e)` — the same relation mix and the
        same number of facts per entity slot, in the same order, but about another entity.
        Tails are not permuted: with ``tails=True`` a mentioned entity still sees the facts
        that name it as their tail, under a shuffled head.

        Entities, relations, aliases, alias token sequences and flags are this graph's;
        the manifest is :meth:`shuffle_record` (no embeddings: embed the control with the
        real graph's ``hetgraph kg embed`` settings). ``seed``: a non-negative integer.
        """
        permutation = entity_permutation(self.num_entities, seed)
        triples = np.array(self.triples, dtype=np.int32, copy=True).reshape(-1, 3)
        triples[:, 0] = permutation[triples[:, 0]]
        if _same_rows(triples, self.triples):
            logger.warning(
                "shuffling with seed %d left the multiset of facts as it was (%d entities, "
                "%d triples): the control is the graph itself",
                seed,
                self.num_entities,
                triples.shape[0],
            )
        return replace(
            self,
            entity_ids=list(self.entity_ids),
            entity_names=list(self.entity_names),
            relations=list(self.relations),
            triples=triples,
            alias_entities=list(self.alias_entities),
            alias_texts=list(self.alias_texts),
            manifest=self.shuffle_record(seed),
        )

    def linker(self, max_entities: int = 4, *, word_boundaries: bool = True) -> EntityLinker:
        r"""An :class:`~hetgraph.kg.linking.EntityLinker` over this graph's aliases
        (``word_boundaries=False`` matches inside words too)."""
        return EntityLinker(
            self.sequences.tokens,
            self.sequences.offsets,
            self.sequences.entities,
            max_entities=max_entities,
            flags=self.flags if word_boundaries else None,
        )


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two ``[N, 3]`` arrays hold the same rows, counted with multiplicity."""
    a, b = np.asarray(a).reshape(-1, 3), np.asarray(b).reshape(-1, 3)
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]))


def build_record(
    triples_path: str | Path, aliases_path: str | Path | None, tokenizer: Any, config: AliasConfig
) -> dict[str, Any]:
    r"""What decides a build's content — the source files' checksums, the alias config and
    the tokenizer's fingerprints — and its ``fingerprint``; cheap (nothing is parsed), so a
    complete directory of the same build is recognised before any work.

    Raises:
        KnowledgeGraphError: a source file is missing.
    """
    sources = {}
    for role, path in (("triples", triples_path), ("aliases", aliases_path)):
        if path is None:
            continue
        if not Path(path).is_file():
            raise KnowledgeGraphError(
                f"{path}: file not found; give an existing {role} file (TSV or JSON lines)"
            )
        sources[role] = {"name": Path(path).name, "sha256": file_digest(path)}
    fingerprints = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenizer_behaviour": tokenizer_behaviour_fingerprint(tokenizer),
    }
    record = {"sources": sources, "config": config.to_dict(), "tokenizer": fingerprints}
    return {**record, "fingerprint": json_fingerprint(record)}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    r"""The checked ``kg.json`` of ``directory``.

    Raises:
        KnowledgeGraphError: missing, damaged, not a knowledge graph or another format.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise KnowledgeGraphError(
            f"{directory}: no such knowledge-graph directory; build one "
            "with `hetgraph kg build --triples FILE --out DIR`"
        )
    manifest = read_json_record(path, KnowledgeGraphError, _rebuild(directory))
    if manifest.get("kind") != KIND:
        raise KnowledgeGraphError(
            f"{path} is not a hetgraph knowledge-graph manifest; "
            "give the --out directory of `hetgraph kg build`"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise KnowledgeGraphError(
            f"{path} has format version {manifest.get('format_version')}, this hetgraph reads "
            f"{FORMAT_VERSION}; {_rebuild(directory)}"
        )
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    r"""Replace ``kg.json`` of ``directory`` atomically (with its checksum)."""
    atomic_write_json_record(Path(directory) / MANIFEST, manifest)
