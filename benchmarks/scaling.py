"""How `apactl align` scales: the figures of align_throughput.py as the response length and the
rollout batch size grow, one axis at a time (the other held at its default).

    python benchmarks/scaling.py --threads 2                        # lengths 32..256, batches 4..32
    python benchmarks/scaling.py --lengths 32 64 --batches 4 8 --iterations 2
    OMP_NUM_THREADS=1 python benchmarks/scaling.py --smoke           # tiny random model

Each point is its own process (benchmarks/align_throughput.py), so each peak RSS and each
matmul/copy limit is measured for that point. The response-length axis sets
``generation.max_new_tokens``; EOS can end responses earlier (apactl has no switch to suppress
it), so the realised mean length is reported next to the target. The batch axis sets
``train.rollout_batch_size`` (the minibatch becomes gcd(batch, the recipe's minibatch), so every
batch divides evenly). Writes JSON and a plot of seconds per episode against each axis
(default benchmarks/results/scaling.json / scaling.png).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import align_throughput as at
import benchlib as bl

PHASE_STYLE = {"generate": "tab:blue", "score": "tab:orange", "reward": "tab:green",
               "update": "tab:red"}


def points(lengths: list[int], batches: list[int], length0: int, batch0: int):
    """(axis, length, batch) in run order; the shared default point is run once."""
    out = [("length", n, batch0) for n in lengths] + [("batch", length0, b) for b in batches]
    seen: set[tuple[int, int]] = set()
    unique = []
    for _, n, b in out:
        if (n, b) not in seen:
            seen.add((n, b))
            unique.append((n, b))
    return out, unique


def run_point(n: int, b: int, minibatch0: int, args, algo: str) -> dict[str, Any]:
    tag = f"scaling-{algo}-L{n}-B{b}"
    json_path = at.CACHE / "scaling" / f"{tag}.json"
    mb = math.gcd(b, minibatch0)
    cmd = [sys.executable, str(bl.HERE / "align_throughput.py"), "--iterations",
           str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--tag", tag, "--json", str(json_path)]
    cmd += ["--algo", algo] + (["--reward", args.reward] if args.reward else [])
    cmd += ["--recipe", str(Path(args.recipe).resolve())]
    if args.smoke:
        cmd += ["--matmul-n", "512", "--copy-mib", "32", "--reps", "3"]
    for s in [*args.all_sets, f"generation.max_new_tokens={n}",
              f"train.rollout_batch_size={b}", f"train.minibatch_size={mb}"]:
        cmd += ["--set", s]
    res = bl.run_json(cmd, args.threads, log=json_path.with_suffix(".log"), json_path=json_path)
    s = res["summary"]
    eps = s["episodes_per_iteration"]
    return {
        "max_new_tokens": n, "rollout_batch_size": b, "minibatch_size": mb,
        "response_length_mean": s["response_length_mean"], "eos_rate": s["eos_rate"],
        "prompt_tokens_per_episode": s["prompt_tokens_per_episode"],
        "seconds_per_iteration": s["seconds_per_iteration"],
        "seconds_per_episode": s["seconds_per_episode"],
        "phase_seconds_per_episode": {p: v / eps for p, v in s["phase_seconds"].items()},
        "episodes_per_s": s["episodes_per_s"],
        "generated_tokens_per_s": s["generated_tokens_per_s"],
        "mfu": s["mfu"], "mfu_iteration": s["mfu_iteration"],
        "decode_fraction_of_copy_bandwidth": s["decode"]["fraction_of_copy_bandwidth"],
        "peak_rss_mib": s["peak_rss_mib"], "limits": res["limits"], "json": str(json_path),
    }


def plot(length_axis, batch_axis, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, pts, key, label in ((axes[0], length_axis, "max_new_tokens",
                                 "max_new_tokens (target response length)"),
                                (axes[1], batch_axis, "rollout_batch_size",
                                 "rollout batch size (episodes per iteration)")):
        if not pts:
            ax.set_visible(False)
            continue
        x = [p[key] for p in pts]
        ax.plot(x, [p["seconds_per_episode"] for p in pts], "o-", color="black", lw=2,
                label="total")
        for phase, color in PHASE_STYLE.items():
            ax.plot(x, [p["phase_seconds_per_episode"].get(phase, 0.0) for p in pts], ".--",
                    color=color, label=phase)
        if key == "max_new_tokens":
            for p in pts:
                ax.annotate(f"{p['response_length_mean']:.0f}", (p[key], p["seconds_per_episode"]),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
            ax.set_title("response length (labels: realised mean length)", fontsize=10)
        else:
            ax.set_title(f"batch size (max_new_tokens {pts[0]['max_new_tokens']})", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per episode")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[tuple[str, dict[str, Any]]], errors, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in ("axis", "target len", "realised len", "EOS rate", "batch", "s / iteration",
              "s / episode", "episodes/s", "gen tokens/s", "MFU update", "MFU it.",
              "decode % copy bw", "peak RSS MiB"):
        t.add_column(c, justify="left" if c == "axis" else "right")
    for axis, p in rows:
        t.add_row(axis, str(p["max_new_tokens"]), bl.fmt(p["response_length_mean"]),
                  bl.fmt(p["eos_rate"]), str(p["rollout_batch_size"]),
                  bl.fmt(p["seconds_per_iteration"]), bl.fmt(p["seconds_per_episode"]),
                  bl.fmt(p["episodes_per_s"]), bl.fmt(p["generated_tokens_per_s"]),
                  f"{100 * p['mfu']['update']:.1f}%", f"{100 * p['mfu_iteration']:.1f}%",
                  f"{100 * p['decode_fraction_of_copy_bandwidth']:.1f}%",
                  bl.fmt(p["peak_rss_mib"]))
    for (n, b), err in errors.items():
        t.add_row("failed", str(n), "", "", str(b), "", "", "", "", "", "", "", err[:40])
    Console(width=None if sys.stdout.isatty() else 160).print(t)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(at.DEFAULT_RECIPE))
    p.add_argument("--algo", choices=("apa", "ppo", "awr"), help="default: the recipe's")
    p.add_argument("--lengths", type=int, nargs="*", default=[32, 64, 128, 256],
                   help="max_new_tokens values (batch held at --batch)")
    p.add_argument("--batches", type=int, nargs="*", default=[4, 8, 16, 32],
                   help="rollout batch sizes (length held at --length)")
    p.add_argument("--length", type=int, default=64, help="max_new_tokens on the batch axis")
    p.add_argument("--batch", type=int, default=16, help="batch size on the length axis")
    p.add_argument("--iterations", type=int, default=3, help="measured iterations per point")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="default: the cores available (1 with --smoke)")
    p.add_argument("--reward", help="reward-model folder (default: untrained, from the policy)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", dest="json_out")
    p.add_argument("--plot", help="PNG path (default beside the JSON: scaling.png)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 1 thread; results "
                   "to benchmarks/.cache/smoke/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.threads = args.threads or (1 if args.smoke else bl.available_threads())
    args.all_sets = (at.SMOKE_SETS if args.smoke else []) + args.sets
    from apactl.recipe import load_raw

    raw = load_raw(args.recipe, args.all_sets + ([f"algo.name={args.algo}"] if args.algo else []))
    algo = (raw.get("algo") or {}).get("name", "apa")
    minibatch0 = int((raw.get("train") or {}).get("minibatch_size", 8))
    order, unique = points(args.lengths, args.batches, args.length, args.batch)
    done: dict[tuple[int, int], dict[str, Any]] = {}
    errors: dict[tuple[int, int], str] = {}
    for i, (n, b) in enumerate(unique, 1):
        print(f"[{i}/{len(unique)}] max_new_tokens={n} batch={b} ...", file=sys.stderr)
        try:
            done[(n, b)] = run_point(n, b, minibatch0, args, algo)
        except (RuntimeError, ValueError) as exc:
            errors[(n, b)] = str(exc).strip().splitlines()[-1] if str(exc).strip() else "error"
            print(f"failed: {exc}", file=sys.stderr)
    length_axis = [done[(n, b)] for axis, n, b in order if axis == "length" and (n, b) in done]
    batch_axis = [done[(n, b)] for axis, n, b in order if axis == "batch" and (n, b) in done]
    policy = (raw.get("policy") or {}).get("name_or_path", "?")
    title = (f"apactl align --algo {algo}, {policy}, {args.threads} threads, mean of "
             f"{args.iterations} iterations (+{args.warmup} warm-up) per point")
    rows = [(axis, done[(n, b)]) for axis, n, b in order if (n, b) in done]
    print_table(rows, errors, title)
    base = at.CACHE / "smoke" if args.smoke else bl.HERE / "results"
    out = Path(args.json_out) if args.json_out else base / "scaling.json"
    png = Path(args.plot) if args.plot else out.with_name("scaling.png")
    if length_axis or batch_axis:
        plot(length_axis, batch_axis, png, title)
        print(f"wrote {png}", file=sys.stderr)
    bl.write_json(out, {"title": title, "algo": algo, "threads": args.threads,
                        "overrides": args.all_sets, "length_axis": length_axis,
                        "batch_axis": batch_axis,
                        "errors": {f"L{n}-B{b}": e for (n, b), e in errors.items()}})
    print(f"wrote {out}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
