"""AdapterConfig.norm_init: the LayerNorms' initial gain, and "keys" resolved from the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fusion import build_store, repeated_pattern_split

from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.nn import AdapterConfig, GraphAdapter
from hetgraph.testing import byte_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def split():
    return repeated_pattern_split()


def test_norm_init_is_checked_and_round_trips():
    assert AdapterConfig.from_dict({"norm_init": "keys"}).norm_init == "keys"
    assert AdapterConfig.from_dict(AdapterConfig(norm_init=2.5).to_dict()).norm_init == 2.5
    for bad in (0.0, -1.0, float("inf"), "rms"):
        with pytest.raises(ValueError, match="norm_init"):
            AdapterConfig.from_dict({"norm_init": bad})
    unresolved = AdapterConfig(norm_init="keys").resolved(ctx_channels=16, nbr_channels=16)
    with pytest.raises(ValueError, match="norm_init='keys' is not resolved"):
        GraphAdapter(unresolved)


@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_every_layer_norm_starts_at_the_gain(gain):
    config = AdapterConfig(hidden_channels=16, heads=4, num_layers=2, norm_init=gain)
    adapter = GraphAdapter(config.resolved(ctx_channels=16, nbr_channels=16))
    norms = [m for m in adapter.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 * 2  # layers x (attention + feed-forward) x node types
    for norm in norms:
        assert torch.equal(norm.weight, torch.full_like(norm.weight, gain))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def _paper_lm(tmp_path, split, family, norm_init):
    model, tokenizer, store, index = build_store(tmp_path, family, split)
    config = FusionConfig.paper(k=4, adapter=AdapterConfig.paper(norm_init=norm_init))
    return HetGraphLM(model, store, index, config, tokenizer=tokenizer).eval()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_keys_gain_is_the_mean_row_std_of_the_keys(tmp_path, split, family):
    lm = _paper_lm(tmp_path, split, family, "keys")
    store = lm.engine.datastore
    keys = torch.from_numpy(np.array(store.keys[:])).float()
    naive = float(keys.std(dim=1, unbiased=False).mean())  # every row (the store is small)
    assert store.key_scale() == pytest.approx(naive, rel=1e-5)
    adapter = lm.engine.adapter_at("head")
    assert adapter.config.norm_init == pytest.approx(naive, rel=1e-5)
    for conv in adapter.convs:
        for t in conv.node_types:
            assert torch.allclose(conv.norm[t].weight, torch.full_like(conv.norm[t].weight, naive))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_keys_gain_starts_paper_mode_near_the_base_model(tmp_path, split, family):
    """Replace mode hands the head the adapter's LayerNorm output: at gain 1 unit-variance
    states, at the keys' gain states of the scale the head expects."""
    input_ids = torch.from_numpy(split.tokens[200:260].astype(np.int64)).view(2, 30)
    divergence = {}
    for norm_init in (1.0, "keys"):
        model, tokenizer = tiny_causal_lm(family), byte_tokenizer()
        with torch.no_grad():
            model.model.norm.weight.mul_(4.0)  # SmolLM2's head input: a final-norm gain of rms 1.8
        store = build_datastore(
            model, tokenizer, split, tmp_path / f"ds-{norm_init}",
            DatastoreConfig(context_length=64, stride=32, batch_size=4), show_progress=False,
        )  # fmt: skip
        index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
        config = FusionConfig.paper(k=4, adapter=AdapterConfig.paper(norm_init=norm_init))
        lm = HetGraphLM(model, store, index, config, tokenizer=tokenizer).eval()
        with torch.no_grad():
            base = F.log_softmax(model(input_ids).logits.float(), -1)
            with lm:
                fused = F.log_softmax(lm(input_ids).logits.float(), -1)
        divergence[norm_init] = float(F.kl_div(fused, base, log_target=True, reduction="batchmean"))
    assert divergence["keys"] < 0.25 * divergence[1.0], divergence
