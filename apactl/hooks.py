"""Observation points of the training loops, for benchmarks, tests and integrations.

The loops call these and nothing else from outside: a benchmark counts FLOPs per phase through
``phase``, a test stops a run after step N through ``on_step_end`` (raise to stop), a profiler
reads every rollout through ``on_rollout``. Every field is optional.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any


@dataclass
class Hooks:
    # Wraps each timed phase ("generate", "score", "reward", "update", "verify", "eval";
    # dpo: "reference", the reference log-probs computed before training);
    # the loop times the phase outside this context.
    phase: Callable[[str], AbstractContextManager] | None = None
    # The run's pieces once built: {"policy": ..., "critic": ..., "judge": ...} (align) or
    # {"model": ...} (sft/rm).
    on_start: Callable[[dict[str, Any]], None] | None = None
    # Before a training rollout of iteration i starts (held-out evaluation rollouts excluded).
    on_rollout_start: Callable[[int], None] | None = None
    # A training rollout is complete: (iteration, Rollout, response texts, prompt items).
    on_rollout: Callable[[int, Any, list[str], list[dict]], None] | None = None
    # After step/iteration ``step`` (1-based) is logged, before any checkpoint of that step.
    on_step_end: Callable[[int, dict[str, float]], None] | None = None
    # Before checkpoint ``step`` is written (the final save included).
    on_save: Callable[[int], None] | None = None

    def wrap(self, name: str) -> AbstractContextManager:
        return self.phase(name) if self.phase is not None else contextlib.nullcontext()

    def call(self, event: str, *args: Any) -> None:
        fn = getattr(self, event)
        if fn is not None:
            fn(*args)
