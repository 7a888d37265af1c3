"""The sampling distribution and the one ``sample`` function."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingSpec:
    """The distribution responses are drawn from: softmax(logits / temperature), truncated to
    the ``top_k`` most likely tokens and the ``top_p`` nucleus when those are set.

    ``logprobs`` / ``entropy`` describe the temperature-scaled distribution; it equals the
    sampled one exactly when nothing truncates it (``truncated`` False), which align's recipe
    validation enforces so that old/ref log-probs and the KL are those of the sampled policy.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @classmethod
    def from_config(cls, gen) -> SamplingSpec:
        """From a recipe's ``generation`` section."""
        return cls(gen.temperature, gen.top_k, gen.top_p, gen.max_new_tokens)

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0

    def warpers(self) -> list:
        """transformers' own logits warpers, in ``generate``'s order: temperature, top-k, top-p."""
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = []
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(self.top_p))
        return out

    def logprobs(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """log p(tokens) [B, T] from logits [B, T, V], in float32 (bf16/fp16 log-softmax is too
        coarse for importance ratios)."""
        from apactl.losses import logprobs_from_logits

        return logprobs_from_logits(logits, tokens, self.temperature)

    def entropy(self, logits: Tensor) -> Tensor:
        """Entropy [B, T] of the temperature-scaled distribution over the vocabulary."""
        from apactl.losses import entropy_from_logits

        return entropy_from_logits(logits, self.temperature)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


def response_mask(response_ids: Tensor, eos: list[int]) -> Tensor:
    """float [B, T]: 1 up to and including the first EOS, 0 after it.

    Computed from the first EOS, not from the pad id: when pad == eos (SmolLM2) a pad-based mask
    would also drop the EOS token, which the policy must learn to emit.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos, device=response_ids.device))
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (seen_before == 0).float()


_LAST_GRAPH = False


def used_cuda_graph() -> bool:
    """Whether every decode of the last ``sample`` call replayed a CUDA graph (metric
    ``gen/cuda_graph``); False for the CPU loop, ``generate`` and every fallback."""
    return _LAST_GRAPH


@torch.no_grad()
def sample(model, query_ids: Tensor, query_mask: Tensor, spec: SamplingSpec, eos: list[int],
           pad_id: int, backend: str = "auto", batch_size: int | None = None
           ) -> tuple[Tensor, Tensor]:
    """Sample responses for LEFT-padded prompts [B, P] -> (response_ids [B, T], mask [B, T]).

    T <= max_new_tokens (generation stops early when every row has ended). Positions after the
    first EOS hold ``pad_id``. ``batch_size``: prompts per decode call (None: all).
    """
    import apactl.sampling.static as static
    from apactl.sampling.backends import decoder

    global _LAST_GRAPH
    draw = decoder(backend, query_ids.device)
    step = batch_size or query_ids.shape[0]
    outs, graphs = [], []
    for i in range(0, query_ids.shape[0], step):
        static.LAST_RUN_GRAPH = False  # only the CUDA graph path sets it
        outs.append(draw(model, query_ids[i:i + step], query_mask[i:i + step], spec, eos, pad_id))
        graphs.append(static.LAST_RUN_GRAPH)
    _LAST_GRAPH = all(graphs)
    width = max(o.shape[1] for o in outs)
    resp = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id)
                      for o in outs])
    mask = response_mask(resp, eos)
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, pad_id))
    return resp, mask
