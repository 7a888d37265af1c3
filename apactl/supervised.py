"""The supervised loop of ``apactl sft`` and ``apactl rm`` (the optimizer step, checkpoints and
resume are the shared training core's, ``apactl.training``).

A task supplies the model, the tokenised items, a collator, a loss function and an evaluation
function; this loop owns the data order, logging and evaluation. The data order is a pure
function of ``(seed, epoch)``, so the data position is just the optimizer step and resume
replays exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apactl import checkpoint as ckpt
from apactl.config import LoggingConfig, RunConfig, TrainConfig
from apactl.distributed import Dist
from apactl.errors import UserError
from apactl.hooks import Hooks
from apactl.metrics import MetricsLogger, Progress, read_metrics
from apactl.precision import Precision
from apactl.training import (
    Optimization,
    Schedule,
    make_trainee,
    micro_batches,
    resume,
    save,
    save_final,
    stop_requested,
    stopped,
)

# loss_fn(model, batch) -> (loss, stats, n_tokens): loss is the micro-batch mean; stats and
# n_tokens are 0-dim tensors (read back once per optimizer step) or numbers.
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
    card_role: str = "policy"  # what final/ is, for its model card (apactl.card.ROLES)
    dist: Dist = field(default_factory=Dist)  # this process's rank in the job
    sharded: bool = False  # run.strategy=fsdp: the loop shards the model (apactl.fsdp)
    # "rows": {"train": n, "held_out": m} for the model card (default: the train items)
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


@dataclass
class Setup:
    """What the loop runs with, besides the task: the recipe's sections and the run's state."""

    run: RunConfig
    train: TrainConfig
    logging: LoggingConfig
    precision: Precision
    recipe: dict[str, Any]  # the resolved recipe, stored in every checkpoint
    resume_from: Path | None = None  # the checkpoint to resume (RunFolder decides)
    hooks: Hooks = field(default_factory=Hooks)
    begin: Callable[[], None] = lambda: None  # the run starts for real (Runtime.begin)


def run_supervised(task: SupervisedTask, s: Setup) -> dict[str, float]:
    """Train ``task.model``; returns the final evaluation metrics (the same on every rank)."""
    out, train = Path(s.run.output_dir), s.train
    n = len(task.train_items)
    if steps_per_epoch(n, train) == 0:
        raise UserError(f"train.batch_size: {train.batch_size} is larger than the {n} "
                        "training examples")
    n_steps = total_steps(n, train)
    if s.resume_from is not None:  # full weights go in before sharding, on every rank
        ckpt.load_weights(task.model, s.resume_from / "model")
    if task.sharded:
        from apactl.fsdp import shard_model

        task.model = shard_model(task.model, s.precision)
    opt = _optimization(task, s, n_steps)
    start, _ = resume(s.resume_from, lambda folder: None, opt)
    s.begin()
    s.hooks.call("on_start", {"model": task.model})
    logger = MetricsLogger(out, s.logging, enabled=task.dist.is_main,
                           resume_step=start if s.resume_from is not None else None,
                           recipe=s.recipe)
    progress = Progress(n_steps, task.name, s.logging.progress and task.dist.is_main, start=start)
    task.model.train()
    failed = True
    try:
        final = _loop(task, s, opt, logger, progress, start, n_steps)
        failed = False
    finally:
        progress.close()
        logger.close(failed)
    return final


def _optimization(task: SupervisedTask, s: Setup, n_steps: int) -> Optimization:
    tr = s.train
    warmup = tr.warmup_steps or int(round(tr.warmup_ratio * n_steps))
    sched = Schedule(tr.lr, tr.weight_decay, tr.schedule, warmup, n_steps, tr.max_grad_norm)
    trainee = make_trainee("train", task.model, sched, sharded=task.sharded)
    return Optimization({"train": trainee}, task.dist, s.precision.grad_scaler(task.sharded))


def _loop(task, s: Setup, opt: Optimization, logger, progress, start: int,
          n_steps: int) -> dict[str, float]:
    out, train = Path(s.run.output_dir), s.train
    if start == 0 and train.eval_every:  # the "before" point of the eval curve
        logger.log(0, _evaluate(task, s))
    for step in range(start, n_steps):
        opt.where = lambda step=step: f"at step {step + 1}"
        stats = _train_step(task, s, opt, step)
        if (step + 1) % train.log_every == 0 or step + 1 == n_steps:
            _log(logger, progress, step + 1, stats)
        else:
            progress.update(1)
        s.hooks.call("on_step_end", step + 1, stats)
        if train.eval_every and (step + 1) % train.eval_every == 0 and step + 1 < n_steps:
            logger.log(step + 1, _evaluate(task, s))
        saved = bool(train.save_every) and (step + 1) % train.save_every == 0
        if saved and step + 1 < n_steps:
            _save(task, s, opt, out, step + 1)
        if step + 1 < n_steps and stop_requested(task.dist):  # SIGTERM: checkpoint, leave
            if not saved:
                _save(task, s, opt, out, step + 1)
            raise stopped(out, step + 1)
    final = _evaluate(task, s)
    if start < n_steps:  # resumed from the last checkpoint: its final eval is logged already
        logger.log(n_steps, final)
    _save(task, s, opt, out, n_steps)
    weights = _weights(task)  # a collective under FSDP: every rank, before rank 0 writes
    save_final(out, lambda folder, _final: _write_final(task, s, folder, weights, logger),
               task.dist, s.train.keep_checkpoints)
    return final


def _train_step(task, s: Setup, opt: Optimization, step: int) -> dict[str, float]:
    dist, train = task.dist, s.train
    t0 = time.perf_counter()
    idx = batch_indices(step, len(task.train_items), train, s.run.seed, task.lengths())
    totals: dict[str, float] = {}
    n_tokens = 0
    for sl in micro_batches(train.batch_size, train.grad_accum, dist):
        batch = task.collate([task.train_items[i] for i in idx[sl].tolist()])
        with s.precision.autocast():
            loss, stats, ntok = task.loss_fn(task.model, batch)
        opt.backward(loss, train.grad_accum)
        n_tokens = n_tokens + ntok
        for key, v in stats.items():
            totals[key] = totals.get(key, 0.0) + v / train.grad_accum
    lr = opt.trainees["train"].lr
    # The statistics stay on the device until the step's one host sync reads them.
    totals = opt.step(None, {**totals, "perf/tokens": n_tokens})
    n_tokens = totals.pop("perf/tokens")
    totals["train/lr"] = lr
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
    for key in ("train/accuracy", "rewards/accuracies"):  # rm; dpo (TRL's name)
        if key in stats:
            shown["acc"] = stats[key]
    progress.update(1, **shown)


def _evaluate(task: SupervisedTask, s: Setup) -> dict[str, float]:
    task.model.eval()
    with torch.no_grad(), s.precision.autocast(), s.hooks.wrap("eval"):
        out = task.evaluate(task.model)
    task.model.train()
    return out


def _weights(task: SupervisedTask) -> dict[str, Any]:
    """{"state_dict": full weights} under FSDP (a collective: every rank calls it), else {}."""
    if not task.sharded:
        return {}
    from apactl.fsdp import full_state

    return {"state_dict": full_state(task.model)[0]}


def _save(task, s: Setup, opt: Optimization, out: Path, step: int) -> None:
    """A checkpoint of the global state: it resumes on any world size."""
    s.hooks.call("on_save", step)
    weights = _weights(task)
    save(out, step, lambda folder, _final: task.save_model(task.model, folder / "model", False,
                                                           **weights),
         opt, {}, s.recipe, s.train.keep_checkpoints)


def _write_final(task: SupervisedTask, s: Setup, folder: Path, weights: dict[str, Any],
                 logger: MetricsLogger) -> None:
    """The user-facing model: ``<output_dir>/final`` (a plain Hugging Face folder with its
    model card)."""
    from apactl.card import CardFacts, start_of, write_card

    task.save_model(task.model, folder, True, **weights)
    if task.extra_final is not None:
        task.extra_final(task.model, folder)
    rows = task.info.get("rows") or {"train": len(task.train_items)}
    write_card(folder, CardFacts(s.recipe, task.card_role, start_of(s.recipe),
                                 read_metrics(logger.path), rows, time.time() - logger.started,
                                 logger.resume_step))
