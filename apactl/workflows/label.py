"""``apactl label``: sample responses per prompt, let a judge rank them (RLAIF-style labels).

Writes ``preferences.jsonl`` ({prompt, chosen, rejected, chosen_score, rejected_score}: the best
and the worst of ``label.samples`` responses) and ``chosen.jsonl`` ({prompt, response}: the best
response, for a short SFT stage) into ``run.output_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apactl.config import LabelRecipe
from apactl.distributed import chunk_seed
from apactl.metrics import Progress, console
from apactl.runtime import setup_run

PREFERENCES = "preferences.jsonl"
CHOSEN = "chosen.jsonl"


def prompt_field(messages: list[dict]) -> str | list[dict]:
    """A single user turn is written as plain text, a dialogue as its messages."""
    if len(messages) == 1 and messages[0].get("role") == "user":
        return messages[0]["content"]
    return messages


def sample_texts(policy, tok, prompts: list[dict], recipe: LabelRecipe, eos: list[int],
                 device) -> list[str]:
    """One sampled response (decoded text) per prompt item."""
    from apactl.data import left_pad
    from apactl.generation import sample

    ids, mask = left_pad([p["input_ids"] for p in prompts], tok.pad_token_id)
    resp, rmask = sample(policy, ids.to(device), mask.to(device), recipe.generation, eos,
                         tok.pad_token_id)
    rows = [r[: int(m.sum())].tolist() for r, m in zip(resp.cpu(), rmask.cpu())]
    return tok.batch_decode(rows, skip_special_tokens=True)


def label_batch(policy, tok, judge, batch: list[dict], recipe: LabelRecipe, eos, device):
    """[(item, responses [S], scores [S])] for a batch of prompts."""
    # All samples in one generate call: a wider decode batch uses the matmuls better on CPU.
    flat = sample_texts(policy, tok, batch * recipe.label.samples, recipe, eos, device)
    n = len(batch)
    texts = [flat[s * n:(s + 1) * n] for s in range(recipe.label.samples)]
    msgs = [p["messages"] for p in batch]
    scores = [judge.score(msgs, t) for t in texts]
    return [(item, [t[i] for t in texts], [s[i] for s in scores])
            for i, item in enumerate(batch)]


def run_label(recipe: LabelRecipe, resume: bool = False) -> dict[str, float]:
    from apactl.data import fit_prompts, load_examples, tokenize_prompts
    from apactl.generation import eos_ids
    from apactl.judges import make_judge
    from apactl.models import load_policy

    rt = setup_run(recipe)
    policy, tok = load_policy(recipe.policy, rt.device, rt.dtype, trainable=False)
    j = recipe.judge
    judge = make_judge(j.name, j.path, {**j.args, **({"normalize": True} if j.normalize else {})},
                       device=rt.device, dtype=rt.dtype)
    train, _, report = load_examples(recipe.data, "prompt")
    d = recipe.data
    items, _ = tokenize_prompts(tok, fit_prompts(tok, train, d), d.max_prompt_len, d.on_bad_row,
                                report.source)
    items = items[: recipe.label.max_prompts]
    labelled = _label_all(policy, tok, judge, items, recipe, eos_ids(policy, tok), rt)
    pairs, chosen, gaps = [], [], []
    for item, texts, scores in labelled:
        order = sorted(range(len(texts)), key=scores.__getitem__, reverse=True)  # best first
        gaps.append(scores[order[0]] - scores[order[-1]])
        prompt = prompt_field(item["messages"])
        chosen.append({"prompt": prompt, "response": texts[order[0]]})
        candidates = ([(order[0], order[-1])] if recipe.label.pairs == "best-worst" else
                      [(a, b) for i, a in enumerate(order) for b in order[i + 1:]])
        for a, b in candidates:
            if scores[a] - scores[b] > recipe.label.min_margin and texts[a].strip() \
                    and texts[b].strip():
                pairs.append({"prompt": prompt, "chosen": texts[a], "rejected": texts[b],
                              "chosen_score": scores[a], "rejected_score": scores[b]})
    out = rt.output_dir
    stats = {"label/prompts": len(items), "label/pairs": len(pairs),
             "label/mean_gap": sum(gaps) / max(len(gaps), 1)}
    if rt.is_main:
        _write_jsonl(out / PREFERENCES, pairs)
        _write_jsonl(out / CHOSEN, chosen)
        (out / "label_stats.json").write_text(json.dumps(stats, indent=2))
    rt.dist.barrier()  # the files exist on return, on every rank
    console.print(f"[green]label done[/]: {len(pairs)} pairs from {len(items)} prompts "
                  f"(judge {j.name}) -> {out / PREFERENCES}")
    return stats


def _label_all(policy, tok, judge, items: list[dict], recipe: LabelRecipe, eos, rt) -> list:
    """label_batch over every batch of prompts, in order. Batch b is sampled by rank
    b % world_size with a seed derived from (run.seed, b): the labels do not depend on the
    number of ranks. Every rank gets all the results."""
    dist, bs = rt.dist, recipe.label.batch_size
    starts = list(range(0, len(items), bs))
    progress = Progress(len(items), "label", recipe.logging.progress and rt.is_main)
    mine = {}
    with torch.no_grad():
        for b, i in enumerate(starts):
            if dist.owns(b):
                torch.manual_seed(chunk_seed(recipe.run.seed, 4, b))
                mine[b] = label_batch(policy, tok, judge, items[i:i + bs], recipe, eos,
                                      rt.device)
            # Rank 0 advances the bar for the whole round of world_size batches.
            if b % dist.world_size == dist.world_size - 1 or b == len(starts) - 1:
                progress.update(len(items[i - (b % dist.world_size) * bs:i + bs]))
    progress.close()
    return [r for batch in dist.gather_chunks(mine) for r in batch]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)  # never a half-written dataset
