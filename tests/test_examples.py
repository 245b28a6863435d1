"""Every example in ``examples/`` runs end to end with ``--tiny`` and prints its success line.

The examples start together in a module-scoped fixture (each in its own subprocess and
temporary work directory), so the file takes about as long as the slowest example plus
the import overhead spread over the cores, instead of the sum of all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: example script -> lines its output must contain.
EXPECTED = {
    "01_build_datastore.py": ["datastore: ", "nearest rows of row 0: [0,", "datastore OK"],
    "02_train_adapter.py": ["(exact identity)", "changes the logits by 0.0e+00", "training OK"],
    "03_evaluate_four_way.py": [
        "| base LM |",
        "| kNN-LM |",
        "| GNN-LM |",
        "| GNN-LM + kNN |",
        "evaluation OK",
    ],
    "04_generate_with_neighbours.py": [
        "generated: ",
        "base predicts",
        "GNN-LM predicts",
        "generation OK",
    ],
    "05_graph_standalone.py": [
        "nbr-n2c-ctx",
        "n2c attention sums per ctx node (head 0): [1.0",
        "graph OK",
    ],
    "06_gpu_recipe_qwen2_1p5b.py": [
        "bf16 weights 3.55 GB",
        "fp16 keys 307.2 GB",
        "| GNN-LM + kNN |",
        "recipe OK",
    ],
}
TIMEOUT_S = 300


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {
        **os.environ,
        "HETGRAPH_EXAMPLES_TINY": "1",
        "HETGRAPH_CACHE": str(tmp_path_factory.mktemp("cache")),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    procs = {}
    for name in EXPECTED:
        out = tmp_path_factory.mktemp(name.removesuffix(".py"))
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / name),
                "--tiny",
                "--threads",
                "1",
                *(["--out", str(out)] if name != "05_graph_standalone.py" else []),
            ],
            cwd=out,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    results = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        results[name] = (proc.returncode, output)
    return results


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_tiny(name, runs):
    returncode, output = runs[name]
    assert returncode == 0, f"{name} exited with {returncode}:\n{output[-4000:]}"
    for expected in EXPECTED[name]:
        assert expected in output, (
            f"{name}: {expected!r} missing from its output:\n{output[-4000:]}"
        )
