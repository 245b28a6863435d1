"""Hyper-parameters of the GNN-LM graph adapter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hetgraph.configuration import JSONConfigMixin

#: Which implementation :class:`~hetgraph.nn.GraphAdapter` runs: ``"auto"`` (dense where the
#: graph layout allows), ``"dense"`` or ``"sparse"`` (edge lists).
ComputePath = Literal["auto", "dense", "sparse"]
#: How attention is normalised: per relation then averaged (GNN-LM) or jointly (HGTConv).
Normalization = Literal["joint", "per_relation"]


@dataclass
class AdapterConfig(JSONConfigMixin):
    """Hyper-parameters of :class:`GraphAdapter` (JSON-serialisable).

    Args:
        ctx_channels: Width of the ``ctx`` input features (the LM hidden size).
        nbr_channels: Width of the stored ``nbr`` features.
        hidden_channels: Width of the graph layers (``None``: ``ctx_channels``).
        out_channels: Width of the ``ctx`` output (``None``: ``ctx_channels``).
        token_channels: Width of the token embeddings added to ``nbr`` nodes
            (``0``: no token embedding).
        num_layers: Number of :class:`HeteroGraphAttention` layers.
        heads: Attention heads.
        dropout: Dropout on layer updates and the feed-forward block.
        attn_dropout: Dropout on attention coefficients.
        normalization: ``"per_relation"`` (official GNN-LM) or ``"joint"`` (HGTConv).
        feed_forward: Add a position-wise feed-forward block after each layer.
        ff_multiplier: Hidden width of that block, in multiples of ``hidden_channels``.
        use_c2c: Give the layers the causal ``ctx -> ctx`` relation.
        path: ``"auto"`` (dense where the graph layout allows), ``"dense"`` or ``"sparse"``.
    """

    ctx_channels: int
    nbr_channels: int
    hidden_channels: int | None = None
    out_channels: int | None = None
    token_channels: int = 0
    num_layers: int = 3
    heads: int = 8
    dropout: float = 0.3
    attn_dropout: float = 0.1
    normalization: Normalization = "per_relation"
    feed_forward: bool = True
    ff_multiplier: int = 2
    use_c2c: bool = False
    path: ComputePath = "auto"

    def __post_init__(self) -> None:
        if self.hidden_channels is None:
            self.hidden_channels = self.ctx_channels
        if self.out_channels is None:
            self.out_channels = self.ctx_channels
        if self.hidden_channels % self.heads != 0:
            raise ValueError(f"hidden_channels ({self.hidden_channels}) must be divisible by heads ({self.heads})")
        if self.path not in ("auto", "dense", "sparse"):
            raise ValueError(f"path must be 'auto', 'dense' or 'sparse' (got {self.path!r})")
        if self.num_layers < 1:
            raise ValueError("num_layers must be >= 1")
