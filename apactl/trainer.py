"""The one supervised training loop, shared by ``apactl sft`` and ``apactl rm``.

A task supplies the model, the tokenised items, a collator, a loss function and an evaluation
function; this loop owns ordering, accumulation, clipping, scheduling, logging, checkpoints and
resume. The data order is a pure function of ``(seed, epoch)``, so the data position is just the
optimizer step and resume replays exactly.

Data parallel: each optimizer step's global batch is cut into ``grad_accum x world_size`` equal
micro-batches in a fixed order; micro-batch j is rank ``j % world_size``'s accumulation step
``j // world_size``, and gradients are averaged over ranks before clipping. So one process with
grad_accum=2 and two processes with grad_accum=1 compute the same update from the same
micro-batches, and a checkpoint (all global state) resumes on any world size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apactl import checkpoint as ckpt
from apactl.config import LoggingConfig, RunConfig, TrainConfig
from apactl.distributed import Dist
from apactl.metrics import MetricsLogger, Progress, console

# loss_fn(model, batch) -> (loss, stats, n_tokens): loss is the micro-batch mean; stats are floats.
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict, int]]


@dataclass
class SupervisedTask:
    model: torch.nn.Module
    train_items: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    loss_fn: LossFn
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    save_model: Callable[[torch.nn.Module, Path, bool], None]  # (model, folder, final)
    name: str = "train"
    extra_final: Callable[[torch.nn.Module, Path], None] | None = None
    dist: Dist = field(default_factory=Dist)  # this process's rank in the job
    sharded: bool = False  # run.strategy=fsdp: the loop shards the model (apactl.fsdp)
    info: dict[str, Any] = field(default_factory=dict)
    _lengths: list[int] | None = None

    def lengths(self) -> list[int]:
        """Token count of each item (the longest sequence of a preference pair)."""
        if self._lengths is None:
            self._lengths = [max(len(v) for v in item.values() if isinstance(v, list))
                             for item in self.train_items]
        return self._lengths


def steps_per_epoch(n_items: int, train: TrainConfig) -> int:
    return n_items // train.batch_size


def total_steps(n_items: int, train: TrainConfig) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return steps_per_epoch(n_items, train) * train.epochs


def epoch_order(n_items: int, seed: int, epoch: int, lengths: list[int] | None = None,
                batch_size: int = 1) -> torch.Tensor:
    """A permutation of the items, a pure function of (seed, epoch).

    With ``lengths``: items are sorted by length inside windows of 50 batches, cut into
    batches, and the batches shuffled, so a batch holds similar lengths (less padding).
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    perm = torch.randperm(n_items, generator=g)
    if lengths is None:
        return perm
    window = batch_size * 50
    chunks = []
    for i in range(0, n_items, window):
        part = perm[i:i + window].tolist()
        part.sort(key=lambda j: lengths[j], reverse=True)
        chunks += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    full = [c for c in chunks if len(c) == batch_size]
    rest = [j for c in chunks if len(c) < batch_size for j in c]
    order = torch.randperm(len(full), generator=g).tolist()
    return torch.tensor([j for b in order for j in full[b]] + rest, dtype=torch.long)


def batch_indices(step: int, n_items: int, train: TrainConfig, seed: int,
                  lengths: list[int] | None = None) -> torch.Tensor:
    """Item indices of optimizer step ``step`` (0-based): the data position is the step."""
    spe = steps_per_epoch(n_items, train)
    epoch, within = divmod(step, spe)
    order = epoch_order(n_items, seed, epoch, lengths if train.group_by_length else None,
                        train.batch_size)
    return order[within * train.batch_size:(within + 1) * train.batch_size]


def make_optimizer(model: torch.nn.Module, train: TrainConfig, n_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warmup = train.warmup_steps or int(round(train.warmup_ratio * n_steps))
    sched = get_scheduler(train.schedule, opt, num_warmup_steps=warmup,
                          num_training_steps=max(n_steps, 1))
    return opt, sched


def run_supervised(task: SupervisedTask, run: RunConfig, train: TrainConfig,
                   logging: LoggingConfig, resume: bool = False) -> dict[str, float]:
    """Train ``task.model``; returns the final evaluation metrics (the same on every rank)."""
    dist = task.dist
    out = Path(run.output_dir)
    n = len(task.train_items)
    if steps_per_epoch(n, train) == 0:
        raise ValueError(f"train.batch_size: {train.batch_size} is larger than the "
                         f"{n} training examples")
    n_steps = total_steps(n, train)
    last = _checkpoint_to_resume(out, resume)
    if last is not None:  # full weights go in before sharding, on every rank
        ckpt.load_weights(task.model, last / "model")
    if task.sharded:
        from apactl.fsdp import shard_model

        task.model = shard_model(task.model)
    opt, sched = make_optimizer(task.model, train, n_steps)
    start = _load_trainer_state(task, opt, sched, last)
    logger = MetricsLogger(out, logging.tensorboard, enabled=dist.is_main,
                           resume_step=start if resume else None)
    progress = Progress(n_steps, task.name, logging.progress and dist.is_main, start=start)
    task.model.train()
    try:
        if start == 0 and train.eval_every:  # the "before" point of the eval curve
            logger.log(0, _evaluate(task))
        for step in range(start, n_steps):
            stats = _train_step(task, opt, sched, train, run.seed, step)
            if (step + 1) % train.log_every == 0 or step + 1 == n_steps:
                _log(logger, progress, step + 1, stats)
            else:
                progress.update(1)
            if train.eval_every and (step + 1) % train.eval_every == 0 and step + 1 < n_steps:
                logger.log(step + 1, _evaluate(task))
            if train.save_every and (step + 1) % train.save_every == 0 and step + 1 < n_steps:
                _save(task, opt, sched, out, step + 1, train.keep_checkpoints, dist)
        final = _evaluate(task)
        logger.log(n_steps, final)
        _save(task, opt, sched, out, n_steps, train.keep_checkpoints, dist)
        _save_final(task, out, dist)
    finally:
        progress.close()
        logger.close()
    return final


def _train_step(task, opt, sched, train: TrainConfig, seed: int, step: int) -> dict[str, float]:
    dist = task.dist
    t0 = time.perf_counter()
    idx = batch_indices(step, len(task.train_items), train, seed, task.lengths())
    micro = train.batch_size // (train.grad_accum * dist.world_size)
    totals: dict[str, float] = {}
    n_tokens = 0
    for k in range(train.grad_accum):
        j = k * dist.world_size + dist.rank  # this rank's k-th micro-batch of the global step
        items = [task.train_items[i] for i in idx[j * micro:(j + 1) * micro].tolist()]
        batch = task.collate(items)
        loss, stats, ntok = task.loss_fn(task.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
        (loss / train.grad_accum).backward()
        n_tokens += ntok
        for key, v in stats.items():
            totals[key] = totals.get(key, 0.0) + v / train.grad_accum
    params = [p for p in task.model.parameters() if p.requires_grad]
    if not task.sharded:  # fsdp has already averaged (reduce-scattered) its gradients
        dist.all_reduce_grads(params)  # before clipping: the norm is the global batch's
    norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm or math.inf)
    totals["train/grad_norm"] = _norm_value(norm)
    totals["train/lr"] = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    totals["perf/tokens_per_s"] = n_tokens / dt
    totals["perf/step_s"] = dt
    totals = dist.mean_dict(totals)
    totals["perf/tokens_per_s"] *= dist.world_size  # the job's throughput: sum over ranks
    return totals


def _log(logger: MetricsLogger, progress: Progress, step: int, stats: dict[str, float]) -> None:
    logger.log(step, stats)
    shown = {"loss": stats.get("train/loss", float("nan")), "lr": stats["train/lr"],
             "tok/s": round(stats["perf/tokens_per_s"])}
    if "train/accuracy" in stats:
        shown["acc"] = stats["train/accuracy"]
    progress.update(1, **shown)


def _evaluate(task: SupervisedTask) -> dict[str, float]:
    task.model.eval()
    with torch.no_grad():
        out = task.evaluate(task.model)
    task.model.train()
    return out


def _norm_value(norm: torch.Tensor) -> float:
    # Sharded gradients give a DTensor norm; its full value is the global norm.
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _global_state(task, opt) -> tuple[dict, dict[str, Any]]:
    """({"state_dict": full weights} or {}, optimizer state) as rank 0 must write them.

    ddp: every rank holds the same weights and optimizer state (gradients are averaged), so
    rank 0's own copy is the global state. fsdp: gathered unsharded (a collective).
    """
    if not task.sharded:
        return {}, opt.state_dict()
    from apactl.fsdp import full_state

    weights, opt_state = full_state(task.model, opt)
    return {"state_dict": weights}, opt_state


def _save(task, opt, sched, out: Path, step: int, keep: int, dist: Dist) -> None:
    """A checkpoint of the global state: it resumes on any world size."""
    weights, opt_state = _global_state(task, opt)
    if dist.is_main:
        state = {"step": step, "optimizer": opt_state, "scheduler": sched.state_dict(),
                 "rng": ckpt.rng_state()}
        ckpt.save_checkpoint(
            out, step, lambda d: task.save_model(task.model, d / "model", False, **weights),
            state, keep=keep)
    dist.barrier()


def _save_final(task: SupervisedTask, out: Path, dist: Dist) -> None:
    """The user-facing model: ``<output_dir>/final`` (a plain Hugging Face folder)."""
    weights = {}
    if task.sharded:
        from apactl.fsdp import full_state

        weights = {"state_dict": full_state(task.model)[0]}

    def write(tmp: Path) -> None:
        task.save_model(task.model, tmp, True, **weights)
        if task.extra_final is not None:
            task.extra_final(task.model, tmp)

    if dist.is_main:
        ckpt.write_folder_atomic(out / "final", write)
    dist.barrier()


def _checkpoint_to_resume(out: Path, resume: bool) -> Path | None:
    if not resume:
        return None
    last = ckpt.latest_checkpoint(out)
    if last is None:
        console.print(f"[yellow]--resume: no checkpoint in {out}; starting from scratch")
    return last


def _load_trainer_state(task, opt, sched, last: Path | None) -> int:
    """Optimizer, scheduler and RNG of checkpoint ``last``; returns its step (0: no checkpoint)."""
    if last is None:
        return 0
    state = ckpt.load_state(last)
    if task.sharded:
        from apactl.fsdp import load_optimizer

        load_optimizer(task.model, opt, state["optimizer"])
    else:
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    console.print(f"resumed from {last} (step {state['step']})")
    return int(state["step"])
