"""Capturing hidden states of a Hugging Face causal LM with forward hooks.

This is the single place where "the key hidden state" of a position is defined; the
datastore build and every evaluation / query path use :class:`HiddenStateCapture`, so
keys and queries always come from exactly the same tensor.

A *layer spec* is ``None`` (the input of the LM head: the final, normed hidden state;
captured with a forward pre-hook on ``model.get_output_embeddings()``) or an ``int``
``i`` (the output of decoder layer ``i``; captured with a forward hook on
``decoder_layers(model)[i]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from hetgraph.corpus.tokenized import positions_from_doc_ids
from hetgraph.models.layers import (
    decoder_layers,
    hidden_states_of,
    output_embedding_input_hook_target,
    resolve_layer_index,
)

LayerSpec = Optional[int]  # noqa: UP045 (a runtime alias)


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once every requested state is captured
    (the rest of the model, e.g. the LM head's ``[B, T, V]`` logits, is never computed).
    Whoever calls the model catches it; :meth:`HiddenStateCapture.run` does."""


def normalize_layer(model: nn.Module, layer: LayerSpec) -> LayerSpec:
    """``None`` stays ``None``; an int (possibly negative) becomes ``0 … L-1``."""
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"a layer must be None (LM-head input) or an int, got {layer!r}")
    return resolve_layer_index(model, int(layer))


def layer_name(layer: LayerSpec) -> str:
    """Human-readable name of a layer spec."""
    return "lm_head_input" if layer is None else f"decoder_layer_{layer}"


class HiddenStateCapture:
    """Forward hooks that record the hidden states of some layers during a forward pass.

    Use as a context manager (hooks attached on enter, detached on exit) or call
    :meth:`attach` / :meth:`detach` explicitly.

    Args:
        model: a Hugging Face causal LM.
        layers: layer specs to capture (``None`` = LM-head input, ``int`` = decoder layer output).
        stop_forward: if True, the forward pass is aborted right after the last requested
            state is captured (so the LM head's ``[B, T, V]`` logits are never computed);
            use :meth:`run` to call the model in that mode.
        on_capture: if given, called as ``on_capture(layer, hidden)`` with each captured
            state instead of recording it in :attr:`states` (the fusion hooks retrieve
            neighbours from it). It may raise :class:`StopForward`.

    After a forward pass, ``capture.states[layer]`` holds the ``[B, T, d]`` tensor
    (detached, on the model's device, in the model's dtype).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSpec],
        stop_forward: bool = False,
        on_capture: Callable[[LayerSpec, Tensor], None] | None = None,
    ):
        self.model = model
        self.layers: list[LayerSpec] = list(
            dict.fromkeys(normalize_layer(model, l) for l in layers)
        )
        if not self.layers:
            raise ValueError("HiddenStateCapture needs at least one layer to capture")
        self.stop_forward = stop_forward
        self.on_capture = on_capture
        self.states: dict[LayerSpec, Tensor] = {}
        self._handles: list[Any] = []
        ints = [l for l in self.layers if l is not None]
        # The last module to run among the requested ones: the LM head comes after every layer.
        self._last: LayerSpec = None if None in self.layers else max(ints)

    # -- hooks -----------------------------------------------------------------------------
    def _store(self, layer: LayerSpec, hidden: Tensor) -> None:
        if self.on_capture is not None:
            self.on_capture(layer, hidden.detach())
            return
        self.states[layer] = hidden.detach()
        if self.stop_forward and layer == self._last and len(self.states) == len(self.layers):
            raise StopForward

    def attach(self) -> HiddenStateCapture:
        if self._handles:
            return self
        layers = None
        for layer in self.layers:
            if layer is None:
                head = output_embedding_input_hook_target(self.model)

                def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                    hidden = args[0] if args else kwargs.get("input", next(iter(kwargs.values())))
                    self._store(None, hidden)

                self._handles.append(head.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                layers = layers if layers is not None else decoder_layers(self.model)

                def hook(module: nn.Module, args: tuple, output: Any, _layer: int = layer) -> None:
                    self._store(_layer, hidden_states_of(output))

                self._handles.append(layers[layer].register_forward_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HiddenStateCapture:  # noqa: PYI034
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- running ----------------------------------------------------------------------------
    def run(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> dict[LayerSpec, Tensor]:
        """Run the model on ``input_ids`` and return the captured states.

        With ``stop_forward=True`` the forward ends as soon as the states are captured.
        Must be called while attached (inside the ``with`` block).
        """
        if not self._handles:
            raise RuntimeError("HiddenStateCapture.run() called while the hooks are detached")
        self.states = {}
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
        missing = [l for l in self.layers if l not in self.states]
        if missing:
            raise RuntimeError(f"the forward pass never reached {[layer_name(l) for l in missing]}")
        return self.states


def split_arrays(
    split: Any, max_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, doc_ids, positions)`` int32 arrays of a ``TokenizedSplit``-like object.

    ``split`` needs ``tokens`` and ``doc_ids`` arrays; ``positions`` (array or property)
    is computed from ``doc_ids`` when absent. ``max_tokens`` keeps the first tokens only.
    """
    tokens = np.asarray(split.tokens)
    doc_ids = np.asarray(split.doc_ids)
    positions = getattr(split, "positions", None)
    if max_tokens is not None:
        tokens, doc_ids = tokens[:max_tokens], doc_ids[:max_tokens]
    if positions is None:
        positions = positions_from_doc_ids(doc_ids)
    else:
        positions = np.asarray(positions)[: len(tokens)]
    if not (len(tokens) == len(doc_ids) == len(positions)):
        raise ValueError(
            f"split arrays differ in length: tokens {len(tokens)}, "
            f"doc_ids {len(doc_ids)}, positions {len(positions)}"
        )
    return (
        tokens.astype(np.int32, copy=False),
        doc_ids.astype(np.int32, copy=False),
        positions.astype(np.int32, copy=False),
    )


def model_dtype_name(model: nn.Module) -> str:
    """The model's parameter dtype without the ``torch.`` prefix (``"float32"``, …)."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


@torch.no_grad()
def probe_dims(
    model: nn.Module, layers: Sequence[LayerSpec], token_id: int = 0
) -> dict[LayerSpec, int]:
    """Width of the hidden state at each layer, measured with a one-token forward pass."""
    from hetgraph.models.layers import model_device

    ids = torch.tensor([[int(token_id)]], device=model_device(model))
    with HiddenStateCapture(model, layers, stop_forward=True) as cap:
        states = cap.run(ids)
    return {layer: int(h.shape[-1]) for layer, h in states.items()}
