"""The datastore keyed by the adapter's own features (the paper's GNN-LM + kNN): re-keying,
its resumption and fingerprints, the refusals, and the ``gnn_knn_rekeyed`` evaluation arm."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hetgraph.configuration import ConfigError
from hetgraph.corpus import TokenizedSplit
from hetgraph.datastore import DatastoreConfig, build_datastore
from hetgraph.evaluation import (
    EvalConfig,
    evaluate_four_way,
    read_per_token,
    rekeyed as rekeyed_module,
)
from hetgraph.fusion import FusionConfig, HetGraphLM, rekey as rekey_module
from hetgraph.fusion.rekey import (
    REKEY_PROGRESS,
    REKEY_RECORD,
    RekeyedIndex,
    RekeyError,
    adapter_fingerprint,
    check_rekeyable,
    fused_head_states,
    needs_model_pass,
    rekey_datastore,
)
from hetgraph.index import DatastoreIndex, IndexConfig
from hetgraph.testing import byte_tokenizer, repeated_pattern_split, tiny_causal_lm

ADAPTER = dict(hidden_channels=16, num_layers=1, heads=2, dropout=0.0, attn_dropout=0.0)
FLAT = IndexConfig(factory="Flat")
WINDOWS = EvalConfig(context_length=64, stride=32, batch_size=4, k=4, bootstrap_resamples=50)


def pattern_split(num_docs: int, seed: int, name: str) -> TokenizedSplit:
    """Documents repeating a random byte pattern: retrieval finds the continuation."""
    return repeated_pattern_split(num_docs, repeats=4, seed=seed, name=name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    split = pattern_split(4, 0, "train")
    config = DatastoreConfig(context_length=64, stride=32, batch_size=4)
    out = tmp_path_factory.mktemp("rekey") / "ds"
    return build_datastore(
        tiny_causal_lm("qwen2"), byte_tokenizer(), split, out, config, show_progress=False
    )


@pytest.fixture(scope="module")
def index(store):
    return DatastoreIndex.build(store.keys, FLAT, show_progress=False)


def graph_lm(store, index, seed: int | None = None, **fusion) -> HetGraphLM:
    """A head-only GNN-LM; ``seed``: its gates drawn at random (a "trained" adapter)."""
    settings = dict(k=4, adapter=ADAPTER, graph=dict(leakage_radius=4))
    lm = HetGraphLM(tiny_causal_lm("qwen2"), store, index, FusionConfig(**{**settings, **fusion}))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for gate in lm.engine.gates.values():
                gate.copy_(torch.randn(gate.shape, generator=generator))
    return lm


def keys_of(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def test_an_untrained_adapter_keeps_the_base_keys(store, index, tmp_path):
    rekeyed = rekey_datastore(graph_lm(store, index), tmp_path / "rk", FLAT, show_progress=False)
    # Zero gates: h + 0 ⊙ adapter(G) is h, so the keys are the stored ones (fp16 round trip).
    np.testing.assert_allclose(keys_of(rekeyed.keys), keys_of(store.keys), atol=1e-3)
    assert rekeyed.index.ntotal == len(store) and rekeyed.index.metric == "l2"
    assert rekeyed.record["datastore_fingerprint"] == store.fingerprint
    assert not (tmp_path / "rk" / REKEY_PROGRESS).exists()


def test_a_trained_adapter_writes_its_fused_head_states(store, index, tmp_path):
    lm = graph_lm(store, index, seed=1)
    rekeyed = rekey_datastore(lm, tmp_path / "rk", FLAT, show_progress=False)
    new, old = keys_of(rekeyed.keys), keys_of(store.keys)
    assert np.abs(new - old).max() > 0.1
    rows = torch.arange(40, 72).view(1, -1)
    fused = fused_head_states(lm, rows)[0].float()
    np.testing.assert_allclose(new[40:72], fused.numpy(), atol=2e-3, rtol=1e-3)
    # They are what the LM head reads: its logits are forward_from_datastore's.
    with torch.no_grad():
        logits = lm.model.lm_head(torch.from_numpy(new[40:72]))
        expected = lm.forward_from_datastore(rows)[0]
    torch.testing.assert_close(logits, expected, atol=2e-2, rtol=1e-2)


def test_paper_mode_fuses_rows_in_the_datastores_windows(store, index, tmp_path):
    lm = graph_lm(store, index, seed=2, fusion_mode="replace", graph=dict(c2c=True))
    rekeyed = rekey_datastore(lm, tmp_path / "rk", FLAT, batch_rows=64, show_progress=False)
    assert rekeyed.record["spans"] == "windows"
    # The second window is rows 0 … 63 scoring 32 … 63 (context 64, stride 32), the third
    # rows 32 … 95 scoring 64 … 95: each row keeps the causal context it was stored with.
    fused = fused_head_states(lm, torch.arange(32, 96).view(1, -1))[0].float().numpy()
    np.testing.assert_allclose(keys_of(rekeyed.keys)[64:96], fused[32:], atol=2e-3, rtol=1e-3)


class Interrupted(Exception):
    """The process stopping in the middle of the pass."""


def test_a_knowledge_graph_adapter_rekeys_in_the_datastores_windows(tmp_path):
    from hetgraph.kg import EmbeddingConfig, KnowledgeGraph, KnowledgeSource, embed_knowledge_graph

    (tmp_path / "kg.tsv").write_text("alpha\tnext\tbeta\nbeta\tnext\tgamma\n")
    (tmp_path / "aliases.tsv").write_text("alpha\talpha\nbeta\tbeta\ngamma\tgamma\n")
    graph = KnowledgeGraph.build(tmp_path / "kg.tsv", tmp_path / "aliases.tsv", byte_tokenizer())
    graph.save_pretrained(tmp_path / "kg")
    embed_knowledge_graph(tmp_path / "kg", EmbeddingConfig(model="transe", dim=8, epochs=2))
    text = " ".join(["alpha beta gamma delta"] * 30)
    ids = np.r_[byte_tokenizer()(text)["input_ids"], 256].astype(np.int32)
    split = TokenizedSplit("train", ids, np.zeros(len(ids), np.int32), ["doc0"])
    model = tiny_causal_lm("qwen2")
    config = DatastoreConfig(context_length=64, stride=32, batch_size=4)
    store = build_datastore(model, byte_tokenizer(), split, tmp_path / "ds", config)
    index = DatastoreIndex.build(store.keys, FLAT, show_progress=False)
    knowledge = KnowledgeSource.open(tmp_path / "kg", byte_tokenizer())
    fusion = FusionConfig(k=4, adapter=ADAPTER, graph=dict(leakage_radius=4))
    lm = HetGraphLM(model, store, index, fusion, knowledge=knowledge)
    with torch.no_grad():
        for name, parameter in lm.engine.named_parameters():
            if name.startswith("gates.") or "rel_gate" in name:
                parameter.fill_(0.5)
    rekeyed = rekey_datastore(lm, tmp_path / "rk", FLAT, batch_rows=64, show_progress=False)
    assert rekeyed.record["spans"] == "windows"  # entities are linked on a span's tokens
    fused = fused_head_states(lm, torch.arange(32, 96).view(1, -1))[0].float().numpy()
    np.testing.assert_allclose(keys_of(rekeyed.keys)[64:96], fused[32:], atol=2e-3, rtol=1e-3)
    assert np.abs(keys_of(rekeyed.keys) - keys_of(store.keys)).max() > 0.1


def test_an_interrupted_pass_resumes_to_the_same_keys(store, index, tmp_path, monkeypatch):
    lm = graph_lm(store, index, seed=3)
    whole = rekey_datastore(lm, tmp_path / "whole", FLAT, batch_rows=32, show_progress=False)
    calls = []
    original = rekey_module._fuse_batch

    def failing(lm, batch, model_pass):
        calls.append(batch[0].start)
        if calls == [0, 32, 64, 96, 128]:  # stopped in the third chunk of 64 rows
            raise Interrupted
        return original(lm, batch, model_pass)

    monkeypatch.setattr(rekey_module, "_fuse_batch", failing)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        rekey_datastore(lm, out, FLAT, batch_rows=32, chunk_rows=64, show_progress=False)
    assert (out / REKEY_PROGRESS).is_file() and not (out / REKEY_RECORD).exists()
    with pytest.raises(RekeyError, match="interrupted"):
        RekeyedIndex.load(out, store)
    calls.clear()
    resumed = rekey_datastore(lm, out, FLAT, batch_rows=32, chunk_rows=64, show_progress=False)
    # Chunks of 64 rows were recorded: the 4 batches done before it, rows 0 … 127, are kept.
    assert calls[0] == 128
    assert np.array_equal(np.asarray(resumed.keys), np.asarray(whole.keys))  # same kernels
    _, ids = resumed.index.search(keys_of(whole.keys[:3]), 1)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_another_adapter_or_datastore_is_refused(store, index, tmp_path):
    lm = graph_lm(store, index, seed=4)
    rekey_datastore(lm, tmp_path / "rk", FLAT, show_progress=False)
    other = graph_lm(store, index, seed=5)
    assert adapter_fingerprint(other.engine) != adapter_fingerprint(lm.engine)
    with pytest.raises(RekeyError, match="adapter fingerprint") as refused:
        RekeyedIndex.load(tmp_path / "rk", store, engine=other.engine)
    assert "\n" not in str(refused.value)

    class Other:
        path, fingerprint = "elsewhere", "0123456789abcdef"

        def __len__(self):
            return len(store)

    with pytest.raises(RekeyError, match="datastore fingerprint"):
        RekeyedIndex.load(tmp_path / "rk", Other())
    with open(tmp_path / "rk" / "keys.npy", "ab") as keys:  # a damaged key file
        keys.write(b"\0" * 64)
    with pytest.raises(RekeyError, match=r"keys\.npy has"):
        RekeyedIndex.load(tmp_path / "rk", store, engine=lm.engine)


def test_an_adapter_searching_other_keys_is_refused(store, index, tmp_path):
    lm = graph_lm(store, index, neighbours="random")
    with pytest.raises(RekeyError, match="random-neighbours") as refused:
        rekey_datastore(lm, tmp_path / "rk", FLAT, show_progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "rk").exists()  # refused before any work
    model = tiny_causal_lm("qwen2")
    config = DatastoreConfig(context_length=64, stride=32, batch_size=4, key_layer=0)
    split = pattern_split(1, 0, "train")
    layer_store = build_datastore(model, byte_tokenizer(), split, tmp_path / "ds", config)
    layer_index = DatastoreIndex.build(layer_store.keys, FLAT, show_progress=False)
    with pytest.raises(RekeyError, match="decoder layer 0's"):
        check_rekeyable(graph_lm(layer_store, layer_index).engine)


@pytest.mark.parametrize("sites", [(0, "head"), (1,)])
def test_an_adapter_with_decoder_layers_rekeys_through_the_model(store, index, tmp_path, sites):
    untrained = graph_lm(store, index, fusion_layers=sites)
    assert needs_model_pass(untrained.engine)
    rekeyed = rekey_datastore(untrained, tmp_path / "rk", FLAT, show_progress=False)
    assert rekeyed.record["pass"] == "model" and rekeyed.record["spans"] == "windows"
    # Zero gates: the base model over the datastore's own windows gives its stored keys.
    np.testing.assert_allclose(keys_of(rekeyed.keys), keys_of(store.keys), atol=1e-2)
    trained = graph_lm(store, index, seed=9, fusion_layers=sites)
    changed = rekey_datastore(trained, tmp_path / "rk2", FLAT, show_progress=False)
    assert np.abs(keys_of(changed.keys) - keys_of(store.keys)).max() > 0.1
    with pytest.raises(RekeyError, match="model pass"):
        rekey_datastore(trained, tmp_path / "rk3", FLAT, model_pass=False, show_progress=False)


def test_the_model_pass_agrees_with_the_stored_keys(store, index, tmp_path):
    lm = graph_lm(store, index, seed=10)
    from_keys = rekey_datastore(lm, tmp_path / "keys", FLAT, show_progress=False)
    from_model = rekey_datastore(lm, tmp_path / "model", FLAT, model_pass=True, show_progress=False)
    assert from_keys.record["pass"] == "stored keys" and from_model.record["pass"] == "model"
    # The same fused states, from float16 keys or from the model's float32 states.
    np.testing.assert_allclose(keys_of(from_model.keys), keys_of(from_keys.keys), atol=2e-2)


def test_the_datastore_itself_is_never_the_output(store, index):
    with pytest.raises(RekeyError, match="never"):
        rekey_datastore(graph_lm(store, index), store.path, FLAT, show_progress=False)


@pytest.mark.parametrize(
    "fusion",
    [{}, dict(fusion_mode="replace", graph=dict(c2c=True)), dict(fusion_layers=(0, "head"))],
)
def test_the_rekeyed_arm_is_tuned_on_valid_and_exported(
    store, index, tmp_path, monkeypatch, fusion
):
    lm = graph_lm(store, index, seed=6, **fusion)
    rekey_datastore(lm, tmp_path / "rk", FLAT, show_progress=False)
    valid, test = pattern_split(2, 1, "valid"), pattern_split(2, 2, "test")
    seen = []
    collect = rekeyed_module.collect_lm_outputs

    def keeping_queries(*args, **kwargs):
        seen.append(collect(*args, keep_queries=True, **kwargs))
        return seen[-1]

    monkeypatch.setattr(rekeyed_module, "collect_lm_outputs", keeping_queries)
    per_token = tmp_path / "tokens.safetensors"
    results = evaluate_four_way(
        lm, valid, test, WINDOWS, rekeyed=tmp_path / "rk", per_token=per_token, show_progress=False
    )
    row = results.methods["gnn_knn_rekeyed"]
    assert math.isfinite(row.ppl) and row.ppl > 1 and row.ppl_ci95 is not None
    assert 0 <= row.lam <= 1 and row.temperature > 0 and row.k == 4
    assert math.isfinite(row.valid_ppl) and row.extra["rekeyed"] == str(tmp_path / "rk")
    assert "gnn_knn_rekeyed/gnn_knn" in results.ratios
    assert results.speed["gnn_knn_rekeyed_tokens_per_s"] > 0
    # λ and T were tuned on the valid tokens, then scored on the test tokens.
    assert [len(o) for o in seen] == [results.valid_tokens, results.tokens]
    # Its queries are the fused head states: the head reads them into GNN-LM's log-probs.
    test_run = seen[1]
    with torch.no_grad():
        log_probs = torch.log_softmax(lm.model.lm_head(test_run.queries.float()), -1)
    target = log_probs.gather(1, test_run.targets[:, None])[:, 0]
    torch.testing.assert_close(target, test_run.lm_log_probs, atol=2e-2, rtol=1e-2)
    assert read_per_token(per_token).perplexity("gnn_knn_rekeyed") == pytest.approx(row.ppl)


def test_an_untrained_adapter_rekeyed_matches_gnn_knn(store, index, tmp_path):
    lm = graph_lm(store, index)
    rekey_datastore(lm, tmp_path / "rk", FLAT, show_progress=False)
    split = pattern_split(2, 1, "valid")
    results = evaluate_four_way(
        lm, split, split, WINDOWS, rekeyed=tmp_path / "rk", show_progress=False
    )
    # Same keys and queries up to float16: the same mixture.
    assert results["gnn_knn_rekeyed"]["ppl"] == pytest.approx(results["gnn_knn"]["ppl"], rel=1e-3)


def test_a_rekeyed_store_needs_its_adapter_in_the_evaluation(store, index, tmp_path):
    lm = graph_lm(store, index, seed=7)
    rekey_datastore(lm, tmp_path / "rk", FLAT, show_progress=False)
    split = pattern_split(2, 1, "valid")
    with pytest.raises(ConfigError, match="--adapter"):
        evaluate_four_way(lm, split, split, WINDOWS, include_gnn=False, rekeyed=tmp_path / "rk")
    with pytest.raises(RekeyError, match="adapter fingerprint"):
        evaluate_four_way(
            graph_lm(store, index, seed=8), split, split, WINDOWS, rekeyed=tmp_path / "rk"
        )


# ------------------------------------------------------------------------------ command
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from hetgraph.testing import run_cli, write_cli_workspace

    w = write_cli_workspace(tmp_path_factory.mktemp("rekey-cli"))
    common = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    build = ["--context-length", "64", "--stride", "32", "--batch-size", "4"]
    for ds in ("ds", "other-ds"):
        more = ["--max-tokens", "300"] if ds == "other-ds" else []
        assert run_cli("datastore", "build", *common, "--out", w / ds, *build, *more) == 0
    train = [*common, "--datastore", w / "ds", "--config", w / "run.json"]
    assert run_cli("train", *train, "--out", w / "adapter") == 0
    return w


def run_rekey(*argv) -> int:
    from hetgraph.testing import run_cli

    return run_cli("datastore", "rekey", *argv)


def test_the_command_rekeys_into_the_adapter_directory(workspace, capsys):
    w = workspace
    argv = ["--datastore", w / "ds", "--adapter", w / "adapter", "--model", w / "model"]
    assert run_rekey(*argv, "--threads", "1", "--factory", "Flat") == 0
    assert "--rekeyed" in capsys.readouterr().out
    from hetgraph.datastore import Datastore

    store = Datastore.open(w / "ds")
    rekeyed = RekeyedIndex.load(w / "adapter" / "rekeyed", store)
    assert rekeyed.index.ntotal == len(store) and rekeyed.record["adapter"] == str(w / "adapter")
    from hetgraph.testing import run_cli

    evaluate = ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]
    evaluate += ["--datastore", w / "ds", "--config", w / "run.json", "--adapter", w / "adapter"]
    out = w / "eval.json"
    assert run_cli("eval", *evaluate, "--rekeyed", w / "adapter" / "rekeyed", "--json", out) == 0
    results = json.loads(out.read_text())
    assert math.isfinite(results["gnn_knn_rekeyed"]["ppl"])
    assert "gnn_knn_rekeyed/gnn_knn" in results["ratios"]


@pytest.mark.parametrize(
    "datastore, message",
    [("other-ds", "trained on another datastore"), ("no-index", "has no index")],
)
def test_bad_input_is_one_line_before_any_work(workspace, datastore, message, capsys):
    import shutil

    from hetgraph.testing import one_error_line

    w = workspace
    if datastore == "no-index" and not (w / datastore).exists():
        shutil.copytree(w / "ds", w / datastore, ignore=shutil.ignore_patterns("index"))
    argv = ["--datastore", w / datastore, "--adapter", w / "adapter", "--out", w / "never"]
    # refused before the model loads: the model path does not exist
    assert run_rekey(*argv, "--model", w / "does-not-exist") == 2
    assert message in one_error_line(capsys) and not (w / "never").exists()
