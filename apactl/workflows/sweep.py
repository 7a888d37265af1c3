"""``apactl sweep``: a grid of runs of one recipe, one after another, resumable.

Every grid point is an ordinary ``apactl <kind> RECIPE <overrides> run.output_dir=<folder>
--resume`` run in a subprocess, so a point can be re-run alone with exactly the command that the
sweep printed, and a crash in one run cannot take the others down. The sweep's own state is a
file, ``<root>/sweep.json``; the truth about a run is its folder (``run_finished``), so the sweep
can be killed at any moment and the same command finishes it.

The plan (grid, names, commands, emitted scripts) is ``workflows.sweep_plan``; this module runs
it: ``run_sweep`` and ``Child`` are the only parts that start processes.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apactl.atomic import write_file
from apactl.errors import RecipeError
from apactl.metrics import console, read_metrics
from apactl.workflows.sweep_plan import (
    EMIT_FILES,
    Plan,
    Run,
    dry_run_text,
    plan_sweep,
    run_finished,
    write_script,
)

STATE_FILE = "sweep.json"
LOG_FILE = "sweep-stderr.log"  # the child's stderr, appended per attempt, inside its run folder
STOP_GRACE_S = (3.0, 10.0)  # after Ctrl-C: wait for the child, then after forwarding SIGINT
SCHEMA_VERSION = 1
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A few final metrics per kind for the progress table: column label -> metric.
KEY_METRICS = {
    "align": {"reward": "reward/score_mean", "kl": "kl/ref_k1"},
    "sft": {"eval loss": "eval/loss", "ppl": "eval/perplexity"},
    "rm": {"eval loss": "eval/loss", "acc": "eval/accuracy"},
    "dpo": {"eval loss": "eval/loss", "acc": "eval_rewards/accuracies",
            "margin": "eval_rewards/margins"},
}

def run_record(run: Run, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's sweep.json entry as the sweep starts: finished (its folder says so) or pending;
    the wall seconds of earlier attempts carry over."""
    return {
        "name": run.name, "folder": str(run.folder), "grid": run.grid,
        "overrides": run.overrides, "command": run.command,
        "status": "finished" if run_finished(run.folder) else "pending",
        "exit_code": None, "error": None, "pid": None,
        "seconds": (previous or {}).get("seconds"),
        "metrics": final_metrics(run.folder),
    }


def final_metrics(folder: Path) -> dict[str, Any]:
    """The last row of the run's metrics.jsonl ({} before the first one)."""
    rows = read_metrics(folder)
    return rows[-1] if rows else {}


def new_state(plan: Plan, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """This sweep's record; runs that an earlier sweep into the same root recorded and this
    one does not have (another grid) are kept, as they were, under ``earlier_runs``."""
    prev = previous or {}
    records = [r for key in ("runs", "earlier_runs") for r in prev.get(key, [])
               if isinstance(r, dict)]
    old = {r.get("name"): r for r in records}
    current = {r.name for r in plan.runs}
    return {
        "version": SCHEMA_VERSION, "recipe": plan.recipe, "kind": plan.kind,
        "root": str(plan.root), "grid": {a.key: list(a.values) for a in plan.axes},
        "overrides": plan.fixed, "updated": None,
        "runs": [run_record(r, old.get(r.name)) for r in plan.runs],
        "earlier_runs": [r for name, r in old.items() if name not in current],
    }


def read_state(path: Path) -> dict[str, Any] | None:
    """A previous sweep.json, or None (missing or unreadable: it is only a record)."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_file(path, json.dumps(state, indent=2) + "\n")


# -------------------------------------------------------------------------- scripts (pure)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def last_line(tail: bytes) -> str | None:
    """The last non-blank line of a stderr tail; progress bars redraw with \\r and colours."""
    text = ANSI.sub("", tail.decode("utf-8", "replace"))
    lines = [ln.strip() for ln in re.split(r"[\r\n]", text) if ln.strip()]
    return lines[-1] if lines else None


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if sys.stderr.isatty():
        # The child's stderr is our pipe; its rich progress bar should still draw live
        # through the tee, as wide as our terminal.
        env.setdefault("FORCE_COLOR", "1")
        env.setdefault("COLUMNS", str(console.width))
    return env


def die_with_parent() -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=...)`` on Linux: the child gets SIGTERM when the sweep dies (even
    by SIGKILL), so no run goes on unwatched holding its folder's lock; apactl's SIGTERM stops
    it at the next step with a checkpoint, which the next sweep resumes. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the sweep died before the line above: act on it now
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class Child:
    """One run's process: stderr teed to ``echo`` and ``log`` while the tail is kept for the
    failure message; stdout passes straight through."""

    def __init__(self, cmd: list[str], log: Path, echo: Callable[[str], None]):
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("ab")
        self._tail = b""
        self._echo = echo
        try:
            self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=child_env(),
                                         preexec_fn=die_with_parent())
        except OSError:
            self._log.close()
            raise
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        decode = codecs.getincrementaldecoder("utf-8")("replace")
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._log.write(chunk)
            self._log.flush()
            self._tail = (self._tail + chunk)[-8192:]
            self._echo(decode.decode(chunk))

    def wait(self) -> int:
        """The exit code (negative: killed by that signal)."""
        code = self.proc.wait()
        self._finish()
        return code

    def stop(self) -> None:
        """After Ctrl-C: a Ctrl-C typed in a terminal reached the child too (same process
        group), so let it exit cleanly first; forward a SIGINT sent to the sweep alone; then
        insist. A second Ctrl-C kills at once."""
        try:
            for sig, grace in ((None, STOP_GRACE_S[0]), (signal.SIGINT, STOP_GRACE_S[1])):
                if sig is not None and self.proc.poll() is None:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        except KeyboardInterrupt:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._finish()

    def _finish(self) -> None:
        self._pump.join(timeout=10)
        self._log.close()

    def last_line(self) -> str | None:
        return last_line(self._tail)


def echo_stderr(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def run_one(run: Run, entry: dict[str, Any], save: Callable[[], None],
            echo: Callable[[str], None]) -> None:
    """Run one grid point to its end and record the outcome in ``entry`` (its sweep.json
    record); Ctrl-C marks it interrupted, saves, and goes on up."""
    t0 = time.monotonic()
    child = Child(run.command, run.folder / LOG_FILE, echo)

    def close(status: str, code: int | None, error: str | None) -> None:
        seconds = (entry.get("seconds") or 0.0) + time.monotonic() - t0
        entry.update(status=status, exit_code=code, error=error, pid=None,
                     seconds=round(seconds, 1), metrics=final_metrics(run.folder))
        save()

    try:  # from here on, Ctrl-C must not leave the child running unrecorded
        entry.update(status="running", exit_code=None, error=None, pid=child.proc.pid)
        save()
        code = child.wait()
    except KeyboardInterrupt:
        child.stop()
        if child.proc.returncode == 0 and run_finished(run.folder):
            close("finished", 0, None)  # it finished within the grace period
        else:
            close("interrupted", None, "interrupted (Ctrl-C)")
        raise
    if code == 0 and run_finished(run.folder):
        close("finished", 0, None)
    else:
        close("failed", code, failure_message(code, child.last_line(), run.folder))


def failure_message(code: int, last: str | None, folder: Path) -> str:
    """One line for sweep.json: the child's last stderr line, and how it ended if unusual."""
    if code == 0:  # cannot happen with apactl's commands; a broken run must not pass as done
        return f"exited 0 but wrote no {folder / 'final'}"
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
        return f"{how}; last line: {last}" if last else how
    return last or f"exit code {code}, no output"


def run_sweep(plan: Plan, echo: Callable[[str], None] = echo_stderr) -> dict[str, Any]:
    """Run every unfinished point in order; sweep.json is rewritten at each status change.
    Returns the final state."""
    path = plan.root / STATE_FILE
    state = new_state(plan, read_state(path))
    write_state(path, state)
    n = len(plan.runs)
    for i, (run, entry) in enumerate(zip(plan.runs, state["runs"]), 1):
        if entry["status"] == "finished":
            console.print(f"[{i}/{n}] {run.name}: finished earlier, skipped "
                          f"({run.folder / 'final'} exists)", highlight=False)
            continue
        console.rule(f"[{i}/{n}] {run.name}", characters="-")
        try:
            run_one(run, entry, lambda: write_state(path, state), echo)
        finally:
            console.print(status_table(state))
    return state


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _number(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-" if v is None else str(v)[:9]
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def status_table(state: dict[str, Any]):
    """A rich table of every run (fits 80 columns): status, wall time, key final metrics."""
    from rich.table import Table

    metrics = KEY_METRICS.get(state["kind"], {})
    table = Table(title=f"sweep: {state['root']}", title_justify="left", box=None,
                  pad_edge=False)
    table.add_column("run", overflow="fold", max_width=34)
    table.add_column("status", max_width=11)
    table.add_column("time", justify="right")
    for label in metrics:
        table.add_column(label, justify="right", max_width=9)
    styles = {"finished": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for r in state["runs"]:
        status = r["status"] + (f" ({r['exit_code']})" if r["status"] == "failed" else "")
        style = styles.get(r["status"], "")
        table.add_row(r["name"], f"[{style}]{status}[/]" if style else status,
                      _duration(r["seconds"]),
                      *(_number(r["metrics"].get(m)) for m in metrics.values()))
    return table


def sweep_command(recipe: str, grid: list[str], overrides: list[str], dry_run: bool = False,
                  emit: str | None = None) -> int:
    """The CLI's entry: validate, then print (--dry-run), write a script (--emit) or run.
    Returns the exit code: 1 if any run failed."""
    if emit is not None and emit not in EMIT_FILES:
        raise RecipeError([f"--emit: expected one of: {', '.join(EMIT_FILES)}; got {emit!r}"])
    if dry_run and emit:
        raise RecipeError(["--dry-run and --emit: use one (--emit runs nothing either)"])
    plan = plan_sweep(recipe, grid, overrides)
    if dry_run:
        print(dry_run_text(plan))
        return 0
    if emit:
        print(write_script(plan, emit))
        return 0
    state = run_sweep(plan)
    failed = sum(r["status"] == "failed" for r in state["runs"])
    done = sum(r["status"] == "finished" for r in state["runs"])
    console.print(f"sweep: {done} of {len(state['runs'])} runs finished"
                  + (f", {failed} failed (run the same command to retry them)" if failed else "")
                  + f"; {plan.root / STATE_FILE}", highlight=False)
    return 1 if failed else 0
