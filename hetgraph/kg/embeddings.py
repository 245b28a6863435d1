r"""Entity features: knowledge-graph embeddings trained with PyG's ``torch_geometric.nn.kge``.

:func:`train_embeddings` splits the triples into train and valid (seeded), trains one or
every model of :data:`KGE_MODELS` (TransE, DistMult, RotatE, ComplEx) on the train triples
with the model's own loss and loader, and scores each on the valid triples with the model's
own :meth:`~torch_geometric.nn.kge.KGEModel.test` (raw tail ranking against every entity:
mean rank, MRR, Hits@10). With ``model="auto"`` the best valid MRR wins.
:func:`embed_knowledge_graph` stores the chosen model's weights with the graph
(``embeddings.safetensors``) and its settings and metrics in ``kg.json``;
:func:`load_entity_features` reads them back as one ``[num_entities, D]`` tensor (complex
models: real and imaginary parts side by side).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hetgraph.configuration import JSONConfigMixin
from hetgraph.integrity import check_file_record, file_record
from hetgraph.io import INTEGRITY_KEY, atomic_save_safetensors
from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.kg.store import EMBEDDINGS, KnowledgeGraph, read_manifest, write_manifest
from hetgraph.limits import check_count, check_memory
from hetgraph.locking import directory_lock

logger = logging.getLogger(__name__)

#: ``--model`` choices besides ``auto``.
KGE_MODELS = ("transe", "distmult", "rotate", "complex")


@dataclass
class EmbeddingConfig(JSONConfigMixin):
    r"""Settings of ``hetgraph kg embed``.

    Args:
        model: one of :data:`KGE_MODELS`, or ``"auto"``: train each, keep the best on valid.
        dim: embedding width (complex models store twice as many numbers per entity).
        epochs: passes over the train triples.
        batch_size: triples per step.
        lr: Adam learning rate.
        valid_fraction: share of triples held out for valid (seeded).
        max_valid: valid triples scored (each is ranked against every entity).
        seed: seeds the split, the initialisation and the negative samples.
    """

    model: str = "auto"
    dim: int = 64
    epochs: int = 20
    batch_size: int = 1024
    lr: float = 0.01
    valid_fraction: float = 0.05
    max_valid: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in (*KGE_MODELS, "auto"):
            raise ValueError(f"model {self.model!r} is not one of auto, {', '.join(KGE_MODELS)}")
        check_count("dim", self.dim, 4096, "give 1 to 4096", minimum=1)
        check_count("epochs", self.epochs, 100_000, "give 1 or more", minimum=1)
        check_count("batch_size", self.batch_size, 1 << 24, "give 1 or more", minimum=1)
        check_count("max_valid", self.max_valid, 1 << 24, "give 1 or more", minimum=1)
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(f"valid_fraction {self.valid_fraction} must lie in (0, 1)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr {self.lr} must be a positive number")


def _model_class(name: str) -> type:
    from torch_geometric.nn import kge

    return {
        "transe": kge.TransE,
        "distmult": kge.DistMult,
        "rotate": kge.RotatE,
        "complex": kge.ComplEx,
    }[name]


def split_triples(triples: Tensor, config: EmbeddingConfig) -> tuple[Tensor, Tensor]:
    r"""``(train, valid)`` rows of ``triples`` ``[N, 3]``: a seeded permutation, valid the
    first ``valid_fraction`` of it (at least one row, at most ``max_valid``)."""
    n = triples.shape[0]
    if n < 2:
        raise KnowledgeGraphError(
            f"the graph has {n} triple; training embeddings needs at "
            "least 2 (one to train on, one to score)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    size = min(max(1, round(n * config.valid_fraction)), config.max_valid, n - 1)
    return triples[order[size:]], triples[order[:size]]


def random_metrics(num_entities: int, k: int = 10) -> dict[str, float]:
    r"""Expected MRR and Hits@k of a uniformly random ranking of ``num_entities``."""
    harmonic = sum(1.0 / r for r in range(1, num_entities + 1))
    return {
        "mrr": harmonic / num_entities,
        "hits@10": min(k, num_entities) / num_entities,
        "mean_rank": (num_entities - 1) / 2,
    }


@dataclass
class TrainedEmbedding:
    r"""One trained KGE model: its ``name``, the model, mean loss per epoch, valid metrics."""

    name: str
    model: Any
    losses: list[float]
    valid: dict[str, float]


def train_one(
    name: str,
    num_entities: int,
    num_relations: int,
    train: Tensor,
    valid: Tensor,
    config: EmbeddingConfig,
) -> TrainedEmbedding:
    r"""Train the KGE model ``name`` on ``train`` ``[N, 3]`` and score it on ``valid``."""
    torch.manual_seed(config.seed)
    model = _model_class(name)(num_entities, num_relations, config.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = model.loader(
        train[:, 0], train[:, 1], train[:, 2], batch_size=config.batch_size, shuffle=True
    )
    losses = []
    for epoch in range(config.epochs):
        model.train()
        total, count = 0.0, 0
        for head, relation, tail in loader:
            optimizer.zero_grad()
            loss = model.loss(head, relation, tail)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * head.numel(), count + head.numel()
        losses.append(total / count)
        logger.info("%s epoch %d/%d: loss %.4f", name, epoch + 1, config.epochs, losses[-1])
    model.eval()
    mean_rank, mrr, hits = model.test(
        valid[:, 0],
        valid[:, 1],
        valid[:, 2],
        batch_size=max(1, min(num_entities, 65536)),
        k=10,
        log=False,
    )
    logger.info(
        "%s: loss %.4f -> %.4f, valid MRR %.4f, Hits@10 %.4f",
        name,
        losses[0],
        losses[-1],
        mrr,
        hits,
    )
    metrics = {
        "mrr": float(mrr),
        "hits@10": float(hits),
        "mean_rank": float(mean_rank),
        "triples": int(valid.shape[0]),
    }
    return TrainedEmbedding(name, model, losses, metrics)


def train_embeddings(
    graph: KnowledgeGraph, config: EmbeddingConfig
) -> tuple[TrainedEmbedding, list[TrainedEmbedding]]:
    r"""``(chosen, every trained)``: the model of ``config`` trained on ``graph``'s triples,
    or with ``"auto"`` each of :data:`KGE_MODELS`, the best valid MRR (then Hits@10) chosen.

    Raises:
        ResourceLimitError: the embeddings and their optimiser state would not fit in memory.
    """
    width = 2 * config.dim  # complex models: two tables
    check_memory(
        f"embeddings of {graph.num_entities} entities × dim {config.dim}",
        4 * width * (graph.num_entities + graph.num_relations) * 4,
        "choose a smaller --dim",
    )
    triples = torch.as_tensor(graph.triples).long()
    train, valid = split_triples(triples, config)
    names = KGE_MODELS if config.model == "auto" else (config.model,)
    trained = [
        train_one(name, graph.num_entities, graph.num_relations, train, valid, config)
        for name in names
    ]
    chosen = max(trained, key=lambda t: (t.valid["mrr"], t.valid["hits@10"]))
    return chosen, trained


def _weights(trained: TrainedEmbedding) -> dict[str, Tensor]:
    return {
        name: tensor.detach().contiguous() for name, tensor in trained.model.state_dict().items()
    }


def embed_knowledge_graph(directory: str | Path, config: EmbeddingConfig) -> dict[str, Any]:
    r"""Train embeddings for the knowledge graph in ``directory`` and store them with it:
    ``embeddings.safetensors`` first, then ``kg.json`` (both atomically), so a crash leaves
    the previous state. Returns the manifest's ``embeddings`` record."""
    directory = Path(directory)
    read_manifest(directory)  # a clear error before the lock creates anything
    with directory_lock(directory, "knowledge graph"):
        graph = KnowledgeGraph.from_pretrained(directory)
        chosen, trained = train_embeddings(graph, config)
        atomic_save_safetensors(
            directory / EMBEDDINGS, _weights(chosen), metadata={"model": chosen.name}
        )
        record = {
            "file": EMBEDDINGS,
            "model": chosen.name,
            "config": config.to_dict(),
            "chosen_by": "valid MRR (raw tail ranking)" if config.model == "auto" else "--model",
            "random": random_metrics(graph.num_entities),
            "candidates": {
                t.name: {"valid": t.valid, "first_loss": t.losses[0], "last_loss": t.losses[-1]}
                for t in trained
            },
        }
        manifest = read_manifest(directory)
        manifest["embeddings"] = record
        manifest[INTEGRITY_KEY] = {
            **manifest[INTEGRITY_KEY],
            EMBEDDINGS: file_record(directory / EMBEDDINGS),
        }
        write_manifest(directory, manifest)
    return record


def _load_weights(directory: str | Path) -> tuple[dict[str, Tensor], str]:
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    if "embeddings" not in manifest:
        raise KnowledgeGraphError(
            f"{directory} has no embeddings; train them with `hetgraph kg embed --kg {directory}`"
        )
    path = directory / EMBEDDINGS
    problem = check_file_record(path, manifest[INTEGRITY_KEY].get(EMBEDDINGS, {}), full=False)
    if problem is not None:
        raise KnowledgeGraphError(
            f"{path} {problem}; train it again with `hetgraph kg embed --kg {directory}`"
        )
    return load_file(str(path)), manifest["embeddings"]["model"]


def load_entity_features(directory: str | Path) -> Tensor:
    r"""The stored entity embeddings of ``directory`` as ``[num_entities, D]`` float32
    (ComplEx / RotatE: real then imaginary part).

    Raises:
        KnowledgeGraphError: no embeddings yet (run ``hetgraph kg embed``) or a damaged file.
    """
    return load_kge_embeddings(directory)[0]


def load_kge_embeddings(directory: str | Path) -> tuple[Tensor, Tensor]:
    r"""The stored ``(entity, relation)`` embeddings of ``directory``, float32
    ``[num_entities, D_e]`` and ``[num_relations, D_r]``, as
    :class:`~hetgraph.nn.KGFactEncoder` takes them: ComplEx's real then imaginary parts
    (both tables); RotatE's entities likewise and its relation phases :math:`\theta` as
    :math:`[\cos\theta \Vert \sin\theta]` (the rotation, of the entities' width).

    Raises:
        KnowledgeGraphError: no embeddings yet (run ``hetgraph kg embed``) or a damaged file.
    """
    weights, model = _load_weights(directory)
    entity = [weights["node_emb.weight"]]
    if "node_emb_im.weight" in weights:
        entity.append(weights["node_emb_im.weight"])
    relation = [weights["rel_emb.weight"]]
    if "rel_emb_im.weight" in weights:
        relation.append(weights["rel_emb_im.weight"])
    elif model == "rotate":
        relation = [torch.cos(relation[0]), torch.sin(relation[0])]
    return torch.cat(entity, dim=1).float(), torch.cat(relation, dim=1).float()
