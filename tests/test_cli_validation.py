"""The command line's own options and outputs are checked before any work ("Reliability,
round two"): ``generate --knn`` finds its λ and T, prompts beyond the model's positions,
option values (layers, device, threads, seed, k) and output paths (``--out``, ``--json``,
``--plot``, never over hetgraph's own files), each one ``error:`` line with exit status 2
and nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import hetgraph.evaluation
from hetgraph.cli import main
from hetgraph.evaluation import plot_results
from hetgraph.knnlm import KNN_TUNING
from hetgraph.pipeline import DeviceError, resolve_device
from hetgraph.testing import one_error_line, run_cli as run, save_tiny_model, write_cli_workspace

DS_OPTIONS = ["--context-length", "64", "--stride", "32", "--batch-size", "4"]
RESULTS = {
    "base": {"ppl": 10.0, "acc": 0.1},
    "knn": {"ppl": 9.0, "acc": 0.2, "lambda": 0.2, "temperature": 1.0, "k": 4},
    "tokens": 100,
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A tiny Qwen2 and GPT-2 (512 positions each), a corpus, a datastore for each, and an
    adapter trained on the Qwen2 one."""
    root = tmp_path_factory.mktemp("cli-validation")
    write_cli_workspace(root)
    save_tiny_model(root / "gpt2", "gpt2")
    for model, ds in (("model", "ds"), ("gpt2", "ds-gpt2")):
        assert run("datastore", "build", *common(root, model), "--out", root / ds, *DS_OPTIONS) == 0
    assert (
        run(
            "train",
            *common(root),
            "--datastore",
            root / "ds",
            "--out",
            root / "adapter",
            "--config",
            root / "run.json",
            "--max-steps",
            "2",
        )
        == 0
    )
    return root


def common(w, model="model"):
    return ["--model", w / model, "--corpus", w / "corpus", "--threads", "1"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_evaluation(monkeypatch):
    """``eval`` must refuse its outputs before evaluating: the evaluation itself fails here."""

    def evaluate(*args, **kwargs):
        raise AssertionError("the evaluation ran before the options were checked")

    monkeypatch.setattr(hetgraph.evaluation, "evaluate_four_way", evaluate)


# ---------------------------------------------------------- item 1: generate --knn's λ and T
def test_generate_knn_uses_options_then_eval_tuned_values_else_names_both_fixes(ws, capsys):
    for adapter in ((), ("--adapter", ws / "adapter")):
        (ws / ("adapter" if adapter else "ds") / KNN_TUNING).unlink(missing_ok=True)
        generate = [
            "generate",
            "--model",
            ws / "model",
            "--datastore",
            ws / "ds",
            *adapter,
            "--prompt",
            "alpha beta",
            "--max-new-tokens",
            "2",
            "--knn",
        ]
        assert run(*generate) == 2
        line = one_error_line(capsys)
        assert "--lambda and --temperature" in line and "`hetgraph eval --datastore" in line
        assert run(*generate, "--lambda", "0.3", "--temperature", "2") == 0
        assert capsys.readouterr().out.startswith("alpha beta")
    # `hetgraph eval` records its tuned values where generate finds them
    assert (
        run(
            "eval",
            *common(ws),
            "--datastore",
            ws / "ds",
            "--adapter",
            ws / "adapter",
            "--config",
            ws / "run.json",
            "--max-tokens",
            "100",
            "--tune-tokens",
            "100",
            "--json",
            ws / "eval.json",
        )
        == 0
    )
    capsys.readouterr()
    results = json.loads((ws / "eval.json").read_text())
    for directory, row in (("adapter", "gnn_knn"), ("ds", "knn")):
        record = json.loads((ws / directory / KNN_TUNING).read_text())
        assert record["lambda"] == results[row]["lambda"]
        assert record["temperature"] == results[row]["temperature"]
    for adapter in ((), ("--adapter", ws / "adapter")):
        assert (
            run(
                "generate",
                "--model",
                ws / "model",
                "--datastore",
                ws / "ds",
                *adapter,
                "--prompt",
                "alpha beta",
                "--max-new-tokens",
                "2",
                "--knn",
            )
            == 0
        )
        captured = capsys.readouterr()
        assert captured.out.startswith("alpha beta") and "tuned by `hetgraph eval`" in captured.err
    assert run("verify", ws / "ds") == 0 and run("verify", ws / "adapter") == 0


def test_generate_knn_ignores_values_tuned_for_another_adapter(ws, capsys):
    record = ws / "adapter" / KNN_TUNING
    record.write_text(
        json.dumps(
            {"lambda": 0.5, "temperature": 1.0, "k": 4, "datastore": "other", "adapter": "other"}
        )
    )
    assert (
        run(
            "generate",
            "--model",
            ws / "model",
            "--datastore",
            ws / "ds",
            "--adapter",
            ws / "adapter",
            "--prompt",
            "alpha",
            "--knn",
        )
        == 2
    )
    assert "--lambda and --temperature" in one_error_line(capsys)
    record.unlink()


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--lambda", "1.5"], "--lambda"),
        (["--lambda", "nan"], "--lambda"),
        (["--temperature", "0"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
    ],
)
def test_knn_mixture_options_are_checked_at_parse_time(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--datastore", "DS", "--prompt", "x", "--knn", *argv])
    assert info.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_mixture_options_without_knn_are_refused(ws, capsys):
    assert (
        run(
            "generate",
            "--model",
            ws / "model",
            "--datastore",
            ws / "ds",
            "--prompt",
            "x",
            "--lambda",
            "0.2",
        )
        == 2
    )
    assert "add --knn" in one_error_line(capsys)


# ------------------------------------------------------------- item 2: the model's positions
@pytest.mark.parametrize("model, ds", [("model", "ds"), ("gpt2", "ds-gpt2")])
def test_generate_beyond_the_model_positions_is_refused(ws, capsys, model, ds):
    base = ["generate", "--model", ws / model, "--datastore", ws / ds, "--threads", "1"]
    # the byte tokenizer: one token per character; both tiny models have 512 positions
    assert run(*base, "--prompt", "ab " * 600) == 2
    line = one_error_line(capsys)
    assert "--prompt is 1800 tokens" in line and "512" in line
    assert run(*base, "--prompt", "a" * 500, "--max-new-tokens", "13") == 2
    line = one_error_line(capsys)
    assert "--max-new-tokens 13" in line and "at most 512" in line
    assert run(*base, "--prompt", "a" * 500, "--max-new-tokens", "12") == 0


def test_inspect_beyond_the_model_positions_is_refused(ws, capsys):
    assert (
        run(
            "inspect",
            "--model",
            ws / "model",
            "--datastore",
            ws / "ds",
            "--threads",
            "1",
            "--text",
            "ab " * 200,
        )
        == 2
    )
    line = one_error_line(capsys)
    assert "--text is 600 tokens" in line and "512 positions" in line


# ----------------------------------------------------------------- item 3: option values
@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--datastore", "DS", "--out", "OUT", "--seed", "-1"], "--seed"),
        (["train", "--datastore", "DS", "--out", "OUT", "--seed", "1e20"], "--seed"),
        (["train", "--datastore", "DS", "--out", "OUT", "--seed", str(2**32)], "--seed"),
        (["train", "--datastore", "DS", "--out", "OUT", "--threads", "100000"], "--threads"),
        (["datastore", "build", "--out", "OUT", "--threads", "100000"], "--threads"),
        (["index", "build", "--datastore", "DS", "--threads", "100000"], "--threads"),
    ],
)
def test_seed_and_threads_are_bounded_at_parse_time(argv, option, tmp_path, capsys):
    argv = [str(tmp_path / a) if a in ("DS", "OUT") else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and f"argument {option}" in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()


def test_largest_seed_and_thread_count_are_accepted():
    from hetgraph.cli import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--datastore",
            "d",
            "--out",
            "o",
            "--seed",
            str(2**32 - 1),
            "--threads",
            str(os.cpu_count()),
        ]
    )
    assert args.seed == 2**32 - 1 and args.threads == os.cpu_count()


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--layer", "99"], "--layer 99 is outside the model's 2 decoder layers"),
        (["--layer", "-100"], "--layer -100 is outside"),
        (["--feature-layers", "0", "99"], "--feature-layers 99 is outside"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device name"),
        (["--device", "cuda:99"], "--device cuda:99"),
    ],
)
def test_invalid_layer_and_device_are_one_line_and_write_nothing(
    ws, tmp_path, capsys, options, expected
):
    out = tmp_path / "ds"
    assert run("datastore", "build", *common(ws), "--out", out, *DS_OPTIONS, *options) == 2
    assert expected in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(ws, tmp_path, capsys):
    assert (
        run(
            "train",
            *common(ws),
            "--datastore",
            ws / "ds",
            "--out",
            tmp_path / "a",
            "--device",
            "cuda",
        )
        == 2
    )
    assert "no usable CUDA device" in one_error_line(capsys)
    assert not (tmp_path / "a").exists()


def test_a_config_device_is_checked_too():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="config device"):
        resolve_device("tpu-please", "config device")


def test_k_beyond_the_memory_budget_is_refused_before_evaluating(ws, capsys, monkeypatch):
    # 836 positions × k 2000 × 48 bytes = 80 MB; the model and adapter fit in 30 MB
    monkeypatch.setenv("HETGRAPH_MEMORY_LIMIT", "30M")
    assert run("eval", *common(ws), "--datastore", ws / "ds", "--k", "2000") == 2
    line = one_error_line(capsys)
    assert "k 2000" in line and "lower --k" in line


# --------------------------------------------------------------- item 3: output paths
def test_out_that_cannot_be_a_directory_is_refused(ws, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    cases = [(a_file, "is an existing file"), (a_file / "ds", "is a file, not a directory")]
    if Path("/proc").is_dir():
        cases.append((Path("/proc/ds"), "cannot create anything in /proc"))
    for out, expected in cases:
        assert run("datastore", "build", *common(ws), "--out", out, *DS_OPTIONS) == 2
        assert expected in one_error_line(capsys)
    assert a_file.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [a_file]


def test_out_holding_other_hetgraph_data_is_refused(ws, capsys):
    before = snapshot(ws / "ds"), snapshot(ws / "adapter")
    assert run("train", *common(ws), "--datastore", ws / "ds", "--out", ws / "ds") == 2
    assert "holds a datastore, not an adapter" in one_error_line(capsys)
    assert run("datastore", "build", *common(ws), "--out", ws / "adapter", *DS_OPTIONS) == 2
    assert "holds an adapter, not a datastore" in one_error_line(capsys)
    assert (snapshot(ws / "ds"), snapshot(ws / "adapter")) == before


@pytest.mark.parametrize(
    "option, target, expected",
    [
        ("--json", "{tmp}", "is a directory"),
        ("--json", "{tmp}/a-file/x.json", "is a file, not a directory"),
        ("--plot", "{tmp}/chart.xyz", "matplotlib cannot write .xyz"),
        ("--plot", "{tmp}", "is a directory"),
        ("--json", "{ws}/run.json", "is an input of this command"),
    ],
)
def test_eval_outputs_are_checked_before_evaluating(
    ws, tmp_path, capsys, no_evaluation, option, target, expected
):
    (tmp_path / "a-file").write_text("x")
    target = target.format(tmp=tmp_path, ws=ws)
    assert (
        run(
            "eval",
            *common(ws),
            "--datastore",
            ws / "ds",
            "--config",
            ws / "run.json",
            option,
            target,
        )
        == 2
    )
    assert expected in one_error_line(capsys)


@pytest.mark.parametrize(
    "target, kind",
    [
        ("ds/metadata.json", "datastore"),
        ("ds/index/index.json", "index"),
        ("adapter/adapter_config.json", "adapter"),
        ("adapter/checkpoint/trainer_state.json", "checkpoint"),
        ("model/config.json", "model"),
        ("ds/new.json", "datastore"),
    ],
)
def test_eval_never_writes_over_hetgraph_files(ws, capsys, no_evaluation, target, kind):
    before = snapshot(ws)
    assert run("eval", *common(ws), "--datastore", ws / "ds", "--json", ws / target) == 2
    line = one_error_line(capsys)
    assert f"{kind} directory whose files hetgraph owns" in line
    assert snapshot(ws) == before


def test_eval_json_in_a_run_directory_spares_the_runs_own_files(tmp_path):
    from hetgraph.cli_checks import CommandLineError, check_output_file

    run_dir = tmp_path / "run"
    (run_dir / "datastore").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    with pytest.raises(CommandLineError, match="run directory"):
        check_output_file(run_dir / "results.json", "--json")
    check_output_file(run_dir / "eval-valid.json", "--json")  # a new name there is fine


# ----------------------------------------------------------- item 4: the plot is atomic
def test_plot_replaces_a_file_only_when_complete(tmp_path, monkeypatch):
    import matplotlib.figure

    chart = tmp_path / "chart.png"
    chart.write_bytes(b"the old chart")

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a ")
        raise RuntimeError("the renderer failed")

    with monkeypatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", broken)
        with pytest.raises(RuntimeError):
            plot_results(RESULTS, chart)
    assert chart.read_bytes() == b"the old chart"
    assert sorted(tmp_path.iterdir()) == [chart]  # no temporary left behind
    plot_results(RESULTS, chart)
    assert chart.read_bytes().startswith(b"\x89PNG")


def test_plot_without_a_suffix_is_a_png_at_that_very_path(tmp_path):
    plot_results(RESULTS, tmp_path / "chart")
    assert [p.name for p in tmp_path.iterdir()] == ["chart"]
    assert (tmp_path / "chart").read_bytes().startswith(b"\x89PNG")
    plot_results(RESULTS, tmp_path / "chart.svg")
    assert b"<svg" in (tmp_path / "chart.svg").read_bytes()[:1000]
