"""``apactl label``: sample responses per prompt, let a judge rank them (RLAIF-style labels).

Writes ``preferences.jsonl`` ({prompt, chosen, rejected, chosen_score, rejected_score}: the best
and the worst of ``label.samples`` responses) and ``chosen.jsonl`` ({prompt, response}: the best
response, for a short SFT stage) into ``run.output_dir``.
"""

from __future__ import annotations

import json

import torch

from apactl.atomic import write_file
from apactl.config import LabelRecipe
from apactl.metrics import Progress, console
from apactl.runtime import setup_run
from apactl.sampling import SamplingSpec, Stream, seeded_chunks
from apactl.workflows.common import check_positions

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
    from apactl.sampling import sample

    ids, mask = left_pad([p["input_ids"] for p in prompts], tok.pad_token_id)
    gen = recipe.generation
    resp, rmask = sample(policy, ids.to(device), mask.to(device), SamplingSpec.from_config(gen),
                         eos, tok.pad_token_id, gen.backend)
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


def run_label(recipe: LabelRecipe) -> dict[str, float]:
    from apactl.data import fit_prompts, load_examples, tokenize_prompts
    from apactl.judges import build_judge
    from apactl.models import load_policy
    from apactl.sampling import eos_ids

    with setup_run(recipe, trains=False) as rt:
        policy, tok = load_policy(recipe.policy, rt.device, rt.precision.frozen_dtype,
                                  trainable=False)
        judge = build_judge(recipe.judge, device=rt.device, dtype=rt.precision.frozen_dtype,
                            field="judge")
        check_positions(policy, recipe.data.max_prompt_len + recipe.generation.max_new_tokens,
                        "data.max_prompt_len + generation.max_new_tokens")
        train, _, report = load_examples(recipe.data, "prompt")
        d = recipe.data
        items, _ = tokenize_prompts(tok, fit_prompts(tok, train, d), d.max_prompt_len,
                                    d.on_bad_row, report.source, report)
        console.print(f"data: {report.source} ({report.format_note()}): {len(items)} prompts"
                      + (f"; {report.skipped_summary()}" if report.n_skipped else ""))
        items = items[: recipe.label.max_prompts]
        labelled = _label_all(policy, tok, judge, items, recipe, eos_ids(policy, tok), rt)
        pairs, chosen, gaps = _pairs(labelled, recipe)
        stats = {"label/prompts": len(items), "label/pairs": len(pairs),
                 "label/mean_gap": sum(gaps) / max(len(gaps), 1)}
        rt.begin()
        if rt.is_main:
            out = rt.output_dir
            write_file(out / PREFERENCES, _jsonl(pairs))
            write_file(out / CHOSEN, _jsonl(chosen))
            write_file(out / "label_stats.json", json.dumps(stats, indent=2))
        rt.dist.barrier()  # the files exist on return, on every rank
    console.print(f"[green]label done[/]: {len(pairs)} pairs from {len(items)} prompts "
                  f"(judge {recipe.judge.name}) -> {rt.output_dir / PREFERENCES}")
    return stats


def _pairs(labelled, recipe: LabelRecipe) -> tuple[list[dict], list[dict], list[float]]:
    """(preference pairs, best responses, best-worst gaps) from the judged samples."""
    pairs, chosen, gaps = [], [], []
    for item, texts, scores in labelled:
        order = sorted(range(len(texts)), key=scores.__getitem__, reverse=True)  # best first
        gaps.append(scores[order[0]] - scores[order[-1]])
        prompt = prompt_field(item["messages"])
        chosen.append({"prompt": prompt, "response": texts[order[0]]})
        candidates = ([(order[0], order[-1])] if recipe.label.pairs == "best-worst" else
                      [(a, b) for i, a in enumerate(order) for b in order[i + 1:]])
        for a, b in candidates:
            # Equal replies (after stripping) are no preference: the rm data layer refuses them.
            if scores[a] - scores[b] > recipe.label.min_margin and texts[a].strip() \
                    and texts[b].strip() and texts[a].strip() != texts[b].strip():
                pairs.append({"prompt": prompt, "chosen": texts[a], "rejected": texts[b],
                              "chosen_score": scores[a], "rejected_score": scores[b]})
    return pairs, chosen, gaps


def _label_all(policy, tok, judge, items: list[dict], recipe: LabelRecipe, eos, rt) -> list:
    """label_batch over every batch of prompts, in order. Batch b is sampled by rank
    b % world_size, seeded per batch (``Stream.LABEL``): the labels do not depend on the number
    of ranks. Every rank gets all the results."""
    progress = Progress(len(items), "label", recipe.logging.progress and rt.is_main)

    def batch(rows: slice) -> list:
        out = label_batch(policy, tok, judge, items[rows], recipe, eos, rt.device)
        # Rank 0 advances the bar by its own batches times the ranks working alongside.
        progress.update((rows.stop - rows.start) * rt.dist.world_size)
        return out

    with torch.no_grad():
        done = seeded_chunks(len(items), recipe.label.batch_size, batch, recipe.run.seed,
                             Stream.LABEL, (), rt.dist)
    progress.close()
    return [r for b in done for r in b]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
