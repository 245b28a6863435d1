"""What ``metadata.json`` records about a datastore, and the error a datastore raises.

:class:`DatastoreMetadata` is read by the datastore itself (:mod:`hetgraph.datastore.store`),
by its file checks (:mod:`hetgraph.datastore.integrity`) and by the build; it depends on
neither, so those modules import it without importing each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hetgraph.errors import HetgraphError
from hetgraph.integrity import atomic_write_json_record, read_json_record

FORMAT_VERSION = 1
__all__ = ["FORMAT_VERSION", "DatastoreError", "DatastoreMetadata", "rebuild_hint"]


class DatastoreError(HetgraphError):
    """A datastore is missing, incomplete, damaged, or does not match the model / tokenizer /
    layer."""


def rebuild_hint(path: str | Path) -> str:
    """How to rebuild the datastore at ``path``, for CLI and Python users alike."""
    return (
        f"rebuild it (hetgraph datastore build … --out {path} --overwrite, "
        "or build_datastore(..., overwrite=True))"
    )


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
    #: Size and checksums of every file, recorded when the build completes
    #: (:func:`hetgraph.integrity.file_record`); ``None`` before, and in older datastores.
    integrity: dict[str, Any] | None = None

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.feature_dims)

    def identity(self) -> dict[str, Any]:
        """The fields that must match for a build to be resumed (everything but progress and
        the integrity record)."""
        d = asdict(self)
        d.pop("complete")
        d.pop("integrity")
        return d

    def save(self, path: str | Path) -> None:
        """Write the metadata to the JSON file ``path`` (atomically, keys sorted, with its own
        checksum so that a changed byte is detected on load)."""
        data = asdict(self)
        if data["integrity"] is None:
            data.pop("integrity")
        atomic_write_json_record(path, data, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> DatastoreMetadata:
        """Read a JSON file written by :meth:`save`; keys this version does not know (such
        as ``extra``, written by older versions) are ignored.

        Raises:
            DatastoreError: the file is missing, damaged (not JSON, a failed checksum, missing
                or mistyped fields), or records another datastore format version.
        """
        hint = rebuild_hint(Path(path).parent)
        data = read_json_record(path, DatastoreError, hint)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DatastoreError(
                f"{path}: datastore format version {version} is not supported "
                f"(this hetgraph reads version {FORMAT_VERSION}); {hint}"
            )
        known = {f.name for f in fields(cls)}
        try:
            metadata = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as error:  # a required field is missing
            raise DatastoreError(f"{path} is damaged ({error}); {hint}") from None
        problem = metadata.type_problem()
        if problem:
            raise DatastoreError(f"{path} is damaged ({problem}); {hint}")
        return metadata

    def type_problem(self) -> str | None:
        """What is mistyped in these fields (as read from JSON), or ``None``."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [
            ("num_entries", is_int(self.num_entries) and self.num_entries >= 1),
            ("dim", is_int(self.dim) and self.dim >= 1),
            ("key_layer", self.key_layer is None or is_int(self.key_layer)),
            (
                "feature_dims",
                isinstance(self.feature_dims, dict)
                and all(
                    isinstance(k, str) and k.lstrip("-").isdigit() and is_int(v) and v >= 1
                    for k, v in self.feature_dims.items()
                ),
            ),
            ("model", isinstance(self.model, dict)),
            ("fingerprint", isinstance(self.fingerprint, str)),
            ("complete", isinstance(self.complete, bool)),
            ("integrity", self.integrity is None or isinstance(self.integrity, dict)),
        ]
        bad = [name for name, ok in checks if not ok]
        return f"invalid {', '.join(bad)}" if bad else None
