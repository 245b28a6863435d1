"""The main job, end to end: datastore → index → adapter training → four-way evaluation.

Every step writes its result under one run directory and is skipped (or resumed) when
run again, so an interrupted job continues where it stopped. The settings are one
JSON file (:class:`RunConfig`); ``hetgraph demo --print-config`` prints the default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetgraph.configuration import ConfigError, JSONConfigMixin
from hetgraph.corpus import CorpusConfig, TokenizedCorpus, tokenize_corpus
from hetgraph.datastore import Datastore, DatastoreConfig, build_datastore
from hetgraph.datastore.capture import split_arrays
from hetgraph.errors import HetgraphError
from hetgraph.evaluation import EvalConfig, evaluate_four_way, plot_results, results_table
from hetgraph.fusion import FusionConfig, HetGraphLM
from hetgraph.fusion.model_card import record_evaluation_in_card
from hetgraph.fusion.persistence import read_adapter_config
from hetgraph.index import DatastoreIndex, IndexConfig, build_index, choose_layout
from hetgraph.io import (
    INDEX_DIR,
    INDEX_METADATA,
    RUN_ADAPTER_DIR,
    RUN_CONFIG,
    RUN_DATASTORE_DIR,
    RUN_RESULTS,
    RUN_RESULTS_MARKDOWN,
    RUN_RESULTS_PLOT,
    TRAINING_RESULT,
    atomic_write_json,
    atomic_write_text,
    read_json,
)
from hetgraph.locking import directory_lock
from hetgraph.models.fingerprint import array_fingerprint
from hetgraph.models.loading import load_model
from hetgraph.training import TrainingConfig, train_adapter

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.json"

#: Names accepted by ``--preset`` (:func:`apply_preset`): ``"default"`` is the embedded demo's
#: fusion section, ``"paper"`` :meth:`FusionConfig.paper() <hetgraph.FusionConfig.paper>`.
FUSION_PRESETS = ("default", "paper")


class ProvenanceError(HetgraphError):
    """A datastore was built from another corpus (other files or other split settings) than
    the one a command was given."""


@dataclass
class RunConfig(JSONConfigMixin):
    r"""Settings of the main job: one typed section per stage, each written in JSON as an object
    of that stage's config's fields (missing fields take their defaults).

    Every key is checked when the config is built, at any depth, so a typo fails at once
    (not after a 10-minute datastore build) with its dotted path and the valid keys:
    ``ConfigError: unknown key 'fusion.graph.lefft'; valid keys of GraphConfig: c2c, …``.

    Args:
        model: model directory, GGUF file, or ``None`` for the embedded SmolLM2-135M.
        corpus: the :class:`~hetgraph.corpus.CorpusConfig` (``path: null`` = embedded Python docs).
        datastore: the :class:`~hetgraph.datastore.DatastoreConfig`.
        index: the :class:`~hetgraph.index.IndexConfig`.
        fusion: the :class:`~hetgraph.fusion.FusionConfig` (with its ``graph`` and ``adapter``).
        training: the :class:`~hetgraph.training.TrainingConfig`.
        evaluation: the :class:`~hetgraph.evaluation.EvalConfig`.
        out_dir: run directory (datastore, index, adapter, results).
        threads: torch / FAISS threads (``None``: leave the libraries' defaults).
        device: ``"cpu"``, ``"cuda"``… (``None``: CUDA when available).
    """

    model: str | None = None
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs/demo"
    threads: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()  # sections given as dicts are built (and checked) here
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")

    @classmethod
    def from_json_file(cls, path: str | Path) -> RunConfig:
        """Read a run config JSON file, with a clear error if it is missing or malformed."""
        try:
            return super().from_json_file(path)
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} not found; "
                f"`hetgraph demo --print-config > {path}` "
                "writes the default one"
            ) from None
        except ValueError as error:
            raise ConfigError(
                f"{error}; fix it or start again from `hetgraph demo --print-config`"
            ) from None

    @classmethod
    def default(cls) -> RunConfig:
        """The embedded demo configuration (``hetgraph/configs/demo.json``)."""
        return cls.from_json_file(DEFAULT_CONFIG)


def apply_preset(config: RunConfig, preset: str) -> RunConfig:
    """``config`` with its fusion section replaced by a named preset (its other sections kept).

    ``"paper"`` selects :meth:`FusionConfig.paper() <hetgraph.FusionConfig.paper>`: the
    official GNN-LM model function (replace-mode fusion at the head, k = 32, l = r = 1, causal
    ``c2c``, 3 layers × 8 heads at the model's width, dropout 0.3 / 0.1, official maps,
    relations, mean, neighbour features, leakage and initialisation). Only the model is
    the paper's: the training section is left as it is, because the official optimisation
    (Adam lr 2e-5, clip-norm 0.1, inverse-sqrt, ~10^5 updates on GPUs) is set for a budget
    far larger than a CPU run's; give it through ``training`` when wanted. ``"default"``
    selects the embedded demo's fusion section.

    Raises:
        ConfigError: ``preset`` is not one of :data:`FUSION_PRESETS`.
    """
    if preset == "paper":
        fusion = FusionConfig.paper()
    elif preset == "default":
        fusion = RunConfig.default().fusion
    else:
        raise ConfigError(
            f"unknown preset {preset!r}; choose one of {', '.join(FUSION_PRESETS)}", "preset"
        )
    return dataclasses.replace(config, fusion=fusion)


class RunDirectoryError(HetgraphError):
    """A run directory holds the results of another configuration."""


class DeviceError(HetgraphError):
    """A ``--device`` (or config ``device``) that names no device this machine has."""


def resolve_device(device: str | None, option: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device`; ``None`` means CUDA when available, else CPU.

    Checked before any model is loaded: a name torch does not know, CUDA on a machine (or a
    torch build) without it, a CUDA index beyond the devices present, or a device type
    this machine lacks.

    Raises:
        DeviceError: one line naming ``option`` and the devices that exist.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(
            f"{option} {device!r} is not a device name; give cpu, cuda or "
            "cuda:N (or leave it out: CUDA when available, else CPU)"
        ) from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(
                f"{option} {device}: this machine has no usable CUDA device (or "
                "torch was built without CUDA); use --device cpu or leave it out"
            )
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(
                f"{option} {device}: this machine has {count} CUDA device(s), "
                f"cuda:0 … cuda:{count - 1}; choose one of them"
            )
        return parsed
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return parsed
    raise DeviceError(
        f"{option} {device}: {parsed.type} devices are not available on this "
        "machine; use cpu or cuda"
    )


def set_threads(threads: int | None, option: str = "--threads") -> None:
    """Set torch and FAISS threads deliberately (both spawn their own pools).

    Raises:
        ConfigError: ``threads`` is above the machine's CPU count (each thread is an OS
            thread: an absurd count exhausts the machine instead of speeding anything up).
    """
    if threads is None:
        return
    cpus = os.cpu_count() or 1
    if not 1 <= threads <= cpus:
        raise ConfigError(
            f"{option} is {threads}; give 1 to {cpus} (the CPUs of this machine)", option
        )
    from hetgraph.index import set_faiss_threads

    torch.set_num_threads(threads)
    set_faiss_threads(threads)


def check_corpus_provenance(
    store: Datastore, corpus: TokenizedCorpus, *, command: str, allow_other_corpus: bool = False
) -> dict[str, Any]:
    """Check that ``corpus`` (its files *and* split settings) is the one ``store`` was built
    from, and return the provenance record that evaluation results keep.

    The datastore records the fingerprint of the tokenized corpus it was built from
    (:attr:`TokenizedCorpus.fingerprint`: every split's tokens, documents and the tokenizer;
    another split seed or fraction moves documents between splits and changes it). A store
    built through the Python API without one records a hash of its train-split arrays
    instead; both are accepted.

    Args:
        store: the datastore.
        corpus: the corpus the command was given.
        command: ``"train"`` or ``"eval"``, for the message.
        allow_other_corpus: accept another corpus (deliberate cross-corpus evaluation).

    Returns:
        ``{"datastore_corpus", "eval_corpus", "same_corpus", "allow_other_corpus"}``.

    Raises:
        ProvenanceError: the corpora differ and ``allow_other_corpus`` is false.
    """
    recorded = store.metadata.corpus_fingerprint
    same = recorded == corpus.fingerprint
    if not same:
        tokens, doc_ids, _ = split_arrays(corpus.train, store.metadata.max_tokens)
        same = recorded == array_fingerprint(tokens, doc_ids)
    record = {
        "datastore_corpus": recorded,
        "eval_corpus": corpus.fingerprint,
        "same_corpus": same,
        "allow_other_corpus": bool(allow_other_corpus),
    }
    if same:
        return record
    if allow_other_corpus:
        logger.warning(
            "datastore %s was built from another corpus (%s, this one %s); "
            "evaluating anyway (--allow-other-corpus)",
            store.path,
            recorded,
            corpus.fingerprint,
        )
        return record
    way_out = (
        " or pass --allow-other-corpus for a deliberate cross-corpus evaluation"
        if command == "eval"
        else ""
    )
    raise ProvenanceError(
        f"datastore {store.path} was built from another corpus or split (corpus fingerprint "
        f"{recorded}; --corpus / --corpus-config give {corpus.fingerprint}): pass the same "
        f"--corpus and --corpus-config as `hetgraph datastore build`, rebuild the datastore "
        f"from this corpus{',' if way_out else ''}{way_out}"
    )


def prepare_datastore(
    model: Any, tokenizer: Any, corpus: TokenizedCorpus, config: RunConfig, out_dir: Path
) -> tuple[Datastore, DatastoreIndex]:
    """Build (or resume, or reuse) the datastore and its index under ``out_dir``."""
    datastore_dir = out_dir / RUN_DATASTORE_DIR
    store = build_datastore(
        model,
        tokenizer,
        corpus.train,
        datastore_dir,
        config.datastore,
        corpus_fingerprint=corpus.fingerprint,
    )
    index_dir = datastore_dir / INDEX_DIR
    index_config = config.index
    index = None
    if (index_dir / INDEX_METADATA).is_file():
        index = DatastoreIndex.load(index_dir, store, config=index_config)
        # The layout `hetgraph index build` would choose (index.on_disk, else the size rule);
        # left to the rule, a saved index keeps its layout: the memory free at this moment
        # must not decide a rebuild.
        layout = (
            index_config
            if index_config.on_disk is not None
            else dataclasses.replace(index_config, on_disk=index.on_disk)
        )
        wanted, on_disk = choose_layout(len(store), store.dim, layout)
        if (index.factory, index.metric, index.on_disk) != (wanted, index_config.metric, on_disk):
            logger.info(
                "the saved index is %s (%s%s); rebuilding as %s",
                index.factory,
                index.metric,
                ", on disk" if index.on_disk else "",
                wanted,
            )
            index = None
        else:
            logger.info("reusing index %s", index)
    if index is None:
        index = build_index(store, index_dir, index_config)
    return store, index


def peak_resident_memory_mb() -> float:
    """This process's peak resident memory so far, in MiB (``getrusage``; 0 where the
    platform has no ``resource`` module)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes there, KiB here


def run_pipeline(config: RunConfig) -> dict[str, Any]:
    """Run the whole job and return the four-way results (also written to ``out_dir``:
    ``results.json``, the table ``results.md`` and the plot ``results.png``).

    The run directory is locked (:func:`hetgraph.locking.directory_lock`) while the job runs,
    so a second job on the same ``out_dir`` is refused instead of racing.
    """
    out_dir = Path(config.out_dir)
    with directory_lock(out_dir, "run directory"):
        return _run_locked(config, out_dir)


def _run_locked(config: RunConfig, out_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    set_threads(config.threads, "config threads")
    device = resolve_device(config.device, "config device")  # before anything is written
    atomic_write_json(out_dir / RUN_CONFIG, config.to_dict())

    # Peak resident memory after each stage (a running maximum: a stage's own peak is
    # where the figure grows).
    memory: dict[str, float] = {}
    logger.info("loading model %s on %s", config.model or "embedded SmolLM2-135M", device)
    model, tokenizer = load_model(config.model, device=device)
    memory["model"] = peak_resident_memory_mb()
    logger.info("reading and tokenizing the corpus")
    corpus = tokenize_corpus(config.corpus, tokenizer)
    logger.info("corpus: %s", corpus)
    memory["corpus"] = peak_resident_memory_mb()

    logger.info("datastore and index")
    store, index = prepare_datastore(model, tokenizer, corpus, config, out_dir)
    provenance = check_corpus_provenance(store, corpus, command="demo")
    memory["datastore_and_index"] = peak_resident_memory_mb()
    lm = prepare_adapter(model, tokenizer, corpus, store, index, config, out_dir / RUN_ADAPTER_DIR)
    memory["training"] = peak_resident_memory_mb()

    logger.info("evaluating base, kNN-LM, GNN-LM and GNN-LM + kNN on the same test tokens")
    results = evaluate_four_way(lm, corpus.valid, corpus.test, config.evaluation).to_dict()
    memory["evaluation"] = peak_resident_memory_mb()
    logger.info(
        "peak resident memory after each stage (MiB): %s",
        ", ".join(f"{stage} {mb:.0f}" for stage, mb in memory.items()),
    )
    results["provenance"] = provenance
    results["peak_memory_mb"] = {stage: round(mb, 1) for stage, mb in memory.items()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    table = results_table(results)  # refuses non-finite results before anything is written
    atomic_write_json(out_dir / RUN_RESULTS, results)
    atomic_write_text(out_dir / RUN_RESULTS_MARKDOWN, table + "\n")
    plot_results(results, out_dir / RUN_RESULTS_PLOT)
    record_evaluation_in_card(out_dir / RUN_ADAPTER_DIR, results, split="test")  # README.md
    logger.info(
        "results in %s (%s, %s, %s; %.0f s)",
        out_dir,
        RUN_RESULTS,
        RUN_RESULTS_MARKDOWN,
        RUN_RESULTS_PLOT,
        results["seconds"],
    )
    return results


def prepare_adapter(
    model: Any,
    tokenizer: Any,
    corpus: TokenizedCorpus,
    store: Datastore,
    index: DatastoreIndex,
    config: RunConfig,
    adapter_dir: Path,
) -> HetGraphLM:
    """Train (or resume training) the adapter in ``adapter_dir``, or reuse a finished one."""
    if (adapter_dir / TRAINING_RESULT).is_file():
        saved = FusionConfig.from_dict(read_adapter_config(adapter_dir)["fusion"])
        if saved.to_dict() != config.fusion.to_dict():
            raise RunDirectoryError(
                f"{adapter_dir} holds an adapter trained with another fusion config (another "
                "--preset or fusion section); use another run directory (--out) or delete "
                f"{adapter_dir} to train again"
            )
        changed = _changed_training_settings(adapter_dir, config.training)
        if changed:  # the fusion config decides what the adapter is; training only how
            logger.warning(
                "reusing the adapter in %s, trained with other training settings "
                "(%s); delete it to train with these",
                adapter_dir,
                changed,
            )
        else:
            logger.info("reusing trained adapter %s", adapter_dir)
        return HetGraphLM.from_pretrained(adapter_dir, model, store, index, tokenizer=tokenizer)
    torch.manual_seed(config.training.seed)  # the adapter's initialisation is part of the run
    lm = HetGraphLM(model, store, index, config.fusion, tokenizer=tokenizer)
    trained = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    logger.info("training the graph adapter (%s parameters)", f"{trained:,}")
    train_split = corpus.train.truncate(len(store) + 1)
    train_adapter(
        lm, train_split, corpus.valid, config.training, adapter_dir, eval_config=config.evaluation
    )
    return lm


def _changed_training_settings(adapter_dir: Path, training: TrainingConfig) -> str:
    """``"key: saved, now new"`` for each training setting that differs from the one the
    adapter in ``adapter_dir`` was trained with (``""``: none). The record only informs a
    warning, so a damaged or foreign one says so instead of stopping a run that reuses a
    good adapter."""
    record = adapter_dir / TRAINING_RESULT
    try:
        saved = TrainingConfig.from_dict(read_json(record)["config"]).to_dict()
    except (OSError, ValueError, KeyError, TypeError) as error:  # ConfigError is a ValueError
        return f"unknown: {record} has no readable training settings ({type(error).__name__})"
    now = training.to_dict()
    return ", ".join(
        f"{key}: {saved[key]!r}, now {value!r}" for key, value in now.items() if saved[key] != value
    )
