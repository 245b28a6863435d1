r"""The fusion engine: retrieval, graph and graph adapters, without the base model.

:class:`FusionEngine` owns everything GNN-LM adds to a frozen causal LM: the
:class:`~hetgraph.fusion.retrieval.Retriever` over the datastore's FAISS index, the
:class:`~hetgraph.fusion.graph_inputs.GraphInputBuilder`, one
:class:`~hetgraph.nn.GraphAdapter` and one gate per fused site (and the retrieval gates), and
the one :class:`~hetgraph.graph.CorpusTable` over the datastore's memmaps that the retriever
and the graph builder share. It never holds the base model: it is built from the datastore,
the index, the :class:`~hetgraph.FusionConfig` and the model's :class:`ModelGeometry` (widths
and number of decoder layers). Its steps are stateless:

.. code-block:: text

    queries ─retrieve─▶ Retrieval ─build_graph─▶ ContextGraph ─fuse(site)─▶ fused hidden
    logits + Retrieval ─knn_mixture_logits─▶ kNN-LM log-probabilities

A step that needs a piece of the base model takes it as an argument: the token embedding
(``neighbour_embedding="own_token"`` / ``"label"``) and, for :meth:`logits_from_datastore`,
the LM head. :class:`~hetgraph.fusion.hooks.FusionHooks` calls these steps from forward hooks
on the base model; :class:`~hetgraph.HetGraphLM` is the thin shell that joins the two. A
knowledge graph (``knowledge=``, :class:`~hetgraph.kg.KnowledgeSource`) adds ``kg`` nodes to
each call's graph from the call's token ids (the edge-list path; ``NeighbourStates`` refused).

At every fused site ``i``

.. math::
    \mathbf{h}_i \leftarrow
    \mathbf{h}_i + \mathbf{g}_i \odot \mathrm{Adapter}_i(\mathcal{G})_{\mathrm{ctx}}

with the gate :math:`\mathbf{g}_i` initialised to zero, so an untrained engine leaves the
base model's logits exactly unchanged (``gate="retrieval"`` multiplies by
:math:`\sigma(\mathbf{a}_i \cdot \mathbf{s} + b_i)`, :mod:`hetgraph.fusion.gates`; with
``fusion_mode="replace"``, the official GNN-LM, the adapter's output replaces
:math:`\mathbf{h}_i`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hetgraph.datastore import Datastore
from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.context import CallOptions, KNNMixture, Retrieval
from hetgraph.fusion.gates import RetrievalGate, retrieval_statistics
from hetgraph.fusion.graph_inputs import GraphInputBuilder
from hetgraph.fusion.persistence import ADAPTER_PREFIXES, AdapterMismatchError
from hetgraph.fusion.retrieval import Retriever
from hetgraph.fusion.sites import describe_sites, site_key
from hetgraph.graph import ContextGraph, CorpusTable
from hetgraph.graph.corpus import gather_rows
from hetgraph.index import DatastoreIndex
from hetgraph.kg.errors import KnowledgeGraphError
from hetgraph.knnlm import interpolate_log_probs, knn_log_probs
from hetgraph.models.layers import num_decoder_layers
from hetgraph.nn import GraphAdapter

if TYPE_CHECKING:
    from hetgraph.fusion.neighbour_states import NeighbourStates
    from hetgraph.kg.source import KnowledgeSource


@dataclass(frozen=True)
class ModelGeometry:
    """What the fusion engine needs to know of the base model: its widths and depth.

    Attributes:
        hidden_size: width of the hidden states (the fused sites' and the keys').
        token_embedding_size: width of the token embedding (``neighbour_embedding`` of
            ``"own_token"`` / ``"label"``).
        num_layers: number of decoder layers (fusion sites and the retrieval site resolve
            against it).
    """

    hidden_size: int
    token_embedding_size: int
    num_layers: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelGeometry:
        """The geometry of a Hugging Face causal LM."""
        return cls(
            hidden_size=int(model.config.hidden_size),
            token_embedding_size=int(model.get_input_embeddings().embedding_dim),
            num_layers=num_decoder_layers(model),
        )


def _retrieval_site(key_layer: int | None, num_layers: int) -> FusionSite:
    if key_layer is None:
        return HEAD
    if not -num_layers <= key_layer < num_layers:
        raise ValueError(
            f"layer {key_layer} is out of range for a model with {num_layers} decoder layers "
            f"(valid: {-num_layers} … {num_layers - 1})"
        )
    return key_layer % num_layers


def _bind_knowledge(
    config: FusionConfig, knowledge: KnowledgeSource | None
) -> tuple[FusionConfig, KnowledgeSource | None]:
    """``config`` and ``knowledge`` made to agree (``config.kg`` wins; unset, the source's)."""
    if knowledge is None:
        if config.kg is not None:
            raise KnowledgeGraphError(
                "this fusion config fuses a knowledge graph (fusion.kg is set) but none was "
                "given: pass knowledge=KnowledgeSource.open(DIR, tokenizer) (CLI: --kg DIR)"
            )
        return config, None
    if config.kg is None:
        config = replace(config, kg=knowledge.config)
    return config, knowledge.bind(config.kg)


class FusionEngine(nn.Module):
    r"""Retriever, graph builder, graph adapters and gates of GNN-LM fusion (see the module
    docstring); the base model is never held.

    Its parameters are the adapters, gates and retrieval gates only; ``state_dict()`` keys
    are those of a saved adapter (``adapters.<site>.…``, ``gates.<site>``,
    ``retrieval_gates.<site>.…``). The datastore's arrays stay memory maps on disk (read at
    the rows each batch retrieved) and the FAISS index stays on the CPU: ``.to(device)``
    moves the adapters and gates only.

    Args:
        datastore: the corpus datastore built with the base model.
        index: the FAISS index over the datastore's keys.
        config: fusion sites, k, graph and adapter settings.
        geometry: the base model's widths and depth (:meth:`ModelGeometry.of`).
        knowledge: a knowledge graph to fuse (:class:`~hetgraph.kg.KnowledgeSource`), bound
            to ``config.kg`` (unset: the source's settings); its KGE tables go into every
            adapter's fact encoder (never saved), each call's facts into its graph.

    Raises:
        AdapterMismatchError: the datastore's keys are not of the model's hidden width.
        KnowledgeGraphError: ``config.kg`` is set but no ``knowledge`` is given.

    Example::

        engine = FusionEngine(store, index, FusionConfig(), ModelGeometry.of(model))
        retrieval = engine.retrieve(queries)                    # [B, T, d] query states
        graph = engine.build_graph(retrieval, queries.shape[1])
        fused = engine.fuse("head", queries, graph, embedding=model.get_input_embeddings())
    """

    def __init__(
        self,
        datastore: Datastore,
        index: DatastoreIndex,
        config: FusionConfig | None = None,
        geometry: ModelGeometry | None = None,
        *,
        knowledge: KnowledgeSource | None = None,
    ) -> None:
        super().__init__()
        if geometry is None:
            raise TypeError("FusionEngine needs the base model's geometry (ModelGeometry.of)")
        config, knowledge = _bind_knowledge(config or FusionConfig(), knowledge)
        self.config = config
        #: The knowledge graph fused as ``kg`` nodes (:class:`~hetgraph.kg.KnowledgeSource`),
        #: or ``None``.
        self.knowledge = knowledge
        self.geometry = geometry
        self.datastore = datastore
        width = geometry.hidden_size
        if datastore.dim != width and datastore.key_layer is None:
            raise AdapterMismatchError(
                f"datastore keys have width {datastore.dim} "
                f"but the model's hidden size is {width}: "
                "build the datastore with this model (hetgraph datastore build --model …)"
            )
        #: The datastore's token, document and next-token columns (its memmaps), shared.
        self.corpus = CorpusTable.of(datastore)
        self.retriever = Retriever(datastore, index, self.corpus)
        self.retrieval_site: FusionSite = _retrieval_site(datastore.key_layer, geometry.num_layers)
        self.fusion_sites: tuple[FusionSite, ...] = config.resolved_sites(geometry.num_layers)
        embedding = config.neighbour_embedding
        self.graph_inputs = GraphInputBuilder(
            datastore,
            config.graph,
            config.neighbour_features,
            self.retrieval_site,
            neighbour_embedding=embedding,
            corpus=self.corpus,
        )
        self.adapters = nn.ModuleDict()
        self.gates = nn.ParameterDict()
        self.retrieval_gates = nn.ModuleDict()  # per-site RetrievalGate (gate="retrieval")
        token_width = geometry.token_embedding_size
        norm_init = datastore.key_scale() if config.adapter.norm_init == "keys" else None
        for site in self.fusion_sites:
            adapter_config = config.adapter.resolved(
                norm_init=norm_init,
                ctx_channels=width,
                nbr_channels=(
                    token_width if embedding == "label" else self.graph_inputs.feature_width(site)
                ),
                out_channels=width,
                token_channels=token_width if embedding == "own_token" else 0,
                use_c2c=config.graph.c2c,
                **self._kg_channels(),
            )
            adapter = GraphAdapter(adapter_config)
            if knowledge is not None and adapter.kg_in is not None:
                # Non-persistent buffers: the tables stay out of the saved adapter.
                adapter.kg_in.set_embeddings(knowledge.entity, knowledge.relation)
            self.adapters[site_key(site)] = adapter
            self.gates[site_key(site)] = nn.Parameter(torch.zeros(width))
            if config.gate == "retrieval":
                self.retrieval_gates[site_key(site)] = RetrievalGate()
        self.eval()  # like a loaded HF model: dropout off until train() is called

    def _kg_channels(self) -> dict[str, int | bool]:
        """The knowledge-graph fields of each site's adapter config (none without one)."""
        if self.knowledge is None:
            return {}
        facts = self.knowledge.config.facts
        return {
            "kg_channels": self.knowledge.feature_channels(self.config.adapter.kg_combine),
            "use_k2n": facts.kg2nbr,
            "use_k2k": facts.kg2kg,
        }

    # ---------------------------------------------------------------- site facts
    @property
    def graph_config(self):
        """The :class:`~hetgraph.graph.GraphConfig` graphs are built with."""
        return self.config.graph

    @property
    def index(self) -> DatastoreIndex:
        """The FAISS index searched for neighbours."""
        return self.retriever.index

    @property
    def fuses_positions_independently(self) -> bool:
        """Whether HF's ``logits_to_keep`` leaves the kept logits unchanged while it limits
        the head's retrieval and graph to the kept positions: no fused head, or no ``c2c``."""
        return HEAD not in self.fusion_sites or not self.graph_config.c2c

    @property
    def needs_prefetch(self) -> bool:
        """True when some fused site runs before the retrieval site (or ``prefetch`` is set),
        so a no-grad prefetch pass must supply the queries first."""
        order = lambda site: math.inf if site == HEAD else int(site)  # noqa: E731
        return bool(self.config.prefetch) or any(
            order(s) < order(self.retrieval_site) for s in self.fusion_sites
        )

    @property
    def can_run_from_datastore(self) -> bool:
        """True when logits at datastore rows need no base-model pass
        (:meth:`logits_from_datastore`): retrieval and every fused site are the LM-head
        input (whose states the datastore stores as keys)."""
        return (
            self.retrieval_site == HEAD
            and set(self.fusion_sites) == {HEAD}
            and not self.config.prefetch
        )

    def adapter_at(self, site: FusionSite) -> GraphAdapter:
        """The graph adapter fused at ``site`` (``"head"`` or a decoder-layer index)."""
        return self.adapters[site_key(site)]  # type: ignore[return-value]

    # ------------------------------------------------------------------ steps
    def retrieve(
        self,
        queries: Tensor,
        options: CallOptions | None = None,
        *,
        tokens: Tensor | None = None,
        neighbours: str | None = None,
    ) -> Retrieval:
        """The ``k`` nearest datastore rows of ``[B, T, d]`` query states (``neighbours=
        "random"``: ``k`` rows drawn uniformly, :meth:`~hetgraph.Retriever.random`). With
        ``options.query_positions`` (text that is itself in the datastore), neighbours
        within ``graph.leakage_radius`` of each query's own row (same document unless
        ``graph.leakage_scope="corpus"``) are dropped; ``retrieval_margin`` extra candidates
        refill them (``0``: not refilled, as officially). ``tokens``: ``[B, T' >= T]`` ids
        ending at the queries (``-1``: padding) identify random-neighbour queries without a
        row; ``neighbours`` overrides ``config.neighbours``. Positions that
        ``options.retrieval`` covers take its neighbours and are not searched again.
        """
        return self.retriever.retrieve(
            queries, options or CallOptions(), self.config, tokens=tokens, neighbours=neighbours
        )

    def build_graph(
        self,
        retrieval: Retrieval,
        length: int,
        attention_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
    ) -> ContextGraph:
        """The context graph of the last ``length`` positions of a retrieval (padded
        positions, ``attention_mask == 0``, become no nodes); with a knowledge graph, plus
        the facts of the entities linked in ``input_ids`` ``[B, T' >= length]`` (needed:
        the call's tokens after their KV-cache history) as ``kg`` nodes."""
        ids = retrieval.neighbour_ids[:, -length:]
        mask = (
            None
            if attention_mask is None
            else attention_mask[:, -length:].to(ids.device, torch.bool)
        )
        graph = self.graph_inputs.build_graph(ids, query_mask=mask)
        if self.knowledge is None:
            return graph
        if input_ids is None:
            raise ValueError(
                "this model fuses a knowledge graph: its graphs need the call's token ids "
                "(input_ids, not inputs_embeds) to link entities"
            )
        return self.knowledge.add_facts(graph, input_ids, attention_mask)

    def gate_statistics(self, retrieval: Retrieval, length: int) -> Tensor | None:
        """``[B, length, 3]`` retrieval-gate inputs of the last ``length`` positions (``None``
        unless ``gate="retrieval"``)."""
        ids, distances = retrieval.neighbour_ids[:, -length:], retrieval.distances[:, -length:]
        return (
            retrieval_statistics(distances, ids, self.datastore.dim)
            if self.config.gate == "retrieval"
            else None
        )

    def fuse(
        self,
        site: FusionSite,
        hidden: Tensor,
        graph: ContextGraph,
        statistics: Tensor | None = None,
        states: NeighbourStates | None = None,
        *,
        embedding: nn.Module | None = None,
    ) -> Tensor:
        r""":math:`\mathbf{h} + \mathbf{g} \odot \mathrm{Adapter}(\mathcal{G})` at ``site`` for
        ``[B, T, d]`` hidden states whose positions ``graph`` covers; with
        ``fusion_mode="replace"`` the adapter's output itself at the ``ctx`` positions
        (positions that are no ``ctx`` node, e.g. padding, keep :math:`\mathbf{h}`).
        ``statistics`` (:meth:`gate_statistics`) feed the retrieval gate; ``embedding`` is
        the base model's token embedding (``model.get_input_embeddings()``), needed unless
        ``neighbour_embedding="none"``. With ``gradient_checkpointing`` in training mode the
        site (features, adapter, gate) is recomputed in the backward pass, not kept (same
        dropout masks: RNG state restored). ``states``: see :meth:`adapter_output`."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                self._fuse_site, site, hidden, graph, statistics, None, embedding,
                use_reentrant=False,
            )  # fmt: skip
        return self._fuse_site(site, hidden, graph, statistics, states, embedding)

    def adapter_output(
        self,
        site: FusionSite,
        hidden: Tensor,
        graph: ContextGraph,
        states: NeighbourStates | None = None,
        *,
        embedding: nn.Module | None = None,
    ) -> Tensor:
        """``[N_ctx, d]`` output of the adapter at ``site``; in eval mode without autograd,
        with ``states`` that cover the site, only its ``ctx`` side runs (the windows' part
        is read: it would get no gradient)."""
        adapter, dtype = self.adapter_at(site), self.gates[site_key(site)].dtype
        if states is not None and self.knowledge is not None:
            raise ValueError(
                "NeighbourStates tabulate the windows of graphs without kg nodes: a model "
                "that fuses a knowledge graph cannot read them; leave neighbour_states out "
                "(evaluation: neighbour_states 'off', --neighbour-states off)"
            )
        if (
            states is not None
            and states.covers(site)
            and not self.training
            and not torch.is_grad_enabled()
        ):
            states.check(self, [site])
            ctx_x = self.graph_inputs.ctx_features(graph, hidden, dtype)
            return adapter.ctx_forward(graph, ctx_x, states.window_key_values(site, graph))
        inputs = self.graph_inputs.adapter_inputs(graph, hidden, site, embedding, dtype)
        return adapter(
            inputs.graph,
            inputs.ctx_x,
            inputs.nbr_x,
            inputs.nbr_token_x,
            nbr_token_index=inputs.nbr_token_index,
            nbr_index=inputs.nbr_index,
        )

    def _fuse_site(
        self,
        site: FusionSite,
        hidden: Tensor,
        graph: ContextGraph,
        statistics: Tensor | None,
        states: NeighbourStates | None = None,
        embedding: nn.Module | None = None,
    ) -> Tensor:
        gate = self.gates[site_key(site)]
        out = self.adapter_output(site, hidden, graph, states, embedding=embedding)
        ctx = graph["ctx"]
        if self.config.fusion_mode == "replace":
            return hidden.index_put((ctx.batch_index, ctx.seq_index), out.to(hidden.dtype))
        delta = hidden.new_zeros(hidden.shape, dtype=out.dtype).index_put(
            (ctx.batch_index, ctx.seq_index), out
        )
        if self.config.gate == "retrieval":  # g ⊙ σ(a·s + b) per position
            delta = delta * self.retrieval_gates[site_key(site)](statistics).unsqueeze(-1)
        return hidden + (gate * delta).to(hidden.dtype)

    def mix_original(self, logits: Tensor, original_logits: Tensor) -> Tensor:
        """``log(r·softmax(original_logits) + (1-r)·softmax(logits))`` in float32, with
        ``r = config.orig_prob_ratio`` (the official GNN-LM ``orig_prob_ratio`` mixture)."""
        r = self.config.orig_prob_ratio
        return torch.logaddexp(
            math.log(r) + torch.log_softmax(original_logits.float(), -1),
            math.log1p(-r) + torch.log_softmax(logits.float(), -1),
        )

    def knn_mixture(self, lam: float | None = None, temperature: float | None = None) -> KNNMixture:
        """The kNN-LM mixture with ``lam`` / ``temperature`` or the configured ones.

        Raises:
            ValueError: one of the two is neither given nor configured.
        """
        lam = self.config.knn_lambda if lam is None else lam
        temperature = self.config.knn_temperature if temperature is None else temperature
        if lam is None or temperature is None:
            raise ValueError(
                "kNN interpolation needs lambda and temperature: pass them or set "
                "FusionConfig.knn_lambda / knn_temperature (hetgraph eval tunes both)"
            )
        return KNNMixture(float(lam), float(temperature))

    def knn_mixture_logits(
        self, logits: Tensor, retrieval: Retrieval, mixture: KNNMixture
    ) -> Tensor:
        """``log(λ·p_kNN + (1-λ)·softmax(logits))`` (float32) over a call's neighbours."""
        batch, length, vocab = logits.shape
        ids = retrieval.neighbour_ids[:, -length:]
        k = ids.shape[-1]
        next_tokens = self.graph_inputs.next_tokens(ids)
        knn = knn_log_probs(
            retrieval.distances[:, -length:].reshape(-1, k),
            next_tokens.reshape(-1, k),
            vocab,
            mixture.temperature,
        ).view(batch, length, -1)
        return interpolate_log_probs(torch.log_softmax(logits.float(), dim=-1), knn, mixture.lam)

    def logits_from_datastore(
        self,
        rows: Tensor,
        head: nn.Module,
        *,
        embedding: nn.Module | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Logits at datastore rows ``[B, T]`` computed from their stored keys, no base forward.

        With retrieval and fusion at the LM-head input the base model's state at a corpus
        position *is* its stored key, so ``logits = head(fuse(k, adapter(G)))``. ``rows`` may
        be any sample of rows, or with ``c2c`` (paper mode) contiguous spans ``s, s + 1, …``
        (the causal edges link a span's positions as they link a text's). The leakage filter
        hides each row's own neighbourhood.

        Args:
            rows: ``[B, T]`` datastore rows.
            head: the LM head (its ``forward`` is called, so a fusion hook on it never runs).
            embedding: the token embedding (see :meth:`fuse`).
            dtype: dtype of the base model's hidden states (default: the head's).

        Raises:
            ValueError: :attr:`can_run_from_datastore` is False, or ``c2c`` is on and a row
                of ``rows`` is not a contiguous span.
        """
        if not self.can_run_from_datastore:
            raise ValueError(
                "forward_from_datastore needs retrieval and fusion "
                "at the LM-head input and key features; "
                "use forward() with input_ids instead"
            )
        if (
            (self.graph_config.c2c or self.knowledge is not None)
            and rows.shape[1] > 1
            and not bool((rows[:, 1:] - rows[:, :-1] == 1).all())
        ):
            raise ValueError(
                "forward_from_datastore with c2c edges or a knowledge graph needs "
                "contiguous spans of rows (rows[b] = s, s + 1, …): the causal edges link "
                "neighbouring positions of a text, and entities are linked on its tokens"
            )
        rows = rows.to(self.gates[site_key(HEAD)].device)
        dtype = dtype or next(head.parameters()).dtype
        keys = self.graph_inputs.neighbour_features_of(rows.reshape(-1), HEAD)
        hidden = keys.to(dtype=dtype).view(*rows.shape, -1)
        retrieval = self.retrieve(hidden, CallOptions(query_positions=rows))
        length = rows.shape[1]
        # A span's stored tokens are the text its keys read: the ids entities link on.
        tokens = None if self.knowledge is None else gather_rows(self.corpus.tokens, rows)
        graph, statistics = (
            self.build_graph(retrieval, length, input_ids=tokens),
            self.gate_statistics(retrieval, length),
        )
        fused = self.fuse(HEAD, hidden, graph, statistics, embedding=embedding)
        if self.config.orig_prob_ratio > 0:
            return self.mix_original(head.forward(fused), head.forward(hidden))
        return head.forward(fused)

    # ------------------------------------------------------------ adapter tensors
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trained tensors only (adapters and gates), detached, on the CPU, keyed as in a
        saved adapter."""
        return {
            key: value.detach().cpu().contiguous()
            for key, value in self.state_dict().items()
            if key.startswith(ADAPTER_PREFIXES)
        }

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (every adapter key must be there).

        Raises:
            AdapterMismatchError: keys are missing or unexpected, or shapes differ.
        """
        own = self.state_dict()
        expected = {key for key in own if key.startswith(ADAPTER_PREFIXES)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        resized = sorted(k for k in expected & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or resized:
            raise AdapterMismatchError(
                f"adapter weights do not fit this model: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}, other "
                f"shapes {resized[:5]}"
            )
        self.load_state_dict(state, strict=False)

    def extra_repr(self) -> str:
        return (
            f"retrieval={self.retrieval_site!r}, sites={describe_sites(self.fusion_sites)}, "
            f"k={self.config.k}, prefetch={self.needs_prefetch}, gate={self.config.gate!r}"
            + ("" if self.knowledge is None else f", knowledge={self.knowledge!r}")
        )
