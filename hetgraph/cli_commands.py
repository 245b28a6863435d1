"""The commands behind the ``hetgraph`` command line (:mod:`hetgraph.cli` builds the parser).

Every expected failure raised here is a :class:`~hetgraph.errors.HetgraphError` whose message
names the option or file and the fix; :func:`is_expected_error` tells :func:`hetgraph.cli.main`
which exceptions to render as one ``error: …`` line.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

from hetgraph.cli_checks import (
    CommandLineError,
    check_layers,
    check_output_directory,
    check_output_file,
    check_plot_path,
    check_positions,
)
from hetgraph.cli_kg import apply_kg_settings, check_kg_options, kg_evaluation, open_knowledge
from hetgraph.cli_options import index_config_from_args
from hetgraph.errors import HetgraphError
from hetgraph.io import (
    ADAPTER_CONFIG,
    INDEX_DIR,
    INDEX_FILE,
    atomic_write_json,
)
from hetgraph.limits import loads_json

#: ``OSError`` numbers caused by the machine, not by a bug: full disk or quota, a file over
#: the size limit, no permission, a read-only file system.
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
)


logger = logging.getLogger(__name__)

#: Run directory of ``hetgraph demo --preset paper`` (without ``--out`` or ``--config``).
PAPER_DEMO_DIR = "runs/demo-paper"


def is_expected_error(error: BaseException) -> bool:
    """Whether ``error`` is an expected failure the CLI shows as one ``error:`` line: a
    :class:`~hetgraph.errors.HetgraphError`, or an
    ``OSError`` caused by the machine (full disk, permissions). Anything else is a bug."""
    if isinstance(error, HetgraphError):
        return True
    return isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS


# ----------------------------------------------------------------------------- helpers
def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import resolve_device, set_threads

    device = resolve_device(args.device)  # a device that does not exist: before any load
    set_threads(args.threads)
    return load_model(args.model, device=device, dtype=getattr(torch, args.dtype))


def _read_json_option(path: Path, option: str) -> Any:
    from hetgraph.configuration import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"{option} {path}: file not found; give an existing JSON file")
    try:
        return loads_json(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{option} {path} is not valid JSON ({error}); fix the file") from None


def _corpus(args: argparse.Namespace, tokenizer: Any):
    from hetgraph.configuration import ConfigError
    from hetgraph.corpus import CorpusConfig, tokenize_corpus

    data: Any = {}
    if args.corpus_config is not None:
        data = _read_json_option(args.corpus_config, "--corpus-config")
        if not isinstance(data, dict):
            raise ConfigError(
                f"--corpus-config {args.corpus_config} must hold a JSON object "
                "of CorpusConfig fields"
            )
    if args.corpus is not None:
        data["path"] = args.corpus
    if args.text_field != "text":
        data["text_field"] = args.text_field
    if getattr(args, "hf_splits", None) is not None:
        from hetgraph.corpus.config import parse_dataset_splits

        data["dataset_splits"] = parse_dataset_splits(args.hf_splits)
    try:
        config = CorpusConfig.from_dict(data)
    except ConfigError as error:
        where = f"--corpus-config {args.corpus_config}" if args.corpus_config else "corpus"
        raise ConfigError(f"{where}: {error}", error.key) from None
    return tokenize_corpus(config, tokenizer)


def _open_store(path: str, model: Any, tokenizer: Any, encoder: str | None = None):
    """The datastore and the index to retrieve from: its own, or with ``--encoder`` the
    relation encoder's index over the encoded keys (queries are encoded as they search)."""
    from hetgraph.datastore import Datastore
    from hetgraph.encoder import EncodedIndex
    from hetgraph.index import DatastoreIndex

    store = Datastore.open(path, model=model, tokenizer=tokenizer)
    if encoder is not None:
        return store, EncodedIndex.load(encoder, store)
    index_dir = Path(path) / INDEX_DIR
    if not (index_dir / INDEX_FILE).is_file():
        raise CommandLineError(
            f"{path} has no index yet; run `hetgraph index build --datastore {path}`"
        )
    return store, DatastoreIndex.load(index_dir, store)


def _run_config(path: Path | None):
    from hetgraph.pipeline import RunConfig

    return RunConfig.from_json_file(path) if path is not None else RunConfig.default()


def _check_k(k: int, store: Any, option: str) -> None:
    if k >= len(store):
        raise CommandLineError(
            f"{option} {k} must be smaller than the {len(store)} entries of "
            f"datastore {store.path}; lower {option} or build a larger "
            "datastore"
        )


def _hetgraph_lm(
    adapter: str | None, model: Any, tokenizer: Any, store: Any, index: Any, knowledge: Any
):
    from hetgraph.fusion import FusionConfig, HetGraphLM

    if adapter:
        if not (Path(adapter) / ADAPTER_CONFIG).is_file():
            raise CommandLineError(
                f"--adapter {adapter} holds no trained adapter ({ADAPTER_CONFIG} missing); "
                "give the --out directory of `hetgraph train`, or leave --adapter out"
            )
        return HetGraphLM.from_pretrained(
            adapter, model, store, index, tokenizer=tokenizer, knowledge=knowledge
        )
    return HetGraphLM(model, store, index, FusionConfig(), tokenizer=tokenizer, knowledge=knowledge)


def _lm_for_text(
    args: argparse.Namespace,
    text: str,
    option: str,
    verb: str,
    *,
    new_tokens: int = 0,
    special_tokens: bool = True,
):
    """``(lm, model, tokenizer)`` of ``generate`` / ``inspect``: refuses a ``torchrun`` job and
    an empty ``text`` (given as ``option``) before loading the model, and a ``text`` whose
    tokens (as the command tokenizes it) plus ``new_tokens`` exceed the model's positions
    before loading the datastore, its index and the adapter."""
    from hetgraph.distributed import require_single_process

    require_single_process(args.command)
    if not text:
        raise CommandLineError(f"{option} is empty; give some text to {verb}")
    check_kg_options(args, args.adapter)
    model, tokenizer = _load(args)
    tokens = len(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    check_positions(model, tokens, option, new_tokens)
    store, index = _open_store(args.datastore, model, tokenizer, args.encoder)
    knowledge = open_knowledge(args, tokenizer)
    return _hetgraph_lm(args.adapter, model, tokenizer, store, index, knowledge), model, tokenizer


# ---------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from hetgraph.distributed import require_single_process
    from hetgraph.evaluation import results_table
    from hetgraph.pipeline import DEFAULT_CONFIG, apply_preset, run_pipeline

    require_single_process("demo")
    if args.print_config and args.preset is None and args.config is None and args.out is None:
        print(DEFAULT_CONFIG.read_text(), end="")
        return 0
    config = _run_config(args.config)
    if args.preset is not None:
        config = apply_preset(config, args.preset)
        if args.preset == "paper" and args.config is None:
            config.out_dir = PAPER_DEMO_DIR  # never mixed with the default demo's run
    if args.out is not None:
        config.out_dir = args.out
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    print(results_table(run_pipeline(config)))
    return 0


def cmd_datastore_build(args: argparse.Namespace) -> int:
    from hetgraph.datastore import DatastoreConfig, build_datastore
    from hetgraph.distributed import init_distributed
    from hetgraph.index import IndexConfig, build_index
    from hetgraph.models.checks import check_context_length

    config = DatastoreConfig.from_dict(
        dict(
            context_length=args.context_length,
            stride=args.stride,
            batch_size=args.batch_size,
            key_layer=args.layer,
            feature_layers=list(args.feature_layers),
            max_tokens=args.max_tokens,
        )
    )
    check_output_directory(args.out, "--out", "datastore")
    ctx = init_distributed()  # under torchrun every rank builds its share; rank 0 reports
    model, tokenizer = _load(args)
    check_context_length(model, config.context_length, "--context-length")
    check_layers(model, {"--layer": [args.layer], "--feature-layers": list(args.feature_layers)})
    corpus = _corpus(args, tokenizer)
    store = build_datastore(
        model,
        tokenizer,
        corpus.train,
        args.out,
        config,
        corpus_fingerprint=corpus.fingerprint,
        overwrite=args.overwrite,
    )
    if ctx.is_main:
        print(f"datastore: {store}")
    if not args.no_index:  # as `hetgraph index build` with its defaults (layout by size)
        index = build_index(
            store,
            Path(args.out) / INDEX_DIR,
            IndexConfig(num_threads=args.threads),
            distributed=ctx,
        )
        if ctx.is_main:
            print(f"index: {index}" + (" (lists on disk)" if index.on_disk else ""))
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from hetgraph.datastore import Datastore
    from hetgraph.distributed import init_distributed
    from hetgraph.index import build_index

    config = index_config_from_args(args)
    ctx = init_distributed()  # under torchrun an on-disk build is shard-parallel
    store = Datastore.open(args.datastore)
    index = build_index(store, Path(args.datastore) / INDEX_DIR, config, distributed=ctx)
    if ctx.is_main:
        print(
            f"index: {index} saved in {Path(args.datastore) / INDEX_DIR}"
            + (" (lists on disk)" if index.on_disk else "")
        )
    return 0


def _training_settings(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The run config's fusion / training / evaluation sections with the options applied
    (each checked here, before any model is loaded)."""
    from hetgraph.configuration import ConfigError
    from hetgraph.fusion import FusionConfig
    from hetgraph.pipeline import apply_preset
    from hetgraph.training import TrainingConfig

    run = _run_config(args.config)
    if args.preset is not None:
        run = apply_preset(run, args.preset)
    fusion, training = run.fusion.to_dict(), run.training.to_dict()
    for name in ("left", "right"):
        if getattr(args, name) is not None:
            fusion["graph"][name] = getattr(args, name)
    if args.init_from is not None:
        if not (args.init_from / ADAPTER_CONFIG).is_file():
            raise CommandLineError(
                f"--init-from {args.init_from} holds no trained adapter "
                f"({ADAPTER_CONFIG} missing); give the --out directory of "
                "the stage-1 `hetgraph train`"
            )
        training["init_from"] = str(args.init_from)
    if args.fusion_layers is not None:
        fusion["fusion_layers"] = list(args.fusion_layers)  # parsed by FusionConfig
    for name in ("k", "gate", "gradient_checkpointing", "neighbours"):
        if getattr(args, name) is not None:
            fusion[name] = getattr(args, name)
    for name in ("max_steps", "lr", "seed", "mixed_precision"):
        if getattr(args, name) is not None:
            training[name] = getattr(args, name)
    apply_kg_settings(args, fusion)
    try:
        return FusionConfig.from_dict(fusion), TrainingConfig.from_dict(training), run.evaluation
    except ConfigError as error:
        raise ConfigError(f"option or --config value: {error}", error.key) from None


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from hetgraph.distributed import init_distributed
    from hetgraph.fusion import HetGraphLM
    from hetgraph.pipeline import check_corpus_provenance
    from hetgraph.training import train_adapter

    fusion, training, evaluation = _training_settings(args)
    check_kg_options(args)
    check_output_directory(args.out, "--out", "adapter")
    ctx = init_distributed()  # under torchrun: DDP; rank 0 writes and reports
    model, tokenizer = _load(args)
    corpus = _corpus(args, tokenizer)
    store, index = _open_store(args.datastore, model, tokenizer, args.encoder)
    check_corpus_provenance(store, corpus, command="train")
    _check_k(fusion.k, store, "--k")
    rows = len(store) + 1
    train_split = corpus.train.truncate(
        rows if args.max_tokens is None else min(rows, args.max_tokens)
    )
    torch.manual_seed(training.seed)  # the adapter's initialisation is part of the run
    knowledge = open_knowledge(args, tokenizer)
    lm = HetGraphLM(model, store, index, fusion, tokenizer=tokenizer, knowledge=knowledge)
    if args.control == "lora":
        return _train_lora_control(
            lm, tokenizer, train_split, corpus.valid, training, evaluation, args.out
        )
    result = train_adapter(
        lm, train_split, corpus.valid, training, args.out, eval_config=evaluation
    )
    if not ctx.is_main:
        return 0
    print(
        json.dumps(
            {
                "steps": result.steps,
                "best_step": result.best_step,
                "best_valid_ppl": result.best_valid_ppl,
                "adapter": str(args.out),
            },
            indent=2,
        )
    )
    return 0


def _train_lora_control(
    lm: Any,
    tokenizer: Any,
    train_split: Any,
    valid_split: Any,
    training: Any,
    evaluation: Any,
    out: Path,
) -> int:
    """``train --control lora``: a LoRA of the graph adapter's size (``lm``'s, untrained)
    on the same tokens and schedule."""
    from hetgraph.distributed import require_single_process
    from hetgraph.training.lora import (
        LoraControlConfig,
        graph_adapter_parameters,
        train_lora_control,
    )

    require_single_process("train --control lora")
    target = graph_adapter_parameters(lm)
    result = train_lora_control(
        lm.model,
        tokenizer,
        train_split,
        valid_split,
        training,
        LoraControlConfig(),
        out,
        target_params=target,
        sites=lm.config.fusion_layers,
        eval_config=evaluation,
    )
    print(
        json.dumps(
            {
                "control": "lora",
                "steps": result.steps,
                "best_step": result.best_step,
                "best_valid_ppl": result.best_valid_ppl,
                "rank": result.rank,
                "trained_parameters": result.trained_params,
                "graph_adapter_parameters": target,
                "tokens": result.tokens,
                "out": str(out),
            },
            indent=2,
        )
    )
    return 0


def _eval_adapters(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(graph adapter, LoRA control)`` directories of ``eval``: ``--adapter`` may name
    either; ``--control`` names a control beside a graph adapter."""
    from hetgraph.training.lora import is_lora_control

    adapter, control = args.adapter, args.control
    if adapter is not None and is_lora_control(adapter):
        if control is not None:
            raise CommandLineError(
                f"--adapter {adapter} is a LoRA control and --control gives "
                "another; give the graph adapter as --adapter"
            )
        return None, adapter
    if control is not None and not is_lora_control(control):
        raise CommandLineError(
            f"--control {control} holds no LoRA control; give the --out "
            "directory of `hetgraph train --control lora`"
        )
    return adapter, control


def cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hetgraph.distributed import init_distributed
    from hetgraph.evaluation import evaluate_four_way, plot_results, results_table
    from hetgraph.fusion.model_card import record_evaluation_in_card
    from hetgraph.pipeline import check_corpus_provenance

    plot_format = _check_eval_outputs(args)  # before any work: results are never lost
    adapter, control_dir = _eval_adapters(args)
    evaluation = _run_config(args.config).evaluation
    for name, option in (
        ("k", "k"),
        ("neighbour_states", "neighbour_states"),
        ("sample", "sample"),
        ("sample_seed", "sample_seed"),
        ("bootstrap_resamples", "bootstrap_resamples"),
    ):
        if getattr(args, option) is not None:
            evaluation = replace(evaluation, **{name: getattr(args, option)})
    for name, option in (("max_tokens", "max_tokens"), ("valid_tokens", "tune_tokens")):
        if hasattr(args, option):  # given: a number, or None for 'all'
            evaluation = replace(evaluation, **{name: getattr(args, option)})
    evaluation = kg_evaluation(args, evaluation)
    check_kg_options(args, adapter)
    ctx = init_distributed()  # under torchrun the windows are shared; rank 0 reports
    model, tokenizer = _load(args)
    corpus = _corpus(args, tokenizer)
    store, index = _open_store(args.datastore, model, tokenizer, args.encoder)
    provenance = check_corpus_provenance(
        store, corpus, command="eval", allow_other_corpus=args.allow_other_corpus
    )
    _check_k(evaluation.k, store, "--k")
    lm = _hetgraph_lm(adapter, model, tokenizer, store, index, open_knowledge(args, tokenizer))
    control = None
    if control_dir is not None:
        from hetgraph.training.lora import load_lora_control

        control = load_lora_control(control_dir, model, tokenizer)
    results = evaluate_four_way(
        lm,
        corpus.valid,
        corpus.split(args.split),
        evaluation,
        include_gnn=adapter is not None,
        per_token=args.per_token,
        control=control,
        rekeyed=args.rekeyed,
    ).to_dict()
    results["provenance"] = provenance
    if not ctx.is_main:
        return 0
    print(results_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, results)
    if args.plot is not None:
        plot_results(results, args.plot, format=plot_format)
    _record_knn_tuning(adapter, store, results)
    record_evaluation_in_card(adapter, results, split=args.split)  # its README.md
    return 0


def _check_eval_outputs(args: argparse.Namespace) -> str | None:
    """Check ``eval``'s ``--json`` and ``--plot`` before anything runs; the plot's format."""
    inputs = (args.config, args.corpus_config, Path(args.corpus) if args.corpus else None)
    outputs = [
        (path, option)
        for path, option in (
            (args.json, "--json"),
            (args.per_token, "--per-token"),
            (args.plot, "--plot"),
        )
        if path is not None
    ]
    for path, option in outputs:
        check_output_file(path, option, inputs)
    if len({os.path.abspath(path) for path, _ in outputs}) < len(outputs):
        raise CommandLineError(
            f"{', '.join(option for _, option in outputs)} name the same file; give each its own"
        )
    if args.plot is None:
        return None
    return check_plot_path(args.plot)


def _adapter_identity(adapter: str | None) -> str | None:
    # The adapter_config.json bytes: it records the weights' checksum, so a retrained adapter
    # in the same directory has another identity and its old tuning is not used.
    from hetgraph.io import sha256_hex

    return None if adapter is None else sha256_hex((Path(adapter) / ADAPTER_CONFIG).read_bytes())


def _record_knn_tuning(adapter: str | None, store: Any, results: dict[str, Any]) -> None:
    """Leave the tuned λ / T where ``generate --knn`` finds them: the base LM's in the
    datastore directory, GNN-LM's in the adapter directory. Only a convenience, so a
    directory that cannot be written (a shared, read-only datastore) is a warning."""
    from hetgraph.knnlm import write_knn_tuning

    targets = [(store.path, results["knn"], None)]
    if adapter is not None and "gnn_knn" in results:
        targets.append((Path(adapter), results["gnn_knn"], adapter))
    for directory, row, tuned_for in targets:
        try:
            identity = {"datastore": store.fingerprint, "adapter": _adapter_identity(tuned_for)}
            path = write_knn_tuning(directory, row, identity)
            logger.info(
                "recorded λ %.2f, T %.3g in %s (for `hetgraph generate --knn`)",
                row["lambda"],
                row["temperature"],
                path,
            )
        except (OSError, HetgraphError) as error:
            logger.warning(
                "could not record the tuned λ and T in %s (%s); give "
                "`generate --knn` --lambda %.2f --temperature %.3g",
                directory,
                error,
                row["lambda"],
                row["temperature"],
            )


def _knn_settings(args: argparse.Namespace, lm: Any) -> tuple[float, float]:
    """λ and T of ``generate --knn``: the options, else the adapter's fusion config, else
    what the last ``hetgraph eval`` of this adapter (or datastore) tuned."""
    from hetgraph.knnlm import read_knn_tuning

    lam = args.knn_lambda if args.knn_lambda is not None else lm.config.knn_lambda
    temperature = (
        args.knn_temperature if args.knn_temperature is not None else lm.config.knn_temperature
    )
    if lam is not None and temperature is not None:
        return float(lam), float(temperature)
    directory = Path(args.adapter) if args.adapter else Path(lm.engine.datastore.path)
    tuned = read_knn_tuning(
        directory,
        {"datastore": lm.engine.datastore.fingerprint, "adapter": _adapter_identity(args.adapter)},
    )
    if tuned is None:
        adapter = f" --adapter {args.adapter}" if args.adapter else ""
        raise CommandLineError(
            f"generate --knn needs the kNN-LM λ and temperature, and none are recorded for "
            f"{'adapter ' + args.adapter if args.adapter else 'datastore ' + args.datastore}; "
            f"run `hetgraph eval --datastore {args.datastore}{adapter}` first (it tunes and "
            "records them), or give --lambda and --temperature"
        )
    lam = tuned["lambda"] if lam is None else lam
    temperature = tuned["temperature"] if temperature is None else temperature
    logger.info("kNN-LM λ %.2f, T %.3g (tuned by `hetgraph eval`, %s)", lam, temperature, directory)
    return float(lam), float(temperature)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hetgraph.inspection import describe_generation

    if not args.knn and (args.knn_lambda is not None or args.knn_temperature is not None):
        raise CommandLineError(
            "--lambda and --temperature set the kNN-LM mixture; add --knn "
            "to use it, or leave them out"
        )
    lm, model, tokenizer = _lm_for_text(
        args, args.prompt, "--prompt", "continue", new_tokens=args.max_new_tokens
    )
    mixture = _knn_settings(args, lm) if args.knn else (None, None)
    device = next(model.parameters()).device
    prompt = tokenizer(args.prompt, return_tensors="pt").to(device)
    if prompt["input_ids"].shape[1] == 0:
        raise CommandLineError("--prompt gives no tokens; give some text to continue")
    generated = lm.generate(
        **prompt,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        knn=args.knn,
        knn_lambda=mixture[0],
        knn_temperature=mixture[1],
    )
    new_tokens = generated[0, prompt["input_ids"].shape[1] :]
    print(args.prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))
    if args.show_neighbours:
        with torch.no_grad():
            print(
                describe_generation(
                    lm.model,
                    lm.engine,
                    tokenizer,
                    generated[0],
                    prompt["input_ids"].shape[1],
                    args.neighbours,
                )
            )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from hetgraph.inspection import format_report, inspect_position

    lm, _, tokenizer = _lm_for_text(args, args.text, "--text", "inspect", special_tokens=False)
    report = inspect_position(
        lm.model, lm.engine, tokenizer, args.text, args.position, args.neighbours
    )
    print(
        json.dumps(report.to_dict(), indent=2, ensure_ascii=False)
        if args.json
        else format_report(report)
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Full integrity check; prints the report, exit status 2 when something is damaged."""
    from hetgraph.verify import verify

    report = verify(args.path)
    print(report)
    return 0 if report.ok else 2
