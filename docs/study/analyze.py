"""The study's analysis (docs/study.md): choose each configuration's learning rate, write the
eval recipes, and build the report (tables, plots, the numbers behind each verdict) from the
runs' metrics.jsonl, the sweeps' records and `apactl eval`'s report.json.

    python docs/study/analyze.py best-lr apactl-runs/study apa        # the chosen rate
    python docs/study/analyze.py eval-recipe apactl-runs/study [dpo]  # final eval (or DPO grid)
    python docs/study/analyze.py report apactl-runs/study docs/study

Configurations ("labels"): apa, ppo, awr (with a critic), grpo, rloo, apa-group (critic-free
APA), dpo; "apa lam=0.3"-style labels for runs at a lambda other than the recipe's. The report
writes docs/study/results.md, results.json and the PNGs; the verdicts in docs/study.md are
written from them by hand.
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
from pathlib import Path

CONFIGS = ("apa", "ppo", "awr", "grpo", "rloo", "apa-group", "dpo")
ONLINE = CONFIGS[:-1]
GRID_DIR = {"apa": "grid", "ppo": "grid", "awr": "grid", "grpo": "grid-grpo",
            "rloo": "grid-rloo", "apa-group": "grid-apa-group", "dpo": "grid-dpo"}
DEFAULT_LAM = {"apa": 0.1, "awr": 1.0}  # the recipe's lambda; other values are extra runs
# The selection rule, fixed before the critic-free and DPO runs were made: among a
# configuration's learning rates, the best held-out PROXY reward at the last evaluation among
# the rates whose held-out KL to pi_init (k1, nats per answer) there is at most KL_BUDGET. The
# previous study chose by the proxy alone and every algorithm took the top of its grid (the
# proxy kept rising with the rate, as far as KL 25-70).
KL_BUDGET = 10.0
HORIZON = 24  # iterations of a run of the comparison; "long" runs go 4x further
# Held-out evaluation points inside each run (train.eval_every): proxy = the RM the run trained
# on, gold = the sentiment judge that labelled the RM's data (never trained on).
PROXY, GOLD, KL = "eval/score_mean", "eval/gold_mean", "eval/kl_k1"
MATCHED_KL = (2.0, 5.0, 10.0, 15.0)
# Runs (a run: its held-out points at iterations 8/16/24; a previous-study record or a DPO
# policy: one point) a configuration needs for bootstrap intervals of its curve.
MIN_RUNS = 4


# ------------------------------------------------------------------------------------ runs
def label_of(recipe: dict) -> str:
    """The configuration a run's resolved recipe.yaml belongs to."""
    if recipe.get("kind") == "dpo":
        return "dpo"
    algo = recipe["algo"]
    name = algo["name"]
    label = "apa-group" if name == "apa" and algo.get("advantage", "gae") != "gae" else name
    lam, default = algo.get("lam"), DEFAULT_LAM.get(name)
    if lam is not None and default is not None and float(lam) != default:
        label += f" lam={float(lam):g}"
    return label


@functools.cache
def load_runs(root: Path) -> tuple[dict, ...]:
    """Every run folder under ``root``: label, lr, seed, iterations, metrics rows. Read once
    per process (the report asks for them per configuration); callers must not modify them."""
    import yaml

    out = []
    for recipe in sorted(root.rglob("recipe.yaml")):
        folder = recipe.parent
        metrics = folder / "metrics.jsonl"
        if (not metrics.exists() or folder.name in ("label", "sft", "rm", "eval")
                or {"checkpoints", "final"} & set(folder.relative_to(root).parts)):
            continue
        r = yaml.safe_load(recipe.read_text())
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        out.append({"folder": folder, "recipe": r, "rows": rows, "label": label_of(r),
                    "lr": float(r["train"]["lr"]), "seed": r["run"]["seed"],
                    "iterations": r["train"].get("iterations"), "kind": r.get("kind"),
                    "finished": (folder / "final").is_dir()})
    return tuple(out)


def records(folder: Path) -> list[dict]:
    """Runs a sweep recorded (sweep.json) whose folders are gone: (label, lr, seed, metrics at
    the end). The previous study's grid is kept this way (docs/study/v1/sweeps/grid.json)."""
    path = folder / "sweep.json"
    if not path.exists():
        return []
    out = []
    for r in json.loads(path.read_text())["runs"]:
        if r.get("status") != "finished" or Path(r["folder"]).is_dir():
            continue
        g = r["grid"]
        out.append({"label": g["algo.name"], "lr": float(g["train.lr"]),
                    "seed": int(g.get("run.seed", 0)), "metrics": r["metrics"],
                    "folder": r["folder"]})
    return out


def reached_horizon(run: dict) -> bool:
    """Whether a run has a held-out KL by iteration 24 and got that far: a running or cut-short
    run's points would all sit at low KL."""
    return (last(run["rows"], KL, HORIZON) is not None
            and max(r["step"] for r in run["rows"]) >= HORIZON)


def last(rows: list[dict], key: str, upto: int | None = None) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None and (upto is None or r["step"] <= upto)]
    return vals[-1] if vals else None


def dpo_grid_points(root: Path) -> list[dict]:
    """DPO's grid, measured by `apactl eval` (its training has no sampled held-out answers):
    per run, the held-out proxy, gold and KL of its final policy (policies named dpo-lr<rate>
    in any of the study's evaluations)."""
    import yaml

    out, seen = [], set()
    for _, policies in eval_reports(root):
        for p in policies:
            if not p["name"].startswith("dpo-lr") or not p.get("run") or p["run"] in seen:
                continue
            seen.add(p["run"])
            r = yaml.safe_load((Path(p["run"]) / "recipe.yaml").read_text())
            out.append({"label": "dpo", "lr": float(r["train"]["lr"]), "seed": r["run"]["seed"],
                        "proxy": p["judges"]["proxy"]["mean"], "gold": p["judges"]["gold"]["mean"],
                        "kl": p["kl"]["k1_mean"], "run": p["run"]})
    return out


def grid_points(root: Path, config: str) -> list[dict]:
    """Seed-0 points of a configuration's learning-rate grid at its last held-out evaluation
    (iteration 24): lr, proxy, gold, KL, where from."""
    if config == "dpo":
        return sorted(dpo_grid_points(root), key=lambda p: p["lr"])
    folder = root / GRID_DIR[config]
    pts = {}
    for rec in records(folder):
        if rec["label"] == config and rec["seed"] == 0:
            m = rec["metrics"]
            pts[rec["lr"]] = {"lr": rec["lr"], "proxy": m.get(PROXY), "gold": m.get(GOLD),
                              "kl": m.get(KL), "source": "record"}
    # Runs of the grid, and a long run's first 24 iterations (its seed 0 at the chosen rate).
    for run in load_runs(root):
        if run["label"] != config or run["seed"] != 0 or run["kind"] == "dpo":
            continue
        in_grid = run["folder"].parent == folder
        if not in_grid and not run["folder"].parent.name.startswith("long-"):
            continue
        if not reached_horizon(run):
            continue
        if not in_grid and run["lr"] in pts:
            continue
        pts[run["lr"]] = {"lr": run["lr"], "proxy": last(run["rows"], PROXY, HORIZON),
                          "gold": last(run["rows"], GOLD, HORIZON),
                          "kl": last(run["rows"], KL, HORIZON), "source": str(run["folder"])}
    return [pts[k] for k in sorted(pts)]


def choose(points: list[dict]) -> tuple[float | None, str]:
    """The selection rule on one configuration's grid: (lr, why)."""
    pts = [p for p in points if p["proxy"] is not None and p["kl"] is not None]
    if not pts:
        return None, "no finished grid point"
    within = [p for p in pts if p["kl"] <= KL_BUDGET]
    if within:
        best = max(within, key=lambda p: p["proxy"])
        why = f"best proxy with held-out KL <= {KL_BUDGET:g}"
    else:
        best = min(pts, key=lambda p: p["kl"])
        why = f"no rate within KL {KL_BUDGET:g}: the smallest KL"
    lrs = sorted(p["lr"] for p in pts)
    if len(lrs) < 3 or best["lr"] in (lrs[0], lrs[-1]):
        why += "; NOT bracketed (at the edge of the grid: extend it)"
    return best["lr"], why


def best_lr(root: Path, config: str) -> float:
    lr, why = choose(grid_points(root, config))
    if lr is None:
        sys.exit(f"{config}: {why} under {root}")
    print(f"{config}: lr {lr:g} ({why})", file=sys.stderr)
    return lr


# -------------------------------------------------------------------- the compared policies
def chosen_runs(root: Path) -> dict[str, list[dict]]:
    """label -> the runs of its chosen configuration (every seed), each as {seed, rows (the
    first 24 iterations), policy (the path apactl eval scores), folder}. A long run stands for
    seed 0 when no 24-iteration seed-0 run exists: its checkpoint at 24 is that policy (the
    schedule is constant, so its first 24 iterations are the 24-iteration run's)."""
    runs = load_runs(root)
    lrs = {c: choose(grid_points(root, c))[0] for c in CONFIGS}
    out: dict[str, list[dict]] = {}
    runs = sorted(runs, key=lambda r: (CONFIGS.index(r["label"].split(" ")[0]), r["label"]))
    for run in runs:
        base = run["label"].split(" ")[0]
        if run["kind"] == "dpo" or lrs.get(base) != run["lr"]:
            continue
        long = run["folder"].parent.name.startswith("long-")
        view = {"seed": run["seed"], "folder": run["folder"], "long": long,
                "rows": [r for r in run["rows"] if r["step"] <= HORIZON]}
        if long:
            view["policy"] = checkpoint_policy(run["folder"], HORIZON)
        elif run["finished"]:
            view["policy"] = run["folder"] / "final" / "policy"
        else:
            continue
        out.setdefault(run["label"], []).append(view)
    for label, views in out.items():  # one view per seed: a 24-iteration run before a long one
        keep: dict[int, dict] = {}
        for v in sorted(views, key=lambda v: v["long"], reverse=True):
            keep[v["seed"]] = v
        out[label] = [keep[s] for s in sorted(keep)]
    dpo_lr = lrs["dpo"]
    dpo = [r for r in runs if r["kind"] == "dpo" and r["lr"] == dpo_lr and r["finished"]]
    if dpo:
        keep = {r["seed"]: r for r in dpo}
        # A DPO run's final/ is the model itself (an sft-style folder), not final/policy.
        out["dpo"] = [{"seed": s, "folder": keep[s]["folder"], "long": False, "rows": [],
                       "policy": keep[s]["folder"] / "final"} for s in sorted(keep)]
    return out


def checkpoint_policy(folder: Path, step: int) -> Path:
    """The policy of a run's checkpoint at ``step`` (its final policy at the last step when
    that checkpoint was folded into final/)."""
    path = folder / "checkpoints" / f"step-{step:08d}" / "policy"
    return path if path.is_dir() or step != 4 * HORIZON else folder / "final" / "policy"


def long_runs(root: Path) -> dict[str, dict]:
    return {r["label"]: r for r in load_runs(root)
            if r["folder"].parent.name.startswith("long-")}


def eval_name(label: str, seed: int) -> str:
    return f"{label.replace(' lam=', '-lam')}-s{seed}"


def eval_recipe(root: Path, part: str = "all", *labels: str) -> str:
    """`apactl eval` (into ``root/eval/<part>``) over the chosen configurations' policies (every
    seed) and the long runs' last checkpoints (``long-apa``...), all of them or the ``labels``
    named; or, with part ``dpo``, over DPO's grid (to choose its rate, into grid-dpo/eval).
    Against pi_init, with the proxy and the gold judge. Parts let two lanes evaluate side by
    side, and a later part (new seeds) leaves out what another part already scored; the report
    reads every part."""
    dpo_grid = [(f"dpo-lr{r['lr']:g}", r["folder"])
                for r in load_runs(root / "grid-dpo") if r["finished"]]
    if part == "dpo":
        policies, out = dpo_grid, root / "grid-dpo" / "eval"
    else:
        want = set(labels)
        policies = [(eval_name(label, v["seed"]), v["policy"])
                    for label, views in chosen_runs(root).items() for v in views
                    if not want or label in want]
        for label, run in long_runs(root).items():
            if want and f"long-{label}" not in want:
                continue
            step = 4 * HORIZON
            if checkpoint_policy(run["folder"], step).is_dir():
                policies.append((f"{eval_name(label, 0)}-long{step}",
                                 checkpoint_policy(run["folder"], step)))
        policies += dpo_grid if "dpo-grid" in want else []
        out = root / "eval" / part
        # (DPO's seed 0 at its chosen rate is a grid run that grid-dpo/eval scored.)
        done = scored_elsewhere(root, out)
        policies = [(name, path) for name, path in policies if Path(path) not in done]
    return "\n".join([
        "kind: eval", f"run: {{name: study-eval, output_dir: '{out}', seed: 1}}",
        "policies:", *(f"  - {{name: {name}, path: '{path}'}}" for name, path in policies),
        f"baseline: {{name: sft, path: '{root / 'sft'}'}}",
        "data: {source: 'builtin:prompts', eval_rows: 64, max_prompt_len: 96, max_len: 160, "
        "system: ''}",
        "judges:",
        f"  - {{name: reward-model, label: proxy, role: proxy, path: '{root / 'rm'}', "
        "normalize: true}",
        "  - {name: sentiment, label: gold, role: gold}",
        "generation: {max_new_tokens: 32, temperature: 0.7}",
        "eval: {samples_per_prompt: 1, bootstrap: 2000, batch_size: 32}", ""])


def scored_elsewhere(root: Path, out: Path) -> set[Path]:
    """The policies another evaluation (not the one writing into ``out``) scored: each as the
    path it was given (``run``: a run folder) and the one apactl eval resolved (``path``)."""
    return {Path(p[k]) for folder, policies in eval_reports(root) if folder != out
            for p in policies if not p.get("is_baseline") for k in ("run", "path") if p.get(k)}


# --------------------------------------------------------------------------------- statistics
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}


def mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def t_interval(xs: list[float]) -> dict:
    """Mean over seeds with a 95% t-interval (none for one seed)."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    m = mean(xs)
    if len(xs) < 2:
        return {"mean": m, "n": len(xs)}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    h = T975.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return {"mean": m, "ci_lo": m - h, "ci_hi": m + h, "n": len(xs)}


def fit_sqrt(pts: list[tuple[float, ...]], col: int) -> tuple[float, float]:
    """Least squares of column ``col`` on sqrt(KL): y = a + b * sqrt(KL). The square root of
    the KL is the natural distance for reward-vs-KL curves (Gao et al., 2023, scaling laws for
    reward model over-optimisation); two parameters keep the fit stable on few noisy points."""
    xs = [math.sqrt(max(p[0], 0.0)) for p in pts]
    ys = [p[col] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
    return my - b * mx, b


def frontier_points(root: Path, config: str) -> list[tuple[float, float, float, str]]:
    """Every held-out measurement (KL, gold, proxy, where) of a configuration at its default
    lambda within the first 24 iterations: every grid rate and seed at iterations 8/16/24 (the
    previous study's grid: its recorded last evaluation only), DPO's final policies (apactl
    eval). Rates reach different KLs, so together they trace the reward-KL frontier that the
    matched-KL comparison reads. The long runs' points past 24 are left out: every
    configuration is read over the same budget."""
    if config == "dpo":
        pts = [(p["kl"], p["gold"], p["proxy"], "dpo grid") for p in dpo_grid_points(root)]
        ev = final_eval(root)
        for p in ev.get("policies", []):
            if p["name"].startswith("dpo-s") and not p["name"].startswith("dpo-s0"):
                pts.append((p["kl"]["k1_mean"], p["judges"]["gold"]["mean"],
                            p["judges"]["proxy"]["mean"], p["name"]))
        return sorted(pts)
    runs = [r for r in load_runs(root) if r["label"] == config]
    made = {(r["lr"], r["seed"]) for r in runs}  # a record re-run here is counted once
    pts = [(r["metrics"][KL], r["metrics"][GOLD], r["metrics"][PROXY], "record")
           for r in records(root / GRID_DIR[config])
           if r["label"] == config and (r["lr"], r["seed"]) not in made]
    for run in runs:
        if not reached_horizon(run):
            continue
        where = f"{run['folder'].parent.name}/{run['folder'].name}@"
        pts += [(r[KL], r[GOLD], r[PROXY], f"{where}{r['step']}") for r in run["rows"]
                if r.get(KL) is not None and r.get(GOLD) is not None and r["step"] <= HORIZON]
    return sorted(pts)


def runs_of(pts: list[tuple]) -> list[list[tuple]]:
    """Frontier points grouped by the run they come from (a run's points at iterations 8/16/24
    are one policy's trajectory, not independent draws; a record or a DPO policy is its own)."""
    groups: dict[str, list[tuple]] = {}
    for i, p in enumerate(pts):
        key = p[3].rsplit("@", 1)[0] if "@" in p[3] else f"{p[3]}#{i}"
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def resample_runs(pts: list[tuple], rng: random.Random) -> list[tuple]:
    """One bootstrap draw of a configuration's frontier points: its runs drawn with
    replacement, each with all its points (a cluster bootstrap: the seed-to-seed and
    rate-to-rate spread is what the interval measures)."""
    groups = runs_of(pts)
    return [p for _ in groups for p in rng.choice(groups)]


def matched(root: Path, reps: int = 2000, seed: int = 0) -> dict:
    """Gold and proxy of each configuration at equal KLs from a + b*sqrt(KL) fitted to its
    frontier points; 95% intervals and the pairwise differences by bootstrapping its runs
    (``resample_runs``; each configuration resampled independently)."""
    rng = random.Random(seed)
    pts = {c: frontier_points(root, c) for c in CONFIGS}
    pts = {c: p for c, p in pts.items() if len(p) >= 3}

    def refit(p: list) -> tuple[float, ...]:
        draw = resample_runs(p, rng)  # one resample, both columns
        return fit_sqrt(draw, 1) + fit_sqrt(draw, 2)

    # Intervals need enough runs: a resample of 3 runs is one run repeated in 1 draw of 9.
    boot = {c: [refit(p) for _ in range(reps)] if len(runs_of(p)) >= MIN_RUNS else []
            for c, p in pts.items()}

    def at(ab: tuple[float, ...], kl: float, col: int) -> float:
        return ab[2 * (col - 1)] + ab[2 * (col - 1) + 1] * math.sqrt(kl)

    def ci(vals: list[float]) -> list[float]:
        vals = sorted(vals)
        return [vals[int(0.025 * len(vals))], vals[int(0.975 * len(vals)) - 1]] if vals else []

    out: dict = {"configs": {}, "pairs": {}}
    for c, p in pts.items():
        fit = fit_sqrt(p, 1) + fit_sqrt(p, 2)
        out["configs"][c] = {
            "points": len(p), "runs": len(runs_of(p)), "kl_range": [p[0][0], p[-1][0]], "fit": fit,
            **{f"{kl:g}": {name: {"value": at(fit, kl, col),
                                  "ci": ci([at(f, kl, col) for f in boot[c]])}
                           for name, col in (("gold", 1), ("proxy", 2))} for kl in MATCHED_KL}}
    names = list(pts)
    for i, one in enumerate(names):
        for other in names[i + 1:]:
            out["pairs"][f"{one} - {other}"] = {f"{kl:g}": {name: {
                "value": at(out["configs"][one]["fit"], kl, col)
                - at(out["configs"][other]["fit"], kl, col),
                "ci": ci([at(f, kl, col) - at(g, kl, col)
                          for f, g in zip(boot[one], boot[other])])}
                for name, col in (("gold", 1), ("proxy", 2))} for kl in MATCHED_KL}
    # A configuration with too few points for a curve of its own (DPO: one point per rate)
    # is read point by point against the others' curves at the point's own KL.
    out["points_vs_curves"] = {c: [{
        "kl": p[0], "gold": p[1], "proxy": p[2], "from": p[3],
        "vs": {o: {name: {"value": p[col] - at(out["configs"][o]["fit"], p[0], col),
                          "ci": ci([p[col] - at(f, p[0], col) for f in boot[o]])}
                   for name, col in (("gold", 1), ("proxy", 2))}
               for o in names if o != c and boot[o]}} for p in pts[c]]
        for c in names if not boot[c]}
    return out


# ------------------------------------------------------------------------------- final eval
@functools.cache
def eval_reports(root: Path) -> tuple[tuple[Path, list[dict]], ...]:
    """Every `apactl eval` report of the study (the parts under eval/, and DPO's grid) as
    (folder, its policies); read once per process, callers must not modify them."""
    paths = sorted((root / "eval").glob("**/report.json")) + \
        sorted((root / "grid-dpo" / "eval").glob("report.json"))
    return tuple((p.parent, json.loads(p.read_text())["policies"]) for p in paths)


def final_eval(root: Path) -> dict:
    """The policies of every evaluation (the baseline once), named as the study names them: a
    DPO grid policy at the chosen rate is dpo-s0, the others dpo-lr<rate>."""
    lr = choose(grid_points(root, "dpo"))[0]
    policies, seen = [], set()
    for folder, report in eval_reports(root):
        for p in report:
            p = dict(p, report=str(folder))
            if p["name"].startswith("dpo-lr") and float(p["name"][6:]) == lr:
                p["name"] = "dpo-s0"
            key = "baseline" if p.get("is_baseline") else p["name"]
            if key in seen:  # pi_init is in every part
                continue
            seen.add(key)
            policies.append(p)
    return {"policies": policies} if policies else {}


def eval_by_config(root: Path) -> dict[str, dict]:
    """label -> mean over seeds [95% t-interval] of the final evaluation's figures per policy
    (seeds at the chosen configuration; the long runs' later checkpoints apart)."""
    ev = final_eval(root)
    groups: dict[str, list[dict]] = {}
    for p in ev.get("policies", []):
        if p.get("is_baseline"):
            continue
        name = p["name"]
        label = name.rsplit("-s", 1)[0] if "-long" not in name else name
        groups.setdefault(label, []).append(p)
    out = {}
    for label, ps in groups.items():
        out[label] = {
            "seeds": len(ps),
            "proxy": t_interval([p["judges"]["proxy"]["mean"] for p in ps]),
            "gold": t_interval([p["judges"]["gold"]["mean"] for p in ps]),
            "gold_diff": t_interval([p["judges"]["gold"]["diff_vs_baseline"]["mean"]
                                     for p in ps]),
            "kl_k1": t_interval([p["kl"]["k1_mean"] for p in ps]),
            "kl_k3": t_interval([p["kl"]["k3_mean"] for p in ps]),
            "entropy": t_interval([p["entropy"] for p in ps]),
            "length": t_interval([p["length_mean"] for p in ps]),
            "eos_rate": t_interval([p["eos_rate"] for p in ps]),
            "distinct_2": t_interval([p["distinct_2"] for p in ps])}
    baseline = next((p for p in ev.get("policies", []) if p.get("is_baseline")), None)
    if baseline:
        out["pi_init (sft)"] = {
            "seeds": 1, "proxy": {"mean": baseline["judges"]["proxy"]["mean"]},
            "gold": {"mean": baseline["judges"]["gold"]["mean"]}, "gold_diff": {"mean": 0.0},
            "kl_k1": {"mean": 0.0}, "kl_k3": {"mean": 0.0},
            "entropy": {"mean": baseline["entropy"]}, "length": {"mean": baseline["length_mean"]},
            "eos_rate": {"mean": baseline["eos_rate"]},
            "distinct_2": {"mean": baseline["distinct_2"]}}
    return out


def text_at_matched_kl(root: Path) -> dict:
    """Distinct-2, entropy, length and gold of each configuration's final-evaluation policies
    fitted on sqrt(KL) (y = a + b sqrt(KL)) and read at the matched KLs: which algorithm
    degrades the text least at equal KL. Few points per configuration (its seeds and the long
    runs' checkpoints), so these are descriptive, without intervals."""
    ev = final_eval(root)
    pts: dict[str, list[tuple[float, ...]]] = {}
    for p in ev.get("policies", []):
        if p.get("is_baseline"):
            continue
        label = "dpo" if p["name"].startswith("dpo-") else p["name"].rsplit("-s", 1)[0]
        pts.setdefault(label, []).append((p["kl"]["k1_mean"], p["distinct_2"], p["entropy"],
                                          p["length_mean"], p["judges"]["gold"]["mean"]))
    out = {}
    for label, p in pts.items():
        if len(p) < 2 or max(x[0] for x in p) - min(x[0] for x in p) < 1.0:
            out[label] = {"points": len(p), "kl": [x[0] for x in p], "distinct_2":
                          [x[1] for x in p], "entropy": [x[2] for x in p]}
            continue
        fits = {name: fit_sqrt(p, col) for name, col in
                (("distinct_2", 1), ("entropy", 2), ("length", 3), ("gold", 4))}
        out[label] = {"points": len(p), "kl_range": [min(x[0] for x in p), max(x[0] for x in p)],
                      **{f"{kl:g}": {n: a + b * math.sqrt(kl) for n, (a, b) in fits.items()}
                         for kl in MATCHED_KL}}
    return out


# ----------------------------------------------------------------------------------- figures
def palette(labels) -> dict[str, str]:
    order = list(CONFIGS) + sorted(x for x in labels if x not in CONFIGS)
    return {label: f"C{i % 10}" for i, label in enumerate(order)}


def curves(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float],
                                                list[float]]:
    """(steps, mean, min, max) over ``runs`` (each {"rows": ...}) of metric ``key`` per step."""
    steps = sorted({r["step"] for run in runs for r in run["rows"] if r.get(key) is not None})
    vals = [[next((r[key] for r in run["rows"] if r["step"] == s and r.get(key) is not None),
                  None) for run in runs] for s in steps]
    return (steps, [mean(v) for v in vals], [min(x for x in v if x is not None) for v in vals],
            [max(x for x in v if x is not None) for v in vals])


def plot_curves(gs: dict[str, list[dict]], path: Path, title: str = "") -> None:
    """Training curves per configuration: mean over seeds, the band the seeds span."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("reward/score_mean", "proxy reward (normalised RM score), training batch"),
              (GOLD, "gold reward on held-out prompts (VADER)"),
              ("kl/ref_k1", "KL to pi_init (k1, nats per answer), training batch"),
              ("policy/entropy", "entropy (nats per token), training batch")]
    fig = Figure(figsize=(11, 7.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    colors = palette(gs)
    for ax, (key, name) in zip(axes, panels):
        for label, group in gs.items():
            steps, m, lo, hi = curves(group, key)
            if steps:
                ax.fill_between(steps, lo, hi, color=colors[label], alpha=0.15, lw=0)
                ax.plot(steps, m, "-o", ms=2, color=colors[label],
                        label=f"{label} ({len(group)} seed{'s' if len(group) > 1 else ''})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4,
               fontsize=8)
    fig.savefig(path)


def plot_frontier(root: Path, m: dict, path: Path) -> None:
    """Gold and proxy reward against held-out KL: every measurement of each configuration
    (points) and its fitted curve a + b sqrt(KL) (lines) over the KL range it covers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colors = palette(CONFIGS)
    for ax, (col, name) in zip(axes, ((1, "gold (VADER)"), (2, "proxy (RM)"))):
        for c in CONFIGS:
            pts = frontier_points(root, c)
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[col] for p in pts], s=12, marker="x",
                       color=colors[c], alpha=0.5)
            if c in m["configs"]:
                a, b = m["configs"][c]["fit"][2 * (col - 1):2 * col]
                lo, hi = m["configs"][c]["kl_range"]
                xs = [lo + (hi - lo) * i / 50 for i in range(51)]
                ax.plot(xs, [a + b * math.sqrt(max(x, 0)) for x in xs], "-", color=colors[c],
                        label=f"{c} ({len(pts)} points)")
        for kl in MATCHED_KL:
            ax.axvline(kl, color="grey", lw=0.5, ls=":")
        ax.set_xlabel("KL to pi_init on held-out prompts (k1, nats per answer)")
        ax.set_ylabel(f"{name} reward")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(f"{name} vs KL: every held-out measurement (x), fit a + b sqrt(KL)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.savefig(path)


# ------------------------------------------------------------------------------------ report
def fmt(x, spec=".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else \
        format(x, spec)


def interval(d: dict, spec=".3f") -> str:
    if "ci_lo" not in d:
        return fmt(d["mean"], spec)
    return f"{fmt(d['mean'], spec)} [{fmt(d['ci_lo'], spec)}, {fmt(d['ci_hi'], spec)}]"


def cell(d: dict) -> str:
    return f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d["ci"] else \
        f"{d['value']:+.3f}"


def samples(root: Path, names: list[str], prompts: int = 3) -> list[str]:
    """Answers of the named policies to the same held-out prompts (eval's samples.jsonl)."""
    rows = [json.loads(ln) for path in sorted((root / "eval").glob("**/samples.jsonl"))
            for ln in path.read_text().splitlines() if ln.strip()]
    if not rows:
        return []
    out = []
    for i in sorted({r["prompt_index"] for r in rows})[:prompts]:
        first = next(r for r in rows if r["prompt_index"] == i)
        out += [f"**Prompt:** {first['prompt'][-1]['content']}", ""]
        for name in names:
            for r in rows:
                if r["prompt_index"] == i and r["sample"] == 0 and r["policy"] == name:
                    text = r["response"].replace("\n", " ").replace("|", "/")
                    out.append(f"- *{name}* (gold {r['scores'].get('gold', 0):+.2f}): {text}")
        out.append("")
    return out


def report(root: Path, docs: Path) -> None:
    res: dict = {"kl_budget": KL_BUDGET, "grids": {}, "chosen": {}}
    md = ["# Study results (generated by docs/study/analyze.py)", ""]
    rm = [json.loads(ln) for ln in (root / "rm" / "metrics.jsonl").read_text().splitlines()]
    res["rm_heldout"] = {k: v for k, v in rm[-1].items() if k.startswith("eval/")}
    md += [f"Proxy reward model, held-out pairs: accuracy "
           f"{res['rm_heldout']['eval/accuracy']:.3f} on {int(res['rm_heldout']['eval/pairs'])} "
           "pairs.", "",
           f"## Learning-rate selection (seed 0, last held-out evaluation; rule: best proxy with "
           f"KL <= {KL_BUDGET:g})", "",
           "| configuration | lr | proxy | gold | KL k1 | from | chosen |",
           "|---|---|---|---|---|---|---|"]
    for c in CONFIGS:
        pts = grid_points(root, c)
        lr, why = choose(pts)
        res["grids"][c], res["chosen"][c] = pts, {"lr": lr, "why": why}
        for p in pts:
            src = ("previous study's record" if p.get("source") == "record" else
                   "apactl eval" if c == "dpo" else
                   "long run, iteration 24" if "long-" in str(p.get("source")) else "grid run")
            md.append(f"| {c} | {p['lr']:g} | {fmt(p['proxy'])} | {fmt(p['gold'])} | "
                      f"{fmt(p['kl'], '.2f')} | {src} | {'yes' if p['lr'] == lr else ''} |")
    md += ["", "Chosen: " + "; ".join(f"{c} {v['lr']:g} ({v['why']})"
                                      for c, v in res["chosen"].items() if v["lr"]), ""]
    gs = chosen_runs(root)
    res["seeds"] = {label: [v["seed"] for v in views] for label, views in gs.items()}
    online = {k: v for k, v in gs.items() if k != "dpo"}
    if online:
        plot_curves(online, docs / "training_curves.png",
                    "chosen configurations, first 24 iterations (mean over seeds, band: seeds)")
    longs = long_runs(root)
    if longs:
        plot_curves({k: [{"rows": v["rows"]}] for k, v in longs.items()},
                    docs / "long_horizon.png", "long runs (seed 0, 96 iterations)")

    ev = eval_by_config(root)
    res["eval"] = ev
    if ev:
        md += ["## Final policies (apactl eval: 64 held-out prompts, one answer each; mean over "
               "seeds [95% t-interval])", "",
               "| policy | seeds | proxy | gold | gold diff vs pi_init | KL k1 | KL k3 | entropy "
               "| tokens | EOS rate | distinct-2 |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, c in ev.items():
            md.append(f"| {label} | {c['seeds']} | {interval(c['proxy'])} | "
                      f"{interval(c['gold'])} | {interval(c['gold_diff'], '+.3f')} | "
                      f"{interval(c['kl_k1'], '.2f')} | {interval(c['kl_k3'], '.2f')} | "
                      f"{interval(c['entropy'])} | {interval(c['length'], '.1f')} | "
                      f"{interval(c['eos_rate'], '.2f')} | {interval(c['distinct_2'])} |")
        md.append("")

    md += ["## Held-out curves of the chosen configurations (32 prompts; mean over seeds)", "",
           "| configuration | seeds | eval at | proxy | gold | KL k1 |",
           "|---|---|---|---|---|---|"]
    res["curves"] = {}
    for label, views in online.items():
        steps, proxy, _, _ = curves(views, PROXY)
        _, gold, _, _ = curves(views, GOLD)
        _, kl, _, _ = curves(views, KL)
        res["curves"][label] = {"steps": steps, "proxy": proxy, "gold": gold, "kl": kl,
                                "seeds": [v["seed"] for v in views]}
        for k, step in enumerate(steps):
            md.append(f"| {label} | {len(views)} | {step} | {fmt(proxy[k])} | {fmt(gold[k])} | "
                      f"{fmt(kl[k], '.2f')} |")

    if longs:
        md += ["", "## Long horizon (seed 0, 96 iterations; held-out every 8 iterations)", "",
               "| configuration | eval at | proxy | gold | KL k1 | training-batch KL (last 8) | "
               "entropy (last 8) |", "|---|---|---|---|---|---|---|"]
        res["long"] = {}
        for label, run in longs.items():
            rows = run["rows"]
            evs = [r for r in rows if r.get(GOLD) is not None]
            res["long"][label] = {"steps": [r["step"] for r in evs],
                                  "proxy": [r[PROXY] for r in evs],
                                  "gold": [r[GOLD] for r in evs], "kl": [r[KL] for r in evs]}
            for r in evs:
                window = [x for x in rows if r["step"] - 8 < x["step"] <= r["step"]]
                md.append(f"| {label} | {r['step']} | {fmt(r[PROXY])} | {fmt(r[GOLD])} | "
                          f"{fmt(r[KL], '.2f')} | "
                          f"{fmt(mean([x.get('kl/ref_k1') for x in window]), '.2f')} | "
                          f"{fmt(mean([x.get('policy/entropy') for x in window]))} |")

    res["matched"] = m = matched(root)
    plot_frontier(root, m, docs / "frontier.png")
    md += ["", "## Matched KL", "",
           "Every held-out measurement of a configuration within 24 iterations (all its grid "
           "rates and seeds; DPO: apactl eval of its policies), fitted by y = a + b sqrt(KL); 95% "
           "intervals by resampling the runs, each with all its points (2000 bootstrap draws; "
           f"none for fewer than {MIN_RUNS} runs). A value outside a "
           "configuration's KL range is an extrapolation.", "",
           "| | points / runs (KL range) | " + " | ".join(f"gold @ KL {k:g}" for k in MATCHED_KL)
           + " | " + " | ".join(f"proxy @ KL {k:g}" for k in MATCHED_KL) + " |",
           "|---|---|" + "---|" * (2 * len(MATCHED_KL))]
    for key, row in m["configs"].items():
        md.append(f"| {key} | {row['points']} / {row['runs']} "
                  f"({row['kl_range'][0]:.2f}-{row['kl_range'][1]:.1f})"
                  " | " + " | ".join(cell(row[f"{k:g}"]["gold"]) for k in MATCHED_KL) + " | "
                  + " | ".join(cell(row[f"{k:g}"]["proxy"]) for k in MATCHED_KL) + " |")
    md += ["", "Pairwise differences (first minus second), gold then proxy:", "",
           "| pair | " + " | ".join(f"gold @ KL {k:g}" for k in MATCHED_KL) + " | "
           + " | ".join(f"proxy @ KL {k:g}" for k in MATCHED_KL) + " |",
           "|---|" + "---|" * (2 * len(MATCHED_KL))]
    for key, row in m["pairs"].items():
        md.append(f"| {key} | " + " | ".join(cell(row[f"{k:g}"]["gold"]) for k in MATCHED_KL)
                  + " | " + " | ".join(cell(row[f"{k:g}"]["proxy"]) for k in MATCHED_KL) + " |")

    for c, rows in m["points_vs_curves"].items():
        others = sorted({o for r in rows for o in r["vs"]}, key=CONFIGS.index)
        md += ["", f"{c}: too few points for a curve of its own; each of its points against the "
               "others' curves at the point's KL (point minus curve, gold):", "",
               "| point | KL | gold | proxy | " + " | ".join(others) + " |",
               "|---|---|---|---|" + "---|" * len(others)]
        md += [f"| {r['from']} | {r['kl']:.2f} | {r['gold']:.3f} | {r['proxy']:.3f} | "
               + " | ".join(cell(r["vs"][o]["gold"]) for o in others) + " |" for r in rows]

    res["text_at_matched_kl"] = t = text_at_matched_kl(root)
    if t:
        md += ["", "## Text at matched KL (final-evaluation policies, fit on sqrt(KL))", "",
               "| policy | points (KL range) | " + " | ".join(
                   f"distinct-2 / entropy / gold @ KL {k:g}" for k in MATCHED_KL) + " |",
               "|---|---|" + "---|" * len(MATCHED_KL)]
        for label, row in t.items():
            if "kl_range" not in row:
                continue
            md.append(f"| {label} | {row['points']} ({row['kl_range'][0]:.1f}-"
                      f"{row['kl_range'][1]:.1f}) | " + " | ".join(
                          f"{row[f'{k:g}']['distinct_2']:.3f} / {row[f'{k:g}']['entropy']:.3f} / "
                          f"{row[f'{k:g}']['gold']:.3f}" for k in MATCHED_KL) + " |")

    cost: dict = {}
    for run in load_runs(root):
        if run["kind"] == "dpo":
            continue
        t_it = [r["time/iteration"] for r in run["rows"] if r.get("time/iteration")]
        c = cost.setdefault(run["label"].split(" ")[0], {"iterations": 0, "seconds": 0.0})
        c["iterations"] += len(t_it)
        c["seconds"] += sum(t_it)
    for c in cost.values():
        c["s_per_iteration"] = c["seconds"] / max(c["iterations"], 1)
    res["cost"] = cost
    md += ["", "## Cost (time/iteration of every run, summed)", "",
           "| configuration | iterations | hours | s per iteration |", "|---|---|---|---|"]
    md += [f"| {k} | {v['iterations']} | {v['seconds'] / 3600:.2f} | {v['s_per_iteration']:.1f} |"
           for k, v in cost.items()]
    names = [eval_name(label, 0) for label in gs]
    if ev:
        md += ["", "## Samples (seed 0 of each configuration, first answer)", "",
               *samples(root, ["sft", *names])]
    (docs / "results.md").write_text("\n".join(md) + "\n")
    (docs / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print("\n".join(md))


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "best-lr":
        print(best_lr(Path(args[0]), args[1]))
    elif cmd == "eval-recipe":
        print(eval_recipe(Path(args[0]), *args[1:]))
    elif cmd == "report":
        report(Path(args[0]), Path(args[1]))
    else:
        sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
