r"""Contrastive (InfoNCE) training of a :class:`~hetgraph.encoder.RelationEncoder` from a
datastore alone — its stored keys, next tokens and document ids; no LM forward pass.

For an anchor row :math:`a` with positive :math:`p` (another training row with the same next
token, or next two, outside the leakage radius of :math:`a`'s document), hard negatives
:math:`h_1 … h_H` (raw-key FAISS neighbours of :math:`a` with another next token) and the
other anchors' positives :math:`p_j` as in-batch negatives:

.. math::

    \mathcal{L}_a = -\log \frac{\exp(e_a \cdot e_p / \tau)}
        {\sum_j \exp(e_a \cdot e_{p_j} / \tau) + \sum_h \exp(e_a \cdot e_h / \tau)}

(an in-batch :math:`p_j` that shares :math:`a`'s label is left out, not a negative).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hetgraph.encoder.config import ContrastiveConfig, EncoderConfig
from hetgraph.encoder.model import RelationEncoder
from hetgraph.encoder.sampling import PairSampler, row_labels
from hetgraph.encoder.validation import validate_encoder

logger = logging.getLogger(__name__)

__all__ = ["EncoderTrainingResult", "info_nce", "raw_index", "train_encoder"]

#: Rows sampled to fit the encoder's input mean and scale.
STATISTICS_ROWS = 65536


@dataclass
class EncoderTrainingResult:
    r"""What :func:`train_encoder` returns.

    Attributes:
        encoder: the trained encoder (eval mode).
        validation: ``{"raw": figures, "encoded": figures}`` on the held-out rows
            (:func:`~hetgraph.encoder.validation.knn_figures`).
        losses: the InfoNCE loss of every step.
        seconds: wall-clock seconds of mining, training and validation.
        config: the :class:`~hetgraph.encoder.ContrastiveConfig` used.
    """

    encoder: RelationEncoder
    validation: dict[str, dict[str, float]]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    config: ContrastiveConfig | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record (what ``hetgraph encoder train`` writes to validation.json)."""
        losses = self.losses
        return {
            "validation": self.validation,
            "training": self.config.to_dict() if self.config else None,
            "encoder": self.encoder.config.to_dict(),
            "encoder_fingerprint": self.encoder.fingerprint,
            "seconds": self.seconds,
            "steps": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": float(np.mean(losses[-20:])) if losses else None,
        }


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    hard: torch.Tensor,
    hard_valid: torch.Tensor,
    same_label: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    r"""The mean InfoNCE loss of ``anchors`` ``[B, d′]`` against their ``positives``
    ``[B, d′]``, the hard negatives ``[B, H, d′]`` (where ``hard_valid`` ``[B, H]``) and the
    other anchors' positives (except where ``same_label`` ``[B, B]`` is True off the
    diagonal)."""
    in_batch = anchors @ positives.T / temperature
    b = len(anchors)
    eye = torch.eye(b, dtype=torch.bool, device=anchors.device)
    in_batch = in_batch.masked_fill(same_label & ~eye, -math.inf)
    hard_logits = torch.einsum("bd,bhd->bh", anchors, hard) / temperature
    hard_logits = hard_logits.masked_fill(~hard_valid, -math.inf)
    logits = torch.cat([in_batch, hard_logits], dim=1)
    return F.cross_entropy(logits, torch.arange(b, device=anchors.device))


def raw_index(store: Any) -> Any:
    r"""The datastore's own FAISS index (``DS/index``), or, when it has none, an exact one
    built in memory (for mining hard negatives)."""
    from hetgraph.index import DatastoreIndex
    from hetgraph.io import INDEX_DIR

    if (store.path / INDEX_DIR).is_dir():
        return DatastoreIndex.load(store.path / INDEX_DIR, store)
    logger.warning(
        "datastore %s has no index; building an exact one in memory for the "
        "hard negatives (hetgraph index build --datastore %s keeps one)",
        store.path,
        store.path,
    )
    from hetgraph.index import IndexConfig

    return DatastoreIndex.build(store, IndexConfig(factory="Flat"), show_progress=False)


def _step_batch(
    sampler: PairSampler, pool: np.ndarray, hard: np.ndarray, hard_ok: np.ndarray, batch_size: int
) -> tuple[np.ndarray, ...]:
    pick = sampler.rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)
    anchors = pool[pick]
    positives, found = sampler.positives(anchors)
    return anchors[found], positives[found], hard[pick][found], hard_ok[pick][found]


def _train_steps(
    encoder: RelationEncoder,
    store: Any,
    sampler: PairSampler,
    pool: np.ndarray,
    hard: tuple[np.ndarray, np.ndarray],
    config: ContrastiveConfig,
    show_progress: bool,
) -> list[float]:
    optimizer = torch.optim.AdamW(
        encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            0.1 + 0.45 * (1 + math.cos(math.pi * min(s, config.steps) / max(config.steps, 1)))
        ),
    )
    labels, losses = sampler.labels, []
    encoder.train()
    bar = tqdm(
        range(config.steps),
        desc="encoder",
        unit="step",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    for _ in bar:
        anchors, positives, hard_rows, hard_ok = _step_batch(
            sampler, pool, *hard, config.batch_size
        )
        if len(anchors) < 2:
            continue
        rows, inverse = np.unique(
            np.concatenate([anchors, positives, hard_rows.ravel()]), return_inverse=True
        )
        vectors = encoder(torch.as_tensor(np.asarray(store.keys[rows])))[inverse]
        b = len(anchors)
        same = torch.as_tensor(labels[anchors][:, None] == labels[positives][None])
        loss = info_nce(
            vectors[:b],
            vectors[b : 2 * b],
            vectors[2 * b :].view(b, -1, encoder.dim),
            torch.as_tensor(hard_ok),
            same,
            config.temperature,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    encoder.eval()
    return losses


def train_encoder(
    store: Any,
    config: ContrastiveConfig | None = None,
    encoder_config: EncoderConfig | None = None,
    *,
    index: Any = None,
    show_progress: bool = True,
) -> EncoderTrainingResult:
    r"""Train a relation encoder on the rows of ``store`` and validate it on held-out rows.

    Args:
        store: a :class:`~hetgraph.datastore.Datastore`.
        config: :class:`~hetgraph.encoder.ContrastiveConfig`.
        encoder_config: the architecture (its ``input_dim`` must be the keys' width;
            default: linear to 128).
        index: the raw-key index hard negatives are mined from (default: :func:`raw_index`).
        show_progress: tqdm bars.
    """
    config = config or ContrastiveConfig()
    encoder_config = encoder_config or EncoderConfig(input_dim=store.dim)
    if encoder_config.input_dim != store.dim:
        from hetgraph.configuration import ConfigError

        raise ConfigError(
            f"the encoder's input_dim {encoder_config.input_dim} is not the "
            f"width {store.dim} of the keys of datastore {store.path}; set "
            f"input_dim={store.dim}",
            "input_dim",
        )
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    encoder = RelationEncoder(encoder_config)
    labels = row_labels(store.next_tokens, store.doc_ids, config.next_tokens)
    sampler = PairSampler(
        labels, store.doc_ids, config.leakage_radius, config.valid_rows, config.seed
    )
    training_rows = np.flatnonzero(sampler.training)
    losses: list[float] = []
    if not encoder.is_identity:
        stats = np.sort(
            sampler.rng.choice(
                training_rows, min(STATISTICS_ROWS, len(training_rows)), replace=False
            )
        )
        encoder.fit_input_statistics(store.keys[stats])
    if not encoder.is_identity and config.steps > 0:
        pool = sampler.anchor_pool(config.anchor_pool)
        hard = sampler.hard_negatives(
            pool, index or raw_index(store), store.keys, config.hard_negatives, show_progress
        )
        losses = _train_steps(encoder, store, sampler, pool, hard, config, show_progress)
    encoder.eval()
    validation = validate_encoder(
        store,
        encoder,
        sampler.held_out,
        training_rows,
        config.leakage_radius,
        config.k,
        config.chunk_rows,
        show_progress,
    )
    return EncoderTrainingResult(encoder, validation, losses, time.perf_counter() - started, config)
