r"""What a model folder's weight files and ``config.json`` ask for, checked before loading.

* :func:`check_safetensors_file` and :func:`check_gguf_file` validate weight files first
  (header length, a JSON header of known dtypes, shapes and offsets inside the data; a GGUF
  file GGUF's reader can parse), so a damaged one is one line naming it;
* :func:`check_model_size` runs before a local folder's model is built: sane counts in
  ``config.json`` (:func:`load_config`), and the parameters they imply against the values
  the weight files store (:func:`stored_values`) and the memory available.

Each failure is one :class:`~hetgraph.models.errors.ModelLoadError` (or
:class:`~hetgraph.limits.ResourceLimitError`) line naming the file and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hetgraph.io import HF_MODEL_CONFIG
from hetgraph.limits import check_count, check_memory, format_bytes, loads_json

from .errors import ModelLoadError

#: Bytes per element of the safetensors dtypes (sub-byte and unknown dtypes are not sized).
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
#: The largest header the safetensors library reads.
SAFETENSORS_MAX_HEADER = 100_000_000
#: Weight files whose size bounds the number of stored values (2 per byte: 4-bit packing).
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth")
#: How many times more parameters than stored values a config may describe (quantised
#: weights pack several parameters into one stored value) before it is refused as not
#: belonging to the weights.
PARAMETERS_PER_STORED_VALUE = 8

_RESTORE_WEIGHTS = "restore the file, e.g. save the model again with `save_pretrained`"


def check_safetensors_file(path: str | Path) -> int:
    r"""Validate a ``.safetensors`` file's header before the library maps it; return the
    number of values it stores.

    The 8-byte little-endian header length must fit the file (and the library's 100 MB
    limit), the header must be a JSON object of tensors with a known ``dtype``, a ``shape``
    of non-negative integers and ``data_offsets`` inside the data area, each as long as its
    shape and dtype say.

    Raises:
        ModelLoadError: naming the file and what is wrong with it.
    """
    import math

    path = Path(path)

    def damaged(reason: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is damaged ({reason}); {_RESTORE_WEIGHTS}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise damaged(
                    "empty"
                    if size == 0
                    else f"only {size} bytes, shorter than the 8-byte header length"
                )
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise damaged(
                    f"its header length {length} exceeds the "
                    + (
                        f"file's {size} bytes (truncated?)"
                        if length > size - 8
                        else f"{SAFETENSORS_MAX_HEADER}-byte limit"
                    )
                )
            raw = f.read(length)
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        header = loads_json(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise damaged("its header is not a JSON object")
    data_size = size - 8 - length
    values = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"tensor {name[:80]!r}"
        if not isinstance(info, dict):
            raise damaged(f"{what} has no description")
        shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise damaged(f"{what} has an invalid shape {str(shape)[:80]}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise damaged(f"{what} has invalid data offsets {str(offsets)[:80]}")
        if offsets[1] > data_size:
            raise damaged(
                f"{what} ends at byte {offsets[1]} of the data, past its end at "
                f"{data_size} (truncated?)"
            )
        count = math.prod(shape)
        itemsize = _SAFETENSORS_DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        if itemsize is not None and count * itemsize != offsets[1] - offsets[0]:
            raise damaged(
                f"{what} of shape {shape} and dtype {dtype} takes "
                f"{offsets[1] - offsets[0]} bytes, not {count * itemsize}"
            )
        values += count
    return values


def check_gguf_file(path: str | Path) -> None:
    r"""Parse a GGUF file's header and tensor table before transformers reads it.

    Raises:
        ModelLoadError: the file is not a readable GGUF file (any parse error: a short,
            truncated or damaged file gives ``struct`` or ``numpy`` errors, not a message).
    """
    path = Path(path)
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # the loader explains that reading GGUF files needs the gguf package
    try:
        GGUFReader(path)
    except Exception as error:  # any failure to parse means a damaged file
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        raise ModelLoadError(
            f"{path} is not a readable GGUF file ({detail}); it is truncated or damaged: "
            "download or convert it again"
        ) from None


def stored_values(folder: str | Path) -> int | None:
    r"""How many values the weight files of a model folder store, validating each
    ``.safetensors`` file (:func:`check_safetensors_file`); ``None`` without weight files.
    Other weight files (``.bin``, ``.pt``) count two values per byte."""
    folder = Path(folder)
    total, found = 0, False
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            total += check_safetensors_file(path)
            found = True
        elif path.suffix in _OTHER_WEIGHT_SUFFIXES:
            total += 2 * path.stat().st_size
            found = True
    return total if found else None


def _config_problem(path: Path, error: Exception) -> ModelLoadError:
    detail = " ".join(str(error).split())[:300]
    return ModelLoadError(
        f"{path} is not a usable model configuration ({detail}); fix the "
        "field it names, or save the model again with `save_pretrained`"
    )


def load_config(folder: str | Path) -> Any:
    r"""The transformers configuration of a local model folder (no custom code), with any
    failure to build it — a field of the wrong type, values the config class refuses — as
    one :class:`ModelLoadError` naming ``config.json``."""
    from transformers import AutoConfig

    path = Path(folder) / HF_MODEL_CONFIG
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: configs are not validated strictly
        StrictDataclassError = ValueError
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, OSError, StrictDataclassError) as error:
        raise _config_problem(path, error) from None


#: Counts of a config checked by :func:`check_model_size`: (attribute, minimum, maximum).
_COUNT_LIMITS = (
    ("vocab_size", 1, 2**31 - 1),
    ("hidden_size", 1, 2**20),
    ("num_hidden_layers", 1, 10_000),
    ("num_attention_heads", 1, 2**16),
    ("num_key_value_heads", 1, 2**16),
    ("head_dim", 1, 2**16),
    ("intermediate_size", 1, 2**31 - 1),
    ("max_position_embeddings", 1, 2**40),
)


def _field_name(config: Any, attribute: str, prefix: str) -> str:
    # GPT-2 calls hidden_size "n_embd" in its config.json, and so on: name the file's key.
    return prefix + getattr(config, "attribute_map", {}).get(attribute, attribute)


def check_model_size(folder: str | Path, dtype: Any = None) -> None:
    r"""Refuse a model folder whose ``config.json`` asks for absurd sizes or more memory than
    there is, before transformers allocates anything.

    Every count (vocabulary, hidden size, layers, heads …) must be a positive integer in a
    sane range, heads must divide the hidden size (unless the config gives ``head_dim``)
    and key/value heads the heads. The parameters are then estimated from the config —
    embeddings (and an untied output head), learned positions, and per layer the attention
    projections and a two-matrix MLP: a lower bound, whatever the family — and refused if
    they are more than :data:`PARAMETERS_PER_STORED_VALUE` times the values the weight
    files store (a config that does not belong to its weights), or do not fit
    :func:`hetgraph.limits.check_memory` in ``dtype``. A folder without weight files is
    left to transformers, which refuses it before allocating.

    Raises:
        ModelLoadError: a config transformers cannot build, an impossible shape, or a config
            that does not match its weights; naming ``config.json`` and the field.
        ResourceLimitError: a count out of range, or too little memory; naming the field.
    """
    folder = Path(folder)
    path = folder / HF_MODEL_CONFIG
    config = load_config(folder)
    prefix = ""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is not config:
        prefix, config = "text_config.", text_config
    fix = "fix it, or save the model again with `save_pretrained`"
    sizes: dict[str, int] = {}
    for attribute, low, high in _COUNT_LIMITS:
        value = getattr(config, attribute, None)
        if value is None:
            continue
        field = _field_name(config, attribute, prefix)
        check_count(f"{path} field {field!r}", value, high, fix, minimum=low)
        sizes[attribute] = value
    vocab, hidden = sizes.get("vocab_size"), sizes.get("hidden_size")
    heads = sizes.get("num_attention_heads")
    if vocab is None or hidden is None:
        return  # not a decoder of the usual shape: nothing to estimate
    if heads is not None and "head_dim" not in sizes and hidden % heads:
        raise ModelLoadError(
            f"{path}: {_field_name(config, 'hidden_size', prefix)} {hidden} is not divisible "
            f"by {_field_name(config, 'num_attention_heads', prefix)} {heads}; {fix}"
        )
    kv_heads = sizes.get("num_key_value_heads", heads)
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ModelLoadError(
            f"{path}: {_field_name(config, 'num_attention_heads', prefix)} {heads} is not "
            f"divisible by {_field_name(config, 'num_key_value_heads', prefix)} {kv_heads}; "
            f"{fix}"
        )

    # The parameter count, part by part, with the fields that drive each part.
    tied = bool(getattr(config, "tie_word_embeddings", True))
    parts = {("vocab_size", "hidden_size"): vocab * hidden * (1 if tied else 2)}
    rotary = any(
        getattr(config, key, None)
        for key in ("rope_parameters", "rope_theta", "rope_scaling", "alibi")
    )
    if "max_position_embeddings" in sizes and not rotary:  # learned positions (GPT-2)
        parts["max_position_embeddings", "hidden_size"] = sizes["max_position_embeddings"] * hidden
    layers = sizes.get("num_hidden_layers")
    if layers is not None:
        head_dim = sizes.get("head_dim") or (hidden // heads if heads else hidden)
        attention = (2 * (heads or 1) + 2 * (kv_heads or 1)) * head_dim * hidden
        mlp = (
            2
            * hidden
            * (sizes.get("intermediate_size") or getattr(config, "n_inner", None) or 4 * hidden)
        )
        fields = ("num_hidden_layers", "hidden_size", "intermediate_size", "head_dim")
        parts[tuple(f for f in fields if f in sizes)] = layers * (attention + mlp)
    parameters = sum(parts.values())
    # Name the fields of the largest part, the largest value first (40M before 32).
    blamed = sorted(max(parts, key=parts.__getitem__), key=lambda f: -sizes[f])
    culprit = ", ".join(f"{_field_name(config, f, prefix)} {sizes[f]}" for f in blamed)
    field = ", ".join(_field_name(config, f, prefix) for f in blamed)

    stored = stored_values(folder)
    if stored is None:
        return  # no weight files: transformers says so, before allocating anything
    if parameters > PARAMETERS_PER_STORED_VALUE * stored:
        raise ModelLoadError(
            f"{path} describes a model of at least {parameters:,} parameters (mostly from "
            f"{culprit}), but the weight files in {folder} hold only {stored:,} values: the "
            f"config does not belong to these weights; check {field}, or save the model "
            "again with `save_pretrained`"
        )
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    check_memory(
        f"the model of {path} ({parameters:,} parameters, mostly from {culprit})",
        parameters * itemsize,
        f"check {field} in {path}, or load the model in a smaller --dtype "
        f"(it takes {format_bytes(parameters * itemsize)} in "
        f"{str(dtype or 'float32').removeprefix('torch.')})",
    )
