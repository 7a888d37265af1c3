"""Batch containers shared by the RL algorithms (APA, PPO, AWR, GRPO, RLOO)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Rollout:
    """One batch of sampled episodes, row-aligned across every tensor.

    Shapes: B = episodes in the batch, P = padded prompt length, T = padded response length.

    Always present:
        query_ids:     LongTensor [B, P]. Prompt token ids, LEFT-padded so every prompt ends
                       at column P-1 and generation continues directly after it.
        query_mask:    [B, P]. 1 = real prompt token, 0 = left padding.
        response_ids:  LongTensor [B, T]. Sampled tokens, RIGHT-padded.
        response_mask: float [B, T]. 1 for generated tokens up to and including the first EOS,
                       0 afterwards (padding). Every per-token quantity below is only
                       meaningful where this mask is 1; values at padding are arbitrary.

    Filled in by the trainer as they are computed (None until then):
        old_logprobs: [B, T] log-prob of each sampled token under the rollout policy, from the
                      ``SamplingSpec`` that sampled it (temperature-scaled logits; align
                      refuses top-k/top-p, so this is the distribution actually sampled).
        ref_logprobs: [B, T] log-prob of each sampled token under the frozen reference model.
        values:       [B, T] critic estimate V(s_t) at each response position (None without a
                      critic).
        scores:       [B] reward-model score of the full (prompt, response).
        rewards:      [B, T] KL-penalised per-token rewards (score added at the last valid token).
        advantages:   [B, T] GAE advantages, after optional whitening; or (group estimators)
                      one advantage per answer on each of its tokens.
        returns:      [B, T] value targets = A_t (before whitening) + V(s_t) (GAE only).

    With k answers per prompt, rows g*k .. g*k+k-1 answer prompt g (``rl.rollout``).

    Bookkeeping:
        episode:      LongTensor [B]. Row index of each episode in its rollout (minibatches keep
                      it, so a forward backend can find what it kept for that episode, e.g.
                      the frozen trunk's hidden states: ``apactl.accel``).
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    scores: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    episode: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.query_ids.shape[0])

    def _map(self, fn) -> Rollout:
        # Apply fn to every tensor field; None fields stay None (not computed yet).
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                changes[f.name] = fn(value)
        return replace(self, **changes)

    def index(self, idx: Tensor) -> Rollout:
        """Select rows `idx` (LongTensor [K]) of every tensor field -> Rollout with B = K."""
        return self._map(lambda t: t[idx.to(t.device)])

    def minibatches(self, size: int, generator: torch.Generator) -> Iterator[Rollout]:
        """Shuffle rows with `generator`, then yield consecutive chunks of `size` rows.

        The last chunk is smaller when B is not a multiple of `size`.
        The generator must be a CPU generator (the permutation is drawn on CPU).
        """
        if size <= 0:
            raise ValueError(f"minibatch size must be positive, got {size}")
        perm = torch.randperm(self.batch_size, generator=generator)
        for start in range(0, self.batch_size, size):
            yield self.index(perm[start : start + size])

    def to(self, device: torch.device | str) -> Rollout:
        return self._map(lambda t: t.to(device))
