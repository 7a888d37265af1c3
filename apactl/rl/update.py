"""The RL update: epochs of shuffled minibatches, each one optimizer step of policy and critic
(the policy alone for a critic-free algorithm: ``actors.critic is None``).

Every rank draws the same permutation of the global rollout; each minibatch is cut into
grad_accum x world_size micro-batches (``training.micro_batches``) and stepped by the shared
training core, which averages gradients over ranks before clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apactl.losses import value_loss
from apactl.rl.algos import policy_loss
from apactl.rl.forward import build_sequences
from apactl.rl.rollout import Actors
from apactl.rl.types import Rollout
from apactl.sampling import SamplingSpec
from apactl.training import Optimization, micro_batches


@dataclass
class UpdatePlan:
    """What one update needs from the recipe: the loss, the batch arithmetic, the precision."""

    algo: object  # an AlgoConfig of apactl.config
    spec: SamplingSpec
    minibatch_size: int
    grad_accum: int
    epochs: int
    value_clip: float | None
    seed: int
    pad_id: int
    autocast: object = None  # () -> context manager


def update(actors: Actors, opt: Optimization, ro: Rollout, plan: UpdatePlan, iteration: int,
           train_policy: bool, beta: float = 0.0) -> dict[str, float]:
    """``plan.epochs`` passes over ``ro`` in shuffled minibatches; mean stats over steps.
    ``beta``: the KL coefficient, for a loss that holds the KL (GRPO)."""
    gen = torch.Generator().manual_seed(plan.seed * 100_003 + iteration)
    actors.policy.train()
    if actors.critic is not None:
        actors.critic.train()
    sums: dict[str, float] = {}
    n_steps = 0
    for _ in range(plan.epochs):
        for mb in ro.minibatches(plan.minibatch_size, gen):
            for k, v in _step(actors, opt, mb, plan, train_policy, beta).items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
    return opt.dist.mean_dict({k: v / max(n_steps, 1) for k, v in sums.items()})


def _step(actors: Actors, opt: Optimization, mb: Rollout, plan: UpdatePlan,
          train_policy: bool, beta: float) -> dict[str, float]:
    """One optimizer step over a minibatch; its statistics are summed on the device and read
    back by ``opt.step`` in its one host sync."""
    stats: dict[str, torch.Tensor] = {}

    def add(values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            stats[k] = stats.get(k, 0.0) + v.detach() / plan.grad_accum

    for rows in micro_batches(mb.batch_size, plan.grad_accum, opt.dist):
        m = mb.index(torch.arange(rows.start, rows.stop))
        seq = build_sequences(m.query_ids, m.query_mask, m.response_ids, m.response_mask,
                              plan.pad_id)
        with plan.autocast():
            loss = torch.zeros((), device=actors.device)
            if train_policy:
                logp = actors.forwards.policy_logprobs(seq, m.response_ids, plan.spec, m.episode)
                p_loss, p_stats = policy_loss(plan.algo, logp, m, beta)
                loss = loss + p_loss
                add({**p_stats, "loss/policy": p_loss})
            if actors.critic is not None:
                v_new = actors.forwards.values(seq, m.episode)
                v_loss, v_stats = value_loss(v_new, m.values, m.returns, m.response_mask,
                                             plan.value_clip)
                loss = loss + plan.algo.vf_coef * v_loss
                add({**v_stats, "loss/value": v_loss})
        add({"loss/total": loss})
        opt.backward(loss, plan.grad_accum)
    trained = ["policy"] if train_policy else []
    return opt.step(trained + (["critic"] if actors.critic is not None else []), stats)
