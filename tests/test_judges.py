"""Judges: the built-ins, the registry, and judge errors in eval recipes (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import apactl.judges as judges
from apactl.cli import app
from apactl.config import JudgeSpec
from apactl.errors import RecipeError
from apactl.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ROOT / "recipes" / "tiny" / "eval.yaml"
runner = CliRunner()


def test_sentiment_ranks_positive_above_negative():
    judge = judges.build_judge(JudgeSpec(name="sentiment"))
    good, bad = judge.score([[], []], ["I love this, it is wonderful and great!",
                                       "This is terrible, awful and I hate it."])
    assert good > 0.5 and bad < -0.5


def test_char_fraction_by_hand():
    judge = judges.build_judge(JudgeSpec(name="char-fraction", args={"chars": "ab"}))
    assert judge.score([[]] * 3, ["abba", "a b!", ""]) == [1.0, 0.5, 0.0]


def test_length_counts_words():
    assert judges.build_judge(JudgeSpec(name="length")).score([[]], ["one two  three"]) == [3.0]


def write_eval(tmp_path: Path, judge_list: list[dict]) -> str:
    data = yaml.safe_load(TINY_EVAL.read_text())
    data["judges"] = judge_list
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_unknown_judge_in_eval_recipe_exits_2_listing_judges(tmp_path):
    res = runner.invoke(app, ["eval", write_eval(tmp_path, [{"name": "nope"}])])
    assert res.exit_code == 2, res.output
    assert "judges.0: unknown judge 'nope'; available judges: char-fraction" in res.output
    assert "sentiment" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args, expected", [
    (["--judge", "nope"], "--judge nope: unknown judge; available judges: char-fraction"),
    (["--judge", "reward-model"], "--judge reward-model: this judge needs a path"),
])
def test_bad_judge_option_exits_2(args, expected):
    res = runner.invoke(app, ["eval", str(TINY_EVAL), *args])
    assert res.exit_code == 2, res.output
    assert expected in res.output and "Traceback" not in res.output


def test_judge_option_keeps_and_adds_judges():
    recipe = load_recipe(TINY_EVAL, kind="eval")
    kept = recipe.with_judges(["sentiment", "char-fraction", "sentiment"])
    assert [j.key for j in kept.judges] == ["sentiment", "char-fraction"]
    assert kept.judges[1].args == {"chars": "a"}  # the recipe's settings are kept
    added = recipe.with_judges(["length"]).with_judges(["length"])
    assert [j.key for j in added.judges] == ["length"]


def test_registered_judge_is_usable_by_name(monkeypatch, tmp_path):
    monkeypatch.setattr(judges, "JUDGES", dict(judges.JUDGES))  # undo the registration after

    class Exclaim:
        name = "exclaim"

        def __init__(self, weight: float):
            self.weight = weight

        def score(self, prompts, responses):
            return [self.weight * r.count("!") for r in responses]

    @judges.register_judge("exclaim", "exclamation marks times args.weight")
    def _exclaim(weight: float = 1.0):
        return Exclaim(weight)

    judge = judges.build_judge(JudgeSpec(name="exclaim", args={"weight": 2}))
    assert judge.score([[]], ["hi!!"]) == [4.0]
    assert "exclaim" in judges.available()
    recipe = load_recipe(write_eval(tmp_path, [{"name": "exclaim", "args": {"weight": 2}}]),
                         kind="eval")
    assert recipe.judges[0].key == "exclaim"
    assert recipe.with_judges(["exclaim"]).judges == recipe.judges


def test_eval_recipe_rejects_clashing_names(tmp_path):
    path = write_eval(tmp_path, [{"name": "length"}, {"name": "length"}])
    with pytest.raises(RecipeError, match="judge names must be unique"):
        load_recipe(path, kind="eval")
    with pytest.raises(RecipeError, match="policy names must be unique"):
        load_recipe(TINY_EVAL, ["baseline.name=tiny"], kind="eval")


def test_missing_local_policy_path_still_validates():
    # Policy runs are created by other commands first: `apactl eval` checks them at run time.
    recipe = load_recipe(TINY_EVAL, ["policies=[{name: a, path: ./no-such-run}]"], kind="eval")
    assert recipe.policies[0].path == "./no-such-run"
    with pytest.raises(RecipeError, match="baseline.path: file not found"):
        load_recipe(TINY_EVAL, ["baseline.path=./no-such-model"], kind="eval")


def test_judge_args_are_checked_and_context_passed_only_when_asked():
    with pytest.raises(RecipeError, match="judge 'char-fraction': unknown args nope; it takes: "
                                          "chars"):
        load_recipe(TINY_EVAL, ["judges=[{name: char-fraction, args: {nope: 1}}]"], kind="eval")
    # An import-path judge that takes no context (no normalize, device...) builds fine, as in
    # align, where normalize defaults to true.
    spec = JudgeSpec(name="helpers:fail_on_rank", args={"rank": 5}, normalize=True)
    assert judges.build_judge(spec).score([[]], ["x"]) == [0.0]
    with pytest.raises(RecipeError, match="module 'nowhere' not found"):
        load_recipe(TINY_EVAL, ["judges=[{name: 'nowhere:judge'}]"], kind="eval")


def test_old_reward_keys_are_named_in_one_line():
    res = runner.invoke(app, ["recipe", "validate", str(ROOT / "recipes/tiny/align.yaml"),
                              "reward.judge=char-fraction"])
    assert res.exit_code == 2
    assert "reward: judge: renamed" in res.output and "judge -> name" in res.output
