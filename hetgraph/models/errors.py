"""The error raised for a model or tokenizer that cannot be loaded or used safely."""

from __future__ import annotations

from hetgraph.errors import HetgraphError


class ModelLoadError(HetgraphError):
    """A model or tokenizer could not be found, loaded or used; the message names the folder
    (or file) and says how to fix it.

    A :class:`~hetgraph.errors.HetgraphError`, hence a :class:`ValueError` (it used to be an
    :class:`OSError`).
    """


class CustomCodeError(ModelLoadError):
    """A model folder (or cached model) needs custom Python code, which hetgraph never runs."""
