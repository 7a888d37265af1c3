"""The one RL loop shared by APA, PPO and AWR: rollout -> advantages -> update -> log -> save.

Everything except ``algos.policy_loss`` is identical across algorithms, so comparisons between
them measure the loss and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from apactl.config import AlignRecipe
from apactl.distributed import Dist, chunk_seed
from apactl.generation import sample
from apactl.rl.advantages import gae, kl_estimates, kl_penalized_rewards, masked_mean, masked_whiten
from apactl.rl.algos import policy_loss
from apactl.rl.losses import value_loss
from apactl.rl.scoring import build_sequences, fit_width
from apactl.rl.types import Rollout


@dataclass
class Actors:
    """Every model the loop touches. ``ref is None`` means: the policy with LoRA disabled."""

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    critic: torch.nn.Module
    judge: Any  # apactl.judges.Judge
    tokenizer: Any
    eos: list[int]
    device: torch.device
    engine: Any = None  # rl.engine.Engine; None: the plain forwards

    def __post_init__(self) -> None:
        if self.engine is None:
            from apactl.rl.engine import Engine

            self.engine = Engine(self.policy, self.ref, self.critic, k=0, reuse_trunk=False)


@dataclass
class Optimizers:
    policy: torch.optim.Optimizer
    policy_sched: Any
    critic: torch.optim.Optimizer
    critic_sched: Any

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).state_dict() for k in
                ("policy", "policy_sched", "critic", "critic_sched")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            getattr(self, k).load_state_dict(v)


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


@dataclass
class Warnings:
    """Plain warnings, each printed once."""

    emit: Callable[[str], None]
    seen: set[str] = field(default_factory=set)
    negative_kl_streak: int = 0

    def once(self, key: str, msg: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.emit(msg)

    def check(self, m: dict[str, float], max_new_tokens: int) -> None:
        self.negative_kl_streak = self.negative_kl_streak + 1 if m["kl/ref_k1"] < -0.05 else 0
        if self.negative_kl_streak >= 5:
            self.once("kl", "KL estimate to the reference has been negative for 5 iterations: "
                      "the sampling and scoring distributions disagree (temperature, top_k/top_p, "
                      "or padding).")
        if m["policy/entropy"] < 0.05:
            self.once("entropy",
                      f"policy entropy collapsed to {m['policy/entropy']:.3f} nats/token")
        if m["response/eos_rate"] == 0.0:
            self.once("maxlen", f"every response hit max_new_tokens={max_new_tokens} without EOS")


def judge_scores(actors: Actors, prompts: list[dict], response_ids: Tensor,
                 mask: Tensor) -> tuple[list[str], Tensor]:
    """Decode responses and score the text: the judge tokenises it with its own tokenizer."""
    ids = [row[: int(m.sum())].tolist() for row, m in zip(response_ids.cpu(), mask.cpu())]
    texts = actors.tokenizer.batch_decode(ids, skip_special_tokens=True)
    scores = actors.judge.score([p["messages"] for p in prompts], texts)
    return texts, torch.as_tensor(scores, dtype=torch.float32)


def rollout_chunk_size(recipe: AlignRecipe, n: int, world_size: int) -> int:
    """Prompts per generate() call: ``generation.batch_size``, else one chunk per rank."""
    return recipe.generation.batch_size or max(-(-n // world_size), 1)


@torch.no_grad()
def collect_rollout(actors: Actors, prompts: list[dict], recipe: AlignRecipe, beta: float,
                    timer, pad_id: int, dist: Dist | None = None,
                    seed_key: tuple[int, ...] = (0,)) -> tuple[Rollout, list[str], dict]:
    """Generate and score one global batch of prompts; every rank returns the whole Rollout.

    The batch is cut into chunks; chunk j is sampled with a seed derived from
    (run.seed, *seed_key, j) and scored by rank j % world_size, then the ranks exchange their
    chunks. So the rollout does not depend on the world size (for a fixed chunk size), resume is
    exact, and everything after it (advantages, whitening, KL control, metrics) sees the global
    batch on every rank with no further communication.
    """
    dist = dist or Dist()
    size = rollout_chunk_size(recipe, len(prompts), dist.world_size)
    mine = {}
    for j, start in enumerate(range(0, len(prompts), size)):
        if dist.owns(j):
            torch.manual_seed(chunk_seed(recipe.run.seed, *seed_key, j))
            mine[j] = _rollout_chunk(actors, prompts[start:start + size], recipe, timer, pad_id,
                                     recipe.train.forward_batch(dist.world_size))
    chunks = dist.gather_chunks(mine)
    ro, ent, ended = _merge_chunks(chunks, pad_id, actors.device)
    mask = ro.response_mask
    stats = {"policy/entropy": masked_mean(ent, mask).item(),
             "response/length_mean": mask.sum(1).mean().item(),
             "response/eos_rate": ended.float().mean().item()}
    return ro, [t for c in chunks for t in c["texts"]], stats


def _rollout_chunk(actors: Actors, prompts: list[dict], recipe: AlignRecipe, timer, pad_id: int,
                   fb: int) -> dict[str, Any]:
    """Sample and score one chunk; CPU tensors (they travel between ranks)."""
    from apactl.data import left_pad

    gen, dev = recipe.generation, actors.device
    q_ids, q_mask = left_pad([p["input_ids"] for p in prompts], pad_id)
    q_ids, q_mask = q_ids.to(dev), q_mask.to(dev)
    actors.policy.eval()
    with timer("generate"):
        resp, mask = sample(actors.policy, q_ids, q_mask, gen, actors.eos, pad_id)
    with timer("score"):
        seq = build_sequences(q_ids, q_mask, resp, mask, pad_id)
        width = seq.input_ids.shape[1]
        parts = [actors.engine.score(seq.rows(s), resp[s], gen.temperature)
                 for s in (slice(i, i + fb) for i in range(0, resp.shape[0], fb))]
        scored = {k: torch.cat([fit_width(p[k], width) if k.endswith("_trunk") else p[k]
                                for p in parts]) for k in parts[0]}
    with timer("reward"):
        texts, raw = judge_scores(actors, prompts, resp, mask)
    ended = (torch.isin(resp, torch.tensor(actors.eos, device=dev)) & mask.bool()).any(1)
    out = {"query_ids": q_ids, "query_mask": q_mask, "response_ids": resp, "response_mask": mask,
           "scores": raw, "ended": ended, **scored}
    return {**{k: v.cpu() for k, v in out.items()}, "texts": texts}


def _merge_chunks(chunks: list[dict], pad_id: int, device) -> tuple[Rollout, Tensor, Tensor]:
    """Chunks -> one Rollout (prompts re-left-padded, responses re-right-padded to the widest)."""
    p = max(c["query_ids"].shape[1] for c in chunks)
    t = max(c["response_ids"].shape[1] for c in chunks)

    def cat(key: str, width: int, value: float = 0, left: bool = False) -> Tensor:
        def pad(x: Tensor) -> Tensor:
            extra = width - x.shape[1]
            return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)
        return torch.cat([pad(c[key]) for c in chunks]).to(device)

    def rows(key: str) -> Tensor:
        return torch.cat([c[key] for c in chunks]).to(device)

    def trunk(key: str) -> Tensor | None:
        if key not in chunks[0]:
            return None
        width = max(c[key].shape[1] for c in chunks)
        return torch.cat([fit_width(c[key], width) for c in chunks]).to(device)

    ro = Rollout(cat("query_ids", p, pad_id, left=True), cat("query_mask", p, left=True),
                 cat("response_ids", t, pad_id), cat("response_mask", t),
                 old_logprobs=cat("old_logprobs", t), ref_logprobs=cat("ref_logprobs", t),
                 values=cat("values", t), scores=rows("scores"),
                 policy_trunk=trunk("policy_trunk"), critic_trunk=trunk("critic_trunk"))
    return ro, cat("entropy", t), rows("ended")


def shape_scores(raw: Tensor, recipe: AlignRecipe) -> Tensor:
    """Clip the (already normalised, if asked) judge scores."""
    clip = recipe.reward.clip
    return raw.clamp(-clip, clip) if clip else raw


def add_advantages(ro: Rollout, recipe: AlignRecipe, beta: float) -> dict[str, float]:
    """KL-penalised rewards -> GAE -> (optionally whitened) advantages, in place on ``ro``."""
    mask = ro.response_mask
    ro.rewards = kl_penalized_rewards(shape_scores(ro.scores, recipe), ro.old_logprobs,
                                      ro.ref_logprobs, mask, beta)
    adv, ro.returns = gae(ro.rewards, ro.values, mask, recipe.gae.gamma, recipe.gae.lam)
    ro.advantages = masked_whiten(adv, mask) if recipe.gae.whiten else adv
    kl = kl_estimates(ro.old_logprobs, ro.ref_logprobs, mask)
    return {
        "reward/score_mean": ro.scores.mean().item(),
        "reward/score_std": ro.scores.std().item() if ro.batch_size > 1 else 0.0,
        "kl/ref_k1": kl["k1"].mean().item(),
        "kl/ref_k3": kl["k3"].mean().item(),
        "kl/beta": beta,
        "adv/mean_raw": masked_mean(adv, mask).item(),
        "adv/std_raw": masked_mean((adv - masked_mean(adv, mask)) ** 2, mask).sqrt().item(),
        "critic/explained_var": explained_variance(ro.values, ro.returns, mask),
    }


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1 = perfect critic, <= 0 = useless)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return (1 - var_d / var_r).item() if var_r > 0 else float("nan")


def update(actors: Actors, opts: Optimizers, ro: Rollout, recipe: AlignRecipe, iteration: int,
           train_policy: bool, pad_id: int, dist: Dist | None = None) -> dict[str, float]:
    """``epochs_per_rollout`` passes of shuffled minibatches with grad accumulation.

    Every rank draws the same permutation of the global rollout; each minibatch is cut into
    grad_accum x world_size micro-batches, micro-batch j being rank j % world_size's
    accumulation step j // world_size; gradients are averaged over ranks before clipping.
    """
    dist = dist or Dist()
    tr = recipe.train
    gen = torch.Generator().manual_seed(recipe.run.seed * 100_003 + iteration)
    actors.policy.train()
    actors.critic.train()
    sums: dict[str, float] = {}
    n_steps = 0
    for _ in range(tr.epochs_per_rollout):
        for mb in ro.minibatches(tr.minibatch_size, gen):
            step_stats = _optimizer_step(actors, opts, mb, recipe, train_policy, pad_id, dist)
            for k, v in step_stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
    return dist.mean_dict({k: v / max(n_steps, 1) for k, v in sums.items()})


def _optimizer_step(actors: Actors, opts: Optimizers, mb: Rollout, recipe: AlignRecipe,
                    train_policy: bool, pad_id: int, dist: Dist) -> dict[str, float]:
    tr, accum = recipe.train, recipe.train.grad_accum
    micro = mb.batch_size // (accum * dist.world_size)
    stats: dict[str, float] = {}
    for k in range(accum):
        j = k * dist.world_size + dist.rank  # this rank's k-th micro-batch of the minibatch
        m = mb.index(torch.arange(j * micro, (j + 1) * micro))
        seq = build_sequences(m.query_ids, m.query_mask, m.response_ids, m.response_mask, pad_id)
        loss = torch.zeros((), device=actors.device)
        if train_policy:
            logp = actors.engine.policy_logprobs(seq, m.response_ids,
                                                 recipe.generation.temperature, m.policy_trunk)
            p_loss, p_stats = policy_loss(recipe.algo, logp, m)
            loss = loss + p_loss
            _accumulate(stats, p_stats, accum)
            stats["loss/policy"] = stats.get("loss/policy", 0.0) + p_loss.item() / accum
        v_new = actors.engine.values(seq, m.critic_trunk)
        v_loss, v_stats = value_loss(v_new, m.values, m.returns, m.response_mask,
                                     recipe.critic.clip)
        loss = loss + recipe.algo.vf_coef * v_loss
        _accumulate(stats, v_stats, accum)
        stats["loss/value"] = stats.get("loss/value", 0.0) + v_loss.item() / accum
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()})")
        stats["loss/total"] = stats.get("loss/total", 0.0) + loss.item() / accum
        (loss / accum).backward()
    if train_policy:
        stats["policy/grad_norm"] = _clip_and_step(actors.policy, opts.policy, opts.policy_sched,
                                                   tr.max_grad_norm, dist)
    stats["critic/grad_norm"] = _clip_and_step(actors.critic, opts.critic, opts.critic_sched,
                                               tr.max_grad_norm, dist)
    return stats


def _accumulate(into: dict[str, float], stats: dict[str, float], accum: int) -> None:
    for k, v in stats.items():
        into[k] = into.get(k, 0.0) + v / accum


def _clip_and_step(model, opt, sched, max_norm: float | None, dist: Dist) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    dist.all_reduce_grads(params)  # before clipping: the norm is the global minibatch's
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    if not torch.isfinite(norm):
        raise FloatingPointError(f"non-finite gradient norm ({float(norm)})")
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def iteration_metrics(ro_stats, adv_stats, upd_stats, times, n_episodes, n_tokens,
                      opts: Optimizers) -> dict[str, float]:
    total = sum(times.values())
    m = {**ro_stats, **adv_stats, **upd_stats}
    m["train/lr"] = opts.policy_sched.get_last_lr()[0]
    m["train/critic_lr"] = opts.critic_sched.get_last_lr()[0]
    m.update({f"time/{k}": v for k, v in times.items()})
    m["time/iteration"] = total
    m["perf/episodes_per_s"] = n_episodes / total if total else 0.0
    m["perf/generated_tokens_per_s"] = n_tokens / times.get("generate", total or 1.0)
    return m
