"""``apactl eval``'s report: the JSON-safe report, report.md's table and the console table."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

from apactl.metrics import NARROW, console


def finite(obj: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _label(p: dict[str, Any]) -> str:
    return p["name"] + ("" if not p["is_baseline"] or "baseline" in p["name"] else " (baseline)")


def _judge_cells(p: dict[str, Any], key: str) -> tuple[str, str]:
    """("mean [lo, hi]", "win% [lo, hi] (ties%)") of one judge; no win rate for the baseline."""
    j = p["judges"][key]
    w = j["win_vs_baseline"]
    mean = f"{_num(j['mean'])} [{_num(j['ci_lo'])}, {_num(j['ci_hi'])}]"
    if p["is_baseline"]:
        return mean, "—"
    return mean, f"{w['win_rate']:.0%} [{w['ci_lo']:.0%}, {w['ci_hi']:.0%}] ({w['tie_rate']:.0%})"


def _diff_cell(p: dict[str, Any], key: str) -> str:
    """Paired difference to the baseline; "~0" marks an interval that includes zero (the data
    cannot tell the two apart)."""
    d = p["judges"][key].get("diff_vs_baseline")
    if p["is_baseline"] or d is None:
        return "—"
    cell = f"{_num(d['mean'], '+.3g')} [{_num(d['ci_lo'], '+.3g')}, {_num(d['ci_hi'], '+.3g')}]"
    return cell + (" ~0" if d["includes_zero"] else "")


def _kl_cell(p: dict[str, Any], k: str) -> str:
    return f"{_num(p['kl'][f'{k}_mean'])} ± {_num(p['kl'][f'{k}_se'], '.2g')}"


ROLES = {"proxy": "proxy: the reward the policies were trained on",
         "gold": "gold: the labeller the proxy learned from",
         "held-out": "held-out: neither trained on nor labelled with"}


def _judge_role(j: dict[str, Any]) -> str:
    key = j.get("label") or j["name"]
    return f"{key} ({ROLES[j['role']]})" if j.get("role") else key


def _cells3(p: dict[str, Any], key: str) -> tuple[str, str, str]:
    mean, win = _judge_cells(p, key)
    return mean, _diff_cell(p, key), win


def _interval(x: dict[str, float], fmt: str = ".3g") -> str:
    if x["ci_lo"] is None or not math.isfinite(x["ci_lo"]):
        return _num(x["mean"], fmt)
    return f"{_num(x['mean'], fmt)} [{_num(x['ci_lo'], fmt)}, {_num(x['ci_hi'], fmt)}]"


def config_lines(report: dict[str, Any]) -> list[str]:
    """report.md's "across seeds" table: one row per configuration with >= 2 seeds."""
    configs = [c for c in report.get("configurations", []) if c["n_seeds"] > 1]
    if not configs:
        return []
    keys = report["settings"]["judges"]
    ci = f"{round(report['settings']['confidence'] * 100)}% CI over seeds"
    headers = ["configuration", "seeds"] + [f"{k} mean [{ci}]" for k in keys] + [
        f"{k} diff vs baseline" for k in keys] + ["KL k1", "KL k3", "entropy", "tokens",
                                                  "distinct-2"]
    rows = [[c["config"], ", ".join(str(s) for s in c["seeds"])]
            + [_interval(c["judges"][k]) for k in keys]
            + [_interval(c["diff_vs_baseline"][k], "+.3g") for k in keys]
            + [_interval(c[k]) for k in ("kl_k1", "kl_k3", "entropy", "length_mean",
                                         "distinct_2")] for c in configs]
    return ["## Across seeds", "",
            "Mean over the seeds of each run's figure, with a Student-t interval (n - 1 degrees "
            "of freedom): what another seed would likely give. The per-prompt intervals above "
            "say how precisely one run was measured.", "",
            "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of report.md's table: one row per policy, the baseline first."""
    keys = report["settings"]["judges"]
    ci = f"{round(report['settings']['confidence'] * 100)}% CI"
    headers = ["policy"]
    for k in keys:
        headers += [f"{k} mean [{ci}]", f"{k} diff vs baseline [{ci}]",
                    f"{k} win vs baseline [{ci}] (ties)"]
    headers += ["KL k1 ± se", "KL k3 ± se", "entropy", "tokens", "distinct-1", "distinct-2"]
    rows = []
    for p in report["policies"]:
        row = [_label(p)] + [c for k in keys for c in _cells3(p, k)]
        row += [_kl_cell(p, "k1"), _kl_cell(p, "k3"), _num(p["entropy"]),
                _num(p["length_mean"], ".1f"), _num(p["distinct_1"], ".3f"),
                _num(p["distinct_2"], ".3f")]
        rows.append(row)
    return headers, rows


def render_markdown(report: dict[str, Any]) -> str:
    s, g = report["settings"], report["settings"]["generation"]
    headers, rows = table_rows(report)
    lines = [
        f"# apactl eval: {s['run_name']}", "",
        f"- prompts: {s['n_prompts']} from `{s['data']}`, {s['samples_per_prompt']} sample(s) "
        f"each; every policy uses sampling seed {s['seed']}",
        f"- baseline and KL reference: **{s['baseline']}** (`{s['baseline_ref']}`)",
        "- judges: " + ", ".join(_judge_role(j) for j in s.get("judge_specs", [])),
        f"- sampling: temperature {g['temperature']}, top_k {g['top_k']}, top_p {g['top_p']}, "
        f"max_new_tokens {g['max_new_tokens']}",
        f"- intervals: percentile bootstrap over prompts ({s['bootstrap']} resamples); win rate "
        "= wins / pairs with the baseline's sample on the same prompt and sample index, ties "
        "counted apart; KL in nats per response ± standard error; entropy in nats per token; "
        "tokens = mean response length in tokens", "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(r) + " |" for r in rows), "",
        "\"~0\" marks a difference whose interval includes zero: at this sample size the data "
        "cannot tell that policy from the baseline on that judge.", "",
        *config_lines(report),
    ]
    plots = [f for f in ("frontier.png", "frontier_configs.png", "training_curves.png")
             if f in report["files"]]
    if plots:
        lines += ["Plots: " + ", ".join(f"[{f}]({f})" for f in plots), ""]
    return "\n".join(lines)


def print_table(report: dict[str, Any], out: Console | None = None) -> None:
    """The console summary on ``out`` (default: ``console``): a table whose judge cells hold
    the mean and the win rate on two lines; one block per policy instead when the terminal is
    narrower than ``NARROW`` columns or the table would not fit in it."""
    from rich.measure import Measurement

    out = out or console
    table = _table(report)
    # The width the table wants unwrapped (a measurement is clamped to the width offered).
    wants = Measurement.get(out, out.options.update(max_width=10_000), table).maximum
    if out.width < NARROW or wants > out.width:
        for line in vertical_lines(report):
            out.print(line, highlight=False, markup=False)
    else:
        out.print(table)


def _table(report: dict[str, Any]):
    from rich.table import Table

    keys = report["settings"]["judges"]
    ci = round(report["settings"]["confidence"] * 100)
    table = Table(title=f"apactl eval: {report['settings']['run_name']} (mean [{ci}% CI] / "
                  f"win rate vs baseline [{ci}% CI] (ties))")
    table.add_column("policy", no_wrap=True)
    for k in keys:
        table.add_column(k)
    for h in ("KL k1", "entropy", "tokens", "distinct-1/2"):
        table.add_column(h, justify="right")
    for p in report["policies"]:
        judges = ["\n".join(_judge_cells(p, k)) for k in keys]
        table.add_row(_label(p), *judges, _kl_cell(p, "k1"), _num(p["entropy"]),
                      _num(p["length_mean"], ".1f"),
                      f"{_num(p['distinct_1'], '.2f')}/{_num(p['distinct_2'], '.2f')}")
    return table


def vertical_lines(report: dict[str, Any]) -> list[str]:
    """The console summary for a narrow terminal: a legend, then per policy its name, one
    ``judge: mean [CI] / win [CI] (ties)`` line per judge and one line of KL and text stats."""
    ci = round(report["settings"]["confidence"] * 100)
    lines = [f"apactl eval: {report['settings']['run_name']}",
             f"judge: mean [{ci}% CI] / win vs baseline [{ci}% CI] (ties)"]
    for p in report["policies"]:
        lines += ["", _label(p)]
        for k in report["settings"]["judges"]:
            mean, win = _judge_cells(p, k)
            lines.append(f"  {k}: {mean}" + ("" if p["is_baseline"] else f" / win {win}"))
        lines.append(f"  KL k1 {_kl_cell(p, 'k1')}  entropy {_num(p['entropy'])}  tokens "
                     f"{_num(p['length_mean'], '.1f')}  distinct-1/2 "
                     f"{_num(p['distinct_1'], '.2f')}/{_num(p['distinct_2'], '.2f')}")
    return lines


def card_section(report: dict[str, Any], p: dict[str, Any]) -> str:
    """The model card section of policy ``p`` (a report.json policy entry): each judge's mean,
    difference and win rate against the baseline, and the KL to it."""
    s = report["settings"]
    ci = f"{round(s['confidence'] * 100)}% CI"
    lines = [f"## Evaluation (apactl eval: {s['run_name']})", "",
             f"{s['n_prompts']} prompts from `{s['data']}`, {s['samples_per_prompt']} sample(s) "
             f"each; baseline and KL reference: **{s['baseline']}** (`{s['baseline_ref']}`).", "",
             f"| judge | mean [{ci}] | diff vs baseline [{ci}] | win vs baseline [{ci}] (ties) |",
             "|---|---|---|---|"]
    for k in s["judges"]:
        mean, diff, win = _cells3(p, k)
        lines.append(f"| `{k}` | {mean} | {diff} | {win} |")
    lines += ["", f"KL to the baseline: {_kl_cell(p, 'k1')} nats per response (k1 ± se)."]
    return "\n".join(lines) + "\n"
