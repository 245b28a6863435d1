r"""GNN-LM fusion: a frozen Hugging Face causal LM, a datastore and graph adapters.

For every position the LM reads, the query state at the retrieval site (the datastore's
key layer) retrieves ``k`` corpus positions; a heterogeneous context graph over the
query positions and the retrieved windows is built; and at every fused site ``i``

.. math::
    \mathbf{h}_i \leftarrow
    \mathbf{h}_i + \mathbf{g}_i \odot \mathrm{Adapter}_i(\mathcal{G})_{\mathrm{ctx}}

with the gate :math:`\mathbf{g}_i` initialised to zero, so an attached, untrained model
gives exactly the base model's logits (with ``FusionConfig(gate="retrieval")`` the gate is
:math:`\mathbf{g}_i \odot \sigma(\mathbf{a}_i \cdot \mathbf{s} + b_i)`, see
:mod:`hetgraph.fusion.gates`). One retrieval and one graph per forward call are shared by
every fused site. With ``FusionConfig(fusion_mode="replace")`` (the official GNN-LM,
:meth:`FusionConfig.paper <hetgraph.FusionConfig.paper>`) the adapter's output replaces
:math:`\mathbf{h}_i`, so the LM head reads :math:`\mathrm{Adapter}(\mathcal{G})_{\mathrm{ctx}}`
(``output_layer(HGT(h))``). The hooks (:class:`~hetgraph.fusion.hooks.FusionHooks`) are kept
as handles (no ``forward`` is replaced), so HF ``generate`` with a KV cache works unchanged;
what one call retrieves lives in that call's context, never on the module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hetgraph.datastore import Datastore
from hetgraph.fusion.checkpointing import set_checkpointing
from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.context import (
    CallOptions,
    KNNMixture,
    Retrieval,
    call_options,
    generation_state,
    knn_mixture,
)
from hetgraph.fusion.datastore_forward import logits_from_datastore
from hetgraph.fusion.gates import RetrievalGate, retrieval_statistics
from hetgraph.fusion.graph_inputs import GraphInputBuilder
from hetgraph.fusion.hooks import FusionHooks
from hetgraph.fusion.persistence import AdapterMismatchError, AdapterPersistenceMixin
from hetgraph.fusion.retrieval import Retriever
from hetgraph.fusion.sites import describe_sites, site_key
from hetgraph.graph import ContextGraph, CorpusTable
from hetgraph.index import DatastoreIndex
from hetgraph.knnlm import interpolate_log_probs, knn_log_probs
from hetgraph.models.layers import (
    num_decoder_layers,
    resolve_layer_index,
)
from hetgraph.nn import GraphAdapter

if TYPE_CHECKING:  # Python 3.10 has no typing.Self
    from typing_extensions import Self

    from hetgraph.fusion.neighbour_states import NeighbourStates


class HetGraphLM(AdapterPersistenceMixin, nn.Module):
    r"""A frozen causal LM with GNN-LM graph adapters fused into its hidden states.

    Follows GNN-LM (`Meng et al., ICLR 2022 <https://arxiv.org/abs/2110.08743>`_),
    generalised from "on top of the last layer" to any decoder layer of any HF causal LM.

    The base model is a frozen submodule (``requires_grad_(False)``, always in eval mode),
    so ``lm.to(device)`` / ``.cuda()`` / ``.to(dtype)`` move it together with the
    adapters and the gates; the datastore's arrays (keys, tokens, document ids, next
    tokens) stay memory maps on disk, read at the rows each batch retrieved, and the FAISS
    index stays on the CPU. Only the adapters and gates are
    trained and saved (:meth:`adapter_state_dict`, :meth:`save_pretrained`).

    Args:
        model: a Hugging Face causal LM (Qwen2, Llama, Mistral, GPT-2, …).
        datastore: the corpus datastore built with the same model and tokenizer.
        index: the FAISS index over the datastore's keys.
        config: fusion sites, k, graph and adapter settings.
        tokenizer: optional; used to check the datastore's tokenizer fingerprint.

    Example::

        lm = HetGraphLM(model, datastore, index, FusionConfig(fusion_layers=("head",)))
        with lm:                      # attaches the hooks, detaches on exit
            logits = model(input_ids).logits
    """

    def __init__(
        self,
        model: nn.Module,
        datastore: Datastore,
        index: DatastoreIndex,
        config: FusionConfig | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        super().__init__()
        self.config = config or FusionConfig()
        model.requires_grad_(False)
        model.eval()
        datastore.check(model=model, tokenizer=tokenizer)
        self.model = model
        self.datastore = datastore
        corpus = CorpusTable.of(datastore)  # the datastore's memmaps, read per batch
        self.retriever = Retriever(datastore, index, corpus)
        width = int(model.config.hidden_size)
        if datastore.dim != width and datastore.key_layer is None:
            raise AdapterMismatchError(
                f"datastore keys have width {datastore.dim} "
                f"but the model's hidden size is {width}: "
                "build the datastore with this model (hetgraph datastore build --model …)"
            )
        self.retrieval_site: FusionSite = (
            HEAD if datastore.key_layer is None else resolve_layer_index(model, datastore.key_layer)
        )
        self.fusion_sites: tuple[FusionSite, ...] = self.config.resolved_sites(
            num_decoder_layers(model)
        )
        embedding = self.config.neighbour_embedding
        self.graph_inputs = GraphInputBuilder(
            datastore,
            self.config.graph,
            self.config.neighbour_features,
            self.retrieval_site,
            neighbour_embedding=embedding,
            corpus=corpus,
        )
        self.adapters = nn.ModuleDict()
        self.gates = nn.ParameterDict()
        self.retrieval_gates = nn.ModuleDict()  # per-site RetrievalGate (gate="retrieval")
        token_width = int(model.get_input_embeddings().embedding_dim)
        for site in self.fusion_sites:
            adapter_config = self.config.adapter.resolved(
                ctx_channels=width,
                nbr_channels=(
                    token_width if embedding == "label" else self.graph_inputs.feature_width(site)
                ),
                out_channels=width,
                token_channels=token_width if embedding == "own_token" else 0,
                use_c2c=self.config.graph.c2c,
            )
            self.adapters[site_key(site)] = GraphAdapter(adapter_config)
            self.gates[site_key(site)] = nn.Parameter(torch.zeros(width))
            if self.config.gate == "retrieval":
                self.retrieval_gates[site_key(site)] = RetrievalGate()
        self.to(next(model.parameters()).device)
        self.eval()  # like a loaded HF model: dropout off until train() is called
        self.hooks = FusionHooks(self)

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
        # Evaluated on every forward call: no walk over the model's modules here.
        order = lambda site: math.inf if site == HEAD else int(site)  # noqa: E731
        return bool(self.config.prefetch) or any(
            order(s) < order(self.retrieval_site) for s in self.fusion_sites
        )

    def train(self, mode: bool = True) -> HetGraphLM:
        """Set the adapters' training mode; the frozen base model stays in eval mode (with
        ``gradient_checkpointing`` its decoder layers are checkpointed in training mode)."""
        super().train(mode)
        self.model.eval()
        if self.config.gradient_checkpointing:
            set_checkpointing(self.model, mode)
        return self

    def adapter_at(self, site: FusionSite) -> GraphAdapter:
        """The graph adapter fused at ``site`` (``"head"`` or a decoder-layer index)."""
        return self.adapters[site_key(site)]  # type: ignore[return-value]

    # ------------------------------------------------------------------ hooks
    @property
    def is_attached(self) -> bool:
        """Whether the hooks are registered on the base model."""
        return self.hooks.is_attached

    def attach(self) -> HetGraphLM:
        """Register the retrieval and fusion hooks on the base model (idempotent)."""
        self.hooks.attach()
        return self

    def detach(self) -> HetGraphLM:
        """Remove every hook this object registered; the base model is as it was."""
        self.hooks.detach()
        return self

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @contextmanager
    def _attached_for_call(self) -> Iterator[None]:
        # forward() / generate() attach for the call when the user has not attached.
        attached_here = not self.is_attached
        if attached_here:
            self.attach()
        try:
            yield
        finally:
            if attached_here:
                self.detach()

    def knn_mixture(self, lam: float | None = None, temperature: float | None = None) -> KNNMixture:
        """The kNN-LM mixture with ``lam`` / ``temperature`` or the configured ones."""
        lam = self.config.knn_lambda if lam is None else lam
        temperature = self.config.knn_temperature if temperature is None else temperature
        if lam is None or temperature is None:
            raise ValueError(
                "kNN interpolation needs lambda and temperature: pass them or set "
                "FusionConfig.knn_lambda / knn_temperature (hetgraph eval tunes both)"
            )
        return KNNMixture(float(lam), float(temperature))

    def knn_interpolation(self, lam: float | None = None, temperature: float | None = None):
        """Within this context the model's logits are kNN-LM mixtures (log-probabilities):
        ``log(λ·p_kNN + (1-λ)·p_model)`` over the neighbours already retrieved for fusion.
        Only calls made in this thread / task inside the block are affected."""
        return knn_mixture(self.knn_mixture(lam, temperature))

    # ------------------------------------------------------ stateless steps
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
        self, retrieval: Retrieval, length: int, attention_mask: Tensor | None = None
    ) -> ContextGraph:
        """The context graph of the last ``length`` positions of a retrieval (padded
        positions, ``attention_mask == 0``, become no nodes)."""
        ids = retrieval.neighbour_ids[:, -length:]
        mask = (
            None
            if attention_mask is None
            else attention_mask[:, -length:].to(ids.device, torch.bool)
        )
        return self.graph_inputs.build_graph(ids, query_mask=mask)

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
    ) -> Tensor:
        r""":math:`\mathbf{h} + \mathbf{g} \odot \mathrm{Adapter}(\mathcal{G})` at ``site`` for
        ``[B, T, d]`` hidden states whose positions ``graph`` covers; with
        ``fusion_mode="replace"`` the adapter's output itself at the ``ctx`` positions
        (positions that are no ``ctx`` node, e.g. padding, keep :math:`\mathbf{h}`).
        ``statistics`` (:meth:`gate_statistics`) feed the retrieval gate. With
        ``gradient_checkpointing`` in training mode the site (features, adapter, gate) is
        recomputed in the backward pass, not kept (same dropout masks: RNG state restored).
        ``states``: see :meth:`adapter_output`."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._fuse_site, site, hidden, graph, statistics, use_reentrant=False)
        return self._fuse_site(site, hidden, graph, statistics, states)

    def adapter_output(
        self,
        site: FusionSite,
        hidden: Tensor,
        graph: ContextGraph,
        states: NeighbourStates | None = None,
    ) -> Tensor:
        """``[N_ctx, d]`` output of the adapter at ``site``; in eval mode without autograd,
        with ``states`` that cover the site, only its ``ctx`` side runs (the windows' part
        is read: it would get no gradient)."""
        adapter, dtype = self.adapter_at(site), self.gates[site_key(site)].dtype
        if (
            states is not None
            and states.covers(site)
            and not self.training
            and not torch.is_grad_enabled()
        ):
            states.check(self, [site])
            ctx_x = self.graph_inputs.ctx_features(graph, hidden, dtype)
            return adapter.ctx_forward(graph, ctx_x, states.window_key_values(site, graph))
        inputs = self.graph_inputs.adapter_inputs(
            graph, hidden, site, self.model.get_input_embeddings(), dtype
        )
        return adapter(
            inputs.graph,
            inputs.ctx_x,
            inputs.nbr_x,
            inputs.nbr_token_x,
            nbr_token_index=inputs.nbr_token_index,
        )

    def _fuse_site(
        self,
        site: FusionSite,
        hidden: Tensor,
        graph: ContextGraph,
        statistics: Tensor | None,
        states: NeighbourStates | None = None,
    ) -> Tensor:
        gate = self.gates[site_key(site)]
        out = self.adapter_output(site, hidden, graph, states)
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

    def knn_mixture_logits(
        self,
        logits: Tensor,
        retrieval: Retrieval,
        mixture: KNNMixture,
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

    # ---------------------------------------------------------------- public
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        query_positions: Tensor | None = None,
        *,
        k: int | None = None,
        output_retrieval: bool = False,
        neighbour_states: NeighbourStates | None = None,
        retrieval: Retrieval | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with fusion.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``; padded positions build no graph nodes.
            query_positions: ``[B, T]`` datastore rows of the input tokens when the text is
                itself in the datastore (training), else ``None``; neighbours within
                ``graph.leakage_radius`` of a query's own row (same document unless
                ``graph.leakage_scope="corpus"``) are dropped.
            k: neighbours per position for this call (default ``config.k``).
            output_retrieval: set ``output.retrieval`` to the call's
                :class:`~hetgraph.fusion.context.Retrieval` (neighbour rows and distances).
            neighbour_states: read the windows' part of the adapters from these
                (:class:`~hetgraph.NeighbourStates`; eval mode).
            retrieval: neighbours already retrieved for the input positions
                (:attr:`~hetgraph.fusion.CallOptions.retrieval`): not
                searched again.
            **kwargs: passed to the base model (``labels``, ``use_cache``, …).
        """
        options = CallOptions(
            query_positions=query_positions,
            k=k,
            output_retrieval=output_retrieval,
            neighbour_states=neighbour_states,
            retrieval=retrieval,
        )
        with self._attached_for_call(), call_options(options):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @property
    def can_run_from_datastore(self) -> bool:
        """True when a forward over datastore text needs no base-model pass: retrieval and
        every fused site are the LM-head input (whose states the datastore stores as keys)
        and neighbours use the keys. With ``c2c`` edges the rows must be contiguous spans
        (see :meth:`forward_from_datastore`)."""
        return (
            self.retrieval_site == HEAD
            and set(self.fusion_sites) == {HEAD}
            and not self.config.prefetch
        )

    def forward_from_datastore(self, rows: Tensor) -> Tensor:
        """Logits at datastore rows ``[B, T]`` computed from their stored keys, no base
        forward: see :func:`~hetgraph.fusion.datastore_forward.logits_from_datastore`."""
        return logits_from_datastore(self, rows)

    @torch.no_grad()
    def generate(
        self,
        *args: Any,
        knn: bool = False,
        knn_lambda: float | None = None,
        knn_temperature: float | None = None,
        neighbour_states: NeighbourStates | None = None,
        **kwargs: Any,
    ) -> Any:
        """HF ``generate`` with retrieval for every new position (the KV cache stays on);
        ``knn=True`` also interpolates the kNN-LM distribution with ``knn_lambda`` and
        ``knn_temperature`` (each defaulting to the config's; one of the two missing raises
        before any work); ``neighbour_states`` as in :meth:`forward`."""
        mixture = self.knn_interpolation(knn_lambda, knn_temperature) if knn else nullcontext()
        with self._attached_for_call(), generation_state(neighbour_states), mixture:
            return self.model.generate(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"retrieval={self.retrieval_site!r}, sites={describe_sites(self.fusion_sites)}, "
            f"k={self.config.k}, prefetch={self.needs_prefetch}, gate={self.config.gate!r}"
        )
