"""Does the policy learn at RLHF learning rates in each precision? Two measurements, one JSON.

1. One optimizer step at ``--lr`` (default 1e-6) on a random token batch through apactl's own
   training core: the fraction of trainable weights whose stored value changed, in mixed bf16
   (fp32 masters), pure bf16 and fp32.
2. ``apactl align`` (APA, ``--iterations`` iterations, the same seed) in mixed bf16, fp32 and
   pure bf16: KL to the reference per iteration, and the fraction of policy weights that differ
   from the initial ones at the end.

    python benchmarks/gpu/precision_check.py --policy /tmp/models/policy-135m \
        --reward /tmp/models/reward-135m --episodes 64 --new-tokens 128 --json OUT.json

Runs on a CPU too (tiny sizes) so the script can be rehearsed; the figures mean something on a
GPU, where mixed precision is the default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODES = {  # name -> run overrides
    "mixed_bf16": ["run.dtype=auto", "run.mixed_precision=bf16"],
    "fp32": ["run.dtype=float32", "run.mixed_precision=no"],
    "pure_bf16": ["run.dtype=bfloat16", "run.mixed_precision=no"],
}


def changed_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of elements whose stored value changed (compared in fp32)."""
    total = changed = 0
    for k, a in before.items():
        b = after[k].float()
        changed += int((a.float() != b).sum())
        total += a.numel()
    return changed / max(total, 1)


def one_step(policy: str, lr: float, mode: str, device: str) -> dict:
    """Fraction of trainable weights changed by one AdamW step in ``mode``."""
    from apactl.config import ModelConfig, RunConfig
    from apactl.models import load_policy
    from apactl.precision import resolve_precision
    from apactl.training import Optimization, Schedule, make_trainee

    torch.manual_seed(0)
    run = RunConfig(**dict(o.removeprefix("run.").split("=") for o in MODES[mode]))
    p = resolve_precision(run, device)
    model, _ = load_policy(ModelConfig(name_or_path=policy), device, p.master_dtype)
    before = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
    opt = Optimization({"policy": make_trainee("policy", model, Schedule(lr))},
                       scaler=p.grad_scaler())
    ids = torch.randint(0, model.config.vocab_size, (8, 128), device=device)
    with p.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    opt.backward(loss, 1)
    norm = opt.step()["policy/grad_norm"]
    after = dict(model.named_parameters())
    return {"mode": mode, "precision": p.describe(), "grad_norm": norm,
            "weights_changed_fraction": changed_fraction(before, after),
            "param_dtype": str(next(model.parameters()).dtype)}


def align_run(args, mode: str, out: Path) -> dict:
    """``--iterations`` APA iterations in ``mode``; per-iteration KL and the weights moved."""
    from safetensors.torch import load_file

    from apactl.metrics import read_metrics
    from apactl.recipe import load_recipe
    from apactl.workflows.align import run_align

    overrides = [
        f"policy.name_or_path={args.policy}", f"reward.path={args.reward}",
        "reward.name=reward-model",
        f"run.output_dir={out}", f"train.iterations={args.iterations}",
        f"train.rollout_batch_size={args.episodes}", f"train.minibatch_size={args.minibatch}",
        f"generation.max_new_tokens={args.new_tokens}", f"train.lr={args.lr}",
        "train.freeze_bottom_layers=0", "algo.name=apa", "run.seed=0",
        "logging.progress=false", "logging.tensorboard=false", *MODES[mode],
    ]
    recipe = load_recipe(HERE.parent / "recipes" / "throughput.yaml", overrides, kind="align")
    t0 = time.perf_counter()
    run_align(recipe, overwrite=True)
    rows = read_metrics(out)
    init = load_file(str(Path(args.policy) / "model.safetensors"))
    final = load_file(str(out / "final" / "policy" / "model.safetensors"))
    keys = [k for k in init if k in final]
    return {"mode": mode, "seconds": time.perf_counter() - t0,
            "kl_k1": [r["kl/ref_k1"] for r in rows], "kl_k3": [r["kl/ref_k3"] for r in rows],
            "reward": [r["reward/score_mean"] for r in rows],
            "time_iteration": [r["time/iteration"] for r in rows],
            "weights_changed_fraction": changed_fraction({k: init[k] for k in keys},
                                                         {k: final[k] for k in keys})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--minibatch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--work", default="/tmp/precision-runs")
    ap.add_argument("--json", required=True)
    ap.add_argument("--modes", default="mixed_bf16,fp32,pure_bf16")
    ap.add_argument("--skip-one-step", action="store_true", help="only the align runs")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": device, "lr": args.lr, "one_step": [], "align": [], "errors": []}
    modes = args.modes.split(",")
    for mode in [] if args.skip_one_step else modes:
        try:
            res["one_step"].append(one_step(args.policy, args.lr, mode, device))
        except Exception:  # noqa: BLE001 - report and go on: one failure must not cost the rest
            res["errors"].append(f"one_step {mode}: {traceback.format_exc()[-1500:]}")
        Path(args.json).write_text(json.dumps(res, indent=2))
    for mode in modes:
        try:
            res["align"].append(align_run(args, mode, Path(args.work) / mode))
        except Exception:  # noqa: BLE001
            res["errors"].append(f"align {mode}: {traceback.format_exc()[-1500:]}")
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
