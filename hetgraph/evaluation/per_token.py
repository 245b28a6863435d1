r"""Per-token evaluation files read back, and paired comparisons between two runs.

``hetgraph eval --per-token FILE`` (:func:`~hetgraph.evaluation.write_per_token`) keeps every
scored token's document, position, target and each method's log-probability. Two runs scored
on the same tokens (the same split, sample and seed) can then be compared *paired*: the ratio
of their perplexities and its document-bootstrap interval
(:mod:`hetgraph.evaluation.intervals`), with both runs' perplexities of a resample drawn
over the same documents. That is how an adapter trained on random neighbours is compared
with the same adapter on retrieved ones, or paper mode with hetgraph's default, although each
was evaluated by its own ``hetgraph eval``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetgraph.errors import HetgraphError
from hetgraph.evaluation.intervals import BootstrapSpec, RatioInterval, perplexity_intervals

#: The ``format`` of the files :func:`~hetgraph.evaluation.write_per_token` writes.
PER_TOKEN_FORMAT = "hetgraph-per-token"
_TOKEN_FIELDS = ("doc_ids", "positions", "targets")


class PerTokenError(HetgraphError):
    r"""A per-token file that cannot be read, or two that were not scored on the same tokens."""


@dataclass(frozen=True)
class PerTokenResults:
    r"""The scored tokens of one evaluation and each method's log-probability of them.

    Args:
        path: the file read.
        doc_ids, positions, targets: ``[M]`` document, split position and target of each token.
        log_probs: method -> ``[M]`` natural-log probabilities (float64).
        doc_names: the split's document names.
    """

    path: Path
    doc_ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    log_probs: dict[str, np.ndarray]
    doc_names: tuple[str, ...]

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.log_probs)

    def perplexity(self, method: str) -> float:
        return float(np.exp(-self.log_probs[self.method(method)].mean()))

    def method(self, name: str) -> str:
        r"""``name`` if this file scored it, else a :class:`PerTokenError` naming the file."""
        if name not in self.log_probs:
            raise PerTokenError(
                f"{self.path}: no method {name!r} in this per-token file "
                f"(it has {', '.join(self.methods)})"
            )
        return name


def read_per_token(path: str | Path) -> PerTokenResults:
    r"""Read a per-token file written by ``hetgraph eval --per-token``.

    Raises:
        PerTokenError: the file is missing, not safetensors, or not a per-token file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = json.loads((handle.metadata() or {}).get("hetgraph", "{}"))
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        raise PerTokenError(
            f"{path}: cannot read it as a per-token file ({error}); give a "
            "file written by `hetgraph eval --per-token`"
        ) from None
    missing = [key for key in _TOKEN_FIELDS if key not in arrays]
    if header.get("format") != PER_TOKEN_FORMAT or missing:
        raise PerTokenError(
            f"{path}: not a per-token file of hetgraph eval (format "
            f"{header.get('format')!r}, missing {missing}); give a file "
            "written by `hetgraph eval --per-token`"
        )
    log_probs = {
        key.removeprefix("log_prob."): arrays[key].astype(np.float64)
        for key in arrays
        if key.startswith("log_prob.")
    }
    return PerTokenResults(
        path, *(arrays[key] for key in _TOKEN_FIELDS), log_probs, tuple(header.get("doc_names", ()))
    )


def check_same_tokens(a: PerTokenResults, b: PerTokenResults) -> None:
    r"""Refuse two runs that did not score the same tokens (a paired comparison needs them)."""
    for key in _TOKEN_FIELDS:
        if not np.array_equal(getattr(a, key), getattr(b, key)):
            raise PerTokenError(
                f"{a.path} and {b.path} scored different tokens ({key} differ: "
                f"{len(a.targets)} vs {len(b.targets)} tokens); evaluate both on the same "
                "split with the same --max-tokens, --sample and --sample-seed"
            )


def paired_ratio(
    a: PerTokenResults,
    method_a: str,
    b: PerTokenResults,
    method_b: str,
    spec: BootstrapSpec | None = None,
) -> RatioInterval:
    r"""``ppl(a's method_a) / ppl(b's method_b)`` on their shared tokens, with the paired
    document-bootstrap interval of :func:`~hetgraph.evaluation.perplexity_intervals`.

    Raises:
        PerTokenError: a method is not in its file, or the files scored different tokens.
    """
    check_same_tokens(a, b)
    _, ratios = perplexity_intervals(
        {"b": b.log_probs[b.method(method_b)], "a": a.log_probs[a.method(method_a)]},
        a.doc_ids,
        spec,
    )
    return ratios["a/b"]
