"""Fusion of graph adapters into a frozen causal LM through forward hooks."""
from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.context import CallOptions, KNNMixture, Retrieval
from hetgraph.fusion.graph_inputs import AdapterInputs, GraphInputBuilder
from hetgraph.fusion.hooks import FusionHooks
from hetgraph.fusion.lm import HetGraphLM, site_key
from hetgraph.fusion.persistence import AdapterMismatchError
from hetgraph.fusion.retrieval import Retriever

__all__ = [
    "HEAD", "AdapterInputs", "AdapterMismatchError", "CallOptions", "FusionConfig", "FusionHooks",
    "FusionSite", "GraphInputBuilder", "HetGraphLM", "KNNMixture", "Retrieval", "Retriever",
    "site_key",
]
