"""``apactl eval`` end to end on tiny random models: a 3-iteration align run (with checkpoints and
metrics.jsonl) against its initial policy, through the workflow and through the CLI."""

from __future__ import annotations

import json
import math

import pytest
from helpers import ROOT
from typer.testing import CliRunner

from apactl.cli import app
from apactl.recipe import load_recipe

TINY_EVAL = ROOT / "recipes" / "tiny" / "eval.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One intra-op thread: on a small machine shared with other jobs, 2 threads oversubscribe the
# cores and these tiny models run ~3x slower.
QUIET = ["logging.progress=false", "logging.tensorboard=false", "run.num_threads=1"]
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    import torch

    n = torch.get_num_threads()  # setup_run sets the process-wide count; give it back
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def align_run(tmp_path_factory):
    """A tiny APA run: checkpoints at steps 1, 2 and 3 (= final), metrics for 3 iterations."""
    import apactl.models.common as models
    from apactl.workflows.align import run_align

    out = tmp_path_factory.mktemp("align") / "run"
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "align.yaml", [
        f"run.output_dir={out}", "train.iterations=3", "train.save_every=1",
        "train.keep_checkpoints=5", "train.rollout_batch_size=8", "train.epochs_per_rollout=1",
        "data.max_rows=16", "generation.max_new_tokens=8", *QUIET])
    # The conftest cache fixture is per test; a module fixture sets the same folder itself.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "DEFAULT_CACHE_DIR", tmp_path_factory.getbasetemp() / "model-cache")
        run_align(recipe)
    return out


def finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    if isinstance(obj, float):
        assert math.isfinite(obj)
        return [obj]
    return []


def test_eval_run_with_checkpoints_against_initial_policy(align_run, tmp_path):
    from apactl.workflows.evaluate import run_eval

    out = tmp_path / "eval"
    recipe = load_recipe(TINY_EVAL, [
        f"run.output_dir={out}", "baseline=null", "data.eval_rows=4",
        f"policies=[{{name: apa, path: {align_run}, checkpoints: true}}, "
        "{name: same, path: tiny-random}]",
        "judges=[{name: char-fraction, args: {chars: a}}, {name: sentiment}]", *QUIET],
        kind="eval")
    report = run_eval(recipe)
    assert json.loads((out / "report.json").read_text()) == report
    finite_numbers(report)
    by_name = {p["name"]: p for p in report["policies"]}
    # Baseline first (the run's initial policy), checkpoints in step order, step 3 is `final`.
    assert list(by_name) == ["baseline", "apa@1", "apa@2", "apa", "same"]
    assert by_name["apa"]["step"] == 3 and by_name["apa"]["init_is_baseline"]
    for name in ("baseline", "same"):  # the baseline, as itself and as a listed policy
        assert by_name[name]["kl"]["k1_mean"] == 0.0 and by_name[name]["kl"]["k3_mean"] == 0.0
        wr = by_name[name]["judges"]["char-fraction"]["win_vs_baseline"]
        assert wr["tie_rate"] == 1.0 and wr["n"] == 8  # 4 prompts x 2 samples
    assert by_name["apa"]["kl"]["k1_mean"] > 0.1  # three lr=3e-3 updates moved the policy
    for p in report["policies"]:
        j = p["judges"]["char-fraction"]
        assert j["ci_lo"] <= j["mean"] <= j["ci_hi"] and p["kl"]["k3_mean"] >= 0
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 * 8
    assert {"policy", "prompt", "sample", "response", "scores", "kl_k1"} <= set(samples[0])
    same = [s["response"] for s in samples if s["policy"] == "same"]
    assert same == [s["response"] for s in samples if s["policy"] == "baseline"]  # same seed
    md = (out / "report.md").read_text()
    assert "| apa@2 |" in md and "char-fraction win vs baseline" in md
    for png in ("frontier.png", "training_curves.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, png
    assert (out / "recipe.yaml").exists()


def test_cli_eval_with_judge_option(tmp_path):
    out = tmp_path / "cli"
    res = runner.invoke(app, ["eval", str(TINY_EVAL), "--judge", "char-fraction",
                              f"run.output_dir={out}", "data.eval_rows=2",
                              "eval.samples_per_prompt=1", "eval.plots=false", *QUIET])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["judges"] == ["char-fraction"]
    tiny = report["policies"][1]  # the shipped policy is the baseline model itself
    assert tiny["name"] == "tiny" and tiny["kl"]["k1_mean"] == 0.0
    assert not (out / "frontier.png").exists()


@pytest.mark.parametrize("overrides, expected", [
    (["policies=[{name: a, path: ./no-such-run}]"], "policies.0.path: not found: ./no-such-run"),
    (["baseline=null"], "baseline: not set, and no policy is an apactl run folder"),
    (["policies=[{name: a, path: tiny-random, checkpoints: true}]"],
     "policies.0.checkpoints: tiny-random is not an apactl run folder"),
])
def test_cli_eval_user_errors_exit_2(tmp_path, overrides, expected):
    res = runner.invoke(app, ["eval", str(TINY_EVAL), f"run.output_dir={tmp_path}", *overrides])
    assert res.exit_code == 2, res.output
    assert expected in res.output and "Traceback" not in res.output
