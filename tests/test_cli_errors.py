"""Every expected CLI failure is one ``error:`` line (exit 2); bugs keep their traceback.

Issue 11: provenance (item 4), reproducible training (item 5), invalid values (item 10), the
CLI / training / evaluation parts of item 8, non-finite results, locks and item 12's
checkpoint swap and escaped ``inspect`` output — each on a tiny saved model and corpus.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hetgraph import cli_commands
from hetgraph.cli import main
from hetgraph.configuration import ConfigError
from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.errors import HetgraphError
from hetgraph.evaluation import (
    EvalConfig,
    NonFiniteError,
    collect_lm_outputs,
    evaluate_four_way,
    results_table,
)
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.inspection import Neighbour, NeighbourReport, format_report
from hetgraph.knnlm import knn_mixture_argmax
from hetgraph.locking import LockError, directory_lock
from hetgraph.pipeline import RunConfig, run_pipeline
from hetgraph.testing import (
    byte_tokenizer,
    one_error_line,
    run_cli as run,
    save_tiny_model,
    tiny_causal_lm,
    tiny_run_config,
    write_cli_workspace,
)
from hetgraph.training import TrainingConfig, train_adapter, trainer as trainer_module
from hetgraph.training.checkpoint import read_checkpoint

RUN_CONFIG = tiny_run_config(dropout=0.1)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Qwen2 model folder, a 12-document corpus, a run config and a built datastore."""
    root = tmp_path_factory.mktemp("cli-errors")
    write_cli_workspace(root, dropout=0.1)
    save_tiny_model(root / "gpt2", "gpt2")
    (root / "other-split.json").write_text(json.dumps({"seed": 7}))
    assert (
        run(
            "datastore",
            "build",
            *common(root),
            "--out",
            root / "ds",
            "--context-length",
            "64",
            "--stride",
            "32",
            "--batch-size",
            "4",
        )
        == 0
    )
    return root


def common(w, model="model"):
    return ["--model", w / model, "--corpus", w / "corpus", "--threads", "1"]


# ------------------------------------------------------------------ the one error path
def test_expected_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import hetgraph.cli as cli

    def expected(args):
        raise ConfigError("option --x is wrong; use --y")

    def bug(args):
        raise ValueError("an internal invariant broke")  # not a HetgraphError: a bug

    argv = ["index", "build", "--datastore", "nowhere"]
    monkeypatch.setattr(cli, "cmd_index_build", expected)  # build_parser reads it
    assert main(argv) == 2
    assert one_error_line(capsys) == "error: option --x is wrong; use --y"
    monkeypatch.setattr(cli, "cmd_index_build", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(argv)


def test_disk_full_is_an_expected_error_and_other_os_errors_are_bugs():
    import errno

    assert cli_commands.is_expected_error(OSError(errno.ENOSPC, "No space left on device"))
    assert cli_commands.is_expected_error(OSError(errno.EFBIG, "File too large"))
    assert not cli_commands.is_expected_error(OSError(errno.EBADF, "Bad file descriptor"))
    assert not cli_commands.is_expected_error(KeyError("x"))


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--datastore", "DS", "--out", "OUT", "--threads", "0"], "--threads"),
        (["train", "--datastore", "DS", "--out", "OUT", "--threads", "-2"], "--threads"),
        (["train", "--datastore", "DS", "--out", "OUT", "--max-steps", "-5"], "--max-steps"),
        (["train", "--datastore", "DS", "--out", "OUT", "--max-tokens", "0"], "--max-tokens"),
        (["eval", "--datastore", "DS", "--k", "0"], "--k"),
        (["index", "build", "--datastore", "DS", "--threads", "0"], "--threads"),
        (["index", "build", "--datastore", "DS", "--rerank", "-1"], "--rerank"),
        (["index", "build", "--datastore", "DS", "--nprobe", "0"], "--nprobe"),
        (["index", "build", "--datastore", "DS", "--shard-rows", "0"], "--shard-rows"),
        (
            ["generate", "--datastore", "DS", "--prompt", "x", "--max-new-tokens", "0"],
            "--max-new-tokens",
        ),
        (["datastore", "build", "--out", "OUT", "--stride", "0"], "--stride"),
    ],
)
def test_invalid_values_are_refused_before_anything_runs(argv, option, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("DS", "OUT") else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()  # nothing was written, no config either


def test_wrong_type_in_a_config_is_one_line(ws, capsys):
    bad = ws / "ten.json"
    bad.write_text(json.dumps({"training": {"max_steps": "ten"}}))
    assert (
        run("train", *common(ws), "--datastore", ws / "ds", "--out", ws / "never", "--config", bad)
        == 2
    )
    line = one_error_line(capsys)
    assert "max_steps" in line and "'ten'" in line and str(bad) in line
    assert not (ws / "never").exists()


@pytest.mark.parametrize(
    "section",
    [{"eval_every": -1}, {"patience": -3}, {"checkpoint_every": -1}, {"lr": float("nan")}],
)
def test_negative_training_values_are_config_errors(section):
    with pytest.raises(ConfigError, match="training"):
        RunConfig.from_dict({"training": section})


def test_missing_files_and_empty_inputs_are_one_line(ws, capsys):
    assert (
        run(
            "train",
            *common(ws),
            "--datastore",
            ws / "ds",
            "--out",
            ws / "never",
            "--corpus-config",
            ws / "absent.json",
        )
        == 2
    )
    assert "--corpus-config" in one_error_line(capsys)
    assert run("eval", *common(ws), "--datastore", ws / "ds", "--adapter", ws / "no-adapter") == 2
    assert "--adapter" in one_error_line(capsys)
    assert run("generate", "--model", ws / "model", "--datastore", ws / "ds", "--prompt", "") == 2
    assert "--prompt is empty" in one_error_line(capsys)
    assert (
        run(
            "inspect",
            "--model",
            ws / "model",
            "--datastore",
            ws / "ds",
            "--text",
            "abc",
            "--position",
            "99",
        )
        == 2
    )
    assert "--position 99" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--out", "{out}"],
        ["generate", "--model", "{ws}/model", "--datastore", "{ws}/ds", "--prompt", "abc"],
        ["inspect", "--model", "{ws}/model", "--datastore", "{ws}/ds", "--text", "abc"],
    ],
)
def test_single_process_commands_refuse_torchrun(ws, tmp_path, monkeypatch, capsys, argv):
    # every rank would run the whole command and write the same files
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "demo-out"
    assert run(*(a.format(ws=ws, out=out) for a in argv)) == 2
    line = one_error_line(capsys)
    assert f"hetgraph {argv[0]} runs in one process" in line and "WORLD_SIZE=2" in line
    assert not out.exists()


def test_k_as_large_as_the_datastore_is_refused(ws, capsys):
    with open(ws / "ds" / "metadata.json") as f:
        entries = json.load(f)["num_entries"]
    assert run("eval", *common(ws), "--datastore", ws / "ds", "--k", entries) == 2
    line = one_error_line(capsys)
    assert f"--k {entries}" in line and f"{entries} entries" in line


def test_knn_mixture_argmax_memory_is_bounded_for_any_k():
    # Old code compared [8192, k+1, k] blocks: k = the store size meant a 29 GB allocation.
    # Now a block holds at most max_block_elements; the result does not depend on blocking.
    rng = np.random.default_rng(0)
    queries, k = 50, 300
    args = (
        rng.integers(0, 50, queries),
        rng.normal(size=(queries, k)).astype(np.float32),
        rng.random((queries, k)).astype(np.float32),
        rng.integers(0, 50, (queries, k)),
    )
    kwargs = dict(lam=0.3, temperature=0.5, lm_argmax_log_probs=np.zeros(queries, np.float32))
    full = knn_mixture_argmax(*args, **kwargs)
    tiny_blocks = knn_mixture_argmax(*args, **kwargs, max_block_elements=k * (k + 1) * 3)
    assert torch.equal(full, tiny_blocks)


def test_context_longer_than_gpt2_positions_is_refused(ws, capsys):
    assert (
        run(
            "datastore",
            "build",
            *common(ws, "gpt2"),
            "--out",
            ws / "ds-gpt2",
            "--context-length",
            "1024",
            "--stride",
            "512",
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "--context-length 1024" in line and "512 positions" in line


def test_token_ids_outside_the_vocabulary_are_refused():
    model = tiny_causal_lm("qwen2", vocab_size=100)
    split = TokenizedSplit("test", np.arange(150) % 200, np.zeros(150), ["d"])
    with pytest.raises(HetgraphError, match="vocabulary of 100 ids"):
        collect_lm_outputs(
            model, split, EvalConfig(context_length=32, stride=16), show_progress=False
        )


# ------------------------------------------------------------------ item 4: provenance
def test_train_and_eval_refuse_another_corpus_or_split(ws, capsys, tmp_path):
    other = ["--corpus-config", ws / "other-split.json"]
    assert (
        run(
            "train",
            *common(ws),
            *other,
            "--datastore",
            ws / "ds",
            "--out",
            tmp_path / "a",
            "--config",
            ws / "run.json",
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "another corpus or split" in line and "rebuild" in line
    assert (
        run("eval", *common(ws), *other, "--datastore", ws / "ds", "--config", ws / "run.json") == 2
    )
    assert "--allow-other-corpus" in one_error_line(capsys)
    (tmp_path / "few").mkdir()
    for name in ("doc00.txt", "doc01.txt", "doc02.txt", "doc03.txt"):
        (tmp_path / "few" / name).write_text((ws / "corpus" / name).read_text())
    assert (
        run(
            "eval",
            "--model",
            ws / "model",
            "--corpus",
            tmp_path / "few",
            "--datastore",
            ws / "ds",
            "--config",
            ws / "run.json",
        )
        == 2
    )
    assert "another corpus" in one_error_line(capsys)


def test_allow_other_corpus_is_recorded_in_the_results(ws, capsys, tmp_path):
    assert (
        run(
            "eval",
            *common(ws),
            "--corpus-config",
            ws / "other-split.json",
            "--datastore",
            ws / "ds",
            "--config",
            ws / "run.json",
            "--allow-other-corpus",
            "--json",
            tmp_path / "eval.json",
        )
        == 0
    )
    provenance = json.loads((tmp_path / "eval.json").read_text())["provenance"]
    assert provenance["allow_other_corpus"] is True and provenance["same_corpus"] is False
    assert provenance["datastore_corpus"] != provenance["eval_corpus"]
    capsys.readouterr()
    assert (
        run(
            "eval",
            *common(ws),
            "--datastore",
            ws / "ds",
            "--config",
            ws / "run.json",
            "--json",
            tmp_path / "same.json",
        )
        == 0
    )
    same = json.loads((tmp_path / "same.json").read_text())["provenance"]
    assert same["same_corpus"] is True and same["allow_other_corpus"] is False


# ------------------------------------------------------- item 5: reproducible training
def test_three_identical_train_runs_give_identical_adapters(ws, capsys, tmp_path):
    adapters, valid = [], []
    for i in range(3):
        out = tmp_path / f"adapter{i}"
        torch.manual_seed(1000 + i)  # whatever ran before in the process must not matter
        assert (
            run(
                "train",
                *common(ws),
                "--datastore",
                ws / "ds",
                "--out",
                out,
                "--config",
                ws / "run.json",
            )
            == 0
        )
        adapters.append(load_file(str(out / "adapter.safetensors")))
        valid.append(json.loads((out / "training.json").read_text())["result"]["valid_ppl"])
    for other in adapters[1:]:
        assert adapters[0].keys() == other.keys()
        for key in adapters[0]:
            assert torch.equal(adapters[0][key], other[key]), key
    assert valid[0] == valid[1] == valid[2]
    assert all(math.isfinite(v) for v in valid[0].values())
    capsys.readouterr()


# -------------------------------------------------------------- non-finite results
def _tiny_lm(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 400).astype(np.int32)
    split = TokenizedSplit("train", tokens, np.repeat(np.arange(4), 100), list("abcd"))
    model = tiny_causal_lm("qwen2")
    store = build_datastore(
        model,
        byte_tokenizer(),
        split,
        tmp_path / "ds",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    torch.manual_seed(0)
    fusion = FusionConfig(k=4, adapter=dict(hidden_channels=16, num_layers=1, heads=2))
    return HetGraphLM(model, store, index, fusion), split


def test_training_stops_at_a_non_finite_loss_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    lm, split = _tiny_lm(tmp_path)
    original = trainer_module._TrainingRun.micro_batch_loss

    def poisoned(self, draw):
        loss = original(self, draw)
        return loss * float("nan") if draw >= 3 else loss

    monkeypatch.setattr(trainer_module._TrainingRun, "micro_batch_loss", poisoned)
    config = TrainingConfig(
        max_steps=6, batch_size=2, context_length=32, eval_every=0, checkpoint_every=2
    )
    with pytest.raises(NonFiniteError, match="step 4") as info:
        train_adapter(lm, split, None, config, tmp_path / "adapter", show_progress=False)
    assert info.value.stage == "training" and "step 2" in str(info.value)
    assert read_checkpoint(tmp_path / "adapter")["step"] == 2


def test_evaluation_names_the_stage_that_is_not_finite(tmp_path):
    lm, split = _tiny_lm(tmp_path)
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.fill_(float("nan"))
    config = EvalConfig(context_length=64, stride=32, k=4)
    with pytest.raises(NonFiniteError, match=r"evaluation \(GNN\)") as info:
        evaluate_four_way(lm, split, split, config, show_progress=False)
    assert info.value.stage == "GNN"


def test_results_table_never_prints_nan():
    results = {
        "base": {"ppl": 10.0, "acc": 0.5},
        "gnn": {"ppl": float("nan"), "acc": 0.1},
        "tokens": 10,
    }
    with pytest.raises(NonFiniteError, match="GNN-LM"):
        results_table(results)


# ------------------------------------------------------------------------- locks
def test_training_and_the_pipeline_refuse_a_locked_directory(tmp_path):
    lm, split = _tiny_lm(tmp_path)
    config = TrainingConfig(max_steps=2, batch_size=2, context_length=32, eval_every=0)
    with directory_lock(tmp_path / "adapter", "adapter directory"):
        with pytest.raises(LockError, match="being written"):
            train_adapter(lm, split, None, config, tmp_path / "adapter", show_progress=False)
    with directory_lock(tmp_path / "run"):
        with pytest.raises(LockError, match="run directory"):
            run_pipeline(RunConfig(out_dir=str(tmp_path / "run")))
    assert (
        train_adapter(lm, split, None, config, tmp_path / "adapter", show_progress=False).steps == 2
    )


# ------------------------------------------------------------------------- item 12
def test_a_crash_between_the_checkpoint_renames_resumes_from_the_old_checkpoint(tmp_path):
    lm, split = _tiny_lm(tmp_path)
    out = tmp_path / "adapter"
    config = TrainingConfig(
        max_steps=6, batch_size=2, context_length=32, eval_every=0, checkpoint_every=2
    )
    with pytest.raises(KeyboardInterrupt):
        train_adapter(lm, split, None, config, out, show_progress=False, stop_after=3)
    # What atomic_directory leaves when killed after renaming the old checkpoint aside and
    # before renaming the new one in: only the set-aside copy.
    (out / "checkpoint").rename(out / ".checkpoint.old-0badc0de")
    with pytest.raises(KeyboardInterrupt):
        train_adapter(lm, split, None, config, out, show_progress=False, stop_after=2)
    # Resumed at step 2 and ran steps 3 and 4 (a restart from 0 would have saved step 2).
    assert read_checkpoint(out)["step"] == 4
    assert not list(out.glob(".checkpoint.old-*"))


def test_inspect_escapes_control_characters():
    report = NeighbourReport(
        position=0,
        token="a",
        actual_next="b",
        base_prediction="\x1b[2J",
        gnn_prediction="c",
        neighbours=[
            Neighbour(
                rank=0,
                row=1,
                distance=1.0,
                document="evil\x1b[31m.txt",
                context="x\x1b]0;title\x07y\nz",
                token="\x1b",
                next_token="\x9b",
            )
        ],
    )
    text = format_report(report)
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert "evil\\x1b[31m.txt" in text and "⏎" in text


def test_the_demo_pipeline_is_reproducible_and_records_provenance(ws, tmp_path):
    results, adapters = [], []
    for i in range(2):
        config = RunConfig.from_dict(
            {
                **RUN_CONFIG,
                "model": str(ws / "model"),
                "corpus": {"path": str(ws / "corpus")},
                "out_dir": str(tmp_path / f"run{i}"),
                "threads": 1,
            }
        )
        torch.manual_seed(77 + i)  # what ran before in the process must not matter
        results.append(run_pipeline(config))
        adapters.append(load_file(str(tmp_path / f"run{i}" / "adapter" / "adapter.safetensors")))
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key
    for method in ("base", "knn", "gnn", "gnn_knn"):
        assert results[0][method] == results[1][method]
    assert results[0]["provenance"]["same_corpus"] is True
    memory = results[0]["peak_memory_mb"]  # a running peak, recorded after every stage
    assert list(memory) == ["model", "corpus", "datastore_and_index", "training", "evaluation"]
    assert 0 < memory["model"] <= memory["corpus"] <= memory["evaluation"]


def test_train_max_tokens_below_the_context_is_one_line(ws, capsys, tmp_path):
    assert (
        run(
            "train",
            *common(ws),
            "--datastore",
            ws / "ds",
            "--out",
            tmp_path / "a",
            "--config",
            ws / "run.json",
            "--max-tokens",
            "10",
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "10 tokens" in line and "context_length" in line


def test_overwrite_pointed_at_the_corpus_deletes_nothing(ws, capsys):
    # Item 6 through the CLI: --out at the corpus folder with --overwrite is refused, and
    # every corpus file is still there, byte for byte.
    before = {p.name: p.read_bytes() for p in (ws / "corpus").iterdir()}
    assert (
        run(
            "datastore",
            "build",
            *common(ws),
            "--out",
            ws / "corpus",
            "--overwrite",
            "--context-length",
            "64",
            "--stride",
            "32",
        )
        == 2
    )
    assert str(ws / "corpus") in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in (ws / "corpus").iterdir()} == before
