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
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "quantization_config",
    "use_cache",
    "architectures",
    "_commit_hash",
    "output_hidden_states",
    "return_dict",
}


#: Texts whose token ids make up :func:`tokenizer_behaviour_fingerprint`: case, accents
#: (composed and decomposed), runs of spaces, tabs and newlines, digits, punctuation, code,
#: non-Latin scripts and emoji, so that another normaliser or pre-tokenizer changes some ids.
BEHAVIOUR_PROBES: tuple[str, ...] = (
    "Hello World! THE Quick brown fox; the QUICK Brown FOX.",
    "caf\u00e9 cafe\u0301 na\u00efve \u00c5ngstr\u00f6m \ufb01ne \u2460 \uff21",
    "  two  spaces,\tone tab,\n\nnew lines\r\n and   trailing   ",
    "3.14159 1,000,000 2024-01-31 0x1F -42 1e-9",
    "def f(x):\n    return x ** 2  # comment\n",
    "\u4f60\u597d\u4e16\u754c \u041f\u0440\u0438\u0432\u0435\u0442 "
    "\u0645\u0631\u062d\u0628\u0627 \U0001f600\U0001f44d",
    "don't won't it's I'm we've they'll 'quoted' \"double\"",
)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the tokenizer's vocabulary and special tokens (see also
    :func:`tokenizer_behaviour_fingerprint`, which covers how texts are split)."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return json_fingerprint([vocab, special], ensure_ascii=False)


def tokenizer_behaviour_fingerprint(tokenizer: Any) -> str:
    """Hash of the token ids of :data:`BEHAVIOUR_PROBES` (no special tokens added).

    Two tokenizers with one vocabulary but another normaliser (e.g. lowercasing), another
    pre-tokenizer or other merges tokenize some probe differently and so differ here. It
    hashes behaviour, not the tokenizer's serialisation, so it stays the same across library
    versions that serialise the same tokenizer differently.
    """
    ids = [
        list(map(int, tokenizer.encode(probe, add_special_tokens=False)))
        for probe in BEHAVIOUR_PROBES
    ]
    return json_fingerprint(ids)


def tokenizer_matches(recorded: dict[str, Any], tokenizer: Any) -> str | None:
    """Compare ``tokenizer`` with a recorded :func:`model_fingerprint`.

    Args:
        recorded: the ``model`` fingerprint dict stored by a datastore (or adapter). Its
            ``"tokenizer_behaviour"`` entry is checked only when present: datastores built
            before it existed record only ``"tokenizer"`` and stay usable.
        tokenizer: the tokenizer about to be used with it.

    Returns:
        ``None`` if they match, else a message fragment saying what differs (both
        fingerprints), e.g. ``"a different tokenizer (vocabulary fingerprint …)"``.
    """
    current = tokenizer_fingerprint(tokenizer)
    if recorded.get("tokenizer") != current:
        return (
            f"a different tokenizer (vocabulary fingerprint {recorded.get('tokenizer')}, "
            f"this tokenizer {current})"
        )
    behaviour = recorded.get("tokenizer_behaviour")
    if behaviour is not None:
        current = tokenizer_behaviour_fingerprint(tokenizer)
        if behaviour != current:
            return (
                "a tokenizer with the same vocabulary that splits text differently (another "
                f"normaliser or pre-tokenizer, e.g. lowercasing: behaviour fingerprint "
                f"{behaviour}, this tokenizer {current})"
            )
    return None


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
        "tokenizer_behaviour": tokenizer_behaviour_fingerprint(tokenizer),
    }


def array_fingerprint(*arrays: np.ndarray) -> str:
    """Hash of the arrays' dtypes, shapes and contents, in order."""
    h = StreamingHash()
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(str((a.dtype.str, a.shape)))
        h.update(a.tobytes())
    return h.hexdigest()
