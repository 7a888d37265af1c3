"""The one supervised training loop, shared by ``apactl sft`` and ``apactl rm``.

A task supplies the model, the tokenised items, a collator, a loss function and an evaluation
function; this loop owns ordering, accumulation, clipping, scheduling, logging, checkpoints and
resume. The data order is a pure function of ``(seed, epoch)``, so the data position is just the
optimizer step and resume replays exactly.
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
    """Train ``task.model``; returns the final evaluation metrics."""
    out = Path(run.output_dir)
    n = len(task.train_items)
    if steps_per_epoch(n, train) == 0:
        raise ValueError(f"train.batch_size: {train.batch_size} is larger than the "
                         f"{n} training examples")
    n_steps = total_steps(n, train)
    opt, sched = make_optimizer(task.model, train, n_steps)
    start = _maybe_resume(task, opt, sched, out, resume)
    logger = MetricsLogger(out, logging.tensorboard, resume_step=start if resume else None)
    progress = Progress(n_steps, task.name, logging.progress, start=start)
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
                _save(task, opt, sched, out, step + 1, train.keep_checkpoints)
        final = _evaluate(task)
        logger.log(n_steps, final)
        _save(task, opt, sched, out, n_steps, train.keep_checkpoints)
        _save_final(task, out)
    finally:
        progress.close()
        logger.close()
    return final


def _train_step(task, opt, sched, train: TrainConfig, seed: int, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    idx = batch_indices(step, len(task.train_items), train, seed, task.lengths())
    micro = train.micro_batch_size
    totals: dict[str, float] = {}
    n_tokens = 0
    for k in range(train.grad_accum):
        items = [task.train_items[i] for i in idx[k * micro:(k + 1) * micro].tolist()]
        batch = task.collate(items)
        loss, stats, ntok = task.loss_fn(task.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step + 1}")
        (loss / train.grad_accum).backward()
        n_tokens += ntok
        for key, v in stats.items():
            totals[key] = totals.get(key, 0.0) + v / train.grad_accum
    params = [p for p in task.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm or math.inf)
    totals["train/grad_norm"] = float(norm)
    totals["train/lr"] = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    totals["perf/tokens_per_s"] = n_tokens / dt
    totals["perf/step_s"] = dt
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


def _state(opt, sched, step: int) -> dict[str, Any]:
    return {"step": step, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": ckpt.rng_state()}


def _save(task, opt, sched, out: Path, step: int, keep: int) -> None:
    ckpt.save_checkpoint(out, step, lambda d: task.save_model(task.model, d / "model", False),
                         _state(opt, sched, step), keep=keep)


def _save_final(task: SupervisedTask, out: Path) -> None:
    """The user-facing model: ``<output_dir>/final`` (a plain Hugging Face folder)."""
    def write(tmp: Path) -> None:
        task.save_model(task.model, tmp, True)
        if task.extra_final is not None:
            task.extra_final(task.model, tmp)

    ckpt.write_folder_atomic(out / "final", write)


def _maybe_resume(task, opt, sched, out: Path, resume: bool) -> int:
    if not resume:
        return 0
    last = ckpt.latest_checkpoint(out)
    if last is None:
        console.print(f"[yellow]--resume: no checkpoint in {out}; starting from scratch")
        return 0
    ckpt.load_weights(task.model, last / "model")
    state = ckpt.load_state(last)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    console.print(f"resumed from {last} (step {state['step']})")
    return int(state["step"])
