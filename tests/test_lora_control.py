"""The LoRA control: an adapter of the graph adapter's size, without a graph, on tiny models."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.evaluation import EvalConfig, NeighbourSearch, collect_lm_outputs
from hetgraph.evaluation.lora import base_of, evaluate_lora_control, lora_forward
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.testing import FAMILIES, byte_tokenizer, repeated_pattern_split, tiny_causal_lm
from hetgraph.training import TrainingConfig, lora as lora_module, lora_run, train_adapter, trainer
from hetgraph.training.lora import (
    LoraControlConfig,
    LoraControlError,
    graph_adapter_parameters,
    is_lora_control,
    load_lora_control,
    lora_targets,
    matched_lora_rank,
    parameters_per_rank,
    train_lora_control,
)

ADAPTER = dict(hidden_channels=16, num_layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
WINDOWS = EvalConfig(context_length=64, stride=32, batch_size=4, k=4)
#: PEFT is the optional extra ``lora`` (make setup installs it).
needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="needs the 'lora' extra (peft)"
)


def pattern_split(num_docs: int = 6, seed: int = 0, name: str = "train") -> TokenizedSplit:
    """Documents repeating a random byte pattern (learnable in a few steps)."""
    return repeated_pattern_split(num_docs, seed=seed, name=name)


@pytest.fixture(scope="module")
def train() -> TokenizedSplit:
    return pattern_split()


@pytest.fixture(scope="module")
def valid() -> TokenizedSplit:
    return pattern_split(2, seed=1, name="valid")


def graph_lm(tmp_path, family: str, split: TokenizedSplit) -> HetGraphLM:
    model = tiny_causal_lm(family)
    store = build_datastore(
        model,
        byte_tokenizer(),
        split,
        tmp_path / f"ds-{family}",
        DatastoreConfig(context_length=64, stride=32, batch_size=4),
        show_progress=False,
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    return HetGraphLM(
        model, store, index, FusionConfig(k=4, adapter=ADAPTER, graph=dict(leakage_radius=4))
    )


def training(**overrides) -> TrainingConfig:
    settings = dict(
        max_steps=30,
        batch_size=4,
        context_length=48,
        lr=3e-2,
        warmup_steps=2,
        eval_every=10,
        eval_tokens=200,
        checkpoint_every=0,
        seed=3,
    )
    return TrainingConfig(**{**settings, **overrides})


@needs_peft
@pytest.mark.parametrize("family", FAMILIES)
def test_matched_rank_trains_within_ten_percent_of_the_graph_adapter(tmp_path, train, family):
    lm = graph_lm(tmp_path, family, train)
    graph_params = graph_adapter_parameters(lm)
    assert graph_params == sum(p.numel() for p in lm.parameters() if p.requires_grad)
    lm.save_pretrained(tmp_path / "adapter")
    assert graph_adapter_parameters(tmp_path / "adapter") == graph_params

    model = tiny_causal_lm(family)
    targets = lora_targets(model, LoraControlConfig())
    assert targets and not any("lm_head" in name for name in targets)
    rank = matched_lora_rank(model, graph_params, targets)
    peft_model = lora_module.wrap_with_lora(model, rank, targets, LoraControlConfig())
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trained == rank * parameters_per_rank(model, targets)
    assert abs(trained - graph_params) <= 0.1 * graph_params, (trained, graph_params)


def test_no_rank_within_tolerance_is_refused_in_one_line():
    model = tiny_causal_lm("qwen2")
    targets = lora_targets(model, LoraControlConfig())
    unit = parameters_per_rank(model, targets)
    with pytest.raises(LoraControlError, match="no LoRA rank comes within 10%") as error:
        matched_lora_rank(model, int(1.5 * unit), targets)
    assert "\n" not in str(error.value) and "lora.layers" in str(error.value)


def test_layers_follow_the_fusion_sites():
    model = tiny_causal_lm("llama", num_layers=6)
    config = LoraControlConfig(head_layers=2)
    assert lora_module.lora_layers(model, config, ("head",)) == [4, 5]
    assert lora_module.lora_layers(model, config, (0, "head")) == [0, 4, 5]
    assert lora_module.lora_layers(model, LoraControlConfig(layers=(-1,))) == [5]
    picked = lora_targets(model, LoraControlConfig(layers=(1,), target_modules=("q_proj",)))
    assert picked == ["model.layers.1.self_attn.q_proj"]


@needs_peft
@pytest.mark.parametrize("from_datastore", [True, False])
def test_trains_on_the_graph_trainers_blocks(tmp_path, train, monkeypatch, from_datastore):
    drawn: dict[str, list[np.ndarray]] = {"graph": [], "lora": []}

    def recording(key, original):
        def sample(*args):
            starts = original(*args)
            drawn[key].append(starts)
            return starts

        return sample

    monkeypatch.setattr(trainer, "sample_starts", recording("graph", trainer.sample_starts))
    monkeypatch.setattr(lora_run, "sample_starts", recording("lora", lora_run.sample_starts))
    config = training(max_steps=3, grad_accumulation=2, eval_every=0, from_datastore=from_datastore)
    lm = graph_lm(tmp_path, "gpt2", train)
    train_adapter(lm, train, None, config, tmp_path / "graph", show_progress=False)
    train_lora_control(
        tiny_causal_lm("gpt2"),
        byte_tokenizer(),
        train,
        None,
        config,
        LoraControlConfig(rank=2),
        tmp_path / "lora",
        target_params=1,
        show_progress=False,
    )
    assert len(drawn["graph"]) == len(drawn["lora"]) == 6
    for graph_starts, lora_starts in zip(drawn["graph"], drawn["lora"], strict=True):
        np.testing.assert_array_equal(graph_starts, lora_starts)
        # The same labels: a datastore row's next token is the split's next token.
        offsets = lora_starts[:, None] + np.arange(config.context_length)
        np.testing.assert_array_equal(
            lm.engine.datastore.next_tokens[offsets], train.tokens[offsets + 1]
        )


@needs_peft
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_saves_and_loads_the_same_logits(tmp_path, train, valid, family):
    out = tmp_path / "lora"
    result = train_lora_control(
        tiny_causal_lm(family),
        byte_tokenizer(),
        train,
        valid,
        training(),
        LoraControlConfig(),
        out,
        target_params=8 * 1024,
        eval_config=WINDOWS,
        show_progress=False,
    )
    assert result.rank == 8 and result.trained_params == 8 * 1024
    assert np.mean(result.train_losses[-5:]) < np.mean(result.train_losses[:5])
    assert sorted(result.valid_ppl) == [0, 10, 20, 30]
    assert is_lora_control(out) and not is_lora_control(tmp_path)
    marker = json.loads((out / "lora_control.json").read_text())
    assert marker["kind"] == "lora_control" and marker["trained_params"] == 8 * 1024
    assert marker["best_step"] == result.best_step
    assert json.loads((out / "training.json").read_text())["control"] == "lora"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    loaded = load_lora_control(out, tiny_causal_lm(family), byte_tokenizer())
    input_ids = torch.from_numpy(valid.tokens[:40].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=input_ids).logits, result.model(input_ids=input_ids).logits
        )
    # The forward evaluations use: collect_lm_outputs over the base model with LoRA on.
    outputs = collect_lm_outputs(
        base_of(loaded), valid, WINDOWS, forward=lora_forward(loaded), show_progress=False
    )
    assert len(outputs) == len(valid) - 1 and torch.isfinite(outputs.lm_log_probs).all()
    if result.best_step:  # the control differs from the base model it was trained on
        with loaded.disable_adapter():
            base = collect_lm_outputs(base_of(loaded), valid, WINDOWS, show_progress=False)
        assert not torch.equal(base.lm_log_probs, outputs.lm_log_probs)


@needs_peft
def test_another_base_model_is_refused(tmp_path, train):
    out = tmp_path / "lora"
    train_lora_control(
        tiny_causal_lm("qwen2"),
        byte_tokenizer(),
        train,
        None,
        training(max_steps=2),
        LoraControlConfig(rank=2),
        out,
        target_params=1,
        show_progress=False,
    )
    with pytest.raises(LoraControlError, match="trained on another base model") as error:
        load_lora_control(out, tiny_causal_lm("qwen2", seed=1))
    assert "weights" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(LoraControlError, match="another base model"):
        load_lora_control(out, tiny_causal_lm("llama"))


@needs_peft
def test_damaged_files_are_refused_with_the_fix(tmp_path, train):
    out = tmp_path / "lora"
    train_lora_control(
        tiny_causal_lm("qwen2"),
        byte_tokenizer(),
        train,
        None,
        training(max_steps=2),
        LoraControlConfig(rank=2),
        out,
        target_params=1,
        show_progress=False,
    )
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(
        LoraControlError,
        match=r"adapter_model.safetensors has .* bytes.*train "
        r"the control again",
    ):
        load_lora_control(out, tiny_causal_lm("qwen2"))


@needs_peft
def test_reruns_replace_same_settings_and_refuse_other_settings(tmp_path, train):
    out = tmp_path / "lora"

    def run(config, lora=None):
        lora = lora or LoraControlConfig(rank=2)
        return train_lora_control(
            tiny_causal_lm("qwen2"),
            byte_tokenizer(),
            train,
            None,
            config,
            lora,
            out,
            target_params=1,
            show_progress=False,
        )

    first = run(training(max_steps=2))
    assert run(training(max_steps=2)).train_losses == first.train_losses  # same seed, same run
    with pytest.raises(LoraControlError, match=r"other settings.*new --out"):
        run(training(max_steps=3))
    with pytest.raises(LoraControlError, match="other settings"):
        run(training(max_steps=2), LoraControlConfig(rank=3))
    lm_dir = tmp_path / "graph"
    lm_dir.mkdir()
    (lm_dir / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(LoraControlError, match="holds a graph adapter"):
        train_lora_control(
            tiny_causal_lm("qwen2"),
            byte_tokenizer(),
            train,
            None,
            training(max_steps=2),
            LoraControlConfig(rank=2),
            lm_dir,
            target_params=1,
            show_progress=False,
        )


@needs_peft
def test_lora_and_lora_knn_rows(tmp_path, train, valid):
    lm = graph_lm(tmp_path, "qwen2", train)
    out = tmp_path / "lora"
    train_lora_control(
        tiny_causal_lm("qwen2"),
        byte_tokenizer(),
        train,
        None,
        training(),
        LoraControlConfig(),
        out,
        target_params=graph_adapter_parameters(lm),
        show_progress=False,
    )
    loaded = load_lora_control(out, tiny_causal_lm("qwen2"))
    rows = evaluate_lora_control(
        loaded,
        valid,
        valid,
        WINDOWS,
        search=NeighbourSearch(lm.engine.index, lm.engine.datastore),
        show_progress=False,
    )
    assert set(rows) == {"lora", "lora_knn"}
    assert rows["lora_knn"]["k"] == 4 and 0 <= rows["lora_knn"]["lambda"] <= 1
    # λ = 0 is on the grid, so the tuned mixture is at least as good on the tuning split.
    assert rows["lora_knn"]["ppl"] <= rows["lora"]["ppl"] * (1 + 1e-6)


def test_missing_peft_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(LoraControlError, match=r"pip install 'hetgraph\[lora\]'"):
        lora_module.import_peft()


def test_hetgraph_imports_without_peft():
    code = (
        "import sys; sys.modules['peft'] = None; import hetgraph.training.lora, "
        "hetgraph.evaluation.lora, hetgraph.cli"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_an_unknown_control_format_version_is_refused(tmp_path, version):
    from hetgraph.integrity import atomic_write_json_record
    from hetgraph.training.lora_persistence import LORA_CONTROL_MARKER, read_lora_control

    record = {"kind": "lora_control", "model": {}, "integrity": {"files": {}}}
    if version is not None:
        record["format_version"] = version
    atomic_write_json_record(tmp_path / LORA_CONTROL_MARKER, record)
    with pytest.raises(
        LoraControlError,
        match=rf"unsupported LoRA control format "
        rf"{version!r}.*reads format 1.*train the control",
    ):
        read_lora_control(tmp_path)
