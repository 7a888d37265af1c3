"""An output folder belongs to one run: a lock while it runs, and no silent mixing of runs.

* ``lock``: ``.apactl.lock`` holds the pid and host of the process using the folder; a second
  process is refused (exit 2, naming the holder); a lock whose process is gone is taken over.
* ``claim``: a training run (sft, rm, align) into a folder that already holds a run's results
  (checkpoints, ``final/``, metrics) is refused unless it resumes that run (``--resume``) or
  replaces it (``--overwrite``). Files of a run that failed before producing anything
  (``recipe.yaml`` alone, empty logs) do not count.
* ``check_resume``: a resumed run must be the run that wrote the checkpoint: keys that change
  what is computed (model, data, algorithm, learning rate, batch, seed, ...) are compared with
  the recipe stored in the checkpoint, and any difference is refused, every key named. Keys
  that only change how the run is operated (logging, threads, checkpoint cadence, device,
  strategy) may change.
* ``recipe.yaml`` is written only once the folder is claimed, and never by a resume.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from apactl.atomic import clean_dead_temps, pid_alive, write_file
from apactl.checkpoint import CKPT_DIR, list_checkpoints, load_state, problem
from apactl.errors import RunFolderError

LOCK = ".apactl.lock"
RESULTS = ("final", "preferences.jsonl", "report.json")
# Keys a resume may change: how the run is operated, not what it computes.
OPERATIONAL = (
    "logging.", "run.name", "run.output_dir", "run.num_threads", "run.dist_timeout_s",
    "run.device", "run.strategy", "run.deterministic", "train.save_every",
    "train.keep_checkpoints", "train.eval_every", "train.eval_prompts", "train.log_every",
    "train.eval_batch_size",
    # The global batch is what the math sees; its split into micro-batches is operational
    # (resuming on another world size changes it).
    "train.grad_accum", "train.forward_batch_size", "train.offload_frozen", "reward.batch_size",
    "model.cache_dir",
    "policy.cache_dir",
)


class Lock:
    """``.apactl.lock`` in ``folder`` for this process (rank 0 of a job takes it)."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunFolderError(f"{self.path.parent}: in use (lock {self.path})")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
            self.path.unlink(missing_ok=True)  # its process is gone: the lock is stale
            return
        if not holder:  # being written by a process that just created it: treat as held
            holder = {"pid": "?", "host": "?"}
        raise RunFolderError(
            f"{self.path.parent}: in use by another apactl process (pid {pid} on {host}); "
            f"wait for it to finish, or delete {self.path} if that process is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def has_results(folder: Path) -> bool:
    """True when ``folder`` holds results of an earlier run (not just its recipe or logs)."""
    if not folder.is_dir():
        return False
    if any((folder / CKPT_DIR).glob("step-*")) or any((folder / n).exists() for n in RESULTS):
        return True
    metrics = folder / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def clear(folder: Path, keep: tuple[str, ...] = (LOCK,)) -> None:
    """Remove an earlier run's files (``--overwrite``); the lock stays."""
    for p in folder.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def claim(folder: Path, resume: bool, overwrite: bool,
          recipe: dict[str, Any] | None = None) -> Path | None:
    """Make ``folder`` this run's; returns the checkpoint to resume (None: start fresh).

    ``recipe``: the run's resolved recipe; with ``resume``, a folder whose run was killed before
    its first checkpoint (no checkpoint, no ``final/``) is restarted when its ``recipe.yaml``
    computes the same run: nothing of it can be resumed and nothing finished is lost.
    """
    clean_dead_temps(folder)
    clean_dead_temps(folder / CKPT_DIR)
    if resume:
        last = latest_good_checkpoint(folder)
        if last is None and has_results(folder):
            if not _killed_before_first_checkpoint(folder, recipe):
                raise RunFolderError(f"{folder}: --resume: no checkpoint to resume, but the "
                                     "folder holds an earlier run's results; pass --overwrite "
                                     "to replace them")
            from apactl.metrics import console

            console.print(f"[yellow]--resume:[/] {folder}: the earlier attempt of this run "
                          "stopped before its first checkpoint; its logs are discarded and "
                          "the run starts again from the beginning")
            # ``*.log`` files are a launcher's (e.g. the sweep's stderr log, open right now).
            clear(folder, keep=(LOCK, *(p.name for p in folder.glob("*.log"))))
        return last
    if has_results(folder):
        if not overwrite:
            raise RunFolderError(f"{folder}: holds an earlier run (checkpoints, final/ or "
                                 "metrics); pass --resume to continue it or --overwrite to "
                                 "replace it, or choose another run.output_dir")
        clear(folder)
    return None


def _killed_before_first_checkpoint(folder: Path, recipe: dict[str, Any] | None) -> bool:
    """Only logs of the same run are left (no ``final/``, no checkpoint, no other results)."""
    if recipe is None or any((folder / n).exists() for n in RESULTS):
        return False
    if any((folder / CKPT_DIR).glob("step-*")):
        return False  # checkpoints exist but none is readable: keep them for a human to look
    import yaml

    try:
        stored = yaml.safe_load((folder / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(stored, dict) and not recipe_changes(stored, recipe)


def latest_good_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that can be read; damaged newer ones are named and skipped."""
    from apactl.metrics import console

    for ckpt in reversed(list_checkpoints(folder)):
        why = problem(ckpt)
        if why is None:
            return ckpt
        console.print(f"[yellow]warning:[/] checkpoint {ckpt} is damaged ({why}); "
                      "resuming from the one before it")
    return None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def recipe_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that change what the run computes."""
    a, b = _flatten(stored), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    return [k for k in keys if not k.startswith(OPERATIONAL)]


def check_resume(last: Path | None, recipe: dict[str, Any]) -> None:
    """Refuse to resume checkpoint ``last`` with a recipe that changes what the run computes."""
    if last is None:
        return
    stored = load_state(last).get("recipe", {})
    shown = describe_changes(stored, recipe)
    if shown:
        raise RunFolderError(f"--resume: the recipe differs from the run's ({last}): {shown}"
                             f"; resume with the run's own recipe ({last.parent.parent}/"
                             "recipe.yaml) or start a new run.output_dir")


def _shown(value: Any) -> str:
    """A recipe value as YAML writes it (``null``, not Python's ``None``); strings quoted."""
    return "null" if value is None else repr(value)


def describe_changes(stored: dict[str, Any], current: dict[str, Any], limit: int = 8) -> str:
    """``key (old -> new), ...`` of the computed keys that differ ("" when none does)."""
    changed = recipe_changes(stored, current)
    a, b = _flatten(stored), _flatten(current)
    shown = ", ".join(f"{k} ({_shown(a.get(k, '<unset>'))} -> {_shown(b.get(k, '<unset>'))})"
                      for k in changed[:limit])
    return shown + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def write_recipe(folder: Path, text: str) -> None:
    write_file(folder / "recipe.yaml", text)
