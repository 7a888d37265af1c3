"""Per-step decode time of three rollout loops on one model, as one JSON object on stdout.

  (a) reference: ``apactl.sampling.loop.decode_loop`` (eager, DynamicCache, a 2D mask per step)
  (b) static:    ``decode_static(cuda_graphs=False)`` (StaticCache, fixed shapes, eager)
  (c) graph:     ``decode_static(cuda_graphs=True)`` (the same step replayed as a CUDA graph)

Per-step time = (t(N new tokens) - t(1)) / (N - 1), prefill cancelled out; EOS is disabled (id
-1). Best of ``--reps`` runs: CUDA events on a GPU, ``perf_counter`` on a CPU (no (c) there).
``--storage align`` (default): the model is stored and run as align's decode copy (fp32 load,
16-bit matmul weights, fp32 embeddings/norms/head, under autocast); ``whole``: every weight in
``--dtype``. Bytes a step reads = the decode model's parameter bytes + the KV cache it attends
(all P + N slots of the static cache; P + t on average for the reference loop); lower bound of a
step = those bytes / copy bandwidth (read+write bytes/s of ``dst.copy_(src)``).
``--model random:smollm2-135m`` (or -360m): a random Llama of that shape (no checkpoint needed).

  python benchmarks/gpu/decode_bench.py --model FOLDER --batch 64 --prompt-len 64 \
      --new-tokens 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

import apactl.sampling.static as ds
from apactl.sampling import SamplingSpec
from apactl.sampling.loop import decode_loop

SHAPES = {  # hidden, intermediate, layers, heads, kv heads of the SmolLM2 checkpoints
    "smollm2-135m": (576, 1536, 30, 9, 3), "smollm2-360m": (960, 2560, 32, 15, 5)}


def load(name: str, dtype: torch.dtype, device: torch.device, storage: str = "align"):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from apactl.precision import fp32_heads, store_matmuls

    if not name.startswith("random:"):
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32 if storage == "align" else dtype)
    else:
        h, i, n, a, kv = SHAPES[name.removeprefix("random:")]
        cfg = LlamaConfig(vocab_size=49152, hidden_size=h, intermediate_size=i,
                          num_hidden_layers=n, num_attention_heads=a, num_key_value_heads=kv,
                          tie_word_embeddings=True, max_position_embeddings=8192,
                          pad_token_id=2, eos_token_id=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    if storage == "align":  # what workflows.align decodes with (Precision.decode_copy)
        store_matmuls(fp32_heads(model), dtype)
    else:
        model = model.to(dtype)
    return model.to(device).eval()


def timed(fn, device: torch.device, reps: int) -> float:
    """Best wall time of ``fn()`` in ms over ``reps`` runs."""
    best = math.inf
    for _ in range(reps):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def copy_bandwidth(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """Read+write bytes per second of a large on-device copy."""
    mib = 1024 if device.type == "cuda" else 256
    src = torch.ones(mib * 2**20 * 8 // torch.finfo(dtype).bits, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = timed(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def prompts(vocab: int, batch: int, length: int, pad: int, device: torch.device):
    """Random ids [B, P], LEFT-padded to ragged lengths in [P/2, P]."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.randint(max(1, length // 2), length + 1, (batch,), generator=g)
    m = (torch.arange(length)[None, :] >= length - lengths[:, None]).long()
    return q.masked_fill(m == 0, pad).to(device), m.to(device)


def loops(model, q, m, pad: int, autocast) -> dict:
    """name -> fn(n_new) -> new tokens [B, T]; EOS id -1 is never drawn: rows run every step."""
    def reference(n):
        with autocast():
            return decode_loop(model, q, m, SamplingSpec(max_new_tokens=n), [-1], pad)

    def static(graphs):
        def run(n):
            with autocast():
                return ds.decode_static(model, q, m, max_new_tokens=n, temperature=1.0,
                                        top_k=0, top_p=1.0, eos=[-1], pad_id=pad,
                                        cuda_graphs=graphs)
        return run
    return {"reference": reference, "static": static(False), "graph": static(True)}


def step_bytes(name: str, weight_bytes: int, kv_per_token: int, batch: int, p: int,
               n: int) -> int:
    """Bytes one decode step reads: the weights, plus the KV cache attended (every P + N slot
    of the static cache; P + t, on average P + N/2, for the reference loop's growing cache)."""
    attended = p + n if name != "reference" else p + n / 2
    return int(weight_bytes + batch * attended * kv_per_token)


def stage(name: str, run, n: int, device, reps: int, batch: int, nbytes: int,
          bw: float | None) -> dict:
    """Time one loop; the tokens of a seeded run are kept to compare loops."""
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous loop's cache blocks: a graph pool needs memory
    first = timed(lambda: run(n), device, 1)  # includes any graph capture
    box = {}

    def seeded():
        torch.manual_seed(0)
        box["tokens"] = run(n)

    t_n, t_1 = timed(seeded, device, reps), timed(lambda: run(1), device, reps)
    step = (t_n - t_1) / max(n - 1, 1)
    row = {"step_ms": step, "tokens_per_s": batch / (step / 1e3), "prefill_ms": t_1,
           "first_call_ms": first, "total_ms": t_n, "_tokens": box["tokens"],
           "read_bytes_per_step": nbytes, "read_GBps": nbytes / (step / 1e3) / 1e9}
    if bw:
        row["lower_bound_step_ms"] = nbytes / bw * 1e3
        row["fraction_of_bound"] = row["lower_bound_step_ms"] / step
    if name == "graph":
        row.update(fallback=ds.GRAPH_FALLBACK_REASON, captures=ds.CAPTURE_COUNT)
    return row


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    for flag, default in (("--batch", 64), ("--prompt-len", 64), ("--new-tokens", 128),
                          ("--reps", 3)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--storage", choices=("align", "whole"), default="align")
    ap.add_argument("--out", help="write the JSON here too, after every loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = load(args.model, dtype, device, args.storage)
    half = args.storage == "align" and dtype != torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=half)
    pad = model.config.pad_token_id or 0
    q, m = prompts(model.config.vocab_size, args.batch, args.prompt_len, pad, device)
    result = {"config": vars(args), "torch": torch.__version__,
              "transformers": transformers.__version__, "device": torch.cuda.get_device_name(
                  device) if device.type == "cuda" else "cpu"}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
    import benchlib as bl

    weights = result["weights"] = {"param_bytes": sum(p.numel() * p.element_size()
                                                      for p in model.parameters()),
                                   "kv_bytes_per_token": bl.kv_bytes_per_token(model.config)}
    bw = None
    try:
        bw = copy_bandwidth(device, dtype)
        weights.update(copy_GBps=bw / 1e9, weights_only_step_ms=weights["param_bytes"] / bw * 1e3)
    except Exception as e:
        weights["error"] = repr(e)
    # The CUDA graph first: its private memory pool is allocated before the other loops'
    # caches fragment the allocator.
    for name, run in sorted(loops(model, q, m, pad, autocast).items(),
                            key=lambda kv: kv[0] != "graph"):
        if name == "graph" and device.type != "cuda":
            result[name] = {"skipped": "no CUDA device"}
            continue
        nbytes = step_bytes(name, weights["param_bytes"], weights["kv_bytes_per_token"],
                            args.batch, args.prompt_len, args.new_tokens)
        try:
            result[name] = stage(name, run, args.new_tokens, device, args.reps, args.batch,
                                 nbytes, bw)
        except Exception as e:  # one failing loop must not hide the others' numbers
            result[name] = {"error": repr(e), "traceback": traceback.format_exc()[-2000:]}
        if args.out:  # what is measured so far survives a time limit
            Path(args.out).write_text(json.dumps(_public(result), indent=2, default=str))
    base = result.get("static", {}).get("_tokens")
    for name in ("reference", "static", "graph"):  # rows identical to (b) for the same seed
        toks = result.get(name, {}).get("_tokens")
        if toks is not None and base is not None and toks.shape == base.shape:
            result[name]["rows_equal_static"] = float((toks == base).all(1).float().mean())
    text = json.dumps(_public(result), indent=2, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def _public(result: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "_tokens"} if isinstance(v, dict) else v)
            for k, v in result.items()}


if __name__ == "__main__":
    main()
