"""Checks of the ``hetgraph`` command line's options against the files and the model they
name, made before any work: output paths (never over hetgraph's own files, always
writable), plot formats, decoder-layer numbers and text lengths. Each refusal is a
:class:`CommandLineError` naming the option and the fix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from hetgraph.errors import HetgraphError
from hetgraph.io import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_DIR,
    DATASTORE_METADATA,
    DATASTORE_PROGRESS,
    DOC_NAMES,
    HF_MODEL_CONFIG,
    HF_TOKENIZER_CONFIG,
    HF_TOKENIZER_FILES,
    INDEX_FILE,
    INDEX_METADATA,
    INDEX_SHARDS_DIR,
    OPTIMIZER_WEIGHTS,
    RUN_ADAPTER_DIR,
    RUN_CONFIG,
    RUN_DATASTORE_DIR,
    RUN_RESULTS,
    RUN_RESULTS_MARKDOWN,
    RUN_RESULTS_PLOT,
    TRAINER_STATE,
    TRAINING_RESULT,
)


class CommandLineError(HetgraphError):
    """An option of a ``hetgraph`` command is invalid for the data it names."""


#: Files whose presence makes a directory one of hetgraph's (or a model's), by kind.
_OWNED_MARKERS = {  # a checkpoint holds adapter files too, so it is recognised first
    "checkpoint": (TRAINER_STATE, OPTIMIZER_WEIGHTS),
    "datastore": (DATASTORE_METADATA, DATASTORE_PROGRESS, DOC_NAMES),
    "index": (INDEX_METADATA, INDEX_FILE, INDEX_SHARDS_DIR),
    "adapter": (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_RESULT, CHECKPOINT_DIR),
}
#: A pipeline run directory's own files (its other content is in sub-directories).
_RUN_FILES = (RUN_CONFIG, RUN_RESULTS, RUN_RESULTS_MARKDOWN, RUN_RESULTS_PLOT)


def directory_kind(directory: Path) -> str | None:
    r"""``"datastore"``, ``"index"``, ``"adapter"``, ``"checkpoint"``, ``"model"`` (a Hugging
    Face model folder: ``config.json`` with tokenizer or weight files), ``"run"`` (a
    ``hetgraph demo`` run directory) or ``None``: what owns the files of ``directory``."""
    if not directory.is_dir():
        return None
    for kind, markers in _OWNED_MARKERS.items():
        if any((directory / name).exists() for name in markers):
            return kind
    if (directory / RUN_CONFIG).is_file() and any(
        (directory / name).is_dir() for name in (RUN_DATASTORE_DIR, RUN_ADAPTER_DIR)
    ):
        return "run"
    if (directory / HF_MODEL_CONFIG).is_file() and (
        any((directory / name).is_file() for name in (HF_TOKENIZER_CONFIG, *HF_TOKENIZER_FILES))
        or any(directory.glob("*.safetensors"))
        or any(directory.glob("*.bin"))
    ):
        return "model"
    return None


def _existing_ancestor(path: Path) -> Path:
    # The nearest of path, its parent, … that exists (what a mkdir -p would start from).
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_can_create_in(directory: Path, option: str, path: Path) -> None:
    r"""Refuse ``path`` (``option``'s file or directory) unless ``directory`` (``path`` or its
    parent) can be created and written: its nearest existing ancestor must be a directory in
    which a file can be made (probed with an empty temporary directory, removed at once:
    permission bits do not tell root, a read-only mount or ``/proc`` apart)."""
    ancestor = _existing_ancestor(directory)
    if not ancestor.is_dir():
        raise CommandLineError(
            f"{option} {path}: {ancestor} is a file, not a directory; give a path under a directory"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hetgraph-probe-", dir=ancestor))
    except OSError as error:
        raise CommandLineError(
            f"{option} {path}: cannot create anything in {ancestor} "
            f"({error.strerror}); choose a writable directory"
        ) from None


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def check_output_directory(
    path: str | Path, option: str, kind: str, accept: tuple[str, ...] = ()
) -> None:
    r"""Refuse ``path`` as the output directory of a command (``option`` is ``--out``),
    before any model is loaded: an existing file, a directory that cannot be created or
    written, or a directory that holds another kind of hetgraph (or model) data than
    ``kind`` (a datastore, an adapter …; ``accept`` lists further kinds that may be
    there)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandLineError(
            f"{option} {path} is an existing file, not a directory; give "
            f"the path of a (new or existing) {kind} directory"
        )
    found = directory_kind(path)
    if found is not None and found not in (kind, *accept):
        raise CommandLineError(
            f"{option} {path} holds {_a(found)}, not {_a(kind)}; give "
            "another directory (a new one is created)"
        )
    _check_can_create_in(path, option, path)


def check_output_file(path: Path, option: str, inputs: tuple[Path | None, ...] = ()) -> None:
    r"""Refuse ``path`` as an output file (``--json``, ``--plot``) before any work: a
    directory, a path under a file, a directory that cannot be written, one of the command's
    ``inputs``, or a file inside a datastore, index, adapter, checkpoint or model directory
    (or a run directory's own ``config.json`` / ``results.*``), whose files hetgraph owns."""
    if path.is_dir():
        example = path / ("results.png" if option == "--plot" else "results.json")
        raise CommandLineError(f"{option} {path} is a directory; give a file path, e.g. {example}")
    resolved = Path(os.path.abspath(path)).resolve()
    for source in inputs:
        if source is not None and Path(os.path.abspath(source)).resolve() == resolved:
            raise CommandLineError(
                f"{option} {path} is an input of this command; write the results to another file"
            )
    kind = directory_kind(resolved.parent)
    if kind is not None and (kind != "run" or resolved.name in _RUN_FILES):
        raise CommandLineError(
            f"{option} {path} would write into {resolved.parent}, "
            f"{_a(kind)} directory whose files hetgraph owns; write the "
            "results elsewhere (e.g. beside that directory)"
        )
    _check_can_create_in(path.parent, option, path)


def check_plot_path(path: Path, option: str = "--plot") -> str:
    r"""The matplotlib format of ``path`` (its suffix; none: PNG), refused unless matplotlib
    can write it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".") or "png"
    if suffix not in formats:
        raise CommandLineError(
            f"{option} {path}: matplotlib cannot write .{suffix} files; "
            f"use one of .{', .'.join(sorted(formats))} (e.g. .png)"
        )
    return suffix


def check_layers(model: Any, options: dict[str, list[int | None]]) -> None:
    r"""Refuse decoder-layer numbers (``{option: [layer, …]}``; ``None`` is the LM head)
    outside the model's ``-L … L-1``, as soon as the model is loaded."""
    from hetgraph.models.layers import num_decoder_layers

    count = num_decoder_layers(model)
    for option, layers in options.items():
        for layer in layers:
            if layer is not None and not -count <= layer < count:
                raise CommandLineError(
                    f"{option} {layer} is outside the model's {count} decoder layers; give "
                    f"{-count} … {count - 1} (negative counts from the last)"
                    + (" or 'head'" if option == "--layer" else "")
                )


def check_positions(model: Any, tokens: int, option: str, new_tokens: int = 0) -> None:
    r"""Refuse a text of ``tokens`` tokens (``option``), plus ``new_tokens`` to generate,
    beyond the model's maximum positions, before any forward pass: GPT-2 fails with an
    ``IndexError`` there and rotary models run on silently, slowly and degraded."""
    from hetgraph.models.checks import max_positions

    limit = max_positions(model)
    if limit is None or tokens + new_tokens <= limit:
        return
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if new_tokens:
        raise CommandLineError(
            f"{option} is {tokens} tokens and --max-new-tokens {new_tokens}: {tokens + new_tokens}"
            f" positions, more than the {limit} the model ({model_type}) supports; shorten "
            f"{option} or lower --max-new-tokens (together at most {limit})"
        )
    raise CommandLineError(
        f"{option} is {tokens} tokens, more than the {limit} positions the "
        f"model ({model_type}) supports; shorten {option}"
    )
