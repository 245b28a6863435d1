"""Per-token files read back and compared paired across two evaluations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hetgraph.evaluation import write_per_token
from hetgraph.evaluation.intervals import BootstrapSpec, perplexity_intervals
from hetgraph.evaluation.per_token import PerTokenError, paired_ratio, read_per_token


def _write(path, doc_ids, log_probs, targets=None):
    n = len(doc_ids)
    outputs = SimpleNamespace(
        positions=torch.arange(n),
        doc_ids=torch.tensor(doc_ids),
        targets=torch.tensor(targets if targets is not None else [7] * n),
    )
    split = SimpleNamespace(doc_names=["a", "b", "c"])
    return write_per_token(path, outputs, {k: torch.tensor(v) for k, v in log_probs.items()}, split)


def test_read_back_keeps_every_field(tmp_path):
    path = _write(
        tmp_path / "run.safetensors",
        [0, 0, 1, 2],
        {"base": [-1.0, -2.0, -0.5, -3.0], "gnn": [-0.9, -1.5, -0.5, -2.0]},
    )
    run = read_per_token(path)
    assert run.methods == ("base", "gnn")
    assert run.doc_ids.tolist() == [0, 0, 1, 2] and run.doc_names == ("a", "b", "c")
    assert run.perplexity("base") == pytest.approx(np.exp(6.5 / 4), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_paired_ratio_across_files_equals_the_in_run_ratio(tmp_path, seed):
    rng = np.random.default_rng(seed)
    docs = np.repeat(np.arange(3), [5, 7, 4])
    base, gnn = -rng.random(16) * 3, -rng.random(16) * 2
    a = read_per_token(_write(tmp_path / "a.safetensors", docs, {"gnn": gnn}))
    b = read_per_token(_write(tmp_path / "b.safetensors", docs, {"base": base}))
    spec = BootstrapSpec(resamples=200, seed=3)
    ratio = paired_ratio(a, "gnn", b, "base", spec)
    _, reference = perplexity_intervals({"base": base, "gnn": gnn}, docs, spec)
    assert ratio.ratio == pytest.approx(reference["gnn/base"].ratio, rel=1e-6)
    assert ratio.ci95 == pytest.approx(reference["gnn/base"].ci95, rel=1e-6)


def test_different_tokens_are_refused(tmp_path):
    a = read_per_token(_write(tmp_path / "a.safetensors", [0, 1], {"gnn": [-1.0, -1.0]}))
    b = read_per_token(
        _write(tmp_path / "b.safetensors", [0, 1], {"gnn": [-1.0, -1.0]}, targets=[7, 8])
    )
    with pytest.raises(PerTokenError, match="scored different tokens"):
        paired_ratio(a, "gnn", b, "gnn")
    with pytest.raises(PerTokenError, match="no method 'lora'"):
        paired_ratio(a, "lora", a, "gnn")


def test_a_file_that_is_not_a_per_token_file_is_refused(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(PerTokenError, match=r"bad\.safetensors: cannot read it"):
        read_per_token(bad)
    with pytest.raises(PerTokenError, match=r"missing\.safetensors: cannot read it"):
        read_per_token(tmp_path / "missing.safetensors")
