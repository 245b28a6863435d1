"""Per-call state of a :class:`~hetgraph.HetGraphLM` forward, kept out of the module.

The fusion hooks are installed once per :meth:`~hetgraph.HetGraphLM.attach`; everything
one forward call retrieves and builds lives in a :class:`ForwardContext` created when
that call enters the base model and dropped when it leaves. The active context is held
in a :class:`contextvars.ContextVar`, so nested calls (a ``generate`` inside an
evaluation loop, a forward issued from a user hook) and calls from several threads
each see their own state, and nothing is ever written onto the module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from hetgraph.fusion.neighbour_states import NeighbourStates
    from hetgraph.graph import ContextGraph


@dataclass(frozen=True)
class KNNMixture:
    """kNN-LM interpolation of the output distribution: ``λ·p_kNN + (1-λ)·p_LM``."""

    lam: float
    temperature: float


@dataclass(frozen=True)
class CallOptions:
    """What the caller of one forward asks for.

    Args:
        query_positions: ``[B, T]`` datastore rows of the input tokens when the text is
            itself in the datastore (training), else ``None``.
        k: neighbours per position for this call (``None``: ``FusionConfig.k``).
        knn: interpolate the output logits with kNN-LM, or ``None``.
        output_retrieval: attach the call's :class:`Retrieval` to the model output
            (``output.retrieval``).
        neighbour_states: the :class:`~hetgraph.NeighbourStates` the adapters read their
            windows' part from (eval mode), or ``None``.
        retrieval: neighbours already retrieved for the call's last positions (a
            :class:`Retrieval` of ``k`` neighbours each, e.g. an evaluation's base run):
            used instead of searching the index, which is then searched only for the
            positions it does not cover (with ``neighbours="random"`` the graph's draws
            ignore it; the kNN-LM mixture uses it).
    """

    query_positions: Tensor | None = None
    k: int | None = None
    knn: KNNMixture | None = None
    output_retrieval: bool = False
    neighbour_states: NeighbourStates | None = None
    retrieval: Retrieval | None = None


@dataclass
class Retrieval:
    """The neighbours one forward retrieved: ``[B, T, k]`` rows (``-1``: none) and
    squared-L2 (or inner-product) distances, as returned by FAISS. ``covered`` (``[B, T]``
    bool, ``None``: every position) marks the positions whose neighbours it holds, when it
    is handed into a call (:attr:`CallOptions.retrieval`) for some positions only."""

    distances: Tensor
    neighbour_ids: Tensor
    covered: Tensor | None = None

    def last(self, length: int) -> Retrieval:
        """The retrieval of the last ``length`` positions."""
        covered = None if self.covered is None else self.covered[:, -length:]
        return Retrieval(self.distances[:, -length:], self.neighbour_ids[:, -length:], covered)

    @property
    def is_complete(self) -> bool:
        """Whether it holds the neighbours of every position."""
        return self.covered is None or bool(self.covered.all())


@dataclass
class GenerationState:
    """State that lives across the steps of one ``generate`` call: the token history the
    no-grad prefetch pass needs when the KV cache feeds the model only new tokens, and the
    :class:`~hetgraph.NeighbourStates` every step reads (or ``None``)."""

    history: Tensor | None = None
    neighbour_states: NeighbourStates | None = None


@dataclass
class ForwardContext:
    """Everything one forward call of the wrapped model retrieves and builds."""

    options: CallOptions
    attention_mask: Tensor | None = None
    generation: GenerationState | None = None
    retrieval: Retrieval | None = None
    #: With random neighbours: the call's tokens (``-1`` at padding), which identify its
    #: queries, and the retrieved neighbours the kNN-LM mixture uses (when it is on).
    query_tokens: Tensor | None = None
    knn_retrieval: Retrieval | None = None
    #: Context graphs of this call, keyed by the number of positions they cover.
    graphs: dict[int, ContextGraph] = field(default_factory=dict)
    #: Retrieval-gate statistics of this call (``gate="retrieval"``), keyed like ``graphs``.
    gate_statistics: dict[int, Tensor | None] = field(default_factory=dict)
    #: True while the no-grad prefetch pass of this call runs.
    prefetching: bool = False
    prefetched_queries: Tensor | None = None
    #: Set just before the prefetch pass calls the base model, so that call (and only it,
    #: not another call made meanwhile from a user hook) joins this context.
    prefetch_call_pending: bool = False
    #: Base-model calls running inside this context that belong to it (the prefetch pass).
    inner_calls: int = 0
    #: The LM head's unfused input, kept for the ``orig_prob_ratio`` mixture.
    head_input: Tensor | None = None
    token: Token | None = None


_active: ContextVar[ForwardContext | None] = ContextVar("hetgraph_forward_context", default=None)
_options: ContextVar[CallOptions | None] = ContextVar("hetgraph_call_options", default=None)
_knn: ContextVar[KNNMixture | None] = ContextVar("hetgraph_knn_mixture", default=None)
_generation: ContextVar[GenerationState | None] = ContextVar("hetgraph_generation", default=None)


#: Which hooks may act (:func:`fusion_only`); ``_ANY``: every attached one.
_ANY = object()
_only: ContextVar[object] = ContextVar("hetgraph_fusion_only", default=_ANY)


@contextmanager
def fusion_only(hooks: object | None) -> Iterator[None]:
    """Within this block only the fusion hooks ``hooks`` act on base-model calls (``None``:
    none does, the base model runs as if no hooks were attached); others stay registered
    but do nothing. Inspection uses it to run the base and the fused model whether or not a
    :class:`~hetgraph.HetGraphLM` is attached."""
    token = _only.set(hooks)
    try:
        yield
    finally:
        _only.reset(token)


def hooks_enabled(hooks: object) -> bool:
    """Whether ``hooks`` may act on calls in this thread / task (see :func:`fusion_only`)."""
    only = _only.get()
    return only is _ANY or only is hooks


def active_context() -> ForwardContext | None:
    """The context of the forward call running in this thread / task, if any."""
    return _active.get()


def enter_context(attention_mask: Tensor | None) -> ForwardContext:
    """Start the context of a base-model call: consumes the options the caller set with
    :func:`call_options`, so a nested call does not inherit them."""
    options = _options.get() or CallOptions()
    if options.knn is None and _knn.get() is not None:
        options = replace(options, knn=_knn.get())
    generation = _generation.get()
    if options.neighbour_states is None and generation is not None:
        options = replace(options, neighbour_states=generation.neighbour_states)
    context = ForwardContext(options=options, attention_mask=attention_mask, generation=generation)
    context.token = _active.set(context)
    _options.set(None)
    return context


def exit_context(context: ForwardContext) -> None:
    """End the context started by :func:`enter_context` (restores the enclosing one)."""
    if context.token is not None:
        _active.reset(context.token)
        context.token = None


@contextmanager
def call_options(options: CallOptions) -> Iterator[None]:
    """Within this block, the next base-model call starts with ``options``."""
    token = _options.set(options)
    try:
        yield
    finally:
        _options.reset(token)


@contextmanager
def knn_mixture(mixture: KNNMixture | None) -> Iterator[None]:
    """Within this block, every forward's logits are kNN-LM mixtures (``None``: off)."""
    token = _knn.set(mixture)
    try:
        yield
    finally:
        _knn.reset(token)


@contextmanager
def generation_state(
    neighbour_states: NeighbourStates | None = None,
) -> Iterator[GenerationState]:
    """A fresh :class:`GenerationState` for the base-model calls of one ``generate``."""
    state = GenerationState(neighbour_states=neighbour_states)
    token = _generation.set(state)
    try:
        yield state
    finally:
        _generation.reset(token)


@contextmanager
def reactivated(context: ForwardContext | None) -> Iterator[None]:
    """Within this block, ``context`` is the active one again (``None``: no change). Used
    when activation checkpointing recomputes a layer in the backward pass, after the
    forward call's context has ended, so fusion hooks inside the recomputed region find the
    call's retrieval and graphs instead of retrieving again."""
    if context is None:
        yield
        return
    token = _active.set(context)
    try:
        yield
    finally:
        _active.reset(token)
