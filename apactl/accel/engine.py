"""Forwards around the frozen trunk: the bottom computed once per rollout and kept for the update.

With ``train.freeze_bottom_layers = k`` and ``train.reuse_frozen_trunk``:

* the trunk (embeddings + bottom k layers) runs once per rollout chunk and is shared by the
  models that share those modules (policy, reference, a critic from the same base);
* the LM head runs on the response positions only;
* the policy's and the critic's trunk outputs are kept per episode, so the update runs (and
  back-propagates through) the top layers only.

Every split is checked against ``rl.forward.PlainForwards`` on the first real batch (``check``);
a model whose outputs disagree (an architecture the split does not describe) keeps the plain
forward. The kept trunks live here, keyed by ``Rollout.episode``, never in the Rollout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from apactl.accel.trunk import Split, make_split
from apactl.rl.forward import (
    PlainForwards,
    SeqBatch,
    critic_forward,
    fit_width,
    lm_head_logprobs,
    policy_forward,
    value_head,
)
from apactl.sampling import SamplingSpec


def _tolerance(param: torch.Tensor) -> float:
    # A structural mismatch is O(1); fp32 reordering noise is ~1e-5 on log-probs, 16-bit
    # compute (16-bit weights, or fp32 weights under autocast) ~1e-2.
    half = param.dtype != torch.float32 or torch.is_autocast_enabled(param.device.type)
    return 1e-1 if half else 1e-3


@dataclass
class Role:
    """One model of the loop and how its forward runs (``split is None``: plain)."""

    name: str
    model: torch.nn.Module
    split: Split | None
    adapter_off: bool = False  # the LoRA reference: the policy with its adapter disabled

    def context(self):
        return self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext()


class TrunkForwards(PlainForwards):
    """``Forwards`` that compute each frozen trunk once and keep it for the update."""

    def __init__(self, policy, ref, critic, k: int, warn: Callable[[str], None] = print):
        super().__init__(policy, ref, critic)
        self.p = Role("policy", policy, make_split(policy, k))
        self.r = (Role("reference", policy, make_split(policy, k), adapter_off=True)
                  if ref is None else Role("reference", ref, make_split(ref, k)))
        self.c = None if critic is None else Role("critic", critic, make_split(critic, k))
        self.warn = warn
        self.pending_check = True
        # Worth keeping only when the trunk holds layers (k > 0) that the update then skips.
        self.keep = k > 0
        self.kept: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- rollout (no grad)
    @torch.no_grad()
    def rollout(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec) -> dict[str, Tensor]:
        trunks: dict[tuple[int, ...], Tensor] = {}
        old, ent = self._logprobs(self.p, seq, resp, spec, trunks, entropy=True)
        ref, _ = self._logprobs(self.r, seq, resp, spec, trunks)
        out = {"old_logprobs": old, "entropy": ent, "ref_logprobs": ref}
        if self.c is not None:
            out["values"] = self._values(self.c, seq, trunks)
        for role in (self.p, self.c) if self.keep else ():
            if role is not None and role.split is not None and role.split.frozen:
                out[f"keep/{role.name}"] = trunks[role.split.key]
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

    def _logprobs(self, role: Role, seq, resp, spec, trunks, entropy=False):
        if role.split is None:
            with role.context():
                return policy_forward(role.model, seq, resp, spec, with_entropy=entropy)
        trunk = self._trunk(role, seq, trunks)
        with role.context():
            hidden = role.split.top(trunk, seq.attention_mask)
            return lm_head_logprobs(role.model, hidden, seq, resp, spec, entropy)

    def _values(self, role: Role, seq, trunks) -> Tensor:
        if role.split is None:
            return critic_forward(role.model, seq)
        hidden = role.split.top(self._trunk(role, seq, trunks), seq.attention_mask)
        return value_head(role.model, hidden, seq)

    @torch.no_grad()
    def check(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec) -> None:
        """Compare each split with the plain forward once; keep the plain one where they differ."""
        self.pending_check = False
        for role in (self.p, self.r, self.c):
            if role is None or role.split is None:
                continue
            trunks: dict = {}
            if role is self.c:
                fast, slow = self._values(role, seq, trunks), critic_forward(role.model, seq)
            else:
                fast = self._logprobs(role, seq, resp, spec, trunks)[0]
                with role.context():
                    slow = policy_forward(role.model, seq, resp, spec)[0]
            # Only real response tokens: padding positions hold arbitrary values, and the plain
            # forward numbers positions past a row's end differently.
            valid = seq.attention_mask.gather(1, seq.positions).bool()
            diff = float((fast - slow)[valid].abs().max()) if valid.any() else 0.0
            if not diff <= _tolerance(next(role.model.parameters())):
                self.warn(f"{role.name}: the split forward disagrees with the plain one "
                          f"(max diff {diff:.2g}); using the plain forward for this model")
                role.split = None

    # ---------------------------------------------------------------- update (with grad)
    def remember(self, kept: dict[str, Tensor]) -> None:
        self.kept = kept

    def _kept(self, name: str, episode: Tensor, width: int) -> Tensor | None:
        trunk = self.kept.get(f"keep/{name}")
        if trunk is None:
            return None
        return fit_width(trunk[episode.to(trunk.device)], width)

    def policy_logprobs(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec,
                        episode: Tensor) -> Tensor:
        trunk = self._kept("policy", episode, seq.input_ids.shape[1])
        if self.p.split is None or trunk is None:
            return policy_forward(self.policy, seq, resp, spec)[0]
        hidden = self.p.split.top(trunk, seq.attention_mask)
        return lm_head_logprobs(self.policy, hidden, seq, resp, spec)[0]

    def values(self, seq: SeqBatch, episode: Tensor) -> Tensor:
        trunk = self._kept("critic", episode, seq.input_ids.shape[1])
        if self.c.split is None or trunk is None:
            return critic_forward(self.critic, seq)
        hidden = self.c.split.top(trunk, seq.attention_mask)
        return value_head(self.critic, hidden, seq)
