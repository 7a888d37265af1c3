"""CUDA decode: the static-cache loop replayed as a CUDA graph (``sampling.static``), or the
plain loop (``sampling.loop``) for what the static path cannot run -- never an error."""

from __future__ import annotations

from torch import Tensor

import apactl.sampling.static as static
from apactl.models import unwrap
from apactl.sampling.loop import decode_loop

# Rollouts whose longest prompts differ by a few tokens share one captured graph: the cache
# length (prompt + new tokens) is rounded up to this multiple (the extra slots stay masked).
CACHE_MULTIPLE = 64


def cuda_decode(model, q: Tensor, m: Tensor, spec, eos: list[int], pad_id: int) -> Tensor:
    """[B, P] left-padded prompts -> new tokens [B, T] from the distribution of
    ``sampling.loop``, with one host synchronisation per 16 steps instead of one per token.
    Batches are bucketed (``static.capture_shape``): a smaller last chunk or an evaluation
    batch replays the graph of a larger one.

    Models the static path cannot run (``static.static_decode_support``), and any error it
    raises before its first token, fall back to the plain loop: one warning with the reason.
    """
    ok, why = static.static_decode_support(unwrap(model).config)
    if ok:
        rng = static.rng_state(q.device)
        try:
            return static.decode_static(
                model, q, m, max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                top_k=spec.top_k, top_p=spec.top_p, eos=eos, pad_id=pad_id, check_every=16,
                cache_multiple=CACHE_MULTIPLE, bucket_rows=True)
        except Exception as e:  # noqa: BLE001 - whatever broke, the plain loop can still decode
            static.set_rng_state(q.device, rng)  # the plain loop draws what it would have
            why = f"static decode failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    static.fall_back(why)
    static.LAST_RUN_GRAPH = False
    return decode_loop(model, q, m, spec, eos, pad_id)

