"""The README's code and quoted output: the use-the-policy snippet runs, and the quickstart
report it quotes is the one docs/quickstart.md quotes (both written by docs/regen_quickstart.py).
"""

from __future__ import annotations

import re

from helpers import ROOT


def _block(text: str, name: str) -> str:
    found = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert found, f"no {name} block"
    return found.group(1)


def test_readme_policy_snippet_runs_and_prompts_as_trained():
    from apactl.data import render_prompt
    from apactl.models.refs import tiny_random_folder

    code = _block((ROOT / "README.md").read_text(), "use-policy")
    code = code.removeprefix("```python\n").removesuffix("```\n")
    path = "apactl-runs/quickstart/align-apa/final/policy"
    assert path in code
    folder = tiny_random_folder()  # a Hugging Face folder as apactl writes them
    ns: dict = {}
    exec(compile(code.replace(path, str(folder)), "README.md", "exec"), ns)  # noqa: S102
    # The text the policy saw in training: the recipes' empty system turn, apactl's rendering.
    assert ns["messages"][0] == {"role": "system", "content": ""}
    assert ns["text"] == render_prompt(ns["tokenizer"], ns["messages"])
    assert ns["out"].shape[1] > ns["inputs"]["input_ids"].shape[1]  # it answered


def test_readme_quotes_the_quickstart_report_of_docs_quickstart():
    readme = _block((ROOT / "README.md").read_text(), "quickstart-report")
    docs = _block((ROOT / "docs" / "quickstart.md").read_text(), "quickstart-report")
    assert readme == docs
    assert "| policy |" in readme


def _eval_run(tmp_path):
    """A run folder with eval/report.json and the report.md `apactl eval` writes for it."""
    import json

    from apactl.eval_report import render_markdown

    def judge(mean, base, win, tie, diff):
        return {"mean": mean, "ci_lo": mean - 0.1, "ci_hi": mean + 0.1,
                "win_vs_baseline": {"n": 128, "win_rate": win, "tie_rate": tie,
                                    "loss_rate": 1 - win - tie, "ci_lo": 0.4, "ci_hi": 0.6},
                "diff_vs_baseline": None if base else {"mean": diff, "ci_lo": diff - 0.07,
                                                       "ci_hi": diff + 0.07,
                                                       "includes_zero": diff < 0.07}}

    def policy(name, base, kl):
        return {"name": name, "is_baseline": base, "kl": {"k1_mean": kl, "k1_se": 0.3,
                                                          "k3_mean": kl, "k3_se": 0.3},
                "entropy": 1.2, "length_mean": 31.0, "distinct_1": 0.45, "distinct_2": 0.85,
                "judges": {"learned-rm": judge(0.2, base, 0.5, 0.0, 0.05),
                           "sentiment": judge(0.307 if base else 0.403, base, 0.48, 0.22, 0.096)}}

    run = tmp_path / "qs"
    report = {"settings": {
        "run_name": "quickstart-eval", "data": "builtin:prompts", "n_prompts": 64,
        "samples_per_prompt": 2, "seed": 1, "bootstrap": 1000, "confidence": 0.95,
        "baseline": "sft", "baseline_ref": str(run / "sft"), "judges": ["learned-rm", "sentiment"],
        "judge_specs": [{"name": "reward-model", "label": "learned-rm", "role": "proxy"},
                        {"name": "sentiment", "label": None, "role": "gold"}],
        "generation": {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "max_new_tokens": 32}},
        "policies": [policy("sft", True, 0.0), policy("apa", False, 2.2)], "files": []}
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    (run / "eval" / "report.md").write_text(render_markdown(report))
    return run


def test_regen_quotes_report_md_table_and_its_figures(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("regen", ROOT / "docs" / "regen_quickstart.py")
    regen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regen)
    run = _eval_run(tmp_path)
    block = regen.report_block(run)
    table = [ln for ln in (run / "eval" / "report.md").read_text().splitlines()
             if ln.startswith("|")]
    assert "\n".join(table) in block  # report.md's own table, verbatim
    assert str(run) not in block and "(`apactl-runs/quickstart/sft`)" in block
    assert ("`sentiment` (gold) 0.307 → 0.403, paired difference +0.096 [+0.026, +0.166] "
            "(excludes 0)") in block
    assert "higher in 48% of the 128 paired answers, lower in 30%, tied in 22%" in block
    doc = ("intro\n<!-- quickstart-report:begin -->\nOLD BLOCK\n"
           "<!-- quickstart-report:end -->\nrest\n")
    new = regen.replace_block(doc, "quickstart-report", block)
    assert new.startswith("intro\n") and new.endswith("-->\nrest\n") and "OLD BLOCK" not in new
    assert regen.replace_block(new, "quickstart-report", block) == new  # idempotent
