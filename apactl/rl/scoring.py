"""Forward passes over (prompt, response) sequences: token log-probs, entropies and values.

Rows are rebuilt RIGHT-aligned as ``prompt (unpadded) + response`` so every architecture sees
ordinary positions 0..n without position-id tricks; ``positions[b, t]`` is where response
token t of row b sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from apactl.models import _unwrap
from apactl.rl.losses import entropy_from_logits, logprobs_from_logits


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


def _at_response(hidden: Tensor, positions: Tensor, shift: int = 1) -> Tensor:
    """Select [B, T, ...] from [B, L, ...] at positions - shift (state before each token)."""
    idx = (positions - shift).clamp(min=0)
    if hidden.dim() == 2:
        return hidden.gather(1, idx)
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def policy_forward(model, seq: SeqBatch, response_ids: Tensor, temperature: float,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [B, T] of the response tokens (temperature-scaled, as sampled); entropy [B, T]."""
    logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits
    logits = _at_response(logits, seq.positions)  # [B, T, V]
    logp = logprobs_from_logits(logits, response_ids, temperature)
    ent = entropy_from_logits(logits.float() / temperature) if with_entropy else None
    return logp, ent


def critic_forward(critic, seq: SeqBatch) -> Tensor:
    """V(s_t) [B, T]: the value head at the position just before each response token."""
    from apactl.models import token_values

    values = token_values(critic, seq.input_ids, seq.attention_mask)  # [B, L]
    return _at_response(values.float(), seq.positions)


def lm_head_logprobs(model, hidden: Tensor, seq: SeqBatch, response_ids: Tensor,
                     temperature: float, with_entropy: bool = False
                     ) -> tuple[Tensor, Tensor | None]:
    """Final hidden [B, L, H] -> log-probs [B, T] (and entropy [B, T]) of the response tokens.

    The LM head runs on the T response positions only, not on all L: with a 49k vocabulary it
    costs as much as ~8 of SmolLM2's layers per position, and the prompt positions are unused.
    """
    head = _unwrap(model).get_output_embeddings()
    logits = head(_at_response(hidden, seq.positions))  # [B, T, V]
    logp = logprobs_from_logits(logits, response_ids, temperature)
    ent = entropy_from_logits(logits.float() / temperature) if with_entropy else None
    return logp, ent


def value_head(critic, hidden: Tensor, seq: SeqBatch) -> Tensor:
    """Final hidden [B, L, H] -> V(s_t) [B, T] float32, from the state before each token."""
    from apactl.models import _score_head

    return _score_head(critic)(_at_response(hidden, seq.positions)).squeeze(-1).float()


def fit_width(x: Tensor, width: int) -> Tensor:
    """Cut or zero-pad a [B, S, ...] tensor along dim 1 to ``width`` (the extra columns are
    padding positions, masked everywhere)."""
    if x.shape[1] >= width:
        return x[:, :width]
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
    return torch.nn.functional.pad(x, pad)


def chunked(fn, n: int, size: int):
    """Run ``fn(slice)`` over row chunks of ``size`` and concatenate each output along dim 0."""
    outs = [fn(slice(i, i + size)) for i in range(0, n, size)]
    if isinstance(outs[0], tuple):
        return tuple(None if o[0] is None else torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)
