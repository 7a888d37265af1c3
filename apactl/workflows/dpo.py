"""``apactl dpo``: Direct Preference Optimization (Rafailov et al. 2023) of a policy on
preference pairs against a frozen reference, through the supervised loop (the data order,
checkpoints, resume, DDP/FSDP and mixed precision of sft and rm).

A pair's log-prob under a model is the sum of its reply tokens' log-probs (the prompt is
shared and not scored). With ``train.precompute_reference`` (the default) the reference's
log-probs of every pair, training and held-out, are computed once before the first step and
kept on the items, so a step costs one policy forward/backward per pair; without
``reference.path`` they come from the policy itself before it trains (it *is* the initial
policy; with LoRA, from the policy with its adapter disabled), and no reference model is loaded.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import cache, partial
from pathlib import Path

import torch
from torch import Tensor

from apactl.config import DPOConfig, DPORecipe, ModelConfig
from apactl.data import collate_dpo, load_examples
from apactl.distributed import Dist
from apactl.errors import UserError
from apactl.hooks import Hooks
from apactl.losses import dpo_loss, logprobs_from_logits
from apactl.metrics import console
from apactl.models import load_causal_lm, load_policy, reference_logits_context, unwrap
from apactl.runtime import Runtime, setup_run
from apactl.supervised import Setup, SupervisedTask, run_supervised
from apactl.workflows.common import check_positions, tokenized_pairs
from apactl.workflows.sft import saver, to_device


@cache
def _keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def response_logps(model, batch: dict[str, Tensor]) -> Tensor:
    """[2B] summed log-probs of the reply tokens of a ``collate_dpo`` batch [2B, L].

    The LM head runs from the first reply column of the batch on (``logits_to_keep``): with a
    49k vocabulary it costs as much as several layers per position, and the prompt columns
    that every row still has are never scored.
    """
    ids = batch["input_ids"]
    start = max(int(batch["prompt_len"].min()), 1)
    keep = ids.shape[1] - start + 1  # logits at columns start-1 .. L-1 predict start .. L
    kw = {"logits_to_keep": keep} if _keeps_logits(type(unwrap(model))) else {}
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False,
                   **kw).logits[:, -keep:]
    logp = logprobs_from_logits(logits[:, :-1], ids[:, start:])
    return (logp * batch["response_mask"][:, start:]).sum(-1)


def reference_logps(model, ref, batch: dict[str, Tensor]) -> Tensor:
    """[2B] reference log-probs of a batch: precomputed ones, else a forward of ``ref`` (None:
    the LoRA policy with its adapter disabled, in eval mode)."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    was = model.training
    if ref is None:
        model.eval()
    try:
        with reference_logits_context(model, ref) as m:
            return response_logps(m, batch)
    finally:
        model.train(was)


def dpo_batch_loss(model, batch, ref=None, cfg: DPOConfig | None = None
                   ) -> tuple[Tensor, dict, int]:
    """The DPO loss of one micro-batch (chosen rows first), with the TRL-named reward stats."""
    cfg = cfg or DPOConfig()
    logps = response_logps(model, batch)
    refs = reference_logps(model, ref, batch)
    b = logps.shape[0] // 2
    loss, stats = dpo_loss(logps[:b], logps[b:], refs[:b], refs[b:], cfg.beta, cfg.loss)
    return loss, stats, int(batch["attention_mask"].sum())


def pair_length(item: dict) -> int:
    return max(len(item["chosen_ids"]), len(item["rejected_ids"]))


def pair_logps(model, items: list[dict], collate, batch_size: int,
               dist: Dist | None = None) -> tuple[Tensor, Tensor]:
    """(chosen [N], rejected [N]) float64 log-probs of ``items`` in their order, on every rank;
    each rank scores its shard (sorted by length: less padding). Call without gradients."""
    dist = dist or Dist()
    if not items:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    mine = dist.shard(list(range(len(items))))
    order = sorted(range(len(mine)), key=lambda k: pair_length(items[mine[k]]))
    out = torch.zeros(len(mine), 2, dtype=torch.float64)
    # Every rank runs the same number of forwards: a sharded (fsdp) forward is a collective.
    longest = -(-len(items) // dist.world_size)  # rank 0's shard
    rounds = -(-longest // batch_size)
    for r in range(rounds):
        part = order[r * batch_size:(r + 1) * batch_size]
        logps = response_logps(model, collate([items[mine[k]] for k in part] or items[:1]))
        if part:
            n = len(part)
            out[part] = torch.stack([logps[:n], logps[n:]], 1).double().cpu()
    full = dist.unshard(out)
    return full[:, 0], full[:, 1]


def attach_reference(model, ref, item_lists: list[list[dict]], collate, batch_size: int,
                     dist: Dist, autocast) -> None:
    """Store the reference log-probs of every pair on its item (``ref_chosen``,
    ``ref_rejected``): ``ref``'s, or ``model``'s own with ``ref`` None (the initial policy;
    a LoRA policy scores with its adapter disabled)."""
    was = model.training
    model.eval()
    lora = ref is None and hasattr(model, "disable_adapter")
    scorer = reference_logits_context(model, ref) if ref is not None or lora else \
        contextlib.nullcontext(model)
    try:
        with torch.no_grad(), autocast(), scorer as m:
            for items in item_lists:
                chosen, rejected = pair_logps(m, items, collate, batch_size, dist)
                for it, c, r in zip(items, chosen.tolist(), rejected.tolist(), strict=True):
                    it["ref_chosen"], it["ref_rejected"] = c, r
    finally:
        model.train(was)


def dpo_eval(model, ref, items: list[dict], collate, batch_size: int, cfg: DPOConfig,
             dist: Dist | None = None) -> dict[str, float]:
    """Held-out pairs: ``eval/loss`` and TRL's ``eval_rewards/*``, ``eval_logps/*``."""
    if not items:
        return {}
    pc, pr = pair_logps(model, items, collate, batch_size, dist)
    if "ref_chosen" in items[0]:
        rc = torch.tensor([it["ref_chosen"] for it in items], dtype=torch.float64)
        rr = torch.tensor([it["ref_rejected"] for it in items], dtype=torch.float64)
    else:
        with reference_logits_context(model, ref) as m:
            rc, rr = pair_logps(m, items, collate, batch_size, dist)
    _, stats = dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss)
    out = {"eval/loss": float(stats.pop("train/loss")), "eval/pairs": float(len(items))}
    out.update({f"eval_{k}": float(v) for k, v in stats.items()})
    return out


def load_dpo_reference(recipe: DPORecipe, policy, rt: Runtime):
    """The frozen reference model to load, or None: none is needed when its log-probs come from
    the policy before it trains (precompute, no ``reference.path``) or from the LoRA base."""
    path = recipe.reference.path
    if path is None and (recipe.train.precompute_reference or recipe.policy.lora is not None):
        return None
    cfg = (recipe.policy if path is None else
           ModelConfig(name_or_path=path, cache_dir=recipe.policy.cache_dir,
                       trust_remote_code=recipe.policy.trust_remote_code))
    ref = load_causal_lm(cfg.model_copy(update={"lora": None}), rt.device,
                         rt.precision.frozen_dtype, trainable=False)
    mine, theirs = (unwrap(m).get_input_embeddings().num_embeddings for m in (policy, ref))
    if mine != theirs:
        raise UserError(f"reference.path: {path}: its vocabulary ({theirs} tokens) differs from "
                        f"the policy's ({mine}); the reference must share the policy's tokenizer")
    return ref


def run_dpo(recipe: DPORecipe, resume: bool = False, overwrite: bool = False,
            hooks: Hooks | None = None) -> dict[str, float]:
    with setup_run(recipe, resume, overwrite) as rt:
        d, tr, p = recipe.data, recipe.train, rt.precision
        train_ex, eval_ex, report = load_examples(d, "preference")
        model, tok = load_policy(recipe.policy, rt.device, p.master_dtype,
                                 freeze_bottom_layers=tr.freeze_bottom_layers)
        if recipe.run.strategy != "fsdp":  # an FSDP unit needs one dtype
            p.store_frozen(model)
        check_positions(model, d.max_len, "data.max_len")
        train_items, eval_items = tokenized_pairs(tok, d, train_ex, eval_ex, report)
        collate = lambda items: to_device(collate_dpo(items, tok.pad_token_id),  # noqa: E731
                                          rt.device)
        ebs = tr.eval_batch_size or tr.micro_batch_size
        ref = load_dpo_reference(recipe, model, rt)
        hooks = hooks or Hooks()
        if tr.precompute_reference:
            # Before training (and before a resumed run loads its weights): the policy here is
            # still the initial one. It is one forward per pair and prints nothing else: say so,
            # or a run quiet for minutes before step 1 looks hung.
            console.print(f"dpo: reference log-probs of {len(train_items)} + {len(eval_items)} "
                          "pairs, once, before step 1")
            with hooks.wrap("reference"):
                attach_reference(model, ref, [train_items, eval_items], collate, ebs, rt.dist,
                                 p.autocast)
            ref = None  # freed: the items carry everything it would compute
        task = SupervisedTask(
            model=model, train_items=train_items, collate=collate,
            loss_fn=partial(dpo_batch_loss, ref=ref, cfg=recipe.dpo),
            evaluate=lambda m: dpo_eval(m, ref, eval_items, collate, ebs, recipe.dpo, rt.dist),
            save_model=saver(tok), name="dpo", dist=rt.dist,
            sharded=recipe.run.strategy == "fsdp" and rt.dist.enabled,
            info={"rows": {"train": len(train_items), "held_out": len(eval_items)}},
        )
        final = run_supervised(task, Setup(recipe.run, tr, recipe.logging, p,
                                           recipe.model_dump(mode="json"), rt.resume_from,
                                           hooks, rt.begin))
    console.print(f"[green]dpo done[/]: {Path(recipe.run.output_dir) / 'final'}  "
                  + "  ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return final
