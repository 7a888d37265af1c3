"""An output folder belongs to one run: a lock while it runs, and no silent mixing of runs.

* ``check_output_dir``: the folder must be a folder that can be made, and must not lie inside
  another run's folder (its ``checkpoints/``, ``final/``, or any folder holding a run), so
  ``--overwrite`` can never delete another run's files.
* ``lock``: ``.apactl.lock`` holds the pid, host, boot and start time of the process using the
  folder; a second process is refused (exit 2, naming the holder); a lock whose process is gone
  (or whose pid now belongs to another process), or that is empty or damaged, is taken over
  with a line saying so.
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

import errno
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
    # Only decides whether a run with many bad rows stops; the rows used are the same.
    "data.max_bad_fraction",
    # The global batch is what the math sees; its split into micro-batches is operational
    # (resuming on another world size changes it).
    "train.grad_accum", "train.forward_batch_size", "train.offload_frozen", "reward.batch_size",
    "train.precompute_reference",  # dpo: the same reference log-probs, computed once or per step
    "model.cache_dir",
    "policy.cache_dir",
    # Held-out judges score answers after the update; they never feed the training signal.
    "eval_judges",
)
# Keys that set a run's length: a finished run cannot be extended by raising them, because the
# LR schedule (and align's KL horizon) are functions of the total.
LENGTH = ("train.max_steps", "train.epochs", "train.iterations")


class Lock:
    """``.apactl.lock`` in ``folder`` for this process (rank 0 of a job takes it).

    The lock records pid, host, the boot and the process's start time, so a lock whose pid now
    belongs to another process (pid reuse after a reboot or in a container) is recognised as
    stale. It is written in full under a temporary name and linked into place, so it is never
    seen half-written; an empty or unreadable lock (an older apactl, a crash) is stale.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise  # the CLI names a full disk
            raise RunFolderError(f"run.output_dir: cannot create or write in "
                                 f"{self.path.parent}: {exc.strerror or exc}") from None

    def _acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "boot": boot_id(), "start": process_start(os.getpid())}
        for _ in range(3):
            if self._create(json.dumps(me)):
                self.held = True
                return
            self._take_over_if_stale()
        raise RunFolderError(f"{self.path.parent}: in use (lock {self.path})")

    def _create(self, text: str) -> bool:
        """Put a complete lock in place unless one exists; False if one does."""
        tmp = self.path.with_name(f"{LOCK}.tmp-{os.getpid()}")
        try:
            write_file(tmp, text)
            try:
                os.link(tmp, self.path)  # atomic, fails if the lock exists
                return True
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: create, then fill
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile
        except OSError as exc:
            text, why = None, f"unreadable: {exc.strerror}"
        holder, why = _parse_lock(text) if text is not None else (None, why)
        if holder is None and text is not None and not self._old_enough():
            return  # maybe being filled right now (a file system without hard links): look again
        if holder is not None:
            why = _stale_reason(holder)
            if why is None:
                raise RunFolderError(
                    f"{self.path.parent}: in use by another apactl process (pid "
                    f"{holder['pid']} on {holder.get('host')}); wait for it to finish, or "
                    f"delete {self.path} if that process is gone")
        from apactl.metrics import console

        try:  # only the lock judged stale: another process may have replaced it meanwhile
            if self.path.read_text() != text:
                return
        except FileNotFoundError:
            return
        except OSError:
            pass
        self.path.unlink(missing_ok=True)
        console.print(f"[yellow]note:[/] {self.path}: stale lock taken over ({why})",
                      highlight=False)

    def _old_enough(self, age_s: float = 2.0) -> bool:
        """Wait until the lock file is ``age_s`` old; False if it went away meanwhile."""
        try:
            wait = age_s - (time.time() - self.path.stat().st_mtime)
        except OSError:
            return False
        if wait > 0:
            time.sleep(wait)
        return self.path.exists()

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _parse_lock(text: str) -> tuple[dict[str, Any] | None, str]:
    """(the lock's holder, "") or (None, why the lock cannot be a live process's)."""
    if not text.strip():
        return None, "empty file"
    try:
        holder = json.loads(text)
    except ValueError:
        return None, "not JSON: truncated or damaged"
    if not isinstance(holder, dict):
        return None, f"not a JSON object: {text.strip()[:40]!r}"
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None, f"no valid pid: {pid!r}"
    return holder, ""


def _stale_reason(holder: dict[str, Any]) -> str | None:
    """Why the process that wrote lock ``holder`` is gone (None: it may be running).

    Another host's process cannot be checked: it counts as running."""
    pid = holder["pid"]
    if holder.get("host") != socket.gethostname():
        return None
    if holder.get("boot") and boot_id() and holder["boot"] != boot_id():
        return f"pid {pid} was written before the machine restarted"
    start = process_start(pid)
    if not pid_alive(pid) or start == "zombie":
        return f"pid {pid} is not running"
    if holder.get("start") is not None and start is not None:
        return None if start == holder["start"] else f"pid {pid} is now another process"
    cmdline = process_cmdline(pid)
    if cmdline is not None and "apactl" not in cmdline:
        return f"pid {pid} is not an apactl process ({cmdline[:60]})"
    return None


def boot_id() -> str | None:
    """This boot's id (Linux), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | str | None:
    """Process ``pid``'s start time in clock ticks since boot (Linux), "zombie" for a process
    that has exited but not been reaped, or None (unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return "zombie" if fields[0] in "ZX" else int(fields[19])  # state; starttime (field 22)
    except (OSError, ValueError, IndexError):
        return None


def process_cmdline(pid: int) -> str | None:
    """Process ``pid``'s command line (Linux), or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


def check_output_dir(folder: Path) -> None:
    """Refuse (one line) a ``run.output_dir`` that is a file, lies under a file, cannot be
    created, or lies inside another run's folder; nothing is written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run.output_dir: {folder} is a file, not a folder")
    existing = next((p for p in folder.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RunFolderError(f"run.output_dir: {folder} lies under {existing}, which is a "
                             "file, not a folder")
    real = folder.resolve()
    for parent in real.parents:
        if holds_run(parent) or (parent.name in (CKPT_DIR, "final")
                                 and (parent.parent / "recipe.yaml").is_file()):
            raise RunFolderError(f"run.output_dir: {folder} lies inside the run folder "
                                 f"{parent if holds_run(parent) else parent.parent}; choose a "
                                 "folder of its own")


def holds_run(folder: Path) -> bool:
    """``folder`` is an apactl run's folder: its ``recipe.yaml`` next to a lock, checkpoints or
    results (a recipe file alone, e.g. in a project folder, is not a run)."""
    return (folder / "recipe.yaml").is_file() and (
        has_results(folder) or (folder / LOCK).exists() or (folder / CKPT_DIR).is_dir())


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
            try:  # the state is kept: check_resume and the resume read it from memory
                load_state(ckpt)
                return ckpt
            except RunFolderError as exc:
                if exc.reason is None:  # readable, but not resumable (another version): say so
                    raise
                why = exc.reason
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


def recipe_changes(stored: dict[str, Any], current: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ and that change what the run computes.

    ``defaults``: the current schema's default of each dotted key. A key the stored recipe
    lacks (a checkpoint of an earlier apactl, before the key existed) is unchanged when the
    current value is that default: the earlier version computed exactly that.
    """
    a, b = _flatten(stored), _flatten(current)
    defaults = defaults or {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>")
                  and not (k not in a and k in defaults and b.get(k) == defaults[k]))
    return [k for k in keys if not k.startswith(OPERATIONAL)]


def field_defaults(model: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: default} of every field with a default in a pydantic ``model`` instance
    and its nested sections (JSON values, as ``model_dump(mode="json")`` writes them)."""
    from pydantic import BaseModel, TypeAdapter

    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            out.update(field_defaults(value, f"{prefix}{name}."))
        elif not info.is_required():
            try:
                default = info.get_default(call_default_factory=True)
                out[f"{prefix}{name}"] = TypeAdapter(info.annotation).dump_python(
                    default, mode="json")
            except Exception:  # a default pydantic cannot dump is compared as missing
                continue
    return out


def check_resume(last: Path | None, recipe: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume checkpoint ``last`` with a recipe that changes what the run computes
    (``defaults``: see ``recipe_changes``)."""
    if last is None:
        return
    stored = load_state(last).get("recipe", {})
    if "kind" in stored and stored["kind"] != recipe.get("kind"):  # said first: it explains all
        raise RunFolderError(f"--resume: {last.parent.parent} holds a run of kind "
                             f"{stored.get('kind')!r}, not {recipe.get('kind')!r}; choose "
                             "another run.output_dir")
    changed = recipe_changes(stored, recipe, defaults)
    if changed:
        shown = describe_changes(stored, recipe, limit=12, defaults=defaults)
        start = ("policy.name_or_path={}/final/policy" if recipe.get("kind") == "align"
                 else "model.name_or_path={}/final").format(last.parent.parent)
        longer = ("; a run's length cannot change on resume (its LR schedule depends on it): "
                  f"to train a finished run further, start a new run from it ({start})"
                  if any(k in LENGTH for k in changed) else "")
        raise RunFolderError(f"--resume: the recipe differs from the run's ({last}): {shown}"
                             f"; resume with the run's own recipe ({last.parent.parent}/"
                             f"recipe.yaml) or start a new run.output_dir{longer}")


def _shown(value: Any) -> str:
    """A recipe value as YAML writes it (``null``, not Python's ``None``); strings quoted."""
    return "null" if value is None else repr(value)


def describe_changes(stored: dict[str, Any], current: dict[str, Any], limit: int = 8,
                     defaults: dict[str, Any] | None = None) -> str:
    """``key (old -> new), ...`` of the computed keys that differ ("" when none does);
    ``defaults``: see ``recipe_changes``."""
    changed = recipe_changes(stored, current, defaults)
    a, b = _flatten(stored), _flatten(current)
    shown = ", ".join(f"{k} ({_shown(a.get(k, '<unset>'))} -> {_shown(b.get(k, '<unset>'))})"
                      for k in changed[:limit])
    return shown + (f" and {len(changed) - limit} more" if len(changed) > limit else "")


def write_recipe(folder: Path, text: str) -> None:
    write_file(folder / "recipe.yaml", text)
