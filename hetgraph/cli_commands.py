"""The commands behind the ``hetgraph`` command line (:mod:`hetgraph.cli` builds the parser)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hetgraph.io import INDEX_DIR, INDEX_FILE, atomic_write_json


# ----------------------------------------------------------------------------- helpers
def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from hetgraph.models.loading import load_model
    from hetgraph.pipeline import resolve_device, set_threads

    set_threads(args.threads)
    return load_model(args.model, device=resolve_device(args.device),
                      dtype=getattr(torch, args.dtype))


def _corpus(args: argparse.Namespace, tokenizer: Any):
    from hetgraph.corpus import CorpusConfig, tokenize_corpus

    data: dict[str, Any] = {}
    if args.corpus_config is not None:
        data = json.loads(Path(args.corpus_config).read_text())
    if args.corpus is not None:
        data["path"] = args.corpus
    if args.text_field != "text":
        data["text_field"] = args.text_field
    return tokenize_corpus(CorpusConfig.from_dict(data), tokenizer)


def _open_store(path: str, model: Any, tokenizer: Any):
    from hetgraph.datastore import Datastore
    from hetgraph.index import DatastoreIndex

    store = Datastore.open(path, model=model, tokenizer=tokenizer)
    index_dir = Path(path) / INDEX_DIR
    if not (index_dir / INDEX_FILE).is_file():
        raise SystemExit(
            f"error: {path} has no index yet; run `hetgraph index build --datastore {path}`")
    return store, DatastoreIndex.load(index_dir, store)


def _run_config(path: Path | None):
    from hetgraph.pipeline import RunConfig

    return RunConfig.from_json_file(path) if path is not None else RunConfig.default()


def _hetgraph_lm(args: argparse.Namespace, model: Any, tokenizer: Any, store: Any, index: Any):
    from hetgraph.fusion import FusionConfig, HetGraphLM

    if args.adapter:
        return HetGraphLM.from_pretrained(args.adapter, model, store, index, tokenizer=tokenizer)
    return HetGraphLM(model, store, index, FusionConfig(), tokenizer=tokenizer)


# ---------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    from hetgraph.evaluation import results_table
    from hetgraph.pipeline import DEFAULT_CONFIG, run_pipeline

    if args.print_config:
        print(DEFAULT_CONFIG.read_text(), end="")
        return 0
    config = _run_config(args.config)
    if args.out is not None:
        config.out_dir = args.out
    print(results_table(run_pipeline(config)))
    return 0


def cmd_datastore_build(args: argparse.Namespace) -> int:
    from hetgraph.datastore import DatastoreConfig, build_datastore
    from hetgraph.index import DatastoreIndex, IndexConfig

    model, tokenizer = _load(args)
    corpus = _corpus(args, tokenizer)
    config = DatastoreConfig(context_length=args.context_length, stride=args.stride,
                             batch_size=args.batch_size, key_layer=args.layer,
                             feature_layers=tuple(args.feature_layers), max_tokens=args.max_tokens)
    store = build_datastore(model, tokenizer, corpus.train, args.out, config,
                            corpus_fingerprint=corpus.fingerprint, overwrite=args.overwrite)
    print(f"datastore: {store}")
    if not args.no_index:
        index = DatastoreIndex.build(store, IndexConfig(num_threads=args.threads))
        index.save(Path(args.out) / INDEX_DIR)
        print(f"index: {index}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from hetgraph.datastore import Datastore
    from hetgraph.index import DatastoreIndex, IndexConfig

    store = Datastore.open(args.datastore)
    index = DatastoreIndex.build(store, IndexConfig(factory=args.factory, metric=args.metric,
                                                    num_threads=args.threads))
    index.save(Path(args.datastore) / INDEX_DIR)
    print(f"index: {index} saved in {Path(args.datastore) / 'index'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hetgraph.fusion import HetGraphLM
    from hetgraph.training import train_adapter

    run = _run_config(args.config)
    fusion, training = run.fusion, run.training
    if args.fusion_layers is not None:
        sites = tuple(s if s == "head" else int(s) for s in args.fusion_layers)
        fusion = replace(fusion, fusion_layers=sites)
    if args.k is not None:
        fusion = replace(fusion, k=args.k)
    for name in ("max_steps", "lr", "seed"):
        if getattr(args, name) is not None:
            training = replace(training, **{name: getattr(args, name)})
    evaluation = run.evaluation
    model, tokenizer = _load(args)
    corpus = _corpus(args, tokenizer)
    store, index = _open_store(args.datastore, model, tokenizer)
    train_split = corpus.train.truncate(min(len(store) + 1, args.max_tokens or len(store) + 1))
    lm = HetGraphLM(model, store, index, fusion, tokenizer=tokenizer)
    result = train_adapter(lm, train_split, corpus.valid, training, args.out,
                           eval_config=evaluation)
    print(json.dumps({"steps": result.steps, "best_step": result.best_step,
                      "best_valid_ppl": result.best_valid_ppl, "adapter": str(args.out)}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from hetgraph.evaluation import evaluate_four_way, plot_results, results_table

    run = _run_config(args.config)
    evaluation = run.evaluation
    if args.k is not None:
        evaluation = replace(evaluation, k=args.k)
    if args.max_tokens is not None:
        evaluation = replace(evaluation, max_tokens=args.max_tokens)
    if args.tune_tokens is not None:
        evaluation = replace(evaluation, valid_tokens=args.tune_tokens)
    model, tokenizer = _load(args)
    corpus = _corpus(args, tokenizer)
    store, index = _open_store(args.datastore, model, tokenizer)
    lm = _hetgraph_lm(args, model, tokenizer, store, index)
    eval_split = corpus.split(args.split)
    results = evaluate_four_way(lm, corpus.valid, eval_split, evaluation,
                                include_gnn=args.adapter is not None)
    print(results_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, results)
    if args.plot is not None:
        plot_results(results, args.plot)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from hetgraph.inspection import describe_generation

    model, tokenizer = _load(args)
    store, index = _open_store(args.datastore, model, tokenizer)
    lm = _hetgraph_lm(args, model, tokenizer, store, index)
    device = next(model.parameters()).device
    prompt = tokenizer(args.prompt, return_tensors="pt").to(device)
    generated = lm.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, knn=args.knn)
    new_tokens = generated[0, prompt["input_ids"].shape[1]:]
    print(args.prompt + tokenizer.decode(new_tokens, skip_special_tokens=True))
    if args.show_neighbours:
        with torch.no_grad():
            print(describe_generation(lm, tokenizer, generated[0], prompt["input_ids"].shape[1],
                                      args.neighbours))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from hetgraph.inspection import format_report, inspect_position

    model, tokenizer = _load(args)
    store, index = _open_store(args.datastore, model, tokenizer)
    lm = _hetgraph_lm(args, model, tokenizer, store, index)
    report = inspect_position(lm, tokenizer, args.text, args.position, args.neighbours)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json
          else format_report(report))
    return 0
