"""Saving and loading the trained part of a :class:`~hetgraph.HetGraphLM`: adapters and gates.

An adapter directory holds ``adapter.safetensors`` (adapter and gate tensors, keyed as in
``HetGraphLM.state_dict()``) and ``adapter_config.json`` (the fusion config, each site's
adapter config, and the identity of the base model and datastore it was trained with).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from hetgraph.errors import HetgraphError
from hetgraph.fusion.config import FusionConfig
from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    read_json_record,
)
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INTEGRITY_KEY,
    atomic_save_safetensors,
    fsync_directory,
    storage_errors,
)
from hetgraph.models.fingerprint import (
    config_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from torch import nn

    from hetgraph.datastore import Datastore
    from hetgraph.fusion.lm import HetGraphLM
    from hetgraph.index import DatastoreIndex

FORMAT_VERSION = 1
#: Prefixes of the trained parameters in ``HetGraphLM.state_dict()``.
ADAPTER_PREFIXES = ("adapters.", "gates.", "retrieval_gates.")


class AdapterMismatchError(HetgraphError):
    """An adapter was loaded against a different base model or datastore."""


class AdapterFileError(HetgraphError):
    """An adapter directory's files are missing or damaged."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """A directory holds no adapter (also a :class:`FileNotFoundError`)."""


def retrain_hint(directory: str | Path) -> str:
    """How to replace a damaged adapter in ``directory``."""
    return (f"train it again (hetgraph train … --out {directory}; a run that left a "
            "checkpoint resumes from it)")


class AdapterPersistenceMixin:
    """``adapter_state_dict`` / ``save_pretrained`` / ``from_pretrained`` for
    :class:`~hetgraph.HetGraphLM` (a small public surface around a frozen model, in the
    manner of transformers' ``PeftAdapterMixin``)."""

    def adapter_state_dict(self: HetGraphLM) -> dict[str, Tensor]:
        """The trained tensors only (adapters and gates), detached, on the CPU."""
        return {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()
                if key.startswith(ADAPTER_PREFIXES)}

    def load_adapter_state_dict(self: HetGraphLM, state: dict[str, Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (every adapter key must be there).

        Raises:
            AdapterMismatchError: keys are missing or unexpected.
        """
        own = self.state_dict()
        expected = {key for key in own if key.startswith(ADAPTER_PREFIXES)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        resized = sorted(k for k in expected & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or resized:
            raise AdapterMismatchError(f"adapter weights do not fit this model: missing "
                                       f"{missing[:5]}, unexpected {unexpected[:5]}, other "
                                       f"shapes {resized[:5]}")
        self.load_state_dict(state, strict=False)

    def adapter_identity(self: HetGraphLM) -> dict[str, Any]:
        """What an adapter must be loaded against: the base model and the datastore."""
        meta = self.datastore.metadata
        return {
            "model": dict(meta.model),
            "datastore": {"fingerprint": meta.fingerprint, "num_entries": len(self.datastore),
                          "dim": self.datastore.dim, "key_layer": self.datastore.key_layer},
        }

    def save_pretrained(self: HetGraphLM, directory: str | Path) -> None:
        """Write ``adapter.safetensors`` (adapters + gates) and ``adapter_config.json`` (with
        the weights file's size and checksums, and its own checksum).

        The old ``adapter_config.json`` is removed first, so an interrupted save never leaves
        a pair of files that looks complete.

        Raises:
            hetgraph.io.StorageError: the disk is full.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "fusion": self.config.to_dict(),
            "adapters": {key: adapter.config.to_dict() for key, adapter in self.adapters.items()},
            **self.adapter_identity(),
        }
        with storage_errors(directory, "save the adapter again"):
            with contextlib.suppress(FileNotFoundError):
                (directory / ADAPTER_CONFIG).unlink()
            fsync_directory(directory)
            atomic_save_safetensors(directory / ADAPTER_WEIGHTS, self.adapter_state_dict())
            config[INTEGRITY_KEY] = {
                "files": {ADAPTER_WEIGHTS: file_record(directory / ADAPTER_WEIGHTS)}}
            atomic_write_json_record(directory / ADAPTER_CONFIG, config)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        model: nn.Module,
        datastore: Datastore,
        index: DatastoreIndex,
        tokenizer: Any | None = None,
    ) -> HetGraphLM:
        """Load adapters saved by :meth:`save_pretrained` onto ``model`` and ``datastore``.

        Raises:
            AdapterNotFoundError: ``directory`` holds no adapter (a ``FileNotFoundError``).
            AdapterFileError: ``adapter_config.json`` or ``adapter.safetensors`` is damaged
                (both are checked in full: adapters are small).
            AdapterMismatchError: the adapter was trained with another base model or datastore.
        """
        directory = Path(directory)
        saved = read_adapter_config(directory)
        try:
            fusion = FusionConfig.from_dict(saved["fusion"])
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise AdapterFileError(f"{directory / ADAPTER_CONFIG} is damaged (its fusion section: "
                                   f"{error}); {retrain_hint(directory)}") from None
        lm = cls(model, datastore, index, fusion, tokenizer=tokenizer)
        _check_identity(lm, saved, directory, tokenizer)
        device = next(lm.adapters.parameters()).device
        lm.load_adapter_state_dict(read_adapter_weights(directory, device, saved))
        return lm


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory``, its checksum checked (when it has one).

    Raises:
        AdapterNotFoundError: there is none.
        AdapterFileError: it is damaged.
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterNotFoundError(
            f"{config_path} not found: is {directory} an adapter directory written by "
            "HetGraphLM.save_pretrained / hetgraph train? (An interrupted save leaves none: "
            f"{retrain_hint(directory)})")
    saved = read_json_record(config_path, AdapterFileError, retrain_hint(directory))
    if not isinstance(saved.get("fusion"), dict) or not isinstance(saved.get("model"), dict) \
            or not isinstance(saved.get(INTEGRITY_KEY, {}), dict):
        raise AdapterFileError(f"{config_path} is damaged (invalid fusion, model or integrity "
                               f"section); {retrain_hint(directory)}")
    return saved


def read_adapter_weights(directory: str | Path, device: torch.device | str = "cpu",
                         saved: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The tensors of ``directory/adapter.safetensors`` on ``device``, checked in full against
    the record in ``adapter_config.json`` (``saved``, read if not given; adapters saved by
    older versions have no record) and for non-finite values.

    Raises:
        AdapterFileError: the file is missing, damaged, or holds NaN / inf.
    """
    directory = Path(directory)
    path, hint = directory / ADAPTER_WEIGHTS, retrain_hint(directory)
    saved = read_adapter_config(directory) if saved is None else saved
    files = saved.get(INTEGRITY_KEY, {}).get("files")
    record = files.get(ADAPTER_WEIGHTS) if isinstance(files, dict) else None
    problem = check_file_record(path, record, full=True) if isinstance(record, dict) else (
        None if path.is_file() else "is missing")
    if problem:
        raise AdapterFileError(f"{path} {problem}; {hint}")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise AdapterFileError(f"{path} is damaged (not a readable safetensors file); "
                               f"{hint}") from None
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise AdapterFileError(f"{path} holds non-finite values (NaN or inf) in {bad[:3]}; "
                               f"{hint}")
    return state


def adapter_problems(directory: str | Path) -> tuple[list[str], list[str]]:
    """Every check of the adapter in ``directory`` (both files in full): ``(files checked,
    problems)``; each problem names the file and the repair."""
    try:
        read_adapter_weights(directory)
    except AdapterFileError as error:
        return [ADAPTER_CONFIG, ADAPTER_WEIGHTS], [str(error)]
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS], []


def _check_identity(lm: HetGraphLM, saved: dict[str, Any], directory: Path, tokenizer: Any) -> None:
    current = lm.adapter_identity()
    current["model"] = {**current["model"], "config": config_fingerprint(lm.model),
                        "weights": weights_fingerprint(lm.model)}
    if tokenizer is not None:
        current["model"]["tokenizer"] = tokenizer_fingerprint(tokenizer)
    for what in ("model", "datastore"):
        if saved.get(what) != current[what]:
            raise AdapterMismatchError(
                f"adapter in {directory} was trained with a different {what}:\n"
                f"  saved:   {saved.get(what)}\n  current: {current[what]}\n"
                f"use the {what} it was trained with, or train a new adapter (hetgraph train …)")
