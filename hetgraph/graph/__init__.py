"""Heterogeneous context graphs for GNN-LM (PyG ``HeteroData``)."""

from hetgraph.graph.builder import build_context_graph
from hetgraph.graph.config import (
    C2C,
    CTX,
    EDGE_TYPES,
    K2C,
    K2K,
    K2N,
    KG,
    KG_EDGE_TYPES,
    N2C,
    N2N,
    NBR,
    GraphConfig,
    KGGraphConfig,
    context_graph_metadata,
)
from hetgraph.graph.corpus import CorpusTable, gather_rows
from hetgraph.graph.data import ContextGraph, ctx_to_dense, n2c_to_dense, window_rows
from hetgraph.graph.kg import KGFacts, add_kg_nodes, k2k_edges
from hetgraph.graph.layout import LayoutKind, WindowLayout
from hetgraph.graph.leakage import leakage_mask

__all__ = [
    "C2C",
    "CTX",
    "EDGE_TYPES",
    "K2C",
    "K2K",
    "K2N",
    "KG",
    "KG_EDGE_TYPES",
    "N2C",
    "N2N",
    "NBR",
    "ContextGraph",
    "CorpusTable",
    "GraphConfig",
    "KGFacts",
    "KGGraphConfig",
    "LayoutKind",
    "WindowLayout",
    "add_kg_nodes",
    "build_context_graph",
    "context_graph_metadata",
    "ctx_to_dense",
    "gather_rows",
    "k2k_edges",
    "leakage_mask",
    "n2c_to_dense",
    "window_rows",
]
