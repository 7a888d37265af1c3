"""One place where metrics are logged: flat ``group/name`` dicts to metrics.jsonl and the
trackers of ``logging.report_to`` (TensorBoard, W&B, MLflow: ``apactl.trackers``).

Only the main process writes. On resume the file is cut back to the resumed step so a resumed run's
metrics.jsonl reads exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf: null, as in report.json
    return value


class MetricsLogger:
    """Appends ``{"step": n, **metrics}`` lines to ``metrics.jsonl`` and sends the same rows to
    the trackers of ``logging.report_to`` (``apactl.trackers``: TensorBoard, W&B, MLflow).

    ``logging``: the recipe's ``logging`` section (or a bool: TensorBoard alone, on or off);
    ``recipe``: the resolved recipe, the trackers' config. ``latest`` keeps each metric's last
    value and ``started`` the wall clock (the model card reads both).
    """

    def __init__(self, output_dir: str | Path, logging: Any = True, enabled: bool = True,
                 resume_step: int | None = None, recipe: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.latest: dict[str, Any] = {}
        self.started = time.time()
        self.resume_step = resume_step
        self.trackers = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            self._truncate(resume_step)
        names = (["tensorboard"] if logging else []) if isinstance(logging, bool) \
            else logging.trackers
        if names:
            from apactl.trackers import TrackerRun, Trackers

            run = TrackerRun(Path(output_dir), recipe or {}, resume=resume_step is not None)
            self.trackers = Trackers(run, names, resume_step, warn=_warn)

    def _truncate(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        from apactl.atomic import write_file

        write_file(self.path, "".join(ln + "\n" for ln in keep))  # a kill here loses no row

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.latest.update(row)
        if self.trackers is not None:
            self.trackers.log(step, row)

    def artifacts(self, files: list[Path], table: tuple[list[str], list[list[Any]]] | None
                  = None) -> None:
        """A command's result files (a report, plots) and a summary table, to the trackers."""
        if self.enabled and self.trackers is not None:
            self.trackers.artifacts(files, table)

    def close(self, failed: bool = False) -> None:
        if self.trackers is not None:
            self.trackers.close(failed)
            self.trackers = None


def _warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/] {msg}")


def report_results(output_dir: str | Path, logging: Any, recipe: dict[str, Any],
                   metrics: dict[str, float], files: list[Path],
                   table: tuple[list[str], list[list[Any]]] | None = None) -> None:
    """A command without training steps (``apactl eval``): its figures (at step 0), result
    files and summary table to the W&B / MLflow trackers of ``logging.report_to`` (a new
    tracker run each time). TensorBoard has no place for files and tables: the report in the
    folder is the record."""
    names = [t for t in logging.trackers if t != "tensorboard"]
    if not names:
        return
    from apactl.trackers import TrackerRun, Trackers

    trackers = Trackers(TrackerRun(Path(output_dir), recipe), names, warn=_warn)
    try:
        trackers.log(0, metrics)
        trackers.artifacts(files, table)
    finally:
        trackers.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


# Below this terminal width the progress line drops its elapsed/eta text and the eval table
# turns vertical: at 80 columns rich otherwise cuts or wraps them into noise.
NARROW = 100


class Progress:
    """A rich progress bar with a few live fields (loss, lr, tokens/s); ETA from rich.

    On a terminal narrower than ``NARROW`` columns: description, bar, M/N and the fields only,
    the bar taking what the text leaves. ``out``: the console to draw on (default: ``console``).
    """

    def __init__(self, total: int, description: str, enabled: bool = True, start: int = 0,
                 out: Console | None = None):
        self.enabled = enabled
        self._bar = None
        if not enabled:
            return
        from rich.progress import Progress as RichProgress

        out = out or console
        narrow = out.width < NARROW
        self._bar = RichProgress(*_progress_columns(narrow), console=out, transient=False,
                                 expand=narrow)
        self._task = self._bar.add_task(description, total=total, completed=start, info="")
        self._bar.start()

    def update(self, advance: int = 1, **fields: float) -> None:
        if self._bar is None:
            return
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        self._bar.update(self._task, advance=advance, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _progress_columns(narrow: bool) -> list[Any]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if narrow:  # bar_width=None: the bar fills what the text columns leave of the line
        return [TextColumn("[bold]{task.description}"), BarColumn(bar_width=None),
                MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
    return [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}")]


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.4g}"


class Timer:
    """Wall time (and, on CUDA, peak GPU memory) per phase: ``with timer("generate"): ...``.

    ``wrap(name)`` is entered inside the timed region (``Hooks.wrap``: a benchmark counts FLOPs
    there). ``pop()`` returns the seconds per phase; ``pop_memory()`` the peak GiB per phase.
    """

    def __init__(self, wrap=None, device=None):
        self.times: dict[str, float] = {}
        self.memory: dict[str, float] = {}
        self.wrap = wrap
        self.cuda = device is not None and torch_device_type(device) == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str):
        import torch

        if self.cuda:
            torch.cuda.synchronize()  # time the phase's own kernels, not queued earlier work
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            with self.wrap(name) if self.wrap is not None else contextlib.nullcontext():
                yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() / 2**30
                self.memory[name] = max(self.memory.get(name, 0.0), peak)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict[str, float]:
        out, self.times = self.times, {}
        return out

    def pop_memory(self) -> dict[str, float]:
        out, self.memory = self.memory, {}
        return out


def torch_device_type(device) -> str:
    return getattr(device, "type", str(device).split(":")[0])
