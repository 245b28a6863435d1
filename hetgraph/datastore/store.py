"""On-disk datastore: keys, next tokens and token metadata as read-only numpy memmaps.

Layout of a datastore directory::

    metadata.json          DatastoreMetadata (JSON)
    progress.json          build progress (batches done), for resuming
    keys.npy               float16 [N, d]   hidden state of position i at the key layer
    next_tokens.npy        int32  [N]       tokens[i + 1], the token that key i predicts
    tokens.npy             int32  [N]       token at position i
    doc_ids.npy            int32  [N]       document of position i
    positions.npy          int32  [N]       offset of position i inside its document
    features_<layer>.npy   float16 [N, d_l] output of decoder layer <layer> (optional)

Entry ``i`` is position ``i`` of the split the datastore was built from; ``N`` is the
split length minus one (the last token predicts nothing).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetgraph.configuration import JSONConfigMixin
from hetgraph.io import DATASTORE_METADATA, DOC_NAMES, atomic_write_json, read_json
from hetgraph.models.fingerprint import (
    config_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)

FORMAT_VERSION = 1
ARRAY_NAMES = ("keys", "next_tokens", "tokens", "doc_ids", "positions")


def array_path(directory: str | Path, name: str) -> Path:
    """The ``.npy`` file of the datastore array ``name`` (``"keys"``, ``"features_3"``, …)."""
    return Path(directory) / f"{name}.npy"


class DatastoreError(ValueError):
    """A datastore is missing, incomplete, or does not match the model / tokenizer / layer."""


class _Any:
    def __repr__(self) -> str:
        return "ANY"


#: Sentinel for "do not check" (``None`` already means "the LM-head input").
ANY: Any = _Any()


@dataclass
class DatastoreConfig(JSONConfigMixin):
    """How a datastore is built.

    Attributes:
        context_length: tokens fed to the LM per window.
        stride: new positions scored per window; every position is scored exactly once,
            with at least ``context_length - stride`` tokens of left context where available.
        batch_size: windows per forward pass.
        key_layer: ``None`` = input of the LM head (final normed hidden state);
            ``i`` = output of decoder layer ``i`` (negative indices count from the end).
        feature_layers: decoder layers whose outputs are also stored (fp16) per token,
            as node features for the graph network.
        max_tokens: use only the first ``max_tokens`` tokens of the split.
    """

    context_length: int = 512
    stride: int = 256
    batch_size: int = 8
    key_layer: int | None = None
    feature_layers: tuple[int, ...] = ()
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        self.feature_layers = tuple(int(l) for l in self.feature_layers)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.stride <= self.context_length:
            raise ValueError(f"stride must be in [1, context_length={self.context_length}], "
                             f"got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")



@dataclass
class DatastoreMetadata:
    """What ``metadata.json`` records about a datastore."""

    num_entries: int
    dim: int
    key_layer: int | None
    feature_dims: dict[str, int]
    context_length: int
    stride: int
    batch_size: int
    max_tokens: int | None
    model: dict[str, str]
    model_dtype: str
    corpus_fingerprint: str
    fingerprint: str
    key_dtype: str = "float16"
    num_batches: int = 0
    complete: bool = False
    format_version: int = FORMAT_VERSION

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.feature_dims)

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a build to be resumed (everything but progress)."""
        d = asdict(self)
        d.pop("complete")
        return d

    def save(self, path: str | Path) -> None:
        """Write the metadata to the JSON file ``path`` (atomically, keys sorted)."""
        atomic_write_json(path, asdict(self), sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> DatastoreMetadata:
        """Read a JSON file written by :meth:`save`; keys this version does not know (such
        as ``extra``, written by older versions) are ignored.

        Raises:
            DatastoreError: the file records another datastore format version.
        """
        data = read_json(path)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DatastoreError(f"{path}: datastore format version {version} is not supported "
                                 f"(this hetgraph reads version {FORMAT_VERSION}); rebuild it")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def key_dim_of(model: nn.Module, key_layer: int | None) -> int | None:
    """The width of the key hidden state, read from the model without running it."""
    if key_layer is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[1])
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None)


class Datastore:
    """A built datastore, opened read-only (numpy memmaps; nothing is loaded into RAM).

    Attributes:
        path: the datastore directory.
        metadata: :class:`DatastoreMetadata`.
        keys: float16 ``[N, d]``.
        next_tokens, tokens, doc_ids, positions: int32 ``[N]``.
    """

    def __init__(self, path: Path, metadata: DatastoreMetadata):
        self.path = Path(path)
        self.metadata = metadata
        n = metadata.num_entries
        self.keys = self._load("keys", (n, metadata.dim), np.float16)
        self.next_tokens = self._load("next_tokens", (n,), np.int32)
        self.tokens = self._load("tokens", (n,), np.int32)
        self.doc_ids = self._load("doc_ids", (n,), np.int32)
        self.positions = self._load("positions", (n,), np.int32)
        self._features: dict[int, np.ndarray] = {}

    def _load(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        file = array_path(self.path, name)
        if not file.exists():
            raise DatastoreError(f"datastore {self.path} lacks {file.name}; rebuild it")
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise DatastoreError(f"{file}: expected {np.dtype(dtype).name} {shape}, found "
                                 f"{array.dtype.name} {array.shape}; the datastore is corrupt, "
                                 "rebuild it")
        return array

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        tokenizer: Any | None = None,
        key_layer: Any = ANY,
        *,
        allow_incomplete: bool = False,
    ) -> Datastore:
        """Open a datastore read-only, checking it against a model / tokenizer / key layer.

        Args:
            path: datastore directory.
            model: if given, its key width and config fingerprint must match.
            tokenizer: if given, its fingerprint must match.
            key_layer: the key layer the caller expects (``None`` = LM-head input); not
                checked when left out.
            allow_incomplete: open a partially built datastore (unfilled keys are zero).

        Raises:
            DatastoreError: missing/incomplete datastore, or a mismatch.
        """
        path = Path(path)
        meta_file = path / DATASTORE_METADATA
        if not meta_file.exists():
            raise DatastoreError(f"no datastore at {path} (no {DATASTORE_METADATA}); build one "
                                 "with hetgraph.datastore.build_datastore")
        metadata = DatastoreMetadata.load(meta_file)
        if not metadata.complete and not allow_incomplete:
            raise DatastoreError(
                f"the datastore at {path} is incomplete (its build was interrupted); resume it by "
                "running the same build command again (same model, corpus and config)")
        store = cls(path, metadata)
        store.check(model=model, tokenizer=tokenizer, key_layer=key_layer)
        return store

    def check(self, model: nn.Module | None = None, tokenizer: Any | None = None,
              key_layer: Any = ANY) -> None:
        """Raise :class:`DatastoreError` if the model, tokenizer or key layer do not match."""
        meta = self.metadata
        if key_layer is not ANY:
            expected = key_layer
            if model is not None and key_layer is not None:
                from hetgraph.datastore.capture import normalize_layer
                expected = normalize_layer(model, key_layer)
            if expected != meta.key_layer:
                raise DatastoreError(
                    f"datastore {self.path} holds keys of layer {_layer_str(meta.key_layer)}, but "
                    f"layer {_layer_str(expected)} was requested; build a datastore for that layer")
        if model is not None:
            width = key_dim_of(model, meta.key_layer)
            if width is not None and width != meta.dim:
                raise DatastoreError(
                    f"datastore {self.path} has {meta.dim}-dimensional keys but the model's hidden "
                    f"size is {width}: it was built with a different model "
                    f"({meta.model.get('model_type')}); rebuild it for this model")
            fp = config_fingerprint(model)
            if fp != meta.model.get("config"):
                raise DatastoreError(
                    f"datastore {self.path} was built with a different model configuration "
                    f"(fingerprint {meta.model.get('config')}, this model {fp}, model_type "
                    f"{getattr(model.config, 'model_type', '?')}); rebuild it for this model")
            weights = meta.model.get("weights")
            if weights is not None and weights != weights_fingerprint(model):
                raise DatastoreError(
                    f"datastore {self.path} was built with other weights of this architecture "
                    "(another checkpoint or fine-tune); its keys would not match this model's "
                    "queries. Load the model it was built with, or rebuild the datastore")
        if tokenizer is not None:
            fp = tokenizer_fingerprint(tokenizer)
            if fp != meta.model.get("tokenizer"):
                raise DatastoreError(
                    f"datastore {self.path} was built with a different tokenizer (fingerprint "
                    f"{meta.model.get('tokenizer')}, this tokenizer {fp}); token ids would not "
                    "match")

    # -- access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.metadata.num_entries

    def __repr__(self) -> str:
        m = self.metadata
        return (f"Datastore(path={str(self.path)!r}, entries={m.num_entries}, dim={m.dim}, "
                f"key_layer={_layer_str(m.key_layer)}, feature_layers={list(m.feature_layers)}, "
                f"complete={m.complete})")

    @property
    def dim(self) -> int:
        return self.metadata.dim

    @property
    def key_layer(self) -> int | None:
        return self.metadata.key_layer

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.metadata.feature_layers

    @property
    def fingerprint(self) -> str:
        return self.metadata.fingerprint

    @property
    def complete(self) -> bool:
        return self.metadata.complete

    @property
    def doc_names(self) -> list[str] | None:
        """Name of every document (index = ``doc_ids`` value), or ``None`` if not recorded."""
        if not hasattr(self, "_doc_names"):
            path = self.path / DOC_NAMES
            self._doc_names = read_json(path) if path.is_file() else None
        return self._doc_names

    def document_name(self, row: int) -> str:
        """Name of the document of datastore row ``row`` (its id if names were not recorded)."""
        doc = int(self.doc_ids[row])
        names = self.doc_names
        return names[doc] if names is not None and 0 <= doc < len(names) else f"document {doc}"

    def features(self, layer: int) -> np.ndarray:
        """Stored fp16 outputs ``[N, d_layer]`` of decoder layer ``layer`` (memmap)."""
        layer = int(layer)
        if layer not in self._features:
            dims = self.metadata.feature_dims
            if str(layer) not in dims:
                raise DatastoreError(f"datastore {self.path} stores no features of decoder layer "
                                     f"{layer} (stored: {sorted(self.feature_layers)}); rebuild it "
                                     "with DatastoreConfig(feature_layers=...)")
            self._features[layer] = self._load(f"features_{layer}", (len(self), dims[str(layer)]),
                                               np.float16)
        return self._features[layer]

    def as_tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """An in-memory torch copy of one array (``"tokens"``, ``"doc_ids"``, ``"keys"``, …)."""
        array = getattr(self, name) if name in ARRAY_NAMES else None
        if array is None:
            raise KeyError(f"unknown datastore array {name!r}; choose one of {ARRAY_NAMES}")
        tensor = torch.from_numpy(np.array(array))
        return tensor.to(device) if device else tensor


def _layer_str(layer: int | None) -> str:
    return "None (LM-head input)" if layer is None else str(layer)
