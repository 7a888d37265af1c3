"""``apactl rm``: a Bradley-Terry reward model.

Loss: -log sigmoid(r_chosen - r_rejected - margin), mean over pairs.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from apactl.config import RMRecipe
from apactl.data import collate_preference, load_examples
from apactl.distributed import Dist
from apactl.hooks import Hooks
from apactl.judges.reward_model import REWARD_STATS
from apactl.losses import bradley_terry_loss
from apactl.metrics import console
from apactl.models import load_sequence_classifier, resolve_model_ref, save_model, sequence_scores
from apactl.runtime import setup_run
from apactl.supervised import Setup, SupervisedTask, run_supervised
from apactl.workflows.common import check_positions, tokenized_pairs
from apactl.workflows.sft import to_device


def pair_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen [B] and rejected [B] halves of a collated [2B, L] batch."""
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"]).float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def bt_loss(model, batch, margin: float = 0.0) -> tuple[torch.Tensor, dict, int]:
    """The pairwise loss on one collated [2B, L] batch (chosen rows first), with accuracy."""
    rc, rr = pair_scores(model, batch)
    loss, stats = bradley_terry_loss(rc, rr, margin)
    return loss, stats, batch["attention_mask"].sum()


def rm_eval(model, items, collate, batch_size: int, margin: float,
            dist: Dist | None = None) -> dict[str, float]:
    """Held-out pair metrics; each rank scores its shard, every rank gets all the scores."""
    if not items:
        return {}
    dist = dist or Dist()
    # Similar lengths in a batch: padding costs as much as tokens; the metrics ignore order.
    mine = sorted(dist.shard(items),
                  key=lambda it: max(len(it["chosen_ids"]), len(it["rejected_ids"])))
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]
    # Every rank runs the same number of forwards: a sharded (fsdp) forward is a collective, so
    # a rank with a shorter shard (pairs that do not split evenly) runs a filler forward.
    longest = -(-len(items) // dist.world_size)  # rank 0's shard
    for r in range(-(-longest // batch_size)):
        part = mine[r * batch_size:(r + 1) * batch_size]
        rc, rr = pair_scores(model, collate(part or items[:1]))
        if not part:
            continue
        chosen.append(rc.cpu())
        rejected.append(rr.cpu())
    rc, rr = dist.unshard(torch.cat(chosen)), dist.unshard(torch.cat(rejected))
    both = torch.cat([rc, rr])
    return {
        "eval/loss": -F.logsigmoid(rc - rr - margin).mean().item(),
        "eval/accuracy": (rc > rr).float().mean().item(),
        "eval/margin": (rc - rr).mean().item(),
        "eval/reward_mean": both.mean().item(),
        "eval/reward_std": both.std().item(),
        "eval/pairs": float(len(rc)),
    }


def reward_stats(model, items, collate, batch_size: int) -> dict[str, float]:
    """Mean/std of rewards over both replies, saved beside the model for normalisation."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        scores = [torch.cat(pair_scores(model, collate(items[i:i + batch_size])))
                  for i in range(0, len(items), batch_size)]
    model.train(was_training)
    s = torch.cat(scores)
    return {"mean": s.mean().item(), "std": max(s.std().item(), 1e-6), "n": int(s.numel())}


def run_rm(recipe: RMRecipe, resume: bool = False, overwrite: bool = False,
           hooks: Hooks | None = None) -> dict[str, float]:
    with setup_run(recipe, resume, overwrite) as rt:
        d, tr, p = recipe.data, recipe.train, rt.precision
        train_ex, eval_ex, report = load_examples(d, "preference")
        ref = resolve_model_ref(recipe.model.name_or_path, recipe.model.cache_dir, kind="reward")
        model, tok = load_sequence_classifier(ref, rt.device, p.master_dtype, trainable=True,
                                              cfg=recipe.model,
                                              freeze_bottom_layers=tr.freeze_bottom_layers)
        if recipe.run.strategy != "fsdp":  # an FSDP unit needs one dtype
            p.store_frozen(model)
        check_positions(model, d.max_len, "data.max_len")
        train_items, eval_items = tokenized_pairs(tok, d, train_ex, eval_ex, report)
        collate = lambda items: to_device(collate_preference(items, tok.pad_token_id),  # noqa: E731
                                          rt.device)
        task = _task(recipe, model, tok, train_items, eval_items, collate, rt.dist)
        task.sharded = recipe.run.strategy == "fsdp" and rt.dist.joined
        final = run_supervised(task, Setup(recipe.run, tr, recipe.logging, p,
                                           recipe.model_dump(mode="json"), rt.resume_from,
                                           hooks or Hooks(), rt.begin))
    console.print(f"[green]rm done[/]: {Path(recipe.run.output_dir) / 'final'}  "
                  + "  ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return final


def _task(recipe: RMRecipe, model, tok, train_items, eval_items, collate,
          dist: Dist) -> SupervisedTask:
    tr = recipe.train
    ebs = tr.eval_batch_size or tr.micro_batch_size
    stats_items = eval_items or train_items[:512]
    last_eval: dict[str, float] = {}

    def evaluate(model) -> dict[str, float]:
        last_eval.clear()
        last_eval.update(rm_eval(model, eval_items, collate, ebs, recipe.loss.margin, dist))
        if not eval_items:  # no held-out pairs: the score statistics come from training pairs,
            # scored here, where every rank runs the same forwards (sharded models need that)
            stats = reward_stats(model, stats_items, collate, ebs)
            last_eval.update({"eval/reward_mean": stats["mean"], "eval/reward_std": stats["std"],
                              "eval/pairs": stats["n"] / 2})
            return {}
        return dict(last_eval)

    def save(model, folder: Path, final: bool, state_dict: dict | None = None) -> None:
        extra = {}
        if final:
            # The final evaluation just scored every held-out reply with these weights: reuse
            # its statistics instead of a second pass.
            stats = {"mean": last_eval["eval/reward_mean"],
                     "std": max(last_eval["eval/reward_std"], 1e-6),
                     "n": int(2 * last_eval["eval/pairs"])}
            extra = {REWARD_STATS: json.dumps(stats, indent=2)}
        save_model(model, tok, folder, merge_lora=final, state_dict=state_dict,
                   extra_files=extra)

    return SupervisedTask(model=model, train_items=train_items, collate=collate,
                          loss_fn=partial(bt_loss, margin=recipe.loss.margin),
                          evaluate=evaluate, save_model=save, name="rm", dist=dist,
                          card_role="reward",
                          info={"rows": {"train": len(train_items), "held_out": len(eval_items)}})
