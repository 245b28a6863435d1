r"""Resumable training checkpoints: adapter weights, optimiser state and trainer state.

A checkpoint is the directory ``<out_dir>/checkpoint`` holding what
``HetGraphLM.save_pretrained`` writes, ``optimizer.safetensors`` (the optimiser's
tensors) and ``trainer_state.json`` (step, settings, results so far, and the optimiser's
parameter groups and scalar state). ``trainer_state.json`` carries its own checksum and the
size and checksums of the checkpoint's other files (:func:`hetgraph.integrity.file_record`),
so a changed byte anywhere is refused on resume (:func:`read_checkpoint`) and reported by
``hetgraph verify`` (:func:`checkpoint_problems`) instead of silently training on from a
different state. It is written into a temporary directory and swapped
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
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from hetgraph.errors import HetgraphError
from hetgraph.fusion.persistence import (
    AdapterFileError,
    AdapterMismatchError,
    adapter_identity,
    adapter_problems,
    read_adapter_config,
    read_adapter_weights,
    retrain_hint,
)
from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    read_json_record,
)
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_DIR,
    INTEGRITY_KEY,
    OPTIMIZER_WEIGHTS,
    TRAINER_STATE,
    atomic_directory,
    atomic_save_safetensors,
)

if TYPE_CHECKING:
    from hetgraph.fusion import HetGraphLM

logger = logging.getLogger(__name__)

#: The files of a checkpoint recorded (size and checksums) in its ``trainer_state.json``.
CHECKPOINT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_WEIGHTS)


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


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, path: Path, meta: dict[str, Any]
) -> None:
    r"""Restore ``optimizer`` from the tensors in ``path`` and the ``meta`` returned by
    :func:`save_optimizer_state`.

    Raises:
        CheckpointError: ``path`` does not read, or its state does not fit ``optimizer``.
    """
    try:
        tensors = load_file(str(path))
        state: dict[int, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(meta["scalars"].items()):
            param_id, name = key.split(".", 1)
            state.setdefault(int(param_id), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"{path} does not restore the optimiser ({error}); {restart_hint(path.parent)}"
        ) from None


def write_checkpoint(
    lm: HetGraphLM,
    optimizer: torch.optim.Optimizer,
    out_dir: str | Path,
    trainer_state: dict[str, Any],
) -> None:
    r"""Replace ``out_dir/checkpoint`` with ``lm``'s adapters, ``optimizer``'s state and
    ``trainer_state`` (JSON-serialisable; the optimiser's metadata is added under
    ``"optimizer"``), with the other files' integrity record and its own checksum."""
    with atomic_directory(Path(out_dir) / CHECKPOINT_DIR) as tmp:
        lm.save_pretrained(tmp)
        optimizer_meta = save_optimizer_state(optimizer, tmp / OPTIMIZER_WEIGHTS)
        # Through JSON first, so the checksum is of exactly what a reader gets back (tuples
        # become lists, keys strings).
        state = json.loads(json.dumps({**trainer_state, "optimizer": optimizer_meta}))
        state[INTEGRITY_KEY] = {
            "files": {name: file_record(tmp / name) for name in CHECKPOINT_FILES}
        }
        atomic_write_json_record(tmp / TRAINER_STATE, state)


def read_checkpoint(out_dir: str | Path) -> dict[str, Any] | None:
    r"""The trainer state of ``out_dir/checkpoint`` as written by :func:`write_checkpoint`,
    or ``None`` if there is no checkpoint.

    Every file of the checkpoint is checked in full against ``trainer_state.json``'s record
    (:func:`checkpoint_problems`; checkpoints are small) before anything is resumed.
    When ``checkpoint`` is missing but a checkpoint set aside by an interrupted swap
    (:func:`hetgraph.io.atomic_directory` names it ``.checkpoint.old-*``) is complete and
    intact, it is renamed back to ``checkpoint`` and read; set-aside copies next to a complete
    ``checkpoint`` are stale and removed. Call it only while holding ``out_dir``'s lock.

    Raises:
        CheckpointError: a file of ``out_dir/checkpoint`` is missing or damaged; the message
            names it and how to train on.
    """
    out_dir = Path(out_dir)
    target = out_dir / CHECKPOINT_DIR
    set_aside = sorted(out_dir.glob(f".{CHECKPOINT_DIR}.old-*"))
    if not (target / TRAINER_STATE).is_file():
        # A set-aside copy that is incomplete or damaged is never recovered.
        steps = {p: _readable_state(p) for p in set_aside}
        complete = [p for p, state in steps.items() if state is not None]
        if not complete:
            return None
        best = max(complete, key=lambda p: steps[p].get("step", -1))  # type: ignore[union-attr]
        if target.exists():
            shutil.rmtree(target)
        os.rename(best, target)
        logger.warning(
            "recovered the checkpoint %s from %s, left by a run interrupted while saving",
            target,
            best.name,
        )
    for stale in out_dir.glob(f".{CHECKPOINT_DIR}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _, problems = checkpoint_problems(target)
    if problems:
        raise CheckpointError(problems[0])
    return read_json_record(target / TRAINER_STATE, CheckpointError, restart_hint(target))


class CheckpointError(HetgraphError):
    """A training checkpoint that cannot be resumed (a file is missing, does not read, or
    does not match the checkpoint's integrity record)."""


def restart_hint(directory: str | Path) -> str:
    """How to train on when the checkpoint ``directory`` cannot be resumed."""
    directory = Path(directory)
    return (
        f"delete the checkpoint directory {directory} and run the same command to train "
        f"again from step 0 (the best adapter saved in {directory.parent}, if any, stays "
        "until a better one replaces it), or train into a new --out directory"
    )


def checkpoint_problems(directory: str | Path) -> tuple[list[str], list[str]]:
    r"""Every check of the checkpoint ``directory`` (all files in full): ``(files checked,
    problems)``; each problem names the file and the fix (:func:`restart_hint`).

    ``trainer_state.json`` must pass its own checksum, and every file it records
    (:data:`CHECKPOINT_FILES`) its size and full checksum; the adapter gets every check of a
    saved adapter (:func:`hetgraph.fusion.persistence.adapter_problems`) and the optimiser's
    tensors must read. Checkpoints written before the record existed get the file checks only.
    """
    directory = Path(directory)
    fix = restart_hint(directory)
    checked = [TRAINER_STATE, *CHECKPOINT_FILES]
    try:
        state = read_json_record(directory / TRAINER_STATE, CheckpointError, fix)
    except CheckpointError as error:
        return checked, [str(error)]
    problems = []
    files = state.get(INTEGRITY_KEY, {"files": {}})
    files = files.get("files") if isinstance(files, dict) else None
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        return checked, [
            f"{directory / TRAINER_STATE} is damaged (its integrity record is malformed); {fix}"
        ]
    for name, record in files.items():
        problem = check_file_record(directory / name, record, full=True)
        if problem:
            problems.append(f"{directory / name} {problem}; {fix}")
    if problems:
        return checked, problems
    # The adapter's own checks (its config's checksum, finite values, …), with this fix.
    hint = f"; {retrain_hint(directory)}"
    problems += [
        p.removesuffix(hint) + f"; {fix}" if p.endswith(hint) else p
        for p in adapter_problems(directory)[1]
    ]
    optimizer = directory / OPTIMIZER_WEIGHTS
    try:
        load_file(str(optimizer))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        problems.append(
            f"{optimizer} is missing or damaged (not a readable safetensors file); {fix}"
        )
    return checked, problems


def _readable_state(directory: Path) -> dict[str, Any] | None:
    """The trainer state of the checkpoint ``directory`` if the checkpoint is complete and
    intact, else :obj:`None`."""
    if not (directory / TRAINER_STATE).is_file() or checkpoint_problems(directory)[1]:
        return None
    try:
        return read_json_record(directory / TRAINER_STATE, CheckpointError)
    except CheckpointError:
        return None


def load_adapter_weights(lm: HetGraphLM, directory: str | Path, device: torch.device | str) -> None:
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
        raise InitAdapterError(
            f"training.init_from (--init-from) {directory} is the output "
            "directory itself; give the stage-1 adapter directory and a "
            "new --out"
        )


def load_initial_adapter(
    lm: HetGraphLM, directory: str | Path, device: torch.device | str, out_dir: str | Path
) -> None:
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
        if saved.get("model") != adapter_identity(lm.engine)["model"]:
            raise InitAdapterError(
                f"{where} was trained on another base model; start from an "
                "adapter of this model (or leave --init-from out)"
            )
        lm.load_adapter_state_dict(read_adapter_weights(directory, device, saved))
    except (AdapterFileError, AdapterMismatchError) as error:
        raise InitAdapterError(
            f"{where}: {error}; the stage-2 adapter must keep stage 1's "
            "fusion sites, widths, layers and heads (only the graph and k "
            "may change)"
        ) from None
    logger.info("training starts from the adapter in %s", directory)


def restore_checkpoint(
    lm: HetGraphLM,
    optimizer: torch.optim.Optimizer,
    out_dir: str | Path,
    trainer_state: dict[str, Any],
    device: torch.device | str,
) -> None:
    r"""Load the adapters and the optimiser state of ``out_dir/checkpoint`` into ``lm`` and
    ``optimizer``; ``trainer_state`` is what :func:`read_checkpoint` returned."""
    directory = Path(out_dir) / CHECKPOINT_DIR
    load_adapter_weights(lm, directory, device)
    load_optimizer_state(optimizer, directory / OPTIMIZER_WEIGHTS, trainer_state["optimizer"])
