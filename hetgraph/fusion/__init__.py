"""Fusion of graph adapters into a frozen causal LM through forward hooks."""
from hetgraph.fusion.config import HEAD, FusionConfig, FusionSite
from hetgraph.fusion.lm import AdapterMismatchError, HetGraphLM
from hetgraph.fusion.retrieval import Retriever

__all__ = ["HEAD", "AdapterMismatchError", "FusionConfig", "FusionSite", "HetGraphLM", "Retriever"]
