"""The shuffled-triples control graph: KnowledgeGraph.shuffled and ``hetgraph kg shuffle``."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from hetgraph.kg import AliasConfig, KnowledgeGraph
from hetgraph.kg.store import entity_permutation
from hetgraph.models.fingerprint import array_fingerprint
from hetgraph.testing import byte_tokenizer, one_error_line, run_cli

RELATIONS = ("is_a", "part_of", "chases", "eats")


def _random_files(folder, num_entities=40, num_triples=150, seed=0):
    """A triples and an aliases file: random facts (skewed: a few entities have many),
    every entity named, some twice."""
    rng = np.random.default_rng(seed)
    heads = np.minimum(rng.geometric(0.08, num_triples) - 1, num_entities - 1)
    lines = [
        f"e{h}\t{RELATIONS[rng.integers(len(RELATIONS))]}\te{rng.integers(num_entities)}"
        for h in heads
    ]
    (folder / "t.tsv").write_text("\n".join(lines) + "\n")
    aliases = [f"e{e}\tthing {e}" for e in range(num_entities)]
    aliases += [f"e{e}\tother {e}" for e in range(0, num_entities, 3)]
    (folder / "a.tsv").write_text("\n".join(aliases) + "\n")
    return folder / "t.tsv", folder / "a.tsv"


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    triples, aliases = _random_files(tmp_path_factory.mktemp("kg-files"))
    return KnowledgeGraph.build(
        triples, aliases, byte_tokenizer(), AliasConfig(min_alias_chars=1, max_alias_tokens=16)
    )


@pytest.fixture(scope="module")
def saved(graph, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kg") / "kg"
    graph.save_pretrained(directory)
    return KnowledgeGraph.from_pretrained(directory), directory


def _facts(triples, entity):
    """The (relation, tail) facts whose head is ``entity``, with multiplicity."""
    rows = np.asarray(triples)
    return Counter(map(tuple, rows[rows[:, 0] == entity][:, 1:].tolist()))


@pytest.mark.parametrize("num_entities", [0, 1, 2, 7, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1])
def test_the_permutation_is_a_seeded_bijection(num_entities, seed):
    permutation = entity_permutation(num_entities, seed)
    assert permutation.dtype == np.int64 and permutation.shape == (num_entities,)
    assert sorted(permutation.tolist()) == list(range(num_entities))
    np.testing.assert_array_equal(permutation, entity_permutation(num_entities, seed))


def test_the_permutation_is_the_same_on_every_machine():
    # PCG64's raw stream is fixed by numpy; this pins the permutation drawn from it
    assert entity_permutation(10, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert entity_permutation(10, 1).tolist() == [9, 2, 4, 7, 5, 0, 8, 6, 3, 1]
    assert entity_permutation(1000, 0).tolist() != entity_permutation(1000, 1).tolist()


@pytest.mark.parametrize("seed", [0, 1, 7, 123456789])
def test_the_facts_of_each_entity_move_with_the_permutation(saved, seed):
    source, _ = saved
    shuffled = source.shuffled(seed)
    permutation = entity_permutation(source.num_entities, seed)
    for entity in range(source.num_entities):  # naive reference, one entity at a time
        assert _facts(shuffled.triples, permutation[entity]) == _facts(source.triples, entity)
    # every row keeps its place, relation and tail: the rank order of the facts is kept
    assert shuffled.triples.dtype == np.int32 and shuffled.triples.shape == source.triples.shape
    np.testing.assert_array_equal(shuffled.triples[:, 1:], source.triples[:, 1:])
    np.testing.assert_array_equal(shuffled.triples[:, 0], permutation[source.triples[:, 0]])
    # the same relation mix, and the same multiset of facts per entity slot
    assert Counter(shuffled.triples[:, 1].tolist()) == Counter(source.triples[:, 1].tolist())
    degrees = np.bincount(source.triples[:, 0], minlength=source.num_entities)
    moved = np.bincount(shuffled.triples[:, 0], minlength=source.num_entities)
    np.testing.assert_array_equal(moved[permutation], degrees)


@pytest.mark.parametrize("seed", [0, 5])
def test_a_shuffle_is_deterministic_and_another_seed_gives_another(saved, seed):
    source, _ = saved
    first, again, other = source.shuffled(seed), source.shuffled(seed), source.shuffled(seed + 1)
    np.testing.assert_array_equal(first.triples, again.triples)
    assert first.manifest == again.manifest
    assert not np.array_equal(first.triples, other.triples)
    assert first.manifest["fingerprint"] != other.manifest["fingerprint"]
    assert first.manifest["shuffled"]["seed"] == seed


def test_entities_aliases_and_tokens_are_kept_and_the_source_is_untouched(saved):
    source, _ = saved
    before = source.triples.copy()
    shuffled = source.shuffled(3)
    np.testing.assert_array_equal(source.triples, before)
    for name in ("entity_ids", "entity_names", "relations", "alias_entities", "alias_texts"):
        assert getattr(shuffled, name) == getattr(source, name), name
    for name in ("alias_tokens", "alias_offsets", "alias_entities", "token_flags"):
        np.testing.assert_array_equal(shuffled.arrays()[name], source.arrays()[name])
    assert shuffled.counts() == source.counts()
    assert shuffled.linker is not None and shuffled.sequences.dropped == source.sequences.dropped


def test_the_manifest_names_the_shuffle_and_never_looks_like_its_source(saved, tmp_path):
    source, _ = saved
    source_manifest = dict(source.manifest, embeddings={"model": "transe"})  # as if embedded
    source = replace(source, manifest=source_manifest)
    shuffled = source.shuffled(11)
    record = shuffled.manifest
    assert record["shuffled"] == {"seed": 11, "from": source_manifest["content"]}
    assert "embeddings" not in record
    for key in ("sources", "config", "tokenizer"):
        assert record[key] == source_manifest[key]
    assert record["fingerprint"] != source_manifest["fingerprint"]
    shuffled.save_pretrained(tmp_path / "control")
    opened = KnowledgeGraph.from_pretrained(tmp_path / "control", byte_tokenizer(), full=True)
    manifest = opened.manifest
    assert manifest["fingerprint"] == record["fingerprint"]
    assert manifest["shuffled"] == record["shuffled"]
    assert "embeddings" not in manifest and "embeddings.safetensors" not in manifest["integrity"]
    assert manifest["content"] != source_manifest["content"]
    assert manifest["content"] == array_fingerprint(*opened.arrays().values())
    np.testing.assert_array_equal(opened.triples, shuffled.triples)
    # a shuffle of the control records the control as its source
    twice = opened.shuffled(11)
    assert twice.manifest["shuffled"]["from"] == manifest["content"]
    assert twice.manifest["fingerprint"] not in (manifest["fingerprint"], record["fingerprint"])


def test_a_shuffle_that_changes_nothing_warns(tmp_path, caplog):
    (tmp_path / "t.tsv").write_text("a\tis_a\ta\n")  # one entity: the permutation is identity
    graph = KnowledgeGraph.build(tmp_path / "t.tsv", None, byte_tokenizer())
    with caplog.at_level(logging.WARNING, logger="hetgraph.kg.store"):
        shuffled = graph.shuffled(0)
    np.testing.assert_array_equal(shuffled.triples, graph.triples)
    assert "the control is the graph itself" in caplog.text
    assert shuffled.manifest["fingerprint"] != graph.manifest["fingerprint"]


def test_cli_round_trip_resumes_refuses_and_errors_in_one_line(saved, tmp_path, capsys):
    source, directory = saved
    out = tmp_path / "control"
    args = ("kg", "shuffle", "--kg", directory, "--out", out)
    assert run_cli(*args, "--seed", 4) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["seed"] == 4
    assert summary["triples"] == source.counts()["triples"]
    assert summary["entities"] == source.num_entities
    assert "hetgraph kg embed" in summary["next"]
    control = KnowledgeGraph.from_pretrained(out, byte_tokenizer(), full=True)
    np.testing.assert_array_equal(control.triples, source.shuffled(4).triples)
    assert control.manifest["shuffled"] == {"seed": 4, "from": source.manifest["content"]}
    written = (out / "kg.json").read_bytes()

    assert run_cli(*args, "--seed", 4) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "kg.json").read_bytes() == written

    assert run_cli(*args, "--seed", 5) == 2
    line = one_error_line(capsys)
    assert "--overwrite" in line and "seed" in line
    assert (out / "kg.json").read_bytes() == written
    assert run_cli(*args, "--seed", 5, "--overwrite") == 0
    capsys.readouterr()
    assert KnowledgeGraph.from_pretrained(out).manifest["shuffled"]["seed"] == 5

    assert run_cli("kg", "shuffle", "--kg", tmp_path / "missing", "--out", tmp_path / "x") == 2
    assert "no such knowledge-graph directory" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()
    assert run_cli("kg", "shuffle", "--kg", directory, "--out", directory, "--overwrite") == 2
    assert "is the --kg directory" in one_error_line(capsys)
    (tmp_path / "not-kg").mkdir()
    (tmp_path / "not-kg" / "precious.txt").write_text("x")
    assert run_cli("kg", "shuffle", "--kg", directory, "--out", tmp_path / "not-kg") == 2
    assert "not a knowledge-graph directory" in one_error_line(capsys)


def test_cli_refuses_a_damaged_source_in_one_line(graph, tmp_path, capsys):
    graph.save_pretrained(tmp_path / "kg")
    path = tmp_path / "kg" / "triples.npy"
    path.write_bytes(path.read_bytes()[:-4])
    assert run_cli("kg", "shuffle", "--kg", tmp_path / "kg", "--out", tmp_path / "out") == 2
    assert "triples.npy" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
