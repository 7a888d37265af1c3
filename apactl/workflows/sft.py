"""``apactl sft``: supervised fine-tuning with the loss on response tokens only."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from apactl.config import SFTRecipe
from apactl.data import collate_sft, fit_prompts, load_examples, pack_sft, tokenize_sft
from apactl.distributed import Dist
from apactl.hooks import Hooks
from apactl.metrics import console
from apactl.models import load_policy, save_model
from apactl.runtime import setup_run
from apactl.supervised import Setup, SupervisedTask, run_supervised
from apactl.workflows.common import check_positions, data_summary


def sft_loss(model, batch) -> tuple[torch.Tensor, dict, int]:
    """Mean next-token cross-entropy over response tokens (labels != -100) of the micro-batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=batch["labels"])
    return out.loss, {"train/loss": out.loss.detach()}, batch["attention_mask"].sum()


def sft_eval(model, items, collate, batch_size: int, dist: Dist | None = None) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the held-out items (sharded over ranks; the
    sums are added up, so every rank returns the global numbers)."""
    if not items:
        return {}
    dist = dist or Dist()
    total, count = 0.0, 0
    # Similar lengths in a batch: padding costs as much as tokens; the metrics ignore order.
    mine = sorted(dist.shard(items), key=lambda it: len(it["input_ids"]))
    # Every rank runs the same number of forwards: a sharded (fsdp) forward is a collective.
    longest = -(-len(items) // dist.world_size)  # rank 0's shard
    rounds = -(-longest // batch_size)
    for r in range(rounds):
        part = mine[r * batch_size:(r + 1) * batch_size]
        batch = collate(part or items[:1])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if not part:
            continue  # a filler forward for the ranks with a shorter shard
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
            reduction="sum")
        total += nll.item()
        count += int((labels != -100).sum())
    total, count = dist.sum_scalar(total), dist.sum_scalar(count)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50))}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def run_sft(recipe: SFTRecipe, resume: bool = False, overwrite: bool = False,
            hooks: Hooks | None = None) -> dict[str, float]:
    with setup_run(recipe, resume, overwrite) as rt:
        d, p = recipe.data, rt.precision
        train_ex, eval_ex, report = load_examples(d, "sft")
        model, tok = load_policy(recipe.model, rt.device, p.master_dtype,
                                 freeze_bottom_layers=recipe.train.freeze_bottom_layers)
        if recipe.run.strategy != "fsdp":  # an FSDP unit needs one dtype
            p.store_frozen(model)
        check_positions(model, d.max_len, "data.max_len")
        args = (d.max_prompt_len, d.max_len, d.on_bad_row, report.source, report)
        train_items, _ = tokenize_sft(tok, fit_prompts(tok, train_ex, d), *args)
        eval_items, _ = tokenize_sft(tok, fit_prompts(tok, eval_ex, d), *args)
        console.print(data_summary(report, len(train_items), len(eval_items)))
        rows = {"train": len(train_items), "held_out": len(eval_items)}  # before packing
        if d.packing:
            train_items = pack_sft(train_items, d.max_len)
        collate = lambda items: to_device(collate_sft(items, tok.pad_token_id), rt.device)  # noqa: E731
        ebs = recipe.train.eval_batch_size or recipe.train.micro_batch_size
        task = SupervisedTask(
            model=model, train_items=train_items, collate=collate, loss_fn=sft_loss,
            sharded=recipe.run.strategy == "fsdp" and rt.dist.joined,
            evaluate=partial(sft_eval, items=eval_items, collate=collate, batch_size=ebs,
                             dist=rt.dist),
            save_model=saver(tok), name="sft", dist=rt.dist,
            info={"rows": rows},
        )
        final = run_supervised(task, Setup(recipe.run, recipe.train, recipe.logging, p,
                                           recipe.model_dump(mode="json"), rt.resume_from,
                                           hooks or Hooks(), rt.begin))
    console.print(f"[green]sft done[/]: {Path(recipe.run.output_dir) / 'final'}  "
                  + "  ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return final


def saver(tok):
    """``save_model`` for the supervised loop: checkpoints keep a LoRA adapter as is (exact
    resume); ``final`` gets a merged model."""
    def save(model, folder: Path, final: bool, state_dict: dict | None = None) -> None:
        save_model(model, tok, folder, merge_lora=final, state_dict=state_dict)
    return save
