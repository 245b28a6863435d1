"""Why did the model predict that? The retrieved corpus contexts behind a position.

For any position of any text, :func:`inspect_positions` returns the ``k`` corpus
positions the query retrieved, as readable text with their distance, their document
and the attention the adapter's last graph layer gave them (per fused site), next to
the base and GNN-LM predictions and, with ``FusionConfig(gate="retrieval")``, each site's
retrieval-gate factor at the position. With a knowledge graph (``FusionConfig.kg``) it also
lists the facts each position saw, with the attention the last graph layer gave them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hetgraph.datastore import HiddenStateCapture
from hetgraph.errors import HetgraphError
from hetgraph.fusion.config import HEAD
from hetgraph.fusion.context import CallOptions, call_options, fusion_only
from hetgraph.fusion.engine import FusionEngine
from hetgraph.fusion.hooks import FusionHooks
from hetgraph.fusion.sites import site_key
from hetgraph.graph import K2C, KG, N2C

#: Tokens of corpus text shown left of a retrieved position.
CONTEXT_TOKENS = 16


@dataclass
class Neighbour:
    """One retrieved corpus position."""

    rank: int
    row: int
    distance: float
    document: str
    context: str
    token: str
    next_token: str
    attention: dict[str, float] = field(default_factory=dict)


@dataclass
class Fact:
    """One knowledge-graph fact a position saw (a model that fuses a knowledge graph):
    its triple by entity and relation names, and per fused site the attention of the last
    graph layer's ``k2c`` relation on it (mean over heads; a position's facts share 1, and
    the message then passes the learned ``k2c`` gate)."""

    head: str
    relation: str
    tail: str
    attention: dict[str, float] = field(default_factory=dict)


@dataclass
class NeighbourReport:
    """The neighbours behind one position of a text."""

    position: int
    token: str
    actual_next: str | None
    base_prediction: str
    gnn_prediction: str
    neighbours: list[Neighbour]
    #: Per fused site, the retrieval gate's factor σ(a·s + b) at this position
    #: (``FusionConfig(gate="retrieval")`` only; empty otherwise).
    gate_factors: dict[str, float] = field(default_factory=dict)
    #: The knowledge-graph facts the position saw, in rank order (empty without one).
    facts: list[Fact] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``hetgraph inspect --json``)."""
        return asdict(self)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _facts_seen(
    engine: FusionEngine, graph: Any, attention: dict[str, Any], positions: Sequence[int]
) -> list[list[Fact]]:
    """Per position, the facts of its ``k2c`` edges (in rank order) with each site's
    last-layer attention on them (``attention``: ``{site: (edge_index, alpha)}``)."""
    knowledge = engine.knowledge
    if knowledge is None or not attention:
        return [[] for _ in positions]
    store, names = graph[KG], knowledge.graph.entity_names
    edge_index = next(iter(attention.values()))[0].cpu()  # the same edges at every site
    weights = {site: alpha.float().mean(-1).cpu() for site, (_, alpha) in attention.items()}
    reports = []
    for position in positions:  # a few positions, each with at most k_kg facts
        edges = (edge_index[1] == position).nonzero().view(-1).tolist()
        reports.append(
            [
                Fact(
                    head=names[int(store.head[int(edge_index[0, e])])],
                    relation=knowledge.graph.relations[int(store.relation[int(edge_index[0, e])])],
                    tail=names[int(store.tail[int(edge_index[0, e])])],
                    attention={site: float(w[e]) for site, w in weights.items()},
                )
                for e in edges
            ]
        )
    return reports


def _neighbour_attention(
    engine: FusionEngine,
    embedding: nn.Module,
    hidden: dict[Any, Tensor],
    ids: Tensor,
    positions: Sequence[int],
    input_ids: Tensor,
) -> tuple[dict[str, Tensor], list[list[Fact]]]:
    """``{site: [P, k]}`` attention of each fused site's last graph layer on the ``k``
    retrieved neighbours of each of ``P`` ``positions`` (mean over heads; summed over the
    window for ``n2c="window"``), and with a knowledge graph the facts each position saw
    (:func:`_facts_seen`). The graph covers the whole text (``hidden`` ``[T, d]`` per
    site, ``ids`` ``[T, k]``, ``input_ids`` ``[T]``), as in the forward, so ``c2c`` edges
    count."""
    out: dict[str, Tensor] = {}
    kg_attention: dict[str, Any] = {}
    length, k = ids.shape
    graph = engine.graph_inputs.build_graph(ids[None])
    if engine.knowledge is not None:
        engine.knowledge.add_facts(graph, input_ids.reshape(1, -1).to(ids.device))
    for site in engine.fusion_sites:
        adapter = engine.adapter_at(site)
        dtype = engine.gates[site_key(site)].dtype
        site_hidden = hidden[None if site == HEAD else site][None]  # [1, T, d]
        inputs = engine.graph_inputs.adapter_inputs(graph, site_hidden, site, embedding, dtype)
        _, attention = adapter(
            inputs.graph,
            inputs.ctx_x,
            inputs.nbr_x,
            inputs.nbr_token_x,
            nbr_token_index=inputs.nbr_token_index,
            nbr_index=inputs.nbr_index,
            return_attention_weights=True,
        )
        if K2C in attention[-1]:
            kg_attention[site_key(site)] = attention[-1][K2C]
        table = torch.zeros(length, k)  # ctx node t is position t (one sequence, no mask)
        if N2C not in attention[-1]:  # adapter.use_n2c=False: the knowledge graph alone
            out[site_key(site)] = table[list(positions)]
            continue
        edge_index, alpha = attention[-1][N2C]
        # Each n2c edge records which of its query's k neighbours (and which window token)
        # it comes from; summing over the window gives one weight per retrieved neighbour.
        table.index_put_(
            (edge_index[1].cpu(), graph[N2C].nbr_slot.cpu()),
            alpha.float().mean(dim=-1).cpu(),
            accumulate=True,
        )
        out[site_key(site)] = table[list(positions)]
    return out, _facts_seen(engine, graph, kg_attention, positions)


def _gate_factors(
    engine: FusionEngine, retrieval: Any, length: int, positions: Sequence[int]
) -> dict[str, Tensor]:
    """``{site: [P]}`` retrieval-gate factors at ``positions`` (empty without that gate)."""
    statistics = engine.gate_statistics(retrieval, length)
    if statistics is None:
        return {}
    chosen = statistics[0, list(positions)]
    return {key: gate(chosen).float().cpu() for key, gate in engine.retrieval_gates.items()}


@torch.no_grad()
def _forwards(model: nn.Module, engine: FusionEngine, ids: Tensor) -> tuple[Tensor, Any, dict]:
    """``(base logits, fused output, {site: hidden [T, d]})`` of ``ids [1, T]``, whether or
    not hooks of this or another engine are attached to ``model``: the base pass runs with
    every fusion hook off, the fused one through hooks of its own (the others off)."""
    sites = [None if s == HEAD else s for s in engine.fusion_sites]
    with fusion_only(None):
        base_logits = model(input_ids=ids, use_cache=False).logits[0]
    # Registered before the fusion hooks, the capture sees each fused site's input state.
    with HiddenStateCapture(model, sites) as capture:
        hooks = FusionHooks(model, engine)
        hooks.attach()
        try:
            with fusion_only(hooks), call_options(CallOptions(output_retrieval=True)):
                output = model(input_ids=ids, use_cache=False)
        finally:
            hooks.detach()
        site_hidden = {layer: h[0] for layer, h in capture.states.items()}
    return base_logits, output, site_hidden


@torch.no_grad()
def inspect_positions(
    model: nn.Module,
    engine: FusionEngine,
    tokenizer: Any,
    input_ids: Tensor,
    positions: Sequence[int],
    num_neighbours: int = 8,
    context_tokens: int = CONTEXT_TOKENS,
) -> list[NeighbourReport]:
    """Neighbour reports for ``positions`` of one token sequence ``input_ids [T]``, from the
    base ``model`` and the fusion ``engine`` (``lm.model``, ``lm.engine`` of a
    :class:`~hetgraph.HetGraphLM`, attached or not)."""
    length = int(input_ids.shape[-1])
    positions = [p % length for p in positions]
    device = next(model.parameters()).device
    ids = input_ids.reshape(1, -1).to(device)
    base_logits, output, site_hidden = _forwards(model, engine, ids)
    gnn_logits = output.logits[0]
    neighbour_ids = output.retrieval.neighbour_ids[0, positions].cpu()
    distances = output.retrieval.distances[0, positions].cpu()
    attention, facts = _neighbour_attention(
        engine,
        model.get_input_embeddings(),
        site_hidden,
        output.retrieval.neighbour_ids[0],
        positions,
        input_ids,
    )
    factors = _gate_factors(engine, output.retrieval, length, positions)
    store = engine.datastore
    reports = []
    for i, position in enumerate(positions):
        neighbours = []
        for rank in range(min(num_neighbours, neighbour_ids.shape[1])):
            row = int(neighbour_ids[i, rank])
            if row < 0:
                continue
            doc = int(store.doc_ids[row])
            start = row
            # Left context inside the neighbour's own document only.
            lo = max(0, row - context_tokens)
            same_doc = np.asarray(store.doc_ids[lo : row + 1]) == doc
            start = lo + int(np.argmax(same_doc))
            neighbours.append(
                Neighbour(
                    rank=rank,
                    row=row,
                    distance=float(distances[i, rank]),
                    document=store.document_name(row),
                    context=_decode(tokenizer, store.tokens[start:row]),
                    token=_decode(tokenizer, [store.tokens[row]]),
                    next_token=_decode(tokenizer, [store.next_tokens[row]]),
                    attention={site: float(table[i, rank]) for site, table in attention.items()},
                )
            )
        reports.append(
            NeighbourReport(
                position=position,
                token=_decode(tokenizer, [input_ids.reshape(-1)[position]]),
                actual_next=(
                    _decode(tokenizer, [input_ids.reshape(-1)[position + 1]])
                    if position + 1 < length
                    else None
                ),
                base_prediction=_decode(tokenizer, [int(base_logits[position].argmax())]),
                gnn_prediction=_decode(tokenizer, [int(gnn_logits[position].argmax())]),
                neighbours=neighbours,
                gate_factors={site: float(values[i]) for site, values in factors.items()},
                facts=facts[i],
            )
        )
    return reports


def inspect_position(
    model: nn.Module,
    engine: FusionEngine,
    tokenizer: Any,
    text: str,
    position: int = -1,
    num_neighbours: int = 8,
) -> NeighbourReport:
    """The corpus contexts retrieved for token ``position`` of ``text`` (``-1``: the last).

    Args:
        model: the base model (``lm.model``; hooks attached or not).
        engine: the fusion engine with its datastore, index and (trained or zero-gate)
            adapters (``lm.engine``).
        tokenizer: its tokenizer.
        text: any text.
        position: token position whose query is inspected (it predicts the next token).
        num_neighbours: neighbours shown (nearest first).
    """
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if input_ids.numel() == 0:
        raise HetgraphError("the text is empty after tokenization; give some text to inspect")
    if not -input_ids.numel() <= position < input_ids.numel():
        raise HetgraphError(
            f"--position {position} is outside the text's {input_ids.numel()} "
            f"tokens; give a position in [-{input_ids.numel()}, "
            f"{input_ids.numel() - 1}]"
        )
    return inspect_positions(model, engine, tokenizer, input_ids, [position], num_neighbours)[0]


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: newlines as ``⏎`` and every other
    non-printable character (ANSI escape codes, other control and bidirectional-override
    characters) as its Python escape, e.g. ``\\x1b``."""
    return "".join(
        ch if ch.isprintable() else "⏎" if ch == "\n" else ch.encode("unicode_escape").decode()
        for ch in text
    )


def format_report(report: NeighbourReport) -> str:
    """Human-readable text of one report; corpus text, tokens and document names are
    escaped with :func:`printable`, so nothing in the corpus reaches the terminal raw."""
    lines = [
        f"position {report.position}: token {report.token!r} → next {report.actual_next!r}; "
        f"base predicts {report.base_prediction!r}, GNN-LM predicts {report.gnn_prediction!r}"
    ]
    if report.gate_factors:
        lines.append(
            "  retrieval gate "
            + " ".join(f"{site}={value:.3f}" for site, value in report.gate_factors.items())
        )
    for n in report.neighbours:
        attention = " ".join(f"{site}={value:.3f}" for site, value in n.attention.items())
        lines.append(
            f"  #{n.rank} d={n.distance:.1f} att[{attention}] {printable(n.document)}: "
            f"…{printable(n.context)}[{printable(n.token)}]→{n.next_token!r}"
        )
    for fact in report.facts:
        attention = " ".join(f"{site}={value:.3f}" for site, value in fact.attention.items())
        lines.append(
            f"  fact att[{attention}] ({printable(fact.head)}, {printable(fact.relation)}, "
            f"{printable(fact.tail)})"
        )
    return "\n".join(lines)


def describe_generation(
    model: nn.Module,
    engine: FusionEngine,
    tokenizer: Any,
    sequence: Tensor,
    prompt_length: int,
    num_neighbours: int = 3,
) -> str:
    """The neighbours behind every generated token of ``sequence`` (prompt + generation)."""
    positions = list(range(prompt_length - 1, int(sequence.shape[-1]) - 1))
    reports = inspect_positions(model, engine, tokenizer, sequence, positions, num_neighbours)
    return "\n".join(format_report(report) for report in reports)
