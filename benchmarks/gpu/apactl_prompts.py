"""Write the prompts apactl's align loop consumes, iteration by iteration, as jsonl, so that
benchmarks/gpu/trl_ppo_gpu.py feeds TRL the same prompts in the same order (its --prompts reads
the ``input_ids`` of each row as they are).

Runs here on the CPU, in the apactl venv (no model is loaded: only the recipe's data section, the
tokenizer, ``train.rollout_batch_size`` and ``run.seed`` matter):

    /work/main/.venv/bin/python benchmarks/gpu/apactl_prompts.py RECIPE OUT.jsonl \\
        --iterations 4 --tokenizer /work/shared/gpu/smollm2-tokenizer [KEY=VALUE ...]

KEY=VALUE are the recipe overrides the apactl run uses (e.g. train.rollout_batch_size=64); the
row format is compare_trl.py's: {"iteration", "row", "messages", "input_ids"}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("out")
    p.add_argument("overrides", nargs="*", help="recipe overrides, KEY=VALUE")
    p.add_argument("--iterations", type=int, required=True, help="iterations in all (warm-up too)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder of the policy")
    a = p.parse_args()

    from apactl.models import load_tokenizer
    from apactl.recipe import load_recipe
    from apactl.rl.loop import PromptSampler
    from apactl.workflows.align import tokenized_prompts

    recipe = load_recipe(a.recipe, a.overrides, kind="align", check_files=False)
    tok = load_tokenizer(a.tokenizer)
    prompts, _ = tokenized_prompts(recipe, tok)
    sampler = PromptSampler(len(prompts), recipe.train.rollout_batch_size, recipe.run.seed)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as f:
        for it in range(a.iterations):
            for i in sampler.indices(it):
                q = prompts[i]
                f.write(json.dumps({"iteration": it, "row": q.get("row"),
                                    "messages": q["messages"], "input_ids": q["input_ids"]})
                        + "\n")
                n += 1
    print(f"{out}: {n} prompts ({a.iterations} iterations x {recipe.train.rollout_batch_size}, "
          f"seed {recipe.run.seed}, {len(prompts)} training prompts)")


if __name__ == "__main__":
    main()
