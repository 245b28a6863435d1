"""Sphinx configuration of the hetgraph docs.

Build: ``.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html``.

Offline by default: ``intersphinx_mapping`` is empty unless ``HETGRAPH_DOCS_INTERSPHINX=1``
is set (then the torch / PyG / transformers / Python inventories are fetched, which needs
network). Pages under ``_generated/`` (API reference, benchmark results) and the context
graph figure are produced at build time by ``_ext/hetgraph_docs.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import hetgraph  # noqa: E402

project = "hetgraph"
author = "hetgraph developers"
copyright = "hetgraph developers, Apache-2.0"
release = version = hetgraph.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "hetgraph_docs",
]

exclude_patterns = ["_build", "_generated", "figures/*.py", ".gitignore"]
templates_path: list[str] = []
html_theme = "furo"
html_title = f"hetgraph {release}"
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_mock_imports: list[str] = []
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Remote inventories need network, which build machines of this project do not have.
intersphinx_mapping: dict[str, tuple[str, None]] = {}
if os.environ.get("HETGRAPH_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
        "torch_geometric": ("https://pytorch-geometric.readthedocs.io/en/latest", None),
        "transformers": ("https://huggingface.co/docs/transformers/main/en", None),
    }
intersphinx_timeout = 5
