"""The forward passes of the RL loop, planned once per run.

Two ways to compute each model's outputs, which must agree (tests compare them):

* plain: ``model(input_ids).logits`` at every position (``scoring.policy_forward``,
  ``scoring.critic_forward``), the reference implementation;
* split (``trunk.Split``): the frozen bottom (trunk) once per rollout, shared between models
  that share those modules and cached in the Rollout for the update; the top layers per model;
  the LM head on the response positions only.

Every split is checked against the plain forward on the first real batch; a model whose
outputs disagree (an architecture the split does not describe) keeps the plain forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from apactl.rl.scoring import (
    SeqBatch,
    critic_forward,
    fit_width,
    lm_head_logprobs,
    policy_forward,
    value_head,
)
from apactl.rl.trunk import Split, make_split


def _tolerance(dtype: torch.dtype) -> float:
    # A structural mismatch is O(1); fp32 reordering noise is ~1e-5 on log-probs.
    return 1e-3 if dtype == torch.float32 else 1e-1


@dataclass
class Role:
    """One model of the loop and how its forward runs (``split is None``: plain)."""

    name: str
    model: torch.nn.Module
    split: Split | None
    adapter_off: bool = False  # the LoRA reference: the policy with its adapter disabled

    def context(self):
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()


class Engine:
    """Policy, reference and critic forwards for rollouts (no grad) and updates (grad)."""

    def __init__(self, policy, ref, critic, k: int, reuse_trunk: bool,
                 warn: Callable[[str], None] = print):
        split = (lambda m: make_split(m, k)) if reuse_trunk else (lambda m: None)
        self.policy = Role("policy", policy, split(policy))
        self.ref = (Role("reference", policy, split(policy), adapter_off=True) if ref is None
                    else Role("reference", ref, split(ref)))
        self.critic = Role("critic", critic, split(critic))
        # The trunk is worth caching only when it holds layers (k > 0) that the update skips.
        self.cache = reuse_trunk and k > 0
        self.warn = warn
        self.verified = False

    # ---------------------------------------------------------------- rollout scoring
    @torch.no_grad()
    def score(self, seq: SeqBatch, resp: Tensor, temperature: float) -> dict[str, Tensor]:
        """Chunk [B, L] -> old/ref log-probs [B, T], entropy [B, T], values [B, T], and the
        policy's and critic's trunk outputs [B, L, H] (when cached) for the update."""
        if not self.verified:
            self._verify(seq, resp, temperature)
        trunks: dict[tuple[int, ...], Tensor] = {}
        old, ent = self._logprobs(self.policy, seq, resp, temperature, trunks, entropy=True)
        ref, _ = self._logprobs(self.ref, seq, resp, temperature, trunks)
        values = self._values(self.critic, seq, trunks)
        out = {"old_logprobs": old, "entropy": ent, "ref_logprobs": ref, "values": values}
        if self.cache:
            for role in (self.policy, self.critic):
                if role.split is not None and role.split.frozen:
                    out[f"{role.name}_trunk"] = trunks[role.split.key]
        return out

    def _trunk(self, role: Role, seq: SeqBatch, trunks: dict) -> Tensor:
        key = role.split.key
        if key not in trunks or role.adapter_off:
            with role.context():
                hidden = role.split.trunk(seq.input_ids, seq.attention_mask)
            if role.adapter_off:
                return hidden  # LoRA off != on: never shared
            trunks[key] = hidden
        return trunks[key]

    def _logprobs(self, role: Role, seq, resp, temperature, trunks, entropy=False):
        if role.split is None:
            with role.context():
                return policy_forward(role.model, seq, resp, temperature, with_entropy=entropy)
        trunk = self._trunk(role, seq, trunks)
        with role.context():
            hidden = role.split.top(trunk, seq.attention_mask)
            return lm_head_logprobs(role.model, hidden, seq, resp, temperature, entropy)

    def _values(self, role: Role, seq, trunks) -> Tensor:
        if role.split is None:
            return critic_forward(role.model, seq)
        hidden = role.split.top(self._trunk(role, seq, trunks), seq.attention_mask)
        return value_head(role.model, hidden, seq)

    def _verify(self, seq: SeqBatch, resp: Tensor, temperature: float) -> None:
        """Compare each split with the plain forward once; keep the plain one where they differ."""
        self.verified = True
        for role in (self.policy, self.ref, self.critic):
            if role.split is None:
                continue
            trunks: dict = {}
            if role is self.critic:
                fast, slow = self._values(role, seq, trunks), critic_forward(role.model, seq)
            else:
                fast = self._logprobs(role, seq, resp, temperature, trunks)[0]
                with role.context():
                    slow = policy_forward(role.model, seq, resp, temperature)[0]
            # Only real response tokens: padding positions hold arbitrary values, and the plain
            # forward numbers positions past a row's end differently.
            valid = seq.attention_mask.gather(1, seq.positions).bool()
            diff = float((fast - slow)[valid].abs().max()) if valid.any() else 0.0
            if not diff <= _tolerance(next(role.model.parameters()).dtype):
                self.warn(f"{role.name}: the split forward disagrees with the plain one "
                          f"(max diff {diff:.2g}); using the plain forward for this model")
                role.split = None

    # ---------------------------------------------------------------- update (with grad)
    def policy_logprobs(self, seq: SeqBatch, resp: Tensor, temperature: float,
                        trunk: Tensor | None) -> Tensor:
        """Log-probs [B, T] with grad; from the cached trunk [B, S, H] when given."""
        role = self.policy
        if role.split is None or trunk is None:
            return policy_forward(role.model, seq, resp, temperature)[0]
        hidden = role.split.top(fit_width(trunk, seq.input_ids.shape[1]), seq.attention_mask)
        return lm_head_logprobs(role.model, hidden, seq, resp, temperature)[0]

    def values(self, seq: SeqBatch, trunk: Tensor | None) -> Tensor:
        """V(s_t) [B, T] with grad; from the cached trunk [B, S, H] when given."""
        role = self.critic
        if role.split is None or trunk is None:
            return critic_forward(role.model, seq)
        hidden = role.split.top(fit_width(trunk, seq.input_ids.shape[1]), seq.attention_mask)
        return value_head(role.model, hidden, seq)
