"""kNN-LM mixture against naive per-token Python references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetgraph.knnlm import (
    interpolate_log_probs,
    knn_log_probs,
    knn_mixture_argmax,
    knn_target_log_probs,
    perplexity,
    tune_knn,
)

Q, K, V = 40, 6, 12


def random_case(seed: int, missing: bool = False):
    g = torch.Generator().manual_seed(seed)
    distances = torch.rand(Q, K, generator=g) * 10
    distances, _ = distances.sort(dim=1)
    tokens = torch.randint(0, V, (Q, K), generator=g)  # few tokens: many repeats
    if missing:
        distances[::3, -2:] = math.inf
        tokens[::3, -2:] = -1
        distances[5], tokens[5] = math.inf, -1  # a query with no neighbour at all
    lm = torch.log_softmax(torch.randn(Q, V, generator=g) * 2, dim=-1)
    targets = torch.randint(0, V, (Q,), generator=g)
    return distances, tokens, lm, targets


def naive_knn_probs(distances, tokens, temperature):
    out = np.zeros((Q, V))
    for q in range(Q):
        valid = [j for j in range(K) if math.isfinite(distances[q, j]) and tokens[q, j] >= 0]
        if not valid:
            continue
        z = sum(math.exp(-float(distances[q, j]) / temperature) for j in valid)
        for j in valid:
            out[q, int(tokens[q, j])] += math.exp(-float(distances[q, j]) / temperature) / z
    return out


@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 3.0])
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.9, 1.0])
def test_mixture_equals_naive_reference(missing, temperature, lam):
    distances, tokens, lm, targets = random_case(0, missing)
    knn = knn_log_probs(distances, tokens, V, temperature)
    assert knn.dtype == torch.float32 and knn.shape == (Q, V)
    p_knn = naive_knn_probs(distances, tokens, temperature)
    np.testing.assert_allclose(knn.exp().numpy(), p_knn, atol=1e-6)
    mix = interpolate_log_probs(lm, knn, lam)
    naive = np.array(
        [
            [lam * p_knn[q, w] + (1 - lam) * math.exp(float(lm[q, w])) for w in range(V)]
            for q in range(Q)
        ]
    )
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(
            mix.numpy(), np.log(naive).astype(np.float32), rtol=1e-5, atol=1e-5
        )
    # The cheap target-only path agrees with the full distribution.
    target_lp = knn_target_log_probs(distances, tokens, targets, temperature)
    np.testing.assert_allclose(
        target_lp.numpy(), knn.gather(1, targets[:, None]).squeeze(1).numpy(), atol=1e-6
    )
    # The exact mixture argmax over {LM argmax} ∪ {neighbour tokens} equals the full argmax.
    pred = knn_mixture_argmax(
        lm.argmax(-1),
        lm.gather(1, tokens.clamp(min=0)),
        distances,
        tokens,
        lam,
        temperature,
        lm_argmax_log_probs=lm.max(-1).values,
        chunk_size=7,
    )
    defined = naive.max(-1) > 0  # λ = 1 and no neighbour: the mixture is all zero
    np.testing.assert_array_equal(pred.numpy()[defined], naive.argmax(-1)[defined])
    np.testing.assert_array_equal(pred.numpy()[~defined], lm.argmax(-1).numpy()[~defined])
    # The memory cap on a comparison block (here: one query per block) changes nothing.
    capped = knn_mixture_argmax(
        lm.argmax(-1),
        lm.gather(1, tokens.clamp(min=0)),
        distances,
        tokens,
        lam,
        temperature,
        lm_argmax_log_probs=lm.max(-1).values,
        max_block_elements=1,
    )
    np.testing.assert_array_equal(capped.numpy(), pred.numpy())


def test_missing_targets_and_edges():
    distances = torch.tensor([[1.0, 2.0], [math.inf, math.inf]])
    tokens = torch.tensor([[3, 3], [-1, -1]])
    lp = knn_target_log_probs(distances, tokens, torch.tensor([4, 3]), 1.0)
    assert torch.isneginf(lp).all()
    assert torch.isneginf(knn_log_probs(distances, tokens, 5, 1.0)[1]).all()
    assert knn_log_probs(distances, tokens, 5, 1.0)[0, 3] == pytest.approx(0.0, abs=1e-6)
    lm = torch.tensor([-1.0, -2.0])
    np.testing.assert_array_equal(
        interpolate_log_probs(lm, torch.tensor([-5.0, -math.inf]), 0.0), lm
    )
    assert perplexity(torch.tensor([-1.0, -math.inf])) == math.inf
    with pytest.raises(ValueError, match="lambda"):
        interpolate_log_probs(lm, lm, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        knn_log_probs(distances, tokens, 5, 0.0)
    with pytest.raises(ValueError, match="vocab_size"):
        knn_log_probs(distances, tokens, 3, 1.0)
    # float16 / numpy inputs are computed in float32.
    out = knn_log_probs(distances.numpy().astype(np.float16), tokens.numpy(), 5, 1.0)
    assert out.dtype == torch.float32


def test_tune_picks_the_grid_optimum():
    distances, tokens, lm, targets = random_case(1)
    # Make the neighbours informative so that λ > 0 wins.
    tokens[:, 0] = targets
    lm_target = lm.gather(1, targets[:, None]).squeeze(1)
    lambdas, temperatures = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9], [0.3, 1.0, 3.0, 10.0]
    lam, temp, grid = tune_knn(lm_target, distances, tokens, targets, lambdas, temperatures)
    assert grid.shape == (6, 4)
    brute = np.empty((6, 4))
    for j, t in enumerate(temperatures):
        p_knn = naive_knn_probs(distances, tokens, t)
        for i, l in enumerate(lambdas):
            p = [
                l * p_knn[q, int(targets[q])] + (1 - l) * math.exp(float(lm_target[q]))
                for q in range(Q)
            ]
            brute[i, j] = math.exp(-np.mean(np.log(p)))
    np.testing.assert_allclose(grid, brute, rtol=1e-5)
    i, j = np.unravel_index(brute.argmin(), brute.shape)
    assert (lam, temp) == (lambdas[i], temperatures[j]) and lam > 0
