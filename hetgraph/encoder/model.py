r"""The relation encoder: retrieval-site hidden states to L2-normalised vectors compared by
inner product (a tied two-tower model: the same encoder embeds queries and stored keys)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hetgraph.configuration import ConfigError
from hetgraph.encoder.config import EncoderConfig
from hetgraph.errors import HetgraphError
from hetgraph.integrity import atomic_write_json_record, read_json_record
from hetgraph.io import atomic_save_safetensors, json_fingerprint
from hetgraph.models.fingerprint import array_fingerprint

logger = logging.getLogger(__name__)

__all__ = ["ENCODER_CONFIG", "ENCODER_WEIGHTS", "EncoderError", "RelationEncoder"]

ENCODER_FORMAT_VERSION = 1
#: The encoder's settings and fingerprint (JSON with its own checksum), in its directory.
ENCODER_CONFIG = "encoder_config.json"
#: The encoder's weights (safetensors), in its directory.
ENCODER_WEIGHTS = "encoder.safetensors"


class EncoderError(HetgraphError):
    r"""A relation encoder or its encoded index is missing, damaged, or does not match the
    datastore or the encoder it is used with."""


def retrain_hint(directory: str | Path) -> str:
    """How to write the encoder in ``directory`` again."""
    return f"train it again (hetgraph encoder train --datastore DS --out {directory})"


class RelationEncoder(nn.Module):
    r"""Maps a retrieval-site hidden state :math:`h \in \mathbb{R}^d` to
    :math:`e(h) = \mathrm{normalize}(f((h - \mu)\,s)) \in \mathbb{R}^{d'}` with :math:`f`
    linear or linear + GELU + linear; neighbours are the stored rows of largest
    :math:`e(q) \cdot e(k)`. :math:`\mu` and :math:`s` (the keys' mean and inverse RMS
    norm, buffers set by :meth:`fit_input_statistics`) make training independent of the
    hidden states' scale. The ``"identity"`` kind has neither: it returns its input in
    float32, compared by squared L2, so it retrieves exactly the raw index's neighbours.

    Args:
        config: :class:`~hetgraph.encoder.EncoderConfig`.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        d, out = config.input_dim, config.dim
        if config.kind == "identity":
            self.net: nn.Module = nn.Identity()
        elif config.kind == "linear":
            self.net = nn.Linear(d, out)
        else:
            hidden = config.hidden or max(out, d)
            self.net = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, out))
        if config.kind != "identity":
            self.register_buffer("shift", torch.zeros(d))
            self.register_buffer("scale", torch.ones(()))

    @property
    def metric(self) -> str:
        """``"ip"`` (unit vectors, inner product) or ``"l2"`` (the identity)."""
        return self.config.metric

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def is_identity(self) -> bool:
        return self.config.kind == "identity"

    def reset_parameters(self) -> None:
        """Fresh random weights (torch's global generator) and neutral input statistics."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        if not self.is_identity:
            self.shift.zero_()
            self.scale.fill_(1.0)

    @torch.no_grad()
    def fit_input_statistics(self, sample: Any) -> None:
        """Set the input mean and inverse RMS norm from ``sample`` ``[n, d]`` of keys."""
        if self.is_identity:
            return
        x = torch.as_tensor(np.asarray(sample)).float()
        mean = x.mean(dim=0)
        rms = (x - mean).pow(2).sum(dim=1).mean().sqrt()
        self.shift.copy_(mean)
        self.scale.fill_(1.0 / float(rms.clamp(min=1e-6)))

    def forward(self, hidden: Tensor) -> Tensor:
        """``[..., d]`` hidden states (any float dtype) → ``[..., d′]`` float32."""
        x = hidden.float()
        if self.is_identity:
            return x
        return F.normalize(self.net((x - self.shift) * self.scale), dim=-1)

    @torch.no_grad()
    def encode(self, keys: Any, batch_rows: int = 65536) -> Tensor:
        """Encode an ``[n, d]`` array or tensor (e.g. a slice of the keys memmap) in chunks of
        ``batch_rows``, without gradients: ``[n, d′]`` float32 on the encoder's device."""
        device = next(iter(self.buffers()), torch.zeros(())).device
        n = int(keys.shape[0])
        parts = [
            self(torch.as_tensor(np.array(keys[s : s + batch_rows])).to(device))
            for s in range(0, n, batch_rows)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    @property
    def fingerprint(self) -> str:
        """Hash of the config and every parameter and buffer (exact float32 bytes)."""
        tensors = [t.detach().float().cpu().numpy() for _, t in sorted(self.state_dict().items())]
        return json_fingerprint(
            {"config": self.config.to_dict(), "weights": array_fingerprint(*tensors)}
        )

    def extra_repr(self) -> str:
        c = self.config
        return f"kind={c.kind!r}, input_dim={c.input_dim}, dim={c.dim}, metric={self.metric!r}"

    # -- persistence --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write :data:`ENCODER_WEIGHTS` and :data:`ENCODER_CONFIG` (format version, config,
        fingerprint) into ``directory``, atomically each."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(directory / ENCODER_WEIGHTS, state)
        atomic_write_json_record(
            directory / ENCODER_CONFIG,
            {
                "format_version": ENCODER_FORMAT_VERSION,
                "config": self.config.to_dict(),
                "fingerprint": self.fingerprint,
            },
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RelationEncoder:
        """Read an encoder written by :meth:`save_pretrained`.

        Raises:
            EncoderError: missing or damaged files, another format version, or weights
                whose fingerprint is not the recorded one.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        hint = retrain_hint(directory)
        if not (directory / ENCODER_CONFIG).is_file():
            raise EncoderError(
                f"no relation encoder at {directory} ({ENCODER_CONFIG} missing); {hint}"
            )
        meta = read_json_record(directory / ENCODER_CONFIG, EncoderError, hint)
        if meta.get("format_version") != ENCODER_FORMAT_VERSION:
            raise EncoderError(
                f"{directory / ENCODER_CONFIG}: encoder format "
                f"{meta.get('format_version')!r} is not supported (this hetgraph "
                f"reads {ENCODER_FORMAT_VERSION}); {hint}"
            )
        try:
            encoder = cls(EncoderConfig.from_dict(meta.get("config") or {}))
            state = load_file(str(directory / ENCODER_WEIGHTS))
            encoder.load_state_dict(state)
        except (ConfigError, SafetensorError, RuntimeError, OSError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise EncoderError(f"{directory} holds a damaged encoder ({first}); {hint}") from None
        if encoder.fingerprint != meta.get("fingerprint"):
            raise EncoderError(
                f"{directory / ENCODER_WEIGHTS} does not match the fingerprint "
                f"in {ENCODER_CONFIG} (damaged or replaced); {hint}"
            )
        return encoder.eval()
