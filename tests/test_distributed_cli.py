"""The ``hetgraph`` commands under ``torchrun`` (2 CPU processes, Gloo, tiny Qwen2).

``tests/test_distributed.py`` checks the distributed code paths through the API; this checks
that the command line reaches them: ``torchrun -m hetgraph datastore build`` writes the same
bytes as one process, ``train`` runs DDP and writes its adapter once, and ``eval`` reports
the same four-way results as one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetgraph.cli import main
from hetgraph.io import ADAPTER_CONFIG, INDEX_DIR
from hetgraph.locking import LOCK_FILE
from hetgraph.testing import write_cli_workspace

DATASTORE = ["--context-length", "64", "--stride", "32", "--batch-size", "4"]


def _common(root: Path) -> list[str]:
    return ["--model", str(root / "model"), "--corpus", str(root / "corpus"), "--threads", "1"]


def _torchrun(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "hetgraph",
        *(str(a) for a in argv),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != LOCK_FILE
    }


def _without_speed(path: Path) -> dict:
    results = json.loads(path.read_text())
    results.pop("speed", None)
    return results


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun-cli")
    write_cli_workspace(root)
    assert main(["datastore", "build", *_common(root), "--out", str(root / "ds1"), *DATASTORE]) == 0
    return root


def test_torchrun_datastore_build_writes_the_single_process_bytes(ws):
    done = _torchrun("datastore", "build", *_common(ws), "--out", ws / "ds2", *DATASTORE)
    assert _files(ws / "ds2") == _files(ws / "ds1")
    assert _files(ws / "ds2" / INDEX_DIR) == _files(ws / "ds1" / INDEX_DIR)
    assert done.stdout.count("datastore: ") == 1  # rank 0 reports, once


def test_torchrun_train_then_eval_match_one_process(ws):
    train = [
        "train",
        *_common(ws),
        "--datastore",
        ws / "ds1",
        "--config",
        ws / "run.json",
        "--max-steps",
        "2",
    ]
    _torchrun(*train, "--out", ws / "adapter2")
    assert (ws / "adapter2" / ADAPTER_CONFIG).is_file()
    evaluate = [
        "eval",
        *_common(ws),
        "--datastore",
        ws / "ds1",
        "--adapter",
        ws / "adapter2",
        "--max-tokens",
        "200",
        "--tune-tokens",
        "200",
    ]
    _torchrun(*evaluate, "--json", ws / "two.json")
    assert main([str(a) for a in evaluate] + ["--json", str(ws / "one.json")]) == 0
    one, two = _without_speed(ws / "one.json"), _without_speed(ws / "two.json")
    assert one == two
    assert set(one) >= {"base", "knn", "gnn", "gnn_knn"}
