r"""The model card of an adapter directory: ``README.md`` with Hub-style YAML metadata.

transformers and PEFT leave a model card beside saved weights; so does hetgraph. The card is
*rendered from the directory's files* — ``adapter_config.json`` (base model, datastore, fusion
sites), ``training.json`` (written by training after its last save) and ``evaluation.json``
(the last ``hetgraph eval --adapter`` of this adapter) — by :func:`write_model_card`, which
``save_pretrained``, the end of training and ``hetgraph eval`` call. The card is for people
and the Hub only: nothing reads it back to load or check an adapter, it is not part of the
adapter's integrity record, and writing it is best effort (a failure is a warning)::

    write_model_card("runs/adapter")            # README.md from the files there
    read_model_card_metadata("runs/adapter")    # its YAML front matter, or None

Text a person adds below the card's closing marker line is kept when the card is written
again; a ``README.md`` hetgraph did not write is never replaced.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hetgraph.errors import HetgraphError
from hetgraph.integrity import atomic_write_json_record, read_json_record
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INTEGRITY_KEY,
    TRAINING_RESULT,
    atomic_write_text,
    sha256_hex,
)

logger = logging.getLogger(__name__)

#: The model card of an adapter directory (Markdown with YAML front matter).
MODEL_CARD = "README.md"
#: The last ``hetgraph eval --adapter`` results of an adapter (JSON record), for its card.
ADAPTER_EVALUATION = "evaluation.json"
#: First line of the card's body: marks a ``README.md`` as written by hetgraph.
CARD_BEGIN = (
    "<!-- hetgraph model card: written from adapter_config.json, training.json "
    "and evaluation.json -->"
)
#: Last line of the generated part; whatever follows it is kept when the card is rewritten.
CARD_END = (
    "<!-- hetgraph: end of the generated card; text below this line is kept when "
    "hetgraph writes the card again -->"
)
#: A card larger than this is not read (and not replaced): no hetgraph card is near it.
MAX_CARD_BYTES = 4 << 20
#: Labels of the evaluated methods (as :data:`hetgraph.evaluation.report.METHOD_NAMES`).
_METHODS = {"base": "base LM", "knn": "kNN-LM", "gnn": "GNN-LM", "gnn_knn": "GNN-LM + kNN"}
#: What a Hugging Face Hub model id looks like (``name`` or ``owner/name``).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def base_model_name(model: Any) -> str | None:
    r"""The name or path the base ``model`` was loaded from (``config._name_or_path``; a
    local path made absolute), or ``None`` for a model built in memory."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        return None
    return os.path.abspath(name) if os.path.exists(name) else name


def _plain(text: Any) -> str:
    # One printable line: names and paths come from users (no Markdown or YAML tricks).
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text))


def _code(text: Any) -> str:
    return "`" + _plain(text).replace("`", "'") + "`"


def _adapter_digest(directory: Path) -> str:
    # The adapter_config.json bytes: they record the weights' checksum, so results of an
    # adapter since retrained in the same directory are not shown as this one's.
    return sha256_hex((directory / ADAPTER_CONFIG).read_bytes(), None)


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return read_json_record(path)
    except HetgraphError as error:
        logger.warning("model card: ignoring %s (%s)", path, error)
        return None


def _training_summary(directory: Path) -> dict[str, Any] | None:
    record = _read_record(directory / TRAINING_RESULT)
    if record is None:
        return None
    try:
        config, result = record["config"], record["result"]
        steps = int(result["steps"])
        # Every micro-batch scores batch_size x context_length labels (over all processes).
        tokens = (
            steps
            * int(config.get("grad_accumulation", 1))
            * int(config["batch_size"])
            * int(config["context_length"])
        )
        summary = {
            "steps": steps,
            "tokens": tokens,
            "batch_size": int(config["batch_size"]),
            "context_length": int(config["context_length"]),
            "grad_accumulation": int(config.get("grad_accumulation", 1)),
            "learning_rate": float(config["lr"]),
            "seed": int(config["seed"]),
            "best_step": result.get("best_step"),
            "best_valid_ppl": result.get("best_valid_ppl"),
            "mixed_precision": str(result.get("mixed_precision", "no")),
        }
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        logger.warning(
            "model card: ignoring %s (unexpected content: %s)", directory / TRAINING_RESULT, error
        )
        return None
    best = summary["best_valid_ppl"]
    if not (isinstance(best, (int, float)) and math.isfinite(best)):
        summary["best_valid_ppl"] = None
    if not isinstance(summary["best_step"], int):
        summary["best_step"] = None
    return summary


def _evaluation(directory: Path) -> dict[str, Any] | None:
    record = _read_record(directory / ADAPTER_EVALUATION)
    if record is None:
        return None
    if record.get("adapter") != _adapter_digest(directory):
        logger.info(
            "model card: %s holds the results of an earlier adapter in %s; run "
            "`hetgraph eval --adapter %s` again for this one",
            directory / ADAPTER_EVALUATION,
            directory,
            directory,
        )
        return None
    results = record.get("results")
    try:
        rows = {
            key: {m: float(results[key][m]) for m in ("ppl", "acc")}
            for key in _METHODS
            if isinstance(results.get(key), Mapping)
        }
        ok = "base" in rows and all(math.isfinite(v) for row in rows.values() for v in row.values())
    except (KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        logger.warning(
            "model card: ignoring %s (unexpected results)", directory / ADAPTER_EVALUATION
        )
        return None
    return {"results": results, "rows": rows, "split": record.get("split")}


def _front_matter(
    config: Mapping[str, Any], training: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    name = config.get("base_model_name_or_path")
    model = config["model"]
    datastore = config.get("datastore", {})
    hetgraph: dict[str, Any] = {
        "format_version": config.get("format_version"),
        "base_model": {
            **({"name_or_path": _plain(name)} if name else {}),
            "model_type": _plain(model.get("model_type", "")),
            "fingerprint": {k: _plain(v) for k, v in model.items() if k != "model_type"},
        },
        "datastore": {
            "fingerprint": _plain(datastore.get("fingerprint", "")),
            "num_entries": datastore.get("num_entries"),
            "key_layer": datastore.get("key_layer"),
        },
        "fusion_sites": [_plain(site) for site in config.get("adapters", {})],
        "fusion_layers": config["fusion"].get("fusion_layers"),
        "fusion_mode": config["fusion"].get("fusion_mode"),
        "k": config["fusion"].get("k"),
        "neighbours": config["fusion"].get("neighbours", "retrieved"),
    }
    weights = config.get(INTEGRITY_KEY, {}).get("files", {}).get(ADAPTER_WEIGHTS, {})
    if isinstance(weights, Mapping) and "sha256" in weights:
        hetgraph["adapter_sha256"] = _plain(weights["sha256"])
    if training is not None:
        hetgraph["training"] = training
    results = []
    if evaluation is not None:
        split = _plain(evaluation["split"] or "test")
        corpus = evaluation["results"].get("provenance", {}).get("eval_corpus")
        hetgraph["evaluation"] = {
            "split": split,
            "tokens": evaluation["results"].get("tokens"),
            "corpus_fingerprint": _plain(corpus) if corpus else None,
        }
        dataset = f"local corpus {_plain(corpus)}" if corpus else "local corpus"
        for key, row in evaluation["rows"].items():
            for metric, value in (("perplexity", row["ppl"]), ("accuracy", row["acc"])):
                results.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name="Language modelling",
                        dataset_type="hetgraph-corpus",
                        dataset_name=dataset,
                        dataset_split=split,
                        metric_type=metric,
                        metric_value=round(value, 6),
                        metric_name=f"{_METHODS[key]} {metric}",
                        metric_config=key,
                    )
                )
    # Hub metadata wants a Hub model id as base_model: a local path stays in hetgraph's section.
    hub_id = name if name and _HUB_ID.fullmatch(name) and not os.path.isabs(name) else None
    data = ModelCardData(
        library_name="hetgraph",
        base_model=hub_id,
        pipeline_tag="text-generation",
        tags=["hetgraph", "gnn-lm", "retrieval-augmented", "graph-neural-network", "adapter"],
        model_name="hetgraph adapter" if results else None,
        eval_results=results or None,
        hetgraph=hetgraph,
    )
    return data.to_yaml()


def _retrieval_flags(config: dict[str, Any]) -> str:
    """The options every command needs for this adapter's retrieval: its relation encoder
    and its knowledge graph (each refused when missing or another)."""
    return (" --encoder ENCODER" if config.get("retrieval") else "") + (
        " --kg KNOWLEDGE_GRAPH" if config.get("knowledge") else ""
    )


def _retrieval_notes(config: dict[str, Any]) -> list[str]:
    notes = []
    if config.get("retrieval"):
        notes.append(
            "It retrieves through a relation encoder (fingerprint "
            f"{_code(str(config['retrieval'].get('encoder', '')))}): pass it as `--encoder`."
        )
    if config.get("knowledge"):
        notes.append(
            "It fuses a knowledge graph (fingerprint "
            f"{_code(str(config['knowledge'].get('fingerprint', '')))}): pass it as `--kg`."
        )
    return [*notes, ""] if notes else []


def _body(
    config: Mapping[str, Any], training: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> str:
    name = config.get("base_model_name_or_path")
    base = f"the frozen base model {_code(name)}" if name else "a frozen base model"
    load = _plain(name) if name else "BASE_MODEL"
    shell = shlex.quote(load)
    sites = ", ".join(_code(s) for s in config.get("adapters", {})) or "–"
    store = config.get("datastore", {})
    lines = [
        CARD_BEGIN,
        "",
        "# hetgraph adapter (GNN-LM)",
        "",
        f"Graph-network adapters and gates trained by hetgraph on top of {base}: at each "
        f"fusion site "
        f"({sites}) a heterogeneous graph of the current context and the neighbours "
        f"retrieved from a kNN datastore is fused into the hidden states. Only the adapters "
        f"are here ({ADAPTER_WEIGHTS}, {ADAPTER_CONFIG}); the base model and the datastore "
        f"(fingerprint {_code(store.get('fingerprint', ''))}, "
        f"{store.get('num_entries', '?')} entries) are needed to use it, and loading checks "
        "that they are the ones it was trained with.",
        "",
        *(
            [
                "This is the **random-neighbours control**: each position's neighbours are "
                "datastore rows drawn uniformly (seeded), not retrieved, so it measures the "
                "adapter's capacity and training without retrieval.",
                "",
            ]
            if config["fusion"].get("neighbours") == "random"
            else []
        ),
        *_retrieval_notes(config),
        "## How to use it",
        "",
        "```bash",
        f"hetgraph eval --model {shell} --corpus CORPUS --datastore DATASTORE --adapter ADAPTER"
        + _retrieval_flags(config),
        f"hetgraph generate --model {shell} --datastore DATASTORE --adapter ADAPTER"
        + _retrieval_flags(config)
        + ' --prompt "..."',
        "```",
        "",
        "```python",
        "from hetgraph import Datastore, DatastoreIndex, HetGraphLM, load_model",
        "",
        f"model, tokenizer = load_model({load!r})",
        'store = Datastore.open("DATASTORE", model=model, tokenizer=tokenizer)',
        'index = DatastoreIndex.load("DATASTORE/index", store)',
        'lm = HetGraphLM.from_pretrained("ADAPTER", model, store, index, tokenizer=tokenizer)',
        "```",
        "",
    ]
    if training is not None:
        best = training["best_valid_ppl"]
        lines += [
            "## Training",
            "",
            f"{training['steps']} steps of {training['batch_size']} × "
            f"{training['context_length']} tokens"
            + (
                f" × {training['grad_accumulation']} accumulated"
                if training["grad_accumulation"] > 1
                else ""
            )
            + f": {training['tokens']:,} training tokens (learning rate "
            f"{training['learning_rate']:g}, seed {training['seed']}"
            + (
                f", best valid perplexity {best:.3f} at step {training['best_step']}"
                if best is not None
                else ""
            )
            + ").",
            "",
        ]
    if evaluation is not None:
        from hetgraph.evaluation.report import results_table

        lines += [
            "## Evaluation",
            "",
            f"`hetgraph eval` on the {_plain(evaluation['split'] or 'test')} split:",
            "",
            results_table(evaluation["results"]).rstrip(),
            "",
        ]
    return "\n".join([*lines, CARD_END, ""])


def render_model_card(directory: str | Path, config: Mapping[str, Any] | None = None) -> str:
    r"""The model card of the adapter in ``directory``: YAML front matter (``library_name:
    hetgraph``, the base model's name and fingerprint, the datastore's fingerprint, the
    fusion sites, the training tokens from ``training.json`` and the last evaluation's
    results as a Hub ``model-index``) and a short description with a results table.

    Args:
        directory: the adapter directory.
        config: its ``adapter_config.json`` content, if already at hand (else read).

    Raises:
        HetgraphError: ``adapter_config.json`` is missing or damaged.
    """
    directory = Path(directory)
    if config is None:
        config = read_json_record(directory / ADAPTER_CONFIG)
    if not isinstance(config.get("model"), Mapping) or not isinstance(
        config.get("fusion"), Mapping
    ):
        raise HetgraphError(f"{directory / ADAPTER_CONFIG} has no model or fusion section")
    training, evaluation = _training_summary(directory), _evaluation(directory)
    return (
        f"---\n{_front_matter(config, training, evaluation)}\n---\n\n"
        f"{_body(config, training, evaluation)}"
    )


def _kept_text(path: Path) -> str | None:
    # What follows CARD_END in an existing card; None when the file is not a hetgraph card
    # (a person's own README.md is never replaced).
    try:
        if not path.exists():
            return ""
        if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
            return None
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    if CARD_END in text:
        return text.split(CARD_END, 1)[1].lstrip("\n")
    return "" if CARD_BEGIN in text else None


def write_model_card(directory: str | Path, config: Mapping[str, Any] | None = None) -> Path | None:
    r"""(Re)write ``directory/README.md`` from the adapter's files (:func:`render_model_card`)
    atomically, keeping any text below the previous card's closing marker.

    Best effort: the card is documentation, so a failure (a full disk, a read-only
    directory, a damaged ``adapter_config.json``) is a warning, and a ``README.md`` that
    hetgraph did not write is left as it is (delete it to have the card written).

    Returns:
        the card's path, or ``None`` when it was not written.
    """
    directory = Path(directory)
    path = directory / MODEL_CARD
    if config is None and not (directory / ADAPTER_CONFIG).is_file():
        return None
    kept = _kept_text(path)
    if kept is None:
        logger.warning(
            "%s was not written by hetgraph (or is unreadable); it is left as it "
            "is: delete it to have hetgraph write the adapter's model card",
            path,
        )
        return None
    try:
        card = render_model_card(directory, config)
        atomic_write_text(path, card + (f"\n{kept}" if kept.strip() else ""))
    except (OSError, HetgraphError, KeyError, TypeError, ValueError, AttributeError) as error:
        logger.warning(
            "could not write the model card %s (%s); the adapter itself is not affected",
            path,
            error,
        )
        return None
    return path


def read_model_card_metadata(directory: str | Path) -> dict[str, Any] | None:
    r"""The YAML front matter of ``directory/README.md`` (``yaml.safe_load``), or ``None``
    when there is no card or it has no readable front matter."""
    import yaml

    path = Path(directory) / MODEL_CARD
    try:
        if not path.is_file() or path.stat().st_size > MAX_CARD_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
        match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
        data = yaml.safe_load(match[1]) if match else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def record_evaluation_in_card(
    adapter_dir: str | Path | None, results: Mapping[str, Any], *, split: str | None = None
) -> Path | None:
    r"""Keep ``results`` (of :func:`~hetgraph.evaluation.evaluate_four_way`, on ``split``)
    in ``adapter_dir/evaluation.json``, tied to this adapter's ``adapter_config.json``, and
    rewrite the adapter's model card with them. ``hetgraph eval --adapter`` calls it.

    Best effort (the results are also printed and in ``--json``): a directory that cannot
    be written is a warning. ``adapter_dir`` ``None`` (no adapter evaluated) does nothing.

    Returns:
        the card's path, or ``None`` when it was not written.
    """
    if adapter_dir is None:
        return None
    directory = Path(adapter_dir)
    try:
        atomic_write_json_record(
            directory / ADAPTER_EVALUATION,
            {"adapter": _adapter_digest(directory), "split": split, "results": dict(results)},
        )
    except (OSError, HetgraphError, TypeError, ValueError) as error:
        logger.warning(
            "could not record the evaluation results in %s (%s); they are not in its model card",
            directory / ADAPTER_EVALUATION,
            error,
        )
        return None
    return write_model_card(directory)
