"""Fault injection: ``kill -9`` a datastore build, an index build and a training run at random
points, resume, and get exactly what an uninterrupted run gives.

Each stage runs in a child process forked from a ``forkserver`` that has already imported
torch, transformers and hetgraph (so a child starts in milliseconds instead of seconds).
The parent times an uninterrupted run of the stage, then, for a seeded list of kill points,
starts the stage in a child, waits a random fraction of that time after the child says it
has begun, and sends ``SIGKILL``. It then runs the same stage again in-process — exactly what
a user does after a crash — and compares: byte-identical datastore files, identical index
search results, identical adapter weights.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import Datastore, DatastoreConfig, build_datastore
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.testing import byte_tokenizer, tiny_causal_lm
from hetgraph.training import TrainingConfig, train_adapter

KILLS_PER_STAGE = 3
SEED = 11
PRELOAD = [
    "torch",
    "transformers",
    "faiss",
    "hetgraph.datastore",
    "hetgraph.index",
    "hetgraph.fusion",
    "hetgraph.training",
    "hetgraph.testing",
]

DATASTORE = DatastoreConfig(context_length=64, stride=32, batch_size=2)
INDEX = IndexConfig(factory="HNSW16", num_threads=1)
FUSION = FusionConfig(
    k=4, adapter=dict(hidden_channels=16, num_layers=1, heads=2, dropout=0.1, attn_dropout=0.0)
)
TRAINING = TrainingConfig(
    max_steps=24,
    batch_size=2,
    context_length=32,
    eval_every=4,
    eval_tokens=120,
    checkpoint_every=2,
    warmup_steps=2,
    seed=5,
)


# --------------------------------------------------------------- the stages (any process)
def _split(name: str, num_docs: int, seed: int) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    tokens, doc_ids = [], []
    for doc in range(num_docs):
        body = np.tile(rng.integers(0, 256, size=20), 12)
        tokens.append(np.r_[body, 256])
        doc_ids.append(np.full(len(body) + 1, doc))
    return TokenizedSplit(
        name, np.concatenate(tokens), np.concatenate(doc_ids), [f"doc{i}" for i in range(num_docs)]
    )


def _model():
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    return tiny_causal_lm("qwen2", seed=0)


def _nothing() -> None:
    pass


def stage_datastore(root: str, begin=_nothing) -> None:
    model, tokenizer, split = _model(), byte_tokenizer(), _split("train", 24, 0)
    begin()
    build_datastore(model, tokenizer, split, Path(root) / "ds", DATASTORE, show_progress=False)


def stage_index(root: str, begin=_nothing) -> None:
    _model()
    store = Datastore.open(Path(root) / "ds")
    begin()
    DatastoreIndex.build(store, INDEX, show_progress=False).save(Path(root) / "ds" / "index")


def stage_training(root: str, begin=_nothing) -> None:
    model = _model()
    store = Datastore.open(Path(root) / "ds")
    index = DatastoreIndex.load(Path(root) / "ds" / "index", store)
    torch.manual_seed(TRAINING.seed)
    lm = HetGraphLM(model, store, index, FUSION)
    train, valid = _split("train", 24, 0), _split("valid", 2, 1)
    begin()
    train_adapter(lm, train, valid, TRAINING, Path(root) / "adapter", show_progress=False)


STAGES = {"datastore": stage_datastore, "index": stage_index, "training": stage_training}


def _child(stage: str, root: str, started) -> None:
    STAGES[stage](root, begin=started.set)  # the kill delay counts from the stage's start


# ---------------------------------------------------------------- what is compared
def datastore_files(root: Path) -> dict[str, bytes]:
    directory = root / "ds"
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.startswith(".")
    }


def search_results(root: Path) -> tuple[np.ndarray, np.ndarray]:
    store = Datastore.open(root / "ds")
    index = DatastoreIndex.load(root / "ds" / "index", store)
    queries = np.asarray(store.keys[::7][:64], dtype=np.float32)
    return index.search(torch.from_numpy(queries), 8)


def adapter_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "adapter" / "adapter.safetensors"))


def interrupted(stage: str, root: Path) -> bool:
    """Whether the killed child left its stage unfinished (the kill landed mid-way)."""
    if stage == "datastore":
        meta = root / "ds" / "metadata.json"
        return not meta.is_file() or '"complete": false' in meta.read_text()
    if stage == "index":
        return not (root / "ds" / "index" / "index.json").is_file()
    return not (root / "adapter" / "training.json").is_file()


def _copy_inputs(stage: str, source: Path, target: Path) -> None:
    import shutil

    target.mkdir(parents=True)
    if stage in ("index", "training"):
        shutil.copytree(
            source / "ds",
            target / "ds",
            ignore=None if stage == "training" else shutil.ignore_patterns("index"),
        )


@pytest.fixture(scope="module")
def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield ctx
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])


def test_killed_stages_resume_to_the_uninterrupted_result(tmp_path, context):
    reference = tmp_path / "reference"
    durations = {}
    for stage, func in STAGES.items():
        began: list[float] = []
        func(str(reference), begin=lambda began=began: began.append(time.perf_counter()))
        durations[stage] = time.perf_counter() - began[0]
    expected = {
        "datastore": datastore_files(reference),
        "index": search_results(reference),
        "training": adapter_weights(reference),
    }

    rng = random.Random(SEED)
    landed = dict.fromkeys(STAGES, 0)
    for stage, func in STAGES.items():
        for kill in range(KILLS_PER_STAGE):
            root = tmp_path / f"{stage}-{kill}"
            _copy_inputs(stage, reference, root)
            started = context.Event()
            child = context.Process(target=_child, args=(stage, str(root), started))
            child.start()
            assert started.wait(60), "the child did not start"
            time.sleep(rng.uniform(0.05, 0.9) * durations[stage])
            child.kill()  # SIGKILL: no cleanup runs in the child
            child.join()
            landed[stage] += interrupted(stage, root)
            func(str(root))  # run the same stage again: it resumes (or redoes) the work
            if stage == "datastore":
                assert datastore_files(root) == expected["datastore"], (stage, kill)
            elif stage == "index":
                for got, want in zip(search_results(root), expected["index"], strict=True):
                    np.testing.assert_array_equal(got, want)
            else:
                weights = adapter_weights(root)
                assert weights.keys() == expected["training"].keys()
                for key, value in weights.items():
                    assert torch.equal(value, expected["training"][key]), (stage, kill, key)
    print(f"uninterrupted seconds {durations}; kills that landed mid-way {landed}")
    # The random delays are fractions of an uninterrupted run: most kills land mid-way.
    assert all(count >= 1 for count in landed.values()), landed
