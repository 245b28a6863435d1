r"""WordNet 3.0 as a knowledge graph: the ``wndb(5)`` data-file parser behind
``scripts/extract_wordnet.py``, and the shipped extract it writes.

Each synset is an entity named ``<pos>.<offset>`` (``n.02084071``; adjective satellites
share ``a``), its lemmas (underscores as spaces, adjective markers such as ``(p)``
removed) are its aliases, the first lemma its name. Every pointer becomes a triple whose
relation is the pointer symbol's name (:data:`POINTER_RELATIONS`); lexical pointers
(between two lemmas, e.g. antonyms) are kept at the synset level, and duplicates dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hetgraph.kg.errors import KnowledgeGraphError

#: ``wndb(5)`` pointer symbols and the relation names hetgraph gives them.
POINTER_RELATIONS: dict[str, str] = {
    "!": "antonym",
    "@": "hypernym",
    "@i": "instance_hypernym",
    "~": "hyponym",
    "~i": "instance_hyponym",
    "#m": "member_holonym",
    "#s": "substance_holonym",
    "#p": "part_holonym",
    "%m": "member_meronym",
    "%s": "substance_meronym",
    "%p": "part_meronym",
    "=": "attribute",
    "+": "derivation",
    ";c": "domain_topic",
    "-c": "member_of_domain_topic",
    ";r": "domain_region",
    "-r": "member_of_domain_region",
    ";u": "domain_usage",
    "-u": "member_of_domain_usage",
    "*": "entailment",
    ">": "cause",
    "^": "also_see",
    "$": "verb_group",
    "&": "similar_to",
    "<": "participle",
    "\\": "pertainym",
}
#: Data files by part of speech (the letter used in entity ids).
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
#: The shipped extract (``scripts/extract_wordnet.py``), relative to the repository root.
SHIPPED_DIR = Path("benchmarks") / "data"
SHIPPED_TRIPLES = "wordnet-triples.tsv.xz"
SHIPPED_ALIASES = "wordnet-aliases.tsv.xz"
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    r"""One parsed data line: ``entity`` id, ``lemmas`` (spaces, not underscores) and
    ``pointers`` as ``(relation, target entity)``."""

    entity: str
    lemmas: tuple[str, ...]
    pointers: tuple[tuple[str, str], ...]


def entity_id(pos: str, offset: str) -> str:
    r"""``"n.02084071"`` for ``("n", "02084071")``; satellites (``s``) are adjectives."""
    return f"{'a' if pos == 's' else pos}.{offset}"


def parse_data_line(line: str) -> Synset | None:
    r"""A ``wndb(5)`` data line as a :class:`Synset`; ``None`` for the licence header
    (lines starting with two spaces) and blank lines.

    Raises:
        ValueError: a line that does not follow the format (the caller names file and line).
    """
    if not line.strip() or line.startswith("  "):
        return None
    fields = line.split(" | ", 1)[0].split()
    offset, pos = fields[0], fields[2]
    w_cnt = int(fields[3], 16)
    lemmas = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(w_cnt))
    at = 4 + 2 * w_cnt
    p_cnt = int(fields[at])
    pointers = []
    for i in range(p_cnt):
        symbol, target, target_pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
        if symbol not in POINTER_RELATIONS:
            raise ValueError(f"unknown pointer symbol {symbol!r}")
        pointers.append((POINTER_RELATIONS[symbol], entity_id(target_pos, target)))
    return Synset(entity_id(pos, offset), lemmas, tuple(pointers))


def read_synsets(directory: str | Path, parts: Iterable[str] = "nvar") -> Iterator[Synset]:
    r"""Every synset of the data files of ``parts`` (letters of :data:`DATA_FILES`) in
    ``directory`` (``/usr/share/wordnet`` of Debian's ``wordnet-base``)."""
    for pos in parts:
        path = Path(directory) / DATA_FILES[pos]
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    synset = parse_data_line(line)
                except (ValueError, IndexError) as error:
                    raise ValueError(f"{path} line {number}: {error}") from None
                if synset is not None:
                    yield synset


def wordnet_tables(
    synsets: Iterable[Synset],
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    r"""``(triples, aliases)`` of ``synsets``: triples ``(head, relation, tail)`` without
    duplicates and without tails outside ``synsets``; aliases ``(entity, lemma)`` with each
    synset's first lemma first (its name)."""
    synsets = list(synsets)
    known = {s.entity for s in synsets}
    triples: dict[tuple[str, str, str], None] = {}
    aliases: dict[tuple[str, str], None] = {}
    for synset in synsets:
        for lemma in synset.lemmas:
            aliases.setdefault((synset.entity, lemma))
        for relation, tail in synset.pointers:
            if tail in known and tail != synset.entity:
                triples.setdefault((synset.entity, relation, tail))
    return list(triples), list(aliases)


def shipped_wordnet(root: str | Path | None = None) -> tuple[Path, Path]:
    r"""``(triples, aliases)`` paths of the shipped WordNet extract under ``root`` (default:
    the source checkout this package lives in), for ``hetgraph kg build``.

    Raises:
        KnowledgeGraphError: not a source checkout (the extract ships with the repository,
            not the wheel); run ``scripts/extract_wordnet.py`` to make it.
    """
    base = Path(root) if root is not None else Path(__file__).resolve().parents[2]
    paths = base / SHIPPED_DIR / SHIPPED_TRIPLES, base / SHIPPED_DIR / SHIPPED_ALIASES
    for path in paths:
        if not path.is_file():
            raise KnowledgeGraphError(
                f"{path} is missing: the WordNet extract ships with the hetgraph repository "
                "(benchmarks/data); run scripts/extract_wordnet.py to make it"
            )
    return paths
