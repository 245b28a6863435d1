r"""The datastore's per-row integer columns, read where they lie.

A datastore keeps each row's token, document id and next token as int32 numpy memmaps
(:class:`~hetgraph.datastore.Datastore`). Graph building, the leakage filter and the kNN-LM
mixture need those columns only at the rows a batch retrieved, so :func:`gather_rows`
indexes a memmap on the CPU with the batch's rows (one vectorised numpy gather: only the
pages that hold them are read) and moves the gathered rows to the device that asked. No
column is ever copied whole into RAM or onto a GPU: a 10⁹-row store costs disk and page
cache, not 32 bytes per row of resident memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: A ``[N]`` integer column: a numpy array (typically a read-only memmap) or a tensor.
Column = np.ndarray | Tensor


def gather_rows(table: Column, index: Tensor, device: torch.device | None = None) -> Tensor:
    """``table[index]`` as int64 on ``device`` (default: ``index``'s device).

    A numpy ``table`` (a datastore memmap) is indexed on the CPU, so only the rows asked for
    are read; the gathered rows (int32 where the column is) move to ``device`` and widen
    there. A tensor ``table`` is indexed on its own device. ``index`` must hold valid rows
    (clamp missing ones first).
    """
    device = index.device if device is None else device
    if isinstance(table, Tensor):
        return table[index.to(table.device)].to(device=device, dtype=torch.long)
    rows = np.asarray(table)[index.detach().cpu().numpy()]
    return torch.from_numpy(rows).to(device=device, dtype=torch.long)


def column_length(table: Column) -> int:
    """Rows of a column (without reading it)."""
    return int(table.shape[0])


@dataclass(frozen=True)
class CorpusTable:
    r"""The token, document and next-token columns of a datastore's rows.

    The columns are held as given (a datastore's read-only memmaps stay memmaps; tensors
    stay tensors on their device) and read through :func:`gather_rows` one batch of rows at
    a time. Shared by the retriever (the leakage filter reads document ids) and the graph
    builder (tokens and documents of the windows, next tokens of the neighbours).

    Args:
        tokens: ``[N]`` token at each row.
        doc_ids: ``[N]`` document of each row.
        next_tokens: ``[N]`` the token that followed each row (``None``: not known).
    """

    tokens: Column
    doc_ids: Column
    next_tokens: Column | None = None

    def __post_init__(self) -> None:
        lengths = {
            column_length(c) for c in (self.tokens, self.doc_ids, self.next_tokens) if c is not None
        }
        if len(lengths) != 1:
            raise ValueError(f"corpus columns must have one length, got {sorted(lengths)}")

    @classmethod
    def of(cls, datastore: Any) -> CorpusTable:
        """The columns of a :class:`~hetgraph.datastore.Datastore` (its memmaps, not copies)."""
        return cls(datastore.tokens, datastore.doc_ids, datastore.next_tokens)

    def __len__(self) -> int:
        return column_length(self.doc_ids)

    def next_tokens_of(self, rows: Tensor) -> Tensor:
        """The token that followed each of ``rows`` (any shape; ``-1`` where the row is
        ``-1``), int64 on ``rows``' device."""
        if self.next_tokens is None:
            raise ValueError("this corpus table has no next tokens")
        tokens = gather_rows(self.next_tokens, rows.clamp(min=0))
        return tokens.masked_fill(rows < 0, -1)
