"""Configuration of GNN-LM fusion: where to retrieve, where to fuse, and how."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

#: A fusion site: a decoder-layer index (its output is fused) or ``"head"`` (the input of
#: the LM head, i.e. "on top of the last layer" as in the GNN-LM paper).
FusionSite = Union[int, Literal["head"]]
HEAD = "head"


@dataclass
class FusionConfig:
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (the ``fusion`` section of a run config)."""
        data = asdict(self)
        data["fusion_layers"] = list(self.fusion_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FusionConfig":
        """Inverse of :meth:`to_dict`; unknown fields are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FusionConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_json_file(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> "FusionConfig":
        """Read a file written by :meth:`to_json_file`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
