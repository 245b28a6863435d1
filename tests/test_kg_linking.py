"""Entity linking on token ids against a naive left-to-right reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetgraph.kg.aliases import (
    ENDS_WORD_CHAR,
    STARTS_WORD_CHAR,
    AliasConfig,
    alias_variants,
    token_flags,
    tokenize_aliases,
)
from hetgraph.kg.linking import EntityLinker
from hetgraph.testing import byte_tokenizer


def reference_tables(ids, sequences, entities, flags):
    """The naive references' alias -> entities table, longest alias, and flag lookup."""
    table: dict[tuple[int, ...], list[int]] = {}
    for seq, entity in zip(sequences, entities, strict=True):
        table.setdefault(tuple(seq), []).append(entity)

    def flag(i, bit):
        return flags is not None and ids[i] < len(flags) and bool(flags[ids[i]] & bit)

    return table, max(len(s) for s in sequences), flag


def naive_link(ids, sequences, entities, m, flags):
    """Scan left to right; at each position take the longest alias that respects the word
    boundaries, then jump past it."""
    table, longest, flag = reference_tables(ids, sequences, entities, flags)
    t = len(ids)
    out_entities = [[-1] * m for _ in range(t)]
    start, length = [-1] * t, [0] * t
    s = 0
    while s < t:
        best = 0
        for n in range(1, longest + 1):
            if s + n > t or tuple(ids[s : s + n]) not in table:
                continue
            if s > 0 and flag(s - 1, ENDS_WORD_CHAR) and flag(s, STARTS_WORD_CHAR):
                continue
            if s + n < t and flag(s + n, STARTS_WORD_CHAR):
                continue
            best = n
        if best == 0:
            s += 1
            continue
        found = table[tuple(ids[s : s + best])][:m]
        for p in range(s, s + best):
            out_entities[p] = found + [-1] * (m - len(found))
            start[p], length[p] = s, best
        s += best
    return out_entities, start, length


def planted(seed, vocab=12, aliases=15, batch=3, t=60):
    rng = np.random.default_rng(seed)
    seqs = {tuple(rng.integers(0, vocab, rng.integers(1, 5)).tolist()) for _ in range(aliases)}
    sequences = sorted(seqs)
    pairs = [
        (s, int(e)) for s in sequences for e in rng.choice(8, rng.integers(1, 4), replace=False)
    ]
    ids = rng.integers(0, vocab, (batch, t))
    for b in range(batch):  # plant aliases, some overlapping
        for _ in range(8):
            s = sequences[rng.integers(len(sequences))]
            at = rng.integers(0, t - len(s) + 1)
            ids[b, at : at + len(s)] = s
    return [p[0] for p in pairs], [p[1] for p in pairs], ids


def as_arrays(sequences, entities):
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    return np.concatenate([np.asarray(s) for s in sequences]), offsets, np.asarray(entities)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_flags", [False, True])
def test_linking_matches_the_naive_reference(seed, m, with_flags):
    sequences, entities, ids = planted(seed)
    flags = (
        np.random.default_rng(seed + 100).integers(0, 4, 10).astype(np.uint8)
        if with_flags
        else None
    )  # ids 10, 11 lie beyond the flags: no flags
    linker = EntityLinker(*as_arrays(sequences, entities), max_entities=m, flags=flags)
    links = linker(torch.as_tensor(ids))
    assert links.entities.shape == (*ids.shape, m)
    for b in range(ids.shape[0]):
        ref_entities, ref_start, ref_length = naive_link(
            ids[b].tolist(), sequences, entities, m, flags
        )
        assert links.entities[b].tolist() == ref_entities
        assert links.mention_start[b].tolist() == ref_start
        assert links.mention_length[b].tolist() == ref_length
        assert linker(torch.as_tensor(ids[b])).entities.tolist() == ref_entities  # unbatched


def naive_causal_link(ids, sequences, entities, m, flags, visibility):
    """For each position p, look back from q = p to p - visibility + 1 for the longest
    alias ending at q (start on a word boundary; for q < p also the end, which token q + 1
    decides); the first q that has one gives p's entities."""
    table, longest, flag = reference_tables(ids, sequences, entities, flags)
    t = len(ids)
    out_entities, start, length = [[-1] * m for _ in range(t)], [-1] * t, [0] * t
    for p in range(t):
        for q in range(p, max(p - visibility, -1), -1):
            best = 0
            for n in range(1, longest + 1):
                s = q - n + 1
                if s < 0 or tuple(ids[s : q + 1]) not in table:
                    continue
                if s > 0 and flag(s - 1, ENDS_WORD_CHAR) and flag(s, STARTS_WORD_CHAR):
                    continue
                if q < p and flag(q + 1, STARTS_WORD_CHAR):
                    continue
                best = n
            if best:
                found = table[tuple(ids[q - best + 1 : q + 1])][:m]
                out_entities[p] = found + [-1] * (m - len(found))
                start[p], length[p] = q - best + 1, best
                break
    return out_entities, start, length


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("with_flags", [False, True])
@pytest.mark.parametrize("visibility", [1, 2, 5])
def test_causal_linking_matches_the_naive_reference(seed, m, with_flags, visibility):
    sequences, entities, ids = planted(seed)
    flags = (
        np.random.default_rng(seed + 100).integers(0, 4, 10).astype(np.uint8)
        if with_flags
        else None
    )
    linker = EntityLinker(*as_arrays(sequences, entities), max_entities=m, flags=flags)
    links = linker.causal(torch.as_tensor(ids), visibility)
    for b in range(ids.shape[0]):
        ref_entities, ref_start, ref_length = naive_causal_link(
            ids[b].tolist(), sequences, entities, m, flags, visibility
        )
        assert links.entities[b].tolist() == ref_entities
        assert links.mention_start[b].tolist() == ref_start
        assert links.mention_length[b].tolist() == ref_length
        unbatched = linker.causal(torch.as_tensor(ids[b]), visibility)
        assert unbatched.entities.tolist() == ref_entities


@pytest.mark.parametrize("seed", range(3))
def test_causal_links_never_depend_on_later_tokens(seed):
    # The leak this guards against: a position inside "hot dog" linked to the entity
    # "hot dog" before " dog" is read would be told its next token.
    sequences, entities, ids = planted(seed, batch=1)
    flags = np.random.default_rng(seed).integers(0, 4, 12).astype(np.uint8)
    linker = EntityLinker(*as_arrays(sequences, entities), max_entities=2, flags=flags)
    full = linker.causal(torch.as_tensor(ids), 4).entities
    rng = np.random.default_rng(seed + 7)
    for cut in rng.integers(1, ids.shape[1], 10):
        changed = ids.copy()
        changed[:, cut:] = rng.integers(0, 12, changed[:, cut:].shape)
        prefix = linker.causal(torch.as_tensor(changed), 4).entities
        assert torch.equal(prefix[:, :cut], full[:, :cut])
        assert torch.equal(linker.causal(torch.as_tensor(ids[:, :cut]), 4).entities, full[:, :cut])


def test_causal_linking_in_text_sees_a_mention_after_it_is_read():
    tokenizer = byte_tokenizer()
    config = AliasConfig(min_alias_chars=2, max_alias_tokens=16)
    sequences = tokenize_aliases([(0, "dog"), (1, "hot dog")], tokenizer, config)
    linker = EntityLinker(
        sequences.tokens, sequences.offsets, sequences.entities, flags=token_flags(tokenizer)
    )
    text = "a hot dog is food"
    ids = torch.tensor(tokenizer(text)["input_ids"])
    seen = linker.causal(ids, 3).entities[:, 0].tolist()
    decoded = [tokenizer.decode(ids[: p + 1]) for p in range(len(ids))]
    by_prefix = dict(zip(decoded, seen, strict=True))
    assert by_prefix["a hot"] == -1  # "hot" is no alias; "hot dog" is not read yet
    assert by_prefix["a hot d"] == -1
    assert by_prefix["a hot dog"] == 1  # the longest alias ending here
    assert by_prefix["a hot dog "] == 1 and by_prefix["a hot dog i"] == 1  # visibility 3
    assert by_prefix["a hot dog is"] == -1


@pytest.mark.parametrize(
    "length", [[0, 0, 0, 0], [2, 0, 2, 0], [2, 2, 2, 2, 2], [3, 1, 2, 0, 1], [1] * 7]
)
def test_greedy_starts_is_the_left_to_right_scan(length):
    expected, s = [False] * len(length), 0
    while s < len(length):
        expected[s] = length[s] > 0
        s += max(length[s], 1)
    assert EntityLinker.greedy_starts(torch.tensor([length])).tolist() == [expected]


def test_hash_collisions_never_link():
    # A linker with a single alias (1, 2) must not link windows that merely share a hash
    # position in the sorted array: every window is verified token by token.
    linker = EntityLinker(np.array([1, 2]), np.array([0, 2]), np.array([0]))
    ids = torch.tensor([[2, 1, 3, 1, 2, 2]])
    assert linker(ids).entities[0, :, 0].tolist() == [-1, -1, -1, 0, 0, -1]


def test_aliases_link_in_text_with_word_boundaries_and_variants():
    tokenizer = byte_tokenizer()
    config = AliasConfig(min_alias_chars=2, max_alias_tokens=16)
    assert alias_variants("dog", config) == ["dog", "Dog", " dog", " Dog"]
    sequences = tokenize_aliases([(0, "dog"), (1, "hot dog"), (2, "sea turtle")], tokenizer, config)
    linker = EntityLinker(
        sequences.tokens, sequences.offsets, sequences.entities, flags=token_flags(tokenizer)
    )
    text = "Dog and hot dog, dogma, hotdog. sea turtles, a sea turtle"
    ids = torch.tensor(tokenizer(text)["input_ids"])
    links = linker(ids)
    mentions = {
        (
            int(s),
            tokenizer.decode(ids[s : s + int(links.mention_length[s])]),
            int(links.entities[s, 0]),
        )
        for s in range(len(ids))
        if links.mention_start[s] == s
    }
    assert {(text, e) for _, text, e in mentions} == {
        ("Dog", 0),
        (" hot dog", 1),
        (" sea turtle", 2),
    }


@pytest.mark.parametrize("t", [0, 1, 3])
def test_empty_inputs_and_a_linker_without_aliases(t):
    empty = EntityLinker(
        np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32), max_entities=2
    )
    links = empty(torch.zeros(2, t, dtype=torch.long))
    assert links.entities.shape == (2, t, 2) and bool((links.entities == -1).all())
    linker = EntityLinker(np.array([0]), np.array([0, 1]), np.array([5]))
    assert linker(torch.zeros(1, t, dtype=torch.long)).entities[..., 0].tolist() == [[5] * t]
