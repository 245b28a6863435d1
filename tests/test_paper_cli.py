"""The exact paper mode through the command line: ``--preset paper``, a ``--config`` with the
paper's fusion section, and the paper's two-stage training (``--init-from``), on a tiny saved
model and a tiny text corpus."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hetgraph.cli import PRESETS
from hetgraph.configuration import ConfigError
from hetgraph.corpus import CorpusConfig, tokenize_corpus
from hetgraph.datastore import Datastore
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.graph import GraphConfig
from hetgraph.index import DatastoreIndex
from hetgraph.models.loading import load_model
from hetgraph.pipeline import (
    FUSION_PRESETS,
    RunConfig,
    RunDirectoryError,
    apply_preset,
    prepare_adapter,
)
from hetgraph.testing import run_cli as run, save_tiny_model, write_word_corpus
from hetgraph.training import InitAdapterError, TrainingConfig, train_adapter
from hetgraph.training.checkpoint import load_adapter_weights

TRAINING = {
    "max_steps": 4,
    "batch_size": 2,
    "context_length": 32,
    "eval_every": 2,
    "eval_tokens": 200,
    "checkpoint_every": 2,
    "warmup_steps": 1,
}
EVALUATION = {"context_length": 64, "stride": 32, "batch_size": 4, "k": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_cli")
    save_tiny_model(root / "model", "llama")
    write_word_corpus(
        root / "corpus",
        num_documents=10,
        seed=1,
        words=("alpha", "beta", "gamma", "import os", "def f():", "return x"),
    )
    # The demo's fusion section (not the paper's), so --preset paper visibly replaces it.
    config = {
        "datastore": {"context_length": 64, "stride": 32, "batch_size": 4},
        "fusion": {"k": 4, "adapter": {"hidden_channels": 16, "num_layers": 1, "heads": 2}},
        "training": TRAINING,
        "evaluation": EVALUATION,
    }
    (root / "run.json").write_text(json.dumps(config))
    common = ["--model", root / "model", "--corpus", root / "corpus", "--threads", "1"]
    assert (
        run(
            "datastore",
            "build",
            *common,
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
    return root, common


@pytest.fixture(scope="module")
def paper_adapter(workspace):
    """An adapter trained with ``--preset paper --k 4`` (also stage 1 of the two-stage test)."""
    root, common = workspace
    out = root / "paper"
    assert (
        run(
            "train",
            *common,
            "--datastore",
            root / "ds",
            "--out",
            out,
            "--config",
            root / "run.json",
            "--preset",
            "paper",
            "--k",
            "4",
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def loaded(workspace):
    """Model, tokenizer, datastore, index and corpus of the workspace, through the API."""
    root, _ = workspace
    model, tokenizer = load_model(root / "model")
    store = Datastore.open(root / "ds", model=model, tokenizer=tokenizer)
    index = DatastoreIndex.load(root / "ds" / "index", store)
    corpus = tokenize_corpus(
        CorpusConfig(path=str(root / "corpus")), tokenizer, show_progress=False
    )
    return model, tokenizer, store, index, corpus


def saved_fusion(adapter_dir) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["fusion"]


def test_presets_of_the_parser_are_the_pipelines():
    assert PRESETS == FUSION_PRESETS
    assert apply_preset(RunConfig(), "paper").fusion == FusionConfig.paper()
    assert apply_preset(RunConfig(), "default").fusion == RunConfig.default().fusion
    with pytest.raises(ConfigError, match="unknown preset 'papr'"):
        apply_preset(RunConfig(), "papr")


def test_train_with_the_paper_preset_then_eval(workspace, paper_adapter, capsys):
    root, common = workspace
    out = paper_adapter
    # The preset replaced the config's whole fusion section; --k applies on top of it.
    assert saved_fusion(out) == FusionConfig.paper(k=4).to_dict()
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["max_steps"] == TRAINING["max_steps"]  # training section kept
    assert training["result"]["steps"] == TRAINING["max_steps"]
    capsys.readouterr()
    assert (
        run(
            "eval",
            *common,
            "--datastore",
            root / "ds",
            "--adapter",
            out,
            "--config",
            root / "run.json",
            "--json",
            root / "paper-eval.json",
        )
        == 0
    )
    assert "GNN-LM + kNN" in capsys.readouterr().out
    results = json.loads((root / "paper-eval.json").read_text())
    for method in ("base", "knn", "gnn", "gnn_knn"):
        assert math.isfinite(results[method]["ppl"]) and results[method]["ppl"] > 1
        assert 0 <= results[method]["acc"] <= 1
    # Replace mode: an untrained paper adapter is not the base model (no zero gate), so the
    # GNN row is a different model's perplexity, not a copy of the base row.
    assert results["gnn"]["ppl"] != pytest.approx(results["base"]["ppl"], rel=1e-6)


def test_a_config_file_with_the_paper_fusion_section(workspace, capsys):
    root, common = workspace
    capsys.readouterr()
    assert run("demo", "--preset", "paper", "--print-config") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fusion"] == FusionConfig.paper().to_dict()
    assert printed["out_dir"] == "runs/demo-paper"  # never the default demo's directory
    printed["fusion"]["k"] = 4
    printed.update(
        datastore={"context_length": 64, "stride": 32, "batch_size": 4},
        training=TRAINING,
        evaluation=EVALUATION,
    )
    (root / "paper-run.json").write_text(json.dumps(printed))
    out = root / "paper-from-config"
    assert (
        run(
            "train",
            *common,
            "--datastore",
            root / "ds",
            "--out",
            out,
            "--config",
            root / "paper-run.json",
        )
        == 0
    )
    assert saved_fusion(out) == FusionConfig.paper(k=4).to_dict()


def test_two_stage_training_starts_stage_two_from_stage_one(workspace, paper_adapter, capsys):
    root, common = workspace
    stage1, stage2 = paper_adapter, root / "stage2"
    args = [*common, "--datastore", root / "ds", "--config", root / "run.json", "--preset", "paper"]
    assert (
        run(
            "train",
            *args,
            "--k",
            "6",
            "--left",
            "2",
            "--right",
            "2",
            "--init-from",
            stage1,
            "--out",
            stage2,
        )
        == 0
    )
    fusion = saved_fusion(stage2)
    assert fusion == FusionConfig.paper(k=6, graph=GraphConfig.paper(left=2, right=2)).to_dict()
    training = json.loads((stage2 / "training.json").read_text())
    assert training["config"]["init_from"] == str(stage1)
    # Step 0 of stage 2 evaluates stage 1's weights under the stage-2 graph: a trained
    # replace-mode adapter, far better than a fresh one (whose step-0 perplexity is stage 1's).
    stage1_start = json.loads((stage1 / "training.json").read_text())["result"]["valid_ppl"]["0"]
    assert training["result"]["valid_ppl"]["0"] < stage1_start
    capsys.readouterr()
    # A second run resumes stage 2 from its own checkpoint (nothing left to do) …
    before = (stage2 / "adapter.safetensors").read_bytes()
    assert (
        run(
            "train",
            *args,
            "--k",
            "6",
            "--left",
            "2",
            "--right",
            "2",
            "--init-from",
            stage1,
            "--out",
            stage2,
        )
        == 0
    )
    assert (stage2 / "adapter.safetensors").read_bytes() == before
    # … and one with another graph is refused instead of resuming a different model.
    capsys.readouterr()
    assert (
        run(
            "train",
            *args,
            "--k",
            "6",
            "--left",
            "1",
            "--right",
            "1",
            "--init-from",
            stage1,
            "--out",
            stage2,
        )
        == 2
    )
    assert "other training or fusion settings" in capsys.readouterr().err
    assert (stage2 / "adapter.safetensors").read_bytes() == before


def test_init_from_loads_stage_one_weights_exactly(paper_adapter, loaded, tmp_path):
    model, tokenizer, store, index, corpus = loaded
    stage1 = paper_adapter
    fusion = FusionConfig.paper(k=6, graph=GraphConfig.paper(left=2, right=2))
    torch.manual_seed(5)
    lm = HetGraphLM(model, store, index, fusion, tokenizer=tokenizer)
    fresh = {key: value.clone() for key, value in lm.adapter_state_dict().items()}
    config = TrainingConfig.from_dict(
        {
            **TRAINING,
            "max_steps": 1,
            "eval_every": 0,
            "lr": 1e-12,
            "weight_decay": 0.0,
            "init_from": str(stage1),
        }
    )
    train_adapter(
        lm,
        corpus.train.truncate(len(store) + 1),
        None,
        config,
        tmp_path / "s2",
        show_progress=False,
    )
    stage1_lm = HetGraphLM.from_pretrained(stage1, model, store, index, tokenizer=tokenizer)
    expected = stage1_lm.adapter_state_dict()
    got = lm.adapter_state_dict()
    assert set(got) == set(expected)
    for key in expected:  # one step at lr 1e-12 moves nothing visibly
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)
    assert any(not torch.allclose(fresh[key], expected[key]) for key in expected)

    # Refusals, each before a step runs: the output directory itself; an adapter whose
    # widths differ (the demo-style fusion of run.json); a directory with no adapter.
    with pytest.raises(InitAdapterError, match="output directory itself"):
        train_adapter(
            lm,
            corpus.train.truncate(len(store) + 1),
            None,
            TrainingConfig.from_dict({**config.to_dict(), "init_from": str(stage1)}),
            stage1,
            show_progress=False,
        )
    other = HetGraphLM(
        model,
        store,
        index,
        FusionConfig.from_dict(
            {"k": 4, "adapter": {"hidden_channels": 16, "num_layers": 1, "heads": 2}}
        ),
        tokenizer=tokenizer,
    )
    with pytest.raises(InitAdapterError, match="stage-2 adapter must keep"):
        train_adapter(
            other,
            corpus.train.truncate(len(store) + 1),
            None,
            config,
            tmp_path / "other",
            show_progress=False,
        )
    with pytest.raises(InitAdapterError, match="not found"):
        train_adapter(
            lm,
            corpus.train.truncate(len(store) + 1),
            None,
            TrainingConfig.from_dict({**config.to_dict(), "init_from": str(tmp_path / "none")}),
            tmp_path / "s3",
            show_progress=False,
        )
    load_adapter_weights(lm, stage1, "cpu")  # the refusals left the model loadable


def test_cli_refuses_a_missing_init_adapter(workspace, capsys):
    root, common = workspace
    assert (
        run(
            "train",
            *common,
            "--datastore",
            root / "ds",
            "--out",
            root / "x",
            "--config",
            root / "run.json",
            "--init-from",
            root / "absent",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from") and "adapter_config.json missing" in err
    assert not (root / "x").exists()  # refused before anything was written


def test_a_run_directory_with_another_fusion_config_is_refused(paper_adapter, loaded):
    model, tokenizer, store, index, corpus = loaded
    adapter_dir = paper_adapter  # trained with --preset paper --k 4
    before = (adapter_dir / "adapter.safetensors").read_bytes()
    config = RunConfig.from_dict({"fusion": {"k": 4}, "training": TRAINING})
    with pytest.raises(RunDirectoryError, match="another fusion config"):
        prepare_adapter(model, tokenizer, corpus, store, index, config, adapter_dir)
    assert (adapter_dir / "adapter.safetensors").read_bytes() == before  # nothing lost
    same = RunConfig.from_dict({"fusion": FusionConfig.paper(k=4), "training": TRAINING})
    lm = prepare_adapter(model, tokenizer, corpus, store, index, same, adapter_dir)
    assert lm.config == FusionConfig.paper(k=4)


def test_reusing_an_adapter_trained_otherwise_says_what_differs(paper_adapter, loaded, caplog):
    model, tokenizer, store, index, corpus = loaded
    longer = RunConfig.from_dict(
        {
            "fusion": FusionConfig.paper(k=4),
            "training": {
                **TRAINING,
                "max_steps": TRAINING["max_steps"] + 5,
                "mixed_precision": "bf16",
            },
        }
    )
    with caplog.at_level("WARNING", logger="hetgraph.pipeline"):
        prepare_adapter(model, tokenizer, corpus, store, index, longer, paper_adapter)
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert (
        f"max_steps: {TRAINING['max_steps']}, now {TRAINING['max_steps'] + 5}" in message
        and "mixed_precision: 'no', now 'bf16'" in message
    ), message
    caplog.clear()
    same = RunConfig.from_dict({"fusion": FusionConfig.paper(k=4), "training": TRAINING})
    with caplog.at_level("WARNING", logger="hetgraph.pipeline"):
        prepare_adapter(model, tokenizer, corpus, store, index, same, paper_adapter)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # A damaged training record only changes the warning: the good adapter is still reused.
    record = paper_adapter / "training.json"
    saved = record.read_bytes()
    try:
        for damaged in (saved[: len(saved) // 2], b'{"result": {}}', b'{"config": {"lr": "x"}}'):
            record.write_bytes(damaged)
            caplog.clear()
            with caplog.at_level("WARNING", logger="hetgraph.pipeline"):
                lm = prepare_adapter(model, tokenizer, corpus, store, index, same, paper_adapter)
            assert lm.config == FusionConfig.paper(k=4)
            assert "has no readable training settings" in caplog.text
    finally:
        record.write_bytes(saved)


def test_demo_with_the_paper_preset_and_a_reused_run_directory(workspace, capsys):
    root, _ = workspace
    out = root / "demo-run"
    config = {
        "model": str(root / "model"),
        "corpus": {"path": str(root / "corpus")},
        "datastore": {"context_length": 64, "stride": 32, "batch_size": 4},
        "fusion": {"k": 4, "adapter": {"hidden_channels": 16, "num_layers": 1, "heads": 2}},
        "training": TRAINING,
        "evaluation": {**EVALUATION, "max_tokens": 300, "valid_tokens": 300},
        "out_dir": str(out),
        "threads": 1,
    }
    (root / "demo.json").write_text(json.dumps(config))
    assert run("demo", "--config", root / "demo.json", "--preset", "paper") == 0
    assert saved_fusion(out / "adapter") == FusionConfig.paper().to_dict()
    results = json.loads((out / "results.json").read_text())
    assert all(math.isfinite(results[m]["ppl"]) for m in ("base", "knn", "gnn", "gnn_knn"))
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    # The same run directory without the preset would evaluate the paper adapter under the
    # demo's name: refused, and nothing written there is lost.
    assert run("demo", "--config", root / "demo.json") == 2
    assert "another fusion config" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_training_seconds_add_up_over_a_resumed_run(loaded, tmp_path):
    model, tokenizer, store, index, corpus = loaded
    torch.manual_seed(0)
    lm = HetGraphLM(model, store, index, FusionConfig.paper(k=4), tokenizer=tokenizer)
    config = TrainingConfig.from_dict(TRAINING)
    train = corpus.train.truncate(len(store) + 1)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(lm, train, None, config, tmp_path, show_progress=False, stop_after=2)
    first = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert first["step"] == 2 and first["result"]["seconds"] > 0  # was 0 before the fix
    result = train_adapter(lm, train, None, config, tmp_path, show_progress=False)
    assert result.steps == TRAINING["max_steps"]
    assert result.seconds > first["result"]["seconds"]  # both calls, not the last one only
