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
