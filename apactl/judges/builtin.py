"""The judges apactl ships: VADER sentiment, two diagnostics, and the learned reward model."""

from __future__ import annotations

from typing import Any

from apactl.judges.registry import Judge, register_judge


class SentimentJudge:
    """VADER compound sentiment of the response, in [-1, 1]."""

    name = "sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._vader = SentimentIntensityAnalyzer()

    def score(self, prompts, responses):
        return [float(self._vader.polarity_scores(r)["compound"]) for r in responses]


@register_judge("sentiment", "VADER compound sentiment of the response (vaderSentiment), -1..1")
def sentiment() -> Judge:
    return SentimentJudge()


class CharFractionJudge:
    """Fraction of the response's characters that are in ``chars`` (a toy, learnable reward)."""

    name = "char-fraction"

    def __init__(self, chars: str = "a"):
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"chars must be a non-empty string, got {chars!r}")
        self.chars = set(chars)

    def score(self, prompts, responses):
        return [sum(c in self.chars for c in r) / max(len(r), 1) for r in responses]


@register_judge("char-fraction", "fraction of response characters in args.chars (toy reward)")
def char_fraction(chars: str = "a") -> Judge:
    return CharFractionJudge(chars)


class LengthJudge:
    """Response length in words (a diagnostic judge: exposes length hacking)."""

    name = "length"

    def score(self, prompts, responses):
        return [float(len(r.split())) for r in responses]


@register_judge("length", "response length in words (diagnostic)")
def length() -> Judge:
    return LengthJudge()


@register_judge("reward-model", "a sequence-classifier reward model folder (from apactl rm)",
                needs_path=True)
def reward_model(path: str, device: Any = "cpu", dtype: Any = None, batch_size: int = 16,
                 normalize: bool = False, max_len: int = 1024) -> Judge:
    from apactl.judges.reward_model import RewardModelJudge

    return RewardModelJudge(path, device=device, dtype=dtype, batch_size=batch_size,
                            normalize=normalize, max_len=max_len)
