"""The study's analysis (docs/study.md): choose learning rates, write the eval recipe, and build
the report (table, verdicts, plots) from the runs' metrics and `apactl eval`'s report.json.

    python docs/study/analyze.py best-lr apactl-runs/study/grid apa
    python docs/study/analyze.py eval-recipe apactl-runs/study > apactl-runs/study/eval.yaml
    python docs/study/analyze.py report apactl-runs/study docs/study
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def runs(root: Path) -> list[dict]:
    """Every run folder under ``root`` (sweep folders included) with its recipe and metrics."""
    import yaml

    out = []
    for recipe in sorted(root.rglob("recipe.yaml")):
        folder = recipe.parent
        metrics = folder / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        out.append({"folder": folder, "recipe": yaml.safe_load(recipe.read_text()), "rows": rows,
                    "finished": (folder / "final").is_dir()})
    return out


def last(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return vals[-1] if vals else None


def best_lr(grid: Path, algo: str) -> float:
    """The learning rate whose final held-out PROXY score (eval/score_mean) is highest."""
    cands = [(last(r["rows"], "eval/score_mean"), r["recipe"]["train"]["lr"])
             for r in runs(grid) if r["recipe"]["algo"]["name"] == algo and r["finished"]]
    cands = [c for c in cands if c[0] is not None]
    if not cands:
        sys.exit(f"no finished {algo} run with a held-out proxy score under {grid}")
    return max(cands)[1]


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "best-lr":
        print(best_lr(Path(args[0]), args[1]))
    else:
        sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
