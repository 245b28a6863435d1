"""Mixed-precision (bfloat16 autocast) training of the adapters: settings, what runs in
bfloat16 and what stays float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fusion import SMALL_ADAPTER, build_store, repeated_pattern_split

from hetgraph.cli import build_parser
from hetgraph.cli_commands import _training_settings
from hetgraph.configuration import ConfigError
from hetgraph.evaluation import EvalConfig, model_perplexity
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.pipeline import RunConfig
from hetgraph.testing import FAMILIES
from hetgraph.training import TrainingConfig, precision, train_adapter
from hetgraph.training.trainer import TrainingError


@pytest.fixture(scope="module")
def split():
    return repeated_pattern_split()


def test_mixed_precision_setting_round_trips_and_bad_values_name_the_key():
    config = TrainingConfig(mixed_precision="bf16")
    assert TrainingConfig.from_dict(config.to_dict()).mixed_precision == "bf16"
    assert TrainingConfig().mixed_precision == "no"  # the library's default: float32
    with pytest.raises(
        ConfigError,
        match=r"mixed_precision must be one of no, bf16, auto, "
        r"got 'fp8'",
    ):
        TrainingConfig.from_dict({"mixed_precision": "fp8"})


@pytest.mark.parametrize(
    "setting, native, expected",
    [
        ("no", True, None),
        ("no", False, None),
        ("bf16", True, torch.bfloat16),
        ("bf16", False, torch.bfloat16),
        ("auto", True, torch.bfloat16),
        ("auto", False, None),
    ],
)
def test_autocast_dtype_resolves_auto_by_the_hardware(monkeypatch, setting, native, expected):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    assert precision.autocast_dtype(setting, torch.device("cpu")) is expected


@pytest.mark.parametrize(
    "capabilities, expected",
    [
        ({"avx2": True, "avx512_bf16": False}, False),
        ({"avx512_bf16": True}, True),
        ({"amx_bf16": True}, True),
        ({"bf16": True, "neon": True}, True),
        ({}, False),
    ],
)
def test_native_bfloat16_on_cpu_follows_torchs_capabilities(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    assert precision.native_bfloat16(torch.device("cpu")) is expected


def test_native_bfloat16_answers_for_any_device():
    assert isinstance(precision.native_bfloat16(torch.device("cpu")), bool)
    assert precision.native_bfloat16(torch.device("meta")) is False


@pytest.mark.parametrize(
    "argv, expected",
    [([], "auto"), (["--mixed-precision", "no"], "no"), (["--mixed-precision", "bf16"], "bf16")],
)
def test_cli_mixed_precision(tmp_path, argv, expected):
    args = build_parser().parse_args(
        ["train", "--datastore", str(tmp_path), "--out", str(tmp_path), *argv]
    )
    _fusion, training, _evaluation = _training_settings(args)
    assert training.mixed_precision == expected  # [] : the embedded demo config's "auto"
    assert RunConfig.default().training.mixed_precision == "auto"


def _record_linear_dtypes(lm: HetGraphLM) -> list[tuple[bool, torch.dtype]]:
    """(training?, output dtype) of every adapter Linear call from now on."""
    seen: list[tuple[bool, torch.dtype]] = []
    for module in lm.engine.adapters.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(
                lambda mod, args, out: seen.append((mod.training, out.dtype))
            )
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "sites, from_datastore", [(("head",), True), (("head",), False), ((0, "head"), False)]
)
def test_bf16_training_runs_the_adapter_in_bf16_and_keeps_the_rest_float32(
    tmp_path, split, family, sites, from_datastore
):
    model, _tokenizer, store, index = build_store(tmp_path, family, split)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lm = HetGraphLM(
        model,
        store,
        index,
        FusionConfig(fusion_layers=sites, k=4, adapter=SMALL_ADAPTER, graph=dict(leakage_radius=4)),
    )
    seen = _record_linear_dtypes(lm)
    valid = repeated_pattern_split(num_docs=2, repeats=2, seed=0)
    training = TrainingConfig(
        max_steps=4,
        batch_size=2,
        context_length=32,
        lr=3e-2,
        warmup_steps=1,
        eval_every=2,
        eval_tokens=64,
        patience=0,
        checkpoint_every=0,
        seed=0,
        from_datastore=from_datastore,
        mixed_precision="bf16",
    )
    result = train_adapter(
        lm,
        split,
        valid,
        training,
        tmp_path / "adapter",
        eval_config=EvalConfig(context_length=32, stride=16),
        show_progress=False,
    )
    assert result.mixed_precision == "bf16"
    assert {dtype for train, dtype in seen if train} == {torch.bfloat16}
    assert {dtype for train, dtype in seen if not train} == {torch.float32}  # evaluations
    assert all(np.isfinite(result.train_losses))
    assert all(p.dtype == torch.float32 for p in lm.engine.adapters.parameters())
    for name, param in lm.named_parameters():
        if param.requires_grad:
            assert param.grad is None or param.grad.dtype == torch.float32, name
    for key, value in model.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    # The recorded valid perplexity is the float32 one of the adapter it saved.
    best = result.best_step
    assert best is not None
    reloaded = HetGraphLM.from_pretrained(tmp_path / "adapter", model, store, index)
    again = model_perplexity(reloaded, valid, EvalConfig(context_length=32, stride=16), 64)
    assert again == pytest.approx(result.valid_ppl[best], rel=1e-6)


def test_bf16_training_learns_like_float32(tmp_path, split):
    """The repeated-pattern task is learned in bfloat16 as in float32 (same data and seed)."""
    model, _tokenizer, store, index = build_store(tmp_path, "qwen2", split)
    valid = repeated_pattern_split(num_docs=2, repeats=2, seed=0)
    windows = EvalConfig(context_length=64, stride=32)
    after = {}
    for setting in ("no", "bf16"):
        torch.manual_seed(0)
        lm = HetGraphLM(
            model,
            store,
            index,
            FusionConfig(
                fusion_layers=("head",), k=4, adapter=SMALL_ADAPTER, graph=dict(leakage_radius=4)
            ),
        )
        before = model_perplexity(lm, valid, windows)
        training = TrainingConfig(
            max_steps=60,
            batch_size=4,
            context_length=48,
            lr=3e-2,
            warmup_steps=5,
            eval_every=0,
            checkpoint_every=0,
            seed=0,
            mixed_precision=setting,
        )
        train_adapter(lm, split, None, training, tmp_path / setting, show_progress=False)
        after[setting] = model_perplexity(lm, valid, windows)
        assert after[setting] < 0.5 * before, (setting, before, after[setting])
    assert after["bf16"] == pytest.approx(after["no"], rel=0.15), after


def test_resuming_with_another_precision_is_refused(tmp_path, split):
    model, _tokenizer, store, index = build_store(tmp_path, "gpt2", split)
    config = FusionConfig(
        fusion_layers=("head",), k=4, adapter=SMALL_ADAPTER, graph=dict(leakage_radius=4)
    )
    training = TrainingConfig(
        max_steps=4,
        batch_size=2,
        context_length=32,
        eval_every=0,
        checkpoint_every=2,
        seed=0,
        mixed_precision="bf16",
    )
    lm = HetGraphLM(model, store, index, config)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(lm, split, None, training, tmp_path / "a", show_progress=False, stop_after=2)
    other = TrainingConfig(**{**training.to_dict(), "mixed_precision": "no"})
    with pytest.raises(TrainingError, match="other training or fusion settings"):
        train_adapter(
            HetGraphLM(model, store, index, config),
            split,
            None,
            other,
            tmp_path / "a",
            show_progress=False,
        )
