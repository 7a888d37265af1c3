"""The pure losses of apactl: APA, PPO, AWR, GRPO and RLOO policy losses, the critic's value
loss and the reward model's pairwise (Bradley-Terry) loss; DPO.

Shapes: B = sequences in the minibatch, T = padded response length, V = vocabulary size.
Every per-token input is [B, T]; `mask` is [B, T] with 1 on valid response tokens, 0 on padding.
Each loss returns (loss, stats): `loss` is a scalar token-level masked mean, i.e. the sum over
all valid tokens of the minibatch divided by their count (long responses weigh more than short
ones), unless its docstring says otherwise (RLOO: a mean over answers; GRPO: either);
`stats` holds 0-dim tensors computed without gradient, read back to the host once
per optimizer step (the loop logs the loss value itself as ``loss/policy`` /
``loss/value``). Padding never contributes to a loss or to a gradient: differences are
zeroed at padding *before* any nonlinearity, so even inf/nan padding values cannot turn into
nan gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from apactl.masked import masked_mean, masked_sum, zero_padding


def _stats(mask: Tensor, **named: Tensor) -> dict[str, Tensor]:
    """Masked means of the given [B, T] tensors, 0-dim on their device (the caller reads them
    back once per optimizer step, not once per statistic)."""
    with torch.no_grad():
        return {name: masked_mean(t.detach().float(), mask) for name, t in named.items()}


def apa_loss(
    logprobs: Tensor, anchor_logprobs: Tensor, advantages: Tensor, mask: Tensor, lam: float = 0.1
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage-Induced Policy Alignment (Zhu et al. 2023), token level.

    L = mean_t (logp_t - anchor_t - A_t / lam)^2, whose minimiser over policies is
    pi*(a|s) = pi_anchor(a|s) * exp(A(s, a) / lam) when the latter is normalised. Here `lam`
    is the paper's lambda: it divides the advantage (target = A / lam), so a smaller lam
    means a larger step away from the anchor. The anchor (usually the rollout policy's or the
    initial policy's log-probs) and the advantages are constants and are detached here.
    """
    log_ratio = zero_padding(logprobs - anchor_logprobs.detach(), mask)
    target = zero_padding(advantages.detach() / lam, mask)
    residual = log_ratio - target
    loss = masked_mean(residual**2, mask)
    stats = (
        _stats(
            mask,
            **{
                "policy/apa_target_mean": target,
                "policy/log_ratio_mean": log_ratio,
                "policy/apa_residual_abs_mean": residual.abs(),
            },
        )
    )
    return loss, stats


def ppo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: -mean_t min(rho_t * A_t, clip(rho_t, 1-eps, 1+eps) * A_t).

    rho_t = exp(logp_t - old_t). Stats: `policy/clip_frac` is the fraction of valid tokens
    where the clipped term is binding (strictly smaller than the unclipped one, so its gradient
    is zero); `policy/approx_kl` is the masked mean of 0.5 * (logp - old)^2 (the quadratic
    estimator, not k3).
    """
    log_ratio = zero_padding(logprobs - old_logprobs.detach(), mask)
    adv = zero_padding(advantages.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -masked_mean(torch.min(unclipped, clipped), mask)
    stats = (
        _stats(
            mask,
            **{
                "policy/clip_frac": (clipped < unclipped).float(),
                "policy/approx_kl": 0.5 * log_ratio**2,
                "policy/ratio_mean": ratio,
            },
        )
    )
    return loss, stats


def awr_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, lam: float = 1.0, max_weight: float = 20.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Advantage-weighted regression: -mean_t w_t * logp_t, w_t = min(exp(A_t / lam), max_weight).

    The weights are constants (detached). They are computed as exp(min(A/lam, log max_weight))
    so large advantages cannot overflow to inf before the clamp.
    """
    scaled = zero_padding(advantages.detach() / lam, mask)
    log_cap = math.log(max_weight)
    weights = torch.exp(scaled.clamp(max=log_cap))
    loss = -masked_mean(weights * zero_padding(logprobs, mask), mask)
    stats = (
        _stats(
            mask,
            **{"policy/awr_weight_mean": weights, "policy/awr_weight_clip_frac": scaled > log_cap},
        )
    )
    return loss, stats


# --- critic-free online losses (issue 21, section 1) ---
def grpo_loss(
    logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor,
    mask: Tensor, clip_eps: float = 0.2, beta: float = 0.0, aggregation: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO (Shao et al. 2024, eq. 3), per token with the answer's advantage A on every token:

        l_t = -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t) + beta * k3_t
        rho_t = exp(logp_t - old_t),  k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

    k3 (Schulman's unbiased, non-negative estimator of KL(pi || ref)) carries the gradient
    through logp. ``aggregation``: "token" = masked mean over every token of the minibatch
    (DAPO); "sequence" = each answer's token mean, then the mean over answers (the paper).
    """
    log_ratio = zero_padding(logprobs - old_logprobs.detach(), mask)
    adv = zero_padding(advantages.detach(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    ref_minus = zero_padding(ref_logprobs.detach() - logprobs, mask)
    k3 = torch.expm1(ref_minus) - ref_minus
    per_token = -torch.min(unclipped, clipped) + beta * k3
    if aggregation == "token":
        loss = masked_mean(per_token, mask)
    else:
        loss = (masked_sum(per_token, mask, dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    stats = _stats(mask, **{"policy/clip_frac": (clipped < unclipped).float(),
                            "policy/kl_k3": k3, "policy/ratio_mean": ratio})
    return loss, stats


def rloo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO (Ahmadian et al. 2024): REINFORCE on whole answers, advantages [B] per answer.

        L = -mean_b min(rho_b A_b, clip(rho_b, 1-eps, 1+eps) A_b),
        rho_b = exp(sum_t logp_bt - old_bt)

    At rho = 1 (the first step on a fresh rollout) the gradient is -mean_b A_b grad log pi(y_b),
    REINFORCE's; later minibatches and epochs are importance-weighted and, with ``clip_eps``,
    clipped as PPO clips (``clip_eps=None``: unclipped).
    """
    log_ratio = masked_sum(logprobs - old_logprobs.detach(), mask, dim=1)
    adv = advantages.detach()
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = unclipped if clip_eps is None else ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = -torch.min(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"policy/clip_frac": (clipped < unclipped).float().mean(),
                 "policy/ratio_mean": ratio.mean()}
    return loss, stats
# --- end critic-free online losses ---


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic regression: 0.5 * mean_t (V_t - R_t)^2.

    With `clip` set (PPO style): V_clip = old + clamp(V - old, -clip, clip) and
    loss = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2); `value/clip_frac` is the fraction of
    valid tokens where the clipped error is the larger (binding) one.
    """
    returns = returns.detach()
    err = zero_padding(values - returns, mask) ** 2
    stats_in = {"value/pred_mean": values, "value/return_mean": returns}
    if clip is None:
        loss = 0.5 * masked_mean(err, mask)
    else:
        delta = zero_padding(values - old_values.detach(), mask)
        clipped_values = old_values.detach() + delta.clamp(-clip, clip)
        err_clipped = zero_padding(clipped_values - returns, mask) ** 2
        loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
        stats_in["value/clip_frac"] = (err_clipped > err).float()
    stats = _stats(mask, **stats_in)
    return loss, stats


# Bytes of fp32 [rows, V] temporaries per chunk of the log-softmax below: the full [B, T, V]
# log-softmax, its exp and their product are 3-4 fp32 copies of the logits at once (~30-40 GB
# for a 128k vocabulary at rollout sizes); chunks bound them. Rows are independent, so the
# chunked results are bit-identical to the whole-tensor ones.
SOFTMAX_CHUNK_BYTES = 256 << 20


def _row_chunks(logits: Tensor, chunk_bytes: int) -> list[slice]:
    rows = max(1, chunk_bytes // (4 * logits.shape[-1]))
    n = logits.shape[0]
    return [slice(i, i + rows) for i in range(0, n, rows)]


def entropy_from_logits(logits: Tensor, temperature: float = 1.0,
                        chunk_bytes: int = SOFTMAX_CHUNK_BYTES) -> Tensor:
    """Entropy [B, T] of softmax(logits / temperature) over the last axis of logits [B, T, V]
    (fp32, in chunks of rows of at most ``chunk_bytes`` of fp32 temporaries)."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for rows in _row_chunks(flat, chunk_bytes):
        logp = F.log_softmax(flat[rows].float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(out).reshape(logits.shape[:-1])


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                         chunk_bytes: int = SOFTMAX_CHUNK_BYTES) -> Tensor:
    """log softmax(logits / temperature)[labels]: logits [B, T, V], labels [B, T] -> [B, T].

    Computed in float32 because bf16/fp16 log-softmax is too coarse for importance ratios, in
    chunks of rows of at most ``chunk_bytes`` of fp32 temporaries.
    """
    flat, lab = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1, 1)
    out = []
    for rows in _row_chunks(flat, chunk_bytes):
        logp = F.log_softmax(flat[rows].float() / temperature, dim=-1)
        out.append(logp.gather(-1, lab[rows]).squeeze(-1))
    return torch.cat(out).reshape(labels.shape)


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: float = 0.0
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1):
    mean_i -log sigmoid(r_chosen_i - r_rejected_i - margin) over scores [B] and [B].

    Stats: ``train/accuracy`` counts strict wins of the chosen reply, ``train/margin`` is the
    mean score gap.
    """
    gap = chosen.float() - rejected.float()
    loss = -F.logsigmoid(gap - margin).mean()
    with torch.no_grad():
        stats = {"train/loss": loss.detach(), "train/accuracy": (gap > 0).float().mean(),
                 "train/margin": gap.mean()}
    return loss, stats


# ------------------------------------------------------------------------------------- DPO
def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float = 0.1, kind: str = "sigmoid"
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Direct Preference Optimization on a batch of pairs; every input is [B]: the log-prob of
    a pair's chosen or rejected response (its response tokens' log-probs summed) under the
    policy or the frozen reference.

    h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), mean over pairs of
    ``sigmoid``: -log sigmoid(beta h) (Rafailov et al. 2023, eq. 7);
    ``ipo``: (h - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17, on summed log-probs).
    The reference log-probs are constants (detached).

    Stats, named as TRL names them: ``rewards/chosen`` = mean beta (log pi(c) - log ref(c)),
    ``rewards/rejected`` likewise, ``rewards/margins`` their mean difference,
    ``rewards/accuracies`` the fraction of pairs whose chosen reward is strictly the larger,
    ``logps/chosen|rejected`` the policy's mean log-probs; ``train/loss`` the loss.
    """
    # At least float32 (a sum of hundreds of 16-bit log-probs is too coarse for a log-ratio);
    # float64 inputs stay float64.
    chosen_ratio = _wide(policy_chosen) - _wide(ref_chosen.detach())
    rejected_ratio = _wide(policy_rejected) - _wide(ref_rejected.detach())
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h).mean()
    elif kind == "ipo":
        loss = ((h - 1 / (2 * beta)) ** 2).mean()
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected sigmoid or ipo")
    with torch.no_grad():
        rc, rr = beta * chosen_ratio, beta * rejected_ratio
        # 0-dim tensors: the training core reads them back once per optimizer step
        stats = {"train/loss": loss.detach(), "rewards/chosen": rc.mean(),
                 "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
                 "rewards/accuracies": (rc > rr).float().mean(),
                 "logps/chosen": _wide(policy_chosen).mean(),
                 "logps/rejected": _wide(policy_rejected).mean()}
    return loss, stats
