"""Masked statistics, KL-shaped rewards and GAE for token-level RLHF.

Conventions: B = batch of episodes, T = padded response length. `mask` is a [B, T] tensor with
1 on valid (generated) tokens and 0 on padding; valid tokens form a prefix of each row.
Values at padding positions are arbitrary (even inf/nan) and never enter any result: they are
replaced with `torch.where` rather than multiplied by 0, because inf * 0 = nan.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding positions replaced by 0 (safe even if padding holds inf/nan)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all elements when dim is None). x, mask broadcastable."""
    x = zero_padding(x, mask) * mask
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all elements when dim is None).

    An all-padding slice gives 0/0 = nan, which is deliberately not hidden.
    """
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of the valid entries of x: masked_mean((x - mu)^2) [* n / (n - 1)].

    With unbiased=True and a single valid entry the (zero) biased variance is returned
    instead of dividing by n - 1 = 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mu) / sqrt(var + eps) with mu, var over valid entries only; padding set to 0.

    With shift_mean=False the mean is added back, i.e. only the scale is normalised.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)


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
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens.

    Inputs rewards, values, mask: [B, T]. Returns (advantages [B, T], returns [B, T]):
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),  V after the last valid token = 0
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}   (within the valid span)
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
        adv = (delta + gamma * lam * next_adv) * mask[:, t]
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
