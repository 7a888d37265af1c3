"""The one training core shared by ``sft``, ``rm`` and ``align``.

* ``Trainee``: a trained model with its AdamW optimizer and LR schedule.
* ``Optimization``: the trainees a loss updates together (one for sft/rm; policy and critic for
  align) and the one optimizer step: backward per micro-batch (scaled under fp16), then per
  trainee all-reduce -> unscale -> clip -> non-finite guard -> step -> schedule -> zero grads.
* ``micro_batches``: which rows of a global batch are this rank's accumulation steps.
* ``save`` / ``resume`` / ``save_final``: checkpoints of the global state (rank 0 writes; every
  rank resumes), with the resolved recipe inside.

Data parallel: a global batch is cut into ``grad_accum x world_size`` equal micro-batches in a
fixed order; micro-batch j is rank ``j % world_size``'s accumulation step ``j // world_size``,
and gradients are averaged over ranks before clipping. One process with grad_accum=2 and two
processes with grad_accum=1 therefore compute the same update, and a checkpoint resumes on any
world size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apactl import checkpoint as ckpt
from apactl.distributed import Dist
from apactl.errors import UserError
from apactl.metrics import console


class DivergedError(UserError):
    """The loss or the gradient became inf/nan: the run cannot continue."""


@dataclass
class Schedule:
    """What ``make_trainee`` needs to build the optimizer and its LR schedule."""

    lr: float
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    max_grad_norm: float | None = None


@dataclass
class Trainee:
    """A trained model with its optimizer and LR schedule."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_grad_norm: float | None = None
    sharded: bool = False  # FSDP: gradients arrive reduce-scattered; state saved unsharded

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


def make_trainee(name: str, model: torch.nn.Module, s: Schedule,
                 sharded: bool = False) -> Trainee:
    """AdamW over the trainable parameters (in ``named_parameters`` order, which the FSDP
    checkpoint format relies on) and a transformers LR schedule."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    # The fused CUDA kernel: one launch for every tensor instead of a dozen per tensor (the same
    # arithmetic; plain DTensors of FSDP keep the default implementation).
    fused = not sharded and bool(params) and all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay,
                            **({"fused": True} if fused else {}))
    sched = get_scheduler(s.schedule, opt, num_warmup_steps=s.warmup_steps,
                          num_training_steps=max(s.total_steps, 1))
    return Trainee(name, model, opt, sched, s.max_grad_norm, sharded)


def micro_batches(n_rows: int, accum: int, dist: Dist) -> list[slice]:
    """This rank's ``accum`` micro-batches of a global batch of ``n_rows`` rows."""
    micro = n_rows // (accum * dist.world_size)
    out = []
    for k in range(accum):
        j = k * dist.world_size + dist.rank  # this rank's k-th micro-batch of the global batch
        out.append(slice(j * micro, (j + 1) * micro))
    return out


def _norm(norm: torch.Tensor) -> float:
    # Sharded gradients give a DTensor norm; its full value is the global norm.
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@dataclass
class Watch:
    """Plain warnings, each printed once, for a run that goes wrong without an inf or a nan:
    gradients that stay exactly zero, a loss that stops moving, weights whose norm explodes
    (e.g. train.lr=1e3: the loss sits flat, the gradient is 0 and the weights grow 1e6-fold)."""

    emit: Callable[[str], None] = lambda msg: console.print(f"[yellow]warning:[/] {msg}")
    patience: int = 10  # steps a symptom must last
    zero_grad: int = 0
    flat: int = 0
    last_loss: float | None = None
    norms0: dict[str, float] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def once(self, key: str, msg: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.emit(msg)

    def observe(self, step: int, loss: float, norms: dict[str, float],
                trainees: dict[str, Trainee]) -> None:
        self.zero_grad = self.zero_grad + 1 if norms and not any(norms.values()) else 0
        if self.zero_grad >= self.patience:
            self.once("grad", f"every gradient has been exactly 0 for {self.zero_grad} steps "
                      f"(step {step}): nothing learns any more (weights saturated by a too "
                      "large train.lr?)")
        moved = self.last_loss is None or abs(loss - self.last_loss) > 1e-7 * max(1, abs(loss))
        self.flat, self.last_loss = (0 if moved else self.flat + 1), loss
        if self.flat >= self.patience:
            self.once("loss", f"the loss has not moved for {self.flat} steps ({loss:.6g} at "
                      f"step {step})")
        if step % self.patience == 1:
            self._norms(step, trainees)

    def _norms(self, step: int, trainees: dict[str, Trainee]) -> None:
        for name, t in trainees.items():
            if t.sharded:
                continue  # a DTensor's local norm is not the model's
            with torch.no_grad():
                norm = float(torch.stack([p.float().norm() for p in t.params()]).norm()) \
                    if t.params() else 0.0
            first = self.norms0.setdefault(name, norm)
            if first > 0 and norm > 100 * first:
                self.once(f"norm/{name}", f"the {name} weights' norm grew {norm / first:.0f}x "
                          f"since the start ({first:.3g} -> {norm:.3g} at step {step}): the run "
                          "is diverging; lower train.lr")


@dataclass
class Optimization:
    """The trainees one loss updates, stepped together; ``scaler`` is fp16's loss scaler."""

    trainees: dict[str, Trainee]
    dist: Dist = field(default_factory=Dist)
    scaler: Any = None
    where: Callable[[], str] = lambda: ""  # "at step N": named in divergence errors
    watch: Watch = field(default_factory=Watch)
    steps: int = 0
    _loss: float = 0.0

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        """Accumulate the gradient of one micro-batch's mean loss (``loss / accum``)."""
        value = loss.item()
        if not math.isfinite(value):
            raise DivergedError(f"the loss became {value} {self.where()}: the run "
                                "diverged; lower train.lr (or check the data)")
        self._loss += value / accum
        scaled = loss / accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self, names: list[str] | None = None) -> dict[str, float]:
        """Step the named trainees (default: all); returns ``{name}/grad_norm`` of each."""
        norms = {}
        for name in names or list(self.trainees):
            norms[f"{name}/grad_norm"] = self._step_one(self.trainees[name])
        if self.scaler is not None:
            self.scaler.update()
        self.steps += 1
        self.watch.observe(self.steps, self._loss, norms, self.trainees)
        self._loss = 0.0
        return norms

    def _step_one(self, t: Trainee) -> float:
        params = t.params()
        if not t.sharded:  # fsdp has already averaged (reduce-scattered) its gradients
            self.dist.all_reduce_grads(params)  # before clipping: the global batch's norm
        if self.scaler is not None:
            self.scaler.unscale_(t.optimizer)
        norm = _norm(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf))
        if not math.isfinite(norm) and self.scaler is None:
            raise DivergedError(f"the {t.name} gradient norm became {norm} {self.where()}: "
                                "the run diverged; lower train.lr")
        if self.scaler is not None:
            self.scaler.step(t.optimizer)  # skips the step on inf/nan and lowers the scale
        else:
            t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        return norm

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Optimizer/scheduler states of every trainee (full, on rank 0; a collective under
        FSDP, so every rank calls it)."""
        out: dict[str, Any] = {}
        for name, t in self.trainees.items():
            opt_state = t.optimizer.state_dict()
            if t.sharded:
                from apactl.fsdp import full_state

                opt_state = full_state(t.model, t.optimizer)[1]
            out[name] = {"optimizer": opt_state, "scheduler": t.scheduler.state_dict()}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, t in self.trainees.items():
            if t.sharded:
                from apactl.fsdp import load_optimizer

                load_optimizer(t.model, t.optimizer, state[name]["optimizer"])
            else:
                t.optimizer.load_state_dict(state[name]["optimizer"])
            t.scheduler.load_state_dict(state[name]["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


# ---------------------------------------------------------------------- run-folder state
ModelWriter = Callable[[Path, bool], None]  # write(folder, final): the run's model folders


def save(out: Path, step: int, write: ModelWriter, opt: Optimization, state: dict[str, Any],
         recipe: dict[str, Any], keep: int) -> None:
    """Checkpoint ``step``: models via ``write(folder, False)``, optimizer state, RNG, the
    resolved recipe and ``state``. A collective (FSDP gathers); rank 0 writes."""
    full = {"step": step, "optimization": opt.state_dict(), "rng": ckpt.rng_state(),
            "recipe": recipe, **state}
    if opt.dist.is_main:
        ckpt.save_checkpoint(out, step, lambda folder: write(folder, False), full, keep=keep)
    opt.dist.barrier()


def save_final(out: Path, write: ModelWriter, dist: Dist, keep: int = 1) -> None:
    """The user-facing models in ``<out>/final`` (plain Hugging Face folders), atomically;
    ``keep == 0``: then drop the checkpoints (the run is done and will not be resumed)."""
    from apactl.atomic import write_folder

    if dist.is_main:
        write_folder(out / "final", lambda folder: write(folder, True))
        if keep == 0:
            ckpt.prune(out / ckpt.CKPT_DIR, 0)
            with contextlib.suppress(OSError):  # no empty checkpoints/ left behind
                (out / ckpt.CKPT_DIR).rmdir()
    dist.barrier()


def resume(last: Path | None, load_models: Callable[[Path], None],
           opt: Optimization) -> tuple[int, dict[str, Any]]:
    """Load checkpoint ``last`` (weights via ``load_models(folder)``, then optimizer, schedule
    and RNG); returns (its step, its whole state). (0, {}) without a checkpoint."""
    if last is None:
        return 0, {}
    state = ckpt.load_state(last)
    load_models(last)
    opt.load_state_dict(state["optimization"])
    ckpt.set_rng_state(state["rng"])
    ckpt.forget_states()
    console.print(f"resumed from {last} (step {state['step']})")
    return int(state["step"]), state
