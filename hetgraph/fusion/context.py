"""Per-call state of a fused forward, kept out of the modules: one context object per call.

The fusion hooks are installed once per :meth:`~hetgraph.HetGraphLM.attach`; everything one
forward call asks for and everything it retrieves and builds lives in one
:class:`ForwardContext`, held in one :class:`contextvars.ContextVar`:

- A caller that wants something of the *next* base-model call (:func:`call_options`: the
  options of :meth:`HetGraphLM.forward <hetgraph.HetGraphLM.forward>`) or of *every* call
  inside a block (:func:`knn_mixture`, :func:`generation_state`, :func:`fusion_only`)
  makes a context that has not started and makes it the current one for the block.
- When the base model is called, its pre-hook starts the call's context
  (:func:`enter_context`): a fresh one that takes the options of a context that has not
  started yet (once: a second call in the block, or a nested call, does not get them) and
  the block-wide settings of the current one; its post-hook ends it (:func:`exit_context`),
  which makes the enclosing one current again.

So nested calls (a ``generate`` inside an evaluation loop, a forward issued from a user
hook) and calls from several threads each see their own state, and nothing is ever written
onto a module. The only base-model call that joins a running context is the no-grad
prefetch pass the hooks issue themselves (``prefetch_call_pending``).
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


#: ``ForwardContext.only`` when every attached hook acts.
ANY_HOOKS = "any"


@dataclass
class ForwardContext:
    """One forward call of the wrapped model: what it was asked for and what it retrieves
    and builds (see the module docstring)."""

    #: What the call was asked for (:func:`call_options`), or the next call will be.
    options: CallOptions = field(default_factory=CallOptions)
    #: Block-wide settings, inherited by every call started inside the block: the kNN-LM
    #: mixture, the ``generate`` state and which fusion hooks act (:func:`fusion_only`).
    knn: KNNMixture | None = None
    generation: GenerationState | None = None
    only: object = ANY_HOOKS
    #: True once a base-model call runs in this context.
    started: bool = False
    attention_mask: Tensor | None = None
    retrieval: Retrieval | None = None
    #: With random neighbours: the call's tokens (``-1`` at padding), which identify its
    #: queries, and the retrieved neighbours the kNN-LM mixture uses (when it is on).
    query_tokens: Tensor | None = None
    knn_retrieval: Retrieval | None = None
    #: With a knowledge graph: the call's token ids after their KV-cache history
    #: (``[B, T' >= T]``), on which the graph's entities are linked.
    input_ids: Tensor | None = None
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
    #: The LM head's unfused input, kept for the ``orig_prob_ratio`` mixture.
    head_input: Tensor | None = None
    token: Token | None = None

    def scope(self, **changes: object) -> ForwardContext:
        """A context that has not started, with this one's block-wide settings (and no
        options) updated by ``changes``."""
        settings = dict(knn=self.knn, generation=self.generation, only=self.only)
        return ForwardContext(**{**settings, **changes})  # type: ignore[arg-type]


_current: ContextVar[ForwardContext | None] = ContextVar("hetgraph_forward_context", default=None)


def _scope() -> ForwardContext:
    return _current.get() or ForwardContext()


@contextmanager
def _within(context: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def active_context() -> ForwardContext | None:
    """The context of the forward call running in this thread / task, if any."""
    context = _current.get()
    return context if context is not None and context.started else None


def hooks_enabled(hooks: object) -> bool:
    """Whether ``hooks`` may act on calls in this thread / task (see :func:`fusion_only`)."""
    only = _scope().only
    return only is ANY_HOOKS or only is hooks


def enter_context(attention_mask: Tensor | None) -> ForwardContext:
    """Start the context of a base-model call: it takes the options of the current context
    if that has not started (consuming them: the next call does not get them again), and
    the block-wide settings of the current one."""
    current = _scope()
    options = CallOptions()
    if not current.started:
        options, current.options = current.options, CallOptions()
    if options.knn is None and current.knn is not None:
        options = replace(options, knn=current.knn)
    generation = current.generation
    if options.neighbour_states is None and generation is not None:
        options = replace(options, neighbour_states=generation.neighbour_states)
    context = current.scope(options=options, started=True, attention_mask=attention_mask)
    context.token = _current.set(context)
    return context


def exit_context(context: ForwardContext) -> None:
    """End the context started by :func:`enter_context` (restores the enclosing one)."""
    if context.token is not None:
        _current.reset(context.token)
        context.token = None


@contextmanager
def call_options(options: CallOptions) -> Iterator[None]:
    """Within this block, the next base-model call starts with ``options``."""
    with _within(_scope().scope(options=options)):
        yield


@contextmanager
def knn_mixture(mixture: KNNMixture | None) -> Iterator[None]:
    """Within this block, every forward's logits are kNN-LM mixtures (``None``: off)."""
    with _within(_scope().scope(knn=mixture)):
        yield


@contextmanager
def generation_state(
    neighbour_states: NeighbourStates | None = None,
) -> Iterator[GenerationState]:
    """A fresh :class:`GenerationState` for the base-model calls of one ``generate``."""
    state = GenerationState(neighbour_states=neighbour_states)
    with _within(_scope().scope(generation=state)):
        yield state


@contextmanager
def fusion_only(hooks: object | None) -> Iterator[None]:
    """Within this block only the fusion hooks ``hooks`` act on base-model calls (``None``:
    none does, the base model runs as if no hooks were attached); others stay registered
    but do nothing. Inspection uses it to run the base and the fused model whether or not a
    :class:`~hetgraph.HetGraphLM` is attached."""
    with _within(_scope().scope(only=hooks)):
        yield


@contextmanager
def reactivated(context: ForwardContext | None) -> Iterator[None]:
    """Within this block, ``context`` is the active one again (``None``: no change). Used
    when activation checkpointing recomputes a layer in the backward pass, after the
    forward call's context has ended, so fusion hooks inside the recomputed region find the
    call's retrieval and graphs instead of retrieving again."""
    if context is None:
        yield
        return
    with _within(context):
        yield
