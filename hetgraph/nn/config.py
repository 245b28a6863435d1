r"""Hyper-parameters of the GNN-LM graph adapter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from hetgraph.configuration import JSONConfigMixin
from hetgraph.limits import check_count, check_memory

#: Which implementation :class:`~hetgraph.nn.GraphAdapter` runs: ``"auto"`` (dense where the
#: graph layout allows), ``"dense"`` or ``"sparse"`` (edge lists).
ComputePath = Literal["auto", "dense", "sparse"]
#: How attention is normalised: per relation then averaged (GNN-LM) or jointly (HGTConv).
Normalization = Literal["joint", "per_relation"]
#: The divisor of the ``"per_relation"`` mean: relations that reach the node, or (DGL,
#: official GNN-LM) every relation into its node type that has an edge in the graph.
RelationMean = Literal["reached", "all"]
#: Initialisation of the relation matrices: glorot per ``[H, d, d]`` or the official
#: GNN-LM xavier on the stacked ``[R, H, d, d]``.
RelationInit = Literal["glorot", "official"]
#: Input / output maps of the adapter: always a Linear (hetgraph), or the official GNN-LM
#: maps (input: Linear + GELU only when the width differs from the hidden width; output:
#: Linear only when hidden differs from out).
MapKind = Literal["linear", "official"]
#: How a fact's head, relation and tail KGE embeddings combine (see
#: :class:`~hetgraph.nn.KGFactEncoder`).
KGCombine = Literal["concat", "sum"]
#: Initial LayerNorm gain: a number, or ``"keys"`` (resolved from the datastore's keys by
#: the :class:`~hetgraph.FusionEngine`, see :attr:`AdapterConfig.norm_init`).
NormInit = float | Literal["keys"]
#: The channel widths of an :class:`AdapterConfig` (``None`` until resolved).
_WIDTHS = ("ctx_channels", "nbr_channels", "hidden_channels", "out_channels")
#: Most graph layers an adapter may stack (GNN-LM: 3). Each layer is a few dozen modules:
#: millions of them take unbounded time and memory to build even when narrow.
MAX_ADAPTER_LAYERS = 1024
#: Most attention heads (each at least one channel wide) and the largest feed-forward
#: multiplier: bounds that hold before the widths are known (GNN-LM: 8 heads; 2 or 4).
MAX_ADAPTER_HEADS = 1024
MAX_FF_MULTIPLIER = 64


@dataclass
class AdapterConfig(JSONConfigMixin):
    r"""Hyper-parameters of :class:`GraphAdapter` (JSON-serialisable).

    Inside a :class:`~hetgraph.FusionConfig` the channel widths are usually left ``None``:
    :class:`~hetgraph.HetGraphLM` fills them per fused site with :meth:`resolved`. A
    :class:`GraphAdapter` needs them all set (:meth:`validate_resolved`).

    Args:
        ctx_channels: Width of the ``ctx`` input features (the LM hidden size).
            ``None``: taken from the model by HetGraphLM.
        nbr_channels: Width of the stored ``nbr`` features.
            ``None``: taken from the datastore by HetGraphLM.
        hidden_channels: Width of the graph layers (``None``: ``ctx_channels``).
        out_channels: Width of the ``ctx`` output (``None``: ``ctx_channels``).
        token_channels: Width of the token embeddings added to ``nbr`` nodes
            (``0``: no token embedding). HetGraphLM sets it to the model's embedding width.
        num_layers: Number of :class:`HeteroGraphAttention` layers.
        heads: Attention heads.
        dropout: Dropout on layer updates and the feed-forward block.
        attn_dropout: Dropout on attention coefficients.
        normalization: ``"per_relation"`` (official GNN-LM) or ``"joint"`` (HGTConv).
        feed_forward: Add a position-wise feed-forward block after each layer.
        ff_multiplier: Hidden width of that block, in multiples of ``hidden_channels``.
        use_c2c: Give the layers the causal ``ctx -> ctx`` relation. HetGraphLM sets it
            from :attr:`GraphConfig.c2c <hetgraph.graph.GraphConfig.c2c>`.
        path: ``"auto"`` (dense where the graph layout allows), ``"dense"`` or ``"sparse"``.
        input_maps: ``"linear"``: a Linear per node type; ``"official"``: Linear + GELU
            (GNN-LM's ``adapt_ws``) only for a type whose width differs from
            ``hidden_channels``, else the identity.
        output_map: ``"linear"``: a Linear; ``"official"``: a Linear only when
            ``hidden_channels != out_channels``, else the identity.
        output_bias: Give each layer's :math:`\mathbf{W}_o` a bias (official: yes).
        relation_mean: Divisor of the ``"per_relation"`` mean, ``"reached"`` or ``"all"``
            (official, DGL), see :class:`~hetgraph.nn.HeteroGraphAttention`.
        tie_intra: ``n2n`` and ``c2c`` share :math:`W_{att}`, :math:`W_{msg}` and
            :math:`\mu` (the official ``intra`` relation; ``n2c`` is ``inter``).
        relation_init: ``"glorot"`` or ``"official"`` (see
            :func:`~hetgraph.nn.relations.init_relation_parameters`).
        kg_channels: Width of the ``kg`` nodes' raw fact features (the combined KGE
            embeddings, :func:`~hetgraph.nn.kg.fact_feature_channels`); ``0`` (default):
            no knowledge-graph branch, the adapter of before. With a branch the adapter
            has a :class:`~hetgraph.nn.KGFactEncoder` (``kg_in``), the ``kg`` node type
            and the ``k2c`` relation, whose messages into ``ctx`` pass a gate initialised
            to zero, and it always runs the edge-list path.
        kg_combine: ``"concat"`` or ``"sum"`` of head, relation and tail embeddings.
        use_k2n: Also the ``(kg, k2n, nbr)`` relation (gated like ``k2c``).
        use_k2k: Also the ``(kg, k2k, kg)`` relation.
        use_n2c: Take messages from the retrieved neighbours (the ``n2c`` relation;
            default). ``False`` needs a knowledge-graph branch: the adapter then reads the
            knowledge graph alone, with no corpus neighbour reaching a query (the "KG
            alone" control; retrieval still runs for kNN-LM). Without ``use_k2n`` it has no
            ``nbr`` node type at all.
        norm_init: Initial gain of every LayerNorm of the layers and feed-forward blocks
            (PyTorch's and the paper's: ``1.0``). ``"keys"``: the mean per-row standard
            deviation of the datastore's keys (:meth:`~hetgraph.Datastore.key_scale`),
            filled in by the :class:`~hetgraph.FusionEngine`. Our option, not the paper's:
            an untrained ``fusion_mode="replace"`` adapter at the head outputs about
            :math:`\mathrm{LayerNorm}(\mathbf{h})`, unit-variance states, while the LM head
            was trained on the final norm's output (SmolLM2: a gain of rms 1.8, rows of std
            2.2), so step 0 starts far from the base model; ``"keys"`` hands the head states
            of the scale it expects.

    :meth:`paper` gives the official GNN-LM model function.
    """

    ctx_channels: int | None = None
    nbr_channels: int | None = None
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
    input_maps: MapKind = "linear"
    output_map: MapKind = "linear"
    output_bias: bool = False
    relation_mean: RelationMean = "reached"
    tie_intra: bool = False
    relation_init: RelationInit = "glorot"
    kg_channels: int = 0
    kg_combine: KGCombine = "concat"
    use_k2n: bool = False
    use_k2k: bool = False
    use_n2c: bool = True
    norm_init: NormInit = 1.0

    @classmethod
    def paper(cls, **overrides: Any) -> AdapterConfig:
        r"""The official GNN-LM graph network (``fairseq/models/hgt.py`` ``HGT``): 3 layers,
        8 heads, dropout 0.3 / 0.1, per-relation softmax with DGL's mean, no feed-forward
        block, official input / output maps, output bias, tied ``intra`` relation, official
        initialisation, ``c2c`` on. ``overrides`` set other fields (checked like
        :meth:`from_dict`)."""
        base = {
            "num_layers": 3,
            "heads": 8,
            "dropout": 0.3,
            "attn_dropout": 0.1,
            "normalization": "per_relation",
            "feed_forward": False,
            "use_c2c": True,
            "input_maps": "official",
            "output_map": "official",
            "output_bias": True,
            "relation_mean": "all",
            "tie_intra": True,
            "relation_init": "official",
        }
        return cls.from_dict({**base, **overrides})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctx_channels is not None:
            if self.hidden_channels is None:
                self.hidden_channels = self.ctx_channels
            if self.out_channels is None:
                self.out_channels = self.ctx_channels
        for name in _WIDTHS:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        for name in ("num_layers", "heads", "ff_multiplier"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_count(
            "num_layers",
            self.num_layers,
            MAX_ADAPTER_LAYERS,
            "GNN-LM uses 3 graph layers",
            minimum=1,
        )
        check_count(
            "heads",
            self.heads,
            MAX_ADAPTER_HEADS,
            "use a few heads that divide hidden_channels (GNN-LM: 8)",
            minimum=1,
        )
        check_count(
            "ff_multiplier",
            self.ff_multiplier,
            MAX_FF_MULTIPLIER,
            "the feed-forward block is usually 2 or 4 times hidden_channels",
            minimum=1,
        )
        if self.token_channels < 0:
            raise ValueError(f"token_channels must be >= 0, got {self.token_channels}")
        if self.kg_channels < 0:
            raise ValueError(f"kg_channels must be >= 0, got {self.kg_channels}")
        if self.kg_channels == 0 and (self.use_k2n or self.use_k2k):
            raise ValueError("use_k2n / use_k2k need a knowledge-graph branch (kg_channels > 0)")
        if self.norm_init != "keys" and not (
            isinstance(self.norm_init, (int, float)) and 0.0 < self.norm_init < float("inf")
        ):
            raise ValueError(
                f"norm_init must be a positive number or 'keys', got {self.norm_init!r}"
            )
        if self.hidden_channels is not None and self.hidden_channels % self.heads != 0:
            raise ValueError(
                f"hidden_channels ({self.hidden_channels}) must be divisible "
                f"by heads ({self.heads})"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.normalization not in ("joint", "per_relation"):
            raise ValueError(
                f"normalization must be 'joint' or 'per_relation' (got {self.normalization!r})"
            )
        for name, allowed in (
            ("input_maps", ("linear", "official")),
            ("output_map", ("linear", "official")),
            ("relation_mean", ("reached", "all")),
            ("relation_init", ("glorot", "official")),
            ("kg_combine", ("concat", "sum")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed} (got {getattr(self, name)!r})")
        if self.path not in ("auto", "dense", "sparse"):
            raise ValueError(f"path must be 'auto', 'dense' or 'sparse' (got {self.path!r})")
        if self.hidden_channels is not None:  # else checked once resolved() sets it
            params = self.parameter_count()
            check_memory(
                f"an adapter of about {params:,} float32 parameters (hidden_channels "
                f"{self.hidden_channels}, num_layers {self.num_layers}, ff_multiplier "
                f"{self.ff_multiplier})",
                4 * params,
                "lower hidden_channels, num_layers, ff_multiplier or the other widths",
            )

    def parameter_count(self) -> int:
        r"""The parameters of a :class:`GraphAdapter` with this config, estimated before one is
        built (exact for the default maps; widths still ``None`` count as
        ``hidden_channels``). Needs ``hidden_channels``.

        Raises:
            ValueError: ``hidden_channels`` is not set.
        """
        h = self.hidden_channels
        if h is None:
            raise ValueError("AdapterConfig.parameter_count needs hidden_channels")
        # Node types ctx and nbr; relations n2n, n2c and c2c (tie_intra: n2n and c2c share).
        types = 2
        relations = 3 if self.use_c2c and not self.tie_intra else 2
        nbr_type = self.use_n2c or bool(self.kg_channels and self.use_k2n)
        if not self.use_n2c:  # no n2c; no nbr type (nor n2n) unless k2n reaches it
            types -= 0 if nbr_type else 1
            relations -= 1 if nbr_type else 2
        gates = 0
        if self.kg_channels:
            # The kg type; k2c (+ k2n, k2k); a [h] gate per relation into ctx / nbr.
            types += 1
            relations += 1 + self.use_k2n + self.use_k2k
            gates = (1 + self.use_k2n) * h
        # Per type: q/k/v and W_o (bias optional) and a LayerNorm; per relation: two [H, D, D]
        # matrices and H priors.
        layer = types * (4 * h * h + 3 * h + (h if self.output_bias else 0) + 2 * h) + relations * (
            2 * h * h // self.heads + self.heads
        )
        layer += gates
        if self.feed_forward:
            ff = self.ff_multiplier * h
            layer += types * (2 * h * ff + ff + 3 * h)
        widths = [self.ctx_channels or h] + ([self.nbr_channels or h] if nbr_type else [])
        maps = sum(w * h + h for w in widths) + (self.token_channels * h if nbr_type else 0)
        maps += (self.out_channels or h) * (h + 1)
        maps += self.kg_channels * h + h if self.kg_channels else 0
        return self.num_layers * layer + maps

    def resolved(
        self,
        *,
        ctx_channels: int,
        nbr_channels: int,
        out_channels: int | None = None,
        token_channels: int | None = None,
        use_c2c: bool | None = None,
        kg_channels: int | None = None,
        use_k2n: bool | None = None,
        use_k2k: bool | None = None,
        norm_init: float | None = None,
    ) -> AdapterConfig:
        r"""A validated copy with the widths of one fused site filled in (this one is unchanged).

        ``hidden_channels`` keeps its value when set (else ``ctx_channels``); ``token_channels``
        and ``use_c2c`` (and the knowledge-graph fields) take the given values; widths this
        config already sets must agree.

        Args:
            ctx_channels: width of the hidden states at the fused site.
            nbr_channels: width of the neighbour features at that site.
            out_channels: width of the adapter output (``None``: this config's, else
                ``ctx_channels``).
            token_channels: token-embedding width (``None``: this config's).
            use_c2c: whether graphs have the causal ``ctx -> ctx`` relation (``None``: this
                config's).
            kg_channels, use_k2n, use_k2k: the knowledge-graph branch (``None``: this
                config's): the width of the fact features
                (:func:`~hetgraph.nn.fact_feature_channels` of the KGE tables) and
                :attr:`KGGraphConfig.kg2nbr <hetgraph.graph.KGGraphConfig.kg2nbr>` /
                ``kg2kg``.
            norm_init: the LayerNorm gain that ``norm_init="keys"`` stands for (``None``:
                this config's).

        Raises:
            ValueError: a width set in this config differs from the given one.
        """
        given = {
            "ctx_channels": ctx_channels,
            "nbr_channels": nbr_channels,
            "out_channels": out_channels,
        }
        for name, value in given.items():
            own = getattr(self, name)
            if value is not None and own is not None and own != value:
                raise ValueError(
                    f"AdapterConfig.{name} is {own} but the model / datastore "
                    f"give {value}: leave {name} unset (None) to take it from them"
                )
        changes: dict[str, Any] = {"ctx_channels": ctx_channels, "nbr_channels": nbr_channels}
        for name, value in (
            ("out_channels", out_channels),
            ("token_channels", token_channels),
            ("use_c2c", use_c2c),
            ("kg_channels", kg_channels),
            ("use_k2n", use_k2n),
            ("use_k2k", use_k2k),
            ("norm_init", norm_init),
        ):
            if value is not None:
                changes[name] = value
        return replace(self, **changes)

    def validate_resolved(self) -> None:
        r"""Check that every channel width is set, as a :class:`GraphAdapter` needs.

        Raises:
            ValueError: some width is still ``None`` (named, with how to fill it).
        """
        missing = [name for name in _WIDTHS if getattr(self, name) is None]
        if not self.use_n2c and not self.kg_channels:
            raise ValueError(
                "AdapterConfig.use_n2c=False leaves the adapter only the knowledge graph: "
                "give it one (--kg DIR) or keep use_n2c=True"
            )
        if self.norm_init == "keys":
            raise ValueError(
                "AdapterConfig.norm_init='keys' is not resolved: a GraphAdapter needs the gain "
                "itself; FusionEngine fills it from the datastore's keys, or pass "
                "resolved(norm_init=…)"
            )
        if missing:
            raise ValueError(
                f"AdapterConfig {', '.join(missing)} not set: a GraphAdapter "
                "needs every channel width; set them or use AdapterConfig.resolved("
                "ctx_channels=…, nbr_channels=…) (HetGraphLM does this from the "
                "model and the datastore)"
            )
