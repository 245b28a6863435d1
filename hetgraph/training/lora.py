r"""The LoRA control: an adapter of the graph adapter's size, trained the same way, without a graph.

GNN-LM trains its adapters on in-domain text; part of its gain over the base model may be
plain domain adaptation that any adapter of that size would get. The control separates the
two: LoRA (PEFT) on the frozen base model, its rank chosen so that its trained parameter
count is within ``tolerance`` (10 %) of the graph adapter's (:func:`matched_lora_rank`),
trained by :func:`train_lora_control` on the same tokens with the same schedule as
:func:`~hetgraph.training.train_adapter`: the same seeded block starts
(:func:`~hetgraph.training.schedule.sample_starts`; a datastore of ``len(train) - 1`` rows,
as the pipeline builds, draws exactly these blocks), the same micro-batches, gradient
accumulation, AdamW settings, learning-rate schedule, clipping, valid evaluations, early
stopping and best-on-valid saving. It always runs full forwards over the blocks (a LoRA
changes the hidden states, so stored datastore keys cannot stand in for them).

Where the LoRA goes: a graph adapter fused at decoder layer ``i`` changes that layer's
output, so the LoRA goes on layer ``i``'s projections; one at ``"head"`` (the default) acts
on the last hidden state, so the LoRA goes on the attention and MLP projections of the last
``head_layers`` decoder layers (4 by default: for the embedded SmolLM2-135M the head
adapter's ~2.8M parameters come to a rank of about 70 there, below the narrowest
projection's width), never on the LM head: the graph adapter leaves the head as it is and
changes its input, so the control adapts what computes that input. ``LoraControlConfig.layers`` and
``target_modules`` override the choice.

A control directory holds PEFT's ``save_pretrained`` files (``adapter_config.json``,
``adapter_model.safetensors``) and :data:`LORA_CONTROL_MARKER`, hetgraph's record of kind
``"lora_control"``: the base model's fingerprint, rank, targets, trained parameters, the
tokens trained on and the files' checksums; and ``training.json``, as a graph adapter run.
PEFT is an optional extra, imported only when a control is made or loaded:
``pip install 'hetgraph[lora]'``.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from hetgraph.configuration import JSONConfigMixin
from hetgraph.integrity import atomic_write_json_record, read_json_record
from hetgraph.io import ADAPTER_WEIGHTS, TRAINING_RESULT
from hetgraph.locking import directory_lock
from hetgraph.models.checks import check_context_length, check_token_ids
from hetgraph.models.fingerprint import array_fingerprint
from hetgraph.models.layers import decoder_layers, resolve_layer_index
from hetgraph.storage import remove_stale_temporaries
from hetgraph.training.config import TrainingConfig
from hetgraph.training.lora_persistence import (
    FORMAT_VERSION,
    LORA_CONTROL_KIND,
    LORA_CONTROL_MARKER,
    LoraControlError,
    base_identity,
    import_peft,
    is_lora_control,
    load_lora_control,
    read_lora_control,
)
from hetgraph.training.lora_run import LoraControlResult, LoraRun, training_blocks

__all__ = [
    "LORA_CONTROL_MARKER",
    "LoraControlConfig",
    "LoraControlError",
    "LoraControlResult",
    "graph_adapter_parameters",
    "is_lora_control",
    "load_lora_control",
    "lora_layers",
    "lora_targets",
    "matched_lora_rank",
    "parameters_per_rank",
    "read_lora_control",
    "train_lora_control",
    "training_blocks",
]

logger = logging.getLogger(__name__)


@dataclass
class LoraControlConfig(JSONConfigMixin):
    """Settings of the LoRA control (JSON-serialisable).

    Args:
        rank: the LoRA rank, or ``"match"``: the rank whose trained parameter count is
            closest to the graph adapter's (:func:`matched_lora_rank`).
        layers: decoder layers (negative allowed) whose projections get a LoRA; ``None``:
            those of the graph adapter's fusion sites (see the module docstring).
        head_layers: for a graph adapter at ``"head"``: how many of the last decoder layers.
        target_modules: names (last components, e.g. ``["q_proj", "v_proj"]``) of the
            projections to adapt inside those layers; ``None``: every linear projection.
        alpha: LoRA's ``lora_alpha``; ``None``: twice the rank.
        dropout: LoRA's ``lora_dropout``.
        tolerance: how far from the graph adapter's count ``"match"`` may land (0.1 = 10 %).
    """

    rank: int | Literal["match"] = "match"
    layers: tuple[int, ...] | None = None
    head_layers: int = 4
    target_modules: tuple[str, ...] | None = None
    alpha: float | None = None
    dropout: float = 0.0
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank != "match" and self.rank < 1:
            raise ValueError(f"rank must be >= 1 or 'match', got {self.rank}")
        if self.head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {self.head_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0 or null, got {self.alpha}")


def graph_adapter_parameters(source: Any) -> int:
    """Trained parameters of a graph adapter: a :class:`~hetgraph.HetGraphLM` or an adapter
    directory (read from its weights file's header, nothing loaded)."""
    if isinstance(source, nn.Module):
        return sum(int(t.numel()) for t in source.adapter_state_dict().values())
    from safetensors import safe_open

    path = Path(source) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except (OSError, RuntimeError, ValueError) as error:
        raise LoraControlError(
            f"{path} cannot be read ({error}); pass a trained graph adapter directory"
        ) from None


def _projection(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections

    return isinstance(module, (nn.Linear, Conv1D))


def lora_layers(model: nn.Module, config: LoraControlConfig, sites: Any = ("head",)) -> list[int]:
    """The decoder layers that get a LoRA: ``config.layers``, else those of the graph
    adapter's fusion ``sites`` (a ``fusion_layers`` specification)."""
    from hetgraph.fusion.sites import HEAD, resolve_fusion_sites

    num_layers = len(decoder_layers(model))
    if config.layers is not None:
        try:
            return sorted({resolve_layer_index(model, layer) for layer in config.layers})
        except ValueError as error:
            raise LoraControlError(f"lora.layers: {error}") from None
    chosen: set[int] = set()
    for site in resolve_fusion_sites(sites, num_layers):
        chosen.update(
            range(max(0, num_layers - config.head_layers), num_layers) if site == HEAD else [site]
        )
    return sorted(chosen)


def lora_targets(model: nn.Module, config: LoraControlConfig, sites: Any = ("head",)) -> list[str]:
    """Full module names of the projections that get a LoRA (see :func:`lora_layers`)."""
    stack = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is stack)
    targets = []
    for layer in lora_layers(model, config, sites):
        for name, module in stack[layer].named_modules():
            if _projection(module) and (
                config.target_modules is None or name.rsplit(".", 1)[-1] in config.target_modules
            ):
                targets.append(f"{prefix}.{layer}.{name}")
    if not targets:
        raise LoraControlError(
            f"lora.target_modules {list(config.target_modules or [])} names "
            "no linear projection of the chosen decoder layers; name "
            "projections of this model (e.g. q_proj, c_attn) or use null"
        )
    return targets


def parameters_per_rank(model: nn.Module, targets: list[str]) -> int:
    """LoRA parameters per unit of rank on ``targets``: ``in + out`` of each projection."""
    modules = dict(model.named_modules())
    return sum(int(sum(modules[name].weight.shape)) for name in targets)


def matched_lora_rank(
    model: nn.Module, target_params: int, targets: list[str], tolerance: float = 0.1
) -> int:
    """The rank whose LoRA on ``targets`` trains the number of parameters closest to
    ``target_params`` (the graph adapter's).

    Raises:
        LoraControlError: no rank comes within ``tolerance`` of ``target_params``.
    """
    unit = parameters_per_rank(model, targets)
    if target_params < 1:
        raise LoraControlError(
            f"the graph adapter has {target_params} parameters; pass the "
            "parameter count of a trained graph adapter"
        )
    exact = target_params / unit
    rank = min(
        {max(1, math.floor(exact)), max(1, math.ceil(exact))},
        key=lambda r: abs(r * unit - target_params),
    )
    off = abs(rank * unit - target_params) / target_params
    if off > tolerance:
        raise LoraControlError(
            f"no LoRA rank comes within {tolerance:.0%} of the graph adapter's "
            f"{target_params:,} parameters on {len(targets)} projections ({unit:,} parameters "
            f"per rank; rank {rank} trains {rank * unit:,}): choose fewer or more decoder "
            "layers (lora.layers, lora.head_layers) or other lora.target_modules"
        )
    logger.info(
        "LoRA control: rank %d on %d projections trains %s parameters (%+.1f %% of "
        "the graph adapter's %s)",
        rank,
        len(targets),
        f"{rank * unit:,}",
        100 * (rank * unit - target_params) / target_params,
        f"{target_params:,}",
    )
    return rank


def wrap_with_lora(
    model: nn.Module, rank: int, targets: list[str], config: LoraControlConfig
) -> Any:
    """``model`` with a fresh LoRA on ``targets`` (injected in place; the base frozen)."""
    peft = import_peft()
    if hasattr(model, "peft_config"):
        raise LoraControlError(
            "the model already carries a PEFT adapter; pass a freshly loaded base model"
        )
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=config.alpha if config.alpha is not None else 2 * rank,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=all(isinstance(modules[t], Conv1D) for t in targets),
    )
    with warnings.catch_warnings():  # PEFT and transformers' deprecation chatter
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, lora)


def train_lora_control(
    model: nn.Module,
    tokenizer: Any,
    train_split: Any,
    valid_split: Any | None,
    training_config: TrainingConfig,
    lora_config: LoraControlConfig,
    out_dir: str | Path,
    *,
    target_params: int,
    sites: Any = ("head",),
    eval_config: Any = None,
    show_progress: bool = True,
) -> LoraControlResult:
    """Train the LoRA control on ``train_split`` as :func:`~hetgraph.training.train_adapter`
    trains the graph adapter (the same blocks for ``training_config``'s seed, the same
    schedule) and save the best on valid to ``out_dir``, locked while it runs.

    ``model`` is the frozen base model: the LoRA is injected into it in place, and the
    result's ``model`` is the PEFT model holding the best LoRA. A run started again trains
    again from the start (the same seed gives the same control); every file is replaced
    atomically, so the last saved control stays usable until a new one is complete.

    Args:
        tokenizer: the base model's (its fingerprint is recorded).
        train_split, valid_split: ``TokenizedSplit``s (``valid_split`` ``None``: no
            evaluations; the last step's control is saved).
        training_config: the graph adapter's :class:`TrainingConfig` (``from_datastore``
            and ``init_from`` do not apply: full forwards from a fresh LoRA).
        target_params: the graph adapter's trained parameters
            (:func:`graph_adapter_parameters`), matched when ``lora_config.rank`` is ``"match"``.
        sites: the graph adapter's ``fusion_layers`` (where the LoRA goes).
        eval_config: windows of the valid evaluations
            (:class:`~hetgraph.evaluation.EvalConfig`), as in ``train_adapter``.

    Raises:
        LoraControlError: PEFT is missing, no rank matches, or ``out_dir`` holds something
            else (a graph adapter, a control trained with other settings).
        hetgraph.training.trainer.TrainingError: the train split is too short.
    """
    import_peft()  # a missing extra fails before any work
    out_dir = Path(out_dir)
    if (out_dir / ADAPTER_WEIGHTS).exists():
        raise LoraControlError(
            f"{out_dir} holds a graph adapter; write the LoRA control to its own --out directory"
        )
    _check_inputs(model, train_split, training_config)
    targets = lora_targets(model, lora_config, sites)
    rank = (
        matched_lora_rank(model, target_params, targets, lora_config.tolerance)
        if lora_config.rank == "match"
        else int(lora_config.rank)
    )
    tokens = np.asarray(train_split.tokens, dtype=np.int64)
    record = {
        "kind": LORA_CONTROL_KIND,
        "format_version": FORMAT_VERSION,
        "model": base_identity(model, tokenizer),
        "base_model": str(getattr(model.config, "_name_or_path", "") or "") or None,
        "lora": lora_config.to_dict(),
        "training": training_config.to_dict(),
        "rank": rank,
        "target_modules": targets,
        "target_params": int(target_params),
        "trained_params": rank * parameters_per_rank(model, targets),
        "train_tokens": {"count": len(tokens), "fingerprint": array_fingerprint(tokens)},
    }
    with directory_lock(out_dir, "LoRA control directory"):
        remove_stale_temporaries(out_dir)
        _check_rerun(out_dir, record)
        torch.manual_seed(training_config.seed)  # the LoRA's initialisation
        peft_model = wrap_with_lora(model, rank, targets, lora_config)
        result = LoraRun(
            peft_model, tokens, valid_split, training_config, eval_config, out_dir, record
        ).run(show_progress)
        result.rank, result.target_modules, result.target_params = rank, targets, target_params
        result.trained_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        atomic_write_json_record(
            out_dir / TRAINING_RESULT,
            {"config": training_config.to_dict(), "control": "lora", "result": result.to_dict()},
        )
    return result


def _check_inputs(model: nn.Module, train_split: Any, config: TrainingConfig) -> None:
    from hetgraph.training.trainer import TrainingError

    length = len(train_split.tokens)
    if length < config.context_length + 1:
        raise TrainingError(
            f"the train split has {length} tokens, fewer than context_length "
            f"+ 1 = {config.context_length + 1}: lower "
            "training.context_length or use more text (a larger --max-tokens)"
        )
    check_context_length(model, config.context_length, "training.context_length")
    check_token_ids(train_split.tokens, model, "the train split")


def _check_rerun(out_dir: Path, record: dict[str, Any]) -> None:
    # A rerun with the same settings replaces the control; other settings would silently
    # replace another experiment's control, so they are refused.
    if not is_lora_control(out_dir):
        return
    try:
        saved = read_json_record(out_dir / LORA_CONTROL_MARKER, LoraControlError)
    except LoraControlError:
        return  # a damaged marker: the new run replaces it
    keys = ("model", "lora", "training", "rank", "target_modules", "train_tokens")
    if any(saved.get(key) != record[key] for key in keys):
        raise LoraControlError(
            f"{out_dir} holds a LoRA control trained with other settings, "
            "base model or train split; use a new --out directory"
        )
