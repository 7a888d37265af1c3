"""Recipe validation and the CLI surface (typer's CliRunner; no model is loaded here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from apactl.cli import app

ROOT = Path(__file__).resolve().parents[1]
# recipes/*/ (not rglob: recipes/quickstart is a symlink into the package, which rglob skips);
# recipes/accelerate/ holds launcher configs for `accelerate launch`, not apactl recipes.
SHIPPED = sorted((ROOT / "recipes").glob("*/*.yaml"))
RECIPES = [p for p in SHIPPED if p.parent.name != "accelerate"]
ACCELERATE = [p for p in SHIPPED if p.parent.name == "accelerate"]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(recipe: Path, monkeypatch, tmp_path):
    # A fresh clone: no apactl-runs/ yet, so inputs made by earlier stages are warnings.
    monkeypatch.chdir(tmp_path)
    res = invoke("recipe", "validate", str(recipe))
    assert res.exit_code == 0, res.output
    assert "ok:" in res.output and "error:" not in res.output
    for line in res.output.splitlines():
        if line.startswith("warning:"):
            assert "not found yet: apactl-runs/" in line and "(made by: apactl " in line, line


def test_shipped_recipes_include_every_pipeline_stage():
    names = {str(p.relative_to(ROOT)) for p in RECIPES}
    assert {"recipes/quickstart/1-label.yaml", "recipes/align/smollm2-135m-apa.yaml"} <= names


@pytest.mark.parametrize("config", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_not_a_recipe(config: Path):
    res = invoke("recipe", "validate", str(config))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "is an accelerate launch config, not an apactl recipe" in lines[0]
    assert f"accelerate launch --config_file {config} -m apactl" in lines[0]


def test_validate_and_show_warn_about_inputs_of_earlier_stages(monkeypatch):
    monkeypatch.chdir(ROOT)
    if (ROOT / "apactl-runs" / "rm-smollm2-135m-hh").exists():
        pytest.skip("this checkout has already run the HH reward model")
    warning = ("warning: reward.path: not found yet: apactl-runs/rm-smollm2-135m-hh (made by: "
               "apactl rm recipes/rm/smollm2-135m-hh.yaml)")
    recipe = "recipes/align/smollm2-135m-apa.yaml"
    res = invoke("recipe", "validate", recipe, "--world-size", "4")
    assert res.exit_code == 0 and warning in res.output, res.output
    assert "episodes_per_rank_per_iteration: 2" in res.output
    res = invoke("recipe", "show", recipe)
    assert res.exit_code == 0 and warning in res.stderr, res.output
    assert yaml.safe_load(res.stdout)["reward"]["path"] == "apactl-runs/rm-smollm2-135m-hh"
    # A run still needs the file: one line naming the field and the command that makes it.
    res = invoke("align", recipe)
    assert res.exit_code == 2, res.output
    assert ("error: reward.path: file not found: apactl-runs/rm-smollm2-135m-hh (made by: "
            "apactl rm recipes/rm/smollm2-135m-hh.yaml)") in res.output


def test_producer_command_finds_the_deepest_output_dir(tmp_path, monkeypatch):
    from apactl.recipe import producer_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes" / "a").mkdir(parents=True)
    write(tmp_path / "recipes" / "a", {"kind": "label", "run": {"output_dir": "runs/x"}}, "1.yaml")
    write(tmp_path / "recipes" / "a", {"kind": "sft", "run": {"output_dir": "runs/x/y"}}, "2.yaml")
    write(tmp_path / "recipes" / "a", {"compute_environment": "LOCAL_MACHINE"}, "3.yaml")
    root = tmp_path / "recipes"
    assert producer_command("runs/x/chosen.jsonl", root) == "apactl label recipes/a/1.yaml"
    assert producer_command("runs/x/y", root) == "apactl sft recipes/a/2.yaml"
    assert producer_command("runs/x/y/final", root) == "apactl sft recipes/a/2.yaml"
    assert producer_command("runs/xy", root) is None
    assert producer_command("elsewhere", root) is None


def test_producer_command_imports_no_torch():
    code = ("import sys; from apactl.recipe import producer_command; "
            "producer_command('apactl-runs/quickstart/sft'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from apactl.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.startswith("apactl ")


def test_every_command_has_help_with_example():
    for cmd in (["sft"], ["rm"], ["align"], ["recipe", "validate"], ["recipe", "show"],
                ["recipe", "schema"]):
        res = invoke(*cmd, "--help")
        assert res.exit_code == 0, cmd
        assert "Example:" in res.output, cmd


def test_command_list_shows_one_whole_sentence_per_command():
    """`apactl --help` lists each command by its docstring's first paragraph: one short line,
    so a 100-column terminal never cuts a description mid-sentence."""
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        first = (command.help or "").strip().split("\n\n")[0]
        assert "\n" not in first and len(first) <= 84 and first.endswith("."), (name, first)


@pytest.mark.parametrize("typo, meant", [
    ("recipes/align/smollm2-135m-apa.yml", "recipes/align/smollm2-135m-apa.yaml"),
    ("recipes/algn/smollm2-135m-apa.yaml", "recipes/align/smollm2-135m-apa.yaml"),
    ("recipes/tiny/sfft.yaml", "recipes/tiny/sft.yaml"),
])
def test_recipe_path_typo_gets_did_you_mean(typo, meant, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = invoke("recipe", "validate", typo)
    assert res.exit_code == 2
    assert res.output.strip() == f"error: recipe: file not found: {typo}; did you mean {meant}?"


SFT = {"kind": "sft", "data": {"source": "builtin:sft"}, "model": {"name_or_path": "tiny-random"}}


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0, got -1"),
        ({"train": {"lrr": 1}}, "train.lrr: unknown key"),
        ({"train": {"batch_size": "eight"}}, "train.batch_size: Input should be a valid integer"),
        ({"train": {"batch_size": 6, "grad_accum": 4}},
         "train: batch_size (6) must be divisible by grad_accum (4)"),
        ({"data": {"source": "missing.jsonl"}}, "data.source: file not found: missing.jsonl"),
        ({"data": {"source": "builtin:nope"}}, "data.source: unknown built-in dataset 'nope'"),
        ({"data": {"source": "builtin:sft", "max_prompt_len": 600, "max_len": 512}},
         "data: max_prompt_len (600) must be < max_len (512)"),
        ({"run": {"device": "tpu"}}, "run.device: Input should be 'auto', 'cpu' or 'cuda'"),
        ({"data": {"source": "builtin:sft", "max_rows": 32, "eval_rows": 312}},
         "data: eval_rows (312) must be < max_rows (32): the held-out rows are the last "
         "eval_rows of the max_rows read; pass a smaller data.eval_rows"),
        ({"kind": "rm"}, "kind: this is a 'rm' recipe, but the command runs 'sft'"),
    ],
)
def test_bad_sft_recipe_exit_2_names_field(tmp_path, patch, expected):
    data = json.loads(json.dumps(SFT))
    for k, v in patch.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and k in data else v
    res = invoke("sft", write(tmp_path, data))
    assert res.exit_code == 2, res.output
    assert expected in res.output
    assert "Traceback" not in res.output


ALIGN = {
    "kind": "align",
    "policy": {"name_or_path": "tiny-random"},
    "reward": {"name": "char-fraction"},
    "critic": {"init": "policy"},
    "data": {"source": "builtin:prompts"},
    "algo": {"name": "apa"},
}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algo.clip_eps=0.2"], "algo.clip_eps: unknown key for this algorithm"),
        (["algo.name=ppo", "algo.lam=0.5"], "algo.lam: unknown key for this algorithm"),
        (["algo.name=trpo"],
         "algo.name: unknown algorithm; expected one of: apa, ppo, awr, grpo, rloo"),
        (["train.rollout_batch_size=10", "train.minibatch_size=4"],
         "rollout_batch_size (10) must be divisible by minibatch_size (4)"),
        (["train.minibatch_size=4", "train.grad_accum=3"],
         "minibatch_size (4) must be divisible by grad_accum (3)"),
        (["reward.name=nope"], "unknown judge 'nope'; available judges:"),
        (["reward.name=reward-model"], "judge 'reward-model' needs a path"),
        (["critic.init=reward"], "critic.init: 'reward' needs a reward-model judge"),
        (["train.lr"], "override 'train.lr': expected key=value"),
    ],
)
def test_bad_align_recipe(tmp_path, overrides, expected):
    res = invoke("recipe", "validate", write(tmp_path, ALIGN), *overrides)
    assert res.exit_code == 2, res.output
    assert expected in res.output, res.output


def test_algo_shorthand_and_derived_numbers(tmp_path):
    path = write(tmp_path, ALIGN)
    res = invoke("recipe", "validate", path, "train.rollout_batch_size=32",
                 "train.minibatch_size=8", "train.epochs_per_rollout=2", "train.iterations=10")
    assert res.exit_code == 0, res.output
    assert "optimizer_steps_per_iteration: 8" in res.output
    assert "total_episodes: 320" in res.output


def test_show_fills_algorithm_defaults(tmp_path):
    path = write(tmp_path, ALIGN)
    shown = yaml.safe_load(invoke("recipe", "show", path).output)
    assert shown["kl"]["beta"] == 0.0 and shown["kl"]["adaptive"] is False  # APA default
    shown = yaml.safe_load(invoke("recipe", "show", path, "algo.name=ppo").output)
    assert shown["kl"]["beta"] == 0.05 and shown["kl"]["adaptive"] is True  # PPO default
    assert shown["algo"]["clip_eps"] == 0.2
    assert shown["train"]["rollout_batch_size"] == 16


def test_schema_is_json():
    res = invoke("recipe", "schema", "align")
    schema = json.loads(res.output)
    assert "algo" in schema["properties"]
    assert invoke("recipe", "schema", "nope").exit_code == 2


def test_unknown_kind_and_missing_file(tmp_path):
    res = invoke("recipe", "validate", write(tmp_path, {"kind": "kto"}))
    assert res.exit_code == 2 and "kind: unknown recipe kind 'kto'" in res.output
    res = invoke("recipe", "validate", str(tmp_path / "nope.yaml"))
    assert res.exit_code == 2 and "file not found" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: sft\n  data: [")
    res = invoke("recipe", "validate", str(bad))
    assert res.exit_code == 2 and "cannot parse" in res.output
