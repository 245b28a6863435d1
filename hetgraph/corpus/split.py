"""Deterministic train/valid/test split by document.

Each document's name (its relative path or id) is hashed with SHA-256 together with a
seed into a number ``u`` uniform in ``[0, 1)``; ``u`` falls into the train, valid or test
interval given by the fractions. The assignment of a document therefore depends only on
its name, the seed and the fractions: not on the other documents, nor on their order,
and no document is ever in two splits.
"""

from __future__ import annotations

from collections.abc import Sequence

from hetgraph.io import sha256_hex

from .config import SPLITS
from .documents import Document


def document_hash(name: str, seed: int = 0) -> float:
    """The document's position in ``[0, 1)``: SHA-256 of ``"<seed>:<name>"``, first 8 bytes."""
    return int(sha256_hex(f"{seed}:{name}", length=16), 16) / 2**64  # 16 hex digits = 8 bytes


def split_documents(
    documents: Sequence[Document],
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
) -> dict[str, list[Document]]:
    """Split documents into ``{"train": [...], "valid": [...], "test": [...]}``.

    Inside each split, documents keep their input order.

    Fallback for small corpora: with at least three documents, every split whose fraction is
    positive gets at least one document. An empty split takes, from a split holding more than
    one document, the document whose hash lies closest to the empty split's interval (ties
    broken by name), so the result still does not depend on the input order. With fewer than
    three documents (or a zero fraction) some splits stay empty.

    Args:
        documents: the documents to split.
        fractions: ``(train, valid, test)``, non-negative, summing to 1.
        seed: mixed into every document's hash; another seed gives another split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions):
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions!r}")
    total = float(sum(fractions))
    if total <= 0:
        raise ValueError(f"fractions must not all be zero, got {fractions!r}")
    bounds: list[tuple[float, float]] = []
    low = 0.0
    for fraction in fractions:
        bounds.append((low, low + fraction / total))
        low += fraction / total

    hashes = [document_hash(doc.name, seed) for doc in documents]
    assignment: list[int] = []
    for u in hashes:
        index = next((i for i, (_, high) in enumerate(bounds) if u < high), None)
        if index is None:  # u beyond the last positive interval (rounding): last such split
            index = max(i for i, f in enumerate(fractions) if f > 0)
        assignment.append(index)

    if len(documents) >= 3:
        for empty in range(3):
            if fractions[empty] <= 0 or empty in assignment:
                continue
            low, high = bounds[empty]
            counts = [assignment.count(i) for i in range(3)]
            movable = [j for j, a in enumerate(assignment) if counts[a] > 1]
            best = min(
                movable,
                key=lambda j: (max(low - hashes[j], hashes[j] - high, 0.0), documents[j].name),
            )
            assignment[best] = empty

    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc, index in zip(documents, assignment, strict=True):
        splits[SPLITS[index]].append(doc)
    return splits
