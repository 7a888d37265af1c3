"""Sampling responses with a KV cache, and the exact response mask."""

from __future__ import annotations

import torch
from torch import Tensor

from apactl.config import GenerationConfig


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


@torch.no_grad()
def sample(model, query_ids: Tensor, query_mask: Tensor, gen: GenerationConfig,
           eos: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Sample responses for LEFT-padded prompts [B, P] -> (response_ids [B, T], mask [B, T]).

    T <= max_new_tokens (generation stops early when every row has ended). Positions after the
    first EOS hold ``pad_id``.
    """
    from transformers import GenerationConfig as HFGenerationConfig

    # An explicit config: a checkpoint's own generation_config (repetition penalty, top_k=50...)
    # must not silently change the sampling distribution that old_logprobs describe.
    cfg = HFGenerationConfig(
        do_sample=True, temperature=gen.temperature, top_k=gen.top_k or None,
        top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, min_new_tokens=0,
        eos_token_id=eos, pad_token_id=pad_id, use_cache=True,
    )
    step = gen.batch_size or query_ids.shape[0]
    outs = []
    for i in range(0, query_ids.shape[0], step):
        q, m = query_ids[i:i + step], query_mask[i:i + step]
        seq = model.generate(input_ids=q, attention_mask=m, generation_config=cfg)
        outs.append(seq[:, q.shape[1]:])
    width = max(o.shape[1] for o in outs)
    resp = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id)
                      for o in outs])
    mask = response_mask(resp, eos)
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, pad_id))
    return resp, mask
