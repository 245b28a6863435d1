r"""Configuration of GNN-LM fusion: where to retrieve, where to fuse, and how."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from hetgraph.configuration import JSONConfigMixin
from hetgraph.graph.config import GraphConfig
from hetgraph.nn.config import AdapterConfig

#: A fusion site: a decoder-layer index (its output is fused) or ``"head"`` (the input of
#: the LM head, i.e. "on top of the last layer" as in the GNN-LM paper).
FusionSite = int | Literal["head"]
HEAD = "head"


@dataclass
class FusionConfig(JSONConfigMixin):
    r"""Where and how a :class:`~hetgraph.HetGraphLM` retrieves and fuses.

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
        graph: how context graphs are built (a dict of its fields is accepted too).
        adapter: the graph adapter of every fused site (a dict of its fields is accepted
            too). Its channel widths are normally left ``None``: HetGraphLM takes them from
            the model and the datastore (:meth:`AdapterConfig.resolved
            <hetgraph.nn.AdapterConfig.resolved>`), and sets ``token_channels`` and
            ``use_c2c`` (from ``graph.c2c``) itself.
        prefetch: ``None`` decides automatically (a no-grad prefetch pass only when a fused
            site comes before the retrieval site); ``True`` always prefetches.
        knn_lambda, knn_temperature: kNN-LM interpolation used by ``generate`` and by the
            ``gnn_knn`` evaluation when set (tuned on the valid split by ``hetgraph eval``).
    """

    fusion_layers: tuple[FusionSite, ...] = (HEAD,)
    k: int = 32
    retrieval_margin: int = 32
    neighbour_features: Literal["key", "stored"] = "key"
    graph: GraphConfig = field(default_factory=GraphConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prefetch: bool | None = None
    knn_lambda: float | None = None
    knn_temperature: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fusion_layers = tuple(
            site if site == HEAD else int(site) for site in self.fusion_layers
        )
        if not self.fusion_layers:
            raise ValueError("fusion_layers is empty: give at least one decoder-layer index "
                             "or 'head'")
        for site in self.fusion_layers:
            if not (site == HEAD or isinstance(site, int)):
                raise ValueError(f"fusion site {site!r} is neither a decoder-layer index "
                                 "nor 'head'")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.retrieval_margin < 0:
            raise ValueError(f"retrieval_margin must be >= 0, got {self.retrieval_margin}")
        if self.neighbour_features not in ("key", "stored"):
            raise ValueError("neighbour_features must be 'key' or 'stored', "
                             f"got {self.neighbour_features!r}")
        if self.knn_lambda is not None and not 0.0 <= self.knn_lambda <= 1.0:
            raise ValueError(f"knn_lambda must be in [0, 1] or None, got {self.knn_lambda}")
        if self.knn_temperature is not None and not self.knn_temperature > 0:
            raise ValueError(f"knn_temperature must be > 0 or None, got {self.knn_temperature}")

    @classmethod
    def paper(cls, **overrides: Any) -> FusionConfig:
        r"""The GNN-LM paper's configuration: 3 graph layers on top of the last decoder layer,
        with ``c2c`` context edges, k = 32, l = r = 1, 8 heads, dropout 0.3 / 0.1.

        Args:
            overrides: fields to set instead (``graph`` / ``adapter`` replace the paper's
                whole sub-config; configs or dicts), checked like :meth:`from_dict`.

        Raises:
            ConfigError: an unknown field or a value of the wrong type.
        """
        base = cls(
            fusion_layers=(HEAD,), k=32,
            graph=GraphConfig(left=1, right=1, c2c=True),
            adapter=AdapterConfig(num_layers=3, heads=8, dropout=0.3, attn_dropout=0.1),
        )
        return cls.from_dict({**{f.name: getattr(base, f.name) for f in fields(base)}, **overrides})
