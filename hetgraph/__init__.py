"""hetgraph: GNN-LM for any Hugging Face decoder LM."""
__version__ = "0.1.0"
