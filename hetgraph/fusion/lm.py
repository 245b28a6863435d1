"""GNN-LM fusion: a frozen Hugging Face causal LM, a datastore and graph adapters, joined by hooks.

For every position the LM reads, the query state at the retrieval site (the datastore's
key layer) retrieves ``k`` corpus positions; a heterogeneous context graph over the
query positions and the retrieved windows is built; and at every fused site ``i``

.. math::
    \mathbf{h}_i \leftarrow \mathbf{h}_i + \mathbf{g}_i \odot \mathrm{Adapter}_i(\mathcal{G})_{\mathrm{ctx}}

with the gate :math:`\mathbf{g}_i` initialised to zero, so an attached, untrained model
gives exactly the base model's logits. Everything happens in forward hooks kept as
handles (no ``forward`` is replaced), so HF ``generate`` with a KV cache works unchanged.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hetgraph.datastore import Datastore
from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.retrieval import Retriever
from hetgraph.graph import GraphConfig, build_context_graph
from hetgraph.knnlm import interpolate_log_probs, knn_log_probs
from hetgraph.models.fingerprint import config_fingerprint, tokenizer_fingerprint, weights_fingerprint
from hetgraph.models.layers import (
    decoder_layers,
    hidden_states_of,
    output_embedding_input_hook_target,
    resolve_layer_index,
    with_hidden_states,
)
from hetgraph.nn import AdapterConfig, GraphAdapter
from hetgraph.index import DatastoreIndex

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


class AdapterMismatchError(ValueError):
    """An adapter was loaded against a different base model or datastore."""


class _StopForward(Exception):
    """Raised inside the prefetch pass once the query states are captured."""


@dataclass
class _ForwardState:
    """What one forward pass of the wrapped model has retrieved and built so far."""

    attention_mask: Tensor | None = None
    query_positions: Tensor | None = None  # [B, T] datastore rows of the inputs, or None
    prefetching: bool = False
    prefetched_queries: Tensor | None = None
    neighbour_ids: Tensor | None = None  # [B, T, k] int64, -1 = none
    distances: Tensor | None = None  # [B, T, k] float32
    graphs: dict[int, Any] = field(default_factory=dict)  # keyed by number of positions
    attention: dict[str, Any] = field(default_factory=dict)


def _site_key(site: FusionSite) -> str:
    return "head" if site == HEAD else f"layer_{site}"


class HetGraphLM(nn.Module):
    r"""A frozen causal LM with GNN-LM graph adapters fused into its hidden states.

    Follows GNN-LM (`Meng et al., ICLR 2022 <https://arxiv.org/abs/2110.08743>`_),
    generalised from "on top of the last layer" to any decoder layer of any HF causal LM.
    Only the adapters and their gates are parameters of this module; the base model is
    frozen (``requires_grad_(False)``) and never registered as a submodule, so
    :meth:`state_dict` and :meth:`save_pretrained` hold the adapters alone.

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
        # Kept out of the module tree on purpose: the base model is not ours to save or train.
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "datastore", datastore)
        model.requires_grad_(False)
        model.eval()
        datastore.check(model=model, tokenizer=tokenizer)
        width = int(model.config.hidden_size)
        if datastore.dim != width and datastore.key_layer is None:
            raise AdapterMismatchError(
                f"datastore keys have width {datastore.dim} but the model's hidden size is {width}: "
                "build the datastore with this model (hetgraph datastore build --model …)")

        self.retrieval_site: FusionSite = (
            HEAD if datastore.key_layer is None else resolve_layer_index(model, datastore.key_layer))
        self.fusion_sites: tuple[FusionSite, ...] = tuple(
            HEAD if s == HEAD else resolve_layer_index(model, int(s)) for s in self.config.fusion_layers)
        num_layers = len(decoder_layers(model))
        order = lambda site: num_layers if site == HEAD else int(site)  # noqa: E731
        #: True when some fused site comes before the retrieval site, so a no-grad
        #: prefetch pass must supply the queries first.
        self.needs_prefetch = bool(self.config.prefetch) or any(
            order(s) < order(self.retrieval_site) for s in self.fusion_sites)

        self.retriever = Retriever(datastore, index)
        graph_kwargs = dict(self.config.graph)
        self.graph_config = GraphConfig(**graph_kwargs)

        embedding = model.get_input_embeddings()
        token_channels = int(embedding.embedding_dim)
        self.adapters = nn.ModuleDict()
        self.gates = nn.ParameterDict()
        device = next(model.parameters()).device
        for site in self.fusion_sites:
            nbr_channels = self._neighbour_feature_width(site)
            adapter_kwargs = dict(self.config.adapter)
            if adapter_kwargs.get("hidden_channels") is None:
                adapter_kwargs["hidden_channels"] = width
            adapter_config = AdapterConfig(
                ctx_channels=width, nbr_channels=nbr_channels, token_channels=token_channels,
                out_channels=width, use_c2c=self.graph_config.c2c, **adapter_kwargs)
            self.adapters[_site_key(site)] = GraphAdapter(adapter_config)
            self.gates[_site_key(site)] = nn.Parameter(torch.zeros(width))
        self.to(device)
        self.eval()  # like a loaded HF model: dropout off until train() is called

        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._state = _ForwardState()
        self._next_query_positions: Tensor | None = None
        self._generation_history: Tensor | None = None
        self._knn_params: tuple[float, float] | None = None
        self._knn_enabled = False
        self._corpus_tokens = torch.from_numpy(np.asarray(datastore.tokens, dtype=np.int64))
        self._corpus_doc_ids = torch.from_numpy(np.asarray(datastore.doc_ids, dtype=np.int64))
        self._corpus_next = torch.from_numpy(np.asarray(datastore.next_tokens, dtype=np.int64))

    # ------------------------------------------------------------------ hooks
    @property
    def is_attached(self) -> bool:
        """Whether the hooks are registered on the base model."""
        return bool(self._handles)

    def attach(self) -> "HetGraphLM":
        """Register the retrieval and fusion hooks on the base model (idempotent)."""
        if self._handles:
            return self
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True))
        layers = decoder_layers(model)
        sites = set(self.fusion_sites) | {self.retrieval_site}
        for site in sites:
            if site == HEAD:
                head = output_embedding_input_hook_target(model)
                self._handles.append(head.register_forward_pre_hook(self._head_hook))
            else:
                self._handles.append(layers[int(site)].register_forward_hook(self._make_layer_hook(int(site))))
        if self._knn_enabled:
            self._handles.append(model.register_forward_hook(self._knn_hook))
        return self

    def detach(self) -> "HetGraphLM":
        """Remove every hook this object registered; the base model is as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self

    def __enter__(self) -> "HetGraphLM":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @contextmanager
    def knn_interpolation(self, lam: float | None = None, temperature: float | None = None) -> Iterator[None]:
        """Within this context the model's logits are kNN-LM mixtures (log-probabilities):
        ``log(λ·p_kNN + (1-λ)·p_model)`` over the neighbours already retrieved for fusion."""
        lam = self.config.knn_lambda if lam is None else lam
        temperature = self.config.knn_temperature if temperature is None else temperature
        if lam is None or temperature is None:
            raise ValueError("kNN interpolation needs lambda and temperature: pass them or set "
                             "FusionConfig.knn_lambda / knn_temperature (hetgraph eval tunes both)")
        previous = (self._knn_enabled, self._knn_params)
        self._knn_enabled, self._knn_params = True, (float(lam), float(temperature))
        reattach = self.is_attached
        if reattach:
            self.detach().attach()
        try:
            yield
        finally:
            self._knn_enabled, self._knn_params = previous
            if reattach:
                self.detach().attach()

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._state.prefetching:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        # Query positions are set by forward() for exactly one call of the base model.
        self._state = _ForwardState(attention_mask=attention_mask, query_positions=self._next_query_positions)
        self._next_query_positions = None
        if self.needs_prefetch:
            self._prefetch(input_ids, attention_mask, kwargs.get("past_key_values"))

    def _prefetch(self, input_ids: Tensor | None, attention_mask: Tensor | None, past: Any) -> None:
        if input_ids is None:
            raise ValueError("HetGraphLM with a prefetch pass needs input_ids (not inputs_embeds)")
        history = self._history_ids(input_ids, past)
        mask = attention_mask if attention_mask is not None and attention_mask.shape[-1] == history.shape[-1] else None
        self._state.prefetching = True
        try:
            with torch.no_grad():
                self.model(input_ids=history, attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            self._state.prefetching = False
        queries = self._state.prefetched_queries[:, -input_ids.shape[-1]:]
        self._retrieve(queries)

    def _history_ids(self, input_ids: Tensor, past: Any) -> Tensor:
        # With a KV cache the model sees only new tokens; the prefetch pass (no cache) needs all.
        past_length = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        previous = self._generation_history
        if past_length == 0 or previous is None or previous.shape[-1] != past_length:
            history = input_ids
        else:
            history = torch.cat([previous, input_ids], dim=-1)
        self._generation_history = history
        return history

    def _head_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        new_hidden = self._at_site(HEAD, hidden)
        return None if new_hidden is hidden else (new_hidden, *args[1:])

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = hidden_states_of(output)
            new_hidden = self._at_site(layer, hidden)
            return None if new_hidden is hidden else with_hidden_states(output, new_hidden)
        return hook

    def _at_site(self, site: FusionSite, hidden: Tensor) -> Tensor:
        state = self._state
        if site == self.retrieval_site:
            if state.prefetching:
                state.prefetched_queries = hidden.detach()
                raise _StopForward
            if not self.needs_prefetch:
                self._retrieve(hidden.detach())
        if state.prefetching or site not in self.fusion_sites:
            return hidden
        return self._fuse(site, hidden)

    # ------------------------------------------------------------- retrieval
    def _retrieve(self, queries: Tensor) -> None:
        state = self._state
        batch, length = queries.shape[:2]
        positions = state.query_positions
        if positions is not None:
            positions = positions[:, -length:].to(queries.device)
        ids, distances = self.retriever.search(
            queries.reshape(batch * length, -1), self.config.k,
            exclude_positions=None if positions is None else positions.reshape(-1),
            margin=self.config.retrieval_margin, radius=self.graph_config.leakage_radius)
        state.neighbour_ids = ids.view(batch, length, -1)
        state.distances = distances.view(batch, length, -1)

    def _query_mask(self, batch: int, length: int, device: torch.device) -> Tensor | None:
        mask = self._state.attention_mask
        if mask is None:
            return None
        return mask[:, -length:].to(device=device, dtype=torch.bool)

    # ---------------------------------------------------------------- fusion
    def _graph_for(self, length: int, device: torch.device):
        state = self._state
        if length not in state.graphs:
            if state.neighbour_ids is None:
                raise RuntimeError("no neighbours were retrieved before a fused site; "
                                   "this is a bug in the hook order")
            ids = state.neighbour_ids[:, -length:]
            graph = build_context_graph(
                ids, self._corpus_tokens, self._corpus_doc_ids, self.graph_config,
                query_mask=self._query_mask(ids.shape[0], length, ids.device))
            state.graphs[length] = graph.to(device)
        return state.graphs[length]

    def _neighbour_feature_width(self, site: FusionSite) -> int:
        if self.config.neighbour_features == "key" or site == self.retrieval_site:
            return self.datastore.dim
        return int(self.datastore.features(int(site)).shape[1])

    def _neighbour_features(self, site: FusionSite, corpus_ids: Tensor) -> Tensor:
        if self.config.neighbour_features == "key" or site == self.retrieval_site:
            store = self.datastore.keys
        else:
            store = self.datastore.features(int(site))
        return torch.from_numpy(np.asarray(store[corpus_ids.cpu().numpy()]))

    def _fuse(self, site: FusionSite, hidden: Tensor) -> Tensor:
        batch, length, width = hidden.shape
        graph = self._graph_for(length, hidden.device)
        adapter = self.adapters[_site_key(site)]
        param = self.gates[_site_key(site)]
        ctx = graph["ctx"]
        b, t = ctx.batch_index, ctx.seq_index
        nbr_ids = graph["nbr"].corpus_id
        dtype = param.dtype
        ctx_x = hidden[b, t].to(dtype)
        nbr_x = self._neighbour_features(site, nbr_ids).to(device=hidden.device, dtype=dtype)
        with torch.no_grad():
            token_x = self.model.get_input_embeddings()(graph["nbr"].token_id.to(hidden.device)).to(dtype)
        out = adapter(graph, ctx_x, nbr_x, token_x)
        delta = hidden.new_zeros(batch, length, width, dtype=out.dtype).index_put((b, t), out)
        return hidden + (param * delta).to(hidden.dtype)

    def _knn_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        state = self._state
        if state.prefetching or state.neighbour_ids is None:
            return None
        lam, temperature = self._knn_params
        logits = output.logits
        length = logits.shape[1]
        ids = state.neighbour_ids[:, -length:]
        distances = state.distances[:, -length:]
        next_tokens = self._corpus_next.to(ids.device)[ids.clamp(min=0)]
        next_tokens = torch.where(ids >= 0, next_tokens, torch.full_like(next_tokens, -1))
        batch, k = ids.shape[0], ids.shape[-1]
        knn = knn_log_probs(distances.reshape(-1, k), next_tokens.reshape(-1, k), logits.shape[-1],
                            temperature).view(batch, length, -1)
        lm = torch.log_softmax(logits.float(), dim=-1)
        output.logits = interpolate_log_probs(lm, knn, lam)
        return output

    # ---------------------------------------------------------------- public
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        query_positions: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with fusion.

        Args:
            input_ids: ``[B, T]`` token ids.
            attention_mask: ``[B, T]``; padded positions build no graph nodes.
            query_positions: ``[B, T]`` datastore rows of the input tokens when the text is
                itself in the datastore (training), else ``None``; neighbours within
                ``graph.leakage_radius`` of a query's own row (same document) are dropped.
            **kwargs: passed to the base model (``labels``, ``use_cache``, …).
        """
        attached_here = not self.is_attached
        if attached_here:
            self.attach()
        self._next_query_positions = query_positions
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._next_query_positions = None
            if attached_here:
                self.detach()

    @property
    def can_run_from_datastore(self) -> bool:
        """True when a forward over datastore text needs no base-model pass: retrieval and
        every fused site are the LM-head input (whose states the datastore stores as keys),
        neighbours use the keys, and no ``c2c`` edge links positions."""
        return (self.retrieval_site == HEAD and set(self.fusion_sites) == {HEAD}
                and not self.graph_config.c2c and not self.config.prefetch)

    def forward_from_datastore(self, rows: Tensor) -> Tensor:
        """Logits at datastore rows ``[B, T]`` computed from their stored keys.

        For the default configuration (retrieve and fuse at the LM-head input) the base
        model's state at a corpus position *is* its stored key, so training on the corpus
        needs only the adapter and the LM head: ``logits = lm_head(k + g ⊙ adapter(G))``.
        Positions are independent (no ``c2c``), so ``rows`` may be any sample of rows.
        The leakage filter hides each row's own neighbourhood.

        Raises:
            ValueError: if :attr:`can_run_from_datastore` is False.
        """
        if not self.can_run_from_datastore:
            raise ValueError("forward_from_datastore needs retrieval and fusion at the LM-head input, "
                             "key features and no c2c edges; use forward() with input_ids instead")
        device = self.gates[_site_key(HEAD)].device
        rows = rows.to(device)
        keys = torch.from_numpy(np.asarray(self.datastore.keys[rows.reshape(-1).cpu().numpy()]))
        hidden = keys.to(device=device, dtype=next(self.model.parameters()).dtype).view(*rows.shape, -1)
        self._state = _ForwardState(query_positions=rows)
        self._retrieve(hidden)
        fused = self._fuse(HEAD, hidden)
        # .forward, not __call__: the LM head's fusion hook (if attached) must not fuse twice.
        return output_embedding_input_hook_target(self.model).forward(fused)

    @torch.no_grad()
    def generate(self, *args: Any, knn: bool = False, **kwargs: Any) -> Any:
        """HF ``generate`` with retrieval for every new position (the KV cache stays on).

        Args:
            knn: also interpolate the kNN-LM distribution (needs ``knn_lambda`` /
                ``knn_temperature`` in the config).
        """
        attached_here = not self.is_attached
        if attached_here:
            self.attach()
        self._generation_history = None
        try:
            if knn:
                with self.knn_interpolation():
                    return self.model.generate(*args, **kwargs)
            return self.model.generate(*args, **kwargs)
        finally:
            if attached_here:
                self.detach()

    @property
    def last_retrieval(self) -> tuple[Tensor, Tensor] | None:
        """``(neighbour_ids [B,T,k], distances [B,T,k])`` of the latest forward, or ``None``."""
        state = self._state
        if state.neighbour_ids is None:
            return None
        return state.neighbour_ids, state.distances

    # ---------------------------------------------------------- persistence
    def _identity(self) -> dict[str, Any]:
        meta = self.datastore.metadata
        return {
            "model": dict(meta.model),
            "datastore": {"fingerprint": meta.fingerprint, "num_entries": len(self.datastore),
                          "dim": self.datastore.dim, "key_layer": self.datastore.key_layer},
        }

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``adapter.safetensors`` (adapters + gates) and ``adapter_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp))
        tmp.replace(directory / ADAPTER_WEIGHTS)
        config = {
            "format_version": FORMAT_VERSION,
            "fusion": self.config.to_dict(),
            "adapters": {key: adapter.config.to_dict() for key, adapter in self.adapters.items()},
            **self._identity(),
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        model: nn.Module,
        datastore: Datastore,
        index: DatastoreIndex,
        tokenizer: Any | None = None,
    ) -> "HetGraphLM":
        """Load adapters saved by :meth:`save_pretrained` onto ``model`` and ``datastore``.

        Raises:
            AdapterMismatchError: the adapter was trained with another base model or datastore.
        """
        directory = Path(directory)
        config_path = directory / ADAPTER_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: is {directory} an adapter directory "
                                    "written by HetGraphLM.save_pretrained / hetgraph train?")
        saved = json.loads(config_path.read_text())
        lm = cls(model, datastore, index, FusionConfig.from_dict(saved["fusion"]), tokenizer=tokenizer)
        current = lm._identity()
        current["model"] = {**current["model"], "config": config_fingerprint(model),
                            "weights": weights_fingerprint(model)}
        if tokenizer is not None:
            current["model"]["tokenizer"] = tokenizer_fingerprint(tokenizer)
        for what in ("model", "datastore"):
            if saved.get(what) != current[what]:
                raise AdapterMismatchError(
                    f"adapter in {directory} was trained with a different {what}:\n"
                    f"  saved:   {saved.get(what)}\n  current: {current[what]}\n"
                    f"use the {what} it was trained with, or train a new adapter (hetgraph train …)")
        state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(next(lm.parameters()).device))
        lm.load_state_dict(state, strict=True)
        return lm

    def extra_repr(self) -> str:
        return (f"retrieval_site={self.retrieval_site!r}, fusion_sites={list(self.fusion_sites)}, "
                f"k={self.config.k}, prefetch={self.needs_prefetch}")
