"""A frozen reward model used as a judge: it tokenises the text itself, so a policy and a reward
model may have different tokenizers (the response is decoded to text and re-tokenised)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from apactl.data import format_for_reward, right_pad
from apactl.models import load_sequence_classifier, resolve_model_ref, sequence_scores
from apactl.precision import fp32_heads, store_matmuls

REWARD_STATS = "reward_stats.json"


def load_reward_stats(folder: str | Path) -> dict[str, float] | None:
    p = Path(folder) / REWARD_STATS
    return json.loads(p.read_text()) if p.exists() else None


class RewardModelJudge:
    """Scores ``format_for_reward(messages, response)`` with a sequence classifier.

    ``model`` is public: align shares its frozen bottom layers with the critic when they are
    equal (``accel.trunk.share_bottom``).
    """

    name = "reward-model"

    def __init__(self, path: str, device="cpu", dtype=None, batch_size: int = 16,
                 normalize: bool = False, max_len: int = 1024):
        self.path = resolve_model_ref(path, kind="reward")
        # fp32 on the host, then 16-bit matmul weights only, fp32 score head, run under
        # autocast (apactl.precision): scores are not rounded to bf16 (0.03 apart near 4).
        self.dtype = dtype or torch.float32
        model, self.tokenizer = load_sequence_classifier(self.path, "cpu", torch.float32,
                                                         trainable=False)
        fp32_heads(model)
        store_matmuls(model, self.dtype)
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_len = max_len
        self.stats = load_reward_stats(self.path)
        self.normalize = normalize and self.stats is not None

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
