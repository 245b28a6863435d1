"""The ``hetgraph`` command line: datastore, index, train, eval, generate, inspect, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hetgraph.allocator import limit_primitive_cache
from hetgraph.cli_commands import (
    cmd_datastore_build,
    cmd_demo,
    cmd_eval,
    cmd_generate,
    cmd_index_build,
    cmd_inspect,
    cmd_train,
    cmd_verify,
    is_expected_error,
)
from hetgraph.cli_encoder import add_encoder_commands, with_encoder
from hetgraph.cli_kg import add_kg_commands, add_kg_options
from hetgraph.cli_options import (
    POSITIVE,
    at_least,
    fraction,
    layer_number,
    positive_float,
    seed_value,
    thread_count,
    token_budget,
)
from hetgraph.cli_rekey import add_rekey_command

EPILOG = """examples:
  hetgraph demo                                   # the whole job on the embedded default
  hetgraph datastore build --out runs/ds --max-tokens 100000
  hetgraph index build --datastore runs/ds
  hetgraph train --datastore runs/ds --out runs/adapter --max-steps 200
  hetgraph eval --datastore runs/ds --adapter runs/adapter --json runs/eval.json
  hetgraph generate --datastore runs/ds --adapter runs/adapter --prompt "import os"
  hetgraph kg build --wordnet --out runs/kg && hetgraph kg embed --kg runs/kg
  hetgraph train --datastore runs/ds --kg runs/kg --out runs/adapter-kg

--model defaults to the embedded SmolLM2-135M and --corpus to the embedded Python 3.11 docs."""


#: ``--preset`` names: :data:`hetgraph.pipeline.FUSION_PRESETS`, repeated here so that parsing
#: (and ``--help``) does not import torch.
PRESETS = ("default", "paper")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or .gguf file (default: embedded SmolLM2-135M)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA if available)"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="model weights dtype (bfloat16 halves GPU memory; adapters stay float32)",
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="torch and FAISS threads (at most the machine's CPUs)",
    )


def _add_datastore(parser: argparse.ArgumentParser, *, kg_settings: bool = False) -> None:
    parser.add_argument("--datastore", required=True)
    add_kg_options(parser, settings=kg_settings)
    parser.add_argument(
        "--encoder",
        default=None,
        metavar="ENC",
        help="retrieve through this relation encoder's index (hetgraph index build "
        "--encoder ENC): queries are encoded by it; an adapter records the encoder it was "
        "trained with",
    )


def _add_corpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus",
        default=None,
        help="directory of text files, a text file, JSONL, Parquet or a 🤗 "
        "datasets save_to_disk directory (default: embedded Python docs)",
    )
    parser.add_argument(
        "--text-field",
        default="text",
        help="JSONL field or dataset / Parquet column holding the text",
    )
    parser.add_argument(
        "--hf-splits",
        nargs="?",
        const="",
        default=None,
        metavar="MAP",
        help="use a DatasetDict's own splits instead of hetgraph's document "
        "split; MAP defaults to train=train,valid=validation,test=test",
    )
    parser.add_argument(
        "--corpus-config",
        default=None,
        type=Path,
        help="JSON file of CorpusConfig fields (split fractions, seed, glob …)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetgraph",
        description="GNN-LM for any Hugging Face decoder LM: a datastore of a corpus, "
        "a heterogeneous graph over retrieved contexts, "
        "and graph adapters fused into the frozen LM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_demo_command(commands)
    add_kg_commands(commands, _add_model)  # hetgraph kg build / embed
    _add_build_commands(commands)
    _add_train_command(commands)
    _add_eval_command(commands)
    _add_generate_command(commands)
    _add_inspect_command(commands)
    _add_verify_command(commands)
    add_encoder_commands(commands)
    return parser


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser(
        "demo", help="run the main job: datastore → index → train → four-way eval"
    )
    demo.add_argument(
        "--config", type=Path, default=None, help="run config JSON (default: the embedded demo)"
    )
    demo.add_argument("--out", default=None, help="run directory (overrides the config's out_dir)")
    demo.add_argument(
        "--print-config",
        action="store_true",
        help="print the run config (with --preset applied) and exit",
    )
    _add_preset(demo, "runs/demo-paper")
    demo.set_defaults(func=cmd_demo)


def _add_preset(parser: argparse.ArgumentParser, paper_out: str | None) -> None:
    where = (
        f" (and the run directory {paper_out} unless --out or --config is given)"
        if paper_out
        else ""
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="replace the config's fusion section: 'paper' = "
        "FusionConfig.paper(), the official GNN-LM model (replace at the "
        "head, k 32, l = r = 1, causal c2c, 3 layers x 8 heads at the "
        "model width, dropout 0.3); 'default' = the demo's. Training "
        f"settings are kept{where}; options such as --k apply on top",
    )


def _add_build_commands(commands: Any) -> None:
    datastore = commands.add_parser("datastore", help="datastore commands").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    ds_build = datastore.add_parser(
        "build", help="run the frozen LM over the train split and store keys"
    )
    _add_model(ds_build)
    _add_corpus(ds_build)
    ds_build.add_argument("--out", required=True, help="datastore directory")
    ds_build.add_argument(
        "--layer",
        type=layer_number,
        default=None,
        help="key layer: decoder-layer index or 'head' (LM-head input, default)",
    )
    ds_build.add_argument(
        "--max-tokens", type=at_least(2), default=None, help="use the first N train tokens"
    )
    ds_build.add_argument("--context-length", type=POSITIVE, default=512)
    ds_build.add_argument("--stride", type=POSITIVE, default=256)
    ds_build.add_argument("--batch-size", type=POSITIVE, default=8)
    ds_build.add_argument(
        "--feature-layers",
        type=int,
        nargs="*",
        default=(),
        help="also store these decoder layers' outputs as neighbour features",
    )
    ds_build.add_argument(
        "--overwrite", action="store_true", help="replace a datastore built differently"
    )
    ds_build.add_argument(
        "--no-index", action="store_true", help="do not build the default index afterwards"
    )
    ds_build.set_defaults(func=cmd_datastore_build)
    add_rekey_command(datastore)  # hetgraph datastore rekey (hetgraph/cli_rekey.py)

    index = commands.add_parser("index", help="index commands").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    ix_build = index.add_parser("build", help="build the FAISS index of a datastore")
    ix_build.add_argument("--datastore", required=True)
    ix_build.add_argument(
        "--factory",
        default="auto",
        help="FAISS index_factory string: "
        "Flat, IVF4096,PQ64, OPQ64,IVF4096,PQ64, HNSW32 "
        "or 'auto' (exact below ~1M vectors)",
    )
    ix_build.add_argument("--metric", choices=("l2", "ip"), default="l2")
    ix_build.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="FAISS threads (at most the machine's CPUs)",
    )
    ix_build.add_argument(
        "--on-disk",
        dest="on_disk",
        action="store_const",
        const=True,
        default=None,
        help="IVF lists on disk (mmap'd); default: by size (docs: Scaling out)",
    )
    ix_build.add_argument("--in-memory", dest="on_disk", action="store_const", const=False)
    ix_build.add_argument("--nprobe", type=POSITIVE, default=32, help="IVF lists per query")
    ix_build.add_argument(
        "--rerank",
        type=at_least(0),
        default=0,
        metavar="K_PRIME",
        help="re-rank K_PRIME candidates exactly against the keys (0: off)",
    )
    ix_build.add_argument(
        "--shard-rows",
        type=POSITIVE,
        default=1_000_000,
        help="rows per block of an on-disk build (the unit of a rank's work)",
    )
    ix_build.add_argument(
        "--encoder",
        default=None,
        metavar="ENC",
        help="index the keys encoded by this relation encoder (hetgraph "
        "encoder train) into ENC/index; the encoder sets the metric",
    )
    ix_build.set_defaults(func=with_encoder(cmd_index_build))


def _add_train_command(commands: Any) -> None:
    train = commands.add_parser("train", help="train graph adapters (the base model stays frozen)")
    _add_model(train)
    _add_corpus(train)
    _add_datastore(train, kg_settings=True)
    train.add_argument(
        "--out", required=True, help="adapter directory (checkpoints resume from it)"
    )
    train.add_argument(
        "--config",
        type=Path,
        default=None,
        help="run config JSON; its fusion / training / evaluation sections are used",
    )
    _add_preset(train, None)
    train.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="ADAPTER_DIR",
        help="start from this trained adapter instead of a fresh one: the "
        "paper's stage 2 (e.g. --preset paper --k 128 --left 2 --right 2 "
        "--init-from STAGE1_DIR); only the graph and k may change",
    )
    train.add_argument("--max-steps", type=POSITIVE, default=None)
    train.add_argument(
        "--max-tokens", type=at_least(2), default=None, help="train on the first N train tokens"
    )
    train.add_argument(
        "--fusion-layers",
        nargs="+",
        default=None,
        help="fused sites: decoder-layer indices, 'head', 'all' (every decoder "
        "layer) and/or Python ranges such as 0:30:4 or ::2, e.g. "
        "'--fusion-layers all head'; write a range that starts with '-' "
        "as '--fusion-layers=-4:'",
    )
    train.add_argument(
        "--gate",
        choices=("static", "retrieval"),
        default=None,
        help="gated-residual gate: 'static' (one learned vector per site) or "
        "'retrieval' (also scaled by how close the neighbours are)",
    )
    train.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute the frozen decoder layers in backward (less memory when "
        "fusing below the last layer)",
    )
    train.add_argument("--k", type=POSITIVE, default=None, help="neighbours per position")
    train.add_argument(
        "--left",
        type=at_least(0),
        default=None,
        help="neighbour window: tokens left of each retrieved position (l)",
    )
    train.add_argument(
        "--right",
        type=at_least(0),
        default=None,
        help="neighbour window: tokens right of each retrieved position (r)",
    )
    train.add_argument("--lr", type=float, default=None)
    train.add_argument(
        "--mixed-precision",
        choices=("auto", "bf16", "no"),
        default=None,
        help="train in bfloat16 autocast ('auto': where the device has native "
        "bfloat16; evaluations stay float32; default: the config's)",
    )
    train.add_argument(
        "--seed",
        type=seed_value,
        default=None,
        help="random seed, 0 <= seed < 2**32 (default: the config's)",
    )
    train.add_argument(
        "--neighbours",
        choices=("retrieved", "random"),
        default=None,
        help="'random': the random-neighbours control (k datastore rows drawn "
        "uniformly per position instead of retrieved; default: retrieved)",
    )
    train.add_argument(
        "--control",
        choices=("lora",),
        default=None,
        help="train a control instead of a graph adapter: 'lora' (PEFT LoRA on "
        "the frozen LM, rank matched to the graph adapter's parameters, "
        "the same tokens and schedule)",
    )
    train.set_defaults(func=cmd_train)


def _add_eval_command(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval", help="perplexity and accuracy: base, kNN-LM (+ GNN-LM with --adapter)"
    )
    _add_model(evaluate)
    _add_corpus(evaluate)
    _add_datastore(evaluate)
    evaluate.add_argument(
        "--adapter",
        default=None,
        help="trained adapter directory (adds gnn and gnn_knn; a LoRA "
        "control's adds lora and lora_knn)",
    )
    evaluate.add_argument(
        "--control",
        default=None,
        metavar="LORA_DIR",
        help="a LoRA control (train --control lora) evaluated beside "
        "--adapter on the same tokens (adds lora, lora_knn)",
    )
    evaluate.add_argument(
        "--rekeyed",
        default=None,
        metavar="DIR",
        help="a store re-keyed by --adapter (hetgraph datastore rekey): adds "
        "gnn_knn_rekeyed, GNN-LM + kNN over the adapter's own fused head states "
        "(the paper's setting)",
    )
    evaluate.add_argument("--split", choices=("test", "valid"), default="test")
    evaluate.add_argument(
        "--max-tokens",
        type=token_budget,
        default=argparse.SUPPRESS,
        help="tokens of the split to score, spread over every document "
        "(see --sample), or 'all' (default: the config's)",
    )
    evaluate.add_argument(
        "--tune-tokens",
        type=token_budget,
        default=argparse.SUPPRESS,
        help="valid tokens for tuning λ and T, sampled the same way, or 'all'",
    )
    evaluate.add_argument(
        "--sample",
        choices=("stratified", "prefix"),
        default=None,
        help="which tokens: a seeded sample spread over every document (default) or the first ones",
    )
    evaluate.add_argument(
        "--sample-seed",
        type=seed_value,
        default=None,
        help="seed of the stratified sample (default 0)",
    )
    evaluate.add_argument(
        "--bootstrap-resamples",
        type=POSITIVE,
        default=None,
        help="document resamples of the 95 %% intervals (default 1000)",
    )
    evaluate.add_argument(
        "--per-token",
        type=Path,
        default=None,
        help="write every scored token's document, position, target and "
        "log-probability per method here (safetensors)",
    )
    evaluate.add_argument(
        "--k",
        type=POSITIVE,
        default=None,
        help="neighbours per position (fewer than the datastore's entries)",
    )
    evaluate.add_argument(
        "--neighbour-states",
        choices=("auto", "on", "off"),
        default=None,
        help="read the adapter's window side from a table built once over "
        "the datastore (same results, faster; default: the config's, "
        "auto)",
    )
    evaluate.add_argument(
        "--allow-other-corpus",
        action="store_true",
        help="evaluate on a corpus other than the one the datastore was built "
        "from (recorded in the results as provenance)",
    )
    evaluate.add_argument(
        "--config", type=Path, default=None, help="run config JSON (evaluation section)"
    )
    evaluate.add_argument("--json", type=Path, default=None, help="write the results here")
    evaluate.add_argument("--plot", type=Path, default=None, help="write a bar chart (PNG) here")
    evaluate.set_defaults(func=cmd_eval)


def _add_generate_command(commands: Any) -> None:
    generate = commands.add_parser("generate", help="generate with retrieval at every new position")
    _add_model(generate)
    _add_datastore(generate)
    generate.add_argument(
        "--adapter", default=None, help="trained adapter (default: zero gates = base model)"
    )
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=POSITIVE, default=40)
    generate.add_argument(
        "--knn",
        action="store_true",
        help="also interpolate kNN-LM: λ and T from --lambda / --temperature, "
        "else the adapter's fusion config, else the values the last "
        "`hetgraph eval` of this adapter (or, without --adapter, of this "
        "datastore) tuned",
    )
    generate.add_argument(
        "--lambda",
        dest="knn_lambda",
        type=fraction,
        default=None,
        metavar="LAMBDA",
        help="kNN-LM weight λ in [0, 1] (with --knn)",
    )
    generate.add_argument(
        "--temperature",
        dest="knn_temperature",
        type=positive_float,
        default=None,
        metavar="T",
        help="kNN-LM temperature T > 0 of softmax(-d / T) (with --knn)",
    )
    generate.add_argument(
        "--show-neighbours",
        action="store_true",
        help="print the retrieved corpus contexts behind each generated token",
    )
    generate.add_argument("--neighbours", type=POSITIVE, default=3, help="contexts shown per token")
    generate.set_defaults(func=cmd_generate)


def _add_verify_command(commands: Any) -> None:
    verify = commands.add_parser(
        "verify", help="check every file of a datastore, index, adapter or run directory"
    )
    verify.add_argument("path", help="a datastore, index, adapter, checkpoint or run directory")
    verify.set_defaults(func=cmd_verify)


def _add_inspect_command(commands: Any) -> None:
    inspect = commands.add_parser(
        "inspect", help="show the corpus contexts retrieved for positions of a text"
    )
    _add_model(inspect)
    _add_datastore(inspect)
    inspect.add_argument("--adapter", default=None)
    inspect.add_argument("--text", required=True)
    inspect.add_argument(
        "--position", type=int, default=-1, help="token position (default: the last)"
    )
    inspect.add_argument("--neighbours", type=POSITIVE, default=8)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=cmd_inspect)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the stream of the first call), so
    repeated :func:`main` calls in one process never write to a closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _show_progress_messages() -> None:
    # The library logs what each stage does (logging.getLogger(__name__)); the CLI shows it.
    package_logger = logging.getLogger("hetgraph")
    if not any(isinstance(h, _StderrHandler) for h in package_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[hetgraph] %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Every expected failure is a :class:`~hetgraph.errors.HetgraphError` and becomes one
    ``error: …`` line on stderr with exit status 2 (argparse refuses bad option values the
    same way, before anything runs). Any other exception is a bug: it propagates with its
    traceback (the ``hetgraph`` script then exits with status 1).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    limit_primitive_cache()  # before any computation: oneDNN reads it once (allocator docs)
    if args.version:
        from hetgraph import __version__

        print(__version__)
        return 0
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    _show_progress_messages()
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as error:
        if not is_expected_error(error):
            raise
        # Expected errors carry the problem and the fix; a traceback would only bury them.
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
