r"""Entity linking on token ids: leftmost-longest, non-overlapping alias matches.

:class:`EntityLinker` holds, for every alias length ``n`` up to the longest, the distinct
alias token sequences of that length and a sorted array of their hashes. Linking a batch
``[B, T]`` of token ids runs one step per length (at most
:data:`~hetgraph.kg.aliases.MAX_ALIAS_TOKENS`), never one per token:

1. the polynomial hash of every window of length ``n`` is the hash of length ``n - 1``
   extended by one token (two 31-bit moduli, combined into one ``int64``);
2. :func:`torch.searchsorted` finds each window's hash among the aliases', and the window's
   tokens are compared with the alias's (a hash collision never links);
3. the word-boundary flags (:func:`~hetgraph.kg.aliases.token_flags`) reject a match that
   starts inside a word or is followed by a token continuing one;
4. the longest match per start position gives ``next(s) = s + length`` (``s + 1`` where no
   match starts); the greedy left-to-right choice — the positions reachable from 0 — is
   found by pointer doubling in ``log2 T`` vectorised steps.

Every position of a chosen mention gets the entities of its alias (up to ``max_entities``,
padded with ``-1``). That reads ahead, which suits retrieved corpus windows but not the
positions a causal LM predicts from: :meth:`EntityLinker.causal` links those — the longest
alias *ending* at each position (steps 1–3, indexed by end), visible from the mention's
last token for a few positions, so no position's links depend on a later token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hetgraph.kg.aliases import ENDS_WORD_CHAR, STARTS_WORD_CHAR

_MOD1, _MOD2 = 2_147_483_629, 2_147_483_587  # primes below 2**31
_BASE1, _BASE2 = 1_000_003, 998_244_353


@dataclass
class EntityLinks:
    r"""Linking result for token ids ``[B, T]``.

    Attributes:
        entities: ``[B, T, m]`` entity indices of the mention covering each position
            (``-1`` padding; all ``-1`` outside mentions).
        mention_start: ``[B, T]`` first position of that mention, ``-1`` outside mentions.
        mention_length: ``[B, T]`` its length in tokens, ``0`` outside mentions.
    """

    entities: Tensor
    mention_start: Tensor
    mention_length: Tensor


def _hash_step(h1: Tensor, h2: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    return (h1 * _BASE1 + tokens) % _MOD1, (h2 * _BASE2 + tokens) % _MOD2


def sequence_hashes(sequences: Tensor) -> Tensor:
    r"""The combined hash of each row of ``sequences`` ``[K, n]`` (int64)."""
    h1 = h2 = torch.zeros(sequences.shape[0], dtype=torch.long, device=sequences.device)
    for i in range(sequences.shape[1]):
        h1, h2 = _hash_step(h1, h2, sequences[:, i])
    return h1 * _MOD2 + h2


def _entity_table(inverse: Tensor, entities: Tensor, num_keys: int, m: int) -> Tensor:
    order = torch.sort(inverse, stable=True).indices
    key = inverse[order]
    first = torch.searchsorted(key, key, right=False)
    rank = torch.arange(key.numel()) - first
    keep = rank < m
    table = torch.full((num_keys, m), -1, dtype=torch.long)
    table[key[keep], rank[keep]] = entities[order][keep].long()
    return table


class EntityLinker:
    r"""Leftmost-longest alias matching over token ids (see the module docstring).

    Args:
        tokens, offsets, entities: alias token sequences (sequence ``i`` is
            ``tokens[offsets[i]:offsets[i + 1]]``, naming entity ``entities[i]``), as stored
            by :class:`~hetgraph.kg.store.KnowledgeGraph`.
        max_entities: entities returned per position (``m``); an alias naming more keeps
            its first ``m`` in the order of ``entities``.
        flags: :func:`~hetgraph.kg.aliases.token_flags` of the tokenizer, or ``None`` to
            match regardless of word boundaries.
    """

    def __init__(
        self,
        tokens: np.ndarray | Tensor,
        offsets: np.ndarray | Tensor,
        entities: np.ndarray | Tensor,
        *,
        max_entities: int = 4,
        flags: np.ndarray | Tensor | None = None,
    ) -> None:
        tokens, offsets = torch.as_tensor(tokens).long(), torch.as_tensor(offsets).long()
        entities = torch.as_tensor(entities).long()
        lengths = offsets[1:] - offsets[:-1]
        self.max_entities = max_entities
        self.max_length = int(lengths.max()) if lengths.numel() else 0
        self.keys: list[Tensor] = []  # [K_n, n] distinct sequences of length n
        self.hashes: list[Tensor] = []  # [K_n] their hashes, sorted
        self.order: list[Tensor] = []  # [K_n] key index of each sorted hash
        self.key_offset: list[int] = []  # first global key index of length n
        tables = []
        total = 0
        for n in range(1, self.max_length + 1):
            rows = torch.nonzero(lengths == n).flatten()
            index = offsets[rows, None] + torch.arange(n)
            keys, inverse = torch.unique(tokens[index].reshape(-1, n), dim=0, return_inverse=True)
            hashes, order = torch.sort(sequence_hashes(keys))
            distinct = torch.ones_like(hashes, dtype=torch.bool)
            distinct[1:] = hashes[1:] != hashes[:-1]  # a collision keeps one of the sequences
            self.keys.append(keys)
            self.hashes.append(hashes[distinct])
            self.order.append(order[distinct])
            self.key_offset.append(total)
            tables.append(_entity_table(inverse, entities[rows], keys.shape[0], max_entities))
            total += keys.shape[0]
        self.table = torch.cat(tables) if tables else torch.empty(0, max_entities, dtype=torch.long)
        self.flags = None if flags is None else torch.as_tensor(flags).to(torch.uint8)

    @property
    def num_keys(self) -> int:
        r"""Distinct alias token sequences."""
        return int(self.table.shape[0])

    def to(self, device: torch.device | str) -> EntityLinker:
        r"""Move the tables to ``device`` (in place); returns ``self``."""
        for tensors in (self.keys, self.hashes, self.order):
            tensors[:] = [t.to(device) for t in tensors]
        self.table = self.table.to(device)
        if self.flags is not None:
            self.flags = self.flags.to(device)
        return self

    def _boundaries(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(may_start, may_end)`` ``[B, T + 1]``: a mention may start at ``s`` / end
        before ``s`` without splitting a word."""
        b, t = ids.shape
        ones = torch.ones(b, t + 1, dtype=torch.bool, device=ids.device)
        if self.flags is None:
            return ones, ones
        known = ids.clamp(0, self.flags.numel() - 1)
        flags = torch.where(ids < self.flags.numel(), self.flags[known], 0)
        starts = (flags & STARTS_WORD_CHAR) > 0
        ends = (flags & ENDS_WORD_CHAR) > 0
        may_start, may_end = ones.clone(), ones.clone()
        may_start[:, 1:t] = ~(ends[:, :-1] & starts[:, 1:])
        may_end[:, 1:t] = ~starts[:, 1:]
        return may_start, may_end

    def _matches(self, ids: Tensor) -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        r"""Per alias length ``n``: ``(n, hit, ends, key)`` ``[B, T - n + 1]`` — whether an
        alias of length ``n`` starting at ``s`` matches (the start on a word boundary),
        whether it also ends on one (the token after it does not continue a word; always
        true at the end of ``ids``), and the matched alias's global key."""
        b, t = ids.shape
        may_start, may_end = self._boundaries(ids)
        h1 = h2 = torch.zeros(b, t, dtype=torch.long, device=ids.device)
        for n in range(1, min(self.max_length, t) + 1):
            width = t - n + 1
            h1, h2 = _hash_step(h1[:, :width], h2[:, :width], ids[:, n - 1 :])
            hashes = self.hashes[n - 1]
            if hashes.numel() == 0:
                continue
            combined = h1 * _MOD2 + h2
            at = torch.searchsorted(hashes, combined).clamp(max=hashes.numel() - 1)
            candidate = self.order[n - 1][at]
            windows = ids.unfold(1, n, 1)
            hit = (hashes[at] == combined) & (self.keys[n - 1][candidate] == windows).all(-1)
            hit &= may_start[:, :width]
            yield n, hit, may_end[:, n:], candidate + self.key_offset[n - 1]

    def _longest(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(length, key)`` ``[B, T]`` of the longest alias match starting at each position."""
        b, t = ids.shape
        length = torch.zeros(b, t, dtype=torch.long, device=ids.device)
        key = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
        for n, hit, ends, candidate in self._matches(ids):
            width = t - n + 1
            hit = hit & ends
            length[:, :width] = torch.where(hit, n, length[:, :width])
            key[:, :width] = torch.where(hit, candidate, key[:, :width])
        return length, key

    def _longest_ending(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""``(open_length, open_key, closed_length, closed_key)`` ``[B, T]``: the longest
        alias match *ending* at each position, without (open) and with (closed) the check
        that the next token does not continue the word."""
        b, t = ids.shape
        lengths = [torch.zeros(b, t, dtype=torch.long, device=ids.device) for _ in range(2)]
        keys = [torch.full((b, t), -1, dtype=torch.long, device=ids.device) for _ in range(2)]
        for n, hit, ends, candidate in self._matches(ids):
            for length, key, found in zip(lengths, keys, (hit, hit & ends), strict=True):
                length[:, n - 1 :] = torch.where(found, n, length[:, n - 1 :])
                key[:, n - 1 :] = torch.where(found, candidate, key[:, n - 1 :])
        return lengths[0], keys[0], lengths[1], keys[1]

    @staticmethod
    def greedy_starts(length: Tensor) -> Tensor:
        r"""``[B, T]`` bool: the mention starts a left-to-right scan keeps, given the longest
        match ``length`` ``[B, T]`` at each start (0: none); by pointer doubling."""
        b, t = length.shape
        positions = torch.arange(t, device=length.device).expand(b, t)
        step = (positions + length.clamp(min=1)).clamp(max=t)
        sink = torch.full((b, 1), t, dtype=torch.long, device=length.device)
        jumps = [torch.cat([step, sink], dim=1)]  # next(s); next(T) = T
        while (1 << len(jumps)) <= t:
            jumps.append(torch.gather(jumps[-1], 1, jumps[-1]))
        reached = torch.zeros(b, t + 1, dtype=torch.bool, device=length.device)
        reached[:, 0] = reached[:, t] = True
        for jump in reversed(jumps):
            reached = reached.scatter(1, torch.where(reached, jump, t), True)
        return reached[:, :t] & (length > 0)

    def __call__(self, ids: Tensor) -> EntityLinks:
        r"""Link token ids ``[B, T]`` (or ``[T]``, returned without the batch dimension)."""
        single = ids.dim() == 1
        ids = ids.reshape(1, -1) if single else ids
        b, t = ids.shape
        length, key = self._longest(ids.long())
        chosen = self.greedy_starts(length)
        start = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
        span = torch.zeros(b, t, dtype=torch.long, device=ids.device)
        covering = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
        positions = torch.arange(t, device=ids.device).expand(b, t)
        for j in range(min(self.max_length, t)):
            source = chosen[:, : t - j] & (length[:, : t - j] > j)
            start[:, j:] = torch.where(source, positions[:, : t - j], start[:, j:])
            span[:, j:] = torch.where(source, length[:, : t - j], span[:, j:])
            covering[:, j:] = torch.where(source, key[:, : t - j], covering[:, j:])
        return self._links(self._entities(covering), start, span, single)

    def causal(self, ids: Tensor, visibility: int = 1) -> EntityLinks:
        r"""Link token ids ``[B, T]`` (or ``[T]``) so that no position depends on a later
        token: position ``p`` gets the entities of the longest alias ending at ``p``
        (starting on a word boundary), else of the most recent *completed* mention — the
        longest alias ending at ``q`` in ``[p - visibility + 1, p)`` that token ``q + 1``
        does not continue as a word. A mention's facts are thus visible from its last
        token on, for ``visibility`` positions.

        :meth:`__call__`'s leftmost-longest links read ahead (a position inside a mention
        knows the mention's later tokens, its own next token among them), which is right
        for retrieved corpus windows but leaks the target when a causal LM predicts the
        next token; queries are linked with this method.

        ``mention_start`` / ``mention_length`` describe the visible mention (``-1`` / ``0``
        where none is).
        """
        single = ids.dim() == 1
        ids = ids.reshape(1, -1) if single else ids
        b, t = ids.shape
        open_length, open_key, closed_length, closed_key = self._longest_ending(ids.long())
        positions = torch.arange(t, device=ids.device).expand(b, t)
        key, length = open_key.clone(), open_length.clone()
        end = torch.where(key >= 0, positions, -1)
        for d in range(1, min(visibility, t)):  # the most recent completed mention wins
            take = (key[:, d:] < 0) & (closed_key[:, : t - d] >= 0)
            key[:, d:] = torch.where(take, closed_key[:, : t - d], key[:, d:])
            length[:, d:] = torch.where(take, closed_length[:, : t - d], length[:, d:])
            end[:, d:] = torch.where(take, positions[:, : t - d], end[:, d:])
        found = key >= 0
        start = torch.where(found, end - length + 1, -1)
        length = torch.where(found, length, 0)
        return self._links(self._entities(key), start, length, single)

    def _entities(self, key: Tensor) -> Tensor:
        """``[B, T, m]`` entities of the alias ``key`` ``[B, T]`` at each position (-1: none)."""
        b, t = key.shape
        entities = torch.full((b, t, self.max_entities), -1, dtype=torch.long, device=key.device)
        if self.num_keys:
            entities = torch.where(key[..., None] >= 0, self.table[key.clamp(min=0)], entities)
        return entities

    @staticmethod
    def _links(entities: Tensor, start: Tensor, length: Tensor, single: bool) -> EntityLinks:
        if single:
            return EntityLinks(entities[0], start[0], length[0])
        return EntityLinks(entities, start, length)
