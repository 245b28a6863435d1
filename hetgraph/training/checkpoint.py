r"""Resumable training checkpoints: adapter weights, optimiser state and trainer state.

A checkpoint is the directory ``<out_dir>/checkpoint`` holding what
``HetGraphLM.save_pretrained`` writes, ``optimizer.safetensors`` (the optimiser's
tensors) and ``trainer_state.json`` (step, settings, results so far, and the optimiser's
parameter groups and scalar state). It is written into a temporary directory and swapped
in whole (:func:`hetgraph.io.atomic_directory`), so a run killed while saving still
finds the previous checkpoint. A crash between that swap's two renames leaves the previous
checkpoint only under its set-aside name (``.checkpoint.old-*``); :func:`read_checkpoint`
puts it back instead of starting again from step 0.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from hetgraph.errors import HetgraphError
from hetgraph.fusion.persistence import (
    AdapterFileError,
    AdapterMismatchError,
    read_adapter_config,
    read_adapter_weights,
)
from hetgraph.io import (
    CHECKPOINT_DIR,
    OPTIMIZER_WEIGHTS,
    TRAINER_STATE,
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_json,
    read_json,
)

if TYPE_CHECKING:
    from hetgraph.fusion import HetGraphLM

logger = logging.getLogger(__name__)


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    r"""Write the optimiser's tensors to the safetensors file ``path``; return the rest of
    its state (parameter groups and non-tensor values, JSON-serialisable) for
    :func:`load_optimizer_state`."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            key = f"{param_id}.{name}"
            if isinstance(value, Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    atomic_save_safetensors(path, tensors)
    return {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path,
                         meta: dict[str, Any]) -> None:
    r"""Restore ``optimizer`` from the tensors in ``path`` and the ``meta`` returned by
    :func:`save_optimizer_state`."""
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(lm: HetGraphLM, optimizer: torch.optim.Optimizer, out_dir: str | Path,
                     trainer_state: dict[str, Any]) -> None:
    r"""Replace ``out_dir/checkpoint`` with ``lm``'s adapters, ``optimizer``'s state and
    ``trainer_state`` (JSON-serialisable; the optimiser's metadata is added under
    ``"optimizer"``)."""
    with atomic_directory(Path(out_dir) / CHECKPOINT_DIR) as tmp:
        lm.save_pretrained(tmp)
        optimizer_meta = save_optimizer_state(optimizer, tmp / OPTIMIZER_WEIGHTS)
        atomic_write_json(tmp / TRAINER_STATE, {**trainer_state, "optimizer": optimizer_meta})


def read_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    r"""The trainer state of ``out_dir/checkpoint`` as written by :func:`write_checkpoint`,
    or ``None`` if there is no checkpoint.

    When ``checkpoint`` is missing but a checkpoint set aside by an interrupted swap
    (:func:`hetgraph.io.atomic_directory` names it ``.checkpoint.old-*``) is complete, it is
    renamed back to ``checkpoint`` and read; set-aside copies next to a complete
    ``checkpoint`` are stale and removed. Call it only while holding ``out_dir``'s lock.
    """
    out_dir = Path(out_dir)
    target = out_dir / CHECKPOINT_DIR
    set_aside = sorted(out_dir.glob(f".{CHECKPOINT_DIR}.old-*"))
    if not (target / TRAINER_STATE).is_file():
        # A set-aside copy whose state does not read is incomplete: never recovered.
        steps = {p: _readable_state(p / TRAINER_STATE) for p in set_aside}
        complete = [p for p, state in steps.items() if state is not None]
        if not complete:
            return None
        best = max(complete, key=lambda p: steps[p].get("step", -1))  # type: ignore[union-attr]
        if target.exists():
            shutil.rmtree(target)
        os.rename(best, target)
        logger.warning("recovered the checkpoint %s from %s, left by a run interrupted while "
                       "saving", target, best.name)
    for stale in out_dir.glob(f".{CHECKPOINT_DIR}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    state = _readable_state(target / TRAINER_STATE)
    if state is None:
        raise CheckpointError(f"{target / TRAINER_STATE} is damaged (not a JSON object); delete "
                              f"{target} to train again from the start (the best adapter "
                              f"saved in {out_dir}, if any, is kept)")
    return state


class CheckpointError(HetgraphError):
    """A training checkpoint that cannot be resumed (its state file does not read)."""


def _readable_state(path: Path) -> dict[str, Any] | None:
    """The trainer state in ``path`` if it is a readable JSON object, else :obj:`None`."""
    if not path.is_file():
        return None
    try:
        state = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


def load_adapter_weights(lm: HetGraphLM, directory: str | Path,
                         device: torch.device | str) -> None:
    r"""Load the adapter weights ``directory/adapter.safetensors`` (as written by
    ``HetGraphLM.save_pretrained``) into ``lm``, onto ``device``, checked against their
    integrity record like any saved adapter."""
    lm.load_adapter_state_dict(read_adapter_weights(directory, device))


class InitAdapterError(HetgraphError):
    """The adapter named by ``TrainingConfig.init_from`` (``hetgraph train --init-from``)
    cannot start this training run."""


def check_init_from(directory: str | Path, out_dir: str | Path) -> None:
    """Refuse ``training.init_from`` naming the training run's own output directory.

    Raises:
        InitAdapterError: ``directory`` is ``out_dir``.
    """
    if Path(directory).resolve() == Path(out_dir).resolve():
        raise InitAdapterError(f"training.init_from (--init-from) {directory} is the output "
                               "directory itself; give the stage-1 adapter directory and a "
                               "new --out")


def load_initial_adapter(lm: HetGraphLM, directory: str | Path, device: torch.device | str,
                         out_dir: str | Path) -> None:
    r"""Start training from the trained adapter in ``directory`` (two-stage training: stage 2
    starts from stage 1's adapter with another graph and ``k``; an adapter's parameters depend
    on neither).

    The adapter must have been trained on the same base model and fit ``lm``'s adapters key
    for key and shape (same fusion sites, widths, layers and heads); its weights are checked
    in full like any saved adapter.

    Raises:
        InitAdapterError: ``directory`` is ``out_dir``, holds no readable adapter, was trained
            on another base model, or does not fit ``lm``.
    """
    check_init_from(directory, out_dir)
    where = f"training.init_from (--init-from) {directory}"
    try:
        saved = read_adapter_config(directory)
        if saved.get("model") != lm.adapter_identity()["model"]:
            raise InitAdapterError(f"{where} was trained on another base model; start from an "
                                   "adapter of this model (or leave --init-from out)")
        lm.load_adapter_state_dict(read_adapter_weights(directory, device, saved))
    except (AdapterFileError, AdapterMismatchError) as error:
        raise InitAdapterError(f"{where}: {error}; the stage-2 adapter must keep stage 1's "
                               "fusion sites, widths, layers and heads (only the graph and k "
                               "may change)") from None
    logger.info("training starts from the adapter in %s", directory)


def restore_checkpoint(lm: HetGraphLM, optimizer: torch.optim.Optimizer, out_dir: str | Path,
                       trainer_state: dict[str, Any], device: torch.device | str) -> None:
    r"""Load the adapters and the optimiser state of ``out_dir/checkpoint`` into ``lm`` and
    ``optimizer``; ``trainer_state`` is what :func:`read_checkpoint` returned."""
    directory = Path(out_dir) / CHECKPOINT_DIR
    load_adapter_weights(lm, directory, device)
    load_optimizer_state(optimizer, directory / OPTIMIZER_WEIGHTS, trainer_state["optimizer"])
