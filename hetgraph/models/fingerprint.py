"""Stable fingerprints of models, tokenizers and arrays.

A datastore, an index and an adapter record the fingerprints of what built them, so
opening them with a different model or tokenizer fails with a clear error instead of
giving silently wrong neighbours.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hetgraph.io import StreamingHash, json_fingerprint

# Config fields that differ between two loads of the same weights.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "quantization_config", "use_cache", "architectures",
    "_commit_hash", "output_hidden_states", "return_dict",
}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return json_fingerprint([vocab, special], ensure_ascii=False)


def config_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture-defining part of a model's config."""
    config = model.config.to_dict()
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return json_fingerprint(stable, default=str)


def weights_fingerprint(model: nn.Module, samples_per_tensor: int = 1024) -> str:
    """Hash of a strided sample of every parameter (two fine-tunes of one architecture
    share a config but not their weights). Cheap: at most ``samples_per_tensor`` values
    per tensor, hashed after rounding to bfloat16 so that loading the same weights in
    float32 or bfloat16, on any device, gives the same fingerprint."""
    h = StreamingHash()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(torch.bfloat16).float().cpu().numpy()
        h.update(name)
        h.update(sample.tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module, tokenizer: Any) -> dict[str, str]:
    """Fingerprint of a (model, tokenizer) pair, as stored in metadata JSON files."""
    return {
        "model_type": str(getattr(model.config, "model_type", type(model).__name__)),
        "config": config_fingerprint(model),
        "weights": weights_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def array_fingerprint(*arrays: np.ndarray) -> str:
    """Hash of the arrays' dtypes, shapes and contents, in order."""
    h = StreamingHash()
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(str((a.dtype.str, a.shape)))
        h.update(a.tobytes())
    return h.hexdigest()
