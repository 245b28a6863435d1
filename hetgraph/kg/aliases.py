r"""Aliases as token-id sequences of the LM's tokenizer, for linking on token ids.

A BPE tokenizer splits ``"dog"`` at the start of a text differently from ``" dog"`` after
a word, and ``"Dog"`` differently again. So every alias is tokenised in up to four
variants: with and without a leading space, and with its first letter as written and
capitalised (:class:`AliasConfig`). Every distinct ``(token sequence, entity)`` pair is
kept once, in a flat ``int32`` array with ``int64`` offsets.

:func:`token_flags` records, per vocabulary id, whether the token's text *starts* with a
word character (a letter or digit, no leading space: it continues the word before it) and
whether it *ends* with one; the linker uses them so that ``" dog"`` is not found inside
``" dogma"`` (``" dog" + "ma"``) nor ``"dog"`` inside ``"hotdog"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetgraph.configuration import JSONConfigMixin
from hetgraph.limits import check_count

logger = logging.getLogger(__name__)

#: ``token_flags`` bits.
STARTS_WORD_CHAR = 1
ENDS_WORD_CHAR = 2
#: Longest alias (in tokens) a linker accepts; longer ones are dropped at build time.
MAX_ALIAS_TOKENS = 32
#: Markers byte-level BPE (``Ġ``) and SentencePiece (``▁``) put for a leading space.
_SPACE_MARKERS = ("Ġ", "▁", " ", "Ċ", "\n", "\t")


@dataclass
class AliasConfig(JSONConfigMixin):
    r"""How aliases become token sequences.

    Args:
        max_alias_tokens: longest token sequence kept (longer aliases are dropped and
            counted); the linker's work grows with it.
        min_alias_chars: shorter alias texts are skipped (``3`` keeps WordNet's ``"in"``
            (inch), ``"it"`` (information technology) and ``"a"`` from matching the
            function words).
        space_variants: also tokenise ``" " + alias`` (the form inside a sentence).
        case_variants: also tokenise the alias with its first letter capitalised.
    """

    max_alias_tokens: int = 8
    min_alias_chars: int = 3
    space_variants: bool = True
    case_variants: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(
            "max_alias_tokens",
            self.max_alias_tokens,
            MAX_ALIAS_TOKENS,
            f"give 1 to {MAX_ALIAS_TOKENS}",
            minimum=1,
        )
        check_count("min_alias_chars", self.min_alias_chars, 1000, "give 1 or more", minimum=1)


def alias_variants(text: str, config: AliasConfig) -> list[str]:
    r"""The texts ``text`` is tokenised as (distinct, in a fixed order)."""
    forms = [text]
    if config.case_variants and text[:1].upper() != text[:1]:
        forms.append(text[:1].upper() + text[1:])
    if config.space_variants:
        forms += [" " + form for form in forms]
    return forms


@dataclass
class AliasSequences:
    r"""Token sequences of aliases: sequence ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``
    and names entity ``entities[i]``; ``dropped`` counts aliases longer than the limit."""

    tokens: np.ndarray
    offsets: np.ndarray
    entities: np.ndarray
    dropped: int = 0


def tokenize_aliases(
    aliases: Sequence[tuple[int, str]], tokenizer: Any, config: AliasConfig, batch_size: int = 4096
) -> AliasSequences:
    r"""Tokenise ``(entity index, alias text)`` pairs in every variant of ``config``.

    Returns:
        :class:`AliasSequences` with each distinct ``(sequence, entity)`` once, in the
        order of ``aliases``; sequences longer than ``config.max_alias_tokens`` are dropped.
    """
    kept = [(entity, text) for entity, text in aliases if len(text) >= config.min_alias_chars]
    forms = [(entity, form) for entity, text in kept for form in alias_variants(text, config)]
    seen: dict[tuple[tuple[int, ...], int], None] = {}
    dropped: set[tuple[int, str]] = set()
    for start in range(0, len(forms), batch_size):
        batch = forms[start : start + batch_size]
        encoded = tokenizer([form for _, form in batch], add_special_tokens=False)["input_ids"]
        for (entity, form), ids in zip(batch, encoded, strict=True):
            if not ids:
                continue
            if len(ids) > config.max_alias_tokens:
                dropped.add((entity, form.strip()))
                continue
            seen.setdefault((tuple(ids), entity))
    lengths = np.fromiter((len(seq) for seq, _ in seen), dtype=np.int64, count=len(seen))
    offsets = np.zeros(len(seen) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter(
        (t for seq, _ in seen for t in seq), dtype=np.int32, count=int(offsets[-1])
    )
    entities = np.fromiter((e for _, e in seen), dtype=np.int32, count=len(seen))
    if dropped:
        logger.info(
            "%d alias forms are longer than %d tokens and are not linked",
            len(dropped),
            config.max_alias_tokens,
        )
    return AliasSequences(tokens, offsets, entities, len(dropped))


def token_flags(tokenizer: Any) -> np.ndarray:
    r"""``uint8`` per id of ``tokenizer``: :data:`STARTS_WORD_CHAR` when the token's text
    begins with a letter or digit (no leading space), :data:`ENDS_WORD_CHAR` when it ends
    with one."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    flags = np.zeros(size, dtype=np.uint8)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if piece[0].isalnum() and not piece.startswith(_SPACE_MARKERS):
            flags[i] |= STARTS_WORD_CHAR
        if piece[-1].isalnum():
            flags[i] |= ENDS_WORD_CHAR
    special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < size]
    flags[special] = 0
    return flags
