"""Mixed-precision training: the dtype the adapter's training forward runs its matrix
products in (``torch.autocast``), while weights, optimiser state, the loss and every
evaluation stay float32.

An option of hetgraph's, not the paper's (the official GNN-LM trains in float32). bfloat16
rather than float16: it has float32's range, so no loss scaling is needed.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext

import torch

logger = logging.getLogger(__name__)

#: Values of :attr:`TrainingConfig.mixed_precision <hetgraph.training.TrainingConfig>`.
MIXED_PRECISION = ("no", "bf16", "auto")


#: CPU features with bfloat16 dot products (``torch.cpu.get_capabilities()``: x86 AVX512-BF16
#: and AMX, Arm BF16 and SVE-BF16).
BFLOAT16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: CUDA with bfloat16
    support (compute capability 8 and later), or a CPU with one of
    :data:`BFLOAT16_CPU_FEATURES` (PyTorch's own ``torch.cpu.get_capabilities``) whose
    bfloat16 products PyTorch runs through oneDNN. Elsewhere bfloat16 is emulated and
    slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities()
        return torch.backends.mkldnn.is_available() and any(
            capabilities.get(feature, False) for feature in BFLOAT16_CPU_FEATURES
        )
    return False


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``mixed_precision=setting`` on ``device`` (``None``: float32).

    ``"auto"`` is bfloat16 where :func:`native_bfloat16` holds and float32 elsewhere;
    ``"bf16"`` is bfloat16 everywhere (emulated, hence slow, on other hardware).
    """
    if setting not in MIXED_PRECISION:
        raise ValueError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {setting!r}"
        )
    if setting == "no":
        return None
    native = native_bfloat16(device)
    if setting == "bf16" and not native:
        logger.warning(
            "mixed_precision bf16: %s has no native bfloat16 matrix products, so "
            "training runs emulated and slower than float32; use 'auto' or 'no'",
            device,
        )
    return torch.bfloat16 if setting == "bf16" or native else None


def training_autocast(
    dtype: torch.dtype | None, device: torch.device
) -> AbstractContextManager[object]:
    """The context a training forward runs in: ``torch.autocast`` to ``dtype`` on
    ``device``'s type, or nothing for float32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"`` or ``"no"``: how ``training.json`` records what a run trained in."""
    return "no" if dtype is None else "bf16"
