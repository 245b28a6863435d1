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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetgraph.configuration import JSONConfigMixin
from hetgraph.datastore.capture import normalize_layer
from hetgraph.datastore.integrity import (
    ARRAY_NAMES,
    array_path,
    open_array,
    recorded_file_problems,
)
from hetgraph.datastore.metadata import (
    FORMAT_VERSION,
    DatastoreError,
    DatastoreMetadata,
    rebuild_hint,
)
from hetgraph.io import DATASTORE_METADATA, DOC_NAMES, read_json
from hetgraph.locking import while_unlocked
from hetgraph.models.fingerprint import (
    config_fingerprint,
    tokenizer_matches,
    weights_fingerprint,
)

# DatastoreError, DatastoreMetadata, rebuild_hint and FORMAT_VERSION live in
# hetgraph.datastore.metadata (the file checks need them too); they are re-exported here.
__all__ = [
    "ANY",
    "ARRAY_NAMES",
    "FORMAT_VERSION",
    "Datastore",
    "DatastoreConfig",
    "DatastoreError",
    "DatastoreMetadata",
    "array_path",
    "rebuild_hint",
]


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
            raise ValueError(
                f"stride must be in [1, context_length={self.context_length}], got {self.stride}"
            )
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {self.max_tokens}")


#: Rows whose keys :meth:`Datastore.key_scale` reads.
KEY_SCALE_ROWS = 4096


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
        array, problem = open_array(array_path(self.path, name), shape, dtype)
        if problem:
            raise DatastoreError(f"datastore {self.path}: {problem}; {rebuild_hint(self.path)}")
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

        Opening is cheap: the metadata's own checksum, every array's ``.npy`` header, shape
        and dtype, and, for a completed datastore, every file's recorded size and sampled
        checksum (:func:`hetgraph.integrity.check_file_record`); :func:`hetgraph.verify.verify`
        checks whole-file checksums.

        Raises:
            DatastoreError: missing, incomplete or damaged datastore, or a mismatch.
            hetgraph.locking.LockError: missing, incomplete or damaged as far as can be seen
                while another process is writing it (a build running).
        """
        path = Path(path)
        meta_file = path / DATASTORE_METADATA
        # What a build running meanwhile has not finished looks missing or incomplete: then
        # the error says that a build is running instead.
        with while_unlocked(path, "datastore"):
            if not meta_file.exists():
                raise DatastoreError(
                    f"no datastore at {path} (no {DATASTORE_METADATA}); build "
                    "one (hetgraph datastore build … --out DIR, or "
                    "build_datastore)"
                )
            metadata = DatastoreMetadata.load(meta_file)
            if not metadata.complete and not allow_incomplete:
                raise DatastoreError(
                    f"the datastore at {path} is incomplete (its build was interrupted); resume "
                    "it by running the same build command again (same model, corpus and config)"
                )
            problems = recorded_file_problems(path, metadata, full=False)
            if problems:
                raise DatastoreError(f"datastore {path}: {problems[0]}; {rebuild_hint(path)}")
            store = cls(path, metadata)
        store.check(model=model, tokenizer=tokenizer, key_layer=key_layer)
        return store

    def check(
        self, model: nn.Module | None = None, tokenizer: Any | None = None, key_layer: Any = ANY
    ) -> None:
        """Raise :class:`DatastoreError` if the model, tokenizer or key layer do not match."""
        meta = self.metadata
        if key_layer is not ANY:
            expected = key_layer
            if model is not None and key_layer is not None:
                expected = normalize_layer(model, key_layer)
            if expected != meta.key_layer:
                raise DatastoreError(
                    f"datastore {self.path} holds keys of layer {_layer_str(meta.key_layer)}, but "
                    f"layer {_layer_str(expected)} was requested; build a datastore for that layer"
                )
        if model is not None:
            width = key_dim_of(model, meta.key_layer)
            if width is not None and width != meta.dim:
                raise DatastoreError(
                    f"datastore {self.path} has {meta.dim}-dimensional keys but the model's hidden "
                    f"size is {width}: it was built with a different model "
                    f"({meta.model.get('model_type')}); rebuild it for this model"
                )
            fp = config_fingerprint(model)
            if fp != meta.model.get("config"):
                raise DatastoreError(
                    f"datastore {self.path} was built with a different model configuration "
                    f"(fingerprint {meta.model.get('config')}, this model {fp}, model_type "
                    f"{getattr(model.config, 'model_type', '?')}); rebuild it for this model"
                )
            weights = meta.model.get("weights")
            if weights is not None and weights != weights_fingerprint(model):
                raise DatastoreError(
                    f"datastore {self.path} was built with other weights of this architecture "
                    "(another checkpoint or fine-tune); its keys would not match this model's "
                    "queries. Load the model it was built with, or rebuild the datastore"
                )
        if tokenizer is not None:
            mismatch = tokenizer_matches(meta.model, tokenizer)
            if mismatch is not None:
                raise DatastoreError(
                    f"datastore {self.path} was built with {mismatch}; token ids would not "
                    "match. Load the tokenizer it was built with, or rebuild the datastore"
                )

    # -- access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.metadata.num_entries

    def __repr__(self) -> str:
        m = self.metadata
        return (
            f"Datastore(path={str(self.path)!r}, entries={m.num_entries}, dim={m.dim}, "
            f"key_layer={_layer_str(m.key_layer)}, feature_layers={list(m.feature_layers)}, "
            f"complete={m.complete})"
        )

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
            try:
                names = read_json(path) if path.is_file() else None
            except (ValueError, OSError):
                names = False
            if names is not None and not (
                isinstance(names, list) and all(isinstance(n, str) for n in names)
            ):
                raise DatastoreError(
                    f"{path} is damaged (not a JSON list of document names); "
                    f"{rebuild_hint(self.path)}"
                )
            self._doc_names = names
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
                raise DatastoreError(
                    f"datastore {self.path} stores no features of decoder layer "
                    f"{layer} (stored: {sorted(self.feature_layers)}); rebuild it "
                    "with DatastoreConfig(feature_layers=...)"
                )
            self._features[layer] = self._load(
                f"features_{layer}", (len(self), dims[str(layer)]), np.float16
            )
        return self._features[layer]

    def key_scale(self, rows: int = KEY_SCALE_ROWS) -> float:
        """The mean per-row standard deviation of the keys, over ``rows`` rows evenly spaced
        through the store (deterministic): what ``AdapterConfig.norm_init="keys"`` stands
        for (the scale of the states the keys are, e.g. the LM head's input)."""
        picked = np.linspace(0, len(self) - 1, num=min(rows, len(self))).round()
        keys = np.asarray(self.keys[np.unique(picked.astype(np.int64))], dtype=np.float32)
        return float(keys.std(axis=1).mean())

    def as_tensor(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """An in-memory torch copy of one array (``"tokens"``, ``"doc_ids"``, ``"keys"``, …)."""
        array = getattr(self, name) if name in ARRAY_NAMES else None
        if array is None:
            raise KeyError(f"unknown datastore array {name!r}; choose one of {ARRAY_NAMES}")
        tensor = torch.from_numpy(np.array(array))
        return tensor.to(device) if device else tensor


def _layer_str(layer: int | None) -> str:
    return "None (LM-head input)" if layer is None else str(layer)
