r"""Configuration of GNN-LM fusion: where to retrieve, where to fuse, and how."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from hetgraph.configuration import JSONConfigMixin
from hetgraph.fusion.sites import (
    HEAD,
    FusionLayers,
    FusionSite,
    parse_fusion_layers,
    resolve_fusion_sites,
)
from hetgraph.graph.config import GraphConfig
from hetgraph.kg.config import KnowledgeConfig
from hetgraph.limits import check_memory
from hetgraph.nn.config import AdapterConfig

__all__ = ["HEAD", "FusionConfig", "FusionSite"]


@dataclass
class FusionConfig(JSONConfigMixin):
    r"""Where and how a :class:`~hetgraph.HetGraphLM` retrieves and fuses.

    Args:
        fusion_layers: sites whose hidden states receive ``h + g ⊙ adapter(graph)`` (or
            ``adapter(graph)`` itself, see ``fusion_mode``): one item or a list of items,
            each a decoder-layer index (negative allowed), ``"head"``, ``"all"`` (every
            decoder layer, not the head) or a Python slice over the decoder layers
            (``"0:30:4"``, ``"-4:"``, ``"::2"``), e.g. ``"all"`` or ``[-4, -3, -2, -1, "head"]``.
            Kept in the canonical form of :func:`~hetgraph.fusion.sites.parse_fusion_layers`
            (always a tuple; this is what JSON stores, and it re-parses to itself); resolved
            against the model's decoder layers by :meth:`resolved_sites` when a
            :class:`~hetgraph.HetGraphLM` is built (sorted, de-duplicated, ``"head"`` last).
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
        fusion_mode: ``"gated_residual"``: :math:`\mathbf{h} + \mathbf{g} \odot
            \mathrm{adapter}(\mathbf{h})` with the gate starting at zero (an untrained
            adapter changes nothing); ``"replace"``: the adapter's ``ctx`` output replaces
            :math:`\mathbf{h}` (official GNN-LM at the head: ``output_layer(HGT(h))``; the
            gates are then unused).
        neighbour_embedding: what a ``nbr`` node adds to its stored feature:
            ``"own_token"`` the input embedding of the row's own token (hetgraph's variant);
            ``"none"`` nothing (official: the stored feature alone); ``"label"`` the node's
            feature *is* the input embedding of its label, the token that followed the
            row, and no stored feature is read (the official fallback when no feature is
            stored).
        orig_prob_ratio: with a ``"head"`` site, the output distribution is
            ``r·p_LM(h) + (1-r)·p_LM(fused h)`` (the official ``--orig_prob_ratio``, default
            0: off); the logits become float32 log-probabilities.
        gate: ``"static"``: each gated-residual site adds :math:`\mathbf{g} \odot
            \mathrm{adapter}(\cdot)` with one learned vector :math:`\mathbf{g}` (zero at
            initialisation); ``"retrieval"``: the gate of position :math:`t` is
            :math:`\mathbf{g} \odot \sigma(\mathbf{a} \cdot \mathbf{s}_t + b)`, where
            :math:`\mathbf{s}_t` are statistics of the neighbours retrieved for :math:`t`
            (:func:`~hetgraph.fusion.gates.retrieval_statistics`: nearest and mean
            neighbour distance, normalised, and the fraction of the ``k`` neighbours that
            survived the leakage filter) and :math:`\mathbf{a}, b` are learned per site, so
            the adapter can learn to fall back to the base model where the neighbours are
            far (as kNN-LM does with λ = 0). Still exactly the base model at initialisation
            (:math:`\mathbf{g} = 0`). Needs ``fusion_mode="gated_residual"``.
        gradient_checkpointing: recompute the frozen decoder layers' activations in the
            backward pass instead of keeping them (HF activation checkpointing, non-reentrant,
            switched on only while the model is in training mode). Saves memory when a
            fused site lies below the last layer (gradients then flow through frozen layers);
            each site's adapter is checkpointed too (:meth:`FusionEngine.fuse
            <hetgraph.FusionEngine.fuse>`). Retrieval and graphs are not redone, and the
            recomputed adapters get the same dropout masks (RNG state restored), so loss
            and gradients are unchanged.
        neighbours: ``"retrieved"``: each position's ``k`` nearest datastore rows (FAISS);
            ``"random"``: the random-neighbours control, ``k`` rows drawn uniformly from the
            datastore (:mod:`~hetgraph.fusion.random_neighbours`: the same adapter, graph and
            training without the retrieval; the leakage filter still applies). Saved with
            the adapter, so a random-neighbour adapter is evaluated and generates with
            random neighbours; the kNN-LM mixture (``gnn_knn``, ``generate(knn=True)``)
            still uses the retrieved ones. An ``adapter_config.json`` without the field is
            ``"retrieved"``.
        neighbour_seed: the seed of the random neighbours, in ``[0, 2**63)``: a query's
            rows are a function of the seed and its datastore row (training) or its last
            32 tokens (evaluation, generation) only, never of batching or call order.
        kg: the knowledge-graph branch (:class:`~hetgraph.kg.KnowledgeConfig`: facts per
            position, relation priority, ``k2n`` / ``k2k`` edges, entities per mention), or
            ``None`` (default): no ``kg`` nodes, the model of before. The graph itself is
            opened outside (:class:`~hetgraph.kg.KnowledgeSource`, ``--kg DIR``) and given
            to the engine; each adapter then gets a :class:`~hetgraph.nn.KGFactEncoder` and
            gated ``k2c`` messages (zero at initialisation) and runs the edge-list path. An
            ``adapter_config.json`` without the field has none.
    """

    fusion_layers: FusionLayers = (HEAD,)
    k: int = 32
    retrieval_margin: int = 32
    neighbour_features: Literal["key", "stored"] = "key"
    graph: GraphConfig = field(default_factory=GraphConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prefetch: bool | None = None
    knn_lambda: float | None = None
    knn_temperature: float | None = None
    fusion_mode: Literal["gated_residual", "replace"] = "gated_residual"
    neighbour_embedding: Literal["own_token", "none", "label"] = "own_token"
    orig_prob_ratio: float = 0.0
    gate: Literal["static", "retrieval"] = "static"
    gradient_checkpointing: bool = False
    neighbours: Literal["retrieved", "random"] = "retrieved"
    neighbour_seed: int = 0
    kg: KnowledgeConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fusion_layers = parse_fusion_layers(self.fusion_layers)
        if self.gate not in ("static", "retrieval"):
            raise ValueError(f"gate must be 'static' or 'retrieval', got {self.gate!r}")
        if self.gate == "retrieval" and self.fusion_mode == "replace":
            raise ValueError(
                "gate='retrieval' gates a residual: it needs "
                "fusion_mode='gated_residual' (with 'replace' there is no gate)"
            )
        if self.neighbours not in ("retrieved", "random"):
            raise ValueError(f"neighbours must be 'retrieved' or 'random', got {self.neighbours!r}")
        if not 0 <= self.neighbour_seed < 2**63:
            raise ValueError(f"neighbour_seed must be in [0, 2**63), got {self.neighbour_seed}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.kg is not None and self.kg.facts.kg2nbr and self.graph.deduplicate:
            raise ValueError(
                "kg.facts.kg2nbr links facts to window tokens: it needs windows "
                "(graph.deduplicate false)"
            )
        if self.retrieval_margin < 0:
            raise ValueError(f"retrieval_margin must be >= 0, got {self.retrieval_margin}")
        if self.neighbour_features not in ("key", "stored"):
            raise ValueError(
                f"neighbour_features must be 'key' or 'stored', got {self.neighbour_features!r}"
            )
        if self.fusion_mode not in ("gated_residual", "replace"):
            raise ValueError(
                f"fusion_mode must be 'gated_residual' or 'replace', got {self.fusion_mode!r}"
            )
        if self.neighbour_embedding not in ("own_token", "none", "label"):
            raise ValueError(
                "neighbour_embedding must be 'own_token', 'none' or 'label', "
                f"got {self.neighbour_embedding!r}"
            )
        if not 0.0 <= self.orig_prob_ratio < 1.0:
            raise ValueError(f"orig_prob_ratio must be in [0, 1), got {self.orig_prob_ratio}")
        if self.orig_prob_ratio > 0 and HEAD not in self.fusion_layers:
            raise ValueError(
                "orig_prob_ratio mixes LM-head outputs: it needs 'head' in fusion_layers"
            )
        if self.knn_lambda is not None and not 0.0 <= self.knn_lambda <= 1.0:
            raise ValueError(f"knn_lambda must be in [0, 1] or None, got {self.knn_lambda}")
        if self.knn_temperature is not None and not self.knn_temperature > 0:
            raise ValueError(f"knn_temperature must be > 0 or None, got {self.knn_temperature}")
        # One query position alone already needs k windows of left + right + 1 nodes (each
        # with its corpus position and a feature of the adapter's width, at least one float)
        # and k + retrieval_margin neighbours (id and distance): a floor of any batch.
        nodes = self.k * self.graph.window_size
        width = self.adapter.hidden_channels or 1
        check_memory(
            f"the context graph of one position (k {self.k} × (graph.left + "
            f"graph.right + 1) = {nodes:,} neighbour nodes)",
            nodes * (8 + 4 * width) + 12 * (self.k + self.retrieval_margin),
            "lower k, graph.left or graph.right",
        )

    def resolved_sites(self, num_layers: int) -> tuple[FusionSite, ...]:
        """The fused sites for a model with ``num_layers`` decoder layers: ascending layer
        indices, then ``"head"`` (see :func:`~hetgraph.fusion.sites.resolve_fusion_sites`).

        Raises:
            ConfigError: a site outside the model (named ``fusion.fusion_layers``).
        """
        return resolve_fusion_sites(self.fusion_layers, num_layers)

    @classmethod
    def paper(cls, **overrides: Any) -> FusionConfig:
        r"""The official GNN-LM model function (ShannonAI/GNN-LM, ``TokenGraphTransformerDecoder``
        with ``HGT``): the graph network's ``ctx`` output replaces the last hidden state
        before the LM head (``fusion_mode="replace"``); k = 32 with leaking neighbours
        dropped and not replaced (``retrieval_margin=0``); neighbours carry their stored
        feature alone; :meth:`GraphConfig.paper <hetgraph.graph.GraphConfig.paper>`
        (l = r = 1, causal ``c2c``, official clipping and leakage) and
        :meth:`AdapterConfig.paper <hetgraph.nn.AdapterConfig.paper>` (3 layers, 8 heads,
        dropout 0.3 / 0.1, no FFN, official maps, tied ``intra``, output bias, DGL mean,
        official init). Stage 2 of the paper: ``k=128, graph=GraphConfig.paper(left=2,
        right=2)``.

        Args:
            overrides: fields to set instead (``graph`` / ``adapter`` replace the paper's
                whole sub-config; configs or dicts), checked like :meth:`from_dict`.

        Raises:
            ConfigError: an unknown field or a value of the wrong type.
        """
        base = cls(
            fusion_layers=(HEAD,),
            k=32,
            retrieval_margin=0,
            fusion_mode="replace",
            neighbour_embedding="none",
            graph=GraphConfig.paper(),
            adapter=AdapterConfig.paper(),
        )
        return cls.from_dict({**{f.name: getattr(base, f.name) for f in fields(base)}, **overrides})
