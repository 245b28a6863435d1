"""Knowledge-graph store: reading triples and aliases, the directory, its checks, the CLI."""

from __future__ import annotations

import json
import lzma

import numpy as np
import pytest

from hetgraph.kg import AliasConfig, KnowledgeGraph, KnowledgeGraphError, read_triples
from hetgraph.kg.store import MANIFEST
from hetgraph.kg.wordnet import parse_data_line, shipped_wordnet
from hetgraph.testing import byte_tokenizer, one_error_line, run_cli, save_tiny_model

TRIPLES = "dog\tis_a\tanimal\ncat\tis_a\tanimal\n# a comment\n\ndog\tchases\tcat\n"
ALIASES = "dog\tdog\ndog\thound\ncat\tcat\nanimal\tanimal\nfox\tred fox\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "t.tsv").write_text(TRIPLES)
    (tmp_path / "a.tsv").write_text(ALIASES)
    return tmp_path


def test_build_numbers_entities_and_relations_in_order_of_appearance(files):
    graph = KnowledgeGraph.build(
        files / "t.tsv",
        files / "a.tsv",
        byte_tokenizer(),
        AliasConfig(min_alias_chars=1, max_alias_tokens=16),
    )
    assert graph.entity_ids == ["dog", "animal", "cat", "fox"]  # fox: an alias only
    assert graph.entity_names == ["dog", "animal", "cat", "red fox"]
    assert graph.relations == ["is_a", "chases"]
    assert graph.triples.tolist() == [[0, 0, 1], [2, 0, 1], [0, 1, 2]]
    # 5 aliases x 4 variants (lower case: with a capital first letter; with a space)
    assert graph.counts()["alias_sequences"] == 20
    tokens, offsets = graph.sequences.tokens, graph.sequences.offsets
    texts = [
        byte_tokenizer().decode(tokens[offsets[i] : offsets[i + 1]].tolist())
        for i in range(len(offsets) - 1)
    ]
    assert texts[:4] == ["dog", "Dog", " dog", " Dog"]


def test_jsonl_and_compressed_files_read_like_tsv(files):
    rows = [
        dict(zip(("head", "relation", "tail"), line.split("\t"), strict=True))
        for line in TRIPLES.splitlines()
        if line and not line.startswith("#")
    ]
    (files / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with lzma.open(files / "t.tsv.xz", "wt") as f:
        f.write(TRIPLES)
    expected = read_triples(files / "t.tsv")
    assert read_triples(files / "t.jsonl") == expected == read_triples(files / "t.tsv.xz")


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "a\tr\tb\nc\tr\n",
            "t.tsv line 2: expected 3 tab-separated fields (head, relation, tail), got 2",
        ),
        ("a\tr\tb\n\n\na\t\tb\n", "t.tsv line 4: the relation field is empty"),
        (
            "a\tr\tb\tc\n",
            "t.tsv line 1: expected 3 tab-separated fields (head, relation, tail), got 4",
        ),
        ("# only a comment\n", "holds no triples"),
    ],
)
def test_a_bad_tsv_file_names_the_file_and_line(tmp_path, content, message):
    (tmp_path / "t.tsv").write_text(content)
    with pytest.raises(
        KnowledgeGraphError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        read_triples(tmp_path / "t.tsv")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"head": "a", "relation": "r"}', "t.jsonl line 2: the JSON object lacks 'tail'"),
        ("[1, 2, 3]", "t.jsonl line 2: expected a JSON object"),
        ('{"head": "a", "relation": "r", "tail": 3}', "t.jsonl line 2: 'tail' must be a string"),
        ('{"head": "a",', "t.jsonl line 2: not valid JSON"),
    ],
)
def test_a_bad_jsonl_file_names_the_file_and_line(tmp_path, line, message):
    good = json.dumps({"head": "a", "relation": "r", "tail": "b"})
    (tmp_path / "t.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(KnowledgeGraphError, match=message.replace("[", r"\[")):
        read_triples(tmp_path / "t.jsonl")


def test_round_trip_and_damage_and_tokenizer_checks(files, tmp_path):
    tokenizer = byte_tokenizer()
    graph = KnowledgeGraph.build(files / "t.tsv", files / "a.tsv", tokenizer)
    graph.save_pretrained(tmp_path / "kg")
    loaded = KnowledgeGraph.from_pretrained(tmp_path / "kg", tokenizer, full=True)
    assert loaded.entity_ids == graph.entity_ids and loaded.relations == graph.relations
    for name, array in graph.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], array)
    assert loaded.manifest["counts"] == graph.counts()
    with pytest.raises(KnowledgeGraphError, match="another tokenizer"):
        KnowledgeGraph.from_pretrained(tmp_path / "kg", _lowercasing_byte_tokenizer())
    path = tmp_path / "kg" / "triples.npy"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(KnowledgeGraphError, match=r"triples\.npy has .* bytes.*kg build"):
        KnowledgeGraph.from_pretrained(tmp_path / "kg")


def _lowercasing_byte_tokenizer():
    """The byte tokenizer with a lowercasing normaliser: same vocabulary, other splits."""
    from tokenizers import normalizers

    changed = byte_tokenizer()
    changed.backend_tokenizer.normalizer = normalizers.Lowercase()
    return changed


def test_shipped_wordnet_and_the_parser():
    triples, aliases = shipped_wordnet()
    assert aliases.name == "wordnet-aliases.tsv.xz"
    notice = (triples.parent / "LICENSE-wordnet.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in notice
    with lzma.open(triples, "rt") as f:
        first = f.readline().rstrip("\n").split("\t")
    assert len(first) == 3 and first[0].startswith(("n.", "v.", "a.", "r."))
    noun = parse_data_line(
        "00045907 04 n 02 recovery 0 retrieval 0 002 @ 00030358 n 0000 "
        "! 02247995 v 0201 | the act of regaining  "
    )
    assert noun.entity == "n.00045907" and noun.lemmas == ("recovery", "retrieval")
    assert noun.pointers == (("hypernym", "n.00030358"), ("antonym", "v.02247995"))
    adjective = parse_data_line("00003356 00 s 01 long-chain(a) 0 001 & 00003131 a 0000 | x")
    assert adjective.entity == "a.00003356" and adjective.lemmas == ("long-chain",)
    assert parse_data_line("  1 This software and database is being provided") is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("kg-model") / "model", "qwen2")


def test_cli_build_resumes_refuses_and_errors_before_writing(files, model_dir, capsys):
    out = files / "kg"
    args = (
        "kg",
        "build",
        "--model",
        model_dir,
        "--triples",
        files / "t.tsv",
        "--aliases",
        files / "a.tsv",
        "--out",
        out,
    )
    assert run_cli(*args) == 0
    assert json.loads(capsys.readouterr().out)["entities"] == 4
    assert run_cli(*args) == 0 and "up to date" in capsys.readouterr().out
    (files / "t.tsv").write_text(TRIPLES + "fox\tis_a\tanimal\n")
    assert run_cli(*args) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert run_cli(*args, "--overwrite") == 0
    assert KnowledgeGraph.from_pretrained(out).counts()["triples"] == 4
    capsys.readouterr()
    (files / "bad.tsv").write_text("a\tr\tb\nc r d\n")
    bad_out = files / "bad-kg"
    assert (
        run_cli(
            "kg", "build", "--model", model_dir, "--triples", files / "bad.tsv", "--out", bad_out
        )
        == 2
    )
    assert one_error_line(capsys) == (
        "error: bad.tsv line 2: expected 3 tab-separated fields (head, relation, tail), got 1"
    )
    assert not bad_out.exists()
    (files / "not-kg").mkdir()
    (files / "not-kg" / "precious.txt").write_text("x")
    assert run_cli(*args[:-1], files / "not-kg") == 2
    assert "not a knowledge-graph directory" in one_error_line(capsys)
    assert (files / "not-kg" / MANIFEST).exists() is False
