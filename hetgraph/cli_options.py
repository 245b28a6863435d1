"""Value types of the ``hetgraph`` command line's options: each parses one option's text or
refuses it with argparse's one-line error before anything runs."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (refused before anything runs)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number

    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE = at_least(1)
#: Seeds are numpy's: ``0 <= seed < 2**32``.
SEED_LIMIT = 2**32


def thread_count(value: str) -> int:
    """An argparse type: a thread count in ``[1, the machine's CPUs]`` (torch and FAISS
    start one OS thread per unit asked for, so 100000 would exhaust the machine)."""
    number = POSITIVE(value)
    cpus = os.cpu_count() or 1
    if number > cpus:
        raise argparse.ArgumentTypeError(
            f"must be at most {cpus} (the CPUs of this machine), got {number}"
        )
    return number


def seed_value(value: str) -> int:
    """An argparse type: a random seed, ``0 <= seed < 2**32`` (numpy's limit)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if not 0 <= number < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be in [0, {SEED_LIMIT - 1}] (2**32 - 1), got {number}"
        )
    return number


def fraction(value: str) -> float:
    """An argparse type: a number in ``[0, 1]`` (the kNN-LM weight λ)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0 (the kNN-LM temperature T)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


def layer_number(value: str) -> int | None:
    """An argparse type: a decoder layer index, or ``head`` (``None``: the LM head's input)."""
    if value in ("head", "lm_head", "none", "None"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layer must be an integer or 'head', got {value!r}"
        ) from None


def token_budget(value: str) -> int | None:
    """An argparse type: a number of tokens >= 2, or ``all`` (``None``: the whole split)."""
    if value.lower() == "all":
        return None
    return at_least(2)(value)


def index_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~hetgraph.index.IndexConfig` of the index options (``--factory``,
    ``--metric``, ``--on-disk``, ``--nprobe``, ``--rerank``, ``--shard-rows``, ``--threads``)
    that ``index build`` and ``datastore rekey`` share."""
    from hetgraph.index import IndexConfig  # imported when a command runs, not when parsing

    return IndexConfig.from_dict(
        dict(
            factory=args.factory,
            metric=args.metric,
            num_threads=args.threads,
            on_disk=args.on_disk,
            nprobe=args.nprobe,
            rerank=args.rerank,
            shard_rows=args.shard_rows,
        )
    )
