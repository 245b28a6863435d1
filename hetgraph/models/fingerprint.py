"""Stable fingerprints of models, tokenizers and arrays.

A datastore, an index and an adapter record the fingerprints of what built them, so
opening them with a different model or tokenizer fails with a clear error instead of
giving silently wrong neighbours.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from torch import nn

# Config fields that differ between two loads of the same weights.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "quantization_config", "use_cache", "architectures",
    "_commit_hash", "output_hidden_states", "return_dict",
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return _sha(json.dumps([vocab, special], ensure_ascii=False).encode())


def config_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture-defining part of a model's config."""
    config = model.config.to_dict()
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return _sha(json.dumps(stable, sort_keys=True, default=str).encode())


def model_fingerprint(model: nn.Module, tokenizer: Any) -> dict[str, str]:
    """Fingerprint of a (model, tokenizer) pair, as stored in metadata JSON files."""
    return {
        "model_type": str(getattr(model.config, "model_type", type(model).__name__)),
        "config": config_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def array_fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
