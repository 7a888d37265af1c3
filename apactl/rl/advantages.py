"""KL-shaped rewards, GAE and KL estimates for token-level RLHF.

Conventions: B = batch of episodes, T = padded response length. `mask` is a [B, T] tensor with
1 on valid (generated) tokens and 0 on padding; valid tokens form a prefix of each row (masked
statistics: ``apactl.masked``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from apactl.masked import masked_mean, masked_sum, masked_whiten, zero_padding


def kl_penalized_rewards(
    scores: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float
) -> Tensor:
    """Per-token rewards [B, T] from scores [B] and log-probs [B, T].

    r_t = -beta * (old_t - ref_t) on valid tokens, plus scores[b] at the LAST valid token of
    row b; 0 on padding. A row without any valid token receives neither penalty nor score.
    """
    rewards = zero_padding(-beta * (old_logprobs - ref_logprobs), mask)
    valid = mask > 0
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # Highest valid column per row; empty rows yield 0 and are zeroed by `has_valid` below.
    last = torch.where(valid, positions, torch.zeros_like(positions)).argmax(dim=1)
    has_valid = valid.any(dim=1)
    bonus = torch.where(has_valid, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens.

    Inputs rewards, values, mask: [B, T]. Returns (advantages [B, T], returns [B, T]):
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),  V after the last valid token = 0
        A_t     = sum_l (gamma * gae_lambda)^l * delta_{t+l}   (within the valid span)
        R_t     = A_t + V(s_t)
    Both outputs are 0 on padding. Gradients flow through if inputs require grad; callers
    normally pass detached tensors.
    """
    rewards, values = zero_padding(rewards, mask), zero_padding(values, mask)
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * gae_lambda * next_adv) * mask[:, t]
        advantages.append(adv)
        # Padding has value 0 and advantage 0, so the bootstrap past the last valid token is 0.
        next_value, next_adv = values[:, t], adv
    adv = torch.stack(advantages[::-1], dim=1)
    return adv, zero_padding(adv + values, mask)


def kl_estimates(old_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Per-sequence KL(policy || ref) estimates from sampled-token log-probs [B, T].

    With log_ratio_t = old_t - ref_t (samples drawn from the policy):
        k1 [B] = sum_t log_ratio_t                              (unbiased, can be negative)
        k3 [B] = sum_t (exp(-log_ratio_t) - 1 + log_ratio_t)     (unbiased, always >= 0)
    """
    log_ratio = zero_padding(old_logprobs - ref_logprobs, mask)
    k3 = torch.expm1(-log_ratio) + log_ratio
    return {"k1": masked_sum(log_ratio, mask, dim=1), "k3": masked_sum(k3, mask, dim=1)}


def add_advantages(ro, beta: float, gamma: float, gae_lambda: float, whiten: bool,
                   clip: float | None = None) -> dict[str, float]:
    """KL-penalised rewards -> GAE -> (optionally whitened) advantages, set on Rollout ``ro``.

    ``clip``: judge scores are clipped to [-clip, clip] first. Returns the iteration's reward,
    KL, advantage and critic statistics.
    """
    mask = ro.response_mask
    scores = ro.scores.clamp(-clip, clip) if clip else ro.scores
    ro.rewards = kl_penalized_rewards(scores, ro.old_logprobs, ro.ref_logprobs, mask, beta)
    adv, ro.returns = gae(ro.rewards, ro.values, mask, gamma, gae_lambda)
    ro.advantages = masked_whiten(adv, mask) if whiten else adv
    kl = kl_estimates(ro.old_logprobs, ro.ref_logprobs, mask)
    return {
        "reward/score_mean": ro.scores.mean().item(),
        "reward/score_std": ro.scores.std().item() if ro.batch_size > 1 else 0.0,
        "kl/ref_k1": kl["k1"].mean().item(),
        "kl/ref_k3": kl["k3"].mean().item(),
        "kl/beta": beta,
        "adv/mean_raw": masked_mean(adv, mask).item(),
        "adv/std_raw": masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt().item(),
        "critic/explained_var": explained_variance(ro.values, ro.returns, mask),
    }


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1 = perfect critic, <= 0 = useless)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_d / var_r).item() if var_r > 0 else float("nan")
