r"""Fusion sites: how ``FusionConfig.fusion_layers`` is written and what it selects.

A *site specification* is a list of items, each one of

- a decoder-layer index, negative allowed (``-1`` is the last decoder layer);
- ``"head"``: the input of the LM head ("on top of the last layer", as in GNN-LM);
- ``"all"``: every decoder layer (not the head: write ``["all", "head"]`` for both);
- a Python slice over the decoder layers, ``"start:stop"`` or ``"start:stop:step"``
  with any part left out (``"0:30:4"``, ``"-4:"``, ``"::2"``).

A single item may be given alone (``fusion_layers="all"``). The config keeps the
specification symbolic, in a canonical form that re-parses to itself
(:func:`parse_fusion_layers`: a tuple; integer strings become ints, slices lose their
spaces and an empty step); JSON configs and saved adapters store that canonical list.
Only :func:`resolve_fusion_sites`, when a :class:`~hetgraph.HetGraphLM` is built, turns it
into concrete sites for the model's number of decoder layers: negative indices wrap,
duplicates go, layers come in ascending order and ``"head"`` last. A slice follows
Python's slicing (``"0:40"`` on a 30-layer model is layers 0 … 29) but must select at
least one layer; an index outside ``-L … L-1`` is a :class:`ConfigError`.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from hetgraph.configuration import ConfigError

#: A resolved fusion site: a decoder-layer index ``0 … L-1`` or ``"head"``.
FusionSite = int | Literal["head"]
HEAD = "head"
#: Every decoder layer (the head is a separate site).
ALL = "all"
#: Where site errors point in a run config.
CONFIG_KEY = "fusion.fusion_layers"

_INT = re.compile(r"^[+-]?\d+$")
_SLICE = re.compile(r"^\s*([+-]?\d+)?\s*:\s*([+-]?\d+)?\s*(?::\s*([+-]?\d+)?\s*)?$")
_HELP = (
    "a site is a decoder-layer index, 'head', 'all' or a range 'start:stop:step' "
    "(e.g. '0:30:4', '-4:', '::2')"
)


class _SiteStringType(type):
    # isinstance(value, SiteString) is True for the strings a site item may be, so the
    # config machinery's type check names a bad item by its path (fusion.fusion_layers[1]).
    def __instancecheck__(cls, value: Any) -> bool:
        return isinstance(value, str) and _parse_item(value) is not None


class SiteString(metaclass=_SiteStringType):
    """Type of the string items of a site specification (``"head"``, ``"all"``, a slice or
    an integer written as a string); used as a config annotation only."""


# The name the config machinery prints in "expected …" messages.
SiteString.__name__ = "'head' | 'all' | 'start:stop:step'"

#: The annotation of ``FusionConfig.fusion_layers``.
FusionLayers = int | SiteString | tuple[int | SiteString, ...]


def _parse_item(item: Any) -> int | str | None:
    """The canonical form of one item, or ``None`` when it is no site."""
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return item
    if not isinstance(item, str):
        return None
    text = item.strip()
    if text in (HEAD, ALL):
        return text
    if _INT.match(text):
        return int(text)
    match = _SLICE.match(text)
    if match is None:
        return None
    start, stop, step = match.groups()
    if step is not None and int(step) == 0:
        return None
    parts = [str(int(start)) if start else "", str(int(stop)) if stop else ""]
    if step is not None and int(step) != 1:
        parts.append(str(int(step)))
    canonical = ":".join(parts)
    return ALL if canonical == ":" else canonical


def parse_fusion_layers(value: Any) -> tuple[int | str, ...]:
    """The canonical site specification of ``value`` (an item or a list of items).

    Raises:
        ConfigError: ``value`` is empty or an item is no site (the message names
            ``fusion_layers[i]`` and what a site may be).
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ConfigError(f"fusion_layers is empty: give at least one site; {_HELP}")
    canonical = []
    for i, item in enumerate(items):
        parsed = _parse_item(item)
        if parsed is None:
            why = " (a slice's step must not be 0)" if isinstance(item, str) and ":" in item else ""
            raise ConfigError(
                f"fusion_layers[{i}]: {item!r} is no fusion site{why}; {_HELP}",
                f"fusion_layers[{i}]",
            )
        canonical.append(parsed)
    return tuple(canonical)


def _slice_of(text: str) -> slice:
    parts = [int(p) if p else None for p in text.split(":")]
    return slice(*parts)


def resolve_fusion_sites(spec: Any, num_layers: int) -> tuple[FusionSite, ...]:
    """Concrete sites of a specification for a model with ``num_layers`` decoder layers:
    ascending layer indices ``0 … L-1`` without duplicates, then ``"head"`` if selected.

    Raises:
        ConfigError: an index outside ``-L … L-1`` or a slice that selects no layer (named
            ``fusion.fusion_layers``, with the valid range).
    """
    valid = (
        f"valid for a model with {num_layers} decoder layers: indices "
        f"{-num_layers} … {num_layers - 1}, 'head', 'all' or a range such as "
        f"'0:{num_layers}:4'"
    )
    layers: set[int] = set()
    head = False
    for item in parse_fusion_layers(spec):
        if item == HEAD:
            head = True
        elif item == ALL:
            layers.update(range(num_layers))
        elif isinstance(item, int):
            if not -num_layers <= item < num_layers:
                raise ConfigError(
                    f"{CONFIG_KEY}: layer {item} is out of range ({valid})", CONFIG_KEY
                )
            layers.add(item % num_layers)
        else:
            selected = range(num_layers)[_slice_of(item)]
            if len(selected) == 0:
                raise ConfigError(
                    f"{CONFIG_KEY}: range {item!r} selects no decoder layer ({valid})", CONFIG_KEY
                )
            layers.update(selected)
    return (*sorted(layers), *((HEAD,) if head else ()))


def site_key(site: FusionSite) -> str:
    """Name of a fused site in :attr:`FusionEngine.adapters <hetgraph.FusionEngine>` / ``gates``:
    ``"head"`` or ``"layer_<i>"``."""
    return "head" if site == HEAD else f"layer_{int(site)}"


def describe_sites(sites: tuple[FusionSite, ...]) -> str:
    """A short text of resolved sites for logs: ``"layers 0-29 (30) + head"``."""
    layers = [s for s in sites if s != HEAD]
    text = ""
    if layers:
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        text = (
            f"layers {layers[0]}-{layers[-1]} ({len(layers)})"
            if contiguous and len(layers) > 2
            else "layers " + ",".join(map(str, layers))
        )
    if HEAD in sites:
        text = f"{text} + head" if text else "head"
    return text
