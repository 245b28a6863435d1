r"""A datastore keyed by the adapter's own features: GNN-LM + kNN as the paper runs it.

hetgraph's default GNN-LM + kNN searches the base model's keys (the LM-head input of the
frozen LM). The paper's GNN-LM + kNN searches a datastore keyed by GNN-LM's own features:
the fused hidden state that feeds the LM head, for stored rows and queries alike.
:func:`rekey_datastore` writes those keys for every datastore row. When retrieval and every
fused site are the LM-head input (:attr:`~hetgraph.FusionEngine.can_run_from_datastore`) the
base model's state at a corpus position *is* its stored key, so the fused state needs no
base-model pass, only the adapter over the row's retrieved neighbours
(:func:`fused_head_states`); an adapter with fused decoder layers runs the fused model over
the stored tokens instead (:func:`model_head_states`, the datastore build's windows again).
Both are leakage-filtered as in training, so no row sees its own next token. With ``c2c``
edges (paper mode), a knowledge graph or the model pass, rows are fused in the datastore's
own strided windows, so that each row has the context it had when it was stored.

Layout of the output directory (default ``ADAPTER/rekeyed/``; never the datastore's)::

    keys.npy             float16 [N, d]  fused head state of every datastore row
    rekey_progress.json  rows done so far (JSON with its own checksum); removed at the end
    index/               FAISS index over keys.npy (hetgraph.index.build_index)
    rekey.json           the adapter's and the datastore's fingerprints, written last

An interrupted pass resumes where it stopped (the same call again) and gives the same keys;
:meth:`RekeyedIndex.load` refuses a directory whose fingerprints are not those of the
datastore (and adapter) it is used with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hetgraph.corpus.windows import Window, sliding_windows
from hetgraph.datastore.build import window_batches
from hetgraph.datastore.capture import HiddenStateCapture, StopForward
from hetgraph.errors import HetgraphError
from hetgraph.fusion.config import HEAD
from hetgraph.fusion.retrieval import Retriever
from hetgraph.index import DatastoreIndex, IndexConfig, build_index
from hetgraph.integrity import (
    atomic_write_json_record,
    check_file_record,
    file_record,
    open_resumable_rows,
    read_json_record,
)
from hetgraph.io import INDEX_DIR, StreamingHash
from hetgraph.locking import directory_lock

logger = logging.getLogger(__name__)

__all__ = [
    "REKEYED_DIR",
    "RekeyError",
    "RekeyedIndex",
    "adapter_fingerprint",
    "check_rekeyable",
    "fused_head_states",
    "model_head_states",
    "needs_model_pass",
    "rekey_datastore",
]

#: Default output directory inside the adapter's directory.
REKEYED_DIR = "rekeyed"
#: The re-keyed keys (float16 ``[N, d]``).
REKEYED_KEYS = "keys.npy"
#: Rows re-keyed so far (JSON with its own checksum); removed when the pass completes.
REKEY_PROGRESS = "rekey_progress.json"
#: What the re-keyed store was built from (JSON with its own checksum), written last.
REKEY_RECORD = "rekey.json"


class RekeyError(HetgraphError):
    """An adapter that cannot be re-keyed, or a re-keyed store that does not fit."""


def adapter_fingerprint(engine: Any) -> str:
    """A fingerprint of a :class:`~hetgraph.FusionEngine`'s fusion config and trained tensors
    (adapters and gates): what the re-keyed keys were computed with."""
    digest = StreamingHash(repr(sorted(engine.config.to_dict().items())))
    for key, tensor in sorted(engine.adapter_state_dict().items()):
        digest.update_framed(key.encode())
        digest.update_framed(tensor.float().numpy().tobytes())
    return digest.hexdigest()


def check_rekeyable(engine: Any) -> None:
    """Refuse, in one line naming the reason, an engine whose fused head states at datastore
    rows cannot be written as keys that its queries search.

    Raises:
        RekeyError: retrieval is not at the LM-head input (the evaluation's queries are
            head states), the neighbours are random, or retrieval goes through a relation
            encoder.
    """
    reason = None
    if engine.retrieval_site != HEAD:
        reason = (
            f"the datastore's keys are decoder layer {engine.retrieval_site}'s, not the "
            "LM-head input's"
        )
    elif engine.config.neighbours != "retrieved":
        reason = "it is a random-neighbours control"
    elif getattr(engine.index, "encoder", None) is not None:
        reason = "it retrieves through a relation encoder"
    if reason is not None:
        raise RekeyError(
            f"cannot re-key with this adapter: {reason}; re-keying needs an adapter that "
            "retrieves from a datastore keyed at the LM-head input (the default)"
        )


def needs_model_pass(engine: Any) -> bool:
    """Whether the fused head states at datastore rows need the base model run over the
    stored tokens (a fused decoder layer, or prefetch): otherwise they are computed from
    the stored keys alone (:func:`fused_head_states`)."""
    return not engine.can_run_from_datastore


class _HeadInput(nn.Module):
    """Stands in for the LM head: returns its input and keeps the first one it was given
    (the fused state; with ``orig_prob_ratio`` the unfused one comes second)."""

    def __init__(self) -> None:
        super().__init__()
        self.first: Tensor | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        if self.first is None:
            self.first = hidden
        return hidden


@torch.no_grad()
def fused_head_states(lm: Any, rows: Tensor) -> Tensor:
    """``[B, T, d]`` fused LM-head input of a :class:`~hetgraph.HetGraphLM` at datastore rows
    ``[B, T]``, from their stored keys: what :meth:`~hetgraph.HetGraphLM.forward_from_datastore`
    feeds the head (leakage-filtered like training). With ``c2c`` edges (or a knowledge
    graph) every row of ``rows`` must be a contiguous span."""
    # The engine's own from-datastore path with a head that hands back its input, so the
    # fused state is exactly the one its logits are computed from.
    head = _HeadInput()
    lm.engine.logits_from_datastore(
        rows,
        head,
        embedding=lm.model.get_input_embeddings(),
        dtype=next(lm.model.parameters()).dtype,
    )
    return head.first


@torch.no_grad()
def model_head_states(lm: Any, rows: Tensor) -> Tensor:
    """``[B, T, d]`` fused LM-head input of a :class:`~hetgraph.HetGraphLM` run over the
    stored tokens of contiguous spans of datastore rows ``[B, T]``, with
    ``query_positions=rows`` (leakage-filtered like training): the corpus pass an adapter
    with fused decoder layers needs. The head itself is never run."""
    tokens = np.asarray(lm.engine.datastore.tokens[rows.numpy()], dtype=np.int64)
    device = next(lm.model.parameters()).device
    capture = HiddenStateCapture(lm.model, [None], stop_forward=True)
    attached_here = not lm.is_attached
    lm.attach()  # first, so that the capture's pre-hook on the head reads the fused input
    try:
        with capture, contextlib.suppress(StopForward):
            lm(
                torch.from_numpy(tokens).to(device),
                query_positions=rows.to(device),
                use_cache=False,
            )
    finally:
        if attached_here:
            lm.detach()
    return capture.states[None]


def _in_windows(engine: Any, model_pass: bool) -> bool:
    # c2c edges link a span's positions, a knowledge graph links entities on its tokens, and
    # the base model reads a row in the window it was stored from.
    return model_pass or bool(engine.graph_config.c2c) or engine.knowledge is not None


def _span_batches(engine: Any, batch_rows: int, model_pass: bool) -> list[list[Window]]:
    """Batches of row spans to fuse: independent rows in spans of ``batch_rows`` rows, or
    with ``c2c`` (or a knowledge graph, linked on a span's tokens) the datastore's own
    strided windows: the causal context a row had when it was stored."""
    n, meta = len(engine.datastore), engine.datastore.metadata
    if not _in_windows(engine, model_pass):
        return [[w] for w in sliding_windows(n, batch_rows, batch_rows)]
    windows = sliding_windows(n, meta.context_length, meta.stride)
    return window_batches(windows, max(1, batch_rows // meta.context_length))


def _identity(engine: Any, batch_rows: int, model_pass: bool) -> dict[str, Any]:
    store = engine.datastore
    return {
        "adapter_fingerprint": adapter_fingerprint(engine),
        "datastore_fingerprint": store.fingerprint,
        "rows": len(store),
        "dim": store.dim,
        "batch_rows": int(batch_rows),
        "spans": "windows" if _in_windows(engine, model_pass) else "rows",
        "pass": "model" if model_pass else "stored keys",
    }


def _fuse_batch(lm: Any, batch: list[Window], model_pass: bool) -> tuple[Tensor, Tensor]:
    """(rows ``[n]``, fused float16 states ``[n, d]`` on the CPU) of a batch's scored rows."""
    length = batch[0].end - batch[0].start
    starts = torch.tensor([w.start for w in batch], dtype=torch.long)
    rows = starts[:, None] + torch.arange(length)
    states = (model_head_states if model_pass else fused_head_states)(lm, rows).float()
    firsts = torch.tensor([w.score_start for w in batch], dtype=torch.long)
    scored = rows >= firsts[:, None]
    half = states[scored.to(states.device)].cpu().to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise RekeyError(
            f"re-keying: the fused states of rows {int(rows[0, 0])}… are NaN or overflow "
            "float16; check the adapter (hetgraph verify) or load the model in float32"
        )
    return rows[scored], half


def _rekey_rows(
    lm: Any, out: Path, batch_rows: int, chunk_rows: int, model_pass: bool, show: bool
) -> None:
    identity = _identity(lm.engine, batch_rows, model_pass)
    keys, done = open_resumable_rows(
        out / REKEYED_KEYS, out / REKEY_PROGRESS, identity, "rows_done"
    )
    n = identity["rows"]
    if done:
        logger.info("resuming the re-keying at row %d of %d", done, n)
    todo = [b for b in _span_batches(lm.engine, batch_rows, model_pass) if b[-1].end > done]
    since_record = 0
    bar = tqdm(total=n, initial=done, desc="re-key", unit="row", disable=not show)
    with bar:
        for number, batch in enumerate(todo):
            rows, half = _fuse_batch(lm, batch, model_pass)
            keys[rows.numpy()] = half.numpy()
            since_record += len(rows)
            bar.update(len(rows))
            if since_record >= chunk_rows or number == len(todo) - 1:
                keys.flush()  # the rows first, then the record that says they are there
                record = {**identity, "rows_done": batch[-1].end}
                atomic_write_json_record(out / REKEY_PROGRESS, record)
                since_record = 0
    del keys


def _check_out(out: Path, datastore: Any) -> None:
    ds = Path(datastore.path).resolve()
    if out.resolve() in (ds, ds / INDEX_DIR):
        raise RekeyError(
            f"--out {out} is the datastore's own directory; the re-keyed store never "
            "overwrites it: give another directory (default ADAPTER/rekeyed)"
        )


def rekey_datastore(
    lm: Any,
    out: str | Path,
    index_config: Any = None,
    *,
    adapter_dir: str | Path | None = None,
    batch_rows: int = 256,
    chunk_rows: int = 16384,
    model_pass: bool | None = None,
    show_progress: bool = True,
) -> RekeyedIndex:
    r"""Write the fused LM-head state of every datastore row of ``lm`` as new keys in
    ``out`` and build a FAISS index over them (see the module docstring; resumable).

    Args:
        lm: a :class:`~hetgraph.HetGraphLM` with its trained adapter loaded.
        out: the output directory (never the datastore's own).
        index_config: :class:`~hetgraph.index.IndexConfig` of the new index (default:
            ``auto``, squared L2, as ``hetgraph index build``).
        adapter_dir: where the adapter was loaded from (recorded, for messages).
        batch_rows: rows fused per call (with ``c2c``: whole windows of that many rows).
        chunk_rows: rows between two progress records (what an interruption may redo).
        model_pass: run the fused model over the stored tokens in the datastore's windows
            (:func:`model_head_states`) instead of fusing the stored keys
            (:func:`fused_head_states`); default: only when the adapter needs it
            (:func:`needs_model_pass`: a fused decoder layer, or prefetch).
        show_progress: tqdm bar.

    Raises:
        RekeyError: the adapter cannot be re-keyed (:func:`check_rekeyable`), ``out`` is the
            datastore's directory, or a fused state is not finite.
        hetgraph.locking.LockError: another process is re-keying into ``out``.
    """

    engine, out = lm.engine, Path(out)
    check_rekeyable(engine)
    _check_out(out, engine.datastore)
    needed = needs_model_pass(engine)
    if model_pass is False and needed:
        raise RekeyError(
            "this adapter fuses decoder layers (or sets prefetch): its head states need the "
            "model pass over the stored tokens; leave model_pass at None"
        )
    model_pass = needed if model_pass is None else model_pass
    was_training = engine.training
    engine.eval()  # dropout off: the keys are the eval-time fused states
    try:
        with directory_lock(out, "re-keyed store"):
            out.mkdir(parents=True, exist_ok=True)
            (out / REKEY_RECORD).unlink(missing_ok=True)  # an unfinished pass never loads
            _rekey_rows(lm, out, batch_rows, chunk_rows, model_pass, show_progress)
            keys = np.load(out / REKEYED_KEYS, mmap_mode="r", allow_pickle=False)
            index = build_index(keys, out / INDEX_DIR, index_config or IndexConfig())
            record = {
                **_identity(engine, batch_rows, model_pass),
                "datastore": str(engine.datastore.path),
                "adapter": None if adapter_dir is None else str(adapter_dir),
                "metric": index.metric,
                "factory": index.factory,
                "keys_file": file_record(out / REKEYED_KEYS),  # checked (sampled) at load
            }
            atomic_write_json_record(out / REKEY_RECORD, record)
            (out / REKEY_PROGRESS).unlink(missing_ok=True)
    finally:
        engine.train(was_training)
    return RekeyedIndex.load(out, engine.datastore, engine=engine)


@dataclasses.dataclass(frozen=True)
class RekeyedIndex:
    r"""A re-keyed store opened for search: the FAISS index over the fused keys (its
    ``keys`` are the re-keyed ones, for exact re-ranking) and what it was built from.

    Search it with fused LM-head states through :meth:`retriever`: the rows it returns are
    the original datastore's, whose next tokens and documents are unchanged.

    Attributes:
        directory: the re-keyed store's directory.
        index: :class:`~hetgraph.index.DatastoreIndex` over ``keys.npy``.
        record: ``rekey.json`` (fingerprints, datastore and adapter paths, metric).
    """

    directory: Path
    index: Any
    record: dict[str, Any]

    @classmethod
    def load(
        cls, directory: str | Path, datastore: Any, *, engine: Any = None, config: Any = None
    ) -> RekeyedIndex:
        """Open ``directory`` for ``datastore``; with ``engine`` (a
        :class:`~hetgraph.FusionEngine` with its adapter loaded) the adapter must be the one
        the keys were computed with.

        Raises:
            RekeyError: no complete re-keyed store there, or one built from another datastore
                or adapter (both named, with the fix).
        """
        directory = Path(directory)
        hint = f"re-key it (hetgraph datastore rekey --datastore {datastore.path} --adapter DIR)"
        if not (directory / REKEY_RECORD).is_file():
            raise RekeyError(
                f"no complete re-keyed store in {directory} ({REKEY_RECORD} missing: never "
                f"built, or its pass was interrupted); {hint}"
            )
        record = read_json_record(directory / REKEY_RECORD, RekeyError, hint)
        wrong = []
        if record.get("datastore_fingerprint") != datastore.fingerprint or record.get(
            "rows"
        ) != len(datastore):
            wrong.append(
                f"datastore fingerprint {record.get('datastore_fingerprint')} recorded, "
                f"{datastore.fingerprint} in {datastore.path}"
            )
        if engine is not None and record.get("adapter_fingerprint") != adapter_fingerprint(engine):
            wrong.append(
                f"adapter fingerprint {record.get('adapter_fingerprint')} recorded "
                f"(adapter {record.get('adapter')}), another adapter given"
            )
        problem = check_file_record(
            directory / REKEYED_KEYS, record.get("keys_file") or {}, full=False
        )
        if problem is not None:
            wrong.append(f"{REKEYED_KEYS} {problem}")
        if wrong:
            raise RekeyError(
                f"re-keyed store {directory} does not match ({'; '.join(wrong)}); {hint}"
            )
        index = DatastoreIndex.load(directory / INDEX_DIR, config=config)
        index.keys = np.load(directory / REKEYED_KEYS, mmap_mode="r", allow_pickle=False)
        return cls(directory, index, record)

    @property
    def keys(self) -> np.ndarray:
        """float16 ``[N, d]`` the re-keyed keys (memmap)."""
        return self.index.keys

    def retriever(self, datastore: Any) -> Any:
        """A :class:`~hetgraph.Retriever` over this index and ``datastore``'s rows."""
        return Retriever(datastore, self.index)
