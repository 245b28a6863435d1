"""Heterogeneous context graphs for GNN-LM (PyG ``HeteroData``)."""
from hetgraph.graph.builder import (
    GRID_LAYOUT,
    IRREGULAR_LAYOUT,
    SHARED_LAYOUT,
    ContextGraph,
    build_context_graph,
    ctx_to_dense,
    is_grid_graph,
    leakage_mask,
    n2c_to_dense,
)
from hetgraph.graph.config import (
    C2C,
    CTX,
    EDGE_TYPES,
    N2C,
    N2N,
    NBR,
    GraphConfig,
    context_graph_metadata,
)

__all__ = [
    "GraphConfig",
    "ContextGraph",
    "build_context_graph",
    "ctx_to_dense",
    "is_grid_graph",
    "leakage_mask",
    "n2c_to_dense",
    "context_graph_metadata",
    "CTX",
    "NBR",
    "N2N",
    "N2C",
    "C2C",
    "EDGE_TYPES",
    "GRID_LAYOUT",
    "IRREGULAR_LAYOUT",
    "SHARED_LAYOUT",
]
