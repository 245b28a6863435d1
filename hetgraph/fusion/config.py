"""Configuration of GNN-LM fusion: where to retrieve, where to fuse, and how."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from hetgraph.configuration import JSONConfigMixin

#: A fusion site: a decoder-layer index (its output is fused) or ``"head"`` (the input of
#: the LM head, i.e. "on top of the last layer" as in the GNN-LM paper).
FusionSite = Union[int, Literal["head"]]
HEAD = "head"


@dataclass
class FusionConfig(JSONConfigMixin):
    """Where and how a :class:`~hetgraph.HetGraphLM` retrieves and fuses.

    Args:
        fusion_layers: sites whose hidden states receive ``h + g ⊙ adapter(graph)``:
            decoder-layer indices (negative allowed) and/or ``"head"``.
        k: neighbours retrieved per position.
        retrieval_margin: extra neighbours retrieved when a leakage filter may drop some
            (training on text that is itself in the datastore); the first ``k`` kept ones are used.
        neighbour_features: ``"key"`` feeds the stored datastore key of each neighbour
            token to every adapter (each adapter's input projection is the learned per-layer
            map); ``"stored"`` uses per-layer features stored in the datastore
            (``DatastoreConfig.feature_layers``), the key at the retrieval site.
        graph: keyword arguments of :class:`~hetgraph.graph.GraphConfig`.
        adapter: keyword arguments of :class:`~hetgraph.nn.AdapterConfig` other than the
            channel widths, which are taken from the model and the datastore.
        prefetch: ``None`` decides automatically (a no-grad prefetch pass only when a fused
            site comes before the retrieval site); ``True`` always prefetches.
        knn_lambda, knn_temperature: kNN-LM interpolation used by ``generate`` and by the
            ``gnn_knn`` evaluation when set (tuned on the valid split by ``hetgraph eval``).
    """

    fusion_layers: tuple[FusionSite, ...] = (HEAD,)
    k: int = 32
    retrieval_margin: int = 32
    neighbour_features: Literal["key", "stored"] = "key"
    graph: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    prefetch: bool | None = None
    knn_lambda: float | None = None
    knn_temperature: float | None = None

    def __post_init__(self) -> None:
        self.fusion_layers = tuple(
            site if site == HEAD else int(site) for site in self.fusion_layers
        )
        if not self.fusion_layers:
            raise ValueError("fusion_layers is empty: give at least one decoder-layer index or 'head'")
        for site in self.fusion_layers:
            if not (site == HEAD or isinstance(site, int)):
                raise ValueError(f"fusion site {site!r} is neither a decoder-layer index nor 'head'")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.neighbour_features not in ("key", "stored"):
            raise ValueError(f"neighbour_features must be 'key' or 'stored', got {self.neighbour_features!r}")

    @classmethod
    def paper(cls, **overrides: Any) -> "FusionConfig":
        """The GNN-LM paper's configuration: 3 graph layers on top of the last decoder layer,
        with ``c2c`` context edges, k = 32, l = r = 1, 8 heads, dropout 0.3 / 0.1."""
        base = cls(
            fusion_layers=(HEAD,), k=32,
            graph=dict(left=1, right=1, c2c=True),
            adapter=dict(num_layers=3, heads=8, dropout=0.3, attn_dropout=0.1,
                         hidden_channels=None),
        )
        for key, value in overrides.items():
            setattr(base, key, value)
        base.__post_init__()
        return base

