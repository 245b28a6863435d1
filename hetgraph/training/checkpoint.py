r"""Resumable training checkpoints: adapter weights, optimiser state and trainer state.

A checkpoint is the directory ``<out_dir>/checkpoint`` holding what
``HetGraphLM.save_pretrained`` writes, ``optimizer.safetensors`` (the optimiser's
tensors) and ``trainer_state.json`` (step, settings, results so far, and the optimiser's
parameter groups and scalar state). It is written into a temporary directory and swapped
in whole (:func:`hetgraph.io.atomic_directory`), so a run killed while saving still
finds the previous checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from hetgraph.io import (
    ADAPTER_WEIGHTS,
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
    or ``None`` if there is no checkpoint."""
    path = Path(out_dir) / CHECKPOINT_DIR / TRAINER_STATE
    return read_json(path) if path.is_file() else None


def load_adapter_weights(lm: HetGraphLM, directory: str | Path,
                         device: torch.device | str) -> None:
    r"""Load the adapter weights ``directory/adapter.safetensors`` (as written by
    ``HetGraphLM.save_pretrained``) into ``lm``, onto ``device``."""
    state = load_file(str(Path(directory) / ADAPTER_WEIGHTS), device=str(device))
    lm.load_adapter_state_dict(state)


def restore_checkpoint(lm: HetGraphLM, optimizer: torch.optim.Optimizer, out_dir: str | Path,
                       trainer_state: dict[str, Any], device: torch.device | str) -> None:
    r"""Load the adapters and the optimiser state of ``out_dir/checkpoint`` into ``lm`` and
    ``optimizer``; ``trainer_state`` is what :func:`read_checkpoint` returned."""
    directory = Path(out_dir) / CHECKPOINT_DIR
    load_adapter_weights(lm, directory, device)
    load_optimizer_state(optimizer, directory / OPTIMIZER_WEIGHTS, trainer_state["optimizer"])
