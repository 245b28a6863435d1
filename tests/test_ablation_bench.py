"""The ablation benchmark's arm table and the second corpus's extraction script."""

from __future__ import annotations

import gzip
import importlib.util
import json
import lzma
import sys
from pathlib import Path

import pytest

from hetgraph.fusion import FusionConfig
from hetgraph.pipeline import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def extract():
    return _load(ROOT / "scripts" / "extract_debian_corpus.py", "extract_debian_corpus")


@pytest.fixture(scope="module")
def ablation():
    return _load(ROOT / "benchmarks" / "ablation.py", "ablation_benchmark")


@pytest.mark.parametrize(
    "digits, value", [("A", 0), ("B", 1), ("/", 63), ("BA", 64), ("5I", 57 * 64 + 8)]
)
def test_dictd_base64_numbers(extract, digits, value):
    assert extract.b64_number(digits) == value


def _b64(value: int) -> str:
    digits = ""
    while True:
        digits = (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[value % 64] + digits
        )
        value //= 64
        if not value:
            return digits


def _fake_dictd(root: Path, entries: list[tuple[str, bytes]]) -> None:
    """A dictd dictionary: an index line per headword (one entry listed twice) and a meta entry."""
    base = root / "usr/share/dictd"
    base.mkdir(parents=True)
    data, lines, offset = b"", [], 0
    for headword, text in [("00-database-info", b"meta\n"), *entries]:
        lines.append(f"{headword}\t{_b64(offset)}\t{_b64(len(text))}")
        data += text
        offset += len(text)
    lines.append(lines[-1].replace(entries[-1][0], "zalias", 1))  # same span, listed later
    (base / "test.index").write_text("\n".join(sorted(lines)) + "\n")
    with gzip.open(base / "test.dict.dz", "wb") as f:
        f.write(data)


def test_read_entries_dedupes_skips_meta_and_decodes_cp1252(extract, tmp_path):
    entries = [(f"word{i}", f"word{i} \\w\\ n.\n   Meaning {i}.\n\n".encode()) for i in range(5)]
    entries.append(("quote", "quote n. it\u2019s\n".encode("cp1252")))
    _fake_dictd(tmp_path, entries)
    read = extract.read_entries(tmp_path, "test")
    assert [h for h, _ in read] == [h for h, _ in entries]  # file order, meta and alias dropped
    assert read[0][1] == "word0 \\w\\ n.\n   Meaning 0.\n"
    assert read[-1][1] == "quote n. it\u2019s\n"


@pytest.mark.parametrize(
    "per_document, target, kept", [(2, 10**9, [0, 1, 2]), (2, 1, [0]), (1, 40, [0, 3])]
)
def test_make_documents_samples_blocks_evenly(extract, per_document, target, kept):
    entries = [(f"w{i}", "x" * 19 + "\n") for i in range(5)]  # 100 characters in all
    documents = extract.make_documents(entries, per_document, target)
    starts = [int(doc["id"].split()[0]) for doc in documents]
    assert starts == kept
    assert documents[0]["id"] == f"00000 w0 .. w{per_document - 1}"
    assert documents[0]["text"] == "\n".join(t for _, t in entries[:per_document])


def test_encoded_corpus_is_deterministic_jsonl(extract):
    documents = [{"id": "00000 a .. b", "text": "a \\a\\ n.\n"}]
    data = extract.encode_jsonl_xz(documents)
    assert data == extract.encode_jsonl_xz(documents)
    assert [json.loads(line) for line in lzma.decompress(data).decode().splitlines()] == documents


def test_shipped_corpus_is_small_and_licensed():
    corpus = ROOT / "benchmarks" / "data" / "gcide.jsonl.xz"
    assert corpus.stat().st_size <= 2_000_000
    notice = (ROOT / "benchmarks" / "data" / "LICENSE-gcide.txt").read_text()
    assert "dict-gcide" in notice and "GNU General Public License" in notice


@pytest.mark.parametrize(
    "name",
    [
        "head",
        "paper_2x256",
        "paper_2x256_gated",
        "default_replace",
        "default_c2c",
        "default_no_ffn",
        "lr2",
        "k128",
        "two_stage",
        "depth3",
        "width576",
        "top4",
        "every4th",
        "top4_stored",
        "all",
        "gate",
    ],
)
def test_every_arm_differs_from_the_default_as_named(ablation, name):
    default = RunConfig.default().fusion
    stages = ablation.arm_stages(name, default)
    if name == "gate" and not stages:
        pytest.skip("this hetgraph has no retrieval-aware gate")
    assert stages and abs(sum(share for _, _, share in stages) - 1.0) < 1e-9
    fusion = stages[-1][1]
    assert isinstance(fusion, FusionConfig)
    FusionConfig.from_dict(fusion.to_dict())  # a valid, serialisable config
    expected = {
        "head": lambda f: f == default,
        "top4": lambda f: f.fusion_layers == (26, 27, 28, 29),
        "every4th": lambda f: f.fusion_layers == tuple(range(0, 30, 4)),
        "all": lambda f: len(f.fusion_layers) == 30,
        "default_c2c": lambda f: f.graph.c2c and not default.graph.c2c,
        "default_no_ffn": lambda f: not f.adapter.feed_forward,
        "default_replace": lambda f: f.fusion_mode == "replace",
        "paper_2x256_gated": lambda f: f.fusion_mode == "gated_residual" and f.graph.c2c,
        "lr2": lambda f: (f.graph.left, f.graph.right) == (2, 2),
        "k128": lambda f: f.k == 128,
        "two_stage": lambda f: f.k == 128 and f.graph.left == 2 and len(stages) == 2,
        "depth3": lambda f: f.adapter.num_layers == 3,
        "width576": lambda f: f.adapter.hidden_channels == 576,
        "top4_stored": lambda f: f.neighbour_features == "stored",
        "paper_2x256": lambda f: f.fusion_mode == "replace" and f.graph.c2c,
        "gate": lambda f: getattr(f, "gate", None) == "retrieval",
    }[name]
    assert expected(fusion)
