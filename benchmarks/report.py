"""Markdown tables from the benchmark JSON files, optionally before/after side by side.

    python benchmarks/report.py --after benchmarks/results [--before benchmarks/results/before]

Reads whatever is present in each folder: throughput-{ppo,apa,awr}.json (align_throughput.py),
scaling.json (scaling.py), compare_trl.json (compare_trl.py), lora_memory.json
(lora_memory.py). Prints the tables that benchmarks/README.md quotes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PHASES = ("generate", "score", "reward", "update")


def _load(folder: Path | None, name: str):
    if folder is None or not (folder / name).is_file():
        return None
    return json.loads((folder / name).read_text())


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


def throughput_rows(tag: str, res: dict) -> list[str]:
    s = res["summary"]
    ph = s["phase_seconds"]
    ex = s.get("executed") or {}
    util = ex.get("utilisation", {})
    return [
        f"| {tag} | {_f(s['seconds_per_iteration'])} | "
        + " | ".join(_f(ph[p]) for p in PHASES)
        + f" | {_f(s['episodes_per_s'])} | {_f(s['generated_tokens_per_s'])} | "
        f"{_pct(s['mfu']['score'])} / {_pct(util.get('score'))} | "
        f"{_pct(s['mfu']['update'])} / {_pct(util.get('update'))} | "
        f"{_pct(s['decode']['fraction_of_copy_bandwidth'])} | {_f(s['peak_rss_mib'], 4)} | "
        f"{_f(res['limits']['matmul_gflops'])} |"
    ]


def throughput_table(runs: list[tuple[str, dict]]) -> str:
    head = ("| run | s/iter | generate | score | reward | update | episodes/s | gen tok/s | "
            "score MFU (model / executed) | update MFU (model / executed) | decode % of copy bw | "
            "peak RSS MiB | matmul peak GFLOP/s |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for tag, res in runs:
        lines += throughput_rows(tag, res)
    return "\n".join(lines)


def scaling_table(runs: list[tuple[str, dict]]) -> str:
    lines = ["| run | axis | target len | realised len | batch | s/iter | s/episode | "
             "episodes/s | gen tok/s | update MFU | peak RSS MiB |", "|" + "---|" * 11]
    for tag, res in runs:
        for axis in ("length", "batch"):
            for p in res.get(f"{axis}_axis", []):
                lines.append(
                    f"| {tag} | {axis} | {p['max_new_tokens']} | "
                    f"{_f(p['response_length_mean'])} | {p['rollout_batch_size']} | "
                    f"{_f(p['seconds_per_iteration'])} | {_f(p['seconds_per_episode'])} | "
                    f"{_f(p['episodes_per_s'])} | {_f(p['generated_tokens_per_s'])} | "
                    f"{_pct(p['mfu']['update'])} | {_f(p['peak_rss_mib'], 4)} |")
    return "\n".join(lines)


def compare_table(runs: list[tuple[str, dict]]) -> str:
    lines = ["| run | config | s/iter | episodes/s | generate s/iter | response len | "
             "peak RSS MiB | reward (last iter) | reward (mean, all iters) |", "|" + "---|" * 9]
    for tag, res in runs:
        for name, r in res.get("rows", {}).items():
            lines.append(
                f"| {tag} | {name} | {_f(r.get('seconds_per_iteration'))} | "
                f"{_f(r.get('episodes_per_s'))} | {_f(r.get('generate_seconds_per_iteration'))} | "
                f"{_f(r.get('response_length_mean'))} | {_f(r.get('peak_rss_mib'), 4)} | "
                f"{_f(r.get('reward_last'))} | {_f(r.get('reward_mean_all'))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--before", type=Path)
    a = p.parse_args(argv)
    folders = [("before", a.before), ("after", a.after)] if a.before else [("", a.after)]

    def collect(name: str, per_algo: bool = False):
        out = []
        for tag, folder in folders:
            if per_algo:
                for algo in ("ppo", "apa", "awr"):
                    res = _load(folder, f"throughput-{algo}.json")
                    if res:
                        out.append((f"{tag} {algo}".strip(), res))
            else:
                res = _load(folder, name)
                if res:
                    out.append((tag or "-", res))
        return out

    sections = [("Throughput (align_throughput.py)", throughput_table, collect("", True)),
                ("Scaling (scaling.py)", scaling_table, collect("scaling.json")),
                ("apactl vs TRL (compare_trl.py)", compare_table, collect("compare_trl.json"))]
    for title, fn, runs in sections:
        if runs:
            print(f"### {title}\n\n{fn(runs)}\n")
    mem = collect("lora_memory.json")
    for tag, res in mem:
        print(f"### LoRA memory (lora_memory.py) {tag}\n\npolicy alone (LoRA sft) "
              f"{res['policy_alone_sft']['peak_rss_mib']:.0f} MiB; LoRA align "
              f"{res['lora_align']['peak_rss_mib']:.0f} MiB; ratio {res['ratio']:.2f}x "
              f"(target <= {res['target']}x)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
