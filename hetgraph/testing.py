"""Tiny, randomly initialised causal LMs and a byte-level tokenizer.

Tests, examples and CI smoke runs use these: transformers builds the models from a
config, so nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from hetgraph.corpus import TokenizedSplit

Family = Literal["qwen2", "llama", "gpt2"]
FAMILIES: tuple[Family, ...] = ("qwen2", "llama", "gpt2")

#: Byte-level vocabulary: 256 byte symbols followed by the end-of-sequence token.
BYTE_VOCAB_SIZE = 257


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level tokenizer with 256 byte tokens and ``<|eos|>`` (id 256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {symbol: i for i, symbol in enumerate(byte_to_unicode)}
    vocab["<|eos|>"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _byte_of(symbol: str) -> int:
    # GPT-2's byte <-> unicode table: printable bytes map to themselves, the rest to 256+.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(symbol)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def tiny_config(
    family: Family,
    vocab_size: int = BYTE_VOCAB_SIZE,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
) -> PretrainedConfig:
    """Config of a tiny decoder LM of the given family (Qwen2, Llama or GPT-2)."""
    eos = vocab_size - 1
    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "qwen2":
        return Qwen2Config(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **common,
        )
    if family == "llama":
        return LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
            **common,
        )
    if family == "gpt2":
        return GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            **common,
        )
    raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")


def tiny_causal_lm(family: Family = "qwen2", seed: int = 0, **config_kwargs) -> PreTrainedModel:
    """A randomly initialised tiny causal LM in eval mode (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs))
    return model.eval()


#: Words of :func:`write_word_corpus` documents: a little prose, a little Python.
CORPUS_WORDS = ("alpha", "beta", "gamma", "delta", "import os", "def f():")


def save_tiny_model(folder: str | Path, family: Family = "qwen2", seed: int = 0) -> Path:
    """Save :func:`tiny_causal_lm` with :func:`byte_tokenizer` as a model folder, as a user's
    ``--model`` directory would be."""
    folder = Path(folder)
    tiny_causal_lm(family, seed=seed).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def write_word_corpus(
    folder: str | Path,
    num_documents: int = 12,
    seed: int = 0,
    words: tuple[str, ...] = CORPUS_WORDS,
    length: int = 60,
) -> Path:
    """A folder of ``num_documents`` text files of ``length`` random ``words`` each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_documents):
        text = " ".join(rng.choice(words) for _ in range(length))
        (folder / f"doc{i:02d}.txt").write_text(text + "\n")
    return folder


def tiny_run_config(dropout: float = 0.0) -> dict:
    """A run config (``hetgraph demo --config`` / ``train --config``) sized for
    :func:`save_tiny_model` and :func:`write_word_corpus`: a few seconds end to end on CPU."""
    return {
        "datastore": {"context_length": 64, "stride": 32, "batch_size": 4},
        "fusion": {
            "k": 4,
            "adapter": {
                "hidden_channels": 16,
                "num_layers": 1,
                "heads": 2,
                "dropout": dropout,
                "attn_dropout": 0.0,
            },
        },
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "context_length": 32,
            "eval_every": 2,
            "eval_tokens": 200,
            "checkpoint_every": 2,
        },
        "evaluation": {"context_length": 64, "stride": 32, "batch_size": 4, "k": 4},
    }


def write_cli_workspace(root: str | Path, dropout: float = 0.0) -> Path:
    """``root`` with a tiny Qwen2 ``model/``, a word ``corpus/`` and ``run.json``
    (:func:`tiny_run_config`): the inputs of a command-line test."""
    root = Path(root)
    save_tiny_model(root / "model", "qwen2")
    write_word_corpus(root / "corpus")
    (root / "run.json").write_text(json.dumps(tiny_run_config(dropout)))
    return root


def run_cli(*argv: object) -> int:
    """Run the ``hetgraph`` command line on ``argv`` (paths and numbers are passed as
    strings) in this process; its exit status."""
    from hetgraph.cli import main  # the CLI imports every stage; tests of one stage need not

    return main([str(a) for a in argv])


def one_error_line(capsys: object) -> str:
    """The one ``error: …`` line a command printed on stderr (pytest's ``capsys``),
    asserting there is exactly one and no traceback."""
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def repeated_pattern_split(
    num_docs: int = 6, pattern: int = 24, repeats: int = 6, seed: int = 0, name: str = "train"
) -> TokenizedSplit:
    """Documents that repeat a random byte pattern (token ids < 256, each ended by 256): the
    next token is predictable from earlier repetitions, so retrieval is informative and an
    adapter learns in a few steps."""
    rng = np.random.default_rng(seed)
    tokens, doc_ids = [], []
    for doc in range(num_docs):
        body = np.tile(rng.integers(0, 256, size=pattern), repeats)
        tokens.append(np.r_[body, 256])
        doc_ids.append(np.full(len(body) + 1, doc))
    return TokenizedSplit(
        name,
        np.concatenate(tokens).astype(np.int32),
        np.concatenate(doc_ids).astype(np.int32),
        [f"doc{i}" for i in range(num_docs)],
    )
