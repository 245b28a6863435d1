r"""The index over encoded keys, in the encoder's directory (``ENC/index/``).

:func:`build_encoded_index` re-embeds every stored key through the encoder in chunks into
``ENC/index/encoded_keys.npy`` (float16), recording after each chunk what is done in
``encoding_progress.json``, so an interrupted build resumes where it stopped (the same call
again) and gives the same index; then it builds a FAISS index over the encoded keys with the
project's rules (:func:`hetgraph.index.build_index`: exact ``Flat`` below
:data:`~hetgraph.index.EXACT_SEARCH_LIMIT` rows, IVF-PQ above; inner product for a learned
encoder, squared L2 for the identity) and finally writes ``encoding.json``: the encoder's
and the datastore's fingerprints. :meth:`EncodedIndex.load` refuses an index whose
fingerprints are not those of the encoder and datastore it is used with.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hetgraph.encoder.model import EncoderError, RelationEncoder
from hetgraph.integrity import atomic_write_json_record, open_resumable_rows, read_json_record
from hetgraph.io import INDEX_DIR
from hetgraph.locking import directory_lock

logger = logging.getLogger(__name__)

__all__ = ["ENCODED_KEYS", "ENCODING_RECORD", "EncodedIndex", "build_encoded_index"]

#: The re-embedded keys (float16 ``[N, d′]``) in ``ENC/index/``.
ENCODED_KEYS = "encoded_keys.npy"
#: Chunks re-embedded so far (JSON with its own checksum); removed when the build completes.
ENCODING_PROGRESS = "encoding_progress.json"
#: What the index was built from (JSON with its own checksum), written last.
ENCODING_RECORD = "encoding.json"


def build_hint(datastore: Any, encoder_dir: Path) -> str:
    return (
        f"build it (hetgraph index build --datastore {getattr(datastore, 'path', 'DS')} "
        f"--encoder {encoder_dir})"
    )


def _identity(datastore: Any, encoder: RelationEncoder, chunk_rows: int) -> dict[str, Any]:
    return {
        "encoder_fingerprint": encoder.fingerprint,
        "datastore_fingerprint": datastore.fingerprint,
        "rows": len(datastore),
        "dim": encoder.dim,
        "chunk_rows": int(chunk_rows),
    }


def _encode_keys(
    datastore: Any, encoder: RelationEncoder, out: Path, chunk_rows: int, show_progress: bool
) -> None:
    identity = _identity(datastore, encoder, chunk_rows)
    encoded, done = open_resumable_rows(
        out / ENCODED_KEYS, out / ENCODING_PROGRESS, identity, "chunks_done"
    )
    n = len(datastore)
    chunks = -(-n // chunk_rows)
    if done:
        logger.info("resuming the re-embedding at chunk %d of %d", done, chunks)
    with tqdm(
        total=n,
        initial=min(n, done * chunk_rows),
        desc="re-embed",
        unit="row",
        disable=not show_progress,
        dynamic_ncols=True,
    ) as bar:
        for chunk in range(done, chunks):
            start, stop = chunk * chunk_rows, min(n, (chunk + 1) * chunk_rows)
            vectors = encoder.encode(datastore.keys[start:stop], batch_rows=chunk_rows)
            encoded[start:stop] = vectors.cpu().numpy().astype(np.float16)
            encoded.flush()
            atomic_write_json_record(
                out / ENCODING_PROGRESS, {**identity, "chunks_done": chunk + 1, "chunks": chunks}
            )
            bar.update(stop - start)
    del encoded


def build_encoded_index(
    datastore: Any,
    encoder_dir: str | Path,
    config: Any = None,
    *,
    chunk_rows: int = 65536,
    show_progress: bool = True,
) -> EncodedIndex:
    r"""Re-embed ``datastore``'s keys with the encoder saved in ``encoder_dir`` and build
    the index over them in ``encoder_dir/index/`` (resumable; see the module docstring).

    Args:
        datastore: a :class:`~hetgraph.datastore.Datastore`.
        encoder_dir: a directory written by :meth:`RelationEncoder.save_pretrained`.
        config: :class:`~hetgraph.index.IndexConfig` (its metric is the encoder's).
        chunk_rows: rows re-embedded (and recorded) per chunk.

    Raises:
        EncoderError: no encoder there, or one for keys of another width.
        hetgraph.locking.LockError: another process is building in ``encoder_dir``.
    """
    from hetgraph.index import IndexConfig, build_index

    encoder_dir = Path(encoder_dir)
    encoder = RelationEncoder.from_pretrained(encoder_dir)
    if encoder.config.input_dim != datastore.dim:
        raise EncoderError(
            f"encoder {encoder_dir} reads {encoder.config.input_dim}-dimensional "
            f"keys but datastore {datastore.path} stores {datastore.dim}; train "
            f"an encoder on it (hetgraph encoder train --datastore "
            f"{datastore.path} --out DIR)"
        )
    config = dataclasses.replace(config or IndexConfig(), metric=encoder.metric)
    out = encoder_dir / INDEX_DIR
    with directory_lock(encoder_dir, "encoder"):
        out.mkdir(parents=True, exist_ok=True)
        (out / ENCODING_RECORD).unlink(missing_ok=True)  # an unfinished build never loads
        _encode_keys(datastore, encoder, out, chunk_rows, show_progress)
        keys = np.load(out / ENCODED_KEYS, mmap_mode="r", allow_pickle=False)
        build_index(keys, out, config)
        identity = _identity(datastore, encoder, chunk_rows)
        atomic_write_json_record(
            out / ENCODING_RECORD,
            {**identity, "datastore": str(datastore.path), "metric": encoder.metric},
        )
        (out / ENCODING_PROGRESS).unlink(missing_ok=True)
    return EncodedIndex.load(encoder_dir, datastore)


class EncodedIndex:
    r"""A FAISS index over encoded keys with the encoder that made them: :meth:`search` takes
    raw retrieval-site hidden states, encodes them and searches.

    Attributes:
        index: the :class:`~hetgraph.index.DatastoreIndex` over the encoded keys.
        encoder: the :class:`~hetgraph.encoder.RelationEncoder`.
        directory: the encoder's directory.
    """

    def __init__(self, index: Any, encoder: RelationEncoder, directory: Path) -> None:
        self.index = index
        self.encoder = encoder
        self.directory = directory

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def __len__(self) -> int:
        return self.ntotal

    @property
    def metric(self) -> str:
        return self.index.metric

    def __repr__(self) -> str:
        return (
            f"EncodedIndex(directory={str(self.directory)!r}, ntotal={self.ntotal}, "
            f"dim={self.index.dim}, metric={self.metric!r}, factory={self.index.factory!r})"
        )

    @classmethod
    def load(cls, encoder_dir: str | Path, datastore: Any, *, config: Any = None) -> EncodedIndex:
        r"""Open ``encoder_dir/index/`` for ``datastore`` (a
        :class:`~hetgraph.datastore.Datastore`).

        Raises:
            EncoderError: no complete encoded index there, or one built from another
                encoder or another datastore (both directories and the fix are named).
        """
        from hetgraph.index import DatastoreIndex

        encoder_dir = Path(encoder_dir)
        encoder = RelationEncoder.from_pretrained(encoder_dir)
        out, hint = encoder_dir / INDEX_DIR, build_hint(datastore, encoder_dir)
        if not (out / ENCODING_RECORD).is_file():
            raise EncoderError(
                f"no complete encoded index in {out} ({ENCODING_RECORD} missing: "
                f"never built, or its build was interrupted); {hint}"
            )
        record = read_json_record(out / ENCODING_RECORD, EncoderError, hint)
        wrong = []
        if record.get("encoder_fingerprint") != encoder.fingerprint:
            wrong.append(
                f"encoder fingerprint {record.get('encoder_fingerprint')} recorded, "
                f"{encoder.fingerprint} in {encoder_dir}"
            )
        if record.get("datastore_fingerprint") != datastore.fingerprint or record.get(
            "rows"
        ) != len(datastore):
            wrong.append(
                f"datastore fingerprint {record.get('datastore_fingerprint')} recorded, "
                f"{datastore.fingerprint} in {datastore.path}"
            )
        if wrong:
            raise EncoderError(
                f"encoded index {out} does not match encoder {encoder_dir} and "
                f"datastore {datastore.path} ({'; '.join(wrong)}); rebuild it "
                f"(hetgraph index build --datastore {datastore.path} --encoder "
                f"{encoder_dir})"
            )
        index = DatastoreIndex.load(out, config=config)
        index.keys = np.load(out / ENCODED_KEYS, mmap_mode="r", allow_pickle=False)
        return cls(index, encoder, encoder_dir)

    @torch.no_grad()
    def encode_queries(self, queries: Any) -> torch.Tensor:
        """Raw ``[Q, d]`` hidden states → encoded ``[Q, d′]`` float32 (on the CPU)."""
        q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.array(queries))
        return self.encoder(q.to(next(iter(self.encoder.buffers()), q).device)).cpu()

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        r"""The ``k`` nearest stored rows of raw ``[Q, d]`` queries through the encoder:
        ``(distances float32 [Q, k], ids int64 [Q, k])`` as
        :meth:`hetgraph.index.DatastoreIndex.search` (negated inner products, or squared L2
        for the identity)."""
        return self.index.search(self.encode_queries(queries), k)
