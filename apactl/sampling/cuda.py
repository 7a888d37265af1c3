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

# RoPE types whose frequencies are a fixed table (transformers' ``dynamic_rope_update`` only
# recomputes them for "dynamic*" and "longrope", from the sequence length read on the host: a
# graph would freeze one table, and the ``.item()`` breaks the capture).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _rope_types(config) -> set[str]:
    """Every rope_type a config names (``rope_parameters`` may hold one dict per layer type)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return {"default"}
    dicts = [v for v in params.values() if isinstance(v, dict)] or [params]
    return {str(d.get("rope_type", d.get("type", "default"))) for d in dicts}


def static_decode_support(config) -> tuple[bool, str]:
    """(True, "") when the static-cache decode (and its CUDA graph) can run a model with this
    config; else (False, why). A pure function of the config, so the choice is testable without
    a GPU: the static loop writes every layer's K/V at one slot into a full-length cache under a
    4D mask, which sliding-window/chunked layers (rolling slots, host-side counters), attention
    implementations that do not read a 4D mask, and sequence-length-dependent RoPE break."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        return False, f"attention implementation {impl!r} (a 4D mask is for sdpa/eager)"
    types = getattr(config, "layer_types", None)
    odd = sorted({t for t in types or () if t != "full_attention"})
    if odd:
        return False, f"layer types {odd} (only full-attention layers fit a static cache)"
    for name in ("sliding_window", "attention_chunk_size"):
        if types is None and getattr(config, name, None) is not None:
            return False, f"config.{name}={getattr(config, name)} (sliding/chunked layers)"
    rope = sorted(_rope_types(config) - set(STATIC_ROPE))
    if rope:
        return False, f"rope_type {rope} (frequencies recomputed from the sequence length)"
    return True, ""



def cuda_decode(model, q: Tensor, m: Tensor, spec, eos: list[int], pad_id: int) -> Tensor:
    """[B, P] left-padded prompts -> new tokens [B, T] from the distribution of
    ``sampling.loop``, with one host synchronisation per 16 steps instead of one per token.
    Batches are bucketed (``static.capture_shape``): a smaller last chunk or an evaluation
    batch replays the graph of a larger one.

    Models the static path cannot run (``static_decode_support``), and any error it
    raises before its first token, fall back to the plain loop: one warning with the reason.
    """
    ok, why = static_decode_support(unwrap(model).config)
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

