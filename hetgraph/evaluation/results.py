"""Typed results of an evaluation, with the JSON form scripts outside the project read.

:func:`~hetgraph.evaluation.evaluate_four_way` returns an :class:`EvaluationResults`: one
:class:`MethodScore` per method (``base``, ``knn``, ``gnn``, ``gnn_knn``, ``lora``,
``lora_knn``, ``gnn_knn_rekeyed``), one :class:`~hetgraph.evaluation.RatioInterval` per
pair of methods, and how the tokens were sampled and the intervals drawn.
:meth:`EvaluationResults.to_dict` is the JSON written by ``hetgraph eval --json`` — each
method's row as ``"gnn": {"ppl": …, "acc": …, "ppl_ci95": […], "documents": N}``, the
pairs under ``"ratios"`` keyed ``"<method>/<method>"`` — and
:meth:`EvaluationResults.from_dict` reads it back. The object is also a read-only mapping
over that JSON form, so ``results["gnn"]["ppl"]`` reads as it always has.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from hetgraph.evaluation.intervals import RatioInterval

#: Fields of a method's row that :class:`MethodScore` names; anything else is kept in ``extra``.
_METHOD_FIELDS = ("ppl", "acc", "ppl_ci95", "documents", "lambda", "temperature", "k", "valid_ppl")


@dataclass(frozen=True)
class MethodScore:
    """One method's scores on the test tokens.

    Args:
        ppl: perplexity.
        acc: next-token accuracy.
        ppl_ci95: 95 % document-bootstrap interval of ``ppl`` (``None`` before intervals).
        documents: test documents the scored tokens cover.
        lam, temperature, k, valid_ppl: a kNN-LM mixture's λ and T tuned on valid, its
            neighbours per position, and its valid perplexity (``None`` for other methods).
        extra: any further fields of the row, kept as read.
    """

    ppl: float
    acc: float
    ppl_ci95: tuple[float, float] | None = None
    documents: int | None = None
    lam: float | None = None
    temperature: float | None = None
    k: int | None = None
    valid_ppl: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"ppl": self.ppl, "acc": self.acc, **self.extra}
        optional = {
            "lambda": self.lam,
            "temperature": self.temperature,
            "k": self.k,
            "valid_ppl": self.valid_ppl,
            "ppl_ci95": None if self.ppl_ci95 is None else list(self.ppl_ci95),
            "documents": self.documents,
        }
        row.update({key: value for key, value in optional.items() if value is not None})
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> MethodScore:
        ci = row.get("ppl_ci95")
        return cls(
            ppl=float(row["ppl"]),
            acc=float(row["acc"]),
            ppl_ci95=None if ci is None else (float(ci[0]), float(ci[1])),
            documents=row.get("documents"),
            lam=row.get("lambda"),
            temperature=row.get("temperature"),
            k=row.get("k"),
            valid_ppl=row.get("valid_ppl"),
            extra={key: value for key, value in row.items() if key not in _METHOD_FIELDS},
        )


#: Top-level keys that are not method rows.
_SETUP_KEYS = ("ratios", "bootstrap", "sample", "tokens", "valid_tokens", "documents", "speed")


@dataclass(frozen=True)
class EvaluationResults(Mapping[str, Any]):
    """What one evaluation measured (see the module docstring for the JSON form).

    Args:
        methods: method name → :class:`MethodScore`, in the order evaluated.
        ratios: ``"<method>/<method>"`` → :class:`RatioInterval`.
        tokens, valid_tokens, documents: scored test tokens, valid tokens λ and T were tuned
            on, and test documents covered.
        bootstrap: resamples, seed, level and unit of the intervals.
        sample: how the test and valid tokens were chosen.
        speed: tokens per second of each pass.
        neighbours: ``"retrieved"``, or ``"random"`` for a random-neighbour control.
        extra: any further top-level fields, kept as read.
    """

    methods: dict[str, MethodScore]
    ratios: dict[str, RatioInterval] = field(default_factory=dict)
    tokens: int | None = None
    valid_tokens: int | None = None
    documents: int | None = None
    bootstrap: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)
    neighbours: str = "retrieved"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``hetgraph eval --json``)."""
        out: dict[str, Any] = {name: score.to_dict() for name, score in self.methods.items()}
        if self.ratios:
            out["ratios"] = {key: ratio.to_dict() for key, ratio in self.ratios.items()}
        setup = {
            "bootstrap": self.bootstrap,
            "sample": self.sample,
            "speed": self.speed,
            "tokens": self.tokens,
            "valid_tokens": self.valid_tokens,
            "documents": self.documents,
        }
        out.update({key: value for key, value in setup.items() if value not in (None, {})})
        out["neighbours"] = self.neighbours
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResults:
        """Read the JSON form back (method rows are the entries with a ``"ppl"``)."""
        known = {f.name for f in fields(cls)} - {"methods", "ratios", "extra"}
        methods = {
            name: MethodScore.from_dict(row)
            for name, row in data.items()
            if isinstance(row, Mapping) and "ppl" in row and name not in _SETUP_KEYS
        }
        return cls(
            methods=methods,
            ratios={k: RatioInterval.from_dict(v) for k, v in data.get("ratios", {}).items()},
            **{key: data[key] for key in known if key in data},
            extra={
                key: value
                for key, value in data.items()
                if key not in methods and key not in known and key != "ratios"
            },
        )

    # A read-only mapping over the JSON form, so existing ``results["gnn"]["ppl"]`` works.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
