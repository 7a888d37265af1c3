"""What a user sees: the progress line and the eval summary at terminal widths, the training
curves' axes. Rendered on a recording rich Console or a matplotlib Figure; no model runs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from apactl.eval_report import print_table
from apactl.metrics import Progress


def recording(width: int) -> Console:
    return Console(width=width, record=True, file=io.StringIO())


@pytest.mark.parametrize("width", [80, 140])
def test_progress_line_fits_the_terminal(width):
    out = recording(width)
    bar = Progress(14, "quickstart-rm", out=out)
    bar.update(3, loss=0.6931, lr=3e-4, **{"tok/s": 1234}, acc=0.5625)
    bar.close()
    lines = [ln for ln in out.export_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) <= width, lines
    text = lines[0]
    for shown in ("quickstart-rm", "3/14", "loss 0.6931", "lr 3.00e-04", "tok/s 1234",
                  "acc 0.5625"):
        assert shown in text, text
    assert ("eta" in text) == (width >= 100), text  # narrow: no elapsed/eta text
    assert "…" not in text  # nothing cut


def _judge(mean: float, baseline: bool) -> dict:
    win = None if baseline else {"win_rate": 0.56, "ci_lo": 0.44, "ci_hi": 0.69,
                                 "tie_rate": 0.11}
    return {"mean": mean, "ci_lo": mean - 0.2, "ci_hi": mean + 0.25, "win_vs_baseline": win}


def _report(judges: list[str]) -> dict:
    def policy(name: str, baseline: bool, kl: float) -> dict:
        return {"name": name, "is_baseline": baseline,
                "judges": {k: _judge(0.2 + 0.1 * i, baseline) for i, k in enumerate(judges)},
                "kl": {"k1_mean": kl, "k1_se": 0.27}, "entropy": 1.25, "length_mean": 31.6,
                "distinct_1": 0.446, "distinct_2": 0.85}

    return {"settings": {"judges": judges, "confidence": 0.95, "run_name": "quickstart-eval"},
            "policies": [policy("sft", True, 0.0), policy("apa", False, 2.22),
                         policy("apa@step-7", False, 1.1)]}


def test_eval_summary_is_vertical_at_80_columns():
    out = recording(80)
    print_table(_report(["learned-rm", "sentiment"]), out=out)
    lines = out.export_text().splitlines()
    assert all(len(ln) <= 80 for ln in lines), lines
    assert not any("┃" in ln or "│" in ln for ln in lines)  # no table
    block = lines[lines.index("apa"):lines.index("apa") + 4]
    assert block[1].startswith("  learned-rm: 0.2 [")
    assert "/ win 56% [44%, 69%] (11%)" in block[1]
    assert block[2].startswith("  sentiment: 0.3 [")
    assert block[3].startswith("  KL k1 2.22 ± 0.27  entropy 1.25  tokens 31.6")
    base = lines.index("sft (baseline)")
    assert "win" not in lines[base + 1]  # the baseline has no win rate against itself


def test_eval_summary_is_a_table_at_140_columns():
    out = recording(140)
    print_table(_report(["learned-rm", "sentiment"]), out=out)
    text = out.export_text()
    assert "┃ policy" in text and "apa@step-7" in text
    assert all(len(ln) <= 140 for ln in text.splitlines())
    assert "\napa\n" not in text  # not the vertical layout


def test_eval_summary_too_wide_for_the_terminal_turns_vertical():
    out = recording(120)  # five judges need more than 120 columns as a table
    print_table(_report(["rm", "sentiment", "length", "gold", "other"]), out=out)
    lines = out.export_text().splitlines()
    assert "apa" in lines and all(len(ln) <= 120 for ln in lines)
