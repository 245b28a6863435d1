"""Saving and loading the trained part of a :class:`~hetgraph.fusion.engine.FusionEngine`:
adapters and gates (:meth:`HetGraphLM.save_pretrained <hetgraph.HetGraphLM.save_pretrained>`,
:meth:`~hetgraph.HetGraphLM.from_pretrained`).

An adapter directory holds ``adapter.safetensors`` (adapter and gate tensors, keyed as in
``FusionEngine.state_dict()``) and ``adapter_config.json`` (the fusion config, each site's
adapter config, and the base model's and datastore's identity, and the knowledge graph's
when one is fused: never its KGE tables, which are read from the graph's directory); its
model card is never read.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from hetgraph.errors import HetgraphError
from hetgraph.fusion.config import FusionConfig
from hetgraph.fusion.model_card import write_model_card
from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    read_json_record,
)
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    INTEGRITY_KEY,
    atomic_path,
    fsync_directory,
)
from hetgraph.limits import ResourceLimitError, check_memory, format_bytes, loads_json, naming
from hetgraph.locking import LockError, while_unlocked
from hetgraph.models.fingerprint import (
    config_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from hetgraph.storage import storage_errors

if TYPE_CHECKING:
    from torch import nn

    from hetgraph.fusion.engine import FusionEngine

FORMAT_VERSION = 1
#: Prefixes of the trained parameters in ``FusionEngine.state_dict()`` (the saved keys).
ADAPTER_PREFIXES = ("adapters.", "gates.", "retrieval_gates.")


class AdapterMismatchError(HetgraphError):
    """An adapter was loaded against a different base model or datastore."""


class AdapterFileError(HetgraphError):
    """An adapter directory's files are missing or damaged."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """A directory holds no adapter (also a :class:`FileNotFoundError`)."""


def retrain_hint(directory: str | Path) -> str:
    """How to replace a damaged adapter in ``directory``."""
    return (
        f"train it again (hetgraph train … --out {directory}; a run that left a "
        "checkpoint resumes from it)"
    )


def adapter_identity(engine: FusionEngine) -> dict[str, Any]:
    """What an adapter must be loaded against: the base model, the datastore and, when it
    retrieves through a relation encoder (:class:`~hetgraph.encoder.EncodedIndex`), that
    encoder (``"retrieval"``; absent for the datastore's own index)."""
    meta = engine.datastore.metadata
    identity: dict[str, Any] = {
        "model": dict(meta.model),
        "datastore": {
            "fingerprint": meta.fingerprint,
            "num_entries": len(engine.datastore),
            "dim": engine.datastore.dim,
            "key_layer": engine.datastore.key_layer,
        },
    }
    retrieval = retrieval_identity(engine)
    if retrieval is not None:
        identity["retrieval"] = retrieval
    if engine.knowledge is not None:
        identity["knowledge"] = engine.knowledge.identity()
    return identity


def retrieval_identity(engine: FusionEngine) -> dict[str, Any] | None:
    """The relation encoder the engine's index encodes queries with, or ``None``."""
    encoder = getattr(engine.index, "encoder", None)
    if encoder is None:
        return None
    return {"encoder": encoder.fingerprint, "encoder_dir": str(engine.index.directory)}


def check_retrieval(saved: dict[str, Any], engine: FusionEngine, directory: Path) -> None:
    """Refuse an adapter used with another retrieval than it was trained with (with or
    without a relation encoder, or through another encoder), in one line."""
    trained, current = saved.get("retrieval"), retrieval_identity(engine)
    if (trained or {}).get("encoder") == (current or {}).get("encoder"):
        return
    if trained is None:
        raise AdapterMismatchError(
            f"adapter in {directory} was trained without a relation encoder, but this model "
            f"retrieves through {current['encoder_dir']}; leave out --encoder"
        )
    raise AdapterMismatchError(
        f"adapter in {directory} was trained with the relation encoder "
        f"{trained['encoder_dir']} (fingerprint {trained['encoder']}), but this model "
        + (
            "retrieves through the datastore's own index"
            if current is None
            else f"retrieves through {current['encoder_dir']} (fingerprint {current['encoder']})"
        )
        + f"; pass --encoder {trained['encoder_dir']} (an index built by hetgraph index build "
        "--encoder)"
    )


def check_knowledge(saved: dict[str, Any], current: dict[str, Any] | None, directory: Path) -> None:
    """Refuse an adapter used with another knowledge graph than it was trained with (with
    one and loaded without, without one and loaded with, or another graph or embeddings),
    in one line naming ``--kg`` and the fix. ``current``: the given graph's
    :meth:`KnowledgeSource.identity <hetgraph.kg.KnowledgeSource.identity>` (at least its
    ``fingerprint`` and ``directory``: :func:`~hetgraph.kg.source.knowledge_fingerprint` of
    content and embeddings), or ``None``."""
    trained = saved.get("knowledge")
    if (trained or {}).get("fingerprint") == (current or {}).get("fingerprint"):
        return
    if trained is None:
        raise AdapterMismatchError(
            f"adapter in {directory} was trained without a knowledge graph, but "
            f"{current['directory'] or 'one'} was given; leave out --kg (knowledge=None)"
        )
    where = trained.get("directory") or "DIR"
    if current is None:
        raise AdapterMismatchError(
            f"adapter in {directory} was trained with the knowledge graph {where} "
            f"(fingerprint {trained.get('fingerprint')}) and none was given; pass --kg "
            f"{where} (knowledge=KnowledgeSource.open({where!r}, tokenizer))"
        )
    raise AdapterMismatchError(
        f"adapter in {directory} was trained with the knowledge graph {where} (fingerprint "
        f"{trained.get('fingerprint')}), but {current['directory'] or 'the given one'} has "
        f"fingerprint {current['fingerprint']} (other triples, aliases or embeddings); pass "
        f"--kg {where} as it was trained, or train a new adapter on this graph"
    )


def save_adapter(engine: FusionEngine, directory: str | Path, base_model: str | None) -> None:
    """Write ``engine``'s ``adapter.safetensors`` (adapters + gates) and
    ``adapter_config.json`` (with the weights file's size and checksums, and its own
    checksum), then the model card (:func:`~hetgraph.fusion.model_card.write_model_card`:
    best effort, never read back); ``base_model``: the base model's name or path, for the
    card (unchecked).

    Both new files are written in full under temporary names first; only then is the
    old ``adapter_config.json`` removed and the two renamed into place (weights, then
    config). A save that fails — a full disk — leaves the previous adapter as it was,
    and one interrupted between the renames leaves no pair of files that looks complete.

    Raises:
        hetgraph.storage.StorageError: the disk is full (the previous adapter is kept).
    """
    directory = Path(directory)
    config = {
        "format_version": FORMAT_VERSION,
        "fusion": engine.config.to_dict(),
        "adapters": {key: adapter.config.to_dict() for key, adapter in engine.adapters.items()},
        **adapter_identity(engine),
        "base_model_name_or_path": base_model,  # for the card; unchecked
    }
    state = engine.adapter_state_dict()
    size = sum(t.numel() * t.element_size() + len(k) + 128 for k, t in state.items()) + 4096
    with storage_errors(
        directory, "save the adapter again (the previous one is kept)", outer_then_first=True
    ):
        directory.mkdir(parents=True, exist_ok=True)
        # Exits in reverse order: the weights are renamed into place before the config.
        with (
            atomic_path(directory / ADAPTER_CONFIG) as tmp_config,
            atomic_path(directory / ADAPTER_WEIGHTS, size=size) as tmp_weights,
        ):
            save_file(state, str(tmp_weights))
            config[INTEGRITY_KEY] = {"files": {ADAPTER_WEIGHTS: file_record(tmp_weights)}}
            atomic_write_json_record(tmp_config, config)
            with contextlib.suppress(FileNotFoundError):
                (directory / ADAPTER_CONFIG).unlink()
            fsync_directory(directory)
    write_model_card(directory, config)


def saved_fusion_config(saved: dict[str, Any], directory: str | Path) -> FusionConfig:
    """The :class:`~hetgraph.FusionConfig` of an ``adapter_config.json`` read by
    :func:`read_adapter_config`.

    Raises:
        AdapterFileError: its fusion section is damaged.
    """
    try:
        return FusionConfig.from_dict(saved["fusion"])
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise AdapterFileError(
            f"{Path(directory) / ADAPTER_CONFIG} is damaged (its fusion section: "
            f"{error}); {retrain_hint(directory)}"
        ) from None


def load_adapter(
    engine: FusionEngine,
    model: nn.Module,
    directory: str | Path,
    saved: dict[str, Any],
    tokenizer: Any | None = None,
) -> None:
    """Load the adapter ``saved`` in ``directory`` into ``engine``, after checking that it
    was trained with ``model`` (and ``tokenizer``) and the engine's datastore.

    Raises:
        AdapterFileError: ``adapter.safetensors`` is damaged.
        AdapterMismatchError: the adapter was trained with another base model or datastore.
    """
    directory = Path(directory)
    check_identity(engine, model, saved, directory, tokenizer)
    device = next(engine.adapters.parameters()).device
    engine.load_adapter_state_dict(read_adapter_weights(directory, device, saved))


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of ``directory``, its checksum, format version and sections
    checked.

    Raises:
        AdapterNotFoundError: there is none.
        AdapterFileError: it is damaged or of another format version.
        hetgraph.locking.LockError: missing or damaged as far as can be seen while another
            process is writing the directory (training saving its best adapter).
    """
    directory = Path(directory)
    with while_unlocked(directory, "adapter directory"):
        return _read_adapter_config(directory)


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    config_path = directory / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterNotFoundError(
            f"{config_path} not found: is {directory} an adapter directory written by "
            "HetGraphLM.save_pretrained / hetgraph train? (An interrupted save leaves none: "
            f"{retrain_hint(directory)})"
        )
    saved = read_json_record(config_path, AdapterFileError, retrain_hint(directory))
    version = saved.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise AdapterFileError(
            f"{config_path}: unsupported adapter format {version!r} (this "
            f"hetgraph reads format {FORMAT_VERSION}); "
            f"{retrain_hint(directory)}"
        )
    integrity = saved.get(INTEGRITY_KEY, {})
    # An integrity section, when there is one, must hold a record of the weights: a
    # malformed one must not switch the weights check off.
    record_ok = INTEGRITY_KEY not in saved or (
        isinstance(integrity, dict)
        and isinstance(integrity.get("files"), dict)
        and isinstance(integrity["files"].get(ADAPTER_WEIGHTS), dict)
    )
    if (
        not isinstance(saved.get("fusion"), dict)
        or not isinstance(saved.get("model"), dict)
        or not record_ok
    ):
        raise AdapterFileError(
            f"{config_path} is damaged (invalid fusion, model or integrity "
            f"section); {retrain_hint(directory)}"
        )
    return saved


#: Bytes per element of the safetensors dtypes.
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
#: Largest safetensors header read (the format's own limit is 100 MB).
_MAX_HEADER_BYTES = 100_000_000


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file's header declares, read without loading any
    tensor (a small file can declare huge tensors over a sparse file).

    Raises:
        AdapterFileError: the header is unreadable or inconsistent with the file's size.
    """
    path = Path(path)
    damaged = f"{path} is damaged (not a readable safetensors file)"
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(_MAX_HEADER_BYTES, size - 8):
                raise AdapterFileError(damaged)
            header = loads_json(f.read(length))
        shapes, ends = {}, []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(entry["shape"])
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise TypeError(name)
            shapes[name] = shape
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * _DTYPE_BYTES[entry["dtype"]]:
                raise ValueError(name)
            ends.append(end)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        raise AdapterFileError(damaged) from None
    if ends and max(ends) != size - 8 - length:
        raise AdapterFileError(damaged)
    return shapes


def expected_adapter_shapes(saved: dict[str, Any], config_path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors the adapter config ``saved`` implies (its adapters built on
    PyTorch's ``meta`` device: nothing is allocated), checked against the memory available
    (:func:`hetgraph.limits.check_memory`).

    Raises:
        AdapterFileError: the config's adapter sections do not describe adapters.
        hetgraph.limits.ResourceLimitError: they would not fit in memory.
    """
    from hetgraph.fusion.gates import RetrievalGate
    from hetgraph.nn import AdapterConfig, GraphAdapter

    adapters = saved.get("adapters")
    hint = retrain_hint(config_path.parent)
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        configs = {key: AdapterConfig.from_dict(value) for key, value in adapters.items()}
        for key, config in configs.items():
            # Before building anything (slow for absurd sizes): a lower bound, one hidden ×
            # hidden float32 matrix per layer.
            check_memory(
                f"the adapter {key!r} of {config_path}",
                4 * config.num_layers * (config.hidden_channels or 1) ** 2,
                f"the file is damaged; {hint}",
            )
            with torch.device("meta"):
                module = GraphAdapter(config)
                gate_shape = (int(config.out_channels),)
                retrieval = (
                    RetrievalGate().state_dict()
                    if saved["fusion"].get("gate") == "retrieval"
                    else {}
                )
            tensors = module.state_dict()
            check_memory(
                f"the adapter {key!r} of {config_path}",
                4 * sum(t.numel() for t in tensors.values()),
                f"the file is damaged; {hint}",
            )
            shapes.update({f"adapters.{key}.{name}": tuple(t.shape) for name, t in tensors.items()})
            shapes[f"gates.{key}"] = gate_shape
            shapes.update(
                {f"retrieval_gates.{key}.{name}": tuple(t.shape) for name, t in retrieval.items()}
            )
    except ResourceLimitError as error:  # an AdapterConfig's own size check names no file
        raise naming(error, config_path) from None
    except Exception as error:  # any malformed section: the config cannot be right
        raise AdapterFileError(
            f"{config_path} is damaged (its adapters section: "
            f"{type(error).__name__}: {error}); {hint}"
        ) from None
    return shapes


def check_weight_shapes(path: Path, saved: dict[str, Any], config_path: Path) -> None:
    """Refuse ``adapter.safetensors`` when the tensors its header declares are not those
    ``adapter_config.json`` implies — before reading them (a few KB on disk can declare
    gigabytes over a sparse file).

    Raises:
        AdapterFileError: other tensors or shapes.
        hetgraph.limits.ResourceLimitError: the declared tensors would not fit in memory.
    """
    declared = safetensors_shapes(path)
    hint = retrain_hint(path.parent)
    if "adapters" not in saved:  # nothing to compare with: at least the memory it would take
        check_memory(
            f"the tensors {path} declares",
            sum(math.prod(shape) for shape in declared.values()) * 4,
            f"the file is damaged; {hint}",
        )
        return
    expected = expected_adapter_shapes(saved, config_path)
    wrong = sorted(k for k in declared.keys() & expected.keys() if declared[k] != expected[k])
    extra, missing = (
        sorted(declared.keys() - expected.keys()),
        sorted(expected.keys() - declared.keys()),
    )
    if wrong or extra or missing:
        total = sum(math.prod(shape) for shape in declared.values()) * 4
        what = (
            f"{wrong[0]} has shape {list(declared[wrong[0]])}, the config implies "
            f"{list(expected[wrong[0]])}"
            if wrong
            else f"unexpected {extra[:3]}"
            if extra
            else f"missing {missing[:3]}"
        )
        raise AdapterFileError(
            f"{path} does not match {config_path} ({what}; it declares "
            f"about {format_bytes(total)} of tensors): the file is damaged "
            f"or not this adapter's; {hint}"
        )


def read_adapter_weights(
    directory: str | Path, device: torch.device | str = "cpu", saved: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    """The tensors of ``directory/adapter.safetensors`` on ``device``, checked in full against
    the record in ``adapter_config.json`` (``saved``, read if not given; adapters saved by
    older versions have no record), against the shapes the config implies (before they are
    read) and for non-finite values.

    Raises:
        AdapterFileError: the file is missing, damaged, of other shapes, or holds NaN / inf.
        hetgraph.locking.LockError: so it seems while another process is writing the
            directory (training saving its best adapter).
    """
    directory = Path(directory)
    with while_unlocked(directory, "adapter directory"):
        return _read_adapter_weights(directory, device, saved)


def _read_adapter_weights(
    directory: Path, device: torch.device | str, saved: dict[str, Any] | None
) -> dict[str, Tensor]:
    path, hint = directory / ADAPTER_WEIGHTS, retrain_hint(directory)
    saved = _read_adapter_config(directory) if saved is None else saved
    files = saved.get(INTEGRITY_KEY, {}).get("files")
    record = files.get(ADAPTER_WEIGHTS) if isinstance(files, dict) else None
    problem = (
        check_file_record(path, record, full=True)
        if isinstance(record, dict)
        else (None if path.is_file() else "is missing")
    )
    if problem:
        raise AdapterFileError(f"{path} {problem}; {hint}")
    check_weight_shapes(path, saved, directory / ADAPTER_CONFIG)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise AdapterFileError(
            f"{path} is damaged (not a readable safetensors file); {hint}"
        ) from None
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise AdapterFileError(f"{path} holds non-finite values (NaN or inf) in {bad[:3]}; {hint}")
    return state


def adapter_problems(directory: str | Path) -> tuple[list[str], list[str]]:
    """Every check of the adapter in ``directory`` (both files in full, the weights' shapes
    against the config): ``(files checked, problems)``; each problem names the file and the
    repair."""
    try:
        read_adapter_weights(directory)
    except (AdapterFileError, ResourceLimitError, LockError) as error:
        return [ADAPTER_CONFIG, ADAPTER_WEIGHTS], [str(error)]
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS], []


def check_identity(
    engine: FusionEngine,
    model: nn.Module,
    saved: dict[str, Any],
    directory: Path,
    tokenizer: Any | None = None,
) -> None:
    """Raise :class:`AdapterMismatchError` unless the adapter config ``saved`` was written
    for ``model`` (its config and weights fingerprints, and ``tokenizer``'s when given) and
    the engine's datastore."""
    current = adapter_identity(engine)
    current["model"] = {
        **current["model"],
        "config": config_fingerprint(model),
        "weights": weights_fingerprint(model),
    }
    if tokenizer is not None:
        current["model"]["tokenizer"] = tokenizer_fingerprint(tokenizer)
    check_retrieval(saved, engine, directory)
    check_knowledge(saved, current.get("knowledge"), directory)
    for what in ("model", "datastore"):
        if saved.get(what) != current[what]:
            raise AdapterMismatchError(
                f"adapter in {directory} was trained with a different {what}:\n"
                f"  saved:   {saved.get(what)}\n  current: {current[what]}\n"
                f"use the {what} it was trained with, or train a new adapter (hetgraph train …)"
            )
