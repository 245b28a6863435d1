"""Sliding windows over a long token stream.

Every token is scored exactly once, and with at least ``context_length - stride``
tokens of left context wherever that much text precedes it (the standard strided
perplexity evaluation). The datastore build and every evaluation use the same windows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` are fed to the LM; positions ``[score_start, end)`` are scored.

    Position ``p`` being scored means: its hidden state is used (as a datastore key or as
    a query) and it predicts token ``p + 1``.
    """

    start: int
    end: int
    score_start: int


def sliding_windows(num_positions: int, context_length: int, stride: int) -> list[Window]:
    """Windows covering positions ``0 … num_positions-1``.

    Args:
        num_positions: number of positions to score.
        context_length: tokens fed to the model per window.
        stride: new positions scored per window after the first; ``1 <= stride <= context_length``.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    windows: list[Window] = []
    scored = 0
    while scored < num_positions:
        end = min(num_positions, context_length if scored == 0 else scored + stride)
        start = max(0, end - context_length)
        windows.append(Window(start, end, scored))
        scored = end
    return windows
