"""The corpus embedded in the package: the Python 3.11 documentation sources.

497 reStructuredText files (about 11M characters) from Debian's ``python3.11-doc``
package, under the PSF licence (see ``data/LICENSE-python-docs.txt``), stored as
xz-compressed JSON lines ``{"id": <relative path>, "text": ...}``. Rebuild it with
``scripts/extract_python_docs.py``.
"""

from __future__ import annotations

from pathlib import Path

#: Path of the embedded default corpus (JSON lines, xz-compressed).
EMBEDDED_CORPUS: Path = Path(__file__).resolve().parent / "data" / "python311_docs.jsonl.xz"

#: Licence and provenance notice of :data:`EMBEDDED_CORPUS`.
EMBEDDED_CORPUS_LICENSE: Path = EMBEDDED_CORPUS.with_name("LICENSE-python-docs.txt")
