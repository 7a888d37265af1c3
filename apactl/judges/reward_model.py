"""A frozen reward model used as a judge: it tokenises the text itself, so a policy and a reward
model may have different tokenizers (the response is decoded to text and re-tokenised)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from apactl.data import format_for_reward, right_pad
from apactl.errors import ModelError
from apactl.models import (
    check_trained_head,
    load_sequence_classifier,
    resolve_model_ref,
    sequence_scores,
)
from apactl.precision import fp32_heads, store_matmuls

REWARD_STATS = "reward_stats.json"


def load_reward_stats(folder: str | Path) -> dict[str, float] | None:
    """``{"mean", "std", ...}`` from ``folder/reward_stats.json`` (None when absent). A file
    that is not that, or a std that is 0 or not finite (scores divided by it would be inf or
    nan), is a ``ModelError`` naming the file."""
    p = Path(folder) / REWARD_STATS
    if not p.exists():
        return None
    try:
        stats = json.loads(p.read_text())
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise ModelError(f"{p}: malformed, not JSON ({str(exc).splitlines()[0]}); "
                         "re-run apactl rm to write it") from None
    if not isinstance(stats, dict):
        raise ModelError(f"{p}: malformed: expected an object {{mean, std}}, got "
                         f"{type(stats).__name__}")
    for key in ("mean", "std"):
        value = stats.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelError(f"{p}: malformed: {key} is {value!r}, expected a number")
        if not math.isfinite(value):
            raise ModelError(f"{p}: {key} is {value}, not a finite number")
    if stats["std"] <= 0:
        raise ModelError(f"{p}: std is {stats['std']}: the scores cannot be normalised by it "
                         "(a reward model that gives every reply the same score?)")
    return stats


class RewardModelJudge:
    """Scores ``format_for_reward(messages, response)`` with a sequence classifier.

    ``model`` is public: align shares its frozen bottom layers with the critic when they are
    equal (``accel.trunk.share_bottom``). The folder must hold a trained score head, and with
    ``normalize`` a valid ``reward_stats.json`` (``ModelError`` otherwise, before any weight
    is loaded).
    """

    name = "reward-model"

    def __init__(self, path: str, device="cpu", dtype=None, batch_size: int = 16,
                 normalize: bool = False, max_len: int = 1024):
        self.path = resolve_model_ref(path, kind="reward")
        check_trained_head(path, self.path)  # what the folder is, before its stats
        self.stats = load_reward_stats(self.path) if normalize else None
        if normalize and self.stats is None:
            raise ModelError(f"{path}: no {REWARD_STATS} (apactl rm writes it in final/), "
                             "which normalize: true needs; set normalize=false to use raw scores")
        # fp32 on the host, then 16-bit matmul weights only, fp32 score head, run under
        # autocast (apactl.precision): scores are not rounded to bf16 (0.03 apart near 4).
        self.dtype = dtype or torch.float32
        model, self.tokenizer = load_sequence_classifier(path, "cpu", torch.float32,
                                                         trainable=False, trained_head=True)
        fp32_heads(model)
        store_matmuls(model, self.dtype)
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_len = max_len
        self.normalize = normalize

    def texts(self, prompts: Sequence, responses: Sequence[str]) -> list[str]:
        return [format_for_reward(self.tokenizer, m, r) for m, r in zip(prompts, responses)]

    @torch.inference_mode()
    def score_tensor(self, prompts: Sequence, responses: Sequence[str]) -> torch.Tensor:
        """Raw (or normalised) scores [B] on the CPU, float32."""
        texts = self.texts(prompts, responses)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = [self.tokenizer(t, add_special_tokens=False,
                                  truncation=True, max_length=self.max_len)["input_ids"]
                   for t in texts[i:i + self.batch_size]]
            ids, mask = right_pad(enc, self.tokenizer.pad_token_id)
            with torch.autocast(torch.device(self.device).type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                out.append(sequence_scores(self.model, ids.to(self.device),
                                           mask.to(self.device)).float().cpu())
        scores = torch.cat(out) if out else torch.zeros(0)
        if self.normalize:
            scores = (scores - self.stats["mean"]) / self.stats["std"]
        return scores

    def score(self, prompts: Sequence, responses: Sequence[str]) -> list[float]:
        return self.score_tensor(prompts, responses).tolist()
