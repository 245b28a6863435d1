"""The hook protocol: one per-call context in one ContextVar, and torch.compile."""

from __future__ import annotations

import contextvars

import numpy as np
import pytest
import torch
from test_fusion import SMALL_ADAPTER, build_store, repeated_pattern_split

from hetgraph.fusion import (
    CallOptions,
    FusionConfig,
    HetGraphLM,
    KNNMixture,
    context as context_module,
)
from hetgraph.fusion.context import (
    active_context,
    call_options,
    enter_context,
    exit_context,
    generation_state,
    knn_mixture,
)


def test_the_protocol_holds_one_context_variable():
    variables = [v for v in vars(context_module).values() if isinstance(v, contextvars.ContextVar)]
    assert len(variables) == 1


def test_options_go_to_the_next_call_only_and_block_settings_to_every_call():
    mixture = KNNMixture(0.5, 10.0)
    assert active_context() is None
    with knn_mixture(mixture), generation_state() as state:
        assert active_context() is None  # a block is no call
        with call_options(CallOptions(k=3)):
            outer = enter_context(None)
            assert active_context() is outer and outer.options.k == 3
            inner = enter_context(None)  # a nested call: not the caller's options
            assert inner.options.k is None and inner.options.knn == mixture
            assert inner.generation is state
            exit_context(inner)
            assert active_context() is outer
            exit_context(outer)
            again = enter_context(None)  # the options were consumed by the first call
            assert again.options.k is None and again.options.knn == mixture
            exit_context(again)
    assert active_context() is None
    plain = enter_context(None)
    assert plain.options == CallOptions() and plain.generation is None
    exit_context(plain)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    split = repeated_pattern_split()
    model, _tokenizer, store, index = build_store(tmp_path_factory.mktemp("hooks"), "qwen2", split)
    return model, store, index, split


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is unavailable")
def test_a_compiled_base_model_with_the_hooks_attached_gives_the_eager_logits(parts):
    model, store, index, split = parts
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(0, "head"), k=4, adapter=SMALL_ADAPTER)
    )
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.fill_(1.0)
    input_ids = torch.from_numpy(split.tokens[:40].astype(np.int64))[None]
    with torch.no_grad():
        eager = lm(input_ids).logits
        assert not torch.allclose(eager, model(input_ids).logits)  # fusion changes them
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager")
        with lm, torch.no_grad():
            logits = compiled(input_ids).logits
            with call_options(CallOptions(output_retrieval=True)):  # options reach it too
                output = compiled(input_ids)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    assert output.retrieval.neighbour_ids.shape == (1, 40, 4)
