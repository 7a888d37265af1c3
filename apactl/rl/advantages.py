"""KL-shaped rewards, the advantage estimators and KL estimates for token-level RLHF.

Conventions: B = batch of episodes, T = padded response length. `mask` is a [B, T] tensor with
1 on valid (generated) tokens and 0 on padding; valid tokens form a prefix of each row (masked
statistics: ``apactl.masked``). Group estimators take B = G x k rows, prompt-major: rows
g*k .. g*k+k-1 are the k answers to prompt g (``rl.rollout`` keeps them so).

Estimators: ``gae`` (a critic's values), ``group`` (GRPO) and ``leave_one_out`` (RLOO), the last
two per answer and broadcast to its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# --- group estimators (issue 21, section 1) ---
def group_advantages(rewards: Tensor, k: int, scale: str = "group", eps: float = 1e-4
                     ) -> Tensor:
    """GRPO's advantage per answer: rewards [B] (B = G x k, prompt-major) -> [B].

        A_i = (r_i - mean_group(r)) / (s + eps)
    s = the group's standard deviation (``scale="group"``, Shao et al. 2024), the whole batch's
    (``"batch"``), or no division at all (``"none"``: Dr. GRPO, Liu et al. 2025). Standard
    deviations are the unbiased ones (k - 1), as TRL computes them.
    """
    grouped = rewards.view(-1, k)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return adv
    std = grouped.std(dim=1).repeat_interleave(k) if scale == "group" else rewards.std()
    return adv / (std + eps)


def leave_one_out_advantages(rewards: Tensor, k: int) -> Tensor:
    """RLOO's advantage per answer (Kool et al. 2019; Ahmadian et al. 2024): rewards [B]
    (B = G x k, prompt-major) -> [B], A_i = r_i - mean_{j != i, same prompt} r_j."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def per_token(values: Tensor, mask: Tensor) -> Tensor:
    """A per-answer quantity [B] on every valid token of its row: [B, T], 0 on padding."""
    return zero_padding(values.unsqueeze(1).expand(mask.shape), mask)


@dataclass(frozen=True)
class AdvantageSpec:
    """How a rollout's advantages are estimated (from the recipe's ``algo``, ``gae`` and
    ``generation.samples_per_prompt``)."""

    estimator: str = "gae"  # gae | group | leave_one_out
    gamma: float = 1.0  # gae only
    lam: float = 0.95  # gae only
    whiten: bool = True  # gae only
    clip: float | None = None  # judge scores clipped to [-clip, clip] first
    group_size: int = 1  # k answers per prompt
    scale: str = "group"  # group only
    kl_in_reward: bool = True  # False: the KL is a loss term (GRPO), the reward is the score


def add_advantages(ro, beta: float, spec: AdvantageSpec) -> dict[str, float]:
    """KL-penalised rewards -> advantages (``spec.estimator``), set on Rollout ``ro``.

    gae: GAE over the per-token rewards, optionally whitened; ``ro.returns`` for the critic.
    group / leave_one_out: the answer's reward r = sum_t rewards_t = score - beta * k1 (the score
    alone when the KL is in the loss) -> a per-answer advantage on all its tokens; no returns.
    Returns the iteration's reward, KL, advantage (and critic) statistics.
    """
    mask = ro.response_mask
    scores = ro.scores.clamp(-spec.clip, spec.clip) if spec.clip else ro.scores
    reward_beta = beta if spec.kl_in_reward else 0.0
    ro.rewards = kl_penalized_rewards(scores, ro.old_logprobs, ro.ref_logprobs, mask,
                                      reward_beta)
    out = {}
    if spec.estimator == "gae":
        adv, ro.returns = gae(ro.rewards, ro.values, mask, spec.gamma, spec.lam)
        ro.advantages = masked_whiten(adv, mask) if spec.whiten else adv
        out["critic/explained_var"] = explained_variance(ro.values, ro.returns, mask)
    else:
        k, answer_reward = spec.group_size, ro.rewards.sum(dim=1)
        per_answer = (group_advantages(answer_reward, k, spec.scale)
                      if spec.estimator == "group" else
                      leave_one_out_advantages(answer_reward, k))
        adv = ro.advantages = per_token(per_answer, mask)
        # Groups whose answers all scored alike teach nothing (A = 0 for each of them).
        out["adv/zero_std_group_frac"] = (answer_reward.view(-1, k).std(dim=1) < 1e-8
                                          ).float().mean().item()
    kl = kl_estimates(ro.old_logprobs, ro.ref_logprobs, mask)
    return {
        "reward/score_mean": ro.scores.mean().item(),
        "reward/score_std": ro.scores.std().item() if ro.batch_size > 1 else 0.0,
        "kl/ref_k1": kl["k1"].mean().item(),
        "kl/ref_k3": kl["k3"].mean().item(),
        "kl/beta": beta,
        "adv/mean_raw": masked_mean(adv, mask).item(),
        "adv/std_raw": masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt().item(),
        **out,
    }


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1 = perfect critic, <= 0 = useless)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_d / var_r).item() if var_r > 0 else float("nan")
