"""apactl PPO and APA side by side with TRL PPO (TRL 0.24.x) and TRL RLOO (current TRL), on the
same policy, reward model, prompts, batch sizes, response length, epochs and thread count.

    bash benchmarks/setup_trl.sh                              # once: the two TRL venvs
    python benchmarks/compare_trl.py --threads 2              # SmolLM2-135M, 3 + 1 iterations each
    OMP_NUM_THREADS=1 python benchmarks/compare_trl.py --smoke   # tiny random model, seconds

Every configuration runs in its own process (so each peak RSS is its own): apactl through
benchmarks/align_throughput.py in this venv, TRL through trl_ppo_driver.py in
benchmarks/.venv-trl and trl_rloo_driver.py in benchmarks/.venv-trl-new. The prompts are the
ones apactl samples, in its order (written to benchmarks/.cache/compare/prompts.jsonl). Reported:
wall seconds per iteration (step end to step end, warm-up iterations left out), episodes/s,
generation seconds per iteration, realised response length, peak RSS, and the mean raw reward of
the last iteration and over all iterations, i.e. after the same number of episodes. Where a TRL
configuration cannot match apactl's exactly, the difference is printed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import align_throughput as at
import benchlib as bl

OUT = at.CACHE / "compare"
CONFIGS = ("apactl-ppo", "apactl-apa", "trl-ppo", "trl-rloo")
VENVS = {"trl-ppo": bl.HERE / ".venv-trl", "trl-rloo": bl.HERE / ".venv-trl-new"}
DRIVERS = {"trl-ppo": bl.HERE / "trl_ppo_driver.py", "trl-rloo": bl.HERE / "trl_rloo_driver.py"}


def write_prompts(recipe, n_iterations: int, path: Path) -> Path:
    """The prompts apactl's align loop consumes, iteration by iteration, as jsonl."""
    from apactl.models import load_tokenizer, resolve_model_ref
    from apactl.rl.loop import PromptSampler
    from apactl.workflows.align import tokenized_prompts

    pol = recipe.policy
    tok = load_tokenizer(resolve_model_ref(pol.tokenizer or pol.name_or_path, pol.cache_dir), pol)
    prompts, _ = tokenized_prompts(recipe, tok)
    sampler = PromptSampler(len(prompts), recipe.train.rollout_batch_size, recipe.run.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for it in range(n_iterations):
            for i in sampler.indices(it):
                p = prompts[i]
                f.write(json.dumps({"iteration": it, "row": p.get("row"),
                                    "messages": p["messages"], "input_ids": p["input_ids"]})
                        + "\n")
    return path


def trl_common_args(recipe, policy_dir: str, rm: str, prompts: Path, args) -> list[str]:
    tr, gen = recipe.train, recipe.generation
    return ["--policy", policy_dir, "--reward", rm, "--prompts", str(prompts),
            "--batch", str(tr.rollout_batch_size), "--minibatch", str(tr.minibatch_size),
            "--length", str(gen.max_new_tokens), "--epochs", str(tr.epochs_per_rollout),
            "--lr", repr(tr.lr), "--iterations", str(args.warmup + args.iterations),
            "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--seed", str(recipe.run.seed), "--temperature", repr(gen.temperature),
            "--freeze-bottom-layers", str(tr.freeze_bottom_layers),
            "--max-grad-norm", repr(tr.max_grad_norm or 1e9)]


def commands(ppo, apa, policy_dir: str, rm: str, prompts: Path, args) -> dict[str, list[str]]:
    limits = (["--matmul-n", "512", "--copy-mib", "32", "--reps", "3"] if args.smoke else [])
    cmds: dict[str, list[str]] = {}
    for name, recipe in (("apactl-ppo", ppo), ("apactl-apa", apa)):
        cmds[name] = [sys.executable, str(bl.HERE / "align_throughput.py"),
                      "--recipe", str(Path(args.recipe).resolve()),
                      "--algo", recipe.algo.name, "--iterations", str(args.iterations),
                      "--warmup", str(args.warmup), "--threads", str(args.threads),
                      "--reward", rm, "--tag", f"compare-{recipe.algo.name}",
                      "--json", str(OUT / f"{name}.json"), *limits]
        for s in args.all_sets:
            cmds[name] += ["--set", s]
    common = trl_common_args(ppo, policy_dir, rm, prompts, args)
    critic_clip = ppo.critic.clip if ppo.critic.clip is not None else 1e6
    cmds["trl-ppo"] = [str(VENVS["trl-ppo"] / "bin" / "python"), str(DRIVERS["trl-ppo"]),
                       *common, "--kl-coef", repr(ppo.kl.beta),
                       "--vf-coef", repr(ppo.algo.vf_coef),
                       "--cliprange", repr(ppo.algo.clip_eps),
                       "--cliprange-value", repr(critic_clip),
                       "--gamma", repr(ppo.gae.gamma), "--lam", repr(ppo.gae.lam),
                       "--forward-batch", str(ppo.train.rollout_batch_size),
                       "--out-dir", str(OUT / "trl-ppo-out")]
    cmds["trl-rloo"] = [str(VENVS["trl-rloo"] / "bin" / "python"), str(DRIVERS["trl-rloo"]),
                        *common, "--generations", str(args.generations),
                        "--beta", repr(ppo.kl.beta), "--epsilon", repr(ppo.algo.clip_eps),
                        "--out-dir", str(OUT / "trl-rloo-out")]
    return cmds


def differences(ppo, args) -> dict[str, list[str]]:
    """What the TRL configurations cannot match (the drivers add what they detect at run time)."""
    tr, gen = ppo.train, ppo.generation
    both: list[str] = []
    if ppo.policy.lora is not None:
        both.append("apactl trains a LoRA policy; the TRL drivers train the full (unfrozen) "
                    "weights")
    if gen.top_k or gen.top_p < 1:
        both.append(f"apactl samples with top_k={gen.top_k} top_p={gen.top_p}; the TRL "
                    "drivers sample from the full distribution")
    if tr.grad_accum > 1:
        both.append(f"apactl accumulates {tr.grad_accum} micro-batches per optimizer step; "
                    f"TRL runs each minibatch of {tr.minibatch_size} in one pass")
    if tr.schedule != "constant" or tr.warmup_steps:
        both.append(f"apactl lr schedule {tr.schedule} (warm-up {tr.warmup_steps}); TRL constant")
    if ppo.reward.normalize or ppo.reward.clip:
        both.append(f"apactl reward normalize={ppo.reward.normalize} clip={ppo.reward.clip}; "
                    "TRL uses raw scores")
    fb = tr.forward_batch_size or max(tr.minibatch_size // tr.grad_accum, 1)
    gb = gen.batch_size or tr.rollout_batch_size
    ppo_only = [f"apactl generates in chunks of {gb} and scores in chunks of {fb}; TRL PPO does "
                f"both in chunks of {tr.rollout_batch_size}"]
    if ppo.kl.adaptive:
        ppo_only.append(f"apactl PPO adapts beta (start {ppo.kl.beta}, target {ppo.kl.target}, "
                        f"horizon {ppo.kl.horizon}); TRL PPO keeps kl_coef={ppo.kl.beta} fixed")
    if ppo.critic.lr and ppo.critic.lr != tr.lr:
        ppo_only.append(f"apactl critic lr {ppo.critic.lr}; TRL one lr {tr.lr} for both")
    if ppo.critic.clip is None:
        ppo_only.append("apactl clips no value predictions; TRL PPO always clips them, so the "
                        "driver sets cliprange_value=1e6 (no clipping in effect)")
    if ppo.critic.warmup_iterations:
        ppo_only.append(f"apactl trains only the critic for {ppo.critic.warmup_iterations} "
                        "iterations; TRL trains both from the start")
    rloo = ["RLOO is a different algorithm: a peer for speed and reward, not a replica of "
            "apactl PPO/APA"]
    return {"all": both, "trl-ppo": ppo_only, "trl-rloo": rloo}


def row_from(name: str, res: dict[str, Any]) -> dict[str, Any]:
    if name.startswith("apactl"):
        s = res["summary"]
        wall = s["wall_seconds_per_iteration"] or s["seconds_per_iteration"]
        return {"seconds_per_iteration": wall,
                "phase_seconds_per_iteration": s["seconds_per_iteration"],
                "episodes_per_s": s["episodes_per_iteration"] / wall,
                "generate_seconds_per_iteration": s["phase_seconds"]["generate"],
                "response_length_mean": s["response_length_mean"],
                "peak_rss_mib": s["peak_rss_mib"],
                "peak_rss_measured_mib": s["peak_rss_measured_mib"],
                "reward_last": s["reward_last"], "reward_mean_all": s["reward_mean_all"],
                "reward_mean_by_iteration": s["reward_mean_by_iteration"]}
    keys = ("seconds_per_iteration", "episodes_per_s", "generate_seconds_per_iteration",
            "response_length_mean", "peak_rss_mib", "peak_rss_measured_mib", "reward_last",
            "reward_mean_all", "reward_mean_by_iteration")
    return {k: res.get(k) for k in keys}


def print_report(rows: dict[str, dict[str, Any]], errors: dict[str, str], diffs, notes,
                 title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 140)
    t = Table(title=title, title_justify="left")
    cols = ("configuration", "s / iteration", "episodes/s", "generate s / it", "response len",
            "peak RSS MiB", "reward (last it.)", "reward (all its.)")
    for c in cols:
        t.add_column(c, justify="left" if c == "configuration" else "right")
    for name, r in rows.items():
        t.add_row(name, bl.fmt(r["seconds_per_iteration"]), bl.fmt(r["episodes_per_s"]),
                  bl.fmt(r["generate_seconds_per_iteration"]), bl.fmt(r["response_length_mean"]),
                  bl.fmt(r["peak_rss_mib"]), bl.fmt(r["reward_last"]),
                  bl.fmt(r["reward_mean_all"]))
    for name, err in errors.items():
        t.add_row(name, "[red]failed[/]", "", "", "", "", "", err.splitlines()[0][:60])
    con.print(t)
    con.print("s / iteration: wall clock, step end to step end; reward: mean raw reward-model "
              "score by apactl's rule (TRL PPO's own reading in the JSON as reward_trl)",
              highlight=False)
    for name in ("all", "trl-ppo", "trl-rloo"):
        items = diffs.get(name, []) + notes.get(name, [])
        if items and (name == "all" or name in rows or name in errors):
            con.print(f"[bold]differences ({'every TRL run' if name == 'all' else name}):[/]")
            for d in items:
                con.print(f"  - {d}", highlight=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(at.DEFAULT_RECIPE))
    p.add_argument("--reward", help="reward-model folder (default: untrained, from the policy)")
    p.add_argument("--iterations", type=int, default=3, help="measured iterations (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up iterations (default 1)")
    p.add_argument("--threads", type=int, help="default: the cores available (1 with --smoke)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every configuration, e.g. "
                        "--set train.rollout_batch_size=8 (TRL gets the resolved numbers)")
    p.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--generations", type=int, default=2, help="RLOO samples per prompt")
    p.add_argument("--json", dest="json_out", help="default benchmarks/results/compare_trl.json "
                   "(benchmarks/.cache/smoke/compare_trl.json with --smoke)")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the prompts and print the commands; run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 thread")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.threads = args.threads or (1 if args.smoke else bl.available_threads())
    args.all_sets = (at.SMOKE_SETS if args.smoke else []) + args.sets
    total = args.warmup + args.iterations
    ppo, rm = at.resolve_recipe(args.recipe, args.all_sets, "ppo", total, args.threads,
                                args.reward, "compare-ppo")
    apa, _ = at.resolve_recipe(args.recipe, args.all_sets, "apa", total, args.threads, rm,
                               "compare-apa")
    if rm is None:
        sys.exit("compare_trl needs a reward-model judge (reward.name=reward-model)")
    from apactl.models import resolve_model_ref

    policy_dir = resolve_model_ref(ppo.policy.name_or_path, ppo.policy.cache_dir)
    prompts = write_prompts(ppo, total, OUT / "prompts.jsonl")
    cmds = commands(ppo, apa, policy_dir, rm, prompts, args)
    if args.prepare_only:
        print(f"prompts: {prompts}")
        for name in args.only:
            print(f"# {name}\nOMP_NUM_THREADS={args.threads} {shlex.join(cmds[name])}")
        return 0
    rows: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    for name in args.only:
        if name in VENVS and not (VENVS[name] / "bin" / "python").exists():
            errors[name] = f"no {VENVS[name]}: run bash benchmarks/setup_trl.sh"
            continue
        print(f"running {name} ...", file=sys.stderr)
        try:
            if name.startswith("apactl"):
                res = bl.run_json(cmds[name], args.threads, log=OUT / f"{name}.log",
                                  json_path=OUT / f"{name}.json")
            else:
                res = bl.run_json(cmds[name], args.threads, log=OUT / f"{name}.log")
                notes[name] = res.get("notes", [])
        except (RuntimeError, ValueError) as exc:
            errors[name] = str(exc).splitlines()[-1] if str(exc) else repr(exc)
            print(f"{name} failed (log: {OUT / (name + '.log')}):\n{exc}", file=sys.stderr)
            continue
        results[name] = res
        rows[name] = row_from(name, res)
    diffs = differences(ppo, args)
    tr = ppo.train
    title = (f"{ppo.policy.name_or_path}, reward {Path(rm).name}: {tr.rollout_batch_size} "
             f"episodes/iteration, minibatch {tr.minibatch_size}, "
             f"{ppo.generation.max_new_tokens} new tokens, {tr.epochs_per_rollout} epoch(s), "
             f"{args.threads} threads; {args.iterations} iterations after {args.warmup} warm-up")
    print_report(rows, errors, diffs, notes, title)
    out = args.json_out or (at.CACHE / "smoke" / "compare_trl.json" if args.smoke
                            else bl.HERE / "results" / "compare_trl.json")
    bl.write_json(out, {"title": title, "rows": rows, "errors": errors, "differences": diffs,
                        "notes": notes, "commands": {k: cmds[k] for k in args.only},
                        "results": results})
    print(f"wrote {out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
