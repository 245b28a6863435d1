"""GNN-LM graph layers: the heterogeneous attention layer, its dense path and the adapter stack."""

from hetgraph.nn.adapter import GraphAdapter
from hetgraph.nn.config import AdapterConfig
from hetgraph.nn.conv import HeteroGraphAttention, RelationParameters
from hetgraph.nn.dense import dense_causal_window_attention, dense_window_attention
from hetgraph.nn.gnnlm import GNNLMStateDictError
from hetgraph.nn.kg import KGFactEncoder, fact_feature_channels

__all__ = [
    "AdapterConfig",
    "GNNLMStateDictError",
    "GraphAdapter",
    "HeteroGraphAttention",
    "KGFactEncoder",
    "RelationParameters",
    "dense_causal_window_attention",
    "dense_window_attention",
    "fact_feature_channels",
]
