"""Rewrite the quickstart results that README.md and docs/quickstart.md quote, from a run.

    python docs/regen_quickstart.py --run        # run `apactl quickstart --fresh`, then rewrite
    python docs/regen_quickstart.py [RUN]        # rewrite from a finished run (default:
                                                 # apactl-runs/quickstart)
    python docs/regen_quickstart.py --check      # exit 1 if the docs differ from the run
    python docs/regen_quickstart.py --times ...  # also the stage times (idle machine only)

Only the text between ``<!-- quickstart-report:begin -->`` and ``<!-- quickstart-report:end
-->`` is generated (and, with ``--times``, ``quickstart-times``): the settings lines, the table
and its legend copied from the run's ``eval/report.md`` (the table ``apactl eval`` writes, so
the docs show the same columns as the run's own report), then one paragraph of figures read from
``eval/report.json``; the run's frontier and training-curve plots are copied to docs/.
README.md and docs/quickstart.md get the same block;
tests/test_docs.py checks that they agree. Stage times are only rewritten on request: a run
on a busy machine measures the machine, not apactl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "quickstart.md"]
SHOWN_RUN = "apactl-runs/quickstart"  # the folder the docs name, wherever the run was written


def report_lines(run: Path) -> list[str]:
    """report.md's settings lines, table and legend (paths shown as the default folder)."""
    text = (run / "eval" / "report.md").read_text().replace(str(run.resolve()), SHOWN_RUN)
    text = text.replace(str(run), SHOWN_RUN)
    lines = text.splitlines()
    keep = [ln for ln in lines if ln.startswith(("- prompts:", "- baseline", "- judges:"))]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| policy"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    legend = [ln for ln in lines[end:] if ln.startswith('"~0"')]
    return keep + [""] + lines[start:end] + [""] + legend


def _ci(d: dict, fmt: str = "+.3f") -> str:
    return f"{d['mean']:{fmt}} [{d['ci_lo']:{fmt}}, {d['ci_hi']:{fmt}}]"


def figures(report: dict) -> str:
    """One paragraph: per judge the baseline -> policy means and the paired difference, then
    win/loss/tie on the gold judge, then KL; for every non-baseline policy."""
    s = report["settings"]
    base = next(p for p in report["policies"] if p["is_baseline"])
    roles = {(j.get("label") or j["name"]): j.get("role") for j in s.get("judge_specs", [])}
    out = []
    for p in (p for p in report["policies"] if not p["is_baseline"]):
        parts = []
        for key in s["judges"]:
            j, d = p["judges"][key], p["judges"][key]["diff_vs_baseline"]
            zero = "includes" if d["includes_zero"] else "excludes"
            role = f" ({roles[key]})" if roles.get(key) else ""
            parts.append(f"`{key}`{role} {base['judges'][key]['mean']:.3f} → {j['mean']:.3f}, "
                         f"paired difference {_ci(d)} ({zero} 0)")
        gold = next((k for k in s["judges"] if roles.get(k) == "gold"), s["judges"][-1])
        w = p["judges"][gold]["win_vs_baseline"]
        out.append(
            f"{p['name']} vs {base['name']}: " + "; ".join(parts) + f". On `{gold}`, "
            f"{p['name']}'s answer is higher in {w['win_rate']:.0%} of the {w['n']} paired "
            f"answers, lower in {w['loss_rate']:.0%}, tied in {w['tie_rate']:.0%}. KL to "
            f"{base['name']}: {p['kl']['k1_mean']:.2f} ± {p['kl']['k1_se']:.2f} nats per "
            f"answer. (Intervals: {round(s['confidence'] * 100)}% bootstrap over prompts, "
            f"{s['bootstrap']} resamples; one run, one seed.)")
    return "\n\n".join(out)


def report_block(run: Path) -> str:
    report = json.loads((run / "eval" / "report.json").read_text())
    return "\n".join(report_lines(run)) + "\n\n" + figures(report) + "\n"


def times_block(run: Path) -> str:
    from apactl.workflows.quickstart import human_bytes

    record = json.loads((run / "quickstart.json").read_text())
    secs, size = record["stage_seconds"], record["stage_bytes"]
    rows = [f"| {k} | {v:.0f} | {human_bytes(size.get(k, 0))} |" for k, v in secs.items()]
    total = sum(secs.values())
    return "\n".join(["| stage | seconds | on disk |", "|---|---:|---:|", *rows,
                      f"| **total** | **{total:.0f} ({total / 60:.1f} min)** | "
                      f"**{human_bytes(sum(size.values()))}** |"]) + "\n"


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->\n", f"<!-- {name}:end -->"
    if begin not in text:
        return text
    head, rest = text.split(begin, 1)
    return head + begin + body + end + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default=SHOWN_RUN, help="the quickstart's output folder")
    ap.add_argument("--run", dest="execute", action="store_true",
                    help="run `apactl quickstart --fresh -o RUN` first")
    ap.add_argument("--times", action="store_true",
                    help="also rewrite the stage times (only from a run on an idle machine)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 on a difference")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if args.execute:
        subprocess.run([sys.executable, "-m", "apactl", "quickstart", "--fresh", "-o", str(run)],
                       check=True)
    if not args.check:  # the plots the docs show, from the same run
        for src, dst in (("frontier.png", "quickstart-frontier.png"),
                         ("training_curves.png", "quickstart-training-curves.png")):
            if (run / "eval" / src).is_file():
                shutil.copyfile(run / "eval" / src, ROOT / "docs" / dst)
    blocks = {"quickstart-report": report_block(run)}
    if args.times:
        blocks["quickstart-times"] = times_block(run)
    stale = []
    for doc in DOCS:
        old = doc.read_text()
        new = old
        for name, body in blocks.items():
            new = replace_block(new, name, body)
        if new != old:
            stale.append(doc)
            if not args.check:
                doc.write_text(new)
    verb = "differ from the run" if args.check else "rewritten"
    print("\n".join(f"{d.relative_to(ROOT)}: {verb}" for d in stale) or "docs up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
