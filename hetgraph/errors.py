"""The base class of every expected hetgraph failure.

Every error a user can cause and fix (a bad config, corpus, model folder, datastore, index
or adapter; a refused provenance; a lock held by another writer) is a :class:`HetgraphError`
whose message names the file or option and the fix. The CLI renders these as one
``error: …`` line (exit status 2); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class HetgraphError(ValueError):
    """An expected failure with a message that names the file or option and the fix.

    A :class:`ValueError` subclass, so code written against earlier versions that catches
    ``ValueError`` keeps working.
    """


class NonFiniteError(HetgraphError):
    """A NaN or infinite value where a result must be finite: keys, distances, logits, a
    loss or a perplexity. :attr:`stage` names where (``"base"``, ``"kNN"``, ``"GNN"``,
    ``"GNN+kNN"``, ``"retrieval"``, ``"training"`` …); the message says what to do.
    (Shared by evaluation and training, so it lives with the base class.)"""

    def __init__(self, message: str, stage: str) -> None:
        super().__init__(message)
        self.stage = stage
