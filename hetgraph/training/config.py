"""The settings of :func:`~hetgraph.training.train_adapter`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetgraph.configuration import JSONConfigMixin
from hetgraph.limits import check_count, check_memory
from hetgraph.training.precision import MIXED_PRECISION

#: Most sequences one micro-batch may hold (``grad_accumulation`` makes larger batches).
MAX_BATCH_SIZE = 1 << 16
#: Bytes a training token takes at the very least: the LM's float32 logits over a
#: vocabulary of 256 or more tokens, before any hidden state, graph or gradient.
MIN_BYTES_PER_TOKEN = 1024


@dataclass
class TrainingConfig(JSONConfigMixin):
    """Settings of :func:`train_adapter` (JSON-serialisable).

    Args:
        max_steps: optimiser steps.
        batch_size: sequences per micro-batch (over all processes under ``torchrun``).
        context_length: tokens per training sequence (random windows of the train split).
        grad_accumulation: micro-batches per optimiser step.
        lr, weight_decay: AdamW settings for the adapter parameters.
        betas: AdamW's ``(β1, β2)``; the official GNN-LM trains with fairseq's Adam at
            ``(0.9, 0.98)``, hetgraph's default is PyTorch's ``(0.9, 0.999)``.
        warmup_steps: linear warm-up, then ``schedule``.
        schedule: ``"inverse_sqrt"`` (GNN-LM), ``"cosine"`` or ``"constant"``.
        clip_norm: gradient-norm clipping (``0`` disables).
        eval_every: steps between valid-perplexity evaluations (``0`` = only at the end).
        eval_tokens: valid tokens scored per evaluation.
        patience: evaluations without improvement before early stopping (``0`` = never stop).
        checkpoint_every: steps between resumable checkpoints (``0`` = at evaluations only).
        seed: makes data order, dropout and initialisation reproducible, across resumes too.
        from_datastore: train from the stored keys without running the base model
            (:meth:`HetGraphLM.forward_from_datastore`; each micro-batch is
            ``batch_size`` random spans of ``context_length`` datastore rows). ``None``: whenever
            the fusion configuration allows it (the default one does), else full forwards over
            random windows of the train split.
        init_from: an adapter directory to start from instead of a fresh initialisation
            (the paper's two-stage training: stage 2, e.g. ``k=128`` and ``l = r = 2``, starts
            from stage 1's adapter); a run that resumes from its checkpoint ignores it.
        mixed_precision: the training forward's matrix products in bfloat16
            (``torch.autocast``; weights, optimiser, loss and evaluations stay float32):
            ``"no"``, ``"bf16"``, or ``"auto"`` (bfloat16 where the device computes it
            natively, :func:`~hetgraph.training.precision.native_bfloat16`). Not the paper's
            (the official GNN-LM trains in float32); the embedded demo configuration uses
            ``"auto"``, which matched float32's valid perplexity to 0.07 % on two corpora.
    """

    max_steps: int = 300
    batch_size: int = 4
    context_length: int = 256
    grad_accumulation: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 30
    schedule: str = "inverse_sqrt"
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 4096
    patience: int = 3
    checkpoint_every: int = 50
    seed: int = 0
    from_datastore: bool | None = None
    init_from: str | None = None
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        super().__post_init__()  # types first: "max_steps": "ten" is a ConfigError
        # ValueErrors here become ConfigErrors named by their dotted path (build_config).
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.schedule not in ("inverse_sqrt", "cosine", "constant"):
            raise ValueError(
                f"schedule must be inverse_sqrt, cosine or constant, got {self.schedule!r}"
            )
        for name in ("max_steps", "batch_size", "context_length", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        fix = (
            "lower batch_size or context_length (grad_accumulation gives larger batches "
            "without the memory)"
        )
        check_count("batch_size", self.batch_size, MAX_BATCH_SIZE, fix, minimum=1)
        tokens = self.batch_size * self.context_length
        check_memory(
            f"a micro-batch of batch_size × context_length = {tokens:,} tokens",
            tokens * MIN_BYTES_PER_TOKEN,
            fix,
        )
        for name in ("eval_every", "eval_tokens", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        for name in ("lr", "weight_decay", "clip_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(
                    f"{name} must be a finite number "
                    f"{'> 0' if name == 'lr' else '>= 0'}, got {value}"
                )
