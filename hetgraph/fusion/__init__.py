"""Fusion of graph adapters into a frozen causal LM through forward hooks.

:class:`HetGraphLM` joins a base model and a :class:`FusionEngine` (retrieval, graph
building, adapters and gates; it never holds the base model). The modules below hold the
rest (:mod:`~hetgraph.fusion.hooks`, :mod:`~hetgraph.fusion.context`,
:mod:`~hetgraph.fusion.persistence`, …) for those who extend them.
"""

from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.context import CallOptions, KNNMixture, Retrieval
from hetgraph.fusion.engine import FusionEngine, ModelGeometry
from hetgraph.fusion.gates import RetrievalGate
from hetgraph.fusion.graph_inputs import GraphInputBuilder
from hetgraph.fusion.lm import HetGraphLM
from hetgraph.fusion.neighbour_states import NeighbourStates
from hetgraph.fusion.persistence import AdapterMismatchError
from hetgraph.fusion.retrieval import Retriever
from hetgraph.fusion.sites import ALL, resolve_fusion_sites

__all__ = [
    "ALL",
    "HEAD",
    "AdapterMismatchError",
    "CallOptions",
    "FusionConfig",
    "FusionEngine",
    "FusionSite",
    "GraphInputBuilder",
    "HetGraphLM",
    "KNNMixture",
    "ModelGeometry",
    "NeighbourStates",
    "Retrieval",
    "RetrievalGate",
    "Retriever",
    "resolve_fusion_sites",
]
