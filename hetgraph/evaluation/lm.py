"""Collecting per-token LM outputs (and kNN neighbours) over a split with strided windows.

:func:`collect_lm_outputs` is the one token-collection path used by every evaluation
(base LM, kNN-LM, and GNN-LM through a custom ``forward``): it feeds the same strided
windows as the datastore build, scores every position exactly once, and keeps per
position the target, the LM's target log-prob (float32 ``log_softmax``), the LM's argmax
and, when an index is given, the query key (captured by
:class:`~hetgraph.datastore.HiddenStateCapture`, the same code that captured the
datastore keys) and its retrieved neighbours.

Under ``torchrun`` every rank scores a contiguous share of the window batches and the
per-token results are gathered onto every rank in position order
(:meth:`~hetgraph.distributed.DistributedContext.all_gather_rows`, exact bytes): the batches
are the one-process batches, so every rank ends with exactly the one-process outputs, and
everything computed from them (perplexities, λ and T tuned on valid) is identical too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hetgraph.allocator import RELEASE_EVERY_BATCHES, release_free_memory
from hetgraph.configuration import JSONConfigMixin
from hetgraph.corpus.windows import Window
from hetgraph.datastore.build import batch_input_ids, window_batches
from hetgraph.datastore.capture import HiddenStateCapture, LayerSpec, normalize_layer, split_arrays
from hetgraph.datastore.store import ANY
from hetgraph.distributed import DistributedContext, current_context
from hetgraph.errors import (
    HetgraphError,
    NonFiniteError as NonFiniteError,  # re-exported
)
from hetgraph.evaluation.intervals import DEFAULT_BOOTSTRAP_SEED, DEFAULT_RESAMPLES, BootstrapSpec
from hetgraph.evaluation.neighbours import (
    NeighbourSearch as NeighbourSearch,  # the deprecated alias, re-exported
    accepts_retrieval,
    batch_retrieval,
    reused_neighbour_log_probs,
    search_neighbours,
)
from hetgraph.evaluation.sampling import DEFAULT_SAMPLE_SEED, evaluation_windows, prefix_tokens
from hetgraph.fusion.context import Retrieval
from hetgraph.fusion.retrieval import Retriever
from hetgraph.models.checks import check_context_length, check_token_ids
from hetgraph.models.layers import model_device

#: ``forward(input_ids [B, T] int64) -> logits [B, T, V]``; any model callable.
ForwardFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TrimmedForward:
    """A forward that can compute the logits of the last positions only.

    ``fn(input_ids, logits_to_keep)`` returns the logits ``[B, logits_to_keep, V]`` of the
    last ``logits_to_keep`` positions (all ``T`` for ``0``), as HF causal LMs do with their
    ``logits_to_keep`` argument. :func:`collect_lm_outputs` asks it for the scored columns of
    each batch only, so the ``context_length - stride`` columns a strided window reads only
    as context cost no LM head (and, for a :class:`~hetgraph.HetGraphLM` fused at the head,
    no retrieval and no graph). A plain :data:`ForwardFn` computes every position.
    """

    fn: Callable[..., Tensor]

    def __call__(self, input_ids: Tensor, logits_to_keep: int = 0, **kwargs: Any) -> Tensor:
        return self.fn(input_ids, logits_to_keep, **kwargs)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes HF's ``logits_to_keep`` argument."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class EvalConfig(JSONConfigMixin):
    """How a split is evaluated.

    Args:
        context_length, stride, batch_size: the strided windows (same meaning as in
            :class:`~hetgraph.datastore.DatastoreConfig`).
        max_tokens: how many tokens of the evaluated split are scored (``None``: all). With
            ``sample="stratified"`` (the default) they are ``max_tokens`` positions spread
            over every document of the split (:mod:`hetgraph.evaluation.sampling`); with
            ``"prefix"`` the first ``max_tokens`` tokens (``max_tokens - 1`` positions scored,
            each predicting the next token; hetgraph before 0.2 did only this).
        k: neighbours per position for kNN-LM.
        valid_tokens: tokens of the valid split used to tune λ and T (``None``: all),
            sampled as ``sample`` says.
        sample: ``"stratified"`` or ``"prefix"``, see ``max_tokens``.
        sample_seed: seed of the stratified sample (the shares' remainder and each
            document's segment offset); the same seed scores the same positions.
        bootstrap_resamples: document resamples of the 95 % intervals
            (:mod:`hetgraph.evaluation.intervals`).
        bootstrap_seed: seed of those resamples.
        neighbour_states: whether GNN-LM reads its adapters' window side from a
            :class:`~hetgraph.NeighbourStates` table built once per evaluation (the same
            logits, less work per position): ``"on"``, ``"off"``, or ``"auto"``: when the
            table takes at most a quarter of the available memory (shared by the node's
            processes under ``torchrun``) and the evaluation retrieves at least twice as
            many windows as the table holds (so that building it pays for itself).
    """

    context_length: int = 512
    stride: int = 256
    batch_size: int = 8
    max_tokens: int | None = None
    k: int = 32
    valid_tokens: int | None = None
    neighbour_states: Literal["auto", "on", "off"] = "auto"
    sample: Literal["stratified", "prefix"] = "stratified"
    sample_seed: int = DEFAULT_SAMPLE_SEED
    bootstrap_resamples: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.stride <= self.context_length:
            raise ValueError(
                f"stride must be in [1, context_length={self.context_length}], got {self.stride}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        for name in ("max_tokens", "valid_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.neighbour_states not in ("auto", "on", "off"):
            raise ValueError(
                f"neighbour_states must be 'auto', 'on' or 'off', got {self.neighbour_states!r}"
            )
        if self.sample not in ("stratified", "prefix"):
            raise ValueError(f"sample must be 'stratified' or 'prefix', got {self.sample!r}")
        if self.bootstrap_resamples < 1:
            raise ValueError(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        for name in ("sample_seed", "bootstrap_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise ValueError(f"{name} must be in [0, 2**32), got {getattr(self, name)}")

    @property
    def bootstrap(self) -> BootstrapSpec:
        """The intervals' resamples and seed."""
        return BootstrapSpec(resamples=self.bootstrap_resamples, seed=self.bootstrap_seed)


@dataclass
class LMOutputs:
    """Per scored position of a split (``M`` rows, in position order: every position of the
    split, or the evaluation's sample of them).

    Attributes:
        positions: int64 ``[M]`` split position (predicts the token at ``position + 1``).
        doc_ids: int64 ``[M]`` the document of the predicted token (what the intervals
            resample).
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
    doc_ids: Tensor
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


def default_forward(model: nn.Module) -> ForwardFn | TrimmedForward:
    """``input_ids -> logits`` of a plain HF causal LM (no cache); a :class:`TrimmedForward`
    when the model takes ``logits_to_keep``."""

    def forward(input_ids: Tensor, logits_to_keep: int = 0) -> Tensor:
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        out = model(input_ids=input_ids, use_cache=False, **kwargs)
        return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)

    return TrimmedForward(forward) if accepts_logits_to_keep(model) else forward


def _query_layer(
    model: nn.Module, key_layer: Any, search: Retriever | None, keep_queries: bool
) -> LayerSpec | Any:
    # The layer whose states are the queries: the datastore's key layer unless told otherwise.
    if key_layer is ANY:
        key_layer = search.datastore.key_layer if search is not None else None
    if search is None and not keep_queries:
        return ANY
    key_layer = normalize_layer(model, key_layer)
    if search is not None and key_layer != search.datastore.key_layer:
        raise ValueError(
            f"query layer {key_layer} differs from the datastore's key layer "
            f"{search.datastore.key_layer}"
        )
    return key_layer


def batch_logits(
    forward: ForwardFn | TrimmedForward,
    input_ids: Tensor,
    batch: list[Window],
    retrieval: Retrieval | None = None,
) -> Tensor:
    """The logits ``forward`` gives for ``input_ids``, a batch of equal-length windows: a
    :class:`TrimmedForward`'s for the trailing columns that hold a scored position only, any
    other forward's for every column (what :func:`collect_lm_outputs` runs per batch).
    ``retrieval``: the batch's neighbours, passed to a forward that takes them."""
    kwargs = {} if retrieval is None else {"retrieval": retrieval}
    if isinstance(forward, TrimmedForward):
        return forward(input_ids, max(w.end - w.score_start for w in batch), **kwargs)
    return forward(input_ids, **kwargs)


def _at_columns(values: Tensor, rows: Tensor, cols: Tensor, width: int) -> Tensor:
    # values[rows, cols] for columns of a [B, width] window batch, where ``values`` may hold
    # only the last columns (a TrimmedForward's logits, the LM-head input it captured).
    return values[rows, cols - (width - values.shape[1])]


def _scored_rows(batch: list[Window], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    # (window row, column, split position) of every position a batch of windows scores.
    # One tensor op over the batch's windows, not one small tensor per window.
    bounds = torch.tensor([(w.start, w.score_start, w.end) for w in batch], dtype=torch.long)
    start, score_start, end = bounds.unbind(1)
    rows = torch.repeat_interleave(torch.arange(len(batch)), end - score_start)
    offsets = torch.cumsum(end - score_start, 0) - (end - score_start)
    positions = torch.arange(int(rows.numel())) - offsets[rows] + score_start[rows]
    cols = positions - start[rows]
    return rows.to(device), cols.to(device), positions


def _score(log_probs: Tensor, targets: Tensor) -> dict[str, Tensor]:
    top_log_probs, top = log_probs.max(dim=-1)
    return {
        "lm_log_probs": log_probs.gather(1, targets[:, None]).squeeze(1).cpu(),
        "lm_argmax": top.cpu(),
        "lm_argmax_log_probs": top_log_probs.cpu(),
    }


def _assemble(
    parts: dict[str, list[Tensor]],
    targets: Tensor,
    doc_ids: Tensor,
    neighbours_from: LMOutputs | None,
    ctx: DistributedContext,
) -> LMOutputs:
    cat = {name: ctx.all_gather_rows(torch.cat(p) if p else None) for name, p in parts.items()}
    if neighbours_from is not None:
        if not torch.equal(cat["positions"], neighbours_from.positions):
            raise ValueError(
                "neighbours_from was collected over other positions (split, "
                "max_tokens or windows differ)"
            )
        for name in ("knn_distances", "knn_ids", "knn_tokens"):
            cat[name] = getattr(neighbours_from, name)
    return LMOutputs(targets=targets[cat["positions"]], doc_ids=doc_ids[cat["positions"]], **cat)


def _check_neighbour_sources(
    search: Retriever | None, neighbours_from: LMOutputs | None, k: int
) -> None:
    if neighbours_from is not None and search is not None:
        raise ValueError("collect_lm_outputs: pass either a search or neighbours_from, not both")
    if search is not None:
        search.check(k)


def collect_lm_outputs(
    model: nn.Module,
    split: Any,
    config: EvalConfig | None = None,
    *,
    search: Retriever | None = None,
    forward: ForwardFn | None = None,
    key_layer: Any = ANY,
    keep_queries: bool = False,
    neighbours_from: LMOutputs | None = None,
    show_progress: bool = True,
    distributed: DistributedContext | None = None,
) -> LMOutputs:
    """Run a model over a split with strided windows and collect per-position outputs.

    Args:
        model: the HF causal LM; query keys are captured by hooks on it.
        split: ``TokenizedSplit``-like (``tokens``, ``doc_ids``).
        config: windows, ``max_tokens`` and ``k`` (neighbours per position).
        search: a :class:`~hetgraph.Retriever`: each scored position's ``config.k``
            neighbours are searched and kept (kNN-LM).
        forward: ``input_ids -> logits`` callable; default :func:`default_forward`. Pass
            a wrapped model (e.g. GNN-LM with fusion hooks attached) to evaluate it through
            the same path; the query capture still runs on ``model``'s modules. A
            :class:`TrimmedForward` is asked for the scored columns' logits only.
        key_layer: layer of the query key; default: the datastore's key layer.
        keep_queries: also return the fp16 query keys.
        neighbours_from: outputs of an earlier run over the same split and windows whose
            neighbours are reused instead of searching again (GNN-LM retrieves with the base
            model's query states, so its neighbours are the base run's); this run's
            log-probs of those neighbours' tokens are gathered; a ``forward`` taking a
            ``retrieval`` (:func:`~hetgraph.evaluation.gnn_forward`) gets them per batch.
        show_progress: tqdm bar (rank 0 only).
        distributed: the ``torchrun`` job sharing the windows (every rank calls this with the
            same arguments and receives all outputs); default
            :func:`~hetgraph.distributed.current_context`.
    """
    config = config or EvalConfig()
    ctx = distributed or current_context()
    tokens, doc_ids, _ = split_arrays(split, prefix_tokens(config))
    if len(tokens) < 2:
        raise HetgraphError(
            f"evaluation needs a split of at least 2 tokens, got {len(tokens)}; "
            "use a larger corpus or split fraction"
        )
    check_context_length(model, config.context_length, "evaluation.context_length")
    check_token_ids(tokens, model, "the evaluated split")
    _check_neighbour_sources(search, neighbours_from, int(config.k))
    key_layer = _query_layer(model, key_layer, search, keep_queries)
    forward = forward or default_forward(model)
    reuse = neighbours_from is not None and accepts_retrieval(forward)
    device = model_device(model)
    batches = window_batches(evaluation_windows(doc_ids, config), config.batch_size)
    batches = [batches[i] for i in ctx.share(len(batches))]
    targets_all = torch.from_numpy(tokens[1:].astype(np.int64))
    target_docs = torch.from_numpy(doc_ids[1:].astype(np.int64))
    parts: dict[str, list[Tensor]] = {
        name: []
        for name in (
            "positions",
            "lm_log_probs",
            "lm_argmax",
            "lm_argmax_log_probs",
            "queries",
            "knn_distances",
            "knn_ids",
            "knn_tokens",
            "lm_neighbour_log_probs",
        )
    }
    capture = HiddenStateCapture(model, [key_layer]) if key_layer is not ANY else None
    bar = tqdm(
        total=sum(w.end - w.score_start for b in batches for w in b),
        desc="evaluate",
        unit="tok",
        disable=not (show_progress and ctx.is_main),
        dynamic_ncols=True,
    )
    with bar, capture if capture is not None else nullcontext(), torch.inference_mode():
        for number, batch in enumerate(batches):
            input_ids = batch_input_ids(tokens, batch, device)
            width = input_ids.shape[1]
            rows, cols, positions = _scored_rows(batch, device)
            retrieval = (
                batch_retrieval(neighbours_from, rows, cols, positions, tuple(input_ids.shape))
                if reuse
                else None
            )
            logits = batch_logits(forward, input_ids, batch, retrieval)
            # log_softmax in place on the gathered copy of the scored rows: one [n, V]
            # buffer besides the logits instead of two (the evaluation's memory peak).
            log_probs = _at_columns(logits, rows, cols, width).float()  # [n, V], a new tensor
            del logits
            log_probs.sub_(log_probs.logsumexp(dim=-1, keepdim=True))
            found = {"positions": positions, **_score(log_probs, targets_all[positions].to(device))}
            if capture is not None:
                queries = _at_columns(capture.states[key_layer], rows, cols, width)
                if keep_queries:
                    found["queries"] = queries.to(torch.float16).cpu()
                if search is not None:
                    found.update(search_neighbours(search, queries, int(config.k), log_probs))
            if neighbours_from is not None:
                found["lm_neighbour_log_probs"] = reused_neighbour_log_probs(
                    neighbours_from, positions, log_probs
                )
            for name, value in found.items():
                parts[name].append(value)
            bar.update(len(positions))
            if number % RELEASE_EVERY_BATCHES == 0:  # the forwards' temporaries fragment
                release_free_memory()  # the heap on CPU (hetgraph.allocator)
    return _assemble(parts, targets_all, target_docs, neighbours_from, ctx)
