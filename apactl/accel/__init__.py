"""Accelerators: faster ways to compute what the core computes, behind the core's interfaces,
each checked against the plain implementation.

* ``trunk`` / ``engine``: the frozen bottom of the models computed once per rollout, shared
  between policy, reference and critic, and kept for the update (``rl.forward.Forwards``).
* Decode backends live with the sampling path (``apactl.sampling.backends``): on CPU
  weight-major matmuls, on CUDA a static cache replayed as a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

from apactl.accel.trunk import share_bottom
from apactl.rl.forward import Forwards, PlainForwards


def plan_forwards(policy, ref, critic, k: int, critic_k: int, reuse_trunk: bool,
                  reward_model=None, warn: Callable[[str], None] = print) -> Forwards:
    """Plan the forwards. Models whose frozen bottom layers hold equal weights share those
    modules (one copy in memory): the reference and the policy always (the reference is the
    initial policy), the critic and the reward model when they were trained from the same base
    with the same layers frozen (``share_bottom`` compares the weights). Policy, reference and a
    critic sharing the policy's modules then also share one trunk computation per rollout."""
    from apactl.accel.engine import TrunkForwards

    if not reuse_trunk:
        return PlainForwards(policy, ref, critic)
    if k > 0:
        if ref is not None:
            share_bottom(policy, ref, k)  # the reference keeps only its own top layers
        if reward_model is not None:
            share_bottom(policy, reward_model, k)
        if critic is not None and critic_k == k:
            share_bottom(policy, critic, k)
    if critic is not None and critic_k > 0 and reward_model is not None:
        share_bottom(reward_model, critic, critic_k)  # a LoRA policy shares nothing; these may
    return TrunkForwards(policy, ref, critic, k=k, warn=warn)
