"""The shortcut of training from stored keys: logits at datastore rows without a base forward."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from hetgraph.fusion.config import HEAD
from hetgraph.fusion.context import CallOptions
from hetgraph.fusion.sites import site_key
from hetgraph.models.layers import output_embedding_input_hook_target

if TYPE_CHECKING:
    from hetgraph.fusion.lm import HetGraphLM


def logits_from_datastore(lm: HetGraphLM, rows: Tensor) -> Tensor:
    """Logits of ``lm`` at datastore rows ``[B, T]`` computed from their stored keys.

    With retrieval and fusion at the LM-head input the base model's state at a corpus
    position *is* its stored key, so ``logits = lm_head(fuse(k, adapter(G)))`` needs no
    base forward. ``rows`` may be any sample of rows, or with ``c2c`` (paper mode)
    contiguous spans ``s, s + 1, …`` (the causal edges link a span's positions as they
    link a text's). The leakage filter hides each row's own neighbourhood.

    Raises:
        ValueError: if :attr:`HetGraphLM.can_run_from_datastore
            <hetgraph.HetGraphLM.can_run_from_datastore>` is False, or ``c2c`` is on and a
            row of ``rows`` is not a contiguous span.
    """
    if not lm.can_run_from_datastore:
        raise ValueError(
            "forward_from_datastore needs retrieval and fusion "
            "at the LM-head input and key features; "
            "use forward() with input_ids instead"
        )
    if (
        lm.graph_config.c2c
        and rows.shape[1] > 1
        and not bool((rows[:, 1:] - rows[:, :-1] == 1).all())
    ):
        raise ValueError(
            "forward_from_datastore with c2c edges needs contiguous spans of "
            "rows (rows[b] = s, s + 1, …): the causal edges link neighbouring "
            "positions of a text"
        )
    gate = lm.gates[site_key(HEAD)]
    rows = rows.to(gate.device)
    keys = lm.graph_inputs.neighbour_features_of(rows.reshape(-1), HEAD)
    hidden = keys.to(dtype=next(lm.model.parameters()).dtype).view(*rows.shape, -1)
    retrieval = lm.retrieve(hidden, CallOptions(query_positions=rows))
    length = rows.shape[1]
    fused = lm.fuse(
        HEAD, hidden, lm.build_graph(retrieval, length), lm.gate_statistics(retrieval, length)
    )
    # .forward, not __call__: the LM head's fusion hook (if attached) must not fuse twice.
    head = output_embedding_input_hook_target(lm.model)
    if lm.config.orig_prob_ratio > 0:
        return lm.mix_original(head.forward(fused), head.forward(hidden))
    return head.forward(fused)
