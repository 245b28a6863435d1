"""Saving and loading the trained part of a :class:`~hetgraph.HetGraphLM`: adapters and gates.

An adapter directory holds ``adapter.safetensors`` (adapter and gate tensors, keyed as in
``HetGraphLM.state_dict()``) and ``adapter_config.json`` (the fusion config, each site's
adapter config, and the identity of the base model and datastore it was trained with).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file
from torch import Tensor

from hetgraph.errors import HetgraphError
from hetgraph.fusion.config import FusionConfig
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    atomic_save_safetensors,
    atomic_write_json,
    read_json,
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
ADAPTER_PREFIXES = ("adapters.", "gates.")


class AdapterMismatchError(HetgraphError):
    """An adapter was loaded against a different base model or datastore."""


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
        expected = {key for key in self.state_dict() if key.startswith(ADAPTER_PREFIXES)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise AdapterMismatchError(f"adapter weights do not fit this model: "
                                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
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
        """Write ``adapter.safetensors`` (adapters + gates) and ``adapter_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(directory / ADAPTER_WEIGHTS, self.adapter_state_dict())
        config = {
            "format_version": FORMAT_VERSION,
            "fusion": self.config.to_dict(),
            "adapters": {key: adapter.config.to_dict() for key, adapter in self.adapters.items()},
            **self.adapter_identity(),
        }
        atomic_write_json(directory / ADAPTER_CONFIG, config)

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
            FileNotFoundError: ``directory`` holds no adapter.
            AdapterMismatchError: the adapter was trained with another base model or datastore.
        """
        directory = Path(directory)
        config_path = directory / ADAPTER_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: is {directory} an adapter directory "
                                    "written by HetGraphLM.save_pretrained / hetgraph train?")
        saved = read_json(config_path)
        lm = cls(model, datastore, index, FusionConfig.from_dict(saved["fusion"]),
                 tokenizer=tokenizer)
        _check_identity(lm, saved, directory, tokenizer)
        device = next(lm.adapters.parameters()).device
        lm.load_adapter_state_dict(load_file(str(directory / ADAPTER_WEIGHTS), device=str(device)))
        return lm


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
