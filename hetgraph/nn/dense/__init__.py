"""Dense variants of the graph layers (masked attention over regular window grids)."""

from hetgraph.nn.dense.causal_attention import (
    CausalLayout,
    causal_layout,
    dense_causal_window_attention,
)
from hetgraph.nn.dense.query_attention import dense_query_attention
from hetgraph.nn.dense.window_attention import dense_window_attention

__all__ = [
    "CausalLayout",
    "causal_layout",
    "dense_causal_window_attention",
    "dense_query_attention",
    "dense_window_attention",
]
