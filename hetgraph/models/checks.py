r"""Safety checks on a model folder, a tokenizer and a requested context length.

* :func:`check_model_folder` runs *before* transformers reads a local directory: its
  ``config.json`` must be a JSON object, neither it nor ``tokenizer_config.json`` may name
  custom code (``auto_map``; hetgraph never runs a folder's Python, and without this check
  transformers would ask interactively), and it must hold tokenizer files (without them
  transformers 5 builds a one-token tokenizer that turns every document into EOS).
* :func:`check_tokenizer` runs on every loaded (model, tokenizer) pair: a non-trivial
  vocabulary, a probe text that round-trips (up to case and whitespace), and token ids that
  fit the model's embedding matrix.
* :func:`check_context_length` refuses a context longer than the model's position limit
  (GPT-2's ``n_positions``, Qwen2 / Llama's ``max_position_embeddings``).
* :func:`check_model_size` runs before a local folder's model is built: sane counts in
  ``config.json``, and the parameters they imply against the weight files and the memory
  available; :func:`check_safetensors_file` and :func:`check_gguf_file` validate weight
  files first, so a damaged one is one line naming it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from hetgraph.configuration import ConfigError
from hetgraph.io import HF_MODEL_CONFIG, HF_TOKENIZER_CONFIG, HF_TOKENIZER_FILES
from hetgraph.limits import loads_json

from .errors import CustomCodeError, ModelLoadError

logger = logging.getLogger(__name__)

#: Text every usable tokenizer must round-trip (compared case- and whitespace-insensitively).
PROBE_TEXT = "Hello world, the quick brown fox 123."

#: Fewest tokens a tokenizer must have; a folder without tokenizer files gives one.
MIN_VOCAB_SIZE = 16

#: Config attributes naming a model's maximum number of positions, in order of preference.
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                      "seq_length")

_SAVE_HINT = ("save the tokenizer next to the model with "
              "`tokenizer.save_pretrained(<model folder>)`")


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = loads_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"{path} is not valid JSON ({error}); restore the file, e.g. save the model again "
            "with `save_pretrained`") from None
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(value).__name__}, not an object; "
                             "restore the file, e.g. save the model again with `save_pretrained`")
    return value


def check_model_folder(folder: str | Path) -> None:
    """Refuse a local Hugging Face model directory that is malformed, needs custom code, or
    has no tokenizer files, before transformers reads it.

    Raises:
        CustomCodeError: ``config.json`` or ``tokenizer_config.json`` has an ``auto_map``.
        ModelLoadError: a malformed ``config.json``, or no tokenizer files; naming the folder
            (or file) and the fix.
    """
    folder = Path(folder)
    for name in (HF_MODEL_CONFIG, HF_TOKENIZER_CONFIG):
        path = folder / name
        if not path.is_file():
            continue
        auto_map = _read_object(path).get("auto_map")
        if auto_map:
            classes = sorted(auto_map) if isinstance(auto_map, dict) else auto_map
            raise CustomCodeError(
                f"model folder {folder} needs custom code ({name} has an 'auto_map' naming "
                f"{classes}); hetgraph never runs code from a model folder "
                "(trust_remote_code=False). Use a model whose architecture transformers "
                "implements, or convert it to one")
    if not any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {folder} has no tokenizer files (none of "
            f"{', '.join(HF_TOKENIZER_FILES)}); {_SAVE_HINT}")


def embedding_rows(model: nn.Module) -> int | None:
    """Number of rows of the model's input embedding matrix (its usable token ids)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def check_tokenizer(tokenizer: Any, model: nn.Module | None = None,
                    source: object = None) -> None:
    """Refuse a tokenizer that cannot have produced meaningful token ids for ``model``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        model: the model it feeds; when given, every id of the tokenizer's vocabulary must be
            below its number of input-embedding rows.
        source: where both were loaded from, for messages.

    Raises:
        ModelLoadError: a vocabulary of fewer than :data:`MIN_VOCAB_SIZE` tokens, a probe text
            that encodes to nothing or does not decode back, or token ids outside the model's
            vocabulary.
    """
    where = f" of {source}" if source is not None else ""
    size = len(tokenizer)
    if size < MIN_VOCAB_SIZE:
        raise ModelLoadError(
            f"the tokenizer{where} has only {size} token(s), so every text would become "
            f"(almost) nothing but special tokens; {_SAVE_HINT}")
    ids = list(tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
    decoded = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    if _normalised(decoded) != _normalised(PROBE_TEXT):
        raise ModelLoadError(
            f"the tokenizer{where} does not round-trip the probe text {PROBE_TEXT!r} (got "
            f"{decoded!r} from {len(ids)} token(s)); it is not the model's tokenizer or is "
            f"damaged: {_SAVE_HINT}")
    rows = embedding_rows(model) if model is not None else None
    if rows is None:
        return
    vocab = tokenizer.get_vocab()
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    base = [i for i in vocab.values() if i not in added]
    largest = max(base, default=-1)
    if largest >= rows:
        raise ModelLoadError(
            f"the tokenizer{where} has token ids up to {largest}, but the model's embedding "
            f"matrix has only {rows} rows (ids 0 … {rows - 1}); the tokenizer does not belong "
            "to this model. Save the model's own tokenizer next to it, or resize the "
            "embeddings (`model.resize_token_embeddings(len(tokenizer))`) and fine-tune")
    outside = sorted(token for token, i in vocab.items() if i in added and i >= rows)
    if outside:
        # transformers adds e.g. an unknown token to some tokenizers; harmless unless a text
        # spells it out, which check_token_ids then refuses.
        logger.warning("added tokens %s of the tokenizer%s have ids beyond the model's %d "
                       "embedding rows; texts containing them will be refused",
                       outside, where, rows)


def check_token_ids(ids: Any, model: nn.Module, what: str) -> None:
    """Refuse token ids the model cannot embed (``ids`` outside ``0 … rows-1``).

    Args:
        ids: an array or tensor of token ids.
        model: the causal LM that will read them.
        what: what holds the ids (e.g. ``"the train split of corpus runs/c"``), for the message.

    Raises:
        ModelLoadError: naming ``what``, the offending id and the model's number of rows.
    """
    import numpy as np

    rows = embedding_rows(model)
    array = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    if rows is None or array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ModelLoadError(
            f"{what} holds token id {bad}, outside the model's vocabulary of {rows} ids; it was "
            "tokenized with another tokenizer, or the text spells out a special token the model "
            "has no embedding for. Tokenize it with the model's own tokenizer")


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def max_positions(model: nn.Module) -> int | None:
    """The largest number of positions the model's config allows, or ``None`` if it names
    no limit."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    for cfg in (config, text_config):
        for key in _MAX_POSITION_KEYS:
            value = getattr(cfg, key, None) if cfg is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_context_length(model: nn.Module, length: int,
                         option: str = "--context-length") -> int:
    """Check that ``length`` tokens fit the model's positions; return ``length``.

    GPT-2 fails with an index error beyond ``n_positions``; rotary models (Qwen2, Llama)
    run silently past ``max_position_embeddings`` with degraded outputs. Both are refused.

    Args:
        model: the causal LM.
        length: the requested number of tokens per forward pass.
        option: the option or config key that set it, for the message.

    Raises:
        ConfigError: ``length < 1`` or ``length`` above the model's limit.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"{option} must be a positive integer, got {length!r}", option)
    limit = max_positions(model)
    if limit is not None and length > limit:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(
            f"{option} {length} exceeds the {limit} positions the model ({model_type}) "
            f"supports; use {option} {limit} or less", option)
    return length


# -- weight files and the size a config asks for ---------------------------------------------

#: Bytes per element of the safetensors dtypes (sub-byte and unknown dtypes are not sized).
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
                            "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
                            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
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
                raise damaged("empty" if size == 0 else f"only {size} bytes, shorter than the "
                              "8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise damaged(f"its header length {length} exceeds the "
                              + (f"file's {size} bytes (truncated?)" if length > size - 8
                                 else f"{SAFETENSORS_MAX_HEADER}-byte limit"))
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
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(n) is int for n in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise damaged(f"{what} has invalid data offsets {str(offsets)[:80]}")
        if offsets[1] > data_size:
            raise damaged(f"{what} ends at byte {offsets[1]} of the data, past its end at "
                          f"{data_size} (truncated?)")
        count = math.prod(shape)
        itemsize = _SAFETENSORS_DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None
        if itemsize is not None and count * itemsize != offsets[1] - offsets[0]:
            raise damaged(f"{what} of shape {shape} and dtype {dtype} takes "
                          f"{offsets[1] - offsets[0]} bytes, not {count * itemsize}")
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
            "download or convert it again") from None


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
    return ModelLoadError(f"{path} is not a usable model configuration ({detail}); fix the "
                          "field it names, or save the model again with `save_pretrained`")


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
        return AutoConfig.from_pretrained(folder, local_files_only=True,
                                          trust_remote_code=False)
    except (ValueError, TypeError, KeyError, OSError, StrictDataclassError) as error:
        raise _config_problem(path, error) from None


#: Counts of a config checked by :func:`check_model_size`: (attribute, minimum, maximum).
_COUNT_LIMITS = (("vocab_size", 1, 2**31 - 1), ("hidden_size", 1, 2**20),
                 ("num_hidden_layers", 1, 10_000), ("num_attention_heads", 1, 2**16),
                 ("num_key_value_heads", 1, 2**16), ("head_dim", 1, 2**16),
                 ("intermediate_size", 1, 2**31 - 1), ("max_position_embeddings", 1, 2**40))


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
    import torch

    from hetgraph.limits import check_count, check_memory, format_bytes

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
            f"by {_field_name(config, 'num_attention_heads', prefix)} {heads}; {fix}")
    kv_heads = sizes.get("num_key_value_heads", heads)
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ModelLoadError(
            f"{path}: {_field_name(config, 'num_attention_heads', prefix)} {heads} is not "
            f"divisible by {_field_name(config, 'num_key_value_heads', prefix)} {kv_heads}; "
            f"{fix}")

    # The parameter count, part by part, with the fields that drive each part.
    tied = bool(getattr(config, "tie_word_embeddings", True))
    parts = {("vocab_size", "hidden_size"): vocab * hidden * (1 if tied else 2)}
    rotary = any(getattr(config, key, None) for key in ("rope_parameters", "rope_theta",
                                                        "rope_scaling", "alibi"))
    if "max_position_embeddings" in sizes and not rotary:  # learned positions (GPT-2)
        parts["max_position_embeddings", "hidden_size"] = (sizes["max_position_embeddings"]
                                                           * hidden)
    layers = sizes.get("num_hidden_layers")
    if layers is not None:
        head_dim = sizes.get("head_dim") or (hidden // heads if heads else hidden)
        attention = (2 * (heads or 1) + 2 * (kv_heads or 1)) * head_dim * hidden
        mlp = 2 * hidden * (sizes.get("intermediate_size") or getattr(config, "n_inner", None)
                            or 4 * hidden)
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
            "again with `save_pretrained`")
    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    check_memory(f"the model of {path} ({parameters:,} parameters, mostly from {culprit})",
                 parameters * itemsize,
                 f"check {field} in {path}, or load the model in a smaller --dtype "
                 f"(it takes {format_bytes(parameters * itemsize)} in "
                 f"{str(dtype or 'float32').removeprefix('torch.')})")
