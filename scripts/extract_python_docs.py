#!/usr/bin/env python3
"""Build hetgraph's embedded default corpus from Debian's ``python3.11-doc`` package.

The package ships the reStructuredText sources of the Python 3.11 documentation
(``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``, PSF licence). This script
writes them, one JSON object per document (``{"id": <relative path>, "text": ...}``,
sorted by id), to ``hetgraph/corpus/data/python311_docs.jsonl.xz`` and writes the
licence notice next to it. The output is byte-for-byte deterministic for a given
package version.

Usage::

    python scripts/extract_python_docs.py                      # apt-get download python3.11-doc
    python scripts/extract_python_docs.py --deb python3.11-doc_3.11.2-6+deb12u9_all.deb
    python scripts/extract_python_docs.py --extracted /tmp/pydoc/x   # output of `dpkg -x`
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The .deb download and unpacking are shared with the second corpus's script (a sibling
# module: scripts run as `python scripts/<name>.py`).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_debian_corpus import _write_atomic, encode_jsonl_xz, unpacked_package

PACKAGE = "python3.11-doc"
SOURCES_DIR = Path("usr/share/doc/python3.11/html/_sources")
DEBIAN_COPYRIGHT = Path("usr/share/doc/python3.11-doc/copyright")
DEBIAN_CHANGELOG = Path("usr/share/doc/python3.11-doc/changelog.Debian.gz")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "hetgraph" / "corpus" / "data" / "python311_docs.jsonl.xz"
DEFAULT_LICENSE = REPO_ROOT / "hetgraph" / "corpus" / "data" / "LICENSE-python-docs.txt"


def debian_version(root: Path, deb: Path | None) -> str:
    """The Debian package version, from the .deb's control data or the changelog."""
    if deb is not None:
        out = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        )
        return out.stdout.strip()
    changelog = root / DEBIAN_CHANGELOG
    if changelog.exists():
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            match = re.match(r"\S+ \(([^)]+)\)", f.readline())
        if match:
            return match.group(1)
    return "unknown"


def collect_documents(root: Path) -> list[dict[str, str]]:
    """All ``*.rst.txt`` sources under ``root``, sorted by their relative path."""
    sources = root / SOURCES_DIR
    if not sources.is_dir():
        raise SystemExit(f"{sources} does not exist: is {root} an extracted {PACKAGE} package?")
    documents = []
    for path in sorted(sources.rglob("*.rst.txt"), key=lambda p: p.relative_to(sources).as_posix()):
        text = path.read_text(encoding="utf-8")
        if text.strip():
            documents.append({"id": path.relative_to(sources).as_posix(), "text": text})
    return documents


def _section(text: str, start_heading: str, end_heading: str) -> str:
    start = text.index(start_heading)
    end = text.index(end_heading, start)
    return text[start:end].rstrip() + "\n"


def license_notice(root: Path, version: str) -> str:
    """Provenance, copyright and licence text for the embedded corpus."""
    sources = root / SOURCES_DIR
    copyright_rst = (sources / "copyright.rst.txt").read_text(encoding="utf-8")
    license_rst = (sources / "license.rst.txt").read_text(encoding="utf-8")
    terms = _section(
        license_rst,
        "Terms and conditions for accessing or otherwise using Python",
        "Licenses and Acknowledgements for Incorporated Software",
    )
    debian_copyright = (root / DEBIAN_COPYRIGHT).read_text(encoding="utf-8")
    rule = "=" * 78
    return "\n".join(
        [
            "hetgraph embedded corpus: Python 3.11 documentation sources",
            rule,
            "",
            "File: hetgraph/corpus/data/python311_docs.jsonl.xz",
            "",
            f"Source: the Debian package {PACKAGE}, version {version}",
            f"(https://packages.debian.org/bookworm/{PACKAGE}), files",
            f"{SOURCES_DIR.as_posix()}/**/*.rst.txt, i.e. the reStructuredText sources",
            "of the Python 3.11 documentation (https://docs.python.org/3.11/).",
            "The texts are unmodified; each JSON line holds one source file: its path",
            'relative to _sources/ as "id" and its content as "text".',
            "Regenerate with scripts/extract_python_docs.py.",
            "",
            "The documentation is Copyright (c) 2001-2023 Python Software Foundation and",
            "is distributed under the PSF License Agreement; code examples in it are also",
            "available under the Zero-Clause BSD licence. The notices follow.",
            "",
            rule,
            "From the documentation, copyright.rst.txt",
            rule,
            "",
            copyright_rst.rstrip() + "\n",
            rule,
            "From the documentation, license.rst.txt",
            rule,
            "",
            terms,
            rule,
            f"The Debian package's {DEBIAN_COPYRIGHT.as_posix()} (verbatim)",
            rule,
            "",
            debian_copyright.rstrip() + "\n",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--deb", type=Path, help=f"an already downloaded {PACKAGE} .deb")
    source.add_argument("--extracted", type=Path, help="a directory produced by `dpkg -x`")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--license-output", type=Path, default=DEFAULT_LICENSE)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hetgraph-pydoc-") as tmp:
        root, deb = unpacked_package(args.deb, args.extracted, PACKAGE, Path(tmp))
        version = debian_version(root, deb)
        documents = collect_documents(root)
        data = encode_jsonl_xz(documents)
        _write_atomic(args.output, data)
        _write_atomic(args.license_output, license_notice(root, version).encode("utf-8"))

    chars = sum(len(doc["text"]) for doc in documents)
    print(
        f"wrote {len(documents)} documents ({chars / 1e6:.1f}M characters) from {PACKAGE} "
        f"{version} to {args.output} ({len(data) / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
