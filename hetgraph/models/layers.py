"""Finding the decoder layers of any Hugging Face causal LM, and reading their outputs.

No table of model names: the decoder stack is the ``nn.ModuleList`` whose length is
the config's number of hidden layers (``model.model.layers`` for Qwen2 / Llama /
Mistral, ``model.transformer.h`` for GPT-2, and so on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the decoder-layer stack of a causal LM.

    Raises:
        ValueError: if no ``nn.ModuleList`` of ``config.num_hidden_layers`` modules exists.
    """
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (num_layers is None or len(module) == num_layers)
    ]
    if not candidates:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList "
            f"with config.num_hidden_layers={num_layers} modules. Pass a causal LM whose "
            "decoder layers live in one ModuleList (as in Qwen2, Llama, Mistral, GPT-2)."
        )
    # The shallowest such list is the decoder stack (nested lists belong to sub-blocks).
    _, module = min(candidates, key=lambda item: item[0].count("."))
    return module


def num_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def resolve_layer_index(model: nn.Module, layer: int) -> int:
    """Map a possibly negative decoder-layer index to ``0 … L-1``, with a clear error."""
    n = num_decoder_layers(model)
    if not -n <= layer < n:
        raise ValueError(
            f"layer {layer} is out of range for a model with {n} decoder layers "
            f"(valid: {-n} … {n - 1})"
        )
    return layer % n


def hidden_states_of(output: Any) -> Tensor:
    """Hidden states from a decoder layer's output: a tensor (transformers 5) or a tuple (4.x)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder-layer output of type {type(output).__name__}")


def with_hidden_states(output: Any, hidden: Tensor) -> Any:
    """The same decoder-layer output with its hidden states replaced."""
    if isinstance(output, Tensor):
        return hidden
    return (hidden, *output[1:]) if isinstance(output, tuple) else [hidden, *output[1:]]


def output_embedding_input_hook_target(model: nn.Module) -> nn.Module:
    """The module whose *input* is the final (normed) hidden state: the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
