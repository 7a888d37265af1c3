"""The experiment trackers of ``logging.report_to``: TensorBoard, Weights & Biases, MLflow.

``apactl.metrics.MetricsLogger`` is the one place that logs; it hands every row it writes to
metrics.jsonl to ``Trackers``, which fans it out to the backends here with the same flat
``group/name`` keys and the same steps. Only rank 0 builds one (the logger is disabled
elsewhere).

* The run's resolved recipe is each tracker's config/params (flattened to dotted keys),
  ``run.name`` its run name, ``logging.project`` the W&B project / MLflow experiment and
  ``logging.group`` the W&B group / MLflow tag ``apactl.group`` (an ``apactl sweep``).
* Resume: the tracker run's id is kept in ``<output_dir>/trackers.json`` with the last step
  (and the keys at that step) that each tracker received, so a resumed run continues the same
  tracker run and sends no step twice (the steps between the checkpoint and the kill went to
  the tracker before; the resumed run recomputes them for metrics.jsonl only).
* A tracker that fails (not reachable, server gone) prints one warning and is dropped: the run
  goes on and metrics.jsonl remains the record.
* The tracker libraries read their own environment variables (``WANDB_MODE``,
  ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...); apactl passes only what the recipe says.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "trackers.json"
INSTALL = {"wandb": "pip install 'apactl[wandb]'", "mlflow": "pip install 'apactl[mlflow]'"}
DEFAULT_PROJECT = "apactl"


def installed(module: str) -> bool:
    """``module`` can be imported (``find_spec``: nothing is imported, nothing is slow)."""
    return importlib.util.find_spec(module) is not None


def missing_trackers(report_to: list[str]) -> list[str]:
    """``logging.report_to: X is not installed ...`` per optional tracker that is absent."""
    return [f"logging.report_to: {name} is not installed; install it with `{INSTALL[name]}`"
            for name in report_to if name in INSTALL and not installed(name)]


def algorithm(recipe: dict[str, Any]) -> str:
    """What trained the model: ``algo.name`` of an align recipe (apa, ppo, ...), else the
    command (sft, rm, ...)."""
    algo = recipe.get("algo")
    if isinstance(algo, dict) and algo.get("name"):
        return str(algo["name"])
    return str(recipe.get("kind", "run"))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists of mappings) -> one level of dotted keys:
    ``{"train": {"lr": 1e-5}, "judges": [{"name": "x"}]}`` -> ``{"train.lr": 1e-5,
    "judges.0.name": "x"}``. Lists of plain values stay lists."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    out.update(flatten(v, f"{dotted}.{i}."))
                else:
                    out[f"{dotted}.{i}"] = v
        else:
            out[dotted] = value
    return out


PARAM_CHARS = 6000  # MLflow's limit on a param value


def param_text(value: Any) -> str:
    """A config value as an MLflow param (params are strings): strings as they are, the rest
    as JSON (``null``, ``true``, ``[1, 2]``), cut to MLflow's 6000 characters."""
    return (value if isinstance(value, str) else json.dumps(value))[:PARAM_CHARS]


@dataclass
class TrackerRun:
    """What a tracker is told about the run."""

    out: Path
    recipe: dict[str, Any]  # the resolved recipe
    resume: bool = False  # continue the tracker runs named in trackers.json

    @property
    def name(self) -> str:
        return str(self.recipe.get("run", {}).get("name", "run"))

    @property
    def kind(self) -> str:
        return str(self.recipe.get("kind", "run"))

    @property
    def logging(self) -> dict[str, Any]:
        return self.recipe.get("logging", {})

    @property
    def tags(self) -> list[str]:
        return list(dict.fromkeys(["apactl", self.kind, algorithm(self.recipe)]))


def numeric(row: dict[str, Any]) -> dict[str, float]:
    """The row's plain finite numbers (metrics.jsonl writes NaN/inf as null: skipped alike)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


# ------------------------------------------------------------------------------- backends
class TensorBoard:
    name = "tensorboard"
    resumable = False  # SummaryWriter(purge_step=...) drops the steps after the checkpoint

    def __init__(self, run: TrackerRun, state: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.out / "tb"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def artifacts(self, files: list[Path], table: tuple[list[str], list[list[Any]]] | None
                  ) -> None:
        pass  # TensorBoard has no file store; the files sit in the run folder

    def close(self, failed: bool) -> None:
        self.writer.flush()
        self.writer.close()


class WandB:
    """A W&B run in ``<output_dir>/wandb``; ``WANDB_MODE=offline`` etc. are wandb's own."""

    name = "wandb"
    resumable = True

    def __init__(self, run: TrackerRun, state: dict[str, Any], resume_step: int | None):
        import wandb

        lg = run.logging
        run_id = state.get("id")
        self.run = wandb.init(
            project=lg.get("project") or wandb.env.get_project() or DEFAULT_PROJECT,
            name=run.name, group=lg.get("group"), job_type=run.kind, tags=run.tags,
            config=flatten(run.recipe), dir=str(run.out), id=run_id,
            resume="must" if run_id else None, reinit="create_new")
        self.id = self.run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def artifacts(self, files: list[Path], table: tuple[list[str], list[list[Any]]] | None
                  ) -> None:
        import wandb

        logged: dict[str, Any] = {}
        if table is not None:
            logged["eval/summary"] = wandb.Table(columns=table[0], data=table[1])
        for f in files:
            if f.suffix == ".png":
                logged[f"eval/{f.stem}"] = wandb.Image(str(f))
        if logged:
            self.run.log(logged)
        # Artifact names allow letters, digits, - _ . only.
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.run.name or 'eval'}-report")
        art = wandb.Artifact(name, type="evaluation")
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MLflow:
    """An MLflow run through ``MlflowClient`` (the tracking URI is MLflow's own setting:
    ``MLFLOW_TRACKING_URI``, else its default store)."""

    name = "mlflow"
    resumable = True
    BATCH = 100  # params per log_batch call (MLflow's limit); metrics: 1000

    def __init__(self, run: TrackerRun, state: dict[str, Any], resume_step: int | None):
        from mlflow import get_tracking_uri
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME
        from mlflow.tracking import MlflowClient

        uri = get_tracking_uri()  # MLFLOW_TRACKING_URI, else MLflow's default
        if uri.startswith("sqlite") and not installed("sqlalchemy"):
            # mlflow-skinny (apactl[mlflow]) has no database store: MLflow's default URI.
            raise RuntimeError(f"the tracking URI {uri} needs the full mlflow package; set "
                               "MLFLOW_TRACKING_URI to a server (http://...) or install mlflow")
        self.client = MlflowClient(uri)
        self.id = state.get("id")
        if self.id:
            self.client.update_run(self.id, status="RUNNING")
            return
        lg = run.logging
        project = lg.get("project") or MLFLOW_EXPERIMENT_NAME.get()
        exp_id = None if project else MLFLOW_EXPERIMENT_ID.get()
        if exp_id is None:
            project = project or DEFAULT_PROJECT
            exp = self.client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
        tags = {"apactl.kind": run.kind, "apactl.algorithm": algorithm(run.recipe)}
        if lg.get("group"):
            tags["apactl.group"] = lg["group"]
        self.id = self.client.create_run(exp_id, run_name=run.name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, param_text(v)) for k, v in flatten(run.recipe).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.id, params=params[i:i + self.BATCH])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.id, metrics=rows[i:i + 1000])

    def artifacts(self, files: list[Path], table: tuple[list[str], list[list[Any]]] | None
                  ) -> None:
        for f in files:
            self.client.log_artifact(self.id, str(f))
        if table is not None:
            self.client.log_dict(self.id, {"columns": table[0], "data": table[1]},
                                 "eval_summary.json")

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.id, "FAILED" if failed else "FINISHED")


BACKENDS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


# ------------------------------------------------------------------------------- fan-out
@dataclass
class Trackers:
    """The backends of one run; each failure is one warning, and that backend is dropped."""

    run: TrackerRun
    names: list[str]
    resume_step: int | None = None  # the checkpoint's step when resuming (TensorBoard purges)
    warn: Callable[[str], None] = print
    backends: list[Any] = field(default_factory=list)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.run.resume:
            self.state = read_state(self.run.out)
        for name in self.names:
            mine = self.state.get(name, {}) if self.run.resume else {}
            try:
                backend = BACKENDS[name](self.run, mine, self.resume_step)
            except ImportError:
                if name == "tensorboard":
                    continue  # the tensorboard package is optional at run time
                self._failed(name, "not installed", starting=True)
                continue
            except Exception as exc:  # noqa: BLE001 - a tracker never stops the run
                self._failed(name, exc, starting=True)
                continue
            self.backends.append(backend)
            if backend.resumable:
                self.state[name] = {"id": backend.id, "step": mine.get("step"),
                                    "keys": mine.get("keys", [])}
        self._save()

    def _failed(self, name: str, exc: Any, starting: bool = False) -> None:
        what = "could not start" if starting else "failed"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.warn(f"logging.report_to: {name} {what} ({detail}); the run goes on without it "
                  "(metrics.jsonl is the record)")

    def log(self, step: int, row: dict[str, Any]) -> None:
        metrics = numeric(row)
        if not metrics:
            return
        changed = False
        for b in list(self.backends):
            send = metrics
            if b.resumable:
                seen = self.state[b.name]
                last = seen.get("step")
                if last is not None and step < last:
                    continue  # sent before the kill: the tracker has it
                if last == step:
                    send = {k: v for k, v in metrics.items() if k not in seen["keys"]}
                    if not send:
                        continue
            try:
                b.log(step, send)
            except Exception as exc:  # noqa: BLE001
                self._drop(b, exc)
                continue
            if b.resumable:
                seen = self.state[b.name]
                keys = seen["keys"] if seen.get("step") == step else []
                seen.update(step=step, keys=sorted({*keys, *send}))
                changed = True
        if changed:
            self._save()

    def artifacts(self, files: list[Path], table: tuple[list[str], list[list[Any]]] | None
                  = None) -> None:
        """Files (a report, plots) and a summary table (columns, rows) as the run's artefacts."""
        for b in list(self.backends):
            try:
                b.artifacts([Path(f) for f in files], table)
            except Exception as exc:  # noqa: BLE001
                self._drop(b, exc)

    def _drop(self, backend: Any, exc: Exception) -> None:
        self.backends.remove(backend)
        self._failed(backend.name, exc)
        try:
            backend.close(failed=True)
        except Exception:  # noqa: BLE001 - it is already broken
            pass

    def close(self, failed: bool = False) -> None:
        for b in self.backends:
            try:
                b.close(failed)
            except Exception as exc:  # noqa: BLE001
                self._failed(b.name, exc)
        self.backends = []

    def _save(self) -> None:
        if not self.state:
            return
        from apactl.atomic import write_file

        write_file(self.run.out / STATE_FILE, json.dumps(self.state, indent=1) + "\n")


def read_state(out: Path) -> dict[str, dict[str, Any]]:
    """``trackers.json`` of a run folder ({} when absent or unreadable: new tracker runs)."""
    try:
        state = json.loads((Path(out) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
