r"""What the adapters read from every datastore row's neighbour window, computed once.

In a GNN-LM context graph (`Meng et al. <https://arxiv.org/abs/2110.08743>`_) the ``nbr``
windows receive nothing from the ``ctx`` nodes (the official ``TokenGraphTransformerDecoder``
has the edge types ``tgt -> tgt``, ``ntgt -> tgt`` and ``ntgt -> ntgt`` only; hetgraph's
``c2c``, ``n2c`` and ``n2n``): what a layer's ``ctx`` nodes read from a
window, the keys and values of its query-linked slots, depends on the window's rows alone
(:meth:`~hetgraph.nn.GraphAdapter.window_key_values`), and a window is decided by the row it
is centred on. A trained adapter's nbr side, most of its cost at evaluation and generation,
is therefore a table over the datastore's rows. :class:`NeighbourStates` computes that table
once (eval mode) and hands a forward the rows it retrieved; the adapter then runs only its
``ctx`` side (:meth:`~hetgraph.nn.GraphAdapter.ctx_forward`). The logits are those of the
full forward (eval mode, up to float rounding).

It costs ``rows × layers × 2 × S × hidden`` numbers per fused site (``S`` the query-linked
slots per window: 1 with ``n2c="center"``), e.g. 0.8 GB in float32 for 200k rows, 2 layers
and hidden 256: meant for evaluation and generation over a store that fits; training never
uses it (the adapter changes every step).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hetgraph.fusion.config import FusionSite
from hetgraph.fusion.sites import site_key
from hetgraph.graph import ContextGraph, window_rows

if TYPE_CHECKING:
    from hetgraph.fusion.engine import FusionEngine

logger = logging.getLogger(__name__)


class NeighbourStates:
    r"""Per fused site, the keys and values each adapter layer's queries read from the
    window of every datastore row (see the module docstring).

    Build it with :meth:`build` from a :class:`~hetgraph.FusionEngine` whose adapters are
    trained (``lm.engine``), then pass it to the calls that should use it: ``lm(input_ids,
    neighbour_states=states)``, ``lm.generate(..., neighbour_states=states)``,
    :func:`~hetgraph.evaluation.gnn_forward` (``neighbour_states=``), or let
    ``EvalConfig(neighbour_states="on")`` (or ``"auto"``) build one per evaluation. The table
    is read in eval mode without autograd (``torch.no_grad`` / ``inference_mode``, as
    evaluation and ``generate`` run): a call in training mode, one that records gradients
    (the windows' weights would get none), or one at a site the table does not cover
    computes the windows as usual.

    Raises (at use):
        ValueError: if the model's adapter weights, graph or fusion settings, or datastore
            differ from those the table was built with (rebuild it).
    """

    def __init__(self, tables: dict[str, Tensor], engine: FusionEngine) -> None:
        self.tables = tables
        self.num_rows = len(engine.datastore)
        self.config = engine.config
        # A model trained further, or with other adapters loaded, must not read a stale
        # table: fingerprints of the weights it was computed with (not copies: with a
        # site per decoder layer those would cost hundreds of MB).
        self.fingerprints = {key: _fingerprint(engine.adapters[key]) for key in tables}

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        engine: FusionEngine,
        embedding: nn.Module | None = None,
        sites: Sequence[FusionSite] | None = None,
        *,
        batch_rows: int = 8192,
        show_progress: bool = True,
    ) -> NeighbourStates:
        """Computes the table of ``sites`` (default: every fused site) over all the
        datastore's rows, ``batch_rows`` windows at a time, with the adapters in eval mode
        (their mode is restored after). ``embedding``: the base model's token embedding
        (``model.get_input_embeddings()``), needed unless ``neighbour_embedding="none"``.

        Raises:
            ValueError: if the graphs have no window grid (``graph.deduplicate``), a site
                is not fused, or ``batch_rows < 1``.
        """
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be >= 1 (got {batch_rows})")
        if engine.graph_config.deduplicate:
            raise ValueError(
                "neighbour states need window graphs: they cannot be built "
                "with graph.deduplicate=true (set it to false)"
            )
        sites = tuple(engine.fusion_sites if sites is None else sites)
        unknown = [s for s in sites if s not in engine.fusion_sites]
        if unknown:
            raise ValueError(
                f"sites {unknown} are not fused by this model (fused: {list(engine.fusion_sites)})"
            )
        adapters = {site: engine.adapter_at(site) for site in sites}
        modes = {site: adapter.training for site, adapter in adapters.items()}
        tables: dict[str, Tensor] = {}
        rows_total = len(engine.datastore)
        try:
            for adapter in adapters.values():
                adapter.eval()
            starts = range(0, rows_total, batch_rows)
            for start in tqdm(
                starts, desc="neighbour states", unit="batch", disable=not show_progress
            ):
                for site, adapter in adapters.items():
                    device = next(adapter.parameters()).device
                    rows = torch.arange(start, min(start + batch_rows, rows_total), device=device)
                    # One sequence per row: no causal c2c edges among the rows (paper mode).
                    graph = engine.graph_inputs.build_graph(rows.view(-1, 1, 1))
                    inputs = engine.graph_inputs.neighbour_inputs(
                        graph, site, embedding, adapter.param_dtype, device
                    )
                    stacked = torch.stack(
                        [torch.stack(kv, 1) for kv in adapter.window_key_values(graph, *inputs)], 1
                    )
                    key = site_key(site)
                    if key not in tables:
                        tables[key] = stacked.new_empty(rows_total, *stacked.shape[1:])
                    tables[key][window_rows(graph)] = stacked
        finally:
            for site, adapter in adapters.items():
                adapter.train(modes[site])
        states = cls(tables, engine)
        logger.info(
            "neighbour states of %d rows at %d site(s): %.1f MB",
            rows_total,
            len(tables),
            states.nbytes / 2**20,
        )
        return states

    @staticmethod
    def estimate_nbytes(engine: FusionEngine, sites: Sequence[FusionSite] | None = None) -> int:
        """Memory :meth:`build` would take for ``sites`` (default: every fused site)."""
        slots = engine.graph_config.window_size if engine.graph_config.n2c == "window" else 1
        total = 0
        for site in engine.fusion_sites if sites is None else sites:
            adapter = engine.adapter_at(site)
            width = adapter.config.hidden_channels
            per_row = adapter.config.num_layers * 2 * slots * width
            total += len(engine.datastore) * per_row * adapter.param_dtype.itemsize
        return total

    @property
    def nbytes(self) -> int:
        """Memory the tables take."""
        return sum(t.numel() * t.element_size() for t in self.tables.values())

    def covers(self, site: FusionSite) -> bool:
        """Whether the table holds ``site``'s windows."""
        return site_key(site) in self.tables

    def check(self, engine: FusionEngine, sites: Sequence[FusionSite] | None = None) -> None:
        """Raises :class:`ValueError` unless ``engine`` has the datastore size, fusion settings
        and, at ``sites`` (default: every site of the table), the adapter weights the table
        was built with. A forward checks the site it is about to read, so that a model
        fused at every layer fingerprints each adapter once per call, not once per site."""
        if len(engine.datastore) != self.num_rows or engine.config != self.config:
            raise ValueError(
                "these neighbour states were built for another datastore or "
                "fusion config: rebuild them with NeighbourStates.build(lm.engine, …)"
            )
        keys = self.fingerprints if sites is None else [site_key(s) for s in sites]
        for key in keys:
            if key not in engine.adapters or not torch.equal(
                _fingerprint(engine.adapters[key]), self.fingerprints[key]
            ):
                raise ValueError(
                    f"the adapter at {key} changed since these neighbour states "
                    "were built: rebuild them with NeighbourStates.build(lm.engine, …)"
                )

    def window_key_values(
        self, site: FusionSite, graph: ContextGraph
    ) -> list[tuple[Tensor, Tensor]]:
        """Per adapter layer, the keys and values ``[U, S, H * d_k]`` of ``graph``'s windows
        at ``site`` (as :meth:`~hetgraph.nn.GraphAdapter.window_key_values` computes them)."""
        table = self.tables[site_key(site)]
        rows = window_rows(graph).clamp(min=0)  # a window without nodes is masked anyway
        found = table.index_select(0, rows.to(table.device))  # [U, layers, 2, S, H * d_k]
        return [(found[:, i, 0], found[:, i, 1]) for i in range(found.size(1))]


def _fingerprint(module: torch.nn.Module, stride: int = 97) -> Tensor:
    """Float64 sums of a sample of the parameters (every ``stride``-th value of each): of
    the values, their squares and the position-weighted values, and the sample's size. A
    training step or other loaded weights change them; checked on every call, so a sample
    keeps it far below a generation step's cost (all 2.8M values of a 2-layer adapter
    took 8 ms)."""
    with torch.no_grad():
        parts = [p.detach().flatten()[::stride] for p in module.parameters()]
        if not parts:
            return torch.zeros(4, dtype=torch.float64)
        x = torch.cat([part.to(parts[0].device) for part in parts]).double()
        ramp = torch.arange(1, x.numel() + 1, dtype=x.dtype, device=x.device)
        return torch.stack(
            [
                x.sum(),
                (x * x).sum(),
                (x * ramp).sum(),
                torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device),
            ]
        ).cpu()
