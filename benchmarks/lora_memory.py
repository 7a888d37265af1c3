"""Peak memory of LoRA align against the policy alone in training (issue #5 target: <= 1.6x).

    python benchmarks/lora_memory.py --threads 2 --json benchmarks/results/lora_memory.json
    OMP_NUM_THREADS=1 python benchmarks/lora_memory.py --smoke

Two processes, each measured by its own peak RSS (``ru_maxrss`` from ``os.wait4``, model
loading included):

* policy alone: ``apactl sft`` of the policy with the same LoRA adapter, the same micro-batch
  (8 sequences) and sequence length as the update of the align run, a few optimizer steps;
* LoRA align: ``apactl align`` (benchmarks/recipes/throughput.yaml, PPO) with that LoRA policy,
  the reference = the policy with its adapter disabled, the critic (top layers trained, from the
  reward model) and the reward model, a few iterations.

The reward model is the benchmark's untrained one (align_throughput.untrained_reward_model)
unless ``--reward``; memory does not depend on its training.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import align_throughput as at
import benchlib as bl

LORA = ["policy.lora.r=16", "policy.lora.alpha=32"]


def run_measured(cmd: list[str], threads: int, log: Path) -> dict:
    """Run ``cmd``; its own peak RSS (MiB) and wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, **bl.thread_env(threads)})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({log}): {' '.join(cmd)}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t0,
            "command": " ".join(cmd)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="smollm2-135m-instruct")
    p.add_argument("--reward", help="reward-model folder (default: untrained, from the policy)")
    p.add_argument("--threads", type=int, default=bl.available_threads())
    p.add_argument("--iterations", type=int, default=2, help="align iterations")
    p.add_argument("--steps", type=int, default=4, help="sft optimizer steps")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 thread")
    a = p.parse_args(argv)
    cache = at.CACHE / ("smoke" if a.smoke else "") / "lora-memory"
    policy = "tiny-random" if a.smoke else a.policy
    threads = 1 if a.smoke else a.threads
    reward = a.reward or str(at.untrained_reward_model(policy))
    py = [sys.executable, "-m", "apactl"]
    common = [f"run.num_threads={threads}", "logging.progress=false",
              "logging.tensorboard=false"]
    sft = run_measured(py + [
        "sft", str(bl.HERE.parent / "recipes/sft/smollm2-135m.yaml"),
        f"model.name_or_path={policy}", "model.lora.r=16", "model.lora.alpha=32",
        f"run.output_dir={cache / 'sft'}", "train.batch_size=8", "train.grad_accum=1",
        f"train.max_steps={a.steps}", "train.eval_every=0", "data.eval_rows=0",
        "train.freeze_bottom_layers=0", "data.max_len=128", *common, "--overwrite"], threads,
        cache / "sft.log")
    align = run_measured(py + [
        "align", str(at.DEFAULT_RECIPE), "--algo", "ppo", f"policy.name_or_path={policy}",
        f"reward.path={reward}", *LORA, f"run.output_dir={cache / 'align'}",
        f"train.iterations={a.iterations}", "train.freeze_bottom_layers=0",
        "critic.freeze_bottom_layers=" + ("1" if a.smoke else "24"), *common, "--overwrite"],
        threads,
        cache / "align.log")
    ratio = align["peak_rss_mib"] / sft["peak_rss_mib"]
    res = {"policy": policy, "reward": reward, "threads": threads, "policy_alone_sft": sft,
           "lora_align": align, "ratio": ratio, "target": 1.6}
    print(f"policy alone (LoRA sft): {sft['peak_rss_mib']:.0f} MiB peak RSS\n"
          f"LoRA align (policy + disabled-adapter reference + critic + reward model): "
          f"{align['peak_rss_mib']:.0f} MiB\nratio {ratio:.2f}x (target <= 1.6x)")
    out = a.json_out or (at.CACHE / "smoke" / "lora_memory.json" if a.smoke else None)
    if out:
        print(f"wrote {bl.write_json(out, res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
