"""Issue 11, models, tokenizers and corpus safety: loading refuses folders without a usable
tokenizer or with custom code, tokenizer fingerprints cover behaviour, context lengths are
checked against the model, document names are sanitised and long documents are tokenized in
bounded pieces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import normalizers
from transformers import AutoTokenizer

from hetgraph.configuration import ConfigError
from hetgraph.corpus import CorpusConfig, CorpusError, TokenizedCorpus, chunking, read_documents
from hetgraph.corpus.documents import safe_document_name
from hetgraph.corpus.tokenization import tokenize_corpus, tokenize_documents
from hetgraph.errors import HetgraphError
from hetgraph.io import HF_MODEL_CONFIG
from hetgraph.models.checks import (
    check_context_length,
    check_model_folder,
    check_token_ids,
    check_tokenizer,
    max_positions,
)
from hetgraph.models.errors import CustomCodeError
from hetgraph.models.fingerprint import (
    model_fingerprint,
    tokenizer_behaviour_fingerprint,
    tokenizer_fingerprint,
    tokenizer_matches,
)
from hetgraph.models.loading import ModelLoadError, load_model
from hetgraph.testing import FAMILIES, byte_tokenizer, tiny_causal_lm

REPO = Path(__file__).resolve().parents[1]


def _save(directory: Path, family: str = "qwen2", tokenizer=None, **config) -> Path:
    tiny_causal_lm(family, **config).save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _document(text: str):
    from hetgraph.corpus import Document

    return Document(text[:6], text)


def _lowercasing_byte_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tokenizer


# -- item 1: a folder without tokenizer files ---------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_without_tokenizer_is_refused(tmp_path: Path, family: str) -> None:
    folder = _save(tmp_path / "m", family)
    with pytest.raises(ModelLoadError, match="has no tokenizer files") as info:
        load_model(folder)
    assert str(folder) in str(info.value) and "save_pretrained" in str(info.value)


def test_one_token_tokenizer_is_refused(tmp_path: Path) -> None:
    # What transformers 5 builds from a Qwen2 folder without tokenizer files: one token.
    folder = _save(tmp_path / "m", "qwen2")
    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    assert len(tokenizer) < 16
    with pytest.raises(ModelLoadError, match=r"only \d+ token"):
        check_tokenizer(tokenizer, source=folder)


def test_tokenizer_that_does_not_round_trip_is_refused() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(30)} | {"[UNK]": 30, "<eos>": 31}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>"
    )
    with pytest.raises(ModelLoadError, match="does not round-trip"):
        check_tokenizer(tokenizer, source="word-level")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_larger_than_embeddings_is_refused(tmp_path: Path, family: str) -> None:
    folder = _save(tmp_path / "m", family, byte_tokenizer(), vocab_size=200)
    with pytest.raises(ModelLoadError, match=r"token ids up to 25[56].*only 200 rows") as info:
        load_model(folder)
    assert str(folder) in str(info.value)


def test_check_token_ids() -> None:
    model = tiny_causal_lm("llama")
    check_token_ids(np.array([0, 5, 256]), model, "ok")
    with pytest.raises(ModelLoadError, match="the train split holds token id 257"):
        check_token_ids(torch.tensor([1, 257]), model, "the train split")
    with pytest.raises(ModelLoadError, match="token id -1"):
        check_token_ids([-1], model, "x")


@pytest.mark.parametrize("family", FAMILIES)
def test_good_folder_still_loads(tmp_path: Path, family: str) -> None:
    folder = _save(tmp_path / "m", family, byte_tokenizer())
    _, tokenizer = load_model(folder)
    assert tokenizer.decode(tokenizer.encode("Hello", add_special_tokens=False)) == "Hello"


# -- item 2: custom code never runs ---------------------------------------------------------
_EVIL = """from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig):
    model_type = "evil_custom"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil_folder(root: Path, where: str) -> tuple[Path, Path]:
    """A model folder whose config (or tokenizer config) names an architecture transformers
    does not know, implemented in the folder's ``evil.py``, which writes ``marker`` on import
    (so transformers must ask whether to run it, and a piped ``y`` would run it)."""
    folder = _save(root / "evil", "llama", byte_tokenizer())
    marker = root / "marker.txt"
    (folder / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    name = HF_MODEL_CONFIG if where == "config" else "tokenizer_config.json"
    data = json.loads((folder / name).read_text())
    if where == "config":
        data["model_type"] = "evil_custom"
        data["auto_map"] = {
            "AutoConfig": "evil.EvilConfig",
            "AutoModelForCausalLM": "evil.EvilModel",
        }
    else:
        data["tokenizer_class"] = "EvilTokenizer"
        data["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (folder / name).write_text(json.dumps(data))
    return folder, marker


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_custom_code_is_refused_even_with_yes_on_stdin(tmp_path: Path, where: str) -> None:
    folder, marker = _evil_folder(tmp_path, where)
    code = (
        "import sys; from hetgraph.models.loading import load_model\n"
        "try:\n    load_model(sys.argv[1])\n"
        "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        input="y\ny\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "CustomCodeError" in result.stdout and str(folder) in result.stdout
    assert "auto_map" in result.stdout
    assert not marker.exists()


def test_custom_code_error_is_a_model_load_error(tmp_path: Path) -> None:
    folder, marker = _evil_folder(tmp_path, "config")
    with pytest.raises(CustomCodeError, match="never runs code") as info:
        load_model(folder)
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, HetgraphError)
    assert not marker.exists()


def test_every_from_pretrained_passes_trust_remote_code_false(tmp_path: Path, monkeypatch) -> None:
    import transformers

    folder = _save(tmp_path / "m", "llama", byte_tokenizer())
    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "unset")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(folder)
    assert sorted(seen) == [("AutoModelForCausalLM", False), ("AutoTokenizer", False)]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_malformed_config_json_names_the_file(tmp_path: Path, content: str) -> None:
    folder = _save(tmp_path / "m", "llama", byte_tokenizer())
    (folder / HF_MODEL_CONFIG).write_text(content)
    with pytest.raises(ModelLoadError, match=r"config\.json") as info:
        check_model_folder(folder)
    assert str(folder / HF_MODEL_CONFIG) in str(info.value)


# -- item 11: the tokenizer fingerprint covers behaviour -------------------------------------
def test_lowercasing_tokenizer_has_another_behaviour_fingerprint() -> None:
    plain, lower = byte_tokenizer(), _lowercasing_byte_tokenizer()
    # Same vocabulary and special tokens: the old fingerprint cannot tell them apart ...
    assert tokenizer_fingerprint(plain) == tokenizer_fingerprint(lower)
    # ... the behaviour fingerprint can, and is stable.
    assert tokenizer_behaviour_fingerprint(plain) != tokenizer_behaviour_fingerprint(lower)
    assert tokenizer_behaviour_fingerprint(plain) == tokenizer_behaviour_fingerprint(
        byte_tokenizer()
    )
    recorded = model_fingerprint(tiny_causal_lm("llama"), plain)
    assert "tokenizer_behaviour" in recorded
    assert tokenizer_matches(recorded, byte_tokenizer()) is None
    message = tokenizer_matches(recorded, lower)
    assert message is not None and "splits text differently" in message
    # A record written before the behaviour fingerprint existed is still accepted.
    legacy = {k: v for k, v in recorded.items() if k != "tokenizer_behaviour"}
    assert tokenizer_matches(legacy, lower) is None


def test_datastore_refuses_lowercasing_tokenizer(tmp_path: Path) -> None:
    from hetgraph.datastore import Datastore, DatastoreConfig, DatastoreError, build_datastore

    model, tokenizer = tiny_causal_lm("llama"), byte_tokenizer()
    split = tokenize_documents(
        [_document(f"doc {i} alpha beta gamma") for i in range(3)], tokenizer, show_progress=False
    )
    build_datastore(
        model,
        tokenizer,
        split,
        tmp_path / "ds",
        DatastoreConfig(context_length=16, stride=8, batch_size=2),
        show_progress=False,
    )
    store = Datastore.open(tmp_path / "ds")
    store.check(model=model, tokenizer=byte_tokenizer())
    with pytest.raises(DatastoreError, match="splits text differently"):
        store.check(model=model, tokenizer=_lowercasing_byte_tokenizer())


# -- item 8: context length, separator regex ------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_context_length_checked_against_model(family: str) -> None:
    model = tiny_causal_lm(family, max_positions=64)
    assert max_positions(model) == 64
    assert check_context_length(model, 64) == 64
    with pytest.raises(ConfigError, match=r"--context-length 65 exceeds the 64 positions"):
        check_context_length(model, 65)
    with pytest.raises(ConfigError, match=r"evaluation\.context_length must be a positive"):
        check_context_length(model, 0, option="evaluation.context_length")


@pytest.mark.parametrize("separator", ["(", "[a-", "a*"])
def test_invalid_document_separator_is_a_config_error(tmp_path: Path, separator: str) -> None:
    (tmp_path / "a.txt").write_text("one\n\n\ntwo\n")
    with pytest.raises(ConfigError, match="document_separator") as info:
        read_documents(tmp_path, document_separator=separator)
    assert isinstance(info.value, HetgraphError)
    with pytest.raises(ConfigError, match="document_separator"):
        CorpusConfig.from_dict({"document_separator": separator})


def test_error_classes_are_hetgraph_errors() -> None:
    assert issubclass(CorpusError, HetgraphError) and issubclass(ModelLoadError, HetgraphError)
    assert not issubclass(ModelLoadError, OSError)


# -- item 9: corpus JSON files are named ----------------------------------------------------
def test_malformed_tokenized_corpus_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("alpha beta\n")
    corpus = tokenize_corpus(
        tmp_path / "c.txt", byte_tokenizer(), use_cache=False, show_progress=False
    )
    corpus.save(tmp_path / "tok")
    for name, bad in (("corpus.json", "{oops"), ("train.docs.json", "{}")):
        saved = (tmp_path / "tok" / name).read_text()
        (tmp_path / "tok" / name).write_text(bad)
        with pytest.raises(CorpusError, match=name.replace(".", r"\.")):
            TokenizedCorpus.load(tmp_path / "tok")
        (tmp_path / "tok" / name).write_text(saved)
    assert TokenizedCorpus.load(tmp_path / "tok").fingerprint == corpus.fingerprint


# -- item 12: document names, long documents ------------------------------------------------
def test_control_characters_in_names_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    names = ["\x1b[31mred\x1b[0m", "plain", "rtl\u202eevil", "tab\tnew\nline", "caf\u00e9"]
    path.write_text(
        "".join(json.dumps({"id": n, "text": f"text {i}"}) + "\n" for i, n in enumerate(names))
    )
    got = [d.name for d in read_documents(path)]
    assert got == [
        "\\x1b[31mred\\x1b[0m",
        "plain",
        "rtl\\u202eevil",
        "tab\\x09new\\x0aline",
        "caf\u00e9",
    ]
    assert all(ch.isprintable() for name in got for ch in name)
    assert len(set(got)) == len(got) and got == [d.name for d in read_documents(path)]
    assert safe_document_name("a/b.txt") == "a/b.txt"


def test_undecodable_file_name_survives_saving(tmp_path: Path) -> None:
    corpus_dir = tmp_path / "c"
    corpus_dir.mkdir()
    (corpus_dir / "ok.txt").write_text("alpha\n")
    (corpus_dir / "x\udcff.txt").write_text("beta\n")  # a non-UTF-8 byte in the name
    corpus = tokenize_corpus(
        corpus_dir, byte_tokenizer(), cache_dir=tmp_path / "cache", show_progress=False
    )
    names = [n for s in corpus.splits.values() for n in s.doc_names]
    assert sorted(names) == ["ok.txt", "x\\udcff.txt"]


def _long_text(words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta,", "Gamma", "d3lta", "(eps)", "zeta.", "eta\n", "theta\n\n", "  io"]
    return " ".join(rng.choice(vocab, size=words))


@pytest.mark.parametrize("single_line", [True, False])
def test_long_document_in_pieces_equals_whole(monkeypatch, single_line: bool) -> None:
    monkeypatch.setattr(chunking, "LONG_DOCUMENT_CHARS", 2_000)
    monkeypatch.setattr("hetgraph.corpus.tokenization.LONG_DOCUMENT_CHARS", 2_000)
    text = _long_text(6_000)
    if single_line:
        text = text.replace("\n", " ")
    tokenizer = byte_tokenizer()
    points, unverified = chunking.cut_points(tokenizer, text, 2_000)
    assert len(points) >= len(text) // 2_000 - 1 and unverified == 0
    assert all(b - a <= 2_000 for a, b in zip([0, *points], [*points, len(text)], strict=True))
    whole = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
    split = tokenize_documents([_document(text)], tokenizer, show_progress=False)
    np.testing.assert_array_equal(split.tokens[:-1], whole)
    assert split.tokens[-1] == tokenizer.eos_token_id


def test_unverifiable_cut_is_counted_and_warned(caplog) -> None:
    # A tokenizer that lowercases and prepends a marker to every call cannot be cut exactly.
    from tokenizers import normalizers as n

    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.normalizer = n.Sequence([n.Prepend("#")])
    text = "word " * 1_000
    points, unverified = chunking.cut_points(tokenizer, text, 1_000)
    assert unverified == len(points) > 0
    with caplog.at_level("WARNING", logger="hetgraph.corpus.chunking"):
        ids = chunking.encode_long(tokenizer, text, "doc", 1_000)
    assert "could not be verified" in caplog.text
    assert len(ids) == len(text) + len(points) + 1  # one '#' per piece


_MEMORY_PROBE = """
import resource
import numpy as np
from hetgraph.corpus import Document
from hetgraph.corpus.tokenization import tokenize_documents
from hetgraph.testing import byte_tokenizer
tokenizer = byte_tokenizer()
words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta"], size=600_000)
text = " ".join(words)  # 3.4 MB on one line, 3.4M byte tokens
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
split = tokenize_documents([Document("big", text)], tokenizer, show_progress=False)
assert len(split) == len(text) + 1
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_long_single_line_document_tokenizes_in_bounded_memory() -> None:
    # Tokenized whole (before the fix) the peak grew by ~570 MB; in pieces by ~90 MB, most of
    # it the result's own int32 arrays (tokens, doc ids, positions: ~40 MB).
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    growth_mb = int(result.stdout.split()[-1])
    assert growth_mb < 250, f"peak RSS grew by {growth_mb} MB"
