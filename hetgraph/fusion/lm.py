r"""GNN-LM fusion: a frozen Hugging Face causal LM joined to a :class:`~hetgraph.FusionEngine`.

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

:class:`HetGraphLM` is a thin shell, in the manner of PEFT's model wrappers: it holds the
base model (``model``) and the :class:`~hetgraph.FusionEngine` (``engine``: retriever, graph
builder, adapters and gates, and every step of the fusion), attaches the hooks that join
them, runs ``forward`` / ``generate`` with per-call options, and saves and loads the
adapters. With a knowledge graph (``knowledge=``, :class:`~hetgraph.kg.KnowledgeSource`) each
call's graph also holds the facts of the entities its tokens mention as ``kg`` nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hetgraph.datastore import Datastore
from hetgraph.fusion.checkpointing import set_checkpointing
from hetgraph.fusion.config import FusionConfig
from hetgraph.fusion.context import (
    CallOptions,
    Retrieval,
    call_options,
    generation_state,
    knn_mixture,
)
from hetgraph.fusion.engine import FusionEngine, ModelGeometry
from hetgraph.fusion.hooks import FusionHooks
from hetgraph.fusion.model_card import base_model_name
from hetgraph.fusion.persistence import (
    check_knowledge,
    load_adapter,
    read_adapter_config,
    save_adapter,
    saved_fusion_config,
)
from hetgraph.index import DatastoreIndex
from hetgraph.models.layers import output_embedding_input_hook_target

if TYPE_CHECKING:  # Python 3.10 has no typing.Self
    from typing_extensions import Self

    from hetgraph.fusion.neighbour_states import NeighbourStates
    from hetgraph.kg.source import KnowledgeSource


class HetGraphLM(nn.Module):
    r"""A frozen causal LM with GNN-LM graph adapters fused into its hidden states.

    Follows GNN-LM (`Meng et al., ICLR 2022 <https://arxiv.org/abs/2110.08743>`_),
    generalised from "on top of the last layer" to any decoder layer of any HF causal LM.

    A thin shell around two submodules: ``model``, the base model, frozen
    (``requires_grad_(False)``, always in eval mode), and ``engine``, the
    :class:`~hetgraph.FusionEngine` that owns the retriever, the graph builder, the adapters
    and the gates and runs every fusion step (``lm.engine.retrieve``, ``build_graph``,
    ``fuse``, …). ``lm.to(device)`` / ``.cuda()`` / ``.to(dtype)`` move both; the
    datastore's arrays (keys, tokens, document ids, next tokens) stay memory maps on disk,
    read at the rows each batch retrieved, and the FAISS index stays on the CPU. Only the
    adapters and gates are trained and saved (:meth:`adapter_state_dict`,
    :meth:`save_pretrained`).

    Args:
        model: a Hugging Face causal LM (Qwen2, Llama, Mistral, GPT-2, …).
        datastore: the corpus datastore built with the same model and tokenizer.
        index: the FAISS index over the datastore's keys.
        config: fusion sites, k, graph and adapter settings.
        tokenizer: optional; used to check the datastore's tokenizer fingerprint.
        knowledge: a knowledge graph fused as ``kg`` nodes beside the retrieved contexts
            (:class:`~hetgraph.kg.KnowledgeSource`, opened with this model's tokenizer),
            see :class:`~hetgraph.FusionEngine`; needed when ``config.kg`` is set.

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
        *,
        knowledge: KnowledgeSource | None = None,
    ) -> None:
        super().__init__()
        model.requires_grad_(False)
        model.eval()
        datastore.check(model=model, tokenizer=tokenizer)
        self.model = model
        self.engine = FusionEngine(
            datastore, index, config, ModelGeometry.of(model), knowledge=knowledge
        )
        #: The engine's :class:`~hetgraph.FusionConfig`.
        self.config: FusionConfig = self.engine.config
        self.to(next(model.parameters()).device)
        self.eval()  # like a loaded HF model: dropout off until train() is called
        self._hooks = FusionHooks(model, self.engine)

    def train(self, mode: bool = True) -> HetGraphLM:
        """Set the adapters' training mode; the frozen base model stays in eval mode (with
        ``gradient_checkpointing`` its decoder layers are checkpointed in training mode)."""
        super().train(mode)
        self.model.eval()
        if self.config.gradient_checkpointing:
            set_checkpointing(self.model, mode)
        return self

    # ------------------------------------------------------------------ hooks
    @property
    def is_attached(self) -> bool:
        """Whether the hooks are registered on the base model."""
        return self._hooks.is_attached

    def attach(self) -> HetGraphLM:
        """Register the retrieval and fusion hooks on the base model (idempotent)."""
        self._hooks.attach()
        return self

    def detach(self) -> HetGraphLM:
        """Remove every hook this object registered; the base model is as it was."""
        self._hooks.detach()
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

    def knn_interpolation(self, lam: float | None = None, temperature: float | None = None):
        """Within this context the model's logits are kNN-LM mixtures (log-probabilities):
        ``log(λ·p_kNN + (1-λ)·p_model)`` over the neighbours already retrieved for fusion
        (``lam`` / ``temperature`` default to the config's:
        :meth:`FusionEngine.knn_mixture <hetgraph.FusionEngine.knn_mixture>`). Only calls
        made in this thread / task inside the block are affected."""
        return knn_mixture(self.engine.knn_mixture(lam, temperature))

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

    def forward_from_datastore(self, rows: Tensor) -> Tensor:
        """Logits at datastore rows ``[B, T]`` computed from their stored keys, no base
        forward (:attr:`FusionEngine.can_run_from_datastore
        <hetgraph.FusionEngine.can_run_from_datastore>` must hold): see
        :meth:`FusionEngine.logits_from_datastore
        <hetgraph.FusionEngine.logits_from_datastore>`."""
        return self.engine.logits_from_datastore(
            rows,
            output_embedding_input_hook_target(self.model),
            embedding=self.model.get_input_embeddings(),
            dtype=next(self.model.parameters()).dtype,
        )

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

    # ------------------------------------------------------------ persistence
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trained tensors only (adapters and gates), detached, on the CPU
        (:meth:`FusionEngine.adapter_state_dict <hetgraph.FusionEngine.adapter_state_dict>`)."""
        return self.engine.adapter_state_dict()

    def load_adapter_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (every adapter key must be there).

        Raises:
            AdapterMismatchError: keys are missing or unexpected.
        """
        self.engine.load_adapter_state_dict(state)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``adapter.safetensors`` (adapters + gates), ``adapter_config.json`` and the
        model card to ``directory``, atomically
        (:func:`~hetgraph.fusion.persistence.save_adapter`).

        Raises:
            hetgraph.storage.StorageError: the disk is full (the previous adapter is kept).
        """
        save_adapter(self.engine, directory, base_model_name(self.model))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        model: nn.Module,
        datastore: Datastore,
        index: DatastoreIndex,
        tokenizer: Any | None = None,
        *,
        knowledge: KnowledgeSource | None = None,
    ) -> HetGraphLM:
        """Load adapters saved by :meth:`save_pretrained` onto ``model`` and ``datastore``
        (and ``knowledge``, the knowledge graph the adapter was trained with, bound to the
        saved ``fusion.kg`` settings; its KGE tables are read from its directory, never
        from the adapter).

        Raises:
            AdapterNotFoundError: ``directory`` holds no adapter (a ``FileNotFoundError``).
            AdapterFileError: ``adapter_config.json`` or ``adapter.safetensors`` is damaged
                (both are checked in full: adapters are small).
            AdapterMismatchError: the adapter was trained with another base model, datastore
                or knowledge graph (or with one and loaded without, or the other way).
        """
        saved = read_adapter_config(directory)
        # Before anything is built: a missing or other graph is refused in one line.
        check_knowledge(saved, None if knowledge is None else knowledge.identity(), Path(directory))
        config = saved_fusion_config(saved, directory)
        lm = cls(model, datastore, index, config, tokenizer, knowledge=knowledge)
        load_adapter(lm.engine, model, directory, saved, tokenizer)
        return lm
