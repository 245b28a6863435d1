"""Fusion of graph adapters into tiny Qwen2 / Llama / GPT-2 models through forward hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.fusion import AdapterMismatchError, FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.testing import FAMILIES, byte_tokenizer, repeated_pattern_split, tiny_causal_lm
from hetgraph.training import TrainingConfig, train_adapter

SMALL_ADAPTER = dict(hidden_channels=32, num_layers=2, heads=4, dropout=0.0, attn_dropout=0.0)


@pytest.fixture(scope="module")
def split() -> TokenizedSplit:
    return repeated_pattern_split()


def build_store(tmp_path, family: str, split: TokenizedSplit, key_layer=None, seed: int = 0):
    model = tiny_causal_lm(family, seed=seed)
    tokenizer = byte_tokenizer()
    store = build_datastore(
        model,
        tokenizer,
        split,
        tmp_path / f"ds-{family}-{key_layer}-{seed}",
        DatastoreConfig(context_length=64, stride=32, batch_size=4, key_layer=key_layer),
        show_progress=False,
    )
    index = DatastoreIndex.build(store.keys, IndexConfig(factory="Flat"), show_progress=False)
    return model, tokenizer, store, index


def randomise_gates(lm: HetGraphLM, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in lm.engine.gates.values():
            gate.copy_(torch.rand(gate.shape, generator=generator))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sites", [("head",), (0,), (0, "head")])
def test_zero_gate_leaves_logits_unchanged(tmp_path, split, family, sites):
    model, _tokenizer, store, index = build_store(tmp_path, family, split)
    input_ids = torch.from_numpy(split.tokens[:40].astype(np.int64))[None].repeat(2, 1)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    base = model(input_ids, attention_mask=mask).logits
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=sites, k=4, adapter=SMALL_ADAPTER)
    )
    assert lm.engine.needs_prefetch == (0 in sites)
    with lm:
        fused = model(input_ids, attention_mask=mask).logits
    assert torch.equal(base, fused)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gate_greedy_generation_matches_base(tmp_path, split, family):
    model, _tokenizer, store, index = build_store(tmp_path, family, split)
    prompt = torch.from_numpy(split.tokens[:12].astype(np.int64))[None]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=256)
    base = model.generate(prompt, **kwargs)
    for sites in [("head",), (0,)]:
        lm = HetGraphLM(
            model, store, index, FusionConfig(fusion_layers=sites, k=4, adapter=SMALL_ADAPTER)
        )
        assert torch.equal(lm.generate(prompt, **kwargs), base)


def hook_counts(model) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_detach_restores_the_original_hooks(tmp_path, split):
    model, _tokenizer, store, index = build_store(tmp_path, "qwen2", split)
    user_handle = model.model.layers[1].register_forward_hook(lambda *a: None)
    before = hook_counts(model)
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(0, 1, "head"), k=4, adapter=SMALL_ADAPTER)
    )
    lm.attach()
    assert hook_counts(model) != before
    lm.attach()  # idempotent
    lm.detach()
    assert hook_counts(model) == before
    with lm:
        pass
    assert hook_counts(model) == before
    user_handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_prefetch_and_single_pass_agree(tmp_path, split, family):
    # Retrieval at decoder layer 0, fusion at layer 1: single pass; forcing a prefetch pass
    # must give the same neighbours and the same (non-zero-gate) outputs.
    model, _tokenizer, store, index = build_store(tmp_path, family, split, key_layer=0)
    input_ids = torch.from_numpy(split.tokens[50:90].astype(np.int64))[None]
    outputs = {}
    for prefetch in (False, True):
        torch.manual_seed(0)
        config = FusionConfig(
            fusion_layers=(1,), k=4, adapter=SMALL_ADAPTER, prefetch=prefetch or None
        )
        lm = HetGraphLM(model, store, index, config)
        randomise_gates(lm)
        assert lm.engine.needs_prefetch == prefetch
        with torch.no_grad():
            outputs[prefetch] = lm(input_ids).logits
    assert torch.allclose(outputs[False], outputs[True], atol=1e-6)
    assert not torch.equal(outputs[False], model(input_ids).logits)


def test_gradients_reach_adapters_only(tmp_path, split):
    model, _tokenizer, store, index = build_store(tmp_path, "llama", split)
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(1, "head"), k=4, adapter=SMALL_ADAPTER)
    )
    randomise_gates(lm)
    lm.train()
    input_ids = torch.from_numpy(split.tokens[:48].astype(np.int64))[None]
    logits = lm(input_ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:]).backward()
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    last = SMALL_ADAPTER["num_layers"] - 1
    # The last graph layer's nbr-side outputs reach nothing (the adapter skips them).
    dead = tuple(
        f".{part}.{last}.{suffix}"
        for part, suffix in [
            ("convs", "lin_out.nbr"),
            ("convs", "norm.nbr"),
            ("convs", "rel_att.nbr__n2n"),
            ("convs", "rel_msg.nbr__n2n"),
            ("convs", "rel_prior.nbr__n2n"),
            ("ffns", "nbr"),
            ("ffn_norms", "nbr"),
        ]
    )
    for name, param in lm.named_parameters():
        if name.startswith("model.") or any(part in name for part in dead):
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("from_datastore", [True, False])
def test_training_lowers_loss_and_leaves_base_untouched(tmp_path, split, from_datastore):
    model, _tokenizer, store, index = build_store(tmp_path, "qwen2", split)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    config = FusionConfig(
        fusion_layers=("head",), k=4, adapter=SMALL_ADAPTER, graph=dict(leakage_radius=4)
    )
    lm = HetGraphLM(model, store, index, config)
    # Held-out documents that quote the stored patterns: only retrieval can predict them
    # from their first tokens on (the tiny random LM cannot).
    valid = repeated_pattern_split(num_docs=2, repeats=2, seed=0)
    from hetgraph.evaluation import EvalConfig, model_perplexity

    windows = EvalConfig(context_length=64, stride=32)
    before = model_perplexity(lm, valid, windows)
    # The tiny random LM has tiny embeddings (std 0.02), so moving its logits needs a large lr.
    training = TrainingConfig(
        max_steps=60,
        batch_size=4,
        context_length=48,
        lr=3e-2,
        warmup_steps=5,
        eval_every=0,
        checkpoint_every=0,
        seed=0,
        from_datastore=from_datastore,
    )
    result = train_adapter(lm, split, None, training, tmp_path / "adapter", show_progress=False)
    after = model_perplexity(lm, valid, windows)
    assert np.mean(result.train_losses[-10:]) < np.mean(result.train_losses[:10])
    assert after < 0.5 * before, (before, after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key


@pytest.mark.parametrize("from_datastore", [True, False])
def test_training_resumes_to_the_same_adapter(tmp_path, split, from_datastore):
    model, _tokenizer, store, index = build_store(tmp_path, "gpt2", split)
    config = FusionConfig(
        fusion_layers=("head",),
        k=4,
        adapter=dict(SMALL_ADAPTER, dropout=0.1),
        graph=dict(leakage_radius=4),
    )
    training = TrainingConfig(
        max_steps=6,
        batch_size=2,
        context_length=32,
        lr=1e-3,
        warmup_steps=2,
        eval_every=0,
        checkpoint_every=3,
        seed=3,
        from_datastore=from_datastore,
    )

    def run(out, steps_first=None):
        torch.manual_seed(0)
        lm = HetGraphLM(model, store, index, config)
        if steps_first:
            partial = TrainingConfig(**training.to_dict())
            try:
                train_adapter(
                    lm, split, None, partial, out, show_progress=False, stop_after=steps_first
                )
            except KeyboardInterrupt:
                pass
            torch.manual_seed(0)
            lm = HetGraphLM(model, store, index, config)
        train_adapter(lm, split, None, training, out, show_progress=False)
        return lm.adapter_state_dict()

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", steps_first=3)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("sites", [("head",), (0, "head")])
def test_save_load_round_trip_gives_identical_logits(tmp_path, split, sites):
    model, tokenizer, store, index = build_store(tmp_path, "qwen2", split)
    lm = HetGraphLM(
        model,
        store,
        index,
        FusionConfig(fusion_layers=sites, k=4, adapter=SMALL_ADAPTER),
        tokenizer=tokenizer,
    )
    randomise_gates(lm)
    input_ids = torch.from_numpy(split.tokens[:40].astype(np.int64))[None]
    with torch.no_grad():
        expected = lm(input_ids).logits
    lm.save_pretrained(tmp_path / "adapter")
    loaded = HetGraphLM.from_pretrained(
        tmp_path / "adapter", model, store, index, tokenizer=tokenizer
    )
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


def test_adapter_from_another_model_or_datastore_is_refused(tmp_path, split):
    model, _tokenizer, store, index = build_store(tmp_path, "qwen2", split)
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER))
    lm.save_pretrained(tmp_path / "adapter")
    other_model, _, other_store, other_index = build_store(tmp_path, "qwen2", split, seed=1)
    with pytest.raises(AdapterMismatchError, match="different"):
        HetGraphLM.from_pretrained(tmp_path / "adapter", other_model, other_store, other_index)
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        HetGraphLM.from_pretrained(tmp_path / "nothing", model, store, index)


def test_knn_interpolation_inside_generate(tmp_path, split):
    model, _tokenizer, store, index = build_store(tmp_path, "llama", split)
    lm = HetGraphLM(
        model,
        store,
        index,
        FusionConfig(k=4, adapter=SMALL_ADAPTER, knn_lambda=0.999, knn_temperature=0.01),
    )
    # The prompt is the start of a training document: kNN with λ≈1 continues it verbatim
    # (the pattern repeats, so the next token is the one after the nearest stored context).
    prompt = torch.from_numpy(split.tokens[24:48].astype(np.int64))[None]
    out = lm.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=256, knn=True)
    assert out[0, 24:].tolist() == split.tokens[48:54].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_from_datastore_matches_a_full_forward(tmp_path, split, family):
    # The first window of the datastore saw exactly these 40 tokens, so its stored keys are
    # the head-input states of a forward over them (up to fp16 rounding).
    model, _tokenizer, store, index = build_store(tmp_path, family, split)
    lm = HetGraphLM(
        model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER, graph=dict(leakage_radius=4))
    )
    randomise_gates(lm)
    assert lm.engine.can_run_from_datastore
    rows = torch.arange(40)[None]
    input_ids = torch.from_numpy(split.tokens[:40].astype(np.int64))[None]
    with torch.no_grad():
        full = lm(input_ids, query_positions=rows).logits
        cached = lm.forward_from_datastore(rows)
    assert torch.allclose(full, cached, atol=1e-2, rtol=1e-2)
    with lm:  # attached hooks (as during training) must not fuse a second time
        assert torch.equal(lm.forward_from_datastore(rows), cached)
    assert (full.argmax(-1) == cached.argmax(-1)).float().mean() > 0.95
    layer_lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(0,), k=4, adapter=SMALL_ADAPTER)
    )
    assert not layer_lm.engine.can_run_from_datastore
    with pytest.raises(ValueError, match="forward_from_datastore"):
        layer_lm.forward_from_datastore(rows)


def test_nested_calls_keep_their_own_state(tmp_path, split):
    # A forward (and a generate) issued while another forward of the same HetGraphLM is
    # running — e.g. from a user hook inside an evaluation loop — must not see or change
    # the outer call's retrieval, graphs or options.
    model, _tokenizer, store, index = build_store(tmp_path, "qwen2", split)
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(0, "head"), k=4, adapter=SMALL_ADAPTER)
    )
    randomise_gates(lm)
    outer_ids = torch.from_numpy(split.tokens[:40].astype(np.int64))[None]
    inner_ids = torch.from_numpy(split.tokens[100:117].astype(np.int64))[None]
    prompt = torch.from_numpy(split.tokens[200:212].astype(np.int64))[None]
    generate = dict(max_new_tokens=5, do_sample=False, pad_token_id=256)
    with torch.no_grad():
        expected_outer = lm(outer_ids, k=3, output_retrieval=True)
        expected_inner = lm(inner_ids).logits
        expected_generation = lm.generate(prompt, **generate)
    seen: dict = {}

    def nested(module, args, output):
        if not seen:  # once, during the outer call (not again during the inner ones)
            seen["started"] = True
            seen["inner"] = lm(inner_ids).logits
            seen["generation"] = lm.generate(prompt, **generate)

    handle = model.model.layers[1].register_forward_hook(nested)
    try:
        with torch.no_grad():
            outer = lm(outer_ids, k=3, output_retrieval=True)
    finally:
        handle.remove()
    assert torch.equal(outer.logits, expected_outer.logits)
    assert torch.equal(outer.retrieval.neighbour_ids, expected_outer.retrieval.neighbour_ids)
    assert outer.retrieval.neighbour_ids.shape[-1] == 3
    assert torch.equal(seen["inner"], expected_inner)
    assert torch.equal(seen["generation"], expected_generation)
    assert lm.config.k == 4 and not lm.is_attached


def test_threads_see_their_own_calls(tmp_path, split):
    from concurrent.futures import ThreadPoolExecutor

    model, _tokenizer, store, index = build_store(tmp_path, "llama", split)
    lm = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER))
    randomise_gates(lm)
    inputs = [
        torch.from_numpy(split.tokens[i : i + 30].astype(np.int64))[None] for i in (0, 300, 600)
    ]
    with torch.no_grad():
        expected = [lm(ids).logits for ids in inputs]
        with lm, ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda ids: lm(ids).logits, inputs * 3))
    for i, logits in enumerate(results):
        assert torch.equal(logits, expected[i % 3])


def test_to_moves_the_base_model_adapters_and_corpus_tables(tmp_path, split):
    model, _tokenizer, store, index = build_store(tmp_path, "gpt2", split)
    lm = HetGraphLM(
        model, store, index, FusionConfig(fusion_layers=(0, "head"), k=4, adapter=SMALL_ADAPTER)
    )
    input_ids = torch.from_numpy(split.tokens[:30].astype(np.int64))[None]
    assert lm.to(torch.float64) is lm
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert (
        {p.dtype for p in lm.engine.adapters.parameters()}
        | {g.dtype for g in lm.engine.gates.values()}
    ) == {torch.float64}
    # The corpus tables stay the datastore's int32 memmaps: .to() neither casts nor copies them.
    assert lm.engine.graph_inputs.corpus.tokens is store.tokens
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.int32
    with torch.no_grad():  # zero gates: still exactly the (now float64) base model
        assert torch.equal(lm(input_ids).logits, model(input_ids).logits)
    lm.train()
    assert (
        lm.engine.adapters.training and not model.training
    )  # the frozen base model stays in eval mode
    # Only the trained tensors are saved; the base model's weights are not ours to save.
    assert set(lm.adapter_state_dict()) == set(lm.engine.state_dict())
    assert {f"engine.{k}" for k in lm.adapter_state_dict()} == {
        k for k in lm.state_dict() if not k.startswith("model.")
    }
    assert all(k.startswith(("adapters.", "gates.")) for k in lm.adapter_state_dict())


class _CountingIndex:
    """Counts the queries searched through an index."""

    def __init__(self, index) -> None:
        self.index, self.queries = index, 0

    def __getattr__(self, name):
        return getattr(self.index, name)

    def __len__(self) -> int:
        return len(self.index)

    def search(self, queries, k, *args, **kwargs):
        self.queries += len(queries)
        return self.index.search(queries, k, *args, **kwargs)


@pytest.mark.parametrize(
    "family, sites, c2c, trimmed",
    [
        *((family, ("head",), False, True) for family in FAMILIES),
        (FAMILIES[0], (0,), False, True),
        (FAMILIES[0], (0, "head"), False, True),
        (FAMILIES[0], ("head",), True, False),
        (FAMILIES[0], (0,), True, True),
    ],
)
def test_evaluation_skips_unscored_positions_with_the_same_log_probs(
    tmp_path, split, family, sites, c2c, trimmed
):
    # Strided evaluation scores the last `stride` columns of a window: a fused head whose
    # graph links no two positions retrieves and builds a graph for those only, through
    # HF's logits_to_keep; with causal c2c edges at the head every position is computed.
    from hetgraph.corpus.windows import sliding_windows
    from hetgraph.datastore.build import window_batches
    from hetgraph.evaluation import EvalConfig, TrimmedForward, collect_lm_outputs, gnn_forward

    model, _tokenizer, store, index = build_store(tmp_path, family, split)
    counting = _CountingIndex(index)
    graph = {"c2c": True} if c2c else {}
    lm = HetGraphLM(
        model,
        store,
        counting,
        FusionConfig(fusion_layers=sites, k=4, adapter=SMALL_ADAPTER, graph=graph),
    )
    randomise_gates(lm)
    lm.eval()
    forward = gnn_forward(lm)
    assert isinstance(forward, TrimmedForward) == trimmed == lm.engine.fuses_positions_independently
    windows = EvalConfig(context_length=48, stride=16, batch_size=2)
    test = split.truncate(120)
    trim = collect_lm_outputs(model, test, windows, forward=forward, show_progress=False)
    searched_trimmed, counting.queries = counting.queries, 0
    full = collect_lm_outputs(
        model, test, windows, forward=lambda ids: lm(ids).logits, show_progress=False
    )
    torch.testing.assert_close(trim.lm_log_probs, full.lm_log_probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(trim.positions.numpy(), np.arange(119))
    if trimmed and "head" in sites and 0 not in sites:
        # one retrieval per column a batch scores (its widest window's), not per column
        batches = window_batches(sliding_windows(119, 48, 16), 2)
        scored = sum(len(b) * max(w.end - w.score_start for w in b) for b in batches)
        assert searched_trimmed == scored < counting.queries == 48 * sum(map(len, batches))
    else:
        assert searched_trimmed == counting.queries
