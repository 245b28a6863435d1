r"""JSON serialisation and validation shared by every configuration dataclass of hetgraph.

Each stage's config (``CorpusConfig``, ``DatastoreConfig``, ``IndexConfig``,
``GraphConfig``, ``AdapterConfig``, ``FusionConfig``, ``TrainingConfig``, ``EvalConfig``,
``RunConfig``) is a dataclass with this mixin, so all of them round-trip through JSON the
same way. A config whose fields are themselves configs (``RunConfig.fusion``,
``FusionConfig.graph``…) is built from nested JSON objects by the field annotations, and
every key and value is checked at construction, at any depth: an unknown key or a value of
the wrong type raises :class:`ConfigError` naming it by its dotted path, e.g.

.. code-block:: text

    ConfigError: unknown key 'fusion.graph.lefft'; valid keys of GraphConfig: c2c,
    c2c_window, deduplicate, leakage_radius, left, n2c, right, share_windows
"""

from __future__ import annotations

import functools
import json
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, asdict, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin

from hetgraph.errors import HetgraphError
from hetgraph.io import atomic_write_text
from hetgraph.limits import MAX_JSON_DEPTH, JSONDepthError, ResourceLimitError, loads_json

if TYPE_CHECKING:  # Python 3.10 has no typing.Self
    from typing_extensions import Self

ConfigT = TypeVar("ConfigT", bound="JSONConfigMixin")
_NONE_TYPE = type(None)


class ConfigError(HetgraphError):
    r"""A configuration is invalid: an unknown or missing key, a value of the wrong type, or a
    value its config rejects. The message names the key by its dotted path from the config
    being built (``fusion.graph.left``; list items as ``fusion.fusion_layers[0]``).

    Args:
        message: the message.
        key: that dotted path, where the error is about one key (kept as :attr:`key`).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        #: True when the error is a value of the wrong type (not a wrong key or range).
        self.type_mismatch = False


class ConfigLimitError(ConfigError, ResourceLimitError):
    r"""A config value asking for more memory or more of a count than allowed
    (:mod:`hetgraph.limits`), named by its dotted path like any :class:`ConfigError`."""


def _same_kind(error: ConfigError, message: str, key: str | None) -> ConfigError:
    r"""A :class:`ConfigError` with ``message``, a :class:`ConfigLimitError` if ``error`` is."""
    kind = ConfigLimitError if isinstance(error, ResourceLimitError) else ConfigError
    return kind(message, key)


def _type_mismatch(path: str, expected: Any, value: Any) -> ConfigError:
    r"""The error for a value at ``path`` that itself has the wrong type."""
    error = ConfigError(f"{path}: expected {_describe(expected)}, got {reprlib.repr(value)}", path)
    error.type_mismatch = True
    return error


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _describe(tp: Any) -> str:
    r"""A readable name of an annotation: ``int | None``, ``'key' | 'stored'``, ``list of int``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"list of {_describe(args[0])}"
    if origin is tuple and args:
        return f"list of {len(args)} ({', '.join(_describe(arg) for arg in args)})"
    if origin in (list, tuple):
        return f"list of {_describe(args[0])}" if args else "list"
    if origin is dict:
        return "JSON object"
    if tp is _NONE_TYPE:
        return "None"
    return getattr(tp, "__name__", str(tp))


@cache
def config_fields(cls: type) -> dict[str, Any]:
    r"""The resolved type annotation of each ``__init__`` field of the dataclass ``cls``.

    Args:
        cls: a dataclass; its string annotations (``from __future__ import annotations``) are
            resolved in its module with :func:`typing.get_type_hints`.
    """
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and is_dataclass(tp)


@cache
def _nested_fields(cls: type) -> dict[str, Any]:
    r"""Fields of ``cls`` annotated with a dataclass, alone or in a union (``X | None``)."""
    return {
        name: tp
        for name, tp in config_fields(cls).items()
        if _is_config_type(tp) or any(_is_config_type(arg) for arg in get_args(tp))
    }


def check_keys(cls: type, keys: Iterable[str], path: str = "") -> None:
    r"""Raise :class:`ConfigError` if a key of ``keys`` is not a field of the dataclass ``cls``.

    Args:
        cls: the config class the keys are meant for.
        keys: the given keys.
        path: dotted path of the config the keys belong to (``""`` at the top).
    """
    valid = config_fields(cls)
    unknown = sorted(str(key) for key in keys if key not in valid)
    if unknown:
        named = ", ".join(repr(_join(path, key)) for key in unknown)
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {named}; valid keys of "
            f"{cls.__name__}: {', '.join(sorted(valid))}",
            _join(path, unknown[0]),
        )


def build_config(cls: type[ConfigT], data: Mapping[str, Any], path: str = "") -> ConfigT:
    r"""Construct the dataclass ``cls`` from a JSON-like mapping, checking it at every depth.

    Args:
        cls: the config class.
        data: its keyword arguments; nested configs may be mappings or instances.
        path: dotted path of this config inside the outermost one, for messages.

    Raises:
        ConfigError: an unknown or missing key, a value of the wrong type, or a value
            rejected by the class (its ``__post_init__`` message, prefixed with ``path``).
    """
    check_keys(cls, data, path)
    hints = config_fields(cls)
    missing = [
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.init and f.name not in data and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        key = _join(path, missing[0])
        raise ConfigError(f"missing key {key!r} of {cls.__name__}", key)
    kwargs = {
        name: coerce_value(value, hints[name], _join(path, name)) for name, value in data.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if error.key is not None or not path:
            raise
        # A value the class itself rejected: name the section it sits in.
        raise _same_kind(error, f"{path}: {error}", path) from error


def coerce_value(value: Any, tp: Any, path: str) -> Any:
    r"""``value`` checked against the annotation ``tp`` and converted where JSON cannot say it.

    Nested dataclasses are built from mappings (:func:`build_config`), lists become tuples
    where the annotation is a tuple, an ``int`` is accepted (as a ``float``) for a ``float``;
    ``bool`` is not an ``int``. ``Literal``, ``X | None`` and ``list`` / ``dict`` are checked
    item by item; annotations it cannot check (``Any``, callables…) accept anything.

    Args:
        value: the given value.
        tp: the field's resolved annotation.
        path: the value's dotted path, for messages.

    Raises:
        ConfigError: the value (or something inside it) does not fit.
    """
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, path)
    if origin is Literal:
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
        raise _type_mismatch(path, tp, value)
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return build_config(tp, value, path)
        raise _type_mismatch(path, tp, value)
    if origin in (tuple, list):
        return _coerce_sequence(value, tp, path)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_mismatch(path, tp, value)
        item_type = args[1] if args else Any
        return {
            key: coerce_value(item, item_type, _join(path, str(key))) for key, item in value.items()
        }
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, tp: Any, path: str) -> Any:
    args = get_args(tp)
    if value is None:
        if _NONE_TYPE in args:
            return None
        raise _type_mismatch(path, tp, value)
    for arg in args:
        if arg is _NONE_TYPE:
            continue
        try:
            return coerce_value(value, arg, path)
        except ConfigError as error:
            if not (error.type_mismatch and error.key == path):  # wrong inside it: report that
                raise
    raise _type_mismatch(path, tp, value)


def _coerce_sequence(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _type_mismatch(path, tp, value)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _type_mismatch(path, tp, value)
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [
        coerce_value(item, item_type, _join(path, i))
        for i, (item, item_type) in enumerate(zip(value, item_types, strict=True))
    ]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is _NONE_TYPE:
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        ok = isinstance(value, float)
    elif isinstance(tp, type):
        ok = isinstance(value, tp)
    else:  # a TypeVar, a Callable…: not checked
        ok = True
    if not ok:
        raise _type_mismatch(path, tp, value)
    return value


def parse_json(text: str, source: str) -> Any:
    r"""``text`` parsed as JSON, refused if it nests deeper than :data:`MAX_JSON_DEPTH`
    (text thousands of levels deep exhausts Python's recursion limit in the reader: a
    ``RecursionError`` traceback, not an answer).

    Args:
        text: the JSON text.
        source: what it is, for the message (a file's path, ``--corpus-config x.json``).

    Raises:
        json.JSONDecodeError: it is not JSON.
        ConfigError: it nests too deep (one line naming ``source``).
    """
    try:
        return loads_json(text)
    except JSONDepthError:
        raise ConfigError(
            f"{source} nests objects or lists more than {MAX_JSON_DEPTH} deep; "
            "a config nests only a few levels: flatten it"
        ) from None


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


#: ``__post_init__`` wrappers made by :func:`_raising_config_errors` (never wrapped twice).
_CHECKED_POST_INITS: set[Callable[[Any], None]] = set()


def _raising_config_errors(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(post_init)
    def checked(self: Any) -> None:
        try:
            post_init(self)
        except ConfigError:
            raise
        except ValueError as error:
            kind = ConfigLimitError if isinstance(error, ResourceLimitError) else ConfigError
            raise kind(str(error)) from error

    _CHECKED_POST_INITS.add(checked)
    return checked


class JSONConfigMixin:
    r"""``to_dict`` / ``from_dict`` / JSON text / JSON files for a dataclass config.

    :meth:`from_dict` checks every key and value against the field annotations, at any
    depth (see :func:`build_config`). A subclass's ``__post_init__`` should call
    ``super().__post_init__()`` first: it builds the nested config fields given as dicts
    (``FusionConfig(graph={"left": 2})``) through the same checks, paths relative to the
    constructed config.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A subclass's own __post_init__ checks raise ValueError; make every rejected value
        # a ConfigError (an expected failure the CLI shows as one line), however the config
        # was built — from JSON, from CLI options, or directly in Python.
        super().__init_subclass__(**kwargs)
        post_init = cls.__dict__.get("__post_init__")
        if post_init is not None and post_init not in _CHECKED_POST_INITS:
            cls.__post_init__ = _raising_config_errors(post_init)  # type: ignore[method-assign]

    def __post_init__(self) -> None:
        for name, tp in _nested_fields(type(self)).items():
            setattr(self, name, coerce_value(getattr(self, name), tp, name))

    def to_dict(self) -> dict[str, Any]:
        r"""A JSON-serialisable dict of every field (nested configs as dicts, tuples as lists)."""
        return _json_ready(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        r"""Inverse of :meth:`to_dict`; nested configs may be dicts or instances.

        Args:
            data: the keyword arguments of the config (missing keys take their defaults).

        Raises:
            ConfigError: an unknown key or a value of the wrong type at any depth (named by
                its dotted path, with the valid keys of its config), or a value a config
                rejects.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"expected a JSON object for {cls.__name__}, got {reprlib.repr(data)}"
            )
        return build_config(cls, data)

    def to_json(self) -> str:
        r"""The config as JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        r"""Inverse of :meth:`to_json`.

        Raises:
            ConfigError: as :meth:`from_dict`, or the text nests deeper than
                :data:`MAX_JSON_DEPTH`.
        """
        return cls.from_dict(parse_json(text, f"the JSON text of {cls.__name__}"))

    def to_json_file(self, path: str | Path) -> None:
        r"""Write the config as a JSON file, UTF-8, atomically
        (:func:`hetgraph.io.atomic_write_text`: a reader never sees half a file, and an existing
        one is replaced only once the new one is complete)."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> Self:
        r"""Read a JSON file written by :meth:`to_json_file` (or by hand).

        Raises:
            FileNotFoundError: the file does not exist.
            ConfigError: it is not valid JSON, nests deeper than :data:`MAX_JSON_DEPTH`, or
                as :meth:`from_dict` (the message starts with the file's path).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        try:
            data = parse_json(path.read_text(encoding="utf-8"), str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise _same_kind(error, f"{path}: {error}", error.key) from error
