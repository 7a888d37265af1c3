"""apactl eval over sweeps: runs that differ only in their seed form a configuration, reported
as the mean over seeds with a Student-t interval (hand-computed here), and a sweep folder expands
into its runs."""

from __future__ import annotations

import math

import pytest
import yaml
from helpers import QUIET, TINY, cli

from apactl.config import EvalRecipe
from apactl.workflows.eval_entries import Entry, group_configs
from apactl.workflows.evaluate import configurations


def run_folder(tmp_path, name: str, **changes) -> Entry:
    recipe = {"kind": "align", "run": {"seed": 0, "output_dir": str(tmp_path / name)},
              "algo": {"name": "apa"}, "train": {"lr": 1e-4}}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        recipe[section][key] = value
    folder = tmp_path / name
    folder.mkdir()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return Entry(name, str(folder), "policies.0.path", name, run=folder)


def test_runs_differing_only_in_seed_share_a_configuration(tmp_path):
    entries = [run_folder(tmp_path, "a0"), run_folder(tmp_path, "a1", run__seed=1),
               run_folder(tmp_path, "b0", train__lr=3e-4),
               run_folder(tmp_path, "c0", algo__name="ppo", run__output_dir="elsewhere")]
    group_configs(entries)
    assert [e.config for e in entries] == [
        "algo.name=apa train.lr=0.0001", "algo.name=apa train.lr=0.0001",
        "algo.name=apa train.lr=0.0003", "algo.name=ppo train.lr=0.0001"]
    assert [e.seed for e in entries] == [0, 1, 0, 0]


def test_labels_name_only_the_keys_that_tell_configurations_apart(tmp_path):
    # An algorithm's name implies its defaults (kl.beta, clip, vf_coef): they differ between
    # APA and PPO but add nothing to "algo.name=ppo".
    def run(name, algo, kl):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "recipe.yaml").write_text(yaml.safe_dump(
            {"kind": "align", "run": {"seed": 0}, "algo": algo, "kl": kl}))
        return Entry(name, str(folder), "policies.0.path", name, run=folder)

    apa = {"anchor": "init", "clip_eps": None, "vf_coef": 1.0}
    entries = [run("a", {"name": "apa", "lam": 0.1, **apa}, {"beta": 0.0}),
               run("b", {"name": "apa", "lam": 0.3, **apa}, {"beta": 0.0}),
               run("c", {"name": "ppo", "lam": None, "anchor": None, "clip_eps": 0.2,
                         "vf_coef": 0.5}, {"beta": 0.05})]
    group_configs(entries)
    assert [e.config for e in entries] == [
        "algo.name=apa algo.lam=0.1", "algo.name=apa algo.lam=0.3", "algo.name=ppo"]


def policy(name, config, seed, score, kl):
    return {"name": name, "config": config, "seed": seed, "step": 10,
            "judges": {"gold": {"mean": score, "diff_vs_baseline": {"mean": score - 1.0}}},
            "kl": {"k1_mean": kl, "k3_mean": kl}, "entropy": 1.0, "length_mean": 30.0,
            "distinct_2": 0.8}


def test_configuration_interval_by_hand():
    recipe = EvalRecipe.model_validate({
        "kind": "eval", "policies": [{"name": "x", "path": "x"}],
        "data": {"source": "builtin:prompts"}, "judges": [{"name": "length"}]})
    rows = [policy("a/s0", "A", 0, 1.0, 0.5), policy("a/s1", "A", 1, 2.0, 1.5),
            policy("a/s2", "A", 2, 3.0, 1.0), policy("a/s0@5", "A", 0, 9.0, 9.0),
            policy("b/s0", "B", 0, 4.0, 2.0)]
    configs = {c["config"]: c for c in configurations(rows, recipe)}
    a = configs["A"]
    assert a["n_seeds"] == 3 and a["seeds"] == [0, 1, 2]  # the checkpoint (@5) is not a seed
    # mean 2, sample sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3) = 2.484
    half = 4.3027 / math.sqrt(3)
    assert a["judges"]["gold"]["mean"] == pytest.approx(2.0)
    assert a["judges"]["gold"]["ci_lo"] == pytest.approx(2.0 - half, abs=1e-3)
    assert a["judges"]["gold"]["ci_hi"] == pytest.approx(2.0 + half, abs=1e-3)
    assert a["diff_vs_baseline"]["gold"]["mean"] == pytest.approx(1.0)
    assert a["kl_k1"]["mean"] == pytest.approx(1.0)
    b = configs["B"]
    assert b["n_seeds"] == 1 and math.isnan(b["judges"]["gold"]["ci_lo"])


def test_eval_of_a_sweep_folder_groups_seeds(tmp_path):
    root = tmp_path / "sweep"
    res = cli("sweep", TINY / "align.yaml", "--grid", "run.seed=0,1", f"run.output_dir={root}",
              "train.iterations=2", "train.rollout_batch_size=4", "train.minibatch_size=4",
              "data.max_rows=16", "data.eval_rows=4", "generation.max_new_tokens=4", *QUIET)
    assert res.exit_code == 0, res.output
    out = tmp_path / "eval"
    res = cli("eval", TINY / "eval.yaml", f"run.output_dir={out}",
              f"policies=[{{name: s, path: '{root}'}}]", "baseline.path=tiny-random",
              "data.max_rows=16", "data.eval_rows=4", "generation.max_new_tokens=4",
              "judges=[{name: char-fraction, role: proxy}]", *QUIET)
    assert res.exit_code == 0, res.output
    report = yaml.safe_load((out / "report.json").read_text())
    names = [p["name"] for p in report["policies"]]
    assert "s/run.seed=0" in names and "s/run.seed=1" in names
    (config,) = report["configurations"]
    assert config["n_seeds"] == 2 and config["seeds"] == [0, 1]
    md = (out / "report.md").read_text()
    assert "## Across seeds" in md and "char-fraction (proxy:" in md
    assert "frontier_configs.png" in report["files"]
