"""The datastore: a key hidden state and the next token for every corpus position."""

from hetgraph.datastore.build import build_datastore, window_batches
from hetgraph.datastore.capture import (
    HiddenStateCapture,
    LayerSpec,
    StopForward,
    layer_name,
    split_arrays,
)
from hetgraph.datastore.metadata import DatastoreError, DatastoreMetadata
from hetgraph.datastore.store import ANY, Datastore, DatastoreConfig

__all__ = [
    "ANY",
    "Datastore",
    "DatastoreConfig",
    "DatastoreError",
    "DatastoreMetadata",
    "HiddenStateCapture",
    "LayerSpec",
    "StopForward",
    "build_datastore",
    "layer_name",
    "split_arrays",
    "window_batches",
]
