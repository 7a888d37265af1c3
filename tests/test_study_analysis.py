"""docs/study/analyze.py: the study's learning-rate selection rule, its configuration labels,
the previous study's sweep records, the matched-KL fit and the seeds' intervals, on hand-made
numbers; and its run_study.sh phases parse."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.fixture(scope="module")
def an():
    spec = importlib.util.spec_from_file_location("study_analyze",
                                                  ROOT / "docs" / "study" / "analyze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pt(lr, proxy, kl):
    return {"lr": lr, "proxy": proxy, "gold": 0.0, "kl": kl}


def test_the_rule_takes_the_best_proxy_within_the_kl_budget_and_says_when_it_is_bracketed(an):
    # The proxy rises with the rate (as in the previous study); only the top rate exceeds 10.
    lr, why = an.choose([pt(3e-5, 0.37, 0.3), pt(1e-4, 0.70, 4.4), pt(3e-4, 2.29, 28.1)])
    assert lr == 1e-4 and "NOT bracketed" not in why
    # Every rate within the budget: the top one wins, and it is at the grid's edge.
    lr, why = an.choose([pt(3e-5, 0.1, 0.3), pt(1e-4, 0.2, 1.0), pt(3e-4, 0.3, 9.9)])
    assert lr == 3e-4 and "NOT bracketed" in why
    # A lower rate can win on the proxy inside the budget.
    lr, _ = an.choose([pt(3e-5, 0.1, 0.3), pt(1e-4, 0.5, 2.0), pt(3e-4, 0.4, 9.0)])
    assert lr == 1e-4
    # None within the budget: the smallest KL, flagged.
    lr, why = an.choose([pt(3e-5, 0.1, 12.0), pt(1e-4, 0.5, 20.0), pt(3e-4, 0.4, 30.0)])
    assert lr == 3e-5 and "no rate within" in why and "NOT bracketed" in why
    assert an.choose([pt(1e-4, None, None)]) == (None, "no finished grid point")


def test_labels_name_the_configuration_of_a_recipe(an):
    assert an.label_of({"kind": "dpo"}) == "dpo"
    assert an.label_of({"kind": "align", "algo": {"name": "apa", "lam": 0.1}}) == "apa"
    assert an.label_of({"algo": {"name": "apa", "lam": 0.1, "advantage": "group"}}) == "apa-group"
    assert an.label_of({"algo": {"name": "apa", "lam": 0.3, "advantage": "gae"}}) == "apa lam=0.3"
    assert an.label_of({"algo": {"name": "awr", "lam": 0.1}}) == "awr lam=0.1"
    assert an.label_of({"algo": {"name": "ppo", "clip_eps": 0.2}}) == "ppo"
    assert an.label_of({"algo": {"name": "grpo"}}) == "grpo"


def test_a_sweep_record_stands_for_a_run_whose_folder_is_gone(an, tmp_path):
    gone, here = tmp_path / "gone", tmp_path / "here"
    here.mkdir()
    metrics = {an.PROXY: 0.7, an.KL: 4.4, an.GOLD: 0.52}
    rec = {"runs": [
        {"status": "finished", "folder": str(gone), "grid": {"algo.name": "apa", "train.lr": 1e-4},
         "metrics": metrics},
        {"status": "finished", "folder": str(here), "grid": {"algo.name": "apa", "train.lr": 3e-4},
         "metrics": metrics},  # its folder exists: read from the folder, not the record
        {"status": "failed", "folder": str(gone), "grid": {"algo.name": "ppo", "train.lr": 1e-4},
         "metrics": metrics}]}
    (tmp_path / "sweep.json").write_text(json.dumps(rec))
    got = an.records(tmp_path)
    assert [(r["label"], r["lr"], r["seed"]) for r in got] == [("apa", 1e-4, 0)]


def test_the_matched_kl_fit_recovers_a_line_in_sqrt_kl(an):
    pts = [(kl, 0.2 + 0.1 * math.sqrt(kl), 1.0 - 0.5 * math.sqrt(kl)) for kl in (0, 1, 4, 9, 16)]
    a, b = an.fit_sqrt(pts, 1)
    assert a == pytest.approx(0.2) and b == pytest.approx(0.1)
    a, b = an.fit_sqrt(pts, 2)
    assert a == pytest.approx(1.0) and b == pytest.approx(-0.5)


def test_seed_intervals_are_t_intervals(an):
    # Three seeds 1, 2, 3: mean 2, sd 1, half-width t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732.
    got = an.t_interval([1.0, 2.0, 3.0])
    assert got["mean"] == 2.0 and got["n"] == 3
    assert got["ci_hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert an.t_interval([5.0]) == {"mean": 5.0, "n": 1}  # one seed: no interval


@pytest.mark.parametrize("script", ["run_study.sh", "session-2026-12-03.sh",
                                    "session-2026-12-03b.sh"])
def test_the_study_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "docs" / "study" / script)], check=True)


def test_the_published_answers_rescore_to_their_gold_scores_with_the_readme_snippet(capsys):
    """docs/study/README.md's snippet, run on every published samples.jsonl, prints the per-policy
    gold means of the file (the gold judge is the builtin `sentiment`)."""
    import re
    from collections import defaultdict

    files = sorted((ROOT / "docs" / "study" / "eval").glob("*/samples.jsonl"))
    assert files, "the study publishes the answers its final evaluation scored"
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "study" / "README.md").read_text(),
                     re.S).group(1)
    for path in files:
        ns: dict = {}
        exec(compile(code.replace("docs/study/eval/a/samples.jsonl", str(path)),  # noqa: S102
                     "README.md", "exec"), ns)
        gold = defaultdict(list)
        for r in ns["rows"]:
            gold[r["policy"]].append(r["scores"]["gold"])
        want = {p: round(sum(v) / len(v), 3) for p, v in gold.items()}
        assert capsys.readouterr().out.strip() == str(want)


def test_the_bootstrap_draws_whole_runs(an):
    """A run's held-out points (iterations 8/16/24) are one trajectory: a bootstrap draw takes
    a run with all of its points or not at all; records stand alone."""
    import random

    pts = sorted([(0.5 * i, 0.1 * i, 0.0, f"grid-x/lr=1e-4@{8 * i}") for i in (1, 2, 3)]
                 + [(1.0 * i, 0.2 * i, 0.0, f"seeds-x/seed=1@{8 * i}") for i in (1, 2, 3)]
                 + [(9.0, 0.9, 0.0, "record"), (0.1, 0.0, 0.0, "record")])
    assert sorted(len(g) for g in an.runs_of(pts)) == [1, 1, 3, 3]
    rng = random.Random(0)
    for _ in range(200):
        draw = an.resample_runs(pts, rng)
        runs = {p[3].rsplit("@", 1)[0] for p in draw if "@" in p[3]}
        for run in runs:  # every run drawn k times carries its 3 points k times
            n = sum(1 for p in draw if p[3].startswith(run + "@"))
            assert n % 3 == 0 and all(
                sum(1 for p in draw if p[3] == f"{run}@{s}") == n // 3 for s in (8, 16, 24))


def test_a_later_evaluation_part_leaves_out_what_another_part_scored(an, tmp_path):
    """New seeds are evaluated in a part of their own: the policies another part already scored
    are not scored twice (they would count twice in the seed means), pi_init is kept once. A
    policy is known by its path, as given (a run folder) or as apactl eval resolved it."""
    def report(part, names):
        d = tmp_path / "eval" / part
        d.mkdir(parents=True)
        pols = [{"name": "baseline", "is_baseline": True, "path": "sft/final"}] + [
            {"name": n, "run": f"runs/{n}", "path": f"runs/{n}/final"} for n in names]
        (d / "report.json").write_text(json.dumps({"policies": pols}))
        return d

    def paths(*names):
        return {Path(f"runs/{n}{end}") for n in names for end in ("", "/final")}

    a = report("a", ["apa-s0", "ppo-s0"])
    c = report("c", ["apa-s1"])
    assert an.scored_elsewhere(tmp_path, tmp_path / "eval" / "c") == paths("apa-s0", "ppo-s0")
    assert an.scored_elsewhere(tmp_path, a) == paths("apa-s1")  # re-running a part keeps its own
    assert an.scored_elsewhere(tmp_path, c.parent / "d") == paths("apa-s0", "ppo-s0", "apa-s1")


def test_dpo_seeds_are_evaluated_from_their_model_folder(an, tmp_path):
    """A DPO run's final/ is the model (config.json in it), not final/policy as in align: the
    policy apactl eval is given for each DPO seed must be a folder that holds the model."""
    def run(folder, seed):
        (folder / "final").mkdir(parents=True)
        (folder / "final" / "config.json").write_text("{}")
        (folder / "recipe.yaml").write_text(
            f"kind: dpo\nrun: {{seed: {seed}}}\ntrain: {{lr: 1.0e-4}}\n")
        (folder / "metrics.jsonl").write_text('{"step": 1, "train/loss": 0.69}\n')
        return folder

    grid = run(tmp_path / "grid-dpo" / "train.lr=1e-4", 0)
    run(tmp_path / "seeds-dpo" / "run.seed=1", 1)
    (tmp_path / "grid-dpo" / "eval").mkdir()
    (tmp_path / "grid-dpo" / "eval" / "report.json").write_text(json.dumps({"policies": [
        {"name": "dpo-lr0.0001", "run": str(grid), "path": str(grid / "final"),
         "judges": {"proxy": {"mean": 0.9}, "gold": {"mean": 0.6}}, "kl": {"k1_mean": 4.0}}]}))
    views = an.chosen_runs(tmp_path)["dpo"]
    assert [v["seed"] for v in views] == [0, 1]
    assert all((v["policy"] / "config.json").is_file() for v in views), views
