"""Process-level setup shared by every workflow: process group, seeds, threads, device,
precision and the output folder (locked, claimed, ``recipe.yaml`` written once)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apactl.config import RecipeBase
from apactl.distributed import Dist, init_dist
from apactl.errors import UserError
from apactl.precision import Precision
from apactl.run_folder import Lock


@dataclass
class Runtime:
    precision: Precision
    output_dir: Path
    dist: Dist = field(default_factory=Dist)
    resume_from: Path | None = None  # the checkpoint this run continues (None: a fresh start)
    lock: Lock | None = None
    recipe_text: str | None = None  # recipe.yaml, written by ``begin`` (None: keep the old one)
    created: bool = False  # the output folder did not exist before this run
    begun: bool = False

    def begin(self) -> None:
        """The run is known to start (inputs read, models loaded, checks passed): only now is
        ``recipe.yaml`` written, so a run that fails on bad input leaves the folder as it was."""
        if self.begun:
            return
        self.begun = True
        if self.is_main and self.recipe_text is not None:
            from apactl.run_folder import write_recipe

            write_recipe(self.output_dir, self.recipe_text)

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.created and not self.begun and self.is_main:
            try:
                self.output_dir.rmdir()  # made for the lock alone: leave nothing behind
            except OSError:
                pass


def setup_run(recipe: RecipeBase, resume: bool = False, overwrite: bool = False,
              trains: bool = True) -> Runtime:
    """Join the process group (if launched so), seed, set threads and determinism, resolve
    device and precision, lock and claim the output folder, write ``recipe.yaml``.

    ``trains``: the command trains and checkpoints (sft, rm, align): its folder must be empty,
    its own resume (``resume``) or replaced (``overwrite``). Other commands only lock it.
    """
    from apactl.checkpoint import seed_everything
    from apactl.metrics import console
    from apactl.precision import resolve_device, resolve_precision

    if resume and overwrite:
        raise UserError("--resume and --overwrite: use one (--resume continues the run in "
                        "run.output_dir, --overwrite replaces it)")
    run = recipe.run
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Before anything touches CUDA (the process group below may): cuBLAS reads it at start-up.
    os.environ.update(deterministic_env(run.deterministic, run.device, os.environ))
    dist, rank_device = init_dist(run.device, run.dist_timeout_s,
                                  group=run.strategy == "fsdp")
    check = getattr(getattr(recipe, "train", None), "check_world_size", None)
    if callable(check):
        try:
            check(dist.world_size)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    # Every rank draws the same seed: identical initial weights and identical global batches.
    seed_everything(run.seed)
    precision = resolve_precision(run, rank_device or resolve_device(run))
    # Only rank 0 talks: the other ranks' messages, bars and warnings would repeat its own.
    console.quiet = not dist.is_main
    if run.strategy == "fsdp" and dist.joined:
        n = dist.world_size
        console.print(f"run.strategy: fsdp: trained models sharded (fsdp) over {n} "
                      f"process{'es' if n > 1 else ''}")
    _quiet_libraries()
    rt = Runtime(precision, Path(run.output_dir), dist)
    try:
        _own_folder(rt, recipe, resume, overwrite, trains)
    except BaseException:
        rt.__exit__()
        raise
    if trains and precision.pure_half:
        console.print(f"[yellow]warning:[/] trained weights are stored in {run.dtype} "
                      "(run.mixed_precision: no): AdamW updates smaller than 16-bit resolution "
                      "round away, so small learning rates (~1e-6) barely move the weights; "
                      "run.mixed_precision=bf16 keeps fp32 master weights")
    return rt


def deterministic_env(deterministic: bool, device: str, environ) -> dict[str, str]:
    """The environment variables ``run.deterministic`` needs on ``device`` (``run.device``),
    given the process's ``environ``: cuBLAS's deterministic matmuls need a fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``; without it torch warns, or raises, at the first matmul under
    ``use_deterministic_algorithms``). A value the user set is kept."""
    if not deterministic or device == "cpu" or "CUBLAS_WORKSPACE_CONFIG" in environ:
        return {}
    return {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _own_folder(rt: Runtime, recipe: RecipeBase, resume: bool, overwrite: bool,
                trains: bool) -> None:
    """Rank 0 locks and claims the folder; every rank learns which checkpoint to resume."""
    from apactl.recipe import recipe_to_yaml
    from apactl.run_folder import check_output_dir, check_resume, claim, field_defaults

    last = None
    if rt.is_main:
        check_output_dir(rt.output_dir)
        rt.created = not rt.output_dir.exists()
        rt.lock = Lock(rt.output_dir)
        rt.lock.acquire()
        if trains:
            resolved = recipe.model_dump(mode="json")
            last = claim(rt.output_dir, resume, overwrite, resolved)
            check_resume(last, resolved, field_defaults(recipe))
        if last is None:  # a resumed run keeps the recipe.yaml of the run it continues
            rt.recipe_text = recipe_to_yaml(recipe)
    found = rt.dist.broadcast_object(str(last) if last is not None else None)
    rt.resume_from = Path(found) if found else None
    if resume and rt.resume_from is None and trains:
        from apactl.metrics import console

        console.print(f"[yellow]--resume: no checkpoint in {rt.output_dir}; starting from "
                      "scratch")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While a command runs: the first SIGTERM (what SLURM and Kubernetes send before killing a
    job) asks the training loops to stop at the next step boundary with a checkpoint
    (``training.STOP``; they raise ``errors.Stopped``); a second one raises ``Terminated`` at
    once. SIGINT keeps Python's own handler (KeyboardInterrupt). Installed by the CLI."""
    from apactl.errors import Terminated
    from apactl.metrics import console
    from apactl.training import STOP

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if STOP.signal is not None:
            raise Terminated(name)
        STOP.request(name)
        if not console.quiet:  # os.write: a print here could re-enter a print in progress
            try:
                os.write(2, f"\n{name}: stopping after the current step with a checkpoint "
                            f"(send {name} again or press Ctrl-C to stop at once)\n".encode())
            except OSError:  # stderr gone (e.g. the sweep that read it was killed)
                pass

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread (e.g. a test runner)
        return
    STOP.clear()
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        STOP.clear()


def _quiet_libraries() -> None:
    # Loading bars and advisory warnings from transformers drown our own progress display.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
