"""The one RL loop shared by every algorithm: rollout -> advantages -> update -> log -> save.

Everything except ``rl.algos.policy_loss`` is identical across algorithms, so comparisons
between them measure the loss and nothing else. The loop's lifecycle, in order:

    start      resume the checkpoint the run folder named (weights, optimizers, KL, RNG)
    iteration  rollout (generate, verify once, score, reward) -> advantages -> update
    evaluate   every ``eval_every`` iterations: judge score and KL on held-out prompts
    save       every ``save_every`` iterations, and at the end (checkpoint + ``final/``)

``Hooks`` (``apactl.hooks``) observe it: phases, rollouts, steps and saves.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apactl import checkpoint as ckpt
from apactl.hooks import Hooks
from apactl.metrics import MetricsLogger, Progress, Timer, console
from apactl.rl.advantages import AdvantageSpec, add_advantages, kl_estimates
from apactl.rl.rollout import Actors, RolloutPlan, collect_rollout, repeat_prompts
from apactl.rl.update import UpdatePlan, update
from apactl.sampling import Stream
from apactl.training import Optimization, resume, save, save_final, stop_requested, stopped

PHASES = ("generate", "verify", "offload", "score", "reward", "update")


@dataclass
class LoopPlan:
    """The iteration schedule and the reward shaping between rollout and update."""

    iterations: int
    rollout_batch_size: int  # episodes: rollout_batch_size / samples_per_prompt prompts
    eval_every: int
    save_every: int | None  # None: only at the end
    keep_checkpoints: int
    critic_warmup: int  # iterations that train only the critic
    advantage: AdvantageSpec
    max_new_tokens: int
    eval_prompts: int = 64

    @property
    def samples_per_prompt(self) -> int:
        return self.advantage.group_size


@dataclass
class RLRun:
    """Everything one align run is made of (built by ``workflows.align``)."""

    actors: Actors
    opt: Optimization
    kl: Any  # rl.kl_control controller
    prompts: list[dict]
    held_out: list[dict]
    rollout: RolloutPlan
    update: UpdatePlan
    plan: LoopPlan
    out: Path
    recipe: dict[str, Any]  # the resolved recipe, stored in every checkpoint
    name: str = "align"
    logging: Any = True  # the recipe's LoggingConfig (a bool: TensorBoard alone, on or off)
    progress: bool = True
    resume_from: Path | None = None
    eval_judges: dict[str, Any] = field(default_factory=dict)  # held-out only, never trained on
    eval_offload: Any = None  # apactl.offload.Offload of the eval judges' models (or None)
    hooks: Hooks = field(default_factory=Hooks)
    begin: Callable[[], None] = lambda: None  # the run starts for real (Runtime.begin)


@dataclass
class ScoreStats:
    """Running mean/std of raw judge scores (Welford), checkpointed with the run."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: Tensor) -> None:
        for v in x.tolist():
            self.n += 1
            d = v - self.mean
            self.mean += d / self.n
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 0.0


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


# Iterations in which no response ended before the maxlen warning fires: one iteration of
# cut answers is normal for short max_new_tokens (the quickstart cuts at 32 on purpose).
MAXLEN_PATIENCE = 5


@dataclass
class Warnings:
    """Plain warnings, each printed once, about things a user can act on."""

    emit: Callable[[str], None]
    seen: set[str] = field(default_factory=set)
    negative_kl_streak: int = 0
    iterations: int = 0  # iterations checked so far
    any_eos: bool = False  # some response of a checked iteration ended

    def once(self, key: str, msg: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.emit(msg)

    def check(self, m: dict[str, float], max_new_tokens: int, episodes: int = 0) -> None:
        """Look at one iteration's metrics (``kl/ref_k1``, ``policy/entropy``,
        ``response/eos_rate``, ``reward/score_*`` of its ``episodes`` responses)."""
        std, mean = m.get("reward/score_std"), m.get("reward/score_mean", 0.0)
        if episodes > 1 and std is not None and std <= 1e-6 * max(1.0, abs(mean)):
            self.once("constant", f"all {episodes} responses of a rollout got the same score "
                      f"({mean:.6g}): the reward gives the policy nothing to learn from (a "
                      "reward model whose output does not depend on the text?)")
        self.negative_kl_streak = self.negative_kl_streak + 1 if m["kl/ref_k1"] < -0.05 else 0
        if self.negative_kl_streak >= 5:
            self.once("kl", "KL estimate to the reference has been negative for 5 iterations: "
                      "the sampling and scoring distributions disagree (temperature or padding)")
        if m["policy/entropy"] < 0.05:
            self.once("entropy",
                      f"policy entropy collapsed to {m['policy/entropy']:.3f} nats/token")
        self.iterations += 1
        self.any_eos = self.any_eos or m["response/eos_rate"] > 0.0
        if self.iterations == MAXLEN_PATIENCE and not self.any_eos:
            self.once("maxlen", f"responses never end before generation.max_new_tokens="
                      f"{max_new_tokens}: raise it if answers should be complete; short, cut "
                      "answers are fine for a quick run")


def run_rl(run: RLRun) -> dict[str, float]:
    """Run (or resume) the iterations; returns the last iteration's metrics."""
    dist, plan = run.opt.dist, run.plan
    start, stats = _start(run)
    run.begin()
    logger = MetricsLogger(run.out, run.logging, enabled=dist.is_main,
                           resume_step=start if run.resume_from is not None else None,
                           recipe=run.recipe)
    progress = Progress(plan.iterations, run.name, run.progress and dist.is_main, start=start)
    sampler = PromptSampler(len(run.prompts), plan.rollout_batch_size // plan.samples_per_prompt,
                            run.update.seed)
    warn = Warnings(lambda msg: console.print(f"[yellow]warning:[/] {msg}"))
    last: dict[str, float] = {}
    failed = True
    try:
        for it in range(start, plan.iterations):
            last = iteration(run, sampler, it, stats)
            warn.check(last, plan.max_new_tokens, plan.rollout_batch_size)
            if plan.eval_every and (it + 1) % plan.eval_every == 0 and run.held_out:
                last.update(evaluate_held_out(run, it))
            logger.log(it + 1, last)
            progress.update(1, reward=last["reward/score_mean"], kl=last["kl/ref_k1"],
                            len=last["response/length_mean"])
            run.hooks.call("on_step_end", it + 1, last)
            saved = bool(plan.save_every) and (it + 1) % plan.save_every == 0
            if saved and it + 1 < plan.iterations:
                _save(run, it + 1, stats)
            if it + 1 < plan.iterations and stop_requested(dist):  # SIGTERM: checkpoint, leave
                if not saved:
                    _save(run, it + 1, stats)
                raise stopped(run.out, it + 1)
        _save(run, plan.iterations, stats)
        weights = _full_weights(run)
        save_final(run.out, lambda folder, final: _write_models(run, folder, final, weights,
                                                                logger),
                   dist, plan.keep_checkpoints)
        failed = False
    finally:
        progress.close()
        logger.close(failed)
    return last


def _start(run: RLRun) -> tuple[int, ScoreStats]:
    def load(folder: Path) -> None:
        if run.actors.sharded:  # checkpoints hold unsharded folders: every rank reads them
            from apactl.fsdp import load_full_weights

            for name, model in _trained(run.actors).items():
                load_full_weights(model, folder / name)
            return
        for name, model in _trained(run.actors).items():
            ckpt.load_weights(model, folder / name)

    start, state = resume(run.resume_from, load, run.opt)
    if state:
        run.kl.load_state_dict(state["kl"])
        run.actors.sync_sampler()
    run.hooks.call("on_start", {"policy": run.actors.policy, "critic": run.actors.critic,
                                "judge": run.actors.judge, "actors": run.actors})
    return start, ScoreStats(**state["score_stats"]) if state else ScoreStats()


def iteration(run: RLRun, sampler: PromptSampler, it: int, stats: ScoreStats
              ) -> dict[str, float]:
    """One iteration: rollout -> advantages -> update; returns its metrics."""
    dist, plan, timer = run.opt.dist, run.plan, Timer(run.hooks.wrap, run.actors.device)
    batch = [run.prompts[i] for i in sampler.indices(it)]  # the global batch, on every rank
    beta, k = run.kl.value, plan.samples_per_prompt
    run.hooks.call("on_rollout_start", it)
    ro, texts, ro_stats = collect_rollout(run.actors, batch, run.rollout, timer, Stream.ROLLOUT,
                                          (it,), dist, samples=k)
    run.hooks.call("on_rollout", it, ro, texts, repeat_prompts(batch, k))
    stats.update(ro.scores.cpu())
    adv_stats = add_advantages(ro, beta, plan.advantage)
    with timer("update"):
        upd = update(run.actors, run.opt, ro, run.update, it, it >= plan.critic_warmup, beta)
        run.actors.sync_sampler()
    run.kl.update(adv_stats["kl/ref_k1"], ro.batch_size)
    # A rank may own no generation chunk: every rank must pass the same keys to mean_dict.
    times, mem = timer.pop(), timer.pop_memory()
    times = dist.mean_dict({k: times.get(k, 0.0) for k in PHASES})
    m = _metrics(ro_stats, adv_stats, upd, times, ro.batch_size,
                 int(ro.response_mask.sum()), run.opt)
    if mem:
        m.update({f"gpu/mem_peak_gb_{k}": v for k, v in mem.items()})
        m["gpu/mem_peak_gb"] = max(mem.values())
    m["reward/running_mean"], m["reward/running_std"] = stats.mean, stats.std
    return m


def _metrics(ro_stats, adv_stats, upd_stats, times, n_episodes, n_tokens,
             opt: Optimization) -> dict[str, float]:
    total = sum(times.values())
    m = {**ro_stats, **adv_stats, **upd_stats}
    m["train/lr"] = opt.trainees["policy"].lr
    if "critic" in opt.trainees:
        m["train/critic_lr"] = opt.trainees["critic"].lr
    m.update({f"time/{k}": v for k, v in times.items()})
    m["time/iteration"] = total
    m["perf/episodes_per_s"] = n_episodes / total if total else 0.0
    m["perf/generated_tokens_per_s"] = n_tokens / times.get("generate", total or 1.0)
    return m


def evaluate_held_out(run: RLRun, it: int) -> dict[str, float]:
    """Judge score and KL on the first ``eval_prompts`` held-out prompts with the run's sampling
    settings, and the scores of the evaluation-only judges (``eval/<label>_mean``)."""
    batch, step = run.held_out[:run.plan.eval_prompts], run.plan.rollout_batch_size
    timer = Timer(run.hooks.wrap)
    scores, k1, answers = [], [], []
    for i in range(0, len(batch), step):
        part = batch[i:i + step]
        ro, texts, _ = collect_rollout(run.actors, part, run.rollout, timer, Stream.ALIGN_EVAL,
                                       (it, i), run.opt.dist)
        scores.append(ro.scores.cpu())
        k1.append(kl_estimates(ro.old_logprobs, ro.ref_logprobs, ro.response_mask)["k1"].cpu())
        answers += texts
    # The evaluation-only judges score every answer at once: offloaded, they visit the device
    # once per evaluation.
    with run.eval_offload.on_device() if run.eval_offload else contextlib.nullcontext():
        extra = {k: judge.score([p["messages"] for p in batch], answers)
                 for k, judge in run.eval_judges.items()}
    out = {"eval/score_mean": torch.cat(scores).mean().item(),
           "eval/kl_k1": torch.cat(k1).mean().item()}
    out.update({f"eval/{k}_mean": sum(v) / len(v) for k, v in extra.items() if v})
    return out


def _trained(actors: Actors) -> dict[str, torch.nn.Module]:
    """The models a checkpoint holds: the policy, and the critic when there is one."""
    return {"policy": actors.policy,
            **({"critic": actors.critic} if actors.critic is not None else {})}


def _full_weights(run: RLRun) -> dict[str, dict]:
    """{"policy": ..., "critic": ...} unsharded on rank 0 under fsdp (a collective: every rank
    calls it), else {} (the models' own weights are written)."""
    if not run.actors.sharded:
        return {}
    from apactl.fsdp import full_state

    return {name: full_state(model)[0] for name, model in _trained(run.actors).items()}


def _write_models(run: RLRun, folder: Path, final: bool, weights: dict[str, dict],
                  logger: MetricsLogger | None = None) -> None:
    from apactl.models import write_model

    tok = run.actors.tokenizer
    # Checkpoints keep a LoRA adapter as is (exact resume); final/ gets merged models.
    for name, model in _trained(run.actors).items():
        write_model(model, tok, folder / name, merge_lora=final, state_dict=weights.get(name))
    if final and logger is not None:
        _write_cards(run, folder, logger)


def _write_cards(run: RLRun, folder: Path, logger: MetricsLogger) -> None:
    """Model cards of final/policy and final/critic (the critic marked as a value model)."""
    import time

    from apactl.card import CardFacts, start_of, write_card
    from apactl.metrics import read_metrics

    rows = read_metrics(logger.path)
    common = dict(metrics=rows, rows={"train": len(run.prompts), "held_out": len(run.held_out)},
                  wall_s=time.time() - logger.started, resumed_from=logger.resume_step)
    write_card(folder / "policy", CardFacts(run.recipe, "policy", start_of(run.recipe),
                                            **common))
    if (folder / "critic").is_dir():  # an algorithm without a critic saves none
        write_card(folder / "critic", CardFacts(run.recipe, "value", critic_start(run.recipe),
                                                **common))


def critic_start(recipe: dict[str, Any]) -> str | None:
    """The model the critic started from: the reward model, the policy, or a saved critic."""
    init = (recipe.get("critic") or {}).get("init", "policy")
    if init == "reward":
        return (recipe.get("reward") or {}).get("path")
    if init == "policy":
        from apactl.card import start_of

        return start_of(recipe)
    return init


def _save(run: RLRun, step: int, stats: ScoreStats) -> None:
    run.hooks.call("on_save", step)
    state = {"kl": run.kl.state_dict(), "score_stats": vars(stats)}
    weights = _full_weights(run)
    save(run.out, step, lambda folder, final: _write_models(run, folder, final, weights),
         run.opt, state, run.recipe, run.plan.keep_checkpoints)
