"""Throughput of `apactl align`: time per phase, episodes/s, tokens/s, peak memory, and how far
each phase is from this machine's limits (matmul peak, copy bandwidth) measured in the same run.

    python benchmarks/align_throughput.py --algo ppo --threads 2 --json benchmarks/results/ppo.json
    OMP_NUM_THREADS=1 python benchmarks/align_throughput.py --smoke     # tiny random model, seconds

It runs ``apactl.workflows.align.run_align`` in this process on ``--recipe`` (default
benchmarks/recipes/throughput.yaml) for ``--warmup`` + ``--iterations`` iterations, reads the
per-iteration metrics from ``<output_dir>/metrics.jsonl`` and reports the measured iterations
only. Token counts come from the rollouts themselves, observed through the loop's public hooks
(``apactl.hooks.Hooks``): the models, the real prompt, response and reward-model tokens of every
iteration, and the FLOPs each phase executes. FLOP and bandwidth conventions:
benchmarks/README.md and benchlib.py.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl

DEFAULT_RECIPE = bl.HERE / "recipes" / "throughput.yaml"
CACHE = bl.HERE / ".cache"
SMOKE_SETS = ["policy.name_or_path=tiny-random", "train.freeze_bottom_layers=1"]
SMOKE_LIMITS = {"matmul_n": 512, "copy_mib": 32, "reps": 3}
PHASES = ("generate", "score", "reward", "update")


# -------------------------------------------------------------------------- reward model
def untrained_reward_model(policy_ref: str, cache_dir: str | None = None,
                           root: Path = CACHE) -> Path:
    """A reward-model folder with the policy's backbone and a fresh (seeded) scalar head, made
    once under ``root`` with apactl's own loader and saver."""
    import torch

    from apactl.models import load_sequence_classifier, resolve_model_ref, save_model

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", policy_ref).strip("-.") or "policy"
    folder = root / f"rm-untrained-{slug}"
    if (folder / "config.json").is_file():
        return folder
    src = resolve_model_ref(policy_ref, cache_dir)
    torch.manual_seed(0)
    model, tok = load_sequence_classifier(src, "cpu", torch.float32, trainable=False)
    save_model(model, tok, folder)
    print(f"created an untrained reward model from {src}: {folder}", file=sys.stderr)
    return folder


def resolve_recipe(recipe_path: str | Path, sets: list[str], algo: str | None, iterations: int,
                   threads: int, reward: str | None, tag: str | None = None):
    """The validated AlignRecipe the benchmark runs (and the reward-model folder it uses)."""
    from apactl.recipe import load_raw, parse_recipe

    overrides = list(sets) + ([f"algo.name={algo}"] if algo else [])
    raw = load_raw(recipe_path, overrides)
    algo_name = (raw.get("algo") or {}).get("name", "apa")
    extra = [f"train.iterations={iterations}", f"run.num_threads={threads}",
             "logging.progress=false"]
    if not any(s.startswith("run.output_dir=") for s in sets):
        extra.append(f"run.output_dir={CACHE / 'runs' / (tag or f'throughput-{algo_name}')}")
    rm_path = None
    if (raw.get("reward") or {}).get("judge", "reward-model") == "reward-model":
        policy = raw.get("policy") or {}
        if reward and Path(reward).exists():
            reward = str(Path(reward).resolve())  # subprocesses may run elsewhere
        rm_path = reward or str(untrained_reward_model(policy.get("name_or_path",
                                                                  "smollm2-135m-instruct"),
                                                       policy.get("cache_dir")))
        extra.append(f"reward.path={rm_path}")
    return parse_recipe(load_raw(recipe_path, overrides + extra), "align"), rm_path


# ------------------------------------------------------------------------------- the run
# Phases whose executed FLOPs are counted. Not "generate": on CUDA its steps replay a captured
# graph, which a dispatch mode never sees (its model FLOPs are reported instead); not "verify":
# the one-time check of the split forwards is not part of an iteration's work.
COUNTED = ("score", "reward", "update")


class Done(Exception):
    """Raised from the last iteration's ``on_step_end``: the benchmark needs the metrics, not
    the final checkpoint and weights (at 1.7B with fp32 masters and AdamW state that is ~55 GB
    of writes, minutes on a slow disk)."""


class Recorder:
    """Observes one ``run_align`` through ``apactl.hooks.Hooks`` (the loop's public seam): keeps
    the models, counts the real prompt, response and reward-model tokens of every training
    rollout, marks the memory sampler's windows, and counts the FLOPs each phase executes
    (``torch.utils.flop_counter.FlopCounterMode``) in the first warm-up iteration only (the
    counting slows the phase it watches)."""

    def __init__(self, warmup: int, sampler: bl.RssSampler, recipe, stop_early: bool = False):
        self.warmup, self.sampler, self.recipe = warmup, sampler, recipe
        self.stop_early = stop_early
        self.actors = None
        self.rollouts: list[dict[str, Any]] = []
        self.starts: list[float] = []
        self.save_start: float | None = None
        self.counting = False
        self.flops: dict[str, int] = {}

    def hooks(self):
        from apactl.hooks import Hooks

        return Hooks(phase=self.phase, on_start=self.on_start,
                     on_rollout_start=self.on_rollout_start, on_rollout=self.on_rollout,
                     on_save=self.on_save, on_step_end=self.on_step_end)

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        if self.stop_early and step == self.recipe.train.iterations:
            self.save_start = time.perf_counter()
            raise Done

    def on_start(self, pieces: dict[str, Any]) -> None:
        self.actors = pieces["actors"]

    def on_rollout_start(self, it: int) -> None:
        i = len(self.rollouts)
        self.sampler.mark("warmup" if i < self.warmup else "measured")
        self.counting = i == 0 and self.warmup > 0
        self.starts.append(time.perf_counter())

    def on_rollout(self, it: int, ro, texts: list[str], prompts: list[dict]) -> None:
        self.rollouts.append(count_tokens(self.actors, prompts, ro, texts, self.recipe))

    def on_save(self, step: int) -> None:
        if self.save_start is None:
            self.save_start = time.perf_counter()
            self.sampler.mark("save")

    def phase(self, name: str):
        import contextlib

        if not (self.counting and name in COUNTED):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def counted():
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                yield
            self.flops[name] = self.flops.get(name, 0) + fc.get_total_flops()
        return counted()


def count_tokens(actors, prompts, ro, texts, recipe) -> dict[str, Any]:
    """Real (unpadded) token counts of one rollout, and the decoding steps of generation."""
    from apactl.models import unwrap
    from apactl.sampling.cuda import CACHE_MULTIPLE
    from apactl.sampling.static import capture_shape

    resp_len = ro.response_mask.sum(1).long()
    b = ro.batch_size
    step = recipe.generation.batch_size or b
    # Each generate() call runs one forward per new token until all of its rows have ended.
    calls = [(min(step, b - i), int(resp_len[i:i + step].max())) for i in range(0, b, step)]
    steps = sum(s for _, s in calls)
    # Bytes the decode reads: the decode model's weights (the 16-bit copy under mixed
    # precision) each step, plus the KV cache it attends (all slots of the static cache on the
    # CUDA graph path; the growing cache of the plain loop): both, the metric picks one.
    model = actors.sampler or actors.policy
    weights = bl.matmul_params(model)["weight_bytes"]
    kv_tok = bl.kv_bytes_per_token(unwrap(model).config)
    p, n_new = ro.query_ids.shape[1], recipe.generation.max_new_tokens
    read = {"decode_bytes_static": 0, "decode_bytes_plain": 0}
    for rows, s in calls:
        bucket, length = capture_shape(rows, p, n_new, CACHE_MULTIPLE)
        read["decode_bytes_static"] += bl.decode_read_bytes(weights, kv_tok, bucket, s, length, p)
        read["decode_bytes_plain"] += bl.decode_read_bytes(weights, kv_tok, rows, s, None, p)
    rm_tokens = 0
    judge = actors.judge
    if hasattr(judge, "texts") and hasattr(judge, "tokenizer"):
        rm_texts = judge.texts([p["messages"] for p in prompts], texts)
        enc = judge.tokenizer(rm_texts, add_special_tokens=False, truncation=True,
                              max_length=getattr(judge, "max_len", None))
        rm_tokens = sum(len(x) for x in enc["input_ids"])
    return {"episodes": b, "prompt_tokens": int(ro.query_mask.sum()),
            "response_tokens": int(resp_len.sum()), "response_width": int(ro.response_ids.shape[1]),
            "decode_steps": steps, "generate_calls": math.ceil(b / step),
            "decode_weight_bytes": weights, **read, "reward_model_tokens": rm_tokens}


def model_params(actors) -> dict[str, dict[str, int]]:
    out = {"policy": bl.matmul_params(actors.policy),
           "critic": bl.matmul_params(actors.critic)}
    # LoRA: the reference is the policy with its adapter disabled (same matmuls).
    out["reference"] = bl.matmul_params(actors.ref) if actors.ref is not None else out["policy"]
    rm = getattr(actors.judge, "model", None)
    if rm is not None:
        out["reward_model"] = bl.matmul_params(rm)
    return out


def run_benchmark(recipe, warmup: int, limits_cfg: dict[str, int],
                  no_save: bool = False) -> dict[str, Any]:
    import torch

    import apactl.workflows.align as wf
    from apactl.metrics import read_metrics

    sampler = bl.RssSampler().start()
    sampler.mark("load")
    rec = Recorder(warmup, sampler, recipe, stop_early=no_save)
    t0 = time.perf_counter()
    try:
        wf.run_align(recipe, overwrite=True, hooks=rec.hooks())  # a benchmark cache folder
    except Done:
        pass
    t_end = time.perf_counter()
    sampler.stop()
    memory = sampler.report()
    rows = read_metrics(Path(recipe.run.output_dir) / "metrics.jsonl")
    if len(rows) != len(rec.rollouts):
        raise RuntimeError(f"{len(rows)} metrics rows but {len(rec.rollouts)} rollouts recorded")
    params = model_params(rec.actors)
    device = str(rec.actors.device)
    # The compute dtype: under mixed precision (the CUDA default) the weights are fp32 masters
    # but every matmul runs in bf16, so MFU is against the bf16 peak.
    sampler_model = rec.actors.sampler or rec.actors.policy
    dtype = str(next(sampler_model.parameters()).dtype).removeprefix("torch.")
    threads = recipe.run.num_threads or torch.get_num_threads()
    limits = bl.measure_limits(threads, dtype, device=device, **limits_cfg)
    if device.startswith("cuda"):  # the loop logs each phase's peak (it resets the counter)
        memory["gpu_peak_by_phase_gib"] = {
            k.removeprefix("gpu/mem_peak_gb_"): max(r.get(k) or 0 for r in rows)
            for k in rows[-1] if k.startswith("gpu/mem_peak_gb_")}
        memory["gpu_peak_allocated_gib"] = max(memory["gpu_peak_by_phase_gib"].values())
    ends = rec.starts[1:] + [rec.save_start]
    walls = [(e - s) if e is not None else None for s, e in zip(rec.starts, ends)]
    return summarize(recipe, warmup, rows, rec.rollouts, walls, params, limits, memory,
                     dtype, total_s=t_end - t0, executed=dict(rec.flops))


# ---------------------------------------------------------------------------- the figures
def summarize(recipe, warmup, rows, rollouts, walls, params, limits, memory, dtype,
              total_s, executed=None) -> dict[str, Any]:
    import torch

    tr = recipe.train
    pol, crit, ref = params["policy"], params["critic"], params["reference"]
    rm = params.get("reward_model")
    pol_train, crit_train = bl.train_flops_per_token(pol), bl.train_flops_per_token(crit)
    per_it = []
    for i, (row, ro, wall) in enumerate(zip(rows, rollouts, walls)):
        tokens = ro["prompt_tokens"] + ro["response_tokens"]
        train_policy = i >= recipe.critic.warmup_iterations
        upd_models = [crit_train] + ([pol_train] if train_policy else [])
        flops = {
            "generate": 2 * pol["fwd"] * tokens,
            "score": 2 * (pol["fwd"] + ref["fwd"] + crit["fwd"]) * tokens,
            "reward": 2 * rm["fwd"] * ro["reward_model_tokens"] if rm else 0,
            "update": tr.epochs_per_rollout * tokens * sum(m["primary"] for m in upd_models),
            "update_6n": tr.epochs_per_rollout * tokens * sum(m["simple_6n"] for m in upd_models),
        }
        times = {k.removeprefix("time/"): v for k, v in row.items() if k.startswith("time/")}
        graph = bool(row.get("gen/cuda_graph", 0.0))
        per_it.append({"step": row["step"], "measured": i >= warmup, "times": times,
                       "wall_s": wall, **ro, "flops": flops, "cuda_graph": graph,
                       "decode_bytes": ro[f"decode_bytes_{'static' if graph else 'plain'}"],
                       "reward_mean": row.get("reward/score_mean"),
                       "response_length_mean": row.get("response/length_mean"),
                       "eos_rate": row.get("response/eos_rate")})
    meas = [r for r in per_it if r["measured"]]
    if not meas:
        raise RuntimeError("no measured iteration (--iterations must be >= 1)")
    n = len(meas)

    def tsum(k):
        return sum(r["times"].get(k, 0.0) for r in meas)

    def fsum(k):
        return sum(r["flops"][k] for r in meas)

    peak = limits["matmul_gflops"] * 1e9
    phase_flops = {"generate": fsum("generate"), "score": fsum("score"),
                   "reward": fsum("reward"), "update": fsum("update"),
                   "update_6n": fsum("update_6n")}
    phase_time = {p: tsum(p) for p in PHASES}
    phase_time["update_6n"] = phase_time["update"]
    rate = {k: (phase_flops[k] / phase_time[k] if phase_time[k] else float("nan"))
            for k in phase_flops}
    it_time = tsum("iteration")
    it_flops = sum(phase_flops[p] for p in PHASES)
    steps = sum(r["decode_steps"] for r in meas)
    # What the decode reads (the decode copy's weights + the KV cache), not the fp32 masters
    read_gbps = sum(r["decode_bytes"] for r in meas) / phase_time["generate"] / 1e9
    episodes = sum(r["episodes"] for r in meas)
    walls = [r["wall_s"] for r in meas if r["wall_s"] is not None]
    all_rewards = [r["reward_mean"] for r in per_it]
    summary = {
        "measured_iterations": n,
        "episodes_per_iteration": episodes / n,
        "seconds_per_iteration": it_time / n,
        "wall_seconds_per_iteration": bl.mean(walls) if walls else None,
        "seconds_per_episode": it_time / episodes,
        "phase_seconds": {p: phase_time[p] / n for p in PHASES},
        "episodes_per_s": episodes / it_time,
        "generated_tokens_per_s": sum(r["response_tokens"] for r in meas) / phase_time["generate"],
        "prompt_tokens_per_episode": sum(r["prompt_tokens"] for r in meas) / episodes,
        "response_length_mean": sum(r["response_tokens"] for r in meas) / episodes,
        "max_new_tokens": recipe.generation.max_new_tokens,
        "eos_rate": bl.mean([r["eos_rate"] for r in meas]),
        "reward_model_tokens_per_episode": sum(r["reward_model_tokens"] for r in meas) / episodes,
        "peak_rss_mib": memory["ru_maxrss_mib"],
        "peak_rss_measured_mib": memory["sampled_peak_mib_by_window"].get("measured"),
        "gflops_per_s": {k: v / 1e9 for k, v in rate.items()},
        "gflops_per_s_iteration": it_flops / it_time / 1e9,
        "mfu": {k: v / peak for k, v in rate.items()},
        "mfu_iteration": it_flops / it_time / peak,
        "decode": {"weight_bytes": meas[0]["decode_weight_bytes"],
                   "bytes_per_iteration": sum(r["decode_bytes"] for r in meas) / n,
                   "cuda_graph": all(r["cuda_graph"] for r in meas),
                   "steps_per_iteration": steps / n, "read_gbps": read_gbps,
                   "fraction_of_copy_bandwidth": read_gbps / limits["copy_gbps_rw"]},
        "executed": _executed(executed, per_it[0], meas, phase_time, peak),
        "reward_mean_by_iteration": all_rewards,
        "reward_last": all_rewards[-1],
        "reward_mean_all": bl.mean(all_rewards),
        "total_process_seconds": total_s,
    }
    config = {
        "recipe": recipe.model_dump(mode="json"),
        "algo": recipe.algo.name, "policy": recipe.policy.name_or_path,
        "reward": recipe.reward.path or recipe.reward.name,
        "critic_init": recipe.critic.init, "threads": recipe.run.num_threads, "dtype": dtype,
        "rollout_batch_size": tr.rollout_batch_size, "minibatch_size": tr.minibatch_size,
        "grad_accum": tr.grad_accum, "epochs_per_rollout": tr.epochs_per_rollout,
        "freeze_bottom_layers": tr.freeze_bottom_layers,
        "max_new_tokens": recipe.generation.max_new_tokens, "warmup_iterations": warmup,
        "torch": torch.__version__, "cpu": _cpu_model(),
        "env": {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
    }
    return {"config": config, "limits": limits, "params": params, "memory": memory,
            "summary": summary, "iterations": per_it}


def _executed(counted, first, meas, phase_time, peak) -> dict[str, Any] | None:
    """FLOPs the phases really executed (FlopCounterMode, first warm-up iteration), scaled to
    the measured iterations by their prompt+response tokens; rate / matmul peak = utilisation.

    Unlike the model-FLOP convention above this sees the work apactl skips (a shared frozen
    trunk, the LM head on prompt positions) and the work it adds (attention scores)."""
    if not counted:
        return None
    tokens0 = first["prompt_tokens"] + first["response_tokens"]
    tokens = sum(r["prompt_tokens"] + r["response_tokens"] for r in meas)
    n = len(meas)
    out: dict[str, Any] = {"counted_in_iteration": first["step"], "gflop_per_iteration": {},
                           "gflops_per_s": {}, "utilisation": {}}
    total = 0.0
    for p in COUNTED:
        f = counted.get(p, 0) * tokens / tokens0
        total += f
        out["gflop_per_iteration"][p] = f / n / 1e9
        rate = f / phase_time[p] if phase_time[p] else float("nan")
        out["gflops_per_s"][p] = rate / 1e9
        out["utilisation"][p] = rate / peak
    it_time = sum(phase_time[p] for p in COUNTED)
    out["gflop_per_iteration"]["score+reward+update"] = total / n / 1e9
    out["gflops_per_s"]["score+reward+update"] = total / it_time / 1e9
    out["utilisation"]["score+reward+update"] = total / it_time / peak
    return out


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------- reporting
def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s, lim, cfg = res["summary"], res["limits"], res["config"]
    con = Console(width=None if sys.stdout.isatty() else 120)
    title = (f"apactl align --algo {cfg['algo']}: {cfg['policy']}, {cfg['rollout_batch_size']} "
             f"episodes x {cfg['max_new_tokens']} new tokens, {cfg['threads']} threads, "
             f"{cfg['dtype']}; mean of {s['measured_iterations']} iterations "
             f"(+{cfg['warmup_iterations']} warm-up)")
    t = Table(title=title, title_justify="left")
    ex = s.get("executed")
    cols = ["phase", "s / iteration", "share", "GFLOP / iteration", "GFLOP/s", "MFU"]
    if ex:
        cols += ["executed GFLOP", "executed GFLOP/s", "of peak"]
    for col in cols:
        t.add_column(col, justify="left" if col == "phase" else "right")

    def exe(p):
        if not ex or p not in ex["gflop_per_iteration"]:
            return [] if not ex else ["", "", ""]
        return [bl.fmt(ex["gflop_per_iteration"][p]), bl.fmt(ex["gflops_per_s"][p]),
                f"{100 * ex['utilisation'][p]:.2f}%"]
    n, total = s["measured_iterations"], s["seconds_per_iteration"]
    flops = {p: sum(r["flops"][p] for r in res["iterations"] if r["measured"]) / n
             for p in (*PHASES, "update_6n")}
    for p in (*PHASES, "update_6n"):
        sec = s["phase_seconds"]["update" if p == "update_6n" else p]
        label = "update (6N convention)" if p == "update_6n" else p
        t.add_row(label, bl.fmt(sec), f"{100 * sec / total:.1f}%" if p in PHASES else "",
                  bl.fmt(flops[p] / 1e9), bl.fmt(s["gflops_per_s"][p]),
                  f"{100 * s['mfu'][p]:.2f}%", *exe(p if p in PHASES else "-"))
    t.add_row("iteration", bl.fmt(total), "100%", bl.fmt(sum(flops[p] for p in PHASES) / 1e9),
              bl.fmt(s["gflops_per_s_iteration"]), f"{100 * s['mfu_iteration']:.2f}%",
              *exe("iteration"))
    con.print(t)
    d = s["decode"]
    lines = [
        f"episodes/s {bl.fmt(s['episodes_per_s'])}   generated tokens/s "
        f"{bl.fmt(s['generated_tokens_per_s'])}   s/episode {bl.fmt(s['seconds_per_episode'])}"
        f"   wall s/iteration {bl.fmt(s['wall_seconds_per_iteration'])}",
        f"tokens/episode: prompt {bl.fmt(s['prompt_tokens_per_episode'])}, response "
        f"{bl.fmt(s['response_length_mean'])} (target {s['max_new_tokens']}, EOS rate "
        f"{bl.fmt(s['eos_rate'])}), reward model {bl.fmt(s['reward_model_tokens_per_episode'])}",
        f"peak RSS {bl.fmt(s['peak_rss_mib'])} MiB (ru_maxrss), "
        f"{bl.fmt(s['peak_rss_measured_mib'])} MiB sampled during the measured iterations",
        f"limits (same process, {lim['threads']} threads): matmul {lim['matmul_n']}^3 "
        f"{lim['matmul_dtype']} {bl.fmt(lim['matmul_gflops'])} GFLOP/s, copy "
        f"{bl.fmt(lim['copy_gbps_rw'])} GB/s (read+write, {lim['copy_mib']} MiB)",
        f"decode ({'CUDA graph' if d['cuda_graph'] else 'eager'}): "
        f"{bl.fmt(d['weight_bytes'] / 1e6)} MB of decode weights x "
        f"{bl.fmt(d['steps_per_iteration'])} steps + KV cache = "
        f"{bl.fmt(d['bytes_per_iteration'] / 1e9)} GB/iteration, {bl.fmt(d['read_gbps'])} "
        f"GB/s read = {100 * d['fraction_of_copy_bandwidth']:.1f}% of the copy bandwidth",
        "reward (raw judge score) by iteration: "
        + ", ".join(bl.fmt(x) for x in s["reward_mean_by_iteration"]),
    ]
    for line in lines:
        con.print(line, highlight=False)


# -------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="align recipe (YAML)")
    p.add_argument("--algo", choices=("apa", "ppo", "awr"), help="default: the recipe's")
    p.add_argument("--iterations", type=int, default=3, help="measured iterations (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="iterations run first and left out of the figures (default 1)")
    p.add_argument("--threads", type=int,
                   help="torch threads (run.num_threads); default: the cores available")
    p.add_argument("--reward", help="reward-model folder; default: an untrained sequence "
                   "classifier made once from the policy under benchmarks/.cache/")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override (repeatable), e.g. --set generation.max_new_tokens=32")
    p.add_argument("--json", dest="json_out", help="write the full result as JSON here")
    p.add_argument("--tag", help="run folder name under benchmarks/.cache/runs/")
    p.add_argument("--matmul-n", type=int, default=2048, help="matmul peak size (default 2048)")
    p.add_argument("--copy-mib", type=int, default=256, help="copy bandwidth size in MiB")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each limit (best kept)")
    p.add_argument("--no-save", action="store_true",
                   help="stop after the last iteration's metrics: no final checkpoint/weights")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, 1 thread, small limits: "
                        + " ".join(f"--set {s}" for s in SMOKE_SETS))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or (1 if args.smoke else bl.available_threads())
    sets = (SMOKE_SETS if args.smoke else []) + args.sets
    limits_cfg = (dict(SMOKE_LIMITS) if args.smoke else
                  {"matmul_n": args.matmul_n, "copy_mib": args.copy_mib, "reps": args.reps})
    recipe, _ = resolve_recipe(args.recipe, sets, args.algo, args.warmup + args.iterations,
                               threads, args.reward, args.tag)
    res = run_benchmark(recipe, args.warmup, limits_cfg, no_save=args.no_save)
    res["config"]["overrides"] = sets
    print_report(res)
    if args.json_out:
        print(f"wrote {bl.write_json(args.json_out, res)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
