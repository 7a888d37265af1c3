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


def _rows(n: int, length: float, entropy: float) -> list[dict]:
    # Nearly flat length and entropy: noise that an autoscaled axis would blow up.
    return [{"step": i + 1, "reward/score_mean": 0.1 * i, "kl/ref_k1": 0.2 * i,
             "policy/entropy": entropy + 0.001 * (i % 2), "response/length_mean":
             length + 0.1 * (i % 3)} for i in range(n)]


@pytest.mark.parametrize("normalized, reward_label", [
    ({"apa", "ppo"}, "judge score (normalised by the RM's mean/std)"),
    (set(), "judge score"),
    ({"apa"}, "judge score (normalised by the RM's mean/std: apa)"),
])
def test_training_curves_label_units_and_share_one_legend(normalized, reward_label):
    from apactl.plots import training_curves_figure

    fig = training_curves_figure({"apa": _rows(14, 31.6, 1.25), "ppo": _rows(10, 30.0, 1.3)},
                                 normalized)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel().replace("\n", " ") for ax in axes] == [
        reward_label, "nats per response", "nats per token", "tokens"]
    assert all(ax.get_legend() is None for ax in axes)  # no legend per panel ...
    assert len(fig.legends) == 1  # ... one for the figure, one entry per run
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["apa", "ppo"]
    entropy, length = axes[2], axes[3]
    lo, hi = length.get_ylim()
    assert hi - lo >= 0.1 * 31 and lo <= 30.0 and hi >= 31.8  # the data inside a >= 10% span
    lo, hi = entropy.get_ylim()
    assert hi - lo >= 0.1


def test_training_curves_figure_without_curves_is_none(tmp_path):
    from apactl.plots import training_curves_plot

    assert training_curves_plot({"x": [{"step": 1, "other": 1.0}]}, tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
