"""Collecting per-token LM outputs (and kNN neighbours) over a split with strided windows.

:func:`collect_lm_outputs` is the one token-collection path used by every evaluation
(base LM, kNN-LM, and GNN-LM through a custom ``forward``): it feeds the same strided
windows as the datastore build, scores every position exactly once, and keeps per
position the target, the LM's target log-prob (float32 ``log_softmax``), the LM's argmax
and, when an index is given, the query key (captured by
:class:`~hetgraph.datastore.HiddenStateCapture`, the same code that captured the
datastore keys) and its retrieved neighbours.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hetgraph.configuration import JSONConfigMixin
from hetgraph.corpus.windows import sliding_windows
from hetgraph.datastore.build import batch_input_ids, window_batches
from hetgraph.datastore.capture import HiddenStateCapture, normalize_layer, split_arrays
from hetgraph.datastore.store import ANY, Datastore
from hetgraph.models.layers import model_device

#: ``forward(input_ids [B, T] int64) -> logits [B, T, V]``; any model callable.
ForwardFn = Callable[[Tensor], Tensor]


@dataclass
class EvalConfig(JSONConfigMixin):
    """How a split is evaluated.

    Args:
        context_length, stride, batch_size: the strided windows (same meaning as in
            :class:`~hetgraph.datastore.DatastoreConfig`).
        max_tokens: use only the first ``max_tokens`` tokens of the evaluated split
            (``max_tokens - 1`` positions are scored, each predicting the next token).
        k: neighbours per position for kNN-LM.
        valid_tokens: tokens of the valid split used to tune λ and T (``None``: all).
    """

    context_length: int = 512
    stride: int = 256
    batch_size: int = 8
    max_tokens: int | None = None
    k: int = 32
    valid_tokens: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= self.context_length:
            raise ValueError(f"stride must be in [1, context_length={self.context_length}], "
                             f"got {self.stride}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")



@dataclass
class LMOutputs:
    """Per scored position of a split (``M = len(split) - 1`` rows, in position order).

    Attributes:
        positions: int64 ``[M]`` split position (predicts the token at ``position + 1``).
        targets: int64 ``[M]`` the token to predict.
        lm_log_probs: float32 ``[M]`` LM log-prob of the target.
        lm_argmax: int64 ``[M]`` LM's most likely token; ``lm_argmax_log_probs`` its log-prob.
        queries: fp16 ``[M, d]`` query keys (only with ``keep_queries=True``).
        knn_distances: float32 ``[M, k]``; ``knn_ids`` int64 ``[M, k]`` datastore rows
            (``-1`` missing); ``knn_tokens`` int64 ``[M, k]`` their next tokens (``-1``
            missing); ``lm_neighbour_log_probs`` float32 ``[M, k]`` the LM's log-prob of
            each neighbour's next token (for the exact mixture argmax).
    """

    positions: Tensor
    targets: Tensor
    lm_log_probs: Tensor
    lm_argmax: Tensor
    lm_argmax_log_probs: Tensor
    queries: Tensor | None = None
    knn_distances: Tensor | None = None
    knn_ids: Tensor | None = None
    knn_tokens: Tensor | None = None
    lm_neighbour_log_probs: Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def lm_correct(self) -> Tensor:
        return self.lm_argmax == self.targets

    @property
    def has_neighbours(self) -> bool:
        return self.knn_distances is not None


def default_forward(model: nn.Module) -> ForwardFn:
    def forward(input_ids: Tensor) -> Tensor:
        out = model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    return forward


def collect_lm_outputs(
    model: nn.Module,
    split: Any,
    config: EvalConfig | None = None,
    *,
    index: Any | None = None,
    datastore: Datastore | None = None,
    k: int = 32,
    key_layer: Any = ANY,
    forward: ForwardFn | None = None,
    keep_queries: bool = False,
    neighbours_from: LMOutputs | None = None,
    show_progress: bool = True,
) -> LMOutputs:
    """Run a model over a split with strided windows and collect per-position outputs.

    Args:
        model: the HF causal LM; query keys are captured by hooks on it.
        split: ``TokenizedSplit``-like (``tokens``, ``doc_ids``).
        config: :class:`EvalConfig`.
        index: a :class:`~hetgraph.index.DatastoreIndex`; if given (with ``datastore``),
            each position's query key is searched and its ``k`` neighbours kept.
        datastore: the datastore the index was built on (for the neighbours' next tokens).
        k: neighbours per position.
        key_layer: layer of the query key; default: the datastore's key layer.
        forward: ``input_ids -> logits`` callable; default ``model(input_ids).logits``. Pass
            a wrapped model (e.g. GNN-LM with fusion hooks attached) to evaluate it through
            the same path; the query capture still runs on ``model``'s modules.
        keep_queries: also return the fp16 query keys (needs ``index`` or ``key_layer``).
        neighbours_from: outputs of an earlier run over the same split and windows whose
            neighbours are reused instead of searching again (GNN-LM retrieves with the base
            model's query states, so its neighbours are the base run's); this run's
            log-probs of those neighbours' tokens are gathered.
        show_progress: tqdm bar.
    """
    config = config or EvalConfig()
    tokens, _, _ = split_arrays(split, config.max_tokens)
    if len(tokens) < 2:
        raise ValueError(f"evaluation needs a split of at least 2 tokens, got {len(tokens)}")
    if neighbours_from is not None and index is not None:
        raise ValueError("collect_lm_outputs: pass either an index or neighbours_from, not both")
    if index is not None and datastore is None:
        raise ValueError("collect_lm_outputs: pass the datastore together with the index "
                         "(its next tokens are the kNN predictions)")
    if key_layer is ANY:
        key_layer = datastore.key_layer if datastore is not None else None
    need_queries = index is not None or keep_queries
    if need_queries:
        key_layer = normalize_layer(model, key_layer)
        if datastore is not None and key_layer != datastore.key_layer:
            raise ValueError(f"query layer {key_layer} differs from the datastore's key layer "
                             f"{datastore.key_layer}")
    if index is not None:
        k = int(k)
        if not 1 <= k <= len(index):
            raise ValueError(f"k must be in [1, {len(index)}] (the index size), got {k}")
    forward = forward or default_forward(model)
    device = model_device(model)
    num_positions = len(tokens) - 1
    batches = window_batches(sliding_windows(num_positions, config.context_length, config.stride),
                             config.batch_size)
    targets_all = torch.from_numpy(tokens[1:].astype(np.int64))
    parts: dict[str, list[Tensor]] = {name: [] for name in (
        "positions", "lm_log_probs", "lm_argmax", "lm_argmax_log_probs", "queries",
        "knn_distances", "knn_ids", "knn_tokens", "lm_neighbour_log_probs")}
    capture = HiddenStateCapture(model, [key_layer]) if need_queries else None
    bar = tqdm(total=num_positions, desc="evaluate", unit="tok", disable=not show_progress,
               dynamic_ncols=True)
    try:
        if capture is not None:
            capture.attach()
        with torch.inference_mode():
            for batch in batches:
                ids = batch_input_ids(tokens, batch, device)
                logits = forward(ids)
                rows = torch.cat([torch.full((w.end - w.score_start,), r, dtype=torch.long)
                                  for r, w in enumerate(batch)]).to(device)
                cols = torch.cat([torch.arange(w.score_start - w.start, w.end - w.start)
                                  for w in batch]).to(device)
                pos = torch.cat([torch.arange(w.score_start, w.end) for w in batch])
                log_probs = torch.log_softmax(logits[rows, cols].float(), dim=-1)   # [n, V]
                del logits
                targets = targets_all[pos].to(device)
                top_lp, top = log_probs.max(dim=-1)
                parts["positions"].append(pos)
                parts["lm_log_probs"].append(log_probs.gather(1, targets[:, None]).squeeze(1).cpu())
                parts["lm_argmax"].append(top.cpu())
                parts["lm_argmax_log_probs"].append(top_lp.cpu())
                if capture is not None:
                    query = capture.states[key_layer][rows, cols].to(torch.float16)
                    if keep_queries:
                        parts["queries"].append(query.cpu())
                    if index is not None:
                        dist, nid = index.search(query, k)
                        nid_t = torch.from_numpy(nid)
                        # Memmap lookup per batch: the datastore never has to fit in RAM.
                        ntok = torch.from_numpy(datastore.next_tokens[np.maximum(nid, 0)].astype(np.int64))
                        ntok = torch.where(nid_t >= 0, ntok, torch.full_like(nid_t, -1))
                        nb_lp = log_probs.gather(1, ntok.clamp(min=0).to(device)).cpu()
                        parts["knn_distances"].append(torch.from_numpy(dist))
                        parts["knn_ids"].append(nid_t)
                        parts["knn_tokens"].append(ntok)
                        parts["lm_neighbour_log_probs"].append(nb_lp)
                if neighbours_from is not None:
                    if neighbours_from.knn_tokens is None:
                        raise ValueError("neighbours_from holds no neighbours; collect it with an index")
                    rows_in_reused = pos.to(neighbours_from.positions.device) - neighbours_from.positions[0]
                    ntok = neighbours_from.knn_tokens[rows_in_reused]
                    nb_lp = log_probs.gather(1, ntok.clamp(min=0).to(device)).cpu()
                    parts["lm_neighbour_log_probs"].append(nb_lp)
                bar.update(len(pos))
    finally:
        bar.close()
        if capture is not None:
            capture.detach()
    cat = {name: (torch.cat(p) if p else None) for name, p in parts.items()}
    if neighbours_from is not None:
        if not torch.equal(cat["positions"], neighbours_from.positions):
            raise ValueError("neighbours_from was collected over other positions (split, "
                             "max_tokens or windows differ)")
        for name in ("knn_distances", "knn_ids", "knn_tokens"):
            cat[name] = getattr(neighbours_from, name)
    return LMOutputs(targets=targets_all[cat["positions"]], **cat)
