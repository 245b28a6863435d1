"""The random-neighbours control: FusionConfig(neighbours="random") draws each position's
neighbours uniformly from the datastore, seeded by the query's identity (its row or tokens),
leakage-filtered, saved with the adapter, and never searches FAISS for the graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_fusion import SMALL_ADAPTER, build_store, randomise_gates, repeated_pattern_split

from hetgraph import ConfigError, EvalConfig, TrainingConfig
from hetgraph.cli import main
from hetgraph.evaluation import evaluate_four_way
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.fusion.context import CallOptions
from hetgraph.fusion.random_neighbours import draw_rows, row_identities, token_identities
from hetgraph.io import ADAPTER_WEIGHTS
from hetgraph.testing import FAMILIES, write_cli_workspace
from hetgraph.training import train_adapter


@pytest.fixture(scope="module")
def split():
    return repeated_pattern_split()


@pytest.fixture(scope="module")
def stores(tmp_path_factory, split):
    """One tiny datastore per family (built once: the tests only read them)."""
    root = tmp_path_factory.mktemp("stores")
    return {family: build_store(root, family, split) for family in FAMILIES}


def random_lm(stores, family="qwen2", **config) -> HetGraphLM:
    model, tokenizer, store, index = stores[family]
    config = {"k": 4, "adapter": SMALL_ADAPTER, "neighbours": "random", **config}
    return HetGraphLM(model, store, index, FusionConfig(**config), tokenizer=tokenizer)


def windows(split, count=4, length=40) -> torch.Tensor:
    return torch.from_numpy(split.tokens[: count * length].astype(np.int64)).view(count, length)


def neighbours_of(lm, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids, output_retrieval=True, **kwargs).retrieval.neighbour_ids


def test_no_faiss_search_builds_a_random_graph(stores, split, monkeypatch):
    lm = random_lm(stores)

    def refuse(*args, **kwargs):
        raise AssertionError("random neighbours searched the index")

    monkeypatch.setattr(lm.engine.retriever, "search", refuse)
    ids = neighbours_of(lm, windows(split))
    assert ids.shape == (4, 40, 4) and bool((ids >= 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_tokens_get_the_same_neighbours_in_any_batch(stores, split, family):
    lm = random_lm(stores, family)
    input_ids = windows(split)
    together = neighbours_of(lm, input_ids)
    one_by_one = torch.cat([neighbours_of(lm, row[None]) for row in input_ids])
    assert torch.equal(together, one_by_one)
    # Left padding is no token: the padded row draws the rows it draws alone (their order,
    # nearest first, follows the states, which GPT-2's positions change under padding).
    padded = torch.cat([input_ids.new_zeros(1, 5), input_ids[1:2]], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)], 1)
    drawn = neighbours_of(lm, padded, attention_mask=mask)[:, 5:]
    assert torch.equal(drawn.sort(-1).values, together[1:2].sort(-1).values)
    # Datastore rows (training) too: one call or two.
    rows = torch.arange(200, 240).view(2, 20)
    queries = torch.zeros(2, 20, lm.engine.datastore.dim)
    both = lm.engine.retrieve(queries, CallOptions(query_positions=rows)).neighbour_ids
    halves = [
        lm.engine.retrieve(queries[i : i + 1], CallOptions(query_positions=rows[i : i + 1]))
        for i in range(2)
    ]
    assert torch.equal(both, torch.cat([h.neighbour_ids for h in halves]))


def test_another_seed_draws_other_neighbours(stores, split):
    input_ids = windows(split)
    first = neighbours_of(random_lm(stores), input_ids)
    again = neighbours_of(random_lm(stores), input_ids)
    other = neighbours_of(random_lm(stores, neighbour_seed=1), input_ids)
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.9


def test_draws_are_distinct_uniform_and_reach_every_row():
    n, count = 500, 8
    identities = row_identities(torch.arange(20_000), seed=3)
    rows = draw_rows(identities, count, n)
    assert bool(((rows >= 0) & (rows < n)).all())
    assert bool((rows.sort(1).values.diff(dim=1) > 0).all())  # distinct per query
    counts = torch.bincount(rows.flatten(), minlength=n).float()
    expected = 20_000 * count / n  # 320 per row
    assert counts.min() > 0.7 * expected and counts.max() < 1.3 * expected
    # A datastore smaller than twice the draw: a seeded permutation, still distinct.
    small = draw_rows(identities[:100], 6, 10)
    assert bool((small.sort(1).values.diff(dim=1) > 0).all())
    assert set(small.flatten().tolist()) == set(range(10))


def test_token_identities_see_only_the_tokens_up_to_the_query():
    tokens = torch.randint(0, 256, (1, 50))
    changed = tokens.clone()
    changed[0, 30] += 1
    a, b = token_identities(tokens, 0), token_identities(changed, 0)
    assert torch.equal(a[:, :30], b[:, :30])  # the past does not see the change
    assert bool((a[:, 30:62] != b[:, 30:62]).any(-1).all())  # the next 32 positions do


def test_random_neighbours_are_not_biased_toward_near_rows(stores, split):
    lm = random_lm(stores, k=16)
    input_ids = windows(split, count=6)
    with torch.no_grad():
        out = lm(input_ids, output_retrieval=True, output_hidden_states=True)
    ids, distances = out.retrieval.neighbour_ids, out.retrieval.distances
    queries = out.hidden_states[-1].reshape(-1, lm.engine.datastore.dim).float()
    keys = torch.from_numpy(np.asarray(lm.engine.datastore.keys, dtype=np.float32))
    everything = torch.cdist(queries, keys) ** 2  # [Q, N] true squared L2
    flat_ids = ids.reshape(len(queries), -1)
    drawn = everything.gather(1, flat_ids)
    # The distances handed on are the exact ones, nearest first.
    torch.testing.assert_close(distances.reshape(drawn.shape), drawn, rtol=1e-4, atol=1e-3)
    assert bool((distances.diff(dim=-1) >= 0).all())
    # Each drawn row's rank among all rows by distance to its query: ~ the middle.
    rank = (everything[:, None, :] < drawn[:, :, None]).sum(-1).float() / keys.shape[0]
    assert abs(rank.mean().item() - 0.5) < 0.05
    nearest = torch.from_numpy(lm.engine.index.search(queries.numpy(), 16)[1])
    among_nearest = (flat_ids[:, :, None] == nearest[:, None, :]).any(-1)
    assert among_nearest.float().mean() < 0.1  # retrieval: 1


@pytest.mark.parametrize("margin", [0, 32])
def test_random_neighbours_are_leakage_filtered(stores, split, margin):
    lm = random_lm(stores, k=16, retrieval_margin=margin)  # radius 3072: whole documents
    docs = torch.from_numpy(np.asarray(lm.engine.datastore.doc_ids, dtype=np.int64))
    rows = torch.arange(0, len(docs), 7)[None]
    queries = torch.from_numpy(
        np.asarray(lm.engine.datastore.keys[rows[0].numpy()], dtype=np.float32)
    )[None]
    ids = lm.engine.retrieve(queries, CallOptions(query_positions=rows)).neighbour_ids[0]
    found = ids >= 0
    assert not bool((docs[ids.clamp(min=0)] == docs[rows[0], None])[found].any())
    # 1 document in 6 leaks: dropped, not replaced without a margin, refilled with one.
    missing = (~found).float().mean().item()
    assert 0.08 < missing < 0.3 if margin == 0 else missing == 0.0
    # Without rows the tokens identify the queries (no filter: the text is not in the store).
    unfiltered = lm.engine.retrieve(queries, tokens=rows % 256).neighbour_ids[0]
    assert bool((unfiltered >= 0).all())
    with pytest.raises(ValueError, match="input_ids"):
        lm.engine.retrieve(queries)


def test_the_setting_is_saved_with_the_adapter(stores, tmp_path, split):
    config = FusionConfig(k=4, neighbours="random", neighbour_seed=7)
    assert FusionConfig.from_dict(config.to_dict()) == config
    old = {
        key: value
        for key, value in config.to_dict().items()
        if key not in ("neighbours", "neighbour_seed")
    }  # an adapter saved before the field
    assert FusionConfig.from_dict(old).neighbours == "retrieved"
    for bad in ({"neighbours": "uniform"}, {"neighbour_seed": -1}, {"neighbour_seed": 2**63}):
        with pytest.raises(ConfigError):
            FusionConfig.from_dict(bad)
    lm = random_lm(stores, neighbour_seed=7)
    randomise_gates(lm)
    lm.save_pretrained(tmp_path / "adapter")
    assert "random-neighbours control" in (tmp_path / "adapter" / "README.md").read_text()
    model, tokenizer, store, index = stores["qwen2"]
    loaded = HetGraphLM.from_pretrained(tmp_path / "adapter", model, store, index, tokenizer)
    assert loaded.config.neighbours == "random" and loaded.config.neighbour_seed == 7
    input_ids = windows(split, count=2)
    assert torch.equal(neighbours_of(loaded, input_ids), neighbours_of(lm, input_ids))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sites", [("head",), (0, "head")])
def test_zero_gates_leave_the_base_model_exactly(stores, split, family, sites):
    lm = random_lm(stores, family, fusion_layers=sites)
    input_ids = windows(split, count=2)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    with torch.no_grad():
        base = lm.model(input_ids, attention_mask=mask).logits
        fused = lm(input_ids, attention_mask=mask).logits
    assert torch.equal(base, fused)


def test_the_knn_mixture_keeps_the_retrieved_neighbours(stores, split):
    model, _tokenizer, store, index = stores["qwen2"]
    retrieved = HetGraphLM(model, store, index, FusionConfig(k=4, adapter=SMALL_ADAPTER))
    random = random_lm(stores)  # zero gates: the graphs change nothing, the mixture decides
    input_ids = windows(split, count=2)
    with torch.no_grad(), retrieved.knn_interpolation(0.5, 10.0):
        expected = retrieved(input_ids).logits
    with torch.no_grad(), random.knn_interpolation(0.5, 10.0):
        mixed = random(input_ids).logits
    torch.testing.assert_close(mixed, expected)


@pytest.mark.parametrize("sites", [("head",), (0, "head")])  # (0, head): a prefetch pass
def test_generation_with_a_cache_draws_as_a_full_forward(stores, split, sites, monkeypatch):
    lm = random_lm(stores, fusion_layers=sites)
    randomise_gates(lm)
    steps, draw = [], lm.engine.retriever.random
    monkeypatch.setattr(lm.engine.retriever, "random", lambda *a, **kw: _record(steps, draw, a, kw))
    prompt = windows(split, count=1, length=12)
    generated = lm.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    # The cache feeds one token per step; its identity still spans the tokens before it.
    per_step = torch.cat([ids.view(-1, 4) for ids in steps])  # the last positions of each
    assert len(steps) == 5 and len(per_step) >= 5
    full = neighbours_of(lm, generated[:, :-1])[0, -len(per_step) :]
    assert torch.equal(per_step.sort(-1).values, full.sort(-1).values)


@pytest.mark.parametrize("neighbours", ["retrieved", "random"])
def test_generation_with_a_prefetch_pass_reads_the_whole_history(stores, split, neighbours):
    # The KV cache reaches the hooks as `cache` (transformers 5): the prefetch pass must
    # still see every token, not only the step's new one.
    lm = random_lm(stores, fusion_layers=(0, "head"), neighbours=neighbours)
    randomise_gates(lm)
    prompt = windows(split, count=1, length=12)
    cached = lm.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    full = lm.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def _record(steps, draw, args, kwargs):
    distances, ids = draw(*args, **kwargs)
    steps.append(ids)
    return distances, ids


def _train(stores, split, out, seed=0):
    torch.manual_seed(0)
    lm = random_lm(stores, adapter={**SMALL_ADAPTER, "dropout": 0.1}, neighbour_seed=seed)
    config = TrainingConfig(
        max_steps=4,
        batch_size=2,
        context_length=32,
        eval_every=2,
        eval_tokens=120,
        checkpoint_every=2,
    )
    train_adapter(lm, split, split, config, out, show_progress=False)
    return lm


def test_training_and_evaluation_with_random_neighbours(stores, split, tmp_path, monkeypatch):
    first = _train(stores, split, tmp_path / "a")
    second = _train(stores, split, tmp_path / "b")
    weights = [(tmp_path / run / ADAPTER_WEIGHTS).read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]  # identical runs: identical bytes
    other = _train(stores, split, tmp_path / "c", seed=1)
    assert (tmp_path / "c" / ADAPTER_WEIGHTS).read_bytes() != weights[0]
    assert any(
        float(g.detach().abs().sum()) > 0 for g in first.engine.gates.values()
    )  # it did train
    del second, other

    def refuse(*args, **kwargs):  # the graphs never search; kNN-LM searches on its own
        raise AssertionError("random neighbours searched the index")

    monkeypatch.setattr(first.engine.retriever, "search", refuse)
    results = evaluate_four_way(
        first,
        split,
        split,
        EvalConfig(context_length=64, stride=32, k=4, max_tokens=200, valid_tokens=200),
        show_progress=False,
    )
    assert {"base", "knn", "gnn", "gnn_knn"} <= set(results)
    assert all(np.isfinite(results[name]["ppl"]) for name in ("gnn", "gnn_knn"))


def test_train_and_eval_through_the_cli(tmp_path, capsys):
    w = write_cli_workspace(tmp_path)
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    run = lambda *argv: main([str(a) for a in argv])  # noqa: E731
    assert (
        run(
            "datastore",
            "build",
            *common,
            "--out",
            w / "ds",
            "--context-length",
            "64",
            "--stride",
            "32",
            "--batch-size",
            "4",
        )
        == 0
    )
    assert (
        run(
            "train",
            *common,
            "--datastore",
            w / "ds",
            "--out",
            w / "adapter",
            "--config",
            w / "run.json",
            "--neighbours",
            "random",
        )
        == 0
    )
    saved = json.loads((w / "adapter" / "adapter_config.json").read_text())["fusion"]
    assert saved["neighbours"] == "random" and saved["neighbour_seed"] == 0
    assert (
        run(
            "eval",
            *common,
            "--datastore",
            w / "ds",
            "--adapter",
            w / "adapter",
            "--config",
            w / "run.json",
            "--max-tokens",
            "300",
            "--tune-tokens",
            "200",
            "--json",
            w / "eval.json",
        )
        == 0
    )
    results = json.loads((w / "eval.json").read_text())
    assert results["neighbours"] == "random"
    assert all(np.isfinite(results[name]["ppl"]) for name in ("gnn", "gnn_knn"))
    capsys.readouterr()
