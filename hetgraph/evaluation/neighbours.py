"""The neighbours of evaluated positions: searched once, then handed to every pass.

:func:`~hetgraph.evaluation.collect_lm_outputs` searches each scored position's query
through a :class:`~hetgraph.fusion.retrieval.Retriever` (the class the fusion hooks search
through) when it is given one (:func:`search_neighbours`), and a later pass over the same
windows (GNN-LM, GNN-LM + kNN, a LoRA control + kNN) reuses those neighbours
(``neighbours_from``): its kNN-LM mixture reads them, and a forward that takes a
``retrieval`` argument (:func:`~hetgraph.evaluation.gnn_forward`) gets them per batch
(:func:`batch_retrieval`), so its fusion hooks search only the context positions the base
run did not score.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hetgraph.errors import NonFiniteError
from hetgraph.fusion.context import Retrieval
from hetgraph.fusion.retrieval import Retriever

if TYPE_CHECKING:
    from hetgraph.datastore import Datastore
    from hetgraph.evaluation.lm import LMOutputs


class NeighbourSearch(Retriever):
    """Deprecated alias of :class:`~hetgraph.Retriever` with the arguments swapped:
    ``NeighbourSearch(index, datastore)`` is ``Retriever(datastore, index)``."""

    def __init__(self, index: Any, datastore: Datastore) -> None:
        warnings.warn(
            "NeighbourSearch(index, datastore) is deprecated; use "
            "hetgraph.Retriever(datastore, index)",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(datastore, index)


def gather_cpu(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """``log_probs[i, tokens[i, j]]`` on the CPU (``-1`` tokens read column 0)."""
    return log_probs.gather(1, tokens.clamp(min=0).to(log_probs.device)).cpu()


def search_neighbours(
    retriever: Retriever, queries: Tensor, k: int, log_probs: Tensor
) -> dict[str, Tensor]:
    """Neighbours of ``[n, d]`` queries (searched as the fusion hooks search them), their
    next tokens, and the LM's log-probs of those, as CPU tensors named like
    :class:`~hetgraph.evaluation.LMOutputs`' fields.

    Raises:
        NonFiniteError: a query, or a distance the index returned, is NaN or infinite.
    """
    if not bool(torch.isfinite(queries).all()):
        raise NonFiniteError(
            "retrieval: a query key is NaN or infinite (the model's hidden "
            "states overflow; load it in float32 with --dtype float32)",
            stage="retrieval",
        )
    distances, ids = retriever.search(queries, k)
    distances, ids = distances.cpu(), ids.cpu()
    if bool(distances.isnan().any()) or not bool(distances[ids >= 0].isfinite().all()):
        raise NonFiniteError(
            f"retrieval: the index of datastore {retriever.datastore.path} "
            "returned NaN or infinite distances, so its keys are damaged; "
            "run `hetgraph verify` on it and rebuild what it names",
            stage="retrieval",
        )
    # Memmap lookup per batch: the datastore never has to fit in RAM.
    tokens = retriever.corpus.next_tokens_of(ids)
    return {
        "knn_distances": distances,
        "knn_ids": ids,
        "knn_tokens": tokens,
        "lm_neighbour_log_probs": gather_cpu(log_probs, tokens),
    }


def rows_of(neighbours_from: LMOutputs, positions: Tensor) -> Tensor:
    """Rows of split ``positions`` in an earlier run (its positions are sorted; a sample
    need not be contiguous). A position it did not score maps to some row: the caller
    compares the positions (``collect_lm_outputs`` does, when it assembles)."""
    known = neighbours_from.positions
    return torch.searchsorted(known, positions.to(known.device)).clamp(max=len(neighbours_from) - 1)


def reused_neighbour_log_probs(
    neighbours_from: LMOutputs, positions: Tensor, log_probs: Tensor
) -> Tensor:
    """This run's log-probs of the earlier run's neighbour tokens at ``positions``."""
    if neighbours_from.knn_tokens is None:
        raise ValueError("neighbours_from holds no neighbours; collect it with an index")
    return gather_cpu(log_probs, neighbours_from.knn_tokens[rows_of(neighbours_from, positions)])


def accepts_retrieval(forward: Any) -> bool:
    """Whether an evaluation forward takes the batch's neighbours (a ``retrieval``
    argument; a :class:`~hetgraph.TrimmedForward`'s function is asked)."""
    fn = getattr(forward, "fn", forward)
    try:
        return "retrieval" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable
        return False


def batch_retrieval(
    neighbours_from: LMOutputs,
    rows: Tensor,
    cols: Tensor,
    positions: Tensor,
    shape: tuple[int, int],
) -> Retrieval:
    """The earlier run's neighbours laid out over a ``[B, W]`` window batch: its scored
    positions (window ``rows``, columns ``cols``) are covered, the others (context the
    earlier run did not score) are not, and get searched by the forward's hooks.
    On the CPU; the hooks move what they use."""
    if neighbours_from.knn_ids is None or neighbours_from.knn_distances is None:
        raise ValueError("neighbours_from holds no neighbours; collect it with an index")
    found = rows_of(neighbours_from, positions)
    k = int(neighbours_from.knn_ids.shape[1])
    ids = torch.full((*shape, k), -1, dtype=torch.long)
    distances = torch.full((*shape, k), np.inf, dtype=torch.float32)
    covered = torch.zeros(shape, dtype=torch.bool)
    rows, cols = rows.cpu(), cols.cpu()
    ids[rows, cols] = neighbours_from.knn_ids[found].long()
    distances[rows, cols] = neighbours_from.knn_distances[found].float()
    covered[rows, cols] = True
    return Retrieval(distances, ids, covered)
