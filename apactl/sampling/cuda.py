"""CUDA decode: the static-cache loop replayed as a CUDA graph (``sampling.static``)."""

from __future__ import annotations

from torch import Tensor

from apactl.sampling.static import decode_static

# Rollouts whose longest prompts differ by a few tokens share one captured graph: the cache
# length (prompt + new tokens) is rounded up to this multiple (the extra slots stay masked).
CACHE_MULTIPLE = 64


def cuda_decode(model, q: Tensor, m: Tensor, spec, eos: list[int], pad_id: int) -> Tensor:
    """[B, P] left-padded prompts -> new tokens [B, T]; the tokens of ``sampling.loop`` for the
    same seed, with one host synchronisation per 16 steps instead of one per token."""
    return decode_static(model, q, m, max_new_tokens=spec.max_new_tokens,
                         temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                         eos=eos, pad_id=pad_id, check_every=16, cache_multiple=CACHE_MULTIPLE)
