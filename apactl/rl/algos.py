"""The only place the three algorithms differ: which pure loss turns log-probs into a loss.

A new algorithm = one loss in ``losses.py``, one config class in ``config.py`` (added to the
``algo`` union), one adapter + entry here, one recipe, its tests.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from apactl.config import APAConfig, AWRConfig, PPOConfig
from apactl.losses import apa_loss, awr_loss, ppo_loss
from apactl.rl.types import Rollout


def _apa(cfg: APAConfig, logprobs: Tensor, mb: Rollout):
    # anchor=init: the paper's pi_init (official code); anchor=old: the rollout policy.
    anchor = mb.ref_logprobs if cfg.anchor == "init" else mb.old_logprobs
    return apa_loss(logprobs, anchor, mb.advantages, mb.response_mask, cfg.lam)


def _ppo(cfg: PPOConfig, logprobs: Tensor, mb: Rollout):
    return ppo_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, cfg.clip_eps)


def _awr(cfg: AWRConfig, logprobs: Tensor, mb: Rollout):
    return awr_loss(logprobs, mb.advantages, mb.response_mask, cfg.lam, cfg.max_weight)


POLICY_LOSSES: dict[str, Callable] = {"apa": _apa, "ppo": _ppo, "awr": _awr}


def policy_loss(cfg, logprobs: Tensor, mb: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch on ``cfg.name``: (scalar loss, stats) for the minibatch ``mb``."""
    return POLICY_LOSSES[cfg.name](cfg, logprobs, mb)
