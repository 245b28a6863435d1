#!/usr/bin/env python3
"""Build a second real corpus, of another domain than the embedded Python docs, from a
Debian ``dictd`` dictionary package (default: ``dict-gcide``).

``dict-gcide`` ships the GNU Collaborative International Dictionary of English (GPL-2+,
derived from Webster's Revised Unabridged Dictionary of 1913 and WordNet) in the ``dictd``
format: ``usr/share/dictd/gcide.index`` (``headword<TAB>offset<TAB>length``, the numbers in
dictd's base-64) and ``usr/share/dictd/gcide.dict.dz`` (gzip-readable text). This script
reads every entry once (entries listed under several headwords are de-duplicated by their
offset), in file order (alphabetical), drops the ``00-database-*`` meta entries, cuts the
entries into blocks of ``--entries-per-document`` consecutive entries and keeps every
``n``-th block so that about ``--target-chars`` characters remain, spread evenly over the
whole alphabet. Each kept block is one document (``{"id": "<block number> <first
headword> .. <last headword>", "text": ...}``), so the hash split into train / valid / test
by document works as on any corpus. The texts are unmodified dictionary entries.

Writes ``benchmarks/data/<name>.jsonl.xz`` (deterministic: xz carries no timestamps) and
``benchmarks/data/LICENSE-<name>.txt`` (the package's name, version and its Debian
``copyright`` file verbatim).

Usage::

    python scripts/extract_debian_corpus.py                   # apt-get download dict-gcide
    python scripts/extract_debian_corpus.py --deb dict-gcide_0.48.5+nmu2_all.deb
    python scripts/extract_debian_corpus.py --extracted /tmp/gcide/x   # output of `dpkg -x`
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from hetgraph.io import atomic_write

PACKAGE = "dict-gcide"
DICTIONARY = "gcide"
NAME = "gcide"
REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "benchmarks" / "data"
#: dictd's base-64 digits (``dictd/data.c``: ``b64_encode``).
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def download_deb(package: str, directory: Path) -> Path:
    """``apt-get download <package>`` into ``directory``; returns the .deb path."""
    subprocess.run(["apt-get", "download", package], cwd=directory, check=True)
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if not debs:
        raise SystemExit(f"apt-get download {package} produced no .deb in {directory}")
    return debs[-1]


def extract_deb(deb: Path, directory: Path) -> Path:
    """``dpkg-deb -x deb directory``; returns ``directory``."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(directory)], check=True)
    return directory


def debian_version(root: Path, package: str, deb: Path | None) -> str:
    """The package version, from the .deb's control data or the first changelog line."""
    if deb is not None:
        out = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        )
        return out.stdout.strip()
    changelog = root / "usr/share/doc" / package / "changelog.Debian.gz"
    if changelog.exists():
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            first = f.readline()
        if "(" in first and ")" in first:
            return first[first.index("(") + 1 : first.index(")")]
    return "unknown"


def b64_number(digits: str) -> int:
    """A dictd base-64 number (most significant digit first)."""
    value = 0
    for digit in digits:
        value = value * 64 + B64.index(digit)
    return value


def read_entries(root: Path, dictionary: str) -> list[tuple[str, str]]:
    """``[(headword, entry text)]`` of a dictd dictionary, once per entry, in file order."""
    base = root / "usr/share/dictd"
    index_path, data_path = base / f"{dictionary}.index", base / f"{dictionary}.dict.dz"
    if not index_path.is_file() or not data_path.is_file():
        raise SystemExit(
            f"{index_path} or {data_path} is missing: is {root} an extracted "
            f"dictd package with the dictionary {dictionary!r}?"
        )
    spans: dict[tuple[int, int], str] = {}
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-"):  # 00-database-*: meta entries
            continue
        key = (b64_number(parts[1]), b64_number(parts[2]))
        spans.setdefault(key, parts[0])  # first headword listed for this entry
    with gzip.open(data_path, "rb") as f:
        data = f.read()
    entries = []
    for (offset, length), headword in sorted(spans.items()):
        raw = data[offset : offset + length]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # a few entries carry Windows-1252 quotes
            text = raw.decode("cp1252", errors="replace")
        text = text.strip("\n")
        if text.strip():
            entries.append((headword, text + "\n"))
    return entries


def make_documents(
    entries: list[tuple[str, str]], per_document: int, target_chars: int
) -> list[dict[str, str]]:
    """Blocks of ``per_document`` consecutive entries; every n-th block is kept so that about
    ``target_chars`` characters remain, spread over the whole dictionary."""
    blocks = [entries[i : i + per_document] for i in range(0, len(entries), per_document)]
    total = sum(len(text) for _, text in entries)
    step = max(1, math.ceil(total / max(1, target_chars)))
    documents = []
    for number in range(0, len(blocks), step):
        block = blocks[number]
        documents.append(
            {
                "id": f"{number:05d} {block[0][0]} .. {block[-1][0]}",
                "text": "\n".join(text for _, text in block),
            }
        )
    return documents


def license_notice(
    root: Path, package: str, version: str, output_name: str, documents: int, chars: int
) -> str:
    """Provenance and the package's Debian copyright file, verbatim."""
    copyright_file = root / "usr/share/doc" / package / "copyright"
    rule = "=" * 78
    return "\n".join(
        [
            f"hetgraph benchmark corpus: {output_name}",
            rule,
            "",
            f"File: benchmarks/data/{output_name}",
            "",
            f"Source: the Debian package {package}, version {version}",
            f"(https://packages.debian.org/bookworm/{package}): the GNU Collaborative",
            "International Dictionary of English (GCIDE), derived from Webster's Revised",
            "Unabridged Dictionary (1913) and WordNet, in the dictd format.",
            f"A deterministic sample of {documents} blocks of consecutive dictionary entries",
            f"({chars:,} characters), spread evenly over the alphabet; the entry texts are",
            "unmodified. Each JSON line holds one block: its number and first and last",
            'headwords as "id", the entries as "text". Regenerate with',
            "scripts/extract_debian_corpus.py.",
            "",
            "GCIDE is free software under the GNU General Public License, version 2 or",
            "(at your option) any later version; the Debian copyright file follows.",
            "",
            rule,
            f"usr/share/doc/{package}/copyright (verbatim)",
            rule,
            "",
            copyright_file.read_text(encoding="utf-8", errors="replace").rstrip() + "\n",
        ]
    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:  # fsync'd temporary renamed onto ``path``
        f.write(data)


def unpacked_package(
    deb: Path | None, extracted: Path | None, package: str, tmp: Path
) -> tuple[Path, Path | None]:
    """``(root, deb)``: the ``dpkg -x`` tree of ``package`` — ``extracted`` as given, else
    ``deb`` (downloaded into ``tmp`` when ``None``) unpacked into ``tmp``."""
    if extracted is not None:
        return extracted, deb
    if deb is None:
        deb = download_deb(package, tmp)
    return extract_deb(deb, tmp / "x"), deb


def encode_jsonl_xz(documents: list[dict[str, str]]) -> bytes:
    """Deterministic xz-compressed JSON lines."""
    lines = "".join(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in documents)
    return lzma.compress(
        lines.encode("utf-8"),
        format=lzma.FORMAT_XZ,
        check=lzma.CHECK_CRC64,
        preset=9 | lzma.PRESET_EXTREME,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--deb", type=Path, help="an already downloaded .deb")
    source.add_argument("--extracted", type=Path, help="a directory produced by `dpkg -x`")
    parser.add_argument("--package", default=PACKAGE)
    parser.add_argument(
        "--dictionary",
        default=DICTIONARY,
        help="dictd dictionary name (usr/share/dictd/<name>.index)",
    )
    parser.add_argument("--name", default=NAME, help="output name: benchmarks/data/<name>...")
    parser.add_argument("--entries-per-document", type=int, default=40)
    parser.add_argument("--target-chars", type=int, default=1_300_000)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hetgraph-deb-") as tmp:
        root, deb = unpacked_package(args.deb, args.extracted, args.package, Path(tmp))
        version = debian_version(root, args.package, deb)
        entries = read_entries(root, args.dictionary)
        documents = make_documents(entries, args.entries_per_document, args.target_chars)
        data = encode_jsonl_xz(documents)
        chars = sum(len(doc["text"]) for doc in documents)
        output = DATA_DIR / f"{args.name}.jsonl.xz"
        _write_atomic(output, data)
        _write_atomic(
            DATA_DIR / f"LICENSE-{args.name}.txt",
            license_notice(root, args.package, version, output.name, len(documents), chars).encode(
                "utf-8"
            ),
        )
    print(
        f"wrote {len(documents)} documents ({chars / 1e6:.2f}M characters, "
        f"{len(entries):,} entries read) from {args.package} {version} to {output} "
        f"({len(data) / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
