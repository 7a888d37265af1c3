"""apactl's own KV-cache sampling loop (the CPU decode and the reference the others match).

It draws exactly what ``model.generate`` draws (the same warpers, one ``multinomial`` over
[B, V] per step, finished rows padded; tests compare the tokens) without generate's per-step
machinery (stopping criteria, kwargs updates, logits processor lists), which costs ~25% of a
SmolLM2 decode step on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor

from apactl.models import unwrap
from apactl.precision import Fp32Head


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
        # Fp32Head keeps its own forward: it must not compute in the autocast dtype.
        mods = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                and not isinstance(m, Fp32Head)
                and "forward" not in m.__dict__ and m.weight.device.type == "cpu"]
    for m in mods:
        m.forward = _weight_major(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def cache_name(model) -> str:
    """The forward's KV-cache keyword: ``cache`` from transformers 5.2x, ``past_key_values``
    before (the old name still works there but warns on every call)."""
    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The cache a forward returned, under either name."""
    cache = out.get("cache") if "cache" in out.keys() else None
    return cache if cache is not None else out["past_key_values"]


def decode_loop(model, q: Tensor, m: Tensor, spec, eos: list[int], pad_id: int) -> Tensor:
    """Sample with a dynamic KV cache: [B, P] left-padded prompts -> new tokens [B, T]."""
    from transformers import DynamicCache

    warpers, key = spec.warpers(), cache_name(model)
    eos_t = torch.tensor(eos, device=q.device)
    mask = m.long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    out = model(input_ids=q, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1, **{key: DynamicCache(config=unwrap(model).config)})
    nxt_pos = pos[:, -1:] + 1
    done = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    tokens = []
    for t in range(spec.max_new_tokens):
        scores = out.logits[:, -1, :].float()
        for w in warpers:
            scores = w(None, scores)
        tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, eos_t)
        if bool(done.all()) or t + 1 == spec.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt_pos,
                    use_cache=True, **{key: returned_cache(out)})
        nxt_pos = nxt_pos + 1
    return torch.stack(tokens, dim=1)
