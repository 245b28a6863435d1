"""NeighbourStates: the adapters' window side read from a table gives the full forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gnnlm_reference import CANONICAL_ETYPES
from test_fusion import SMALL_ADAPTER, build_store, randomise_gates, repeated_pattern_split

from hetgraph import ConfigError, EvalConfig, NeighbourStates
from hetgraph.evaluation import evaluate_four_way, gnn as gnn_module, model_perplexity
from hetgraph.evaluation.gnn import evaluation_neighbour_states
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.graph import EDGE_TYPES
from hetgraph.testing import FAMILIES

ADAPTER = {**SMALL_ADAPTER, "dropout": 0.1, "attn_dropout": 0.1}


@pytest.fixture(scope="module")
def split():
    return repeated_pattern_split()


def make_lm(tmp_path, split, family="llama", **config) -> HetGraphLM:
    model, tokenizer, store, index = build_store(tmp_path, family, split)
    config = {"k": 4, "adapter": ADAPTER, **config}
    lm = HetGraphLM(model, store, index, FusionConfig(**config), tokenizer=tokenizer)
    randomise_gates(lm)
    return lm.eval()


CONFIGS = {
    "head": {},
    "layer0+head": {"fusion_layers": (0, "head")},
    "n2c-window-l2r2": {"graph": {"left": 2, "right": 2, "n2c": "window"}},
    "paper": "paper",
}


def fusion_config(name: str) -> dict:
    if CONFIGS[name] == "paper":
        paper = FusionConfig.paper(k=4, adapter=ADAPTER)
        return {f.name: getattr(paper, f.name) for f in dataclasses.fields(paper)}
    return CONFIGS[name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_with_neighbour_states_equals_the_full_forward(tmp_path, split, family, name):
    lm = make_lm(tmp_path, split, family, **fusion_config(name))
    states = NeighbourStates.build(
        lm.engine, lm.model.get_input_embeddings(), batch_rows=50, show_progress=False
    )
    assert states.nbytes == NeighbourStates.estimate_nbytes(lm.engine)
    assert all(states.covers(site) for site in lm.engine.fusion_sites)
    input_ids = torch.from_numpy(split.tokens[100:160].astype(np.int64)).view(2, 30)
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = lm(input_ids, attention_mask=mask).logits
        read = lm(input_ids, attention_mask=mask, neighbour_states=states).logits
        base = lm.model(input_ids, attention_mask=mask).logits
    assert not torch.allclose(full, base, atol=1e-3)  # the adapters do change the logits
    torch.testing.assert_close(read, full, atol=1e-5, rtol=1e-5)


def test_a_table_built_in_batches_of_any_size_is_the_same(tmp_path, split):
    lm = make_lm(tmp_path, split)
    one = NeighbourStates.build(
        lm.engine,
        lm.model.get_input_embeddings(),
        batch_rows=len(lm.engine.datastore),
        show_progress=False,
    )
    lm.train()  # build() computes in eval mode and restores the mode
    many = NeighbourStates.build(
        lm.engine, lm.model.get_input_embeddings(), batch_rows=13, show_progress=False
    )
    assert lm.training and all(a.training for a in lm.engine.adapters.values())
    for key, table in one.tables.items():
        torch.testing.assert_close(many.tables[key], table, atol=1e-6, rtol=1e-6)


def test_generation_with_neighbour_states_gives_the_same_tokens(tmp_path, split):
    lm = make_lm(tmp_path, split, fusion_layers=(0, "head"))
    states = NeighbourStates.build(lm.engine, lm.model.get_input_embeddings(), show_progress=False)
    prompt = torch.from_numpy(split.tokens[:12].astype(np.int64))[None]
    kwargs = dict(
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=256,
        output_scores=True,
        return_dict_in_generate=True,
    )
    full = lm.generate(prompt, **kwargs)
    read = lm.generate(prompt, neighbour_states=states, **kwargs)
    assert torch.equal(full.sequences, read.sequences)
    for a, b in zip(full.scores, read.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_stale_tables_are_refused_and_training_does_not_read_them(tmp_path, split):
    lm = make_lm(tmp_path, split)
    states = NeighbourStates.build(lm.engine, lm.model.get_input_embeddings(), show_progress=False)
    input_ids = torch.from_numpy(split.tokens[:30].astype(np.int64))[None]
    with torch.no_grad():
        next(lm.engine.adapter_at("head").parameters()).add_(0.01)
    with pytest.raises(ValueError, match="changed since these neighbour states"), torch.no_grad():
        lm(input_ids, neighbour_states=states)
    # Recording gradients in eval mode computes the windows (their weights get gradients).
    lm(input_ids, neighbour_states=states).logits.sum().backward()
    assert lm.engine.adapter_at("head").nbr_in.weight.grad is not None
    lm.zero_grad(set_to_none=True)
    lm.train()  # training mode computes the windows: the table is not read
    lm(input_ids, neighbour_states=states).logits.sum().backward()
    assert lm.engine.adapter_at("head").nbr_in.weight.grad is not None
    other = make_lm(tmp_path / "other", split, k=3)
    with pytest.raises(ValueError, match="another datastore or fusion config"), torch.no_grad():
        other.eval()(input_ids, neighbour_states=states)


def test_build_checks_its_arguments(tmp_path, split):
    lm = make_lm(tmp_path, split)
    with pytest.raises(ValueError, match="batch_rows must be >= 1"):
        NeighbourStates.build(lm.engine, lm.model.get_input_embeddings(), batch_rows=0)
    with pytest.raises(ValueError, match=r"sites \[3\] are not fused"):
        NeighbourStates.build(lm.engine, lm.model.get_input_embeddings(), sites=[3])
    dedup = make_lm(tmp_path / "dedup", split, graph={"deduplicate": True})
    with pytest.raises(ValueError, match="deduplicate"):
        NeighbourStates.build(dedup.engine, dedup.model.get_input_embeddings())


def test_a_site_the_table_does_not_cover_is_computed(tmp_path, split):
    lm = make_lm(tmp_path, split, fusion_layers=(0, "head"))
    states = NeighbourStates.build(
        lm.engine, lm.model.get_input_embeddings(), sites=["head"], show_progress=False
    )
    assert states.covers("head") and not states.covers(0)
    input_ids = torch.from_numpy(split.tokens[:30].astype(np.int64))[None]
    with torch.no_grad():
        torch.testing.assert_close(
            lm(input_ids, neighbour_states=states).logits,
            lm(input_ids).logits,
            atol=1e-5,
            rtol=1e-5,
        )


def test_evaluation_setting_and_perplexity(tmp_path, split):
    with pytest.raises(ValueError, match="neighbour_states must be"):
        EvalConfig(neighbour_states="yes")  # type: ignore[arg-type]
    config = EvalConfig(context_length=32, stride=16, batch_size=2, neighbour_states="on")
    assert EvalConfig.from_dict(config.to_dict()) == config
    lm = make_lm(tmp_path, split)
    rows = len(lm.engine.datastore)
    off = dataclasses.replace(config, neighbour_states="off")
    assert evaluation_neighbour_states(lm, off, 10 * rows, 4) is None
    auto = dataclasses.replace(config, neighbour_states="auto")
    # auto: only when the evaluation retrieves at least twice the table's windows
    assert evaluation_neighbour_states(lm, auto, rows // 2, 4) is None
    assert isinstance(evaluation_neighbour_states(lm, auto, rows // 2 + 1, 4), NeighbourStates)
    processes = 10**9  # auto shares the memory among the node's torchrun processes
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert evaluation_neighbour_states(lm, auto, 10 * rows, 4) is None
    dedup = make_lm(tmp_path / "dedup", split, graph={"deduplicate": True})
    assert evaluation_neighbour_states(dedup, auto, 10 * rows, 4) is None
    with pytest.raises(ConfigError, match="deduplicate is true"):
        evaluation_neighbour_states(dedup, config, 10 * rows, 4)
    # ... and the four-way evaluation refuses it before any evaluation runs.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            gnn_module,
            "collect_lm_outputs",
            lambda *a, **k: pytest.fail("evaluated before refusing the setting"),
        )
        with pytest.raises(ConfigError, match="--neighbour-states off"):
            evaluate_four_way(dedup, split, split, config, show_progress=False)
    valid = repeated_pattern_split(num_docs=2, seed=1)
    on = model_perplexity(lm, valid, config)
    assert on == pytest.approx(model_perplexity(lm, valid, off), rel=1e-5)


def test_the_official_decoder_sends_nothing_into_the_neighbour_windows():
    """The table's exactness in paper mode rests on this: the official
    TokenGraphTransformerDecoder (our independent port in gnnlm_reference.py) has no edge
    type into ``ntgt`` nodes from ``tgt`` nodes, as hetgraph has no ctx -> nbr relation."""
    assert ("ntgt", "inter", "tgt") in CANONICAL_ETYPES
    assert not [e for e in CANONICAL_ETYPES if e[0] == "tgt" and e[2] == "ntgt"]
    assert not [e for e in EDGE_TYPES if e[0] == "ctx" and e[2] == "nbr"]
