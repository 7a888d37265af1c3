"""The forward passes of the RL loop over (prompt, response) sequences: token log-probs and
entropies of the policy and the reference, and the critic's values.

Rows are rebuilt RIGHT-aligned as ``prompt (unpadded) + response`` so every architecture sees
ordinary positions 0..n without position-id tricks; ``positions[b, t]`` is where response
token t of row b sits.

``PlainForwards`` is the reference implementation of the ``Forwards`` interface the loop uses;
``apactl.accel`` provides a faster one (the frozen trunk computed once) that must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from apactl.models import score_head, token_values, unwrap
from apactl.sampling import SamplingSpec


@dataclass
class SeqBatch:
    """input_ids/attention_mask [B, L] right-padded; positions [B, T] of the response tokens."""

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor

    def rows(self, s: slice) -> SeqBatch:
        """Rows ``s``, trimmed to the longest attended row (less padding in small chunks)."""
        attn = self.attention_mask[s]
        width = max(int(self.positions[s].max()) + 1, 1)
        return SeqBatch(self.input_ids[s, :width], attn[:, :width], self.positions[s])


def build_sequences(query_ids: Tensor, query_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor, pad_id: int) -> SeqBatch:
    """Left-padded prompts [B, P] + right-padded responses [B, T] -> right-padded rows [B, L]."""
    b, p = query_ids.shape
    t = response_ids.shape[1]
    plen = query_mask.long().sum(1)  # [B]
    length = int(plen.max()) + t
    ids = torch.full((b, length), pad_id, dtype=query_ids.dtype, device=query_ids.device)
    attn = torch.zeros((b, length), dtype=torch.long, device=query_ids.device)
    # Column j of the right-aligned row takes prompt column j + (P - plen) (skip left padding).
    cols = torch.arange(length, device=query_ids.device).unsqueeze(0)  # [1, L]
    src = cols + (p - plen).unsqueeze(1)
    in_prompt = cols < plen.unsqueeze(1)
    ids = torch.where(in_prompt, query_ids.gather(1, src.clamp(max=p - 1)), ids)
    attn = torch.where(in_prompt, torch.ones_like(attn), attn)
    positions = plen.unsqueeze(1) + torch.arange(t, device=query_ids.device).unsqueeze(0)
    ids.scatter_(1, positions, response_ids)
    attn.scatter_(1, positions, response_mask.long())
    return SeqBatch(ids, attn, positions)


def at_response(hidden: Tensor, positions: Tensor, shift: int = 1) -> Tensor:
    """Select [B, T, ...] from [B, L, ...] at positions - shift (state before each token)."""
    idx = (positions - shift).clamp(min=0)
    if hidden.dim() == 2:
        return hidden.gather(1, idx)
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def policy_forward(model, seq: SeqBatch, response_ids: Tensor, spec: SamplingSpec,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [B, T] of the response tokens under ``spec``'s distribution; entropy [B, T]."""
    logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits
    logits = at_response(logits, seq.positions)  # [B, T, V]
    return spec.logprobs(logits, response_ids), spec.entropy(logits) if with_entropy else None


def critic_forward(critic, seq: SeqBatch) -> Tensor:
    """V(s_t) [B, T]: the value head at the position just before each response token."""
    values = token_values(critic, seq.input_ids, seq.attention_mask)  # [B, L]
    return at_response(values.float(), seq.positions)


def lm_head_logprobs(model, hidden: Tensor, seq: SeqBatch, response_ids: Tensor,
                     spec: SamplingSpec, with_entropy: bool = False
                     ) -> tuple[Tensor, Tensor | None]:
    """Final hidden [B, L, H] -> log-probs [B, T] (and entropy [B, T]) of the response tokens.

    The LM head runs on the T response positions only, not on all L: with a 49k vocabulary it
    costs as much as ~8 of SmolLM2's layers per position, and the prompt positions are unused.
    """
    logits = unwrap(model).get_output_embeddings()(at_response(hidden, seq.positions))
    return spec.logprobs(logits, response_ids), spec.entropy(logits) if with_entropy else None


def value_head(critic, hidden: Tensor, seq: SeqBatch) -> Tensor:
    """Final hidden [B, L, H] -> V(s_t) [B, T] float32, from the state before each token."""
    return score_head(critic)(at_response(hidden, seq.positions)).squeeze(-1).float()


def fit_width(x: Tensor, width: int) -> Tensor:
    """Cut or zero-pad a [B, S, ...] tensor along dim 1 to ``width`` (the extra columns are
    padding positions, masked everywhere)."""
    if x.shape[1] >= width:
        return x[:, :width]
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
    return torch.nn.functional.pad(x, pad)


class Forwards(Protocol):
    """How the loop computes log-probs and values; ``keep/`` outputs carry per-episode tensors
    a backend wants from the rollout to the update (rows [B, S, ...], padded along dim 1)."""

    pending_check: bool  # True until ``check`` ran on the first real batch

    def check(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec) -> None:
        """Compare with the plain forwards once (timed apart, as the "verify" phase)."""

    def rollout(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec) -> dict[str, Tensor]:
        """No grad: ``old_logprobs``, ``ref_logprobs``, ``entropy``, ``values`` (with a critic)
        [B, T], and ``keep/<name>`` tensors for the update."""

    def remember(self, kept: dict[str, Tensor]) -> None:
        """The whole rollout's ``keep/`` tensors (rows = ``Rollout.episode``)."""

    def policy_logprobs(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec,
                        episode: Tensor) -> Tensor:
        """Log-probs [B, T] with grad for episodes ``episode`` [B]."""

    def values(self, seq: SeqBatch, episode: Tensor) -> Tensor:
        """V(s_t) [B, T] with grad for episodes ``episode`` [B]."""


class PlainForwards:
    """Whole-model forwards: the reference implementation. ``ref is None``: the LoRA policy
    with its adapter disabled is the reference; ``critic is None``: no values."""

    pending_check = False  # nothing to compare: this is the reference implementation

    def __init__(self, policy, ref, critic):
        self.policy, self.ref, self.critic = policy, ref, critic

    def check(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec) -> None:
        """Called on the first real batch while ``pending_check``; faster backends compare
        themselves with this class there."""

    def reference(self):
        return self.ref if self.ref is not None else self.policy

    def ref_context(self):
        import contextlib

        return self.policy.disable_adapter() if self.ref is None else contextlib.nullcontext()

    @torch.no_grad()
    def rollout(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec) -> dict[str, Tensor]:
        old, ent = policy_forward(self.policy, seq, resp, spec, with_entropy=True)
        with self.ref_context():
            ref, _ = policy_forward(self.reference(), seq, resp, spec)
        out = {"old_logprobs": old, "entropy": ent, "ref_logprobs": ref}
        if self.critic is not None:
            out["values"] = critic_forward(self.critic, seq)
        return out

    def remember(self, kept: dict[str, Tensor]) -> None:
        del kept

    def policy_logprobs(self, seq: SeqBatch, resp: Tensor, spec: SamplingSpec,
                        episode: Tensor) -> Tensor:
        return policy_forward(self.policy, seq, resp, spec)[0]

    def values(self, seq: SeqBatch, episode: Tensor) -> Tensor:
        return critic_forward(self.critic, seq)
