"""Sampling responses with a KV cache, and the exact response mask."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def _weight_major(module: torch.nn.Linear):
    def forward(x: Tensor) -> Tensor:
        y = torch.matmul(module.weight, x.reshape(-1, x.shape[-1]).t()).t()
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], module.weight.shape[0])
    return forward


@contextlib.contextmanager
def weight_major_linears(model, enabled: bool = True) -> Iterator[None]:
    """Inside: every ``nn.Linear`` of ``model`` on CPU computes ``(W @ x^T)^T``, not ``x @ W^T``.

    The same numbers up to summation order (~1e-5 on SmolLM2 logits). Why: at decode batch
    sizes (8-64 rows) CPU BLAS runs the weight-major product 1.3-2.5x faster than ``F.linear``'s
    transposed-weight GEMM (SmolLM2 decode step at batch 16: 268 -> 180 ms on 2 cores; see
    benchmarks/README.md). Modules whose ``forward`` is already patched (accelerate hooks) and
    non-CPU devices are left alone.
    """
    mods = []
    if enabled:
        mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                and "forward" not in m.__dict__ and m.weight.device.type == "cpu"]
    for m in mods:
        m.forward = _weight_major(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


@torch.no_grad()
def sample(model, query_ids: Tensor, query_mask: Tensor, gen: GenerationConfig,
           eos: list[int], pad_id: int) -> tuple[Tensor, Tensor]:
    """Sample responses for LEFT-padded prompts [B, P] -> (response_ids [B, T], mask [B, T]).

    T <= max_new_tokens (generation stops early when every row has ended). Positions after the
    first EOS hold ``pad_id``.
    """
    step = gen.batch_size or query_ids.shape[0]
    draw = _hf_generate if gen.loop == "transformers" else _decode
    outs = []
    for i in range(0, query_ids.shape[0], step):
        q, m = query_ids[i:i + step], query_mask[i:i + step]
        with weight_major_linears(model, gen.weight_major_matmul):
            outs.append(draw(model, q, m, gen, eos, pad_id))
    width = max(o.shape[1] for o in outs)
    resp = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_id)
                      for o in outs])
    mask = response_mask(resp, eos)
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, pad_id))
    return resp, mask


def _hf_generate(model, q: Tensor, m: Tensor, gen: GenerationConfig, eos: list[int],
                 pad_id: int) -> Tensor:
    """transformers' ``generate``: [B, P] -> new tokens [B, T]."""
    from transformers import GenerationConfig as HFGenerationConfig

    # An explicit config: a checkpoint's own generation_config (repetition penalty, top_k=50...)
    # must not silently change the sampling distribution that old_logprobs describe.
    # top_k=0, not None: generate() treats None as "unset" and applies its default top_k=50.
    cfg = HFGenerationConfig(
        do_sample=True, temperature=gen.temperature, top_k=gen.top_k,
        top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, min_new_tokens=0,
        eos_token_id=eos, pad_token_id=pad_id, use_cache=True,
    )
    return model.generate(input_ids=q, attention_mask=m, generation_config=cfg)[:, q.shape[1]:]


def _warpers(gen: GenerationConfig) -> list:
    """transformers' own logits warpers, in ``generate``'s order: temperature, top-k, top-p."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = []
    if gen.temperature != 1.0:
        out.append(TemperatureLogitsWarper(gen.temperature))
    if gen.top_k:
        out.append(TopKLogitsWarper(gen.top_k))
    if gen.top_p < 1.0:
        out.append(TopPLogitsWarper(gen.top_p))
    return out


def _decode(model, q: Tensor, m: Tensor, gen: GenerationConfig, eos: list[int],
            pad_id: int) -> Tensor:
    """A plain KV-cache sampling loop: [B, P] left-padded prompts -> new tokens [B, T].

    Draws exactly what ``generate`` draws (the same warpers, one ``multinomial`` over [B, V]
    per step, finished rows padded; tests compare the tokens) without its per-step machinery
    (stopping criteria, kwargs updates, logits processors list), which costs ~25% of a
    SmolLM2 decode step on CPU.
    """
    from transformers import DynamicCache

    warpers = _warpers(gen)
    eos_t = torch.tensor(eos, device=q.device)
    mask = m.long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    out = model(input_ids=q, attention_mask=mask, position_ids=pos, use_cache=True,
                past_key_values=DynamicCache(config=_unwrap_config(model)), logits_to_keep=1)
    nxt_pos = pos[:, -1:] + 1
    done = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    tokens = []
    for t in range(gen.max_new_tokens):
        scores = out.logits[:, -1, :].float()
        for w in warpers:
            scores = w(None, scores)
        tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, eos_t)
        if bool(done.all()) or t + 1 == gen.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt_pos,
                    past_key_values=out.past_key_values, use_cache=True)
        nxt_pos = nxt_pos + 1
    return torch.stack(tokens, dim=1)


def _unwrap_config(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config
