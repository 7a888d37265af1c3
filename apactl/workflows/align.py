"""``apactl align --algo apa|ppo|awr``: set up the models, then run the one RL loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apactl import checkpoint as ckpt
from apactl.config import AlignRecipe
from apactl.distributed import Dist
from apactl.errors import UserError
from apactl.metrics import MetricsLogger, Progress, Timer, console
from apactl.rl.advantages import kl_estimates
from apactl.rl.kl_control import AdaptiveKLController, FixedKLController
from apactl.rl.loop import (
    Actors,
    Optimizers,
    ScoreStats,
    Warnings,
    add_advantages,
    collect_rollout,
    iteration_metrics,
    update,
)
from apactl.runtime import Runtime, setup_run

PHASES = ("generate", "score", "reward", "update")


class PromptSampler:
    """Prompts of iteration i: a pure function of (seed, i), so resume needs only i."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed

    def indices(self, iteration: int) -> list[int]:
        start = iteration * self.batch
        out: list[int] = []
        while len(out) < self.batch:
            epoch, pos = divmod(start + len(out), self.n)
            g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            out += perm[pos:pos + self.batch - len(out)]
        return out


def build_actors(recipe: AlignRecipe, rt: Runtime) -> tuple[Actors, Any]:
    from apactl.generation import eos_ids
    from apactl.judges import make_judge
    from apactl.models import (
        load_policy,
        load_reference,
        load_sequence_classifier,
        resolve_model_ref,
    )

    tr = recipe.train
    policy, tok = load_policy(recipe.policy, rt.device, rt.dtype,
                              freeze_bottom_layers=tr.freeze_bottom_layers)
    ref = load_reference(policy, recipe.policy, rt.device, rt.dtype)
    rw = recipe.reward
    judge = make_judge(rw.judge, rw.name_or_path, {**rw.args, "normalize": rw.normalize},
                       device=rt.device, dtype=rt.dtype, batch_size=rw.batch_size)
    if recipe.critic.init == "reward":
        critic_src = judge.path
    else:
        critic_src = resolve_model_ref(recipe.policy.name_or_path, recipe.policy.cache_dir)
    freeze = recipe.critic.freeze_bottom_layers
    critic, critic_tok = load_sequence_classifier(
        critic_src, rt.device, rt.dtype, trainable=True,
        freeze_bottom_layers=tr.freeze_bottom_layers if freeze is None else freeze)
    if critic_tok.get_vocab() != tok.get_vocab():
        raise UserError("critic.init: the reward model's tokenizer differs from the policy's, "
                        "so it cannot value policy tokens; set critic.init=policy")
    return Actors(policy, ref, critic, judge, tok, eos_ids(policy, tok), rt.device,
                  engine=_engine(recipe, policy, ref, critic, getattr(judge, "model", None))), tok


def _engine(recipe: AlignRecipe, policy, ref, critic, reward_model=None):
    """Plan the forwards. Models whose frozen bottom layers hold equal weights share those
    modules (one copy in memory): the reference and the policy always (the reference is the
    initial policy), the critic and the reward model when they were trained from the same base
    with the same layers frozen (share_bottom compares the weights). Policy, reference and a
    critic sharing the policy's modules then also share one trunk computation per rollout."""
    from apactl.rl.engine import Engine
    from apactl.rl.trunk import share_bottom

    tr, k = recipe.train, recipe.train.freeze_bottom_layers
    critic_k = recipe.critic.freeze_bottom_layers
    critic_k = k if critic_k is None else critic_k
    if tr.reuse_frozen_trunk and k > 0:
        if ref is not None:
            share_bottom(policy, ref, k)  # the reference keeps only its own top layers
        if reward_model is not None:
            share_bottom(policy, reward_model, k)
        if critic_k == k:
            share_bottom(policy, critic, k)
    if tr.reuse_frozen_trunk and critic_k > 0 and reward_model is not None:
        share_bottom(reward_model, critic, critic_k)  # a LoRA policy shares nothing; these may
    return Engine(policy, ref, critic, k=k, reuse_trunk=tr.reuse_frozen_trunk,
                  warn=lambda msg: console.print(f"[yellow]warning:[/] {msg}"))


def make_optimizers(actors: Actors, recipe: AlignRecipe) -> Optimizers:
    from transformers import get_scheduler

    tr = recipe.train
    steps = tr.derived()["total_optimizer_steps"]

    def one(model, lr):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=tr.weight_decay)
        return opt, get_scheduler(tr.schedule, opt, num_warmup_steps=tr.warmup_steps,
                                  num_training_steps=steps)

    p_opt, p_sched = one(actors.policy, tr.lr)
    c_opt, c_sched = one(actors.critic, recipe.critic.lr or tr.lr)
    return Optimizers(p_opt, p_sched, c_opt, c_sched)


def make_kl(recipe: AlignRecipe):
    kl = recipe.kl
    if kl.adaptive:
        return AdaptiveKLController(kl.beta, kl.target, kl.horizon)
    return FixedKLController(kl.beta)


def _save(out: Path, it: int, actors: Actors, opts: Optimizers, kl_ctl, score_stats: ScoreStats,
          keep: int, dist: Dist) -> None:
    from apactl.models import save_model

    if not dist.is_main:  # every rank holds the same (global) state: rank 0 writes it
        dist.barrier()
        return

    def write(folder: Path) -> None:
        save_model(actors.policy, actors.tokenizer, folder / "policy", merge_lora=False)
        save_model(actors.critic, actors.tokenizer, folder / "critic", merge_lora=False)

    state = {"step": it, "optimizers": opts.state_dict(), "kl": kl_ctl.state_dict(),
             "rng": ckpt.rng_state(), "score_stats": vars(score_stats)}
    ckpt.save_checkpoint(out, it, write, state, keep=keep)
    dist.barrier()


def _resume(out: Path, actors: Actors, opts: Optimizers, kl_ctl) -> tuple[int, ScoreStats]:
    last = ckpt.latest_checkpoint(out)
    if last is None:
        console.print(f"[yellow]--resume: no checkpoint in {out}; starting from scratch")
        return 0, ScoreStats()
    ckpt.load_weights(actors.policy, last / "policy")
    ckpt.load_weights(actors.critic, last / "critic")
    state = ckpt.load_state(last)
    opts.load_state_dict(state["optimizers"])
    kl_ctl.load_state_dict(state["kl"])
    ckpt.set_rng_state(state["rng"])
    console.print(f"resumed from {last} (iteration {state['step']})")
    return int(state["step"]), ScoreStats(**state["score_stats"])


def _tokenized_prompts(recipe: AlignRecipe, tok) -> tuple[list[dict], list[dict]]:
    from apactl.data import fit_prompts, load_examples, tokenize_prompts

    d = recipe.data
    train_ex, eval_ex, report = load_examples(d, "prompt")
    args = (d.max_prompt_len, d.on_bad_row, report.source)
    train, s1 = tokenize_prompts(tok, fit_prompts(tok, train_ex, d), *args)
    held, s2 = tokenize_prompts(tok, fit_prompts(tok, eval_ex, d), *args)
    skipped = report.n_skipped + s1 + s2
    console.print(f"data: {report.source}: {len(train)} train / {len(held)} held-out prompts"
                  + (f" ({skipped} bad rows skipped)" if skipped else ""))
    if len(train) == 0:
        raise UserError(f"data.source: no usable prompts in {report.source}")
    return train, held


def run_align(recipe: AlignRecipe, resume: bool = False) -> dict[str, float]:
    rt = setup_run(recipe)
    dist = rt.dist
    actors, tok = build_actors(recipe, rt)
    prompts, held_out = _tokenized_prompts(recipe, tok)
    opts = make_optimizers(actors, recipe)
    kl_ctl = make_kl(recipe)
    out, tr = rt.output_dir, recipe.train
    start, score_stats = (_resume(out, actors, opts, kl_ctl) if resume else (0, ScoreStats()))
    logger = MetricsLogger(out, recipe.logging.tensorboard, enabled=dist.is_main,
                           resume_step=start if resume else None)
    progress = Progress(tr.iterations, f"align/{recipe.algo.name}",
                        recipe.logging.progress and dist.is_main, start=start)
    sampler = PromptSampler(len(prompts), tr.rollout_batch_size, recipe.run.seed)
    warn = Warnings(lambda msg: console.print(f"[yellow]warning:[/] {msg}"))
    pad_id = tok.pad_token_id
    last: dict[str, float] = {}
    try:
        for it in range(start, tr.iterations):
            last = _iteration(actors, opts, kl_ctl, recipe, sampler, prompts, it, pad_id,
                              score_stats, dist)
            warn.check(last, recipe.generation.max_new_tokens)
            if tr.eval_every and (it + 1) % tr.eval_every == 0 and held_out:
                last.update(evaluate_prompts(actors, held_out, recipe, pad_id, dist, it))
            logger.log(it + 1, last)
            progress.update(1, reward=last["reward/score_mean"], kl=last["kl/ref_k1"],
                            len=last["response/length_mean"])
            if tr.save_every and (it + 1) % tr.save_every == 0 and it + 1 < tr.iterations:
                _save(out, it + 1, actors, opts, kl_ctl, score_stats, tr.keep_checkpoints, dist)
        _save(out, tr.iterations, actors, opts, kl_ctl, score_stats, tr.keep_checkpoints, dist)
        _save_final(out, actors, dist)
    finally:
        progress.close()
        logger.close()
    console.print(f"[green]align/{recipe.algo.name} done[/]: {out / 'final' / 'policy'}")
    return last


def _iteration(actors, opts, kl_ctl, recipe: AlignRecipe, sampler, prompts, it: int,
               pad_id: int, score_stats: ScoreStats, dist: Dist | None = None) -> dict[str, float]:
    dist = dist or Dist()
    timer = Timer()
    batch = [prompts[i] for i in sampler.indices(it)]  # the global batch, the same on every rank
    beta = kl_ctl.value
    ro, _texts, ro_stats = collect_rollout(actors, batch, recipe, beta, timer, pad_id, dist,
                                           seed_key=(1, it))
    score_stats.update(ro.scores.cpu())
    adv_stats = add_advantages(ro, recipe, beta)
    train_policy = it >= recipe.critic.warmup_iterations
    with timer("update"):
        upd = update(actors, opts, ro, recipe, it, train_policy, pad_id, dist)
    kl_ctl.update(adv_stats["kl/ref_k1"], ro.batch_size)
    n_tokens = int(ro.response_mask.sum())
    times = timer.pop()
    # A rank may own no generation chunk: every rank must pass the same keys to mean_dict.
    times = dist.mean_dict({k: times.get(k, 0.0) for k in PHASES})
    m = iteration_metrics(ro_stats, adv_stats, upd, times, ro.batch_size, n_tokens, opts)
    m["reward/running_mean"] = score_stats.mean
    m["reward/running_std"] = score_stats.std
    return m


def evaluate_prompts(actors: Actors, held_out: list[dict], recipe: AlignRecipe,
                     pad_id: int, dist: Dist | None = None, it: int = 0) -> dict[str, float]:
    """Judge score and KL on (up to 64) held-out prompts with the recipe's sampling settings."""
    batch = held_out[:64]
    timer = Timer()
    scores, k1 = [], []
    step = recipe.train.rollout_batch_size
    for i in range(0, len(batch), step):
        ro, _, _ = collect_rollout(actors, batch[i:i + step], recipe, 0.0, timer, pad_id, dist,
                                   seed_key=(2, it, i))
        scores.append(ro.scores.cpu())
        k1.append(kl_estimates(ro.old_logprobs, ro.ref_logprobs, ro.response_mask)["k1"].cpu())
    return {"eval/score_mean": torch.cat(scores).mean().item(),
            "eval/kl_k1": torch.cat(k1).mean().item()}


def _save_final(out: Path, actors: Actors, dist: Dist) -> None:
    from apactl.models import save_model

    if not dist.is_main:
        dist.barrier()
        return

    def write(folder: Path) -> None:
        save_model(actors.policy, actors.tokenizer, folder / "policy", merge_lora=True)
        save_model(actors.critic, actors.tokenizer, folder / "critic", merge_lora=True)

    ckpt.write_folder_atomic(out / "final", write)
    dist.barrier()
