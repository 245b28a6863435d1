"""Activation checkpointing of the frozen decoder layers of a :class:`~hetgraph.HetGraphLM`.

With a fused site below the last decoder layer, the loss back-propagates through frozen
decoder layers, whose activations then dominate training memory. HF's activation
checkpointing (non-reentrant ``torch.utils.checkpoint``) recomputes them in the backward
pass instead. HF applies it only to modules in training mode, but the base model of a
:class:`~hetgraph.HetGraphLM` stays in eval mode (its dropout off), so only the modules that
decide whether to checkpoint (the decoder layers in transformers 5, the decoder stack in
4.x) are switched to training mode, not their children.

In transformers 5 the checkpoint wraps each layer's ``forward``, so the fusion hooks run
outside it: the layers' checkpoint recomputes nothing of the fusion (each site's adapter is
checkpointed separately by :meth:`FusionEngine.fuse <hetgraph.FusionEngine.fuse>`, retrieval
and graph are never redone). Where a version wraps ``__call__``
(hooks inside), the checkpoint's ``context_fn`` re-activates the forward call's context for
the recomputation: the hooks reuse the call's retrieval and graph, and the preserved RNG
state gives the adapters the same dropout masks, so loss and gradients are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import nullcontext
from typing import Any

from torch import nn

from hetgraph.configuration import ConfigError
from hetgraph.fusion.context import active_context, reactivated

logger = logging.getLogger(__name__)


def _recompute_contexts() -> tuple[Any, Any]:
    # Called by torch.utils.checkpoint at each checkpointed forward: nothing to do in the
    # forward; the recomputation (in the backward) runs inside this call's context.
    return nullcontext(), reactivated(active_context())


def _flagged_modules(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def _checkpointed_modules(model: nn.Module) -> list[nn.Module]:
    # transformers 5: the decoder layers (GradientCheckpointingLayer) decide; the stack's own
    # flag then only drops the KV cache, which must not happen (e.g. generate in train mode).
    flagged = _flagged_modules(model)
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers 4.x: the decoder stack decides
        return flagged
    return [m for m in flagged if isinstance(m, GradientCheckpointingLayer)] or flagged


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing of ``model``'s decoder layers on or off.

    On: HF checkpointing with ``use_reentrant=False`` is enabled (without HF's
    ``enable_input_require_grads``: the inputs of the frozen LM need no gradient) and the
    modules that decide to checkpoint are put in training mode; their children (dropout,
    attention) stay in eval mode. Off: disabled again, those modules back in eval mode.

    Raises:
        ConfigError: ``enabled`` and the model does not support activation checkpointing.
    """
    if not enabled:
        if any(module.gradient_checkpointing for module in _flagged_modules(model)):
            disable = (
                getattr(model, "activation_checkpointing_disable", None)
                or model.gradient_checkpointing_disable
            )
            disable()
        for module in _flagged_modules(model):
            module.training = False
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"fusion.gradient_checkpointing: {type(model).__name__} does not "
            "support activation checkpointing; set gradient_checkpointing to "
            "false",
            "fusion.gradient_checkpointing",
        )
    kwargs = {"use_reentrant": False, "context_fn": _recompute_contexts}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    with contextlib.suppress(AttributeError):  # older transformers: nothing was registered
        model.disable_input_require_grads()
    modules = _checkpointed_modules(model)
    for module in modules:
        module.training = True
    logger.debug("activation checkpointing on for %d modules", len(modules))
