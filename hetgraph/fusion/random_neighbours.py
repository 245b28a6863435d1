r"""The random-neighbours control: datastore rows drawn uniformly instead of retrieved.

With ``FusionConfig(neighbours="random")`` every position's ``k`` neighbours are rows drawn
uniformly (without replacement) from the datastore: the same adapter, graph and training,
without retrieval. The draw is a function of the seed and the query's *identity* alone,
never of a generator's state, so it does not depend on batching, on the order of calls
or on the number of threads:

- a query whose text is in the datastore (training, ``query_positions``) is its row;
- any other query (evaluation, generation) is the last :data:`TOKEN_CONTEXT` tokens up to
  and including it (fewer at the start of a text; padding counts as no token).

Each draw is a counter-based hash (``lowbias32`` rounds, in int64 tensors without
overflow) of ``(seed, identity, draw index)``: vectorised, and the same on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Tokens (the query's own and those before it) that identify a query without a row.
TOKEN_CONTEXT = 32

_MASK32 = 0xFFFFFFFF
# Domain tags: a row identity and a token identity never coincide.
_ROW_TAG, _TOKEN_TAG = 0x5EED0001, 0x5EED0002
# Two independent 32-bit lanes make a 64-bit identity (no collisions among 2^32 rows).
_LANES = (0x243F6A88, 0x85A308D3)
# Redrawing duplicates stops after this many rounds (each round redraws a duplicate with
# probability below 1/2); any left is dropped as missing (-1), as a short retrieval is.
_MAX_ROUNDS = 64


def _mul32(x: Tensor, m: int) -> Tensor:
    # (x * m) mod 2^32 for 0 <= x < 2^32 in 16-bit halves: no int64 product overflows.
    return (((((x >> 16) * m) & 0xFFFF) << 16) + (x & 0xFFFF) * m) & _MASK32


def _mix(x: Tensor) -> Tensor:
    # Chris Wellons' lowbias32 integer hash.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(state: Tensor, word: Tensor | int) -> Tensor:
    return _mix(state ^ (word & _MASK32))


def _seeded(seed: int, tag: int, shape: tuple[int, ...], device: torch.device) -> list[Tensor]:
    lanes = []
    for lane in _LANES:
        state = torch.full(shape, lane, dtype=torch.long, device=device)
        for word in (tag, seed & _MASK32, (seed >> 32) & _MASK32):
            state = _absorb(state, word)
        lanes.append(state)
    return lanes


def row_identities(rows: Tensor, seed: int) -> Tensor:
    """``[..., 2]`` identities of queries at datastore ``rows`` (any shape, ``>= 0``)."""
    rows = rows.long()
    lanes = [
        _absorb(_absorb(state, rows), rows >> 32)
        for state in _seeded(seed, _ROW_TAG, tuple(rows.shape), rows.device)
    ]
    return torch.stack(lanes, -1)


def token_identities(tokens: Tensor, seed: int, context: int = TOKEN_CONTEXT) -> Tensor:
    """``[B, T, 2]`` identities of the queries at every position of ``[B, T]`` ``tokens``:
    each hashes the ``context`` tokens up to and including it (``-1``: no token, as before
    the start of the text or at padding)."""
    batch, length = tokens.shape
    padded = torch.cat([tokens.new_full((batch, context - 1), -1), tokens], 1).long() + 1
    windows = padded.unfold(1, context, 1)  # [B, T, context], oldest first
    lanes = _seeded(seed, _TOKEN_TAG, (batch, length), tokens.device)
    for i in range(context):
        lanes = [_absorb(state, windows[..., i]) for state in lanes]
    return torch.stack(lanes, -1)


def query_identities(
    positions: Tensor | None, tokens: Tensor | None, batch: int, length: int, seed: int
) -> Tensor:
    """``[B * T, 2]`` identities (on the CPU) of ``B × T`` queries: the datastore row where
    ``positions`` (``[B * T]``, ``-1``: none) has one, else the tokens up to the query
    (``tokens``: ``[B, T' >= T]`` ending at the queries, ``-1`` at padding).

    Raises:
        ValueError: a query has no row and ``tokens`` are missing or of the wrong shape.
    """
    has_row = None if positions is None else (positions >= 0).cpu()
    if has_row is not None and bool(has_row.all()):
        return row_identities(positions.cpu(), seed)
    if tokens is None or tokens.shape[0] != batch or tokens.shape[1] < length:
        raise ValueError(
            "random neighbours are drawn from the query's datastore row or its "
            "tokens: call the model with input_ids (not inputs_embeds)"
        )
    identities = token_identities(tokens.cpu(), seed)[:, tokens.shape[1] - length :]
    identities = identities.reshape(-1, 2)
    if has_row is None:
        return identities
    rows = row_identities(positions.cpu().clamp(min=0), seed)
    return torch.where(has_row[:, None], rows, identities)


def _uniform_rows(identities: Tensor, draws: Tensor, n: int) -> Tensor:
    # Two 32-bit hashes of (identity, draw) make a 62-bit value; its bias mod n is < n / 2^62.
    a, b = identities[:, None, 0], identities[:, None, 1]
    high = _absorb(_absorb(a, draws), b)
    low = _absorb(_absorb(b, draws), a)
    return (((high >> 1) << 31) | (low >> 1)) % n


def _repeated(ids: Tensor) -> Tensor:
    # True at every occurrence of a value after its first (in draw order) in each row.
    values, order = torch.sort(ids, dim=1, stable=True)
    later = torch.zeros_like(ids, dtype=torch.bool)
    later[:, 1:] = values[:, 1:] == values[:, :-1]
    return torch.zeros_like(later).scatter(1, order, later)


def draw_rows(identities: Tensor, count: int, n: int) -> Tensor:
    """``[Q, count]`` distinct rows of ``range(n)`` drawn uniformly for each of ``[Q, 2]``
    query ``identities`` (``count <= n``), in draw order."""
    device = identities.device
    if 2 * count >= n:  # a small datastore: a seeded permutation of all its rows
        keys = _uniform_rows(identities, torch.arange(n, device=device), 1 << 62)
        return torch.argsort(keys, dim=1, stable=True)[:, :count]
    draws = torch.arange(count, device=device).expand(len(identities), count)
    ids = _uniform_rows(identities, draws, n)
    for round_ in range(1, _MAX_ROUNDS + 1):
        repeated = _repeated(ids)
        if not bool(repeated.any()):
            return ids
        # A repeated draw j is redrawn with counter j + round * count: still a pure function
        # of the identity.
        ids = torch.where(repeated, _uniform_rows(identities, draws + round_ * count, n), ids)
    return torch.where(_repeated(ids), torch.full_like(ids, -1), ids)
