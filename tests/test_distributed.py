"""torch.distributed: 2 CPU processes (Gloo) against one process, on a tiny random Qwen2.

One 2-process job (``torch.multiprocessing.spawn``, ``MASTER_PORT`` picked free) runs the
distributed build, evaluation and training of every test below (:func:`job`: starting the
processes costs more than the work); each test then runs the one-process reference.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import Datastore, DatastoreConfig, build_datastore
from hetgraph.distributed import (
    DistributedContext,
    DistributedEnvironmentError,
    current_context,
    init_distributed,
    processes_on_this_node,
    shard_range,
)
from hetgraph.evaluation import EvalConfig, evaluate_four_way, model_perplexity
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.io import DATASTORE_PROGRESS, INDEX_DIR
from hetgraph.locking import LOCK_FILE
from hetgraph.testing import byte_tokenizer, tiny_causal_lm
from hetgraph.training import TrainingConfig, train_adapter

WORLD = 2
DS_CONFIG = DatastoreConfig(context_length=64, stride=32, batch_size=2)
EVAL_CONFIG = EvalConfig(context_length=64, stride=32, batch_size=2, k=4)
FUSION = FusionConfig(
    k=4, adapter=dict(hidden_channels=16, num_layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
)
# batch_size 3 over 2 ranks: unequal shares (2 + 1 sequences) must still give the global mean.
TRAINING = TrainingConfig(
    max_steps=4,
    batch_size=3,
    context_length=32,
    eval_every=2,
    eval_tokens=200,
    checkpoint_every=1,
    warmup_steps=0,
    lr=1e-2,
)
TRAINING_BF16 = TrainingConfig(**{**TRAINING.to_dict(), "mixed_precision": "bf16"})


# ------------------------------------------------------------------------------ helpers
def _split(name: str, num_tokens: int = 600, seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, num_tokens).astype(np.int32)
    return TokenizedSplit(
        name, tokens, np.repeat(np.arange(4), num_tokens // 4).astype(np.int32), list("abcd")
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    ctx = init_distributed("gloo")
    try:
        fn(ctx, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    """Run ``fn(ctx, *args)`` on 2 Gloo ranks; a failure in either is raised here."""
    mp.spawn(_worker, args=(_free_port(), fn, args), nprocs=WORLD, join=True)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same kernels, the same bits
    yield
    torch.set_num_threads(threads)


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != LOCK_FILE
    }


def _store_and_index(root: Path) -> tuple[Datastore, DatastoreIndex]:
    """The datastore (built by the parent) and its exact index, opened read-only."""
    store = Datastore.open(root / "ds")
    return store, DatastoreIndex.load(root / "ds" / INDEX_DIR, store)


def _prepare_datastore(root: Path) -> None:
    store = build_datastore(
        tiny_causal_lm("qwen2"),
        byte_tokenizer(),
        _split("train"),
        root / "ds",
        DS_CONFIG,
        show_progress=False,
    )
    DatastoreIndex.build(store, IndexConfig(factory="Flat"), show_progress=False).save(
        root / "ds" / INDEX_DIR
    )


def _job_worker(ctx: DistributedContext, root: Path) -> None:
    _build_worker(ctx, root)
    _eval_worker(ctx, root)
    _train_worker(ctx, root)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The root of the 2-rank job's outputs (its inputs prepared by one process first)."""
    root = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _prepare_datastore(root)
        _prepare_adapter(root)
        _train(root, "one_then_ddp", stop_after=2)  # the 2 ranks resume it
        _spawn(_job_worker, root)
    finally:
        torch.set_num_threads(threads)
    return root


# ------------------------------------------------------------------ single process
def test_single_process_creates_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed()
    assert ctx == DistributedContext() and not dist.is_initialized()
    assert current_context() == ctx and not ctx.is_distributed and ctx.is_main
    rows = torch.arange(6).reshape(3, 2)
    assert ctx.all_gather_rows(rows) is rows and ctx.sum_float(2.5) == 2.5
    assert ctx.run_on_main(lambda: 7) == 7 and ctx.share(5) == range(5)
    shares = [shard_range(10, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [4, 3, 3] and [i for s in shares for i in s] == [*range(10)]


# -------------------------------------------------------------------- datastore build
def _build_worker(ctx: DistributedContext, root: Path) -> None:
    model, tokenizer, split = tiny_causal_lm("qwen2"), byte_tokenizer(), _split("train")
    common = dict(show_progress=False, distributed=ctx)
    first = build_datastore(
        model, tokenizer, split, root / "dist", DS_CONFIG, max_batches=1, **common
    )
    assert not first.complete and (root / "dist" / f"progress.rank{ctx.rank}.json").is_file()
    assert build_datastore(model, tokenizer, split, root / "dist", DS_CONFIG, **common).complete
    build_datastore(model, tokenizer, split, root / "partial", DS_CONFIG, max_batches=2, **common)


def test_distributed_build_is_byte_identical_and_resumes_with_any_world_size(job):
    tmp_path = job
    model, tokenizer, split = tiny_causal_lm("qwen2"), byte_tokenizer(), _split("train")
    single = build_datastore(
        model, tokenizer, split, tmp_path / "single", DS_CONFIG, show_progress=False
    )
    assert single.complete and single.metadata.num_batches >= 6
    reference = _files(tmp_path / "single")
    assert set(reference) >= {"keys.npy", "next_tokens.npy", "metadata.json", DATASTORE_PROGRESS}
    assert _files(tmp_path / "dist") == reference  # every file, byte for byte
    # The 2-rank build stopped after 2 batches per rank: finish it in one process.
    partial = tmp_path / "partial"
    assert sorted(p.name for p in partial.glob("progress.rank*.json")) == [
        "progress.rank0.json",
        "progress.rank1.json",
    ]
    assert not Datastore.open(partial, allow_incomplete=True).complete
    assert build_datastore(
        model, tokenizer, split, partial, DS_CONFIG, show_progress=False
    ).complete
    assert _files(partial) == reference


# ------------------------------------------------------------------------ evaluation
def _eval_lm(root: Path) -> HetGraphLM:
    store, index = _store_and_index(root)
    return HetGraphLM.from_pretrained(root / "adapter", tiny_causal_lm("qwen2"), store, index)


def _eval_results(lm: HetGraphLM) -> dict:
    results = evaluate_four_way(
        lm,
        _split("valid", 300, seed=1),
        _split("test", 400, seed=2),
        EVAL_CONFIG,
        show_progress=False,
    ).to_dict()
    results.pop("speed")
    results["perplexity"] = model_perplexity(lm, _split("valid", 300, seed=1), EVAL_CONFIG)
    return results


def _eval_worker(ctx: DistributedContext, root: Path) -> None:
    results = _eval_results(_eval_lm(root))
    (root / f"eval{ctx.rank}.json").write_text(json.dumps(results))
    # Ragged shares of any dtype, and a rank with nothing, gather exactly in rank order.
    mine = torch.full((ctx.rank + 1, 3), 0.1 * (ctx.rank + 1), dtype=torch.float16)
    gathered = ctx.all_gather_rows(mine)
    assert gathered.dtype == torch.float16 and gathered.shape == (3, 3)
    assert torch.equal(gathered[1:], torch.full((2, 3), 0.2, dtype=torch.float16))
    flags = ctx.all_gather_rows(torch.tensor([True, False]) if ctx.rank else None)
    assert torch.equal(flags, torch.tensor([True, False]))


def _prepare_adapter(root: Path) -> None:
    store, index = _store_and_index(root)
    torch.manual_seed(0)
    lm = HetGraphLM(tiny_causal_lm("qwen2"), store, index, FUSION)
    with torch.no_grad():
        for gate in lm.engine.gates.values():  # a GNN-LM that differs from the base LM
            gate.copy_(torch.linspace(-0.5, 0.5, gate.numel()))
    lm.save_pretrained(root / "adapter")


def test_distributed_evaluation_is_identical(job):
    tmp_path = job
    reference = json.loads(json.dumps(_eval_results(_eval_lm(tmp_path))))
    assert reference["gnn"]["ppl"] != reference["base"]["ppl"]
    for rank in range(WORLD):
        assert json.loads((tmp_path / f"eval{rank}.json").read_text()) == reference


# -------------------------------------------------------------------------- training
def _train(
    root: Path,
    out: str,
    ctx: DistributedContext | None = None,
    stop_after: int | None = None,
    training: TrainingConfig = TRAINING,
) -> None:
    store, index = _store_and_index(root)
    torch.manual_seed(0)
    lm = HetGraphLM(tiny_causal_lm("qwen2"), store, index, FUSION)
    try:
        train_adapter(
            lm,
            _split("train"),
            _split("valid", 300, seed=1),
            training,
            root / out,
            eval_config=EVAL_CONFIG,
            show_progress=False,
            stop_after=stop_after,
            distributed=ctx,
        )
    except KeyboardInterrupt:
        assert stop_after is not None


def _train_worker(ctx: DistributedContext, root: Path) -> None:
    _train(root, "ddp", ctx)
    _train(root, "ddp_then_one", ctx, stop_after=2)
    _train(root, "one_then_ddp", ctx)  # resumes the one-process checkpoint at step 2
    _train(root, "ddp_bf16", ctx, training=TRAINING_BF16)


def test_ddp_training_matches_one_process_and_resumes_with_another_world_size(job):
    tmp_path = job
    _train(tmp_path, "one")
    _train(tmp_path, "ddp_then_one")  # resumes the 2-rank checkpoint at step 2

    def result(out: str) -> dict:
        return json.loads((tmp_path / out / "training.json").read_text())["result"]

    reference = result("one")
    assert reference["steps"] == 4 and len(reference["train_losses"]) == 4
    assert len(set(reference["train_losses"])) > 1  # training moves
    weights = load_file(str(tmp_path / "one" / "adapter.safetensors"))
    for out in ("ddp", "ddp_then_one", "one_then_ddp"):
        other = result(out)
        np.testing.assert_allclose(other["train_losses"], reference["train_losses"], rtol=1e-4)
        assert other["valid_ppl"].keys() == reference["valid_ppl"].keys()
        np.testing.assert_allclose(
            list(other["valid_ppl"].values()), list(reference["valid_ppl"].values()), rtol=1e-4
        )
        trained = load_file(str(tmp_path / out / "adapter.safetensors"))
        assert trained.keys() == weights.keys()
        for key in weights:
            torch.testing.assert_close(trained[key], weights[key], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "value, message",
    [
        ("four", "LOCAL_WORLD_SIZE is 'four' but must be an integer"),
        ("0", "LOCAL_WORLD_SIZE is 0 but must be at least 1"),
    ],
)
def test_a_bad_local_world_size_is_a_one_line_error(monkeypatch, value, message):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    with pytest.raises(DistributedEnvironmentError, match=message):
        processes_on_this_node()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert processes_on_this_node() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert processes_on_this_node() == 4


@pytest.mark.parametrize(
    "env, names",
    [
        ({"WORLD_SIZE": "2"}, ["RANK", "unset"]),
        ({"WORLD_SIZE": "two"}, ["WORLD_SIZE", "'two'"]),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, ["LOCAL_RANK", "'x'"]),
        ({"WORLD_SIZE": "2", "RANK": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
        ({"WORLD_SIZE": "2", "RANK": "1"}, ["MASTER_ADDR", "MASTER_PORT"]),
    ],
)
def test_half_set_torchrun_environment_is_a_one_line_error(monkeypatch, env, names):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributedEnvironmentError) as raised:
        init_distributed("gloo")
    assert all(name in str(raised.value) for name in names), str(raised.value)
    assert "unset WORLD_SIZE" in str(raised.value) and not dist.is_initialized()


def test_ddp_training_in_bf16_matches_one_process(job):
    """Mixed precision under DDP: each rank's forward in bfloat16 autocast, the gradients
    averaged in float32, as one process would (measured: equal to 2e-6; bfloat16 rounds the
    ranks' smaller batches differently)."""
    _train(job, "one_bf16", training=TRAINING_BF16)
    results = {
        out: json.loads((job / out / "training.json").read_text())["result"]
        for out in ("one_bf16", "ddp_bf16")
    }
    assert {r["mixed_precision"] for r in results.values()} == {"bf16"}
    np.testing.assert_allclose(
        results["ddp_bf16"]["train_losses"], results["one_bf16"]["train_losses"], rtol=1e-3
    )
    np.testing.assert_allclose(
        list(results["ddp_bf16"]["valid_ppl"].values()),
        list(results["one_bf16"]["valid_ppl"].values()),
        rtol=1e-3,
    )
    if not (job / "one" / "training.json").is_file():  # this test run alone
        _train(job, "one")
    reference = json.loads((job / "one" / "training.json").read_text())["result"]
    assert results["one_bf16"]["train_losses"] != reference["train_losses"]  # it did run bf16
