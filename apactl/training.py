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
from apactl.errors import Stopped, UserError
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


def _norm(norm: torch.Tensor) -> torch.Tensor:
    # Sharded gradients give a DTensor norm; its full value is the global norm.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# fp16: steps in a row the loss scaler may skip for an inf/nan before the run is declared
# diverged. Each skip halves the scale (2^16 at the start): 24 skips take it below 2^-8, where
# no gradient of a sane loss overflows any more.
MAX_SKIPPED_STEPS = 24


def non_finite(loss: float, norms: dict[str, float], scaled: bool, streak: int
               ) -> tuple[str | None, int]:
    """(why the run diverged, or None; non-finite steps in a row so far) after a step whose
    mean loss is ``loss`` and gradient norms ``norms``. Without loss scaling an inf/nan ends the
    run at once; under fp16 loss scaling the scaler skips such a step and lowers its scale (an
    overflow it expects now and then), and only ``MAX_SKIPPED_STEPS`` in a row end it."""
    bad = {k: v for k, v in {"loss": loss, **norms}.items() if not math.isfinite(v)}
    if not bad:
        return None, 0
    streak += 1
    if scaled and streak < MAX_SKIPPED_STEPS:
        return None, streak
    what, value = next(iter(bad.items()))
    name = "the loss" if what == "loss" else f"the {what.removesuffix('/grad_norm')} gradient norm"
    again = f" for {streak} steps in a row under fp16 loss scaling" if scaled else ""
    return f"{name} became {value}{again}", streak


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

    def weight_norms(self, step: int, trainees: dict[str, Trainee]) -> dict[str, torch.Tensor]:
        """The weight norms ``observe`` checks at ``step`` (one step in ``patience``), on the
        device: the optimizer step reads them back with its other numbers."""
        if step % self.patience != 1:
            return {}
        out = {}
        for name, t in trainees.items():
            if t.sharded or not t.params():
                continue  # a DTensor's local norm is not the model's
            with torch.no_grad():
                out[name] = torch.stack([p.float().norm() for p in t.params()]).norm()
        return out

    def observe(self, step: int, loss: float, norms: dict[str, float],
                weights: dict[str, float]) -> None:
        """After optimizer step ``step``: its mean loss, gradient norms and the weight norms
        asked for by ``weight_norms`` (empty on most steps)."""
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
        for name, norm in weights.items():
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
    skipped: int = 0  # fp16: non-finite steps in a row, skipped by the scaler
    _loss: torch.Tensor | float = 0.0

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        """Accumulate the gradient of one micro-batch's mean loss (``loss / accum``). The loss
        stays on the device (no host sync): ``step`` reads it with everything else."""
        self._loss = self._loss + loss.detach().float() / accum
        scaled = loss / accum
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()

    def step(self, names: list[str] | None = None,
             stats: dict[str, torch.Tensor | float] | None = None) -> dict[str, float]:
        """Step the named trainees (default: all); returns ``{name}/grad_norm`` of each and
        ``stats`` (the caller's statistics of this step, tensors or floats) as floats: one host
        sync per optimizer step reads the loss, the norms and the statistics together."""
        from apactl.distributed import read_scalars

        names = names or list(self.trainees)
        norms = {f"{n}/grad_norm": self._clip(self.trainees[n]) for n in names}
        stats = stats or {}
        weights = {f"weights/{k}": v
                   for k, v in self.watch.weight_norms(self.steps + 1, self.trainees).items()}
        values = read_scalars({"loss": self._loss, **norms, **weights, **stats})
        loss = values.pop("loss")
        norm_values = {k: values.pop(k) for k in norms}
        weight_values = {k.removeprefix("weights/"): values.pop(k) for k in weights}
        why, self.skipped = non_finite(loss, norm_values, self.scaler is not None, self.skipped)
        if why is not None:
            raise DivergedError(f"{why} {self.where()}: the run diverged; lower train.lr (or "
                                "check the data)")
        for n in names:
            t = self.trainees[n]
            if self.scaler is not None:
                self.scaler.step(t.optimizer)  # skips the step on inf/nan
            else:
                t.optimizer.step()
            t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after a skipped step
        self.steps += 1
        self.watch.observe(self.steps, loss, norm_values, weight_values)
        self._loss = 0.0
        return {**norm_values, **values}

    def _clip(self, t: Trainee) -> torch.Tensor:
        """All-reduce (ddp), unscale (fp16) and clip ``t``'s gradients; their norm, on the
        device."""
        params = t.params()
        if not t.sharded:  # fsdp has already averaged (reduce-scattered) its gradients
            self.dist.all_reduce_grads(params)  # before clipping: the global batch's norm
        if self.scaler is not None:
            self.scaler.unscale_(t.optimizer)
        return _norm(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf))

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


# ---------------------------------------------------------------------- stop on request
@dataclass
class StopFlag:
    """A request to stop at the next step boundary, set by a signal handler that the CLI
    installs (``runtime.stop_on_sigterm``); the loops only read it."""

    signal: str | None = None

    def request(self, name: str) -> None:
        self.signal = self.signal or name

    def clear(self) -> None:
        self.signal = None


STOP = StopFlag()


def stop_requested(dist: Dist) -> bool:
    """True on every rank when any rank was asked to stop: the checkpoint that follows is a
    collective, so the ranks must agree (one scalar all-reduce per step when distributed)."""
    return dist.sum_scalar(float(STOP.signal is not None)) > 0


def stopped(out: Path, step: int) -> Stopped:
    """The exception a loop raises once checkpoint ``step`` is written after a stop request."""
    return Stopped(STOP.signal or "a signal", step,
                   str(Path(out) / ckpt.CKPT_DIR / f"step-{step:08d}"))
