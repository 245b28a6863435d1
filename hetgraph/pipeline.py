"""The main job, end to end: datastore → index → adapter training → four-way evaluation.

Every step writes its result under one run directory and is skipped (or resumed) when
run again, so an interrupted job continues where it stopped. The settings are one
JSON file (:class:`RunConfig`); ``hetgraph demo --print-config`` prints the default.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetgraph.configuration import JSONConfigMixin
from hetgraph.corpus import CorpusConfig, TokenizedCorpus, tokenize_corpus
from hetgraph.datastore import Datastore, DatastoreConfig, build_datastore
from hetgraph.evaluation import EvalConfig, evaluate_four_way, plot_results, results_table
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.index import DatastoreIndex, IndexConfig, auto_factory
from hetgraph.models.loading import load_model
from hetgraph.training import TrainingConfig, train_adapter

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.json"


@dataclass
class RunConfig(JSONConfigMixin):
    """Settings of the main job; each section is the keyword arguments of that stage's config.

    Args:
        model: model directory, GGUF file, or ``None`` for the embedded SmolLM2-135M.
        corpus: :class:`~hetgraph.corpus.CorpusConfig` (``path: null`` = embedded Python docs).
        datastore: :class:`~hetgraph.datastore.DatastoreConfig`.
        index: :class:`~hetgraph.index.IndexConfig`.
        fusion: :class:`~hetgraph.fusion.FusionConfig`.
        training: :class:`~hetgraph.training.TrainingConfig`.
        evaluation: :class:`~hetgraph.evaluation.EvalConfig`.
        out_dir: run directory (datastore, index, adapter, results).
        threads: torch / FAISS threads (``None``: leave the libraries' defaults).
        device: ``"cpu"``, ``"cuda"``… (``None``: CUDA when available).
    """

    model: str | None = None
    corpus: dict[str, Any] = field(default_factory=dict)
    datastore: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)
    fusion: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    out_dir: str = "runs/demo"
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        # Fail on a typo now, not after a 10-minute datastore build.
        self.corpus_config()
        self.datastore_config()
        self.index_config()
        self.fusion_config()
        self.training_config()
        self.evaluation_config()

    def corpus_config(self) -> CorpusConfig:
        """The corpus section as a :class:`~hetgraph.corpus.CorpusConfig`."""
        return CorpusConfig.from_dict(self.corpus)

    def datastore_config(self) -> DatastoreConfig:
        """The datastore section as a :class:`~hetgraph.datastore.DatastoreConfig`."""
        return DatastoreConfig.from_dict(self.datastore)

    def index_config(self) -> IndexConfig:
        """The index section as an :class:`~hetgraph.index.IndexConfig`."""
        return IndexConfig.from_dict(self.index)

    def fusion_config(self) -> FusionConfig:
        """The fusion section as a :class:`~hetgraph.fusion.FusionConfig`."""
        return FusionConfig.from_dict(self.fusion)

    def training_config(self) -> TrainingConfig:
        """The training section as a :class:`~hetgraph.training.TrainingConfig`."""
        return TrainingConfig.from_dict(self.training)

    def evaluation_config(self) -> EvalConfig:
        """The evaluation section as an :class:`~hetgraph.evaluation.EvalConfig`."""
        return EvalConfig.from_dict(self.evaluation)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "RunConfig":
        """Read a run config JSON file, with a clear error if it is missing or malformed."""
        try:
            return super().from_json_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} not found; `hetgraph demo --print-config > {path}` "
                                    "writes the default one") from None
        except ValueError as error:
            raise ValueError(f"{error}; fix it or start again from `hetgraph demo --print-config`") from None

    @classmethod
    def default(cls) -> "RunConfig":
        """The embedded demo configuration (``hetgraph/configs/demo.json``)."""
        return cls.from_json_file(DEFAULT_CONFIG)


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` means CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> None:
    """Set torch and FAISS threads deliberately (both spawn their own pools)."""
    if threads is None:
        return
    from hetgraph.index import set_faiss_threads

    torch.set_num_threads(threads)
    set_faiss_threads(threads)


def _log(message: str) -> None:
    print(f"[hetgraph] {message}", flush=True)


def prepare_datastore(model: Any, tokenizer: Any, corpus: TokenizedCorpus, config: RunConfig,
                      out_dir: Path) -> tuple[Datastore, DatastoreIndex]:
    """Build (or resume, or reuse) the datastore and its index under ``out_dir``."""
    datastore_dir = out_dir / "datastore"
    ds_config = config.datastore_config()
    store = build_datastore(model, tokenizer, corpus.train, datastore_dir, ds_config,
                            corpus_fingerprint=corpus.fingerprint)
    index_dir = datastore_dir / "index"
    index_config = config.index_config()
    wanted = (auto_factory(len(store), store.dim) if index_config.factory == "auto"
              else index_config.factory)
    index = None
    if (index_dir / "index.json").is_file():
        index = DatastoreIndex.load(index_dir, store, config=index_config)
        if index.factory != wanted or index.metric != index_config.metric:
            _log(f"the saved index is {index.factory} ({index.metric}); rebuilding as {wanted}")
            index = None
        else:
            _log(f"reusing index {index}")
    if index is None:
        index = DatastoreIndex.build(store, index_config)
        index.save(index_dir)
    return store, index


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    """Run the whole job and return the four-way results (also written to ``out_dir``)."""
    started = time.perf_counter()
    set_threads(config.threads)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    device = resolve_device(config.device)

    _log(f"loading model {config.model or 'embedded SmolLM2-135M'} on {device}")
    model, tokenizer = load_model(config.model, device=device)
    _log("reading and tokenizing the corpus")
    corpus = tokenize_corpus(config.corpus_config(), tokenizer)
    _log(f"corpus: {corpus}")

    _log("datastore and index")
    store, index = prepare_datastore(model, tokenizer, corpus, config, out_dir)
    train_split = corpus.train.truncate(len(store) + 1)

    adapter_dir = out_dir / "adapter"
    lm = HetGraphLM(model, store, index, config.fusion_config(), tokenizer=tokenizer)
    evaluation = config.evaluation_config()
    if (adapter_dir / "training.json").is_file():
        _log(f"reusing trained adapter {adapter_dir}")
        lm = HetGraphLM.from_pretrained(adapter_dir, model, store, index, tokenizer=tokenizer)
    else:
        _log(f"training the graph adapter ({sum(p.numel() for p in lm.parameters()):,} parameters)")
        from functools import partial

        from hetgraph.evaluation import model_perplexity

        valid = corpus.valid
        train_adapter(lm, train_split, valid, config.training_config(), adapter_dir,
                      evaluate=partial(model_perplexity, context_length=evaluation.context_length,
                                       stride=evaluation.stride, batch_size=evaluation.batch_size))

    _log("evaluating base, kNN-LM, GNN-LM and GNN-LM + kNN on the same test tokens")
    results = evaluate_four_way(lm, corpus.valid, corpus.test, evaluation)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = results_table(results)
    (out_dir / "results.md").write_text(table + "\n")
    plot_results(results, out_dir / "results.png")
    print(table)
    _log(f"results in {out_dir}/results.json, table in results.md, plot in results.png "
         f"({results['seconds']:.0f} s)")
    return results
