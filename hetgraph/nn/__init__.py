"""GNN-LM graph layers: the heterogeneous attention layer and the adapter stack."""
from hetgraph.nn.adapter import AdapterConfig, GraphAdapter
from hetgraph.nn.conv import HeteroGraphAttention

__all__ = ["HeteroGraphAttention", "GraphAdapter", "AdapterConfig"]
