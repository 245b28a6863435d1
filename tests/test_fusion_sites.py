"""Fusion sites ("all", ranges, lists), every-layer fusion, activation checkpointing and the
retrieval-aware gate, on tiny Qwen2 / Llama / GPT-2 models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_fusion import SMALL_ADAPTER, build_store, randomise_gates, repeated_pattern_split

from hetgraph.cli import build_parser
from hetgraph.cli_commands import _training_settings
from hetgraph.configuration import ConfigError
from hetgraph.fusion import FusionConfig, HetGraphLM, resolve_fusion_sites
from hetgraph.fusion.gates import retrieval_statistics
from hetgraph.fusion.persistence import read_adapter_config
from hetgraph.inspection import format_report, inspect_position, inspect_positions
from hetgraph.integrity import atomic_write_json_record
from hetgraph.io import ADAPTER_CONFIG
from hetgraph.models.layers import decoder_layers
from hetgraph.pipeline import RunConfig
from hetgraph.testing import FAMILIES
from hetgraph.training import TrainingConfig, train_adapter

EVERY_LAYER = ("all", "head")


@pytest.fixture(scope="module")
def split():
    return repeated_pattern_split()


def fused_lm(store_parts, sites=EVERY_LAYER, **overrides) -> HetGraphLM:
    model, _tokenizer, store, index = store_parts
    config = FusionConfig(
        fusion_layers=sites, k=4, adapter=overrides.pop("adapter", SMALL_ADAPTER), **overrides
    )
    return HetGraphLM(model, store, index, config)


def text(split, start: int = 0, length: int = 40, batch: int = 1) -> torch.Tensor:
    ids = torch.from_numpy(split.tokens[start : start + length].astype(np.int64))
    return ids[None].repeat(batch, 1)


# ------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "value, canonical, sites",
    [
        ("all", ("all",), tuple(range(30))),
        ("0:30:4", ("0:30:4",), (0, 4, 8, 12, 16, 20, 24, 28)),
        ("-4:", ("-4:",), (26, 27, 28, 29)),
        ("::2", ("::2",), tuple(range(0, 30, 2))),
        (" 2 : 8 : 1 ", ("2:8",), (2, 3, 4, 5, 6, 7)),
        ("::-10", ("::-10",), (9, 19, 29)),
        (":", ("all",), tuple(range(30))),
        ([-4, -3, -2, -1, "head"], (-4, -3, -2, -1, "head"), (26, 27, 28, 29, "head")),
        (["head", "all"], ("head", "all"), (*range(30), "head")),
        (["0:30:4", "head"], ("0:30:4", "head"), (0, 4, 8, 12, 16, 20, 24, 28, "head")),
        ([5, "-25", "4:7", -1, 29], (5, -25, "4:7", -1, 29), (4, 5, 6, 29)),
        ("head", ("head",), ("head",)),
        (7, (7,), (7,)),
        ("0:40", ("0:40",), tuple(range(30))),  # Python slicing clips, as a list would
    ],
)
def test_fusion_layers_parse_resolve_and_round_trip(value, canonical, sites):
    config = FusionConfig(fusion_layers=value)
    assert config.fusion_layers == canonical
    assert config.resolved_sites(30) == sites == resolve_fusion_sites(value, 30)
    # JSON keeps the canonical form, which re-parses to itself.
    again = FusionConfig.from_json(config.to_json())
    assert again.fusion_layers == canonical and again == config
    run = RunConfig.from_dict({"fusion": {"fusion_layers": json.loads(json.dumps(value))}})
    assert run.fusion.fusion_layers == canonical


@pytest.mark.parametrize(
    "value, message",
    [
        (
            ["head", "top"],
            "fusion.fusion_layers[1]: expected int | 'head' | 'all' | 'start:stop:step', got 'top'",
        ),
        ("0:30:0", "fusion.fusion_layers: expected"),
        ("1:2:3:4", "fusion.fusion_layers: expected"),
        ([1.5], "fusion.fusion_layers[0]: expected"),
        ([True], "fusion.fusion_layers[0]: expected"),
        ([], "fusion: fusion_layers is empty"),
    ],
)
def test_bad_fusion_layers_are_config_errors_with_their_path(value, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict({"fusion": {"fusion_layers": value}})
    assert message in str(info.value)


@pytest.mark.parametrize(
    "value, message",
    [
        (30, "layer 30 is out of range"),
        (-31, "layer -31 is out of range"),
        ("40:", "range '40:' selects no decoder layer"),
        ("5:5", "range '5:5' selects no"),
    ],
)
def test_sites_outside_the_model_name_the_key_and_the_valid_range(value, message):
    with pytest.raises(ConfigError) as info:
        FusionConfig(fusion_layers=value).resolved_sites(30)
    assert str(info.value).startswith("fusion.fusion_layers: ")
    assert message in str(info.value) and "-30 … 29" in str(info.value)
    assert info.value.key == "fusion.fusion_layers"


def test_building_the_lm_resolves_against_the_model(tmp_path, split):
    parts = build_store(tmp_path, "qwen2", split)
    num_layers = len(decoder_layers(parts[0]))
    assert fused_lm(parts).engine.fusion_sites == (*range(num_layers), "head")
    assert fused_lm(parts, sites=[-1, "0:", 0]).engine.fusion_sites == tuple(range(num_layers))
    with pytest.raises(ConfigError, match=r"fusion.fusion_layers: layer 9 is out of range"):
        fused_lm(parts, sites=[9])


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--fusion-layers", "all"], ("all",)),
        (["--fusion-layers", "0:30:4", "head"], ("0:30:4", "head")),
        (["--fusion-layers=-4:"], ("-4:",)),
        (["--fusion-layers", "-2", "-1", "head"], (-2, -1, "head")),
    ],
)
def test_cli_fusion_layers(tmp_path, argv, expected):
    args = build_parser().parse_args(
        ["train", "--datastore", str(tmp_path), "--out", str(tmp_path), *argv]
    )
    fusion, _training, _evaluation = _training_settings(args)
    assert fusion.fusion_layers == expected


@pytest.mark.parametrize(
    "argv, gate, checkpointing",
    [
        ([], "static", False),
        (["--gate", "retrieval", "--gradient-checkpointing"], "retrieval", True),
    ],
)
def test_cli_gate_and_gradient_checkpointing(tmp_path, argv, gate, checkpointing):
    args = build_parser().parse_args(
        ["train", "--datastore", str(tmp_path), "--out", str(tmp_path), *argv]
    )
    fusion, _training, _evaluation = _training_settings(args)
    assert (fusion.gate, fusion.gradient_checkpointing) == (gate, checkpointing)


def test_cli_rejects_a_bad_site(tmp_path):
    args = build_parser().parse_args(
        ["train", "--datastore", str(tmp_path), "--out", str(tmp_path), "--fusion-layers", "top"]
    )
    with pytest.raises(ConfigError, match=r"option or --config value: fusion_layers"):
        _training_settings(args)


# ------------------------------------------------------------- every layer, zero gates
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate", ["static", "retrieval"])
def test_every_layer_zero_gate_is_the_base_model(tmp_path, split, family, gate):
    parts = build_store(tmp_path, family, split)
    model = parts[0]
    input_ids = text(split, batch=2)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    base = model(input_ids, attention_mask=mask).logits
    lm = fused_lm(parts, gate=gate)
    assert len(lm.engine.adapters) == len(decoder_layers(model)) + 1
    with lm:
        assert torch.equal(model(input_ids, attention_mask=mask).logits, base)
    prompt = text(split, length=12)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=256)
    assert torch.equal(lm.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


# ------------------------------------------------- one retrieval and one graph per forward
def count_calls(monkeypatch, owner, name: str) -> list[int]:
    calls = [0]
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_layer", [None, 1])
def test_one_search_and_one_graph_per_forward(tmp_path, split, family, key_layer, monkeypatch):
    parts = build_store(tmp_path, family, split, key_layer=key_layer)
    lm = fused_lm(parts)
    randomise_gates(lm)
    searches = count_calls(monkeypatch, lm.engine.retriever.index, "search")
    graphs = count_calls(monkeypatch, lm.engine.graph_inputs, "build_graph")
    input_ids = text(split, batch=2)
    lm.train()
    rows = torch.arange(input_ids.shape[1])[None].repeat(2, 1)
    loss = lm(input_ids, query_positions=rows, use_cache=False).logits.float().pow(2).mean()
    assert (searches[0], graphs[0]) == (1, 1)
    loss.backward()
    assert (searches[0], graphs[0]) == (1, 1)
    assert all(
        lm.engine.adapters[key].parameters().__next__().grad is not None
        for key in lm.engine.adapters
    )
    lm.eval()
    with torch.no_grad():
        lm(input_ids, use_cache=False)
    assert (searches[0], graphs[0]) == (2, 2)


# ----------------------------------------------------------- activation checkpointing
def loss_and_grads(lm: HetGraphLM, input_ids: torch.Tensor, seed: int = 0):
    lm.train()
    lm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    rows = torch.arange(input_ids.shape[1])[None].repeat(input_ids.shape[0], 1)
    logits = lm(input_ids, query_positions=rows, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)
    )
    loss.backward()
    # (Parameters the output does not depend on, e.g. the last layer's nbr-side maps, get none.)
    grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
    lm.eval()
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_gives_the_same_loss_and_gradients(tmp_path, split, family, monkeypatch):
    parts = build_store(tmp_path, family, split)
    model = parts[0]
    # Dropout in the adapters: recomputation must not draw new masks.
    adapter = dict(SMALL_ADAPTER, dropout=0.2, attn_dropout=0.1)
    plain = fused_lm(parts, adapter=adapter, gate="retrieval")
    randomise_gates(plain)
    input_ids = text(split, start=30, batch=2)
    loss, grads = loss_and_grads(plain, input_ids)
    checkpointed = fused_lm(parts, adapter=adapter, gate="retrieval", gradient_checkpointing=True)
    checkpointed.load_adapter_state_dict(plain.adapter_state_dict())
    searches = count_calls(monkeypatch, checkpointed.engine.retriever.index, "search")
    # A hook inside a decoder layer's forward counts its runs: with checkpointing the
    # frozen layers run again in the backward pass. (A pre-hook: the recomputation stops
    # early, once the last saved tensor is recomputed; layer 0 gets no input gradient.)
    runs = [0]
    mlp = decoder_layers(model)[-1].mlp
    handle = mlp.register_forward_pre_hook(lambda *a: runs.__setitem__(0, runs[0] + 1))
    # Each site's adapter is recomputed too (its activations dominate memory).
    adapter_runs = [0]
    counter = checkpointed.engine.adapter_at("head").register_forward_pre_hook(
        lambda *a: adapter_runs.__setitem__(0, adapter_runs[0] + 1)
    )
    loss_ckpt, grads_ckpt = loss_and_grads(checkpointed, input_ids)
    handle.remove()
    counter.remove()
    assert runs[0] == 3  # prefetch pass (no grad), forward, recomputation in the backward
    assert adapter_runs[0] == 2
    assert searches[0] == 1
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys() and any("retrieval_gates" in k for k in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # Out of training mode the base model is exactly as before: no layer in training mode.
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        assert torch.equal(checkpointed(input_ids).logits, plain(input_ids).logits)


# ------------------------------------------------------------------ retrieval gate
def test_retrieval_statistics_numbers():
    distances = torch.tensor([[[8.0, 16.0, float("inf"), float("inf")], [float("inf")] * 4]])
    ids = torch.tensor([[[3, 5, -1, -1], [-1, -1, -1, -1]]])
    stats = retrieval_statistics(distances, ids, dim=4)
    expected = torch.tensor(
        [[[np.log1p(2.0), np.log1p(3.0), 0.5], [0.0, 0.0, 0.0]]], dtype=torch.float32
    )
    torch.testing.assert_close(stats, expected)


def test_retrieval_gate_needs_a_gated_residual():
    with pytest.raises(ConfigError, match="fusion: gate='retrieval' gates a residual"):
        RunConfig.from_dict({"fusion": {"gate": "retrieval", "fusion_mode": "replace"}})
    with pytest.raises(ConfigError, match=r"fusion\.gate: expected 'static' \| 'retrieval'"):
        RunConfig.from_dict({"fusion": {"gate": "distance"}})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("from_datastore", [False, True])
def test_gradients_reach_the_retrieval_gate(tmp_path, split, family, from_datastore):
    parts = build_store(tmp_path, family, split)
    lm = fused_lm(parts, sites=("head",) if from_datastore else (0, "head"), gate="retrieval")
    assert set(lm.engine.retrieval_gates) == set(lm.engine.gates)
    randomise_gates(lm)
    lm.train()
    if from_datastore:
        logits = lm.forward_from_datastore(torch.arange(10, 40)[None].repeat(2, 1))
    else:
        rows = torch.arange(10, 40)[None].repeat(2, 1)
        logits = lm(text(split, 10, 30, 2), query_positions=rows, use_cache=False).logits
    logits.float().logsumexp(-1).mean().backward()
    for gate in lm.engine.retrieval_gates.values():
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        assert gate.bias.grad is not None and gate.bias.grad.abs() > 0


def test_retrieval_gate_save_load_round_trip(tmp_path, split):
    parts = build_store(tmp_path, "llama", split)
    model, _tokenizer, store, index = parts
    lm = fused_lm(parts, sites=(-1, "head"), gate="retrieval")
    randomise_gates(lm)
    with torch.no_grad():
        for i, gate in enumerate(lm.engine.retrieval_gates.values()):
            gate.weight.copy_(torch.tensor([0.5, -1.0, 2.0]) * (i + 1))
            gate.bias.fill_(-0.25 * (i + 1))
    lm.save_pretrained(tmp_path / "adapter")
    loaded = HetGraphLM.from_pretrained(tmp_path / "adapter", model, store, index)
    assert loaded.config.gate == "retrieval"
    for key, value in lm.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    input_ids = text(split, 50, 30)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, lm(input_ids).logits)


def test_adapters_saved_before_the_gate_option_still_load(tmp_path, split):
    parts = build_store(tmp_path, "gpt2", split)
    model, _tokenizer, store, index = parts
    lm = fused_lm(parts, sites=("head",))
    randomise_gates(lm)
    out = tmp_path / "old-adapter"
    lm.save_pretrained(out)
    saved = read_adapter_config(out)
    for key in ("gate", "gradient_checkpointing"):
        del saved["fusion"][key]
    atomic_write_json_record(out / ADAPTER_CONFIG, saved)
    loaded = HetGraphLM.from_pretrained(out, model, store, index)
    assert loaded.config.gate == "static" and len(loaded.engine.retrieval_gates) == 0
    input_ids = text(split, 50, 30)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, lm(input_ids).logits)


def test_retrieval_gate_trains_end_to_end_at_every_layer(tmp_path, split):
    parts = build_store(tmp_path, "qwen2", split)
    lm = fused_lm(parts, gate="retrieval", gradient_checkpointing=True)
    training = TrainingConfig(
        max_steps=3,
        batch_size=2,
        context_length=32,
        lr=1e-2,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=0,
        seed=0,
    )
    result = train_adapter(lm, split, None, training, tmp_path / "run", show_progress=False)
    assert result.steps == 3 and all(np.isfinite(result.train_losses))
    assert any(float(gate.detach().abs().sum()) > 0 for gate in lm.engine.gates.values())
    assert any(float(g.bias.detach().abs()) > 0 for g in lm.engine.retrieval_gates.values())


# -------------------------------------------------------------------- inspection
@pytest.mark.parametrize("family", FAMILIES)
def test_inspection_shows_every_sites_attention(tmp_path, split, family):
    parts = build_store(tmp_path, family, split)
    _model, tokenizer, _store, _index = parts
    lm = fused_lm(parts, sites=["::2", -1, "head"], gate="retrieval")
    randomise_gates(lm)
    sample = tokenizer.decode(split.tokens[60:90].tolist())
    report = inspect_position(lm.model, lm.engine, tokenizer, sample, position=-1, num_neighbours=4)
    expected = {f"layer_{s}" if s != "head" else "head" for s in lm.engine.fusion_sites}
    assert len(report.neighbours) == 4
    for neighbour in report.neighbours:
        assert set(neighbour.attention) == expected
        assert all(0.0 <= value <= 1.0 for value in neighbour.attention.values())
    # Without c2c edges a ctx node attends only to its k neighbours: weights sum to 1.
    for site in expected:
        assert sum(n.attention[site] for n in report.neighbours) == pytest.approx(1.0, abs=1e-5)
    # Untrained retrieval gates (a = 0, b = 0) let half through, at every site.
    assert report.gate_factors == dict.fromkeys(expected, 0.5)
    shown = format_report(report)
    assert all(f"{site}=" in shown for site in expected) and "retrieval gate" in shown


def test_inspected_attention_does_not_depend_on_the_other_inspected_positions(tmp_path, split):
    # With c2c edges a position's graph state depends on the text before it: the attention
    # reported for a position is that of the forward's graph over the whole text, the same
    # whichever other positions are inspected with it (it was the graph of the inspected
    # positions alone).
    parts = build_store(tmp_path, "llama", split)
    lm = fused_lm(parts, sites=("head",), graph={"c2c": True})
    input_ids = text(split, start=60, length=30)[0]
    alone = inspect_positions(lm.model, lm.engine, parts[1], input_ids, [20], num_neighbours=4)[0]
    together = inspect_positions(
        lm.model, lm.engine, parts[1], input_ids, [5, 12, 20], num_neighbours=4
    )[2]
    for a, b in zip(alone.neighbours, together.neighbours, strict=True):
        assert a.row == b.row
        assert a.attention["head"] == pytest.approx(b.attention["head"], abs=1e-6)
