"""Dense variants of the graph layers (masked attention over regular window grids)."""

from hetgraph.nn.dense.window_attention import dense_window_attention

__all__ = ["dense_window_attention"]
