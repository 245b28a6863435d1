"""The lm-evaluation-harness backend, offline: local task YAMLs over local JSONL files, a
tiny Qwen2, its datastore and a trained adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from hetgraph.cli import main  # noqa: E402
from hetgraph.configuration import ConfigError  # noqa: E402
from hetgraph.corpus.tokenized import TokenizedSplit  # noqa: E402
from hetgraph.evaluation import EvalConfig, evaluate_four_way  # noqa: E402
from hetgraph.harness import HetGraphHarnessLM  # noqa: E402
from hetgraph.testing import write_cli_workspace  # noqa: E402

ROLLING_TASK = """\
task: hetgraph_local_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

CHOICE_TASK = """\
task: hetgraph_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

#: Evaluation windows shared by `hetgraph eval` (through evaluate_four_way) and the harness.
WINDOWS = dict(context_length=64, stride=32, batch_size=4)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    w = write_cli_workspace(tmp_path_factory.mktemp("harness"))
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    assert (
        main(
            [
                str(a)
                for a in (
                    "datastore",
                    "build",
                    *common,
                    "--out",
                    w / "ds",
                    "--context-length",
                    "64",
                    "--stride",
                    "32",
                )
            ]
        )
        == 0
    )
    assert (
        main(
            [
                str(a)
                for a in (
                    "train",
                    *common,
                    "--datastore",
                    w / "ds",
                    "--out",
                    w / "adapter",
                    "--config",
                    w / "run.json",
                )
            ]
        )
        == 0
    )
    texts = [(w / "corpus" / f"doc{i:02d}.txt").read_text().strip() for i in (0, 1)]
    (w / "rolling.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (w / "choice.jsonl").write_text(
        "".join(
            json.dumps(q) + "\n"
            for q in (
                {
                    "question": "alpha beta",
                    "choices": [" gamma", " import os", " zzz"],
                    "answer": 0,
                },
                {"question": "def f():", "choices": [" delta", " qqq"], "answer": 0},
            )
        )
    )
    tasks = w / "tasks"
    tasks.mkdir()
    (tasks / "rolling.yaml").write_text(ROLLING_TASK.format(data=w / "rolling.jsonl"))
    (tasks / "choice.yaml").write_text(CHOICE_TASK.format(data=w / "choice.jsonl"))
    return w


def _harness(w: Path, method: str, **kwargs) -> HetGraphHarnessLM:
    return HetGraphHarnessLM(
        model=str(w / "model"),
        datastore=str(w / "ds"),
        adapter=str(w / "adapter"),
        method=method,
        threads=1,
        **WINDOWS,
        **kwargs,
    )


def _run(lm, w: Path, task: str) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        log_samples=True,
        task_manager=TaskManager(include_path=str(w / "tasks")),
    )


def _split(lm: HetGraphHarnessLM, text: str) -> TokenizedSplit:
    tokens = [lm.prefix_token_id, *lm.tok_encode(text)]
    return TokenizedSplit("test", np.asarray(tokens), np.zeros(len(tokens)), ["doc"])


def test_rolling_perplexity_equals_hetgraph_eval(workspace, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    w = workspace
    text = json.loads((w / "rolling.jsonl").read_text().splitlines()[0])["text"]
    harness = _harness(w, "gnn", k=4)
    split = _split(harness, text)
    # What `hetgraph eval` computes over exactly these tokens (valid = test: λ/T are tuned on it).
    expected = evaluate_four_way(
        harness.lm, split, split, EvalConfig(**WINDOWS, k=4), show_progress=False
    )
    results = _run(harness, w, "hetgraph_local_rolling")
    samples = results["samples"]["hetgraph_local_rolling"]
    assert len(samples) == 2
    loglikelihood = float(np.ravel(samples[0]["filtered_resps"])[0])
    n = len(split) - 1
    assert math.exp(-loglikelihood / n) == pytest.approx(expected["gnn"]["ppl"], rel=1e-5)
    assert results["results"]["hetgraph_local_rolling"]["word_perplexity,none"] > 1
    for method in ("base", "gnn_knn"):
        lam, temperature = (
            expected["gnn_knn" if method == "gnn_knn" else "knn"]["lambda"],
            expected["gnn_knn" if method == "gnn_knn" else "knn"]["temperature"],
        )
        harness = _harness(w, method, lam=lam, temperature=temperature, k=4)
        scored = harness.loglikelihood_rolling([_Request((text,))])[0]
        assert math.exp(-scored / n) == pytest.approx(expected[method]["ppl"], rel=1e-5), method


class _Request:
    def __init__(self, args):
        self.args = args


def test_multiple_choice_task_runs_offline(workspace, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    w = workspace
    results = _run(
        _harness(w, "gnn_knn", lam=0.25, temperature=10.0, k=4), w, "hetgraph_local_choice"
    )
    row = results["results"]["hetgraph_local_choice"]
    assert 0.0 <= row["acc,none"] <= 1.0
    samples = results["samples"]["hetgraph_local_choice"]
    # One log-likelihood per choice, finite, negative.
    choice_lls = [float(r[0]) for r in samples[0]["filtered_resps"]]
    assert len(choice_lls) == 3 and all(math.isfinite(x) and x < 0 for x in choice_lls)


def test_generate_until_stops_at_the_stop_string(workspace):
    harness = _harness(workspace, "gnn", k=4)
    out = harness.generate_until([_Request(("alpha beta", {"until": ["\n"], "max_gen_toks": 8}))])
    assert isinstance(out[0], str) and "\n" not in out[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nonsense"), "method"),
        (dict(method="gnn", adapter=None), "adapter=DIR"),
        (dict(method="knn", datastore=None, adapter=None), "datastore=DIR"),
    ],
)
def test_bad_model_args_are_one_line(workspace, kwargs, match):
    args = {
        "model": str(workspace / "model"),
        "datastore": str(workspace / "ds"),
        "adapter": str(workspace / "adapter"),
        "threads": 1,
        **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        HetGraphHarnessLM(**args)


def test_registered_under_hetgraph():
    from lm_eval.api.registry import get_model

    assert get_model("hetgraph") is HetGraphHarnessLM


def test_command_line_runs_both_local_tasks(workspace, monkeypatch, tmp_path, capsys):
    """`hetgraph-lm-eval` is lm-eval's own command line with the backend registered."""
    from hetgraph.harness import main as harness_main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    w = workspace
    model_args = (
        f"model={w / 'model'},datastore={w / 'ds'},adapter={w / 'adapter'},"
        "method=gnn_knn,lam=0.25,temperature=10.0,k=4,context_length=64,stride=32,"
        "threads=1"
    )
    harness_main(
        [
            "--model",
            "hetgraph",
            "--model_args",
            model_args,
            "--tasks",
            "hetgraph_local_rolling,hetgraph_local_choice",
            "--include_path",
            str(w / "tasks"),
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())["results"]
    assert results["hetgraph_local_rolling"]["word_perplexity,none"] > 1
    assert 0 <= results["hetgraph_local_choice"]["acc,none"] <= 1
