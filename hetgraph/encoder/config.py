r"""Settings of the relation encoder (:class:`EncoderConfig`, saved with its weights) and of
its contrastive training (:class:`ContrastiveConfig`, recorded with the validation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hetgraph.configuration import ConfigError, JSONConfigMixin

__all__ = ["ContrastiveConfig", "EncoderConfig"]


@dataclass
class EncoderConfig(JSONConfigMixin):
    r"""The architecture of a :class:`~hetgraph.encoder.RelationEncoder`.

    Attributes:
        input_dim: width ``d`` of the retrieval-site hidden state (the datastore's keys).
        dim: output width ``d′`` (ignored by ``"identity"``, whose output is the input).
        kind: ``"linear"`` (one matrix), ``"mlp"`` (linear + GELU + linear) or
            ``"identity"`` (no parameters and no normalisation: retrieval by squared L2 over
            the raw keys, exactly today's neighbours).
        hidden: hidden width of ``"mlp"`` (None: ``max(dim, input_dim)``).
    """

    input_dim: int
    dim: int = 128
    kind: Literal["linear", "mlp", "identity"] = "linear"
    hidden: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ("linear", "mlp", "identity"):
            raise ConfigError(
                f"kind must be 'linear', 'mlp' or 'identity', got {self.kind!r}", "kind"
            )
        for name in ("input_dim", "dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        if self.hidden is not None and self.hidden < 1:
            raise ConfigError(f"hidden must be >= 1 or null, got {self.hidden}", "hidden")
        if self.kind == "identity":
            self.dim = self.input_dim

    @property
    def metric(self) -> Literal["l2", "ip"]:
        r"""How encoded vectors are compared: ``"l2"`` for the identity (raw retrieval),
        ``"ip"`` (inner product of unit vectors) otherwise."""
        return "l2" if self.kind == "identity" else "ip"


@dataclass
class ContrastiveConfig(JSONConfigMixin):
    r"""How :func:`~hetgraph.encoder.train_encoder` trains an encoder from a datastore alone.

    Attributes:
        temperature: InfoNCE temperature τ of ``softmax(q·k / τ)``.
        next_tokens: a positive shares the anchor's next token (1) or next two tokens (2).
        hard_negatives: raw-key FAISS neighbours with another next token, per anchor.
        batch_size: anchors per step (their positives are each other's in-batch negatives).
        steps: optimiser steps.
        lr: AdamW learning rate (cosine decay to 10 %).
        weight_decay: AdamW weight decay.
        seed: seeds the held-out rows, the anchor pool, every draw and the initial weights.
        leakage_radius: rows of the anchor's document closer than this are never positives,
            and are never counted as retrieved in validation.
        anchor_pool: anchors whose hard negatives are mined once, before training.
        valid_rows: held-out rows (never trained on) for validation.
        k: neighbours of the validation's kNN distribution; recall is reported at 1, 8, k.
        chunk_rows: rows per chunk of the validation's exact search.
    """

    temperature: float = 0.05
    next_tokens: int = 1
    hard_negatives: int = 8
    batch_size: int = 256
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    leakage_radius: int = 64
    anchor_pool: int = 16384
    valid_rows: int = 1000
    k: int = 32
    chunk_rows: int = 32768

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}", "temperature")
        if self.next_tokens not in (1, 2):
            raise ConfigError(f"next_tokens must be 1 or 2, got {self.next_tokens}", "next_tokens")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}", "lr")
        for name, low in (
            ("hard_negatives", 0),
            ("batch_size", 2),
            ("steps", 0),
            ("leakage_radius", 0),
            ("anchor_pool", 2),
            ("valid_rows", 1),
            ("k", 1),
            ("chunk_rows", 1),
            ("seed", 0),
        ):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}", name)
