"""GNN-LM graph layers: the heterogeneous attention layer and the adapter stack."""
from hetgraph.nn.adapter import GraphAdapter
from hetgraph.nn.config import AdapterConfig
from hetgraph.nn.conv import HeteroGraphAttention

__all__ = ["AdapterConfig", "GraphAdapter", "HeteroGraphAttention"]
