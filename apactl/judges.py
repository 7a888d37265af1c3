"""Judges score (prompt, response) pairs: a learned reward model or a programmatic rule.

The registry is the extension point: ``@register_judge("name", "what it measures")`` on a factory
``(device, dtype, path, **args) -> Judge`` makes ``name`` usable as ``reward.judge`` in align
recipes and as ``--judge`` / ``judges[].name`` in eval recipes. This module imports no torch at
import time, so recipe validation can check judge names instantly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from apactl.errors import UserError

Messages = list[dict[str, str]]


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """One float per (prompt, response); higher is better."""


@dataclass
class JudgeInfo:
    factory: Callable[..., Judge]
    description: str
    needs_path: bool = False
    hidden: bool = False  # usable, but not listed to users (test fixtures)


JUDGES: dict[str, JudgeInfo] = {}


def register_judge(name: str, description: str, needs_path: bool = False, hidden: bool = False):
    def deco(factory: Callable[..., Judge]) -> Callable[..., Judge]:
        JUDGES[name] = JudgeInfo(factory, description, needs_path, hidden)
        return factory

    return deco


def available() -> str:
    return ", ".join(sorted(n for n, info in JUDGES.items() if not info.hidden))


def check_judge(name: str, path: str | None) -> None:
    """Raise ValueError (shown as a recipe problem) for an unknown judge or a missing path."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; available judges: {available()}")
    if JUDGES[name].needs_path and not path:
        raise ValueError(f"judge {name!r} needs a path (a reward-model folder)")


def make_judge(name: str, path: str | None = None, args: dict[str, Any] | None = None,
               device: Any = "cpu", dtype: Any = None, batch_size: int = 16) -> Judge:
    try:
        check_judge(name, path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return JUDGES[name].factory(path=path, device=device, dtype=dtype, batch_size=batch_size,
                                **(args or {}))


# --------------------------------------------------------------------------------- built-ins
class SentimentJudge:
    """VADER compound sentiment of the response, in [-1, 1]."""

    name = "sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def score(self, prompts, responses):
        return [float(self._vader.polarity_scores(r)["compound"]) for r in responses]


@register_judge("sentiment", "VADER compound sentiment of the response (vaderSentiment), -1..1")
def _sentiment(**_: Any) -> Judge:
    return SentimentJudge()


class CharFractionJudge:
    """Fraction of the response's characters that are in ``chars`` (a toy, learnable reward)."""

    name = "char-fraction"

    def __init__(self, chars: str = "a"):
        self.chars = set(chars)

    def score(self, prompts, responses):
        return [sum(c in self.chars for c in r) / max(len(r), 1) for r in responses]


@register_judge("char-fraction", "fraction of response characters in args.chars (toy reward)")
def _char_fraction(chars: str = "a", **_: Any) -> Judge:
    return CharFractionJudge(chars)


class LengthJudge:
    """Response length in words (a diagnostic judge: exposes length hacking)."""

    name = "length"

    def score(self, prompts, responses):
        return [float(len(r.split())) for r in responses]


@register_judge("length", "response length in words (diagnostic)")
def _length(**_: Any) -> Judge:
    return LengthJudge()


@register_judge("reward-model", "a sequence-classifier reward model folder (from apactl rm)",
                needs_path=True)
def _reward_model(path: str, device: Any = "cpu", dtype: Any = None, batch_size: int = 16,
                  normalize: bool = False, **_: Any) -> Judge:
    from apactl.reward import RewardModelJudge

    return RewardModelJudge(path, device=device, dtype=dtype, batch_size=batch_size,
                            normalize=normalize)


@register_judge("fail-on-rank", "test fixture: raises on rank args.rank of a distributed job",
                hidden=True)
def _fail_on_rank(rank: int = 1, **_: Any) -> Judge:
    from apactl.testing import FailOnRankJudge

    return FailOnRankJudge(rank)
