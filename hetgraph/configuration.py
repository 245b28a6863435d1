"""JSON serialisation shared by every configuration dataclass of hetgraph.

Each stage's config (``CorpusConfig``, ``DatastoreConfig``, ``IndexConfig``,
``GraphConfig``, ``AdapterConfig``, ``FusionConfig``, ``TrainingConfig``, ``EvalConfig``,
``RunConfig``) is a dataclass with this mixin, so all of them round-trip through JSON the
same way and reject unknown fields (a typo in a config file fails at once, by name).
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="JSONConfigMixin")


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


class JSONConfigMixin:
    """``to_dict`` / ``from_dict`` / JSON text / JSON files for a dataclass config."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (tuples become lists)."""
        return _json_ready(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: on fields the config does not have (named, with the known ones).
        """
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """The config as JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls: type[ConfigT], text: str) -> ConfigT:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    def to_json_file(self, path: str | Path) -> None:
        """Write the config as a JSON file."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json_file(cls: type[ConfigT], path: str | Path) -> ConfigT:
        """Read a JSON file written by :meth:`to_json_file` (or by hand).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: it is not valid JSON, or has unknown fields.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error})") from None
        return cls.from_dict(data)
