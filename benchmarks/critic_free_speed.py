"""Critic-free iterations against PPO's at equal episodes (issue 21, section 4); not CI.

The CPU throughput benchmark's settings (benchmarks/recipes/throughput.yaml: SmolLM2-135M-Instruct
policy, an untrained reward model of the same size, 16 episodes x 64 new tokens, top 6 of 30
layers trained, fp32): PPO with its critic on 16 prompts x 1 answer, GRPO and RLOO on 4 prompts
x 4 answers and no critic. Each algorithm runs in its own process (peak RSS per algorithm), one
after the other in one invocation, so the ratios are side by side; seconds per iteration by
phase (the loop's ``time/*``, warm-up iterations left out) ->
benchmarks/results/critic_free_speed.json.

    PYTHONPATH=. nice python benchmarks/critic_free_speed.py --iterations 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PHASES = ("generate", "verify", "score", "reward", "update")
ALGOS = {"ppo": [], "grpo": ["generation.samples_per_prompt=4"],
         "rloo": ["generation.samples_per_prompt=4"]}


def one(algo: str, iterations: int, warmup: int, threads: int, extra: list[str]) -> dict:
    """Run ``algo`` in this process; its per-phase seconds and peak RSS."""
    import benchlib as bl
    from align_throughput import untrained_reward_model

    from apactl.metrics import read_metrics
    from apactl.recipe import load_raw, parse_recipe
    from apactl.workflows.align import run_align

    rm = untrained_reward_model("smollm2-135m-instruct")
    out = HERE / ".cache" / "runs" / f"critic-free-{algo}"
    raw = load_raw(str(HERE / "recipes" / "throughput.yaml"), [
        f"algo.name={algo}", f"train.iterations={iterations + warmup}", f"reward.path={rm}",
        f"run.output_dir={out}", f"run.num_threads={threads}", *ALGOS[algo], *extra])
    if algo != "ppo":
        raw.pop("critic")  # critic-free: a critic section is a recipe error
    run_align(parse_recipe(raw, "align"), overwrite=True)
    rows = read_metrics(out)[warmup:]
    per_phase = {p: bl.mean([r.get(f"time/{p}", 0.0) for r in rows]) for p in PHASES}
    return {"algo": algo, "episodes_per_iteration": 16, "measured_iterations": len(rows),
            "seconds_per_iteration": bl.mean([r["time/iteration"] for r in rows]),
            "seconds_by_phase": per_phase, "peak_rss_mib": bl.ru_maxrss_mib(),
            "response_length_mean": bl.mean([r["response/length_mean"] for r in rows])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=2, help="measured iterations")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every algorithm (e.g. a shorter "
                        "generation.max_new_tokens on a loaded machine)")
    p.add_argument("--order", default="ppo,grpo,rloo",
                   help="the order the algorithms run in (a loaded machine drifts: swap it)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one algorithm
    p.add_argument("--out", default=str(HERE / "results" / "critic_free_speed.json"))
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.iterations, a.warmup, a.threads, a.set)))
        return
    results = {}
    for algo in a.order.split(","):
        res = subprocess.run([sys.executable, __file__, "--one", algo, "--iterations",
                              str(a.iterations), "--warmup", str(a.warmup), "--threads",
                              str(a.threads), *(f"--set={x}" for x in a.set)],
                             capture_output=True, text=True, check=True)
        results[algo] = json.loads(res.stdout.strip().splitlines()[-1])
    ppo = results["ppo"]["seconds_per_iteration"]
    for r in results.values():
        r["speedup_vs_ppo"] = ppo / r["seconds_per_iteration"]
    Path(a.out).write_text(json.dumps({"settings": "benchmarks/recipes/throughput.yaml, 16 "
                                       "episodes x 64 tokens, fp32 CPU", "overrides": a.set,
                                       "order": a.order, "iterations": a.iterations,
                                       "warmup": a.warmup,
                                       "threads": a.threads, "results": results},
                                      indent=2) + "\n")
    print(f"{'algo':6s} {'s/it':>7s} " + " ".join(f"{ph:>9s}" for ph in PHASES)
          + "  peak RSS MiB  x PPO")
    for algo, r in results.items():
        print(f"{algo:6s} {r['seconds_per_iteration']:7.1f} "
              + " ".join(f"{r['seconds_by_phase'][ph]:9.1f}" for ph in PHASES)
              + f"  {r['peak_rss_mib']:12.0f}  {r['speedup_vs_ppo']:5.2f}")


if __name__ == "__main__":
    main()
