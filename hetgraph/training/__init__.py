"""Training the graph adapters (the base LM stays frozen)."""

from hetgraph.training.checkpoint import InitAdapterError
from hetgraph.training.config import TrainingConfig
from hetgraph.training.schedule import learning_rate_factor
from hetgraph.training.trainer import TrainingResult, train_adapter

__all__ = [
    "InitAdapterError",
    "TrainingConfig",
    "TrainingResult",
    "learning_rate_factor",
    "train_adapter",
]
