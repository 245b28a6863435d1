"""The optimiser settings of TrainingConfig reach the optimiser (paper mode's Adam betas)."""

from __future__ import annotations

import pytest
import torch

from hetgraph.configuration import ConfigError
from hetgraph.training import TrainingConfig
from hetgraph.training.schedule import optimizer_and_schedule


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.98), (0.0, 0.5)])
def test_betas_round_trip_and_reach_the_optimizer(betas):
    config = TrainingConfig.from_dict({"betas": list(betas)})
    assert config.betas == betas
    assert TrainingConfig.from_dict(config.to_dict()).betas == betas
    optimizer, _ = optimizer_and_schedule([torch.nn.Parameter(torch.zeros(3))], config)
    assert optimizer.param_groups[0]["betas"] == betas


def test_default_betas_are_pytorchs():
    assert TrainingConfig().betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "betas, message",
    [
        ([0.9, 1.0], "betas must be two numbers in [0, 1)"),
        ([-0.1, 0.9], "betas must be two numbers in [0, 1)"),
        ([0.9], "betas: expected list of 2"),
    ],
)
def test_bad_betas_name_the_key(betas, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainingConfig.from_dict({"betas": betas})
