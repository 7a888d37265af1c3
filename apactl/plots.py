"""PNG plots for ``apactl eval``: the reward/KL frontier and training curves of policy runs.

Figures are built on matplotlib's object API with the Agg canvas, never through pyplot: no GUI
backend is touched and no global figure state leaks between calls (or into a user's notebook).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

# metrics.jsonl key -> (panel title, y-axis label with the unit, the smallest y span shown).
# The span floor keeps a flat curve flat: autoscaling would stretch noise of 0.3 tokens or
# 0.01 nats over the whole panel. The reward's label depends on the runs (_reward_label).
CURVES = {
    "reward/score_mean": ("reward", "judge score", 0.1),
    "kl/ref_k1": ("KL to reference (k1)", "nats per response", 0.1),
    "policy/entropy": ("entropy", "nats per token", 0.1),
    "response/length_mean": ("response length", "tokens", 2.0),
}
# On two lines: one line is taller than the panel.
NORMALISED = "judge score\n(normalised by the RM's mean/std)"
MIN_SPAN_FRACTION = 0.1  # of the mean |value|: a y axis spans at least 10% of it


def _figure(n_panels: int, ncols: int, size: tuple[float, float] = (5.0, 4.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _in_step_order(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(points, key=lambda p: math.inf if p["step"] is None else p["step"])


def _frontier_panel(ax, policies: list[dict[str, Any]], judge: str, colors) -> None:
    """One judge: mean score (CI bars) against KL k1 (SE bars); a run's points joined by step."""
    base = next(p for p in policies if p["is_baseline"])
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in policies:
        if not p["is_baseline"]:
            groups.setdefault(p["group"], []).append(p)

    def xy(p):
        j = p["judges"][judge]
        yerr = [[j["mean"] - j["ci_lo"]], [j["ci_hi"] - j["mean"]]]
        se = p["kl"]["k1_se"]
        return p["kl"]["k1_mean"], j["mean"], (se if math.isfinite(se) else 0.0), yerr

    x, y, xe, ye = xy(base)
    ax.errorbar([x], [y], xerr=[xe], yerr=ye, fmt="*", ms=14, color="black", capsize=3,
                label=f"{base['name']} (baseline)")
    for color, (group, pts) in zip(colors, groups.items()):
        pts = _in_step_order(pts)
        # A run that started from the baseline starts its line at the baseline's point.
        line = ([base] if pts[0].get("init_is_baseline") else []) + pts
        ax.plot([xy(p)[0] for p in line], [xy(p)[1] for p in line], "-", color=color, alpha=0.6)
        for p in pts:
            x, y, xe, ye = xy(p)
            ax.errorbar([x], [y], xerr=[xe], yerr=ye, fmt="o", color=color, capsize=3, ms=5)
            tag = p["name"][len(group):] or p["name"]  # "@step" for a checkpoint
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=color)
        ax.plot([], [], "o-", color=color, label=group)
    ax.axvline(0, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("KL(policy || baseline), k1 nats per response")
    ax.set_ylabel(f"{judge} mean score")
    ax.set_title(f"{judge}: score vs KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def frontier_plot(policies: list[dict[str, Any]], judges: list[str], path: str | Path) -> Path:
    """``frontier.png``: per judge, each policy's mean score against its KL to the reference.

    ``policies`` are report.json entries (name, group, step, is_baseline, init_is_baseline,
    kl.k1_mean/k1_se, judges[judge].mean/ci_lo/ci_hi); exactly one has is_baseline.
    """
    from matplotlib import colormaps

    fig, axes = _figure(len(judges), min(len(judges), 3))
    colors = [colormaps["tab10"](i % 10) for i in range(len(policies))]
    for ax, judge in zip(axes, judges):
        _frontier_panel(ax, policies, judge, colors)
    fig.savefig(path)
    return Path(path)


def _config_points(policies: list[dict[str, Any]], config: str, judge: str):
    """[(step, mean KL, mean score, min score, max score)] over the seeds of ``config``."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for p in policies:
        if p.get("config") == config and p["step"] is not None:
            by_step.setdefault(p["step"], []).append(p)
    out = []
    for step in sorted(by_step):
        ys = [p["judges"][judge]["mean"] for p in by_step[step]]
        xs = [p["kl"]["k1_mean"] for p in by_step[step]]
        out.append((step, sum(xs) / len(xs), sum(ys) / len(ys), min(ys), max(ys)))
    return out


def frontier_configs_plot(policies: list[dict[str, Any]], judges: list[str],
                          path: str | Path) -> Path:
    """``frontier_configs.png``: per judge, one curve per configuration (runs that differ only
    in their seed): the mean over seeds of score against KL at each checkpoint, the band the
    seeds' scores span; the baseline as a star at its own KL (0)."""
    from matplotlib import colormaps

    configs = list(dict.fromkeys(p["config"] for p in policies if p.get("config")))
    base = next(p for p in policies if p["is_baseline"])
    fig, axes = _figure(len(judges), min(len(judges), 2), size=(6.0, 4.5))
    for ax, judge in zip(axes, judges):
        ax.plot([base["kl"]["k1_mean"]], [base["judges"][judge]["mean"]], "*", ms=14,
                color="black", label=f"{base['name']} (baseline)")
        for i, config in enumerate(configs):
            pts = _config_points(policies, config, judge)
            if not pts:
                continue
            color = colormaps["tab10"](i % 10)
            _, x, y, lo, hi = zip(*pts)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
            ax.plot(x, y, "o-", color=color, ms=4, label=config)
        ax.set_xlabel("KL(policy || baseline), k1 nats per response")
        ax.set_ylabel(f"{judge} mean score (band: range over seeds)")
        ax.set_title(f"{judge}: score vs KL per configuration")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7,
               ncols=min(len(configs) + 1, 3))
    fig.savefig(path)
    return Path(path)


def training_curves_plot(runs: dict[str, list[dict[str, Any]]], path: str | Path,
                         normalized: Collection[str] = ()) -> Path | None:
    """``training_curves.png``: reward, KL, entropy and length per iteration of each run.

    ``runs`` maps a run's name to its metrics.jsonl rows; ``normalized``: the runs whose reward
    is a reward model's score normalised by its mean/std. Returns None (and writes nothing)
    when no run logged any of the ``CURVES`` keys.
    """
    fig = training_curves_figure(runs, normalized)
    if fig is None:
        return None
    fig.savefig(path)
    return Path(path)


def training_curves_figure(runs: dict[str, list[dict[str, Any]]],
                           normalized: Collection[str] = ()):
    """The Figure of ``training_curves_plot`` (2 x 2 panels, one legend for the figure), or
    None when no run logged a ``CURVES`` key."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    runs = {k: v for k, v in runs.items() if any(key in r for r in v for key in CURVES)}
    if not runs:
        return None
    fig, axes = _figure(len(CURVES), 2, size=(5.0, 3.4))
    for i, (name, rows) in enumerate(runs.items()):
        color = colormaps["tab10"](i % 10)
        for ax, key in zip(axes, CURVES):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                marker = "o" if len(pts) <= 30 else None  # a few points: show where they are
                ax.plot(*zip(*pts), "-", marker=marker, ms=3, color=color, label=name, lw=1.2)
    labels = {**{k: v[1] for k, v in CURVES.items()},
              "reward/score_mean": _reward_label(list(runs), normalized)}
    for ax, (key, (title, _, floor)) in zip(axes, CURVES.items()):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_ylabel(labels[key])
        ax.grid(alpha=0.3)
        _widen(ax, floor)
    handles = {}  # one entry per run, from whichever panel drew it
    for ax in axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=8,
               ncols=min(len(handles), 4))
    return fig


def _reward_label(names: list[str], normalized: Collection[str]) -> str:
    done = [n for n in names if n in normalized]
    if not done:
        return "judge score"
    if len(done) == len(names):
        return NORMALISED
    return f"judge score\n(normalised by the RM's mean/std: {', '.join(done)})"


def _widen(ax, floor: float) -> None:
    """Give the y axis at least ``max(floor, MIN_SPAN_FRACTION * mean |y|)``, centred on the
    data, so that noise around a flat line is drawn as small as it is."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if not ys:
        return
    need = max(floor, MIN_SPAN_FRACTION * sum(abs(y) for y in ys) / len(ys))
    lo, hi = ax.get_ylim()
    if hi - lo < need:
        mid = (min(ys) + max(ys)) / 2
        ax.set_ylim(mid - need / 2, mid + need / 2)
