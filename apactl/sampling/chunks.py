"""Seeded chunks: the same random numbers for chunk j whatever rank draws it, and on resume."""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import TypeVar

import torch

from apactl.distributed import Dist

T = TypeVar("T")


class Stream(IntEnum):
    """Independent random streams; the values are part of every seed (changing one changes
    every sample drawn from that stream)."""

    ROLLOUT = 1  # align's training rollouts; key: (iteration,)
    ALIGN_EVAL = 2  # align's held-out evaluation; key: (iteration, first prompt)
    EVAL = 3  # apactl eval; key: ()
    LABEL = 4  # apactl label; key: ()


def chunk_seed(seed: int, *key: int) -> int:
    """A seed that is a pure function of (run seed, key...): sampling of chunk j at iteration i
    does not depend on which rank draws it or on what was drawn before (exact resume too)."""
    h = seed % 2**61
    for k in key:
        h = (h * 1_000_003 + k + 7) % 2**61
    return h


def seeded_chunks(n: int, size: int, fn: Callable[[slice], T], seed: int, stream: Stream,
                  key: tuple[int, ...] = (), dist: Dist | None = None,
                  idle: Callable[[], None] | None = None) -> list[T]:
    """``fn(rows)`` for each chunk of ``size`` rows of ``n``, chunk j seeded with
    ``chunk_seed(seed, stream, *key, j)`` and run by rank j % world_size; every rank returns
    all results in chunk order (a dict's tensors travel between ranks as tensors on the process
    group's device, everything else as host objects: ``Dist.gather_chunks``)."""
    dist = dist or Dist()
    mine = {}
    starts = list(range(0, n, size))
    # In rounds of world_size chunks: in the last round a rank may own none (``idle()``, for
    # work that must run in lockstep with the ranks that do).
    for first in range(0, len(starts), dist.world_size):
        j = first + dist.rank
        if j < len(starts):
            torch.manual_seed(chunk_seed(seed, int(stream), *key, j))
            mine[j] = fn(slice(starts[j], min(starts[j] + size, n)))
        elif idle is not None:
            idle()
    return dist.gather_chunks(mine)
