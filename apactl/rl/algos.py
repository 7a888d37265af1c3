"""The only place the algorithms differ: which pure loss turns log-probs into a loss.

A new algorithm = one loss in ``losses.py``, one config class in ``config.py`` (added to the
``algo`` union; its ``advantage`` names the estimator, ``kl_in_loss`` where the KL goes), one
adapter + entry here, one recipe, its tests. ``beta`` is the iteration's KL coefficient: an
adapter whose config has ``kl_in_loss`` uses it, the others find the KL in the rewards.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from apactl.config import APAConfig, AWRConfig, GRPOConfig, PPOConfig, RLOOConfig
from apactl.losses import apa_loss, awr_loss, grpo_loss, ppo_loss, rloo_loss
from apactl.masked import masked_mean
from apactl.rl.types import Rollout


def _apa(cfg: APAConfig, logprobs: Tensor, mb: Rollout, beta: float):
    # anchor=init: the paper's pi_init (official code); anchor=old: the rollout policy.
    anchor = mb.ref_logprobs if cfg.anchor == "init" else mb.old_logprobs
    return apa_loss(logprobs, anchor, mb.advantages, mb.response_mask, cfg.lam)


def _ppo(cfg: PPOConfig, logprobs: Tensor, mb: Rollout, beta: float):
    return ppo_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, cfg.clip_eps)


def _awr(cfg: AWRConfig, logprobs: Tensor, mb: Rollout, beta: float):
    return awr_loss(logprobs, mb.advantages, mb.response_mask, cfg.lam, cfg.max_weight)


def _grpo(cfg: GRPOConfig, logprobs: Tensor, mb: Rollout, beta: float):
    return grpo_loss(logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages,
                     mb.response_mask, cfg.clip_eps, beta, cfg.loss_aggregation)


def _rloo(cfg: RLOOConfig, logprobs: Tensor, mb: Rollout, beta: float):
    # The advantage is one number per answer, broadcast to its tokens by rl.advantages.
    per_answer = masked_mean(mb.advantages, mb.response_mask, dim=1).nan_to_num()
    return rloo_loss(logprobs, mb.old_logprobs, per_answer, mb.response_mask, cfg.clip_eps)


POLICY_LOSSES: dict[str, Callable] = {"apa": _apa, "ppo": _ppo, "awr": _awr, "grpo": _grpo,
                                      "rloo": _rloo}


def policy_loss(cfg, logprobs: Tensor, mb: Rollout, beta: float = 0.0
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch on ``cfg.name``: (scalar loss, stats) for the minibatch ``mb``."""
    return POLICY_LOSSES[cfg.name](cfg, logprobs, mb, beta)
