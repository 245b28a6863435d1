"""Fusion of graph adapters into a frozen causal LM through forward hooks."""

from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.context import CallOptions, KNNMixture, Retrieval
from hetgraph.fusion.gates import RetrievalGate, retrieval_statistics
from hetgraph.fusion.graph_inputs import AdapterInputs, GraphInputBuilder
from hetgraph.fusion.hooks import FusionHooks
from hetgraph.fusion.lm import HetGraphLM
from hetgraph.fusion.neighbour_states import NeighbourStates
from hetgraph.fusion.persistence import AdapterMismatchError
from hetgraph.fusion.retrieval import Retriever
from hetgraph.fusion.sites import ALL, parse_fusion_layers, resolve_fusion_sites, site_key

__all__ = [
    "ALL",
    "HEAD",
    "AdapterInputs",
    "AdapterMismatchError",
    "CallOptions",
    "FusionConfig",
    "FusionHooks",
    "FusionSite",
    "GraphInputBuilder",
    "HetGraphLM",
    "KNNMixture",
    "NeighbourStates",
    "Retrieval",
    "RetrievalGate",
    "Retriever",
    "parse_fusion_layers",
    "resolve_fusion_sites",
    "retrieval_statistics",
    "site_key",
]
