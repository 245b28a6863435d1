"""The forward hooks that join a :class:`~hetgraph.fusion.engine.FusionEngine` to a frozen base
model.

:class:`FusionHooks` registers, once per attach, a pre/post hook pair on the base model
(which opens and closes each call's :class:`~hetgraph.fusion.context.ForwardContext`), a
:class:`~hetgraph.datastore.HiddenStateCapture` at the retrieval site (the same code that
captured the datastore's keys defines what a query is), and one hook per fused site. The
hooks hold no state of their own: whatever a call retrieves and builds lives in its
context, and every computation is a stateless step of the engine; the hooks hand it the pieces
of the base model a step needs (the token embedding) and, when a knowledge graph is fused,
the call's token ids after their KV-cache history (entities are linked on them).

Every hook is excluded from ``torch.compile`` (``torch.compiler.disable``): a compiled base
model breaks its graph at each hook and runs the fusion eagerly, with the same logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hetgraph.datastore.capture import HiddenStateCapture, StopForward
from hetgraph.fusion.config import HEAD, FusionSite
from hetgraph.fusion.context import (
    ForwardContext,
    active_context,
    enter_context,
    exit_context,
    hooks_enabled,
)
from hetgraph.models.layers import (
    decoder_layers,
    hidden_states_of,
    output_embedding_input_hook_target,
    with_hidden_states,
)

if TYPE_CHECKING:
    from hetgraph.fusion.engine import FusionEngine


class FusionHooks:
    """Retrieval and fusion hooks of one :class:`~hetgraph.fusion.engine.FusionEngine` on a
    base model.

    Args:
        model: the frozen Hugging Face causal LM the hooks are registered on.
        engine: the engine whose :meth:`~hetgraph.fusion.engine.FusionEngine.retrieve`,
            :meth:`~hetgraph.fusion.engine.FusionEngine.fuse` and kNN mixture the hooks call.
    """

    def __init__(self, model: nn.Module, engine: FusionEngine) -> None:
        self.model = model
        self.engine = engine
        self.handles: list[RemovableHandle] = []
        self.capture: HiddenStateCapture | None = None

    @property
    def is_attached(self) -> bool:
        return bool(self.handles) or self.capture is not None

    def attach(self) -> None:
        """Register every hook (idempotent). The capture at the retrieval site is
        registered before the fusion hooks, so it sees the site's unfused state."""
        if self.is_attached:
            return
        model = self.model
        self.handles.append(model.register_forward_pre_hook(self._on_call_start, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._on_call_end, always_call=True))
        site = self.engine.retrieval_site
        self.capture = HiddenStateCapture(
            model, [None if site == HEAD else int(site)], on_capture=self._on_query
        ).attach()
        layers = decoder_layers(model)
        for site in self.engine.fusion_sites:
            if site == HEAD:
                head = output_embedding_input_hook_target(model)
                self.handles.append(head.register_forward_pre_hook(self._fuse_head_input))
                if self.engine.config.orig_prob_ratio > 0:
                    self.handles.append(head.register_forward_hook(self._mix_original))
            else:
                hook = self._layer_hook(int(site))
                self.handles.append(layers[int(site)].register_forward_hook(hook))

    def detach(self) -> None:
        """Remove every hook; the base model is as it was before :meth:`attach`."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.capture is not None:
            self.capture.detach()
            self.capture = None

    # ------------------------------------------------------------- call lifetime
    @torch.compiler.disable
    def _on_call_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not hooks_enabled(self):
            return
        outer = active_context()
        if outer is not None and outer.prefetch_call_pending:
            outer.prefetch_call_pending = False  # the prefetch pass of `outer` runs in its context
            return
        context = enter_context(kwargs.get("attention_mask"))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        random = self.engine.config.neighbours == "random"
        knowledge = self.engine.knowledge is not None
        history = None
        if input_ids is not None and (random or knowledge or self.engine.needs_prefetch):
            # The KV cache is ``cache`` since transformers 5, ``past_key_values`` before.
            past = kwargs.get("cache", kwargs.get("past_key_values"))
            history = self._history_ids(context, input_ids, past)
        if knowledge:  # entities are linked on the history too: a mention may span steps
            context.input_ids = history
        if random and history is not None:  # random neighbours are drawn from the tokens
            mask = context.attention_mask
            context.query_tokens = (
                history
                if mask is None or mask.shape != history.shape
                else history.masked_fill(mask == 0, -1)
            )
        if self.engine.needs_prefetch:
            self._prefetch(context, input_ids, history)

    @torch.compiler.disable
    def _on_call_end(self, module: nn.Module, args: tuple, output: Any) -> Any:
        context = active_context()
        if context is None or not hooks_enabled(self):
            return None
        if context.prefetching:  # the end of the prefetch pass's own call, not of this one
            return None
        exit_context(context)
        if output is None:  # the call raised; always_call hooks still close its context
            return None
        # Random neighbours feed the graph; the kNN-LM mixture keeps the retrieved ones.
        knn_retrieval = context.knn_retrieval or context.retrieval
        if context.options.knn is not None and knn_retrieval is not None:
            output.logits = self.engine.knn_mixture_logits(
                output.logits, knn_retrieval, context.options.knn
            )
        if context.options.output_retrieval:
            output.retrieval = context.retrieval
        return output

    # ------------------------------------------------------------------ retrieval
    @torch.compiler.disable
    def _on_query(self, layer: int | None, hidden: Tensor) -> None:
        context = active_context()
        if context is None or not hooks_enabled(self):
            return
        if context.prefetching:
            context.prefetched_queries = hidden
            raise StopForward
        if not self.engine.needs_prefetch:
            self._retrieve(context, hidden)

    def _retrieve(self, context: ForwardContext, queries: Tensor) -> None:
        context.retrieval = self.engine.retrieve(
            queries, context.options, tokens=context.query_tokens
        )
        if context.options.knn is not None and self.engine.config.neighbours == "random":
            context.knn_retrieval = self.engine.retrieve(
                queries, context.options, neighbours="retrieved"
            )

    def _prefetch(
        self, context: ForwardContext, input_ids: Tensor | None, history: Tensor | None
    ) -> None:
        # Some fused site runs before the retrieval site: a no-grad pass up to the
        # retrieval site supplies the queries first (history: _history_ids of input_ids).
        if input_ids is None or history is None:
            raise ValueError("HetGraphLM with a prefetch pass needs input_ids (not inputs_embeds)")
        if self.engine.config.neighbours == "retrieved":  # neighbours handed in: no queries needed
            k = context.options.k or self.engine.config.k
            ready = self.engine.retriever.complete(
                context.options, k, input_ids.shape[0], input_ids.shape[-1], input_ids.device
            )
            if ready is not None:
                context.retrieval = ready
                return
        mask = context.attention_mask
        if mask is not None and mask.shape[-1] != history.shape[-1]:
            mask = None
        context.prefetching = context.prefetch_call_pending = True
        try:
            with torch.no_grad():
                self.model(input_ids=history, attention_mask=mask, use_cache=False)
        except StopForward:
            pass
        finally:
            context.prefetching = context.prefetch_call_pending = False
        if context.prefetched_queries is None:
            raise RuntimeError("the prefetch pass never reached the retrieval site")
        self._retrieve(context, context.prefetched_queries[:, -input_ids.shape[-1] :])

    @staticmethod
    def _history_ids(context: ForwardContext, input_ids: Tensor, past: Any) -> Tensor:
        # With a KV cache the model sees only new tokens; the prefetch pass (no cache) needs all.
        state = context.generation
        if state is None:
            return input_ids
        past_length = past.get_seq_length() if hasattr(past, "get_seq_length") else 0
        previous = state.history
        if past_length == 0 or previous is None or previous.shape[-1] != past_length:
            history = input_ids
        else:
            history = torch.cat([previous, input_ids], dim=-1)
        state.history = history
        return history

    # --------------------------------------------------------------------- fusion
    def _fuse(self, site: FusionSite, hidden: Tensor) -> Tensor | None:
        context = active_context()
        if context is None or context.prefetching or not hooks_enabled(self):
            return None
        if context.retrieval is None:
            raise RuntimeError(
                "no neighbours were retrieved before a fused site; this is a bug in the hook order"
            )
        length = hidden.shape[1]
        graph = context.graphs.get(length)
        if graph is None:  # one graph per call, shared by every fused site
            graph = self.engine.build_graph(
                context.retrieval, length, context.attention_mask, context.input_ids
            )
            context.graphs[length] = graph
            context.gate_statistics[length] = self.engine.gate_statistics(context.retrieval, length)
        return self.engine.fuse(
            site,
            hidden,
            graph,
            context.gate_statistics[length],
            context.options.neighbour_states,
            embedding=self.model.get_input_embeddings(),
        )

    @torch.compiler.disable
    def _fuse_head_input(self, module: nn.Module, args: tuple) -> tuple | None:
        fused = self._fuse(HEAD, args[0])
        if fused is None:
            return None
        if self.engine.config.orig_prob_ratio > 0:
            context = active_context()
            if context is not None:
                context.head_input = args[0]
        return (fused, *args[1:])

    @torch.compiler.disable
    def _mix_original(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        # orig_prob_ratio: log(r·softmax(head(h)) + (1-r)·softmax(head(fused))).
        context = active_context()
        if context is None or context.head_input is None or not hooks_enabled(self):
            return None
        original, context.head_input = context.head_input, None
        return self.engine.mix_original(output, module.forward(original))

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            fused = self._fuse(layer, hidden_states_of(output))
            return None if fused is None else with_hidden_states(output, fused)

        return torch.compiler.disable(hook)
