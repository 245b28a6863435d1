"""The error of every expected knowledge-graph failure."""

from __future__ import annotations

from hetgraph.errors import HetgraphError


class KnowledgeGraphError(HetgraphError):
    """A triples or aliases file that cannot be read (named with its line), a knowledge-graph
    directory that is missing, damaged or built for another tokenizer, or a bad option;
    the message names the file or option and the fix."""
