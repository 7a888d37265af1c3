"""A ~30-second probe of each point of the GPU review (../shared/gpu/AUDIT.md), one JSON object,
rewritten after every check so a time limit keeps what was measured.

  nccl_cpu_allreduce  (#1)  all_reduce of a CPU float64 tensor on an NCCL-only process group
  sampler_inv_freq    (#3)  rotary inv_freq dtypes: Precision.decode_copy vs the old .to(bf16)
  logprob_delta       (#4)  policy (fp32 masters) / reference / decode copy under autocast on one
                            batch: max and mean |delta| (0 expected), and the old whole-bf16 ref
  head_fp32_vs_bf16   (#5)  log-probs from the fp32 head vs a bf16 head, logits scaled to a
                            trained model's size (final norm x30)
  pinned_bytes        (#13) Offload of the reference: its bytes vs the pinned host memory used
  capture_memory      (#15) torch.cuda.mem_get_info() before/after capturing the decode graph

    python benchmarks/gpu/probe.py --model /tmp/models/policy-1.7b --out $OUT/probe.json

Runs on a CPU too (the CUDA-only checks say "skipped"), so the script can be rehearsed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import traceback
from pathlib import Path

import torch


def nccl_cpu_allreduce(args, device) -> dict:
    import torch.distributed as dist

    if device.type != "cuda" or not dist.is_nccl_available():
        return {"skipped": "no CUDA/NCCL"}
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        out = {}
        for where in ("cpu", "cuda"):
            try:
                t = torch.zeros(1, dtype=torch.float64, device=where)
                dist.all_reduce(t)
                torch.cuda.synchronize()
                out[where] = "ok"
            except Exception as e:  # the point of the check: does it raise?
                out[where] = f"raised {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return out
    finally:
        dist.destroy_process_group()


def _models(args, device):
    from transformers import AutoModelForCausalLM

    from apactl.config import RunConfig
    from apactl.precision import fp32_heads, resolve_precision

    p = resolve_precision(RunConfig(mixed_precision="bf16"), device)
    policy = fp32_heads(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32))
    ref = p.store_inference(copy.deepcopy(policy)).to(device).eval()
    policy = policy.to(device).eval()
    return p, policy, ref


def _inv_freq(model) -> list[str]:
    return sorted({str(b.dtype) for n, b in model.named_buffers() if "inv_freq" in n})


def _batch(policy, device, rows: int = 8, prompt: int = 32, resp: int = 64):
    from apactl.rl.forward import build_sequences

    g = torch.Generator().manual_seed(0)
    v = policy.config.vocab_size
    q = torch.randint(0, v, (rows, prompt), generator=g).to(device)
    r = torch.randint(0, v, (rows, resp), generator=g).to(device)
    ones = torch.ones_like
    return build_sequences(q, ones(q), r, ones(r), 0), r


def _delta(a, b) -> dict:
    d = (a.float() - b.float()).abs()
    return {"max": float(d.max()), "mean": float(d.mean())}


@torch.no_grad()
def numerics(args, device, res: dict, save) -> None:
    from apactl.precision import Fp32Head
    from apactl.rl.forward import policy_forward
    from apactl.sampling import SamplingSpec

    p, policy, ref = _models(args, device)
    sampler = p.decode_copy(policy)
    old_sampler = copy.deepcopy(policy).to(p.dtype)
    res["sampler_inv_freq"] = {"decode_copy": _inv_freq(sampler),
                               "old_whole_to_bf16": _inv_freq(old_sampler),
                               "policy": _inv_freq(policy)}
    save()
    seq, resp = _batch(policy, device, args.rows, 32, args.resp_len)
    spec = SamplingSpec()
    old_ref = copy.deepcopy(ref).to(p.dtype)  # the old whole-model bf16 reference
    with p.autocast():
        lp = {k: policy_forward(m, seq, resp, spec)[0] for k, m in
              (("policy", policy), ("ref", ref), ("sampler", sampler), ("old_ref", old_ref),
               ("old_sampler", old_sampler))}
    res["logprob_delta"] = {k: _delta(lp["policy"], lp[k]) for k in
                            ("ref", "sampler", "old_ref", "old_sampler")}
    save()
    del old_ref, old_sampler, sampler
    norm = policy.model.norm.weight
    norm.mul_(30.0)  # logits as large as a trained model's
    head = policy.lm_head
    with p.autocast():
        fp32 = policy_forward(policy, seq, resp, spec)[0]
        head.__class__ = torch.nn.Linear  # the autocast (bf16) head
        bf16 = policy_forward(policy, seq, resp, spec)[0]
        head.__class__ = Fp32Head  # back
    norm.div_(30.0)
    res["head_fp32_vs_bf16"] = _delta(fp32, bf16)
    save()
    from apactl.offload import Offload

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.host_memory_stats().get("reserved_bytes.all.current", 0)
        off = Offload(device)
        off.add(ref)
        after = torch.cuda.host_memory_stats().get("reserved_bytes.all.current", 0)
        res["pinned_bytes"] = {"offload_nbytes": off.nbytes,
                               "pinned_reserved_delta": after - before}
    else:
        res["pinned_bytes"] = {"skipped": "no CUDA"}
    return p.decode_copy(policy.cpu()).to(device)  # for capture_memory: no second load


@torch.no_grad()
def capture_memory(args, device, model) -> dict:
    """``model``: the decode copy ``numerics`` made."""
    if device.type != "cuda" or model is None:
        return {"skipped": "no CUDA" if model is not None else "no decode copy"}
    import apactl.sampling.static as ds

    q = torch.randint(0, model.config.vocab_size, (args.batch, 64), device=device)
    out = {"before_gib": [x / 2**30 for x in torch.cuda.mem_get_info()]}
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ds.decode_static(model, q, torch.ones_like(q), max_new_tokens=128, temperature=1.0,
                             top_k=0, top_p=1.0, eos=[-1], pad_id=0, cuda_graphs=True,
                             cache_multiple=64)
        out["graph_used"] = ds.LAST_RUN_GRAPH
        out["fallback"] = ds.GRAPH_FALLBACK_REASON
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    out["after_gib"] = [x / 2**30 for x in torch.cuda.mem_get_info()]
    ds.release_decode_memory()
    out["released_gib"] = [x / 2**30 for x in torch.cuda.mem_get_info()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a causal LM folder (the policy)")
    ap.add_argument("--batch", type=int, default=64, help="rows of the captured decode")
    ap.add_argument("--rows", type=int, default=8, help="rows of the log-prob comparisons")
    ap.add_argument("--resp-len", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"device": str(device), "torch": torch.__version__, "seconds": {}}

    def save() -> None:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))

    box: dict = {}
    for name, fn in (("nccl_cpu_allreduce", lambda: nccl_cpu_allreduce(args, device)),
                     ("numerics", lambda: box.update(copy=numerics(args, device, res, save))),
                     ("capture_memory", lambda: capture_memory(args, device, box.get("copy")))):
        t0 = time.perf_counter()
        try:
            out = fn()
            if isinstance(out, dict):
                res[name] = out
        except Exception as e:  # one failing check must not hide the others
            res[name] = {"error": repr(e), "traceback": traceback.format_exc()[-1500:]}
        res["seconds"][name] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
