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

A folder's weight files and the sizes its ``config.json`` asks for are checked in
:mod:`hetgraph.models.weights`.
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
_MAX_POSITION_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_sequence_length",
    "seq_length",
)

_SAVE_HINT = "save the tokenizer next to the model with `tokenizer.save_pretrained(<model folder>)`"


def _read_object(path: Path) -> dict[str, Any]:
    try:
        value = loads_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(
            f"{path} is not valid JSON ({error}); restore the file, e.g. save the model again "
            "with `save_pretrained`"
        ) from None
    except OSError as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise ModelLoadError(
            f"{path} holds a JSON {type(value).__name__}, not an object; "
            "restore the file, e.g. save the model again with `save_pretrained`"
        )
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
                "implements, or convert it to one"
            )
    if not any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {folder} has no tokenizer files (none of "
            f"{', '.join(HF_TOKENIZER_FILES)}); {_SAVE_HINT}"
        )


def embedding_rows(model: nn.Module) -> int | None:
    """Number of rows of the model's input embedding matrix (its usable token ids)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    weight = getattr(embeddings, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def check_tokenizer(tokenizer: Any, model: nn.Module | None = None, source: object = None) -> None:
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
            f"(almost) nothing but special tokens; {_SAVE_HINT}"
        )
    ids = list(tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
    decoded = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    if _normalised(decoded) != _normalised(PROBE_TEXT):
        raise ModelLoadError(
            f"the tokenizer{where} does not round-trip the probe text {PROBE_TEXT!r} (got "
            f"{decoded!r} from {len(ids)} token(s)); it is not the model's tokenizer or is "
            f"damaged: {_SAVE_HINT}"
        )
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
            "embeddings (`model.resize_token_embeddings(len(tokenizer))`) and fine-tune"
        )
    outside = sorted(token for token, i in vocab.items() if i in added and i >= rows)
    if outside:
        # transformers adds e.g. an unknown token to some tokenizers; harmless unless a text
        # spells it out, which check_token_ids then refuses.
        logger.warning(
            "added tokens %s of the tokenizer%s have ids beyond the model's %d "
            "embedding rows; texts containing them will be refused",
            outside,
            where,
            rows,
        )


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
            "has no embedding for. Tokenize it with the model's own tokenizer"
        )


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


def check_context_length(model: nn.Module, length: int, option: str = "--context-length") -> int:
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
            f"supports; use {option} {limit} or less",
            option,
        )
    return length


# -- weight files and the size a config asks for ---------------------------------------------
