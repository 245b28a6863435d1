r"""Saving and loading the LoRA control (:mod:`hetgraph.training.lora`).

A control directory holds PEFT's ``save_pretrained`` files (``adapter_config.json``,
``adapter_model.safetensors``; PeftModel.from_pretrained loads it as it is) and
:data:`LORA_CONTROL_MARKER`, hetgraph's record of kind ``"lora_control"`` with its own
checksum: the base model's fingerprint, rank, targets, trained parameters, the tokens
trained on, and the PEFT files' sizes and checksums.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from hetgraph.errors import HetgraphError
from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    read_json_record,
)
from hetgraph.io import fsync_directory
from hetgraph.models.fingerprint import (
    config_fingerprint,
    model_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from hetgraph.storage import storage_errors

#: hetgraph's record in a LoRA control directory (JSON with its own checksum).
LORA_CONTROL_MARKER = "lora_control.json"
LORA_CONTROL_KIND = "lora_control"
FORMAT_VERSION = 1
#: What PEFT's ``save_pretrained`` writes that the control keeps (not its README).
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
INSTALL_HINT = "pip install 'hetgraph[lora]'"


class LoraControlError(HetgraphError):
    """The LoRA control cannot be trained or loaded as asked (the message says why and what
    to change)."""


def import_peft() -> Any:
    """The ``peft`` module, or one line naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise LoraControlError(
            f"the LoRA control needs PEFT, which is not installed: {INSTALL_HINT}"
        ) from None
    return peft


def base_identity(model: nn.Module, tokenizer: Any | None = None) -> dict[str, str]:
    """The base model's :func:`~hetgraph.models.fingerprint.model_fingerprint` (without the
    tokenizer's entries when ``tokenizer`` is ``None``). Taken before a LoRA is injected:
    its tensors would change the weights fingerprint."""
    if tokenizer is not None:
        return model_fingerprint(model, tokenizer)
    return {
        "model_type": str(getattr(model.config, "model_type", type(model).__name__)),
        "config": config_fingerprint(model),
        "weights": weights_fingerprint(model),
    }


def retrain_hint(directory: str | Path) -> str:
    """How to replace a control that cannot be used."""
    return f"train the control again (hetgraph train … --control lora --out {directory})"


def save_lora_control(peft_model: Any, directory: str | Path, record: dict[str, Any]) -> None:
    """Write PEFT's files and the marker (``record`` plus the files' checksums) to
    ``directory``: each file complete under a temporary name first, then the old marker
    removed, the files renamed into place and the marker written last, so that a crash
    leaves either a complete control or no marker (never one describing other files).

    Raises:
        hetgraph.storage.StorageError: the disk is full (the previous control is kept).
    """
    directory = Path(directory)
    with storage_errors(directory, "save the control again (the previous one is kept)"):
        # Named like hetgraph.io's temporaries, so remove_stale_temporaries clears one
        # left by a killed writer.
        staging = directory / f".lora-save.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        staging.mkdir(parents=True)
        try:
            with warnings.catch_warnings():  # PEFT's notes on unknown base configs
                warnings.simplefilter("ignore")
                peft_model.save_pretrained(str(staging), safe_serialization=True)
            files = {name: file_record(staging / name) for name in (PEFT_WEIGHTS, PEFT_CONFIG)}
            for name in files:
                with open(staging / name, "rb") as f:
                    os.fsync(f.fileno())
            with contextlib.suppress(FileNotFoundError):
                (directory / LORA_CONTROL_MARKER).unlink()
            for name in files:
                os.replace(staging / name, directory / name)
            fsync_directory(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        atomic_write_json_record(
            directory / LORA_CONTROL_MARKER, {**record, "integrity": {"files": files}}
        )


def is_lora_control(directory: str | Path) -> bool:
    """Whether ``directory`` holds a LoRA control (its marker file; a damaged marker counts,
    so that loading names the damage instead of another loader failing)."""
    return (Path(directory) / LORA_CONTROL_MARKER).is_file()


def read_lora_control(directory: str | Path) -> dict[str, Any]:
    """The marker of the control in ``directory``, checked: checksum, kind, format version,
    and the sizes and sampled checksums of PEFT's files.

    Raises:
        LoraControlError: naming the damaged or missing file and the fix.
    """
    directory = Path(directory)
    path = directory / LORA_CONTROL_MARKER
    record = read_json_record(path, LoraControlError, retrain_hint(directory))
    if record.get("kind") != LORA_CONTROL_KIND or not isinstance(record.get("model"), dict):
        raise LoraControlError(
            f"{path} is not a LoRA control record (kind "
            f"{record.get('kind')!r}); {retrain_hint(directory)}"
        )
    version = record.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise LoraControlError(
            f"{path}: unsupported LoRA control format {version!r} (this "
            f"hetgraph reads format {FORMAT_VERSION}); "
            f"{retrain_hint(directory)}"
        )
    files = record.get("integrity", {}).get("files", {})
    for name in (PEFT_WEIGHTS, PEFT_CONFIG):
        problem = check_file_record(directory / name, files.get(name, {}), full=False)
        if problem is not None:
            raise LoraControlError(f"{directory / name} {problem}; {retrain_hint(directory)}")
    return record


def check_base_model(
    record: dict[str, Any], directory: str | Path, model: nn.Module, tokenizer: Any | None = None
) -> None:
    """Refuse a ``model`` (and ``tokenizer``, when given) other than the control's base."""
    saved = record["model"]
    current = base_identity(model, None)
    if tokenizer is not None:
        current["tokenizer"] = tokenizer_fingerprint(tokenizer)
    differing = [key for key, value in current.items() if saved.get(key) != value]
    if differing:
        raise LoraControlError(
            f"LoRA control {directory} was trained on another base model (the "
            f"{', '.join(differing)} fingerprint differs; trained on "
            f"{record.get('base_model') or 'a model built in memory'}): pass that model "
            f"(--model), or {retrain_hint(directory)}"
        )


def load_lora_control(directory: str | Path, model: nn.Module, tokenizer: Any | None = None) -> Any:
    """The PEFT model of the control in ``directory`` on the base ``model``, in eval mode.

    The LoRA is injected into ``model`` in place: for base-model outputs use another
    instance, or ``with peft_model.disable_adapter():``.

    Raises:
        LoraControlError: PEFT is missing, a file is damaged, ``model`` already carries an
            adapter, or ``model`` (and ``tokenizer``, when given) is not the base model the
            control was trained on.
    """
    peft = import_peft()
    directory = Path(directory)
    record = read_lora_control(directory)
    if hasattr(model, "peft_config"):
        raise LoraControlError(
            "the model already carries a PEFT adapter; pass a freshly loaded base model"
        )
    check_base_model(record, directory, model, tokenizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoraControlError(
            f"{directory} cannot be loaded by PEFT ({message}); {retrain_hint(directory)}"
        ) from None
    return lora.eval()
