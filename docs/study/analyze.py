"""The study's analysis (docs/study.md): choose learning rates, write the eval recipe, and build
the report (tables, plots, the numbers behind each verdict) from the runs' metrics.jsonl and
`apactl eval`'s report.json.

    python docs/study/analyze.py best-lr apactl-runs/study/grid apa
    python docs/study/analyze.py eval-recipe apactl-runs/study > apactl-runs/study/eval.yaml
    python docs/study/analyze.py report apactl-runs/study docs/study

The report writes docs/study/results.md, results.json and the PNGs; the verdicts in
docs/study.md are written from them by hand.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ALGOS = ("apa", "ppo", "awr")
DEFAULT_LAM = {"apa": 0.1, "awr": 1.0}  # the recipe's lambda; other values are extra runs
# Held-out evaluation points inside each run (train.eval_every): proxy = the RM the run trained
# on, gold = the sentiment judge that labelled the RM's data (never trained on).
PROXY, GOLD, KL = "eval/score_mean", "eval/gold_mean", "eval/kl_k1"


def runs(root: Path) -> list[dict]:
    """Every run folder under ``root`` with its recipe and metrics."""
    import yaml

    out = []
    for recipe in sorted(root.rglob("recipe.yaml")):
        folder = recipe.parent
        metrics = folder / "metrics.jsonl"
        if not metrics.exists() or folder.name in ("label", "sft", "rm", "eval"):
            continue
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        out.append({"folder": folder, "recipe": yaml.safe_load(recipe.read_text()), "rows": rows,
                    "finished": (folder / "final").is_dir()})
    return out


def last(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


def config_of(run: dict) -> tuple[str, float, float]:
    r = run["recipe"]
    return r["algo"]["name"], r["train"]["lr"], r["algo"].get("lam", float("nan"))


def best_lr(grid: Path, algo: str) -> float:
    """The learning rate whose final held-out PROXY score is highest (never the gold judge)."""
    cands = [(last(r["rows"], PROXY), r["recipe"]["train"]["lr"])
             for r in runs(grid) if r["recipe"]["algo"]["name"] == algo and r["finished"]]
    cands = [c for c in cands if c[0] is not None]
    if not cands:
        sys.exit(f"no finished {algo} run with a held-out proxy score under {grid}")
    return max(cands)[1]


def eval_recipe(root: Path) -> str:
    """The eval recipe over the chosen configurations' final policies (3 seeds each) and the
    lambda runs, against pi_init, with the proxy and the gold judge."""
    policies = []
    for algo in ALGOS:
        lr = best_lr(root / "grid", algo)
        seed0 = next(r["folder"] for r in runs(root / "grid")
                     if config_of(r)[:2] == (algo, lr))
        policies += [f"  - {{name: {algo}-s0, path: '{seed0}'}}",
                     f"  - {{name: {algo}, path: '{root / f'seeds-{algo}'}'}}"]
    policies += [f"  - {{name: apa-lam, path: '{root / 'lam-apa'}'}}",
                 f"  - {{name: awr-lam, path: '{root / 'lam-awr'}'}}"]
    return "\n".join([
        "kind: eval", "run: {name: study-eval, output_dir: " + str(root / "eval") + ", seed: 1}",
        "policies:", *policies,
        f"baseline: {{name: sft, path: '{root / 'sft'}'}}",
        "data: {source: 'builtin:prompts', eval_rows: 64, max_prompt_len: 96, max_len: 160, "
        "system: ''}",
        "judges:",
        f"  - {{name: reward-model, label: proxy, role: proxy, path: '{root / 'rm'}', "
        "normalize: true}",
        "  - {name: sentiment, label: gold, role: gold}",
        "generation: {max_new_tokens: 32, temperature: 0.7}",
        "eval: {samples_per_prompt: 2, bootstrap: 2000, batch_size: 32}", ""])


def mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def curves(group: list[dict], key: str) -> tuple[list[int], list[float], list[float],
                                                 list[float]]:
    """(steps, mean, min, max) over the runs of ``group`` of metric ``key`` per step."""
    steps = sorted({r["step"] for run in group for r in run["rows"] if r.get(key) is not None})
    vals = [[next((r[key] for r in run["rows"] if r["step"] == s and r.get(key) is not None),
                  None) for run in group] for s in steps]
    return (steps, [mean(v) for v in vals], [min(x for x in v if x is not None) for v in vals],
            [max(x for x in v if x is not None) for v in vals])


def groups(root: Path) -> dict[str, list[dict]]:
    """Configuration label -> its runs: the chosen (algo, lr) with all seeds, and the lambda
    runs (seed 0)."""
    chosen = {a: best_lr(root / "grid", a) for a in ALGOS}
    out: dict[str, list[dict]] = {}
    for run in runs(root):
        algo, lr, lam = config_of(run)
        default = DEFAULT_LAM.get(algo)
        if lr != chosen[algo]:
            continue
        label = algo if algo == "ppo" or lam == default else f"{algo} lam={lam:g}"
        out.setdefault(label, []).append(run)
    return out


def palette(gs: dict[str, list[dict]]) -> dict[str, str]:
    """One colour per configuration in every figure: apa, ppo, awr first, then the others."""
    rest = [label for label in gs if label not in ALGOS]
    return {**{a: f"C{i}" for i, a in enumerate(ALGOS)},
            **{label: f"C{len(ALGOS) + i}" for i, label in enumerate(rest)}}


def plot_curves(gs: dict[str, list[dict]], path: Path) -> None:
    """Training curves per configuration: mean over seeds, the band the seeds span."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("reward/score_mean", "proxy reward (normalised RM score)"),
              (GOLD, "gold reward on held-out prompts (VADER)"),
              ("kl/ref_k1", "KL to pi_init (k1, nats per response)"),
              ("policy/entropy", "entropy (nats per token)")]
    fig = Figure(figsize=(11, 7.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    colors = palette(gs)
    for ax, (key, title) in zip(axes, panels):
        for label, group in gs.items():
            steps, m, lo, hi = curves(group, key)
            if steps:
                ax.fill_between(steps, lo, hi, color=colors[label], alpha=0.15, lw=0)
                ax.plot(steps, m, "-o", ms=2.5, color=colors[label],
                        label=f"{label} ({len(group)} seed{'s' if len(group) > 1 else ''})")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(title.split(" (")[0])
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4,
               fontsize=8)
    fig.savefig(path)


def plot_frontier(gs: dict[str, list[dict]], path: Path) -> None:
    """Gold and proxy reward against KL at the held-out evaluation points (every 8
    iterations), per configuration: mean over seeds, vertical bars spanning the seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    root = next(iter(gs.values()))[0]["folder"].parents[1]
    for ax, (key, name) in zip(axes, ((GOLD, "gold (VADER)"), (PROXY, "proxy (RM)"))):
        col = 1 if key == GOLD else 2
        for i, algo in enumerate(ALGOS):  # every lr and seed: the frontier points
            pts = frontier_points(root, algo)
            ax.scatter([p[0] for p in pts], [p[col] for p in pts], s=10, marker="x",
                       color=f"C{i}", alpha=0.35)
        for label, group in gs.items():
            color = palette(gs)[label]
            _, kl, _, _ = curves(group, KL)
            _, y, lo, hi = curves(group, key)
            if not kl:
                continue
            ax.errorbar(kl, y, yerr=[[a - b for a, b in zip(y, lo)],
                                     [b - a for a, b in zip(y, hi)]],
                        fmt="-o", ms=3, capsize=2, color=color, label=label)
        ax.set_xlabel("KL to pi_init on held-out prompts (k1, nats per response)")
        ax.set_ylabel(f"{name} reward")
        ax.set_xscale("log")
        ax.set_title(f"{name} vs KL (lines: chosen lr, iterations 8/16/24; x: every run)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path)


def frontier_points(root: Path, algo: str) -> list[tuple[float, float, float]]:
    """Every held-out evaluation point (KL, gold, proxy) of ``algo`` at its default lambda:
    all grid learning rates and all seeds. Learning rates reach different KLs, so together they
    trace the reward-KL frontier the matched-KL comparison reads."""
    default = DEFAULT_LAM.get(algo)
    pts = []
    for run in runs(root):
        a, _, lam = config_of(run)
        if a != algo or (default is not None and lam != default):
            continue
        pts += [(r[KL], r[GOLD], r[PROXY]) for r in run["rows"]
                if r.get(KL) is not None and r.get(GOLD) is not None]
    return sorted(pts)


def fit_sqrt(pts: list[tuple[float, ...]], col: int) -> tuple[float, float]:
    """Least squares of column ``col`` on sqrt(KL): y = a + b * sqrt(KL). The square root of
    the KL is the natural distance for reward-vs-KL curves (Gao et al., 2023, scaling laws for
    reward model over-optimisation); two parameters keep the fit stable on ~15 noisy points."""
    xs = [math.sqrt(max(p[0], 0.0)) for p in pts]
    ys = [p[col] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


MATCHED_KL = (2.0, 5.0, 15.0, 25.0)


def matched(root: Path, reps: int = 2000, seed: int = 0) -> dict:
    """Gold and proxy of each algorithm at equal KLs from a + b*sqrt(KL) fitted to its frontier
    points; 95% intervals and the pairwise differences by bootstrapping the points
    (each algorithm's points resampled independently)."""
    import random

    rng = random.Random(seed)
    pts = {a: frontier_points(root, a) for a in ALGOS}
    def refit(p: list) -> tuple[float, ...]:
        draw = [rng.choice(p) for _ in p]  # one resample, both columns
        return fit_sqrt(draw, 1) + fit_sqrt(draw, 2)

    boot = {a: [refit(p) for _ in range(reps)] if len(p) > 2 else [] for a, p in pts.items()}

    def at(ab: tuple[float, ...], kl: float, col: int) -> float:
        a, b = ab[2 * (col - 1)], ab[2 * (col - 1) + 1]
        return a + b * math.sqrt(kl)

    def ci(vals: list[float]) -> list[float]:
        vals = sorted(vals)
        return [vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]] if vals else []

    out: dict = {}
    for algo, p in pts.items():
        if len(p) < 3:
            continue
        fit = fit_sqrt(p, 1) + fit_sqrt(p, 2)
        out[algo] = {"points": len(p), "kl_range": [p[0][0], p[-1][0]], "fit": fit,
                     **{f"{kl:g}": {name: {"value": at(fit, kl, col),
                                           "ci": ci([at(f, kl, col) for f in boot[algo]])}
                                    for name, col in (("gold", 1), ("proxy", 2))}
                        for kl in MATCHED_KL}}
    for one, other in (("apa", "ppo"), ("apa", "awr"), ("ppo", "awr")):
        if one in out and other in out:
            out[f"{one}-{other}"] = {f"{kl:g}": {name: {
                "value": at(out[one]["fit"], kl, col) - at(out[other]["fit"], kl, col),
                "ci": ci([at(f, kl, col) - at(g, kl, col)
                          for f, g in zip(boot[one], boot[other])])}
                for name, col in (("gold", 1), ("proxy", 2))} for kl in MATCHED_KL}
    return out


def thirds(group: list[dict], key: str) -> list[float]:
    """Mean of ``key`` over iterations 1-8, 9-16 and 17-24 (training rows), mean over runs."""
    return [mean([mean([r[key] for r in run["rows"]
                        if lo < r["step"] <= lo + 8 and r.get(key) is not None])
                  for run in group]) for lo in (0, 8, 16)]


def summary(gs: dict[str, list[dict]]) -> dict:
    """The numbers behind the verdicts."""
    out: dict = {"configs": {}}
    for label, group in gs.items():
        steps, gold, _, _ = curves(group, GOLD)
        _, proxy, _, _ = curves(group, PROXY)
        _, kl, _, _ = curves(group, KL)
        out["configs"][label] = {
            "seeds": [r["recipe"]["run"]["seed"] for r in group],
            "lr": group[0]["recipe"]["train"]["lr"], "eval_steps": steps,
            "gold": gold, "proxy": proxy, "kl": kl,
            "train_kl_last5": mean([mean([r["kl/ref_k1"] for r in run["rows"][-5:]])
                                    for run in group]),
            # Training-batch means over iterations 1-8, 9-16, 17-24 (mean over seeds): does the
            # KL level off, does the reward fall back?
            "train_kl_by_third": thirds(group, "kl/ref_k1"),
            "train_reward_by_third": thirds(group, "reward/score_mean"),
            "train_entropy_by_third": thirds(group, "policy/entropy"),
            "proxy_peak_step": steps[proxy.index(max(proxy))] if proxy else None}
    return out


def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        format(x, spec)


def interval(d: dict, spec=".3f") -> str:
    lo, hi = d.get("ci_lo"), d.get("ci_hi")
    if lo is None or not math.isfinite(lo):
        return fmt(d["mean"], spec)
    return f"{fmt(d['mean'], spec)} [{fmt(lo, spec)}, {fmt(hi, spec)}]"


def grid_table(root: Path) -> list[str]:
    """The learning-rate selection: every grid run's last held-out evaluation."""
    lines = ["| algorithm | lr | proxy (held-out) | gold (held-out) | KL k1 (held-out) | chosen |",
             "|---|---|---|---|---|---|"]
    rs = sorted(runs(root / "grid"), key=lambda r: (ALGOS.index(config_of(r)[0]),
                                                     config_of(r)[1]))
    chosen = {a: best_lr(root / "grid", a) for a in ALGOS}
    for r in rs:
        algo, lr, _ = config_of(r)
        lines.append(f"| {algo} | {lr:g} | {fmt(last(r['rows'], PROXY))} | "
                     f"{fmt(last(r['rows'], GOLD))} | {fmt(last(r['rows'], KL), '.2f')} | "
                     f"{'yes' if chosen[algo] == lr else ''} |")
    return lines


def short_label(config: str) -> str:
    """apactl eval's configuration label ("algo.name=apa algo.lam=0.3 ...") as the study names
    it ("apa lam=0.3"; the default lambda unnamed)."""
    kv = dict(tok.split("=", 1) for tok in config.split() if "=" in tok)
    algo, lam = kv.get("algo.name", config), kv.get("algo.lam")
    default = DEFAULT_LAM.get(algo)
    if lam in (None, "None") or default is None or float(lam) == default:
        return algo
    return f"{algo} lam={float(lam):g}"


def eval_table(configs: list[dict]) -> list[str]:
    """apactl eval's per-configuration figures (mean over seeds [95% t-interval])."""
    lines = ["| configuration | seeds | proxy | gold | gold diff vs pi_init | KL k1 | KL k3 | "
             "entropy | tokens | distinct-2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        lines.append(
            f"| {short_label(c['config'])} | {len(c['seeds'])} | "
            f"{interval(c['judges']['proxy'])} | "
            f"{interval(c['judges']['gold'])} | {interval(c['diff_vs_baseline']['gold'], '+.3f')}"
            f" | {interval(c['kl_k1'], '.2f')} | {interval(c['kl_k3'], '.2f')} | "
            f"{interval(c['entropy'])} | {interval(c['length_mean'], '.1f')} | "
            f"{interval(c['distinct_2'])} |")
    return lines


def samples(root: Path, per_config: int = 2) -> list[str]:
    """A few answers of each policy group to the same held-out prompts (eval's samples.jsonl)."""
    path = root / "eval" / "samples.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    prompts = sorted({r["prompt_index"] for r in rows})[:per_config]
    out = []
    for i in prompts:
        first = next(r for r in rows if r["prompt_index"] == i)
        out.append(f"**Prompt:** {first['prompt'][-1]['content']}")
        out.append("")
        for r in rows:
            if r["prompt_index"] == i and r["sample"] == 0 and "/" not in r["policy"]:
                text = r["response"].replace("\n", " ").replace("|", "/")
                out.append(f"- *{r['policy']}* (gold {r['scores'].get('gold', 0):+.2f}): {text}")
        out.append("")
    return out


def report(root: Path, docs: Path) -> None:
    gs = groups(root)
    plot_curves(gs, docs / "training_curves.png")
    plot_frontier(gs, docs / "frontier.png")
    res = summary(gs)
    rm = [json.loads(ln) for ln in (root / "rm" / "metrics.jsonl").read_text().splitlines()]
    res["rm_heldout"] = {k: v for k, v in rm[-1].items() if k.startswith("eval/")}
    md = ["# Study results (generated by docs/study/analyze.py)", "",
          f"Proxy reward model, held-out pairs: accuracy {res['rm_heldout']['eval/accuracy']:.3f}"
          f" on {int(res['rm_heldout']['eval/pairs'])} pairs.", "",
          "## Learning-rate selection (seed 0, last held-out evaluation)", "",
          *grid_table(root), ""]
    ev = root / "eval" / "report.json"
    if ev.exists():
        report_json = json.loads(ev.read_text())
        res["eval"] = report_json["configurations"]
        md += ["## Final policies (apactl eval, 64 held-out prompts x 2 answers)", "",
               *eval_table(res["eval"]), "", "## Samples", "", *samples(root)]
    md += ["## Held-out curves (mean over seeds)", "",
           "| configuration | eval at | proxy | gold | KL k1 |", "|---|---|---|---|---|"]
    for label, c in res["configs"].items():
        for k, step in enumerate(c["eval_steps"]):
            md.append(f"| {label} | {step} | {fmt(c['proxy'][k])} | {fmt(c['gold'][k])} | "
                      f"{fmt(c['kl'][k], '.2f')} |")
    md += ["", "## Training batches by thirds (iterations 1-8 / 9-16 / 17-24, mean over seeds)",
           "", "| configuration | KL k1 | proxy reward (normalised) | entropy |",
           "|---|---|---|---|"]
    for label, c in res["configs"].items():
        md.append(f"| {label} | " + " | ".join(
            " / ".join(fmt(x, spec) for x in c[k]) for k, spec in (
                ("train_kl_by_third", ".2f"), ("train_reward_by_third", ".3f"),
                ("train_entropy_by_third", ".3f"))) + " |")
    res["matched"] = m = matched(root)

    def cell(d: dict) -> str:
        return f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else \
            f"{d['value']:+.3f}"

    md += ["", "## Matched KL", "",
           "Every held-out evaluation point of an algorithm at its default lambda (all learning "
           "rates and seeds: 3 points per run), fitted by y = a + b sqrt(KL); 95% intervals by "
           "resampling the points (2000 bootstrap draws).", "",
           "| | points (KL range) | " + " | ".join(f"gold @ KL {k:g}" for k in MATCHED_KL)
           + " | " + " | ".join(f"proxy @ KL {k:g}" for k in MATCHED_KL) + " |",
           "|---|---|" + "---|" * (2 * len(MATCHED_KL))]
    for key, row in m.items():
        span = (f"{row['points']} ({row['kl_range'][0]:.2f}-{row['kl_range'][1]:.1f})"
                if "points" in row else "difference")
        md.append(f"| {key} | {span} | "
                  + " | ".join(cell(row[f"{k:g}"]["gold"]) for k in MATCHED_KL) + " | "
                  + " | ".join(cell(row[f"{k:g}"]["proxy"]) for k in MATCHED_KL) + " |")
    (docs / "results.md").write_text("\n".join(md) + "\n")
    (docs / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print("\n".join(md))


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "best-lr":
        print(best_lr(Path(args[0]), args[1]))
    elif cmd == "eval-recipe":
        print(eval_recipe(Path(args[0])))
    elif cmd == "report":
        report(Path(args[0]), Path(args[1]))
    else:
        sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
