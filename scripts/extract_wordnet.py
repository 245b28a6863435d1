#!/usr/bin/env python3
"""Extract WordNet 3.0 from Debian's ``wordnet-base`` as a knowledge graph for
``hetgraph kg build``.

``wordnet-base`` installs the WordNet database in ``/usr/share/wordnet`` (``data.noun``,
``data.verb``, ``data.adj``, ``data.adv``; format in ``wndb(5)``). Synsets become entities
(``n.02084071``), lemmas aliases (the first one the synset's name), pointers triples
(:data:`hetgraph.kg.wordnet.POINTER_RELATIONS`). Writes, deterministically (xz carries
no timestamps):

* ``benchmarks/data/wordnet-triples.tsv.xz`` — ``head<TAB>relation<TAB>tail``;
* ``benchmarks/data/wordnet-aliases.tsv.xz`` — ``entity<TAB>alias``;
* ``benchmarks/data/LICENSE-wordnet.txt`` — provenance and Debian's copyright file.

Usage::

    apt-get install -y wordnet-base
    python scripts/extract_wordnet.py [--parts nvar] [--wordnet /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import lzma
import subprocess
import sys
from pathlib import Path

from hetgraph.io import atomic_write
from hetgraph.kg.wordnet import (
    SHIPPED_ALIASES,
    SHIPPED_DIR,
    SHIPPED_TRIPLES,
    read_synsets,
    wordnet_tables,
)

PACKAGE = "wordnet-base"
REPO_ROOT = Path(__file__).resolve().parent.parent
PARTS = {"n": "nouns", "v": "verbs", "a": "adjectives", "r": "adverbs"}


def encode_tsv_xz(rows: list[tuple[str, ...]]) -> bytes:
    """Deterministic xz-compressed TSV lines."""
    text = "".join("\t".join(row) + "\n" for row in rows)
    return lzma.compress(
        text.encode("utf-8"),
        format=lzma.FORMAT_XZ,
        check=lzma.CHECK_CRC64,
        preset=9 | lzma.PRESET_EXTREME,
    )


def package_version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", PACKAGE], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def license_notice(
    parts: str, entities: int, triples: int, aliases: int, version: str, copyright_text: str
) -> str:
    """Provenance and the package's Debian copyright file, verbatim."""
    rule = "=" * 78
    kinds = ", ".join(PARTS[p] for p in parts)
    return "\n".join(
        [
            "hetgraph knowledge graph: WordNet 3.0",
            rule,
            "",
            f"Files: {SHIPPED_DIR / SHIPPED_TRIPLES}, {SHIPPED_DIR / SHIPPED_ALIASES}",
            "",
            f"Source: the Debian package {PACKAGE}, version {version}",
            f"(https://packages.debian.org/bookworm/{PACKAGE}): WordNet 3.0, the lexical",
            "database of English of Princeton University.",
            f"Extracted: the synsets of the {kinds} ({entities:,} entities, named",
            f"<pos>.<offset>), their lemmas as aliases ({aliases:,}; underscores as spaces,",
            f"the first lemma of a synset its name) and their pointers as {triples:,} triples",
            "(relation names: hetgraph/kg/wordnet.py POINTER_RELATIONS; lexical pointers kept",
            "at the synset level; duplicates and pointers to synsets not extracted dropped).",
            "Glosses are not included. Regenerate with scripts/extract_wordnet.py.",
            "",
            "WordNet is distributed under the WordNet 3.0 licence below, which asks that",
            "the copyright notice appear on all copies; the Debian copyright file follows.",
            "",
            rule,
            f"/usr/share/doc/{PACKAGE}/copyright (verbatim)",
            rule,
            "",
            copyright_text.rstrip() + "\n",
        ]
    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        f.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--wordnet",
        type=Path,
        default=Path("/usr/share/wordnet"),
        help="directory holding data.noun, data.verb, data.adj, data.adv",
    )
    parser.add_argument(
        "--copyright", type=Path, default=Path(f"/usr/share/doc/{PACKAGE}/copyright")
    )
    parser.add_argument(
        "--parts", default="nvar", help="parts of speech: n, v, a, r (default all four)"
    )
    args = parser.parse_args(argv)
    if not (args.wordnet / "data.noun").is_file():
        raise SystemExit(f"{args.wordnet}/data.noun is missing: apt-get install -y {PACKAGE}")
    synsets = list(read_synsets(args.wordnet, args.parts))
    triples, aliases = wordnet_tables(synsets)
    out = REPO_ROOT / SHIPPED_DIR
    triples_xz, aliases_xz = encode_tsv_xz(triples), encode_tsv_xz(aliases)
    _write_atomic(out / SHIPPED_TRIPLES, triples_xz)
    _write_atomic(out / SHIPPED_ALIASES, aliases_xz)
    notice = license_notice(
        args.parts,
        len(synsets),
        len(triples),
        len(aliases),
        package_version(),
        args.copyright.read_text(encoding="utf-8"),
    )
    _write_atomic(out / "LICENSE-wordnet.txt", notice.encode("utf-8"))
    print(
        f"wrote {len(synsets):,} entities, {len(triples):,} triples, {len(aliases):,} "
        f"aliases ({(len(triples_xz) + len(aliases_xz)) / 1e6:.2f} MB xz) to {out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
