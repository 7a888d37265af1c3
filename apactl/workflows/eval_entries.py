"""Which models ``apactl eval`` compares: policies (and checkpoints of policy runs) and the
baseline, each an ``Entry`` with the recipe key it came from (named in every error)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from apactl.checkpoint import list_checkpoints
from apactl.config import EvalRecipe, ModelConfig, PolicySpec
from apactl.errors import ModelError, UserError
from apactl.models import resolve_model_ref
from apactl.run_folder import OPERATIONAL
from apactl.sources import looks_local


@dataclass
class Entry:
    """One model to evaluate: a policy, one checkpoint of a policy run, or the baseline."""

    name: str  # report name; checkpoints are "name@step"
    path: str  # what load_policy gets: a model folder, an alias or a hub id
    field: str  # the recipe key it came from (error messages)
    group: str  # the PolicySpec name: a run's checkpoints share it and are joined in plots
    step: int | None = None
    run: Path | None = None  # the apactl run folder (recipe.yaml, metrics.jsonl)
    init: str | None = None  # the run's initial policy: policy.name_or_path of its recipe.yaml
    is_baseline: bool = False
    ref: str | None = None  # the reference as the recipe wrote it (before resolution)
    config: str | None = None  # runs differing only in run.seed share it (set by group_configs)
    seed: int | None = None


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------------- policies
def _run_meta(run: Path | None) -> dict[str, Any]:
    if run is None:
        return {}
    return yaml.safe_load((run / "recipe.yaml").read_text()) or {}


def reward_is_normalized(run: Path) -> bool:
    """Whether an align run's reward was a reward model's score normalised by its mean/std
    (what the y axis of its reward curve means)."""
    reward = _run_meta(run).get("reward") or {}
    return reward.get("name") == "reward-model" and bool(reward.get("normalize"))


def _resolve(ref: str, field: str) -> str:
    try:
        return resolve_model_ref(ref)
    except ModelError as exc:
        raise ModelError(f"{field}: {first_line(exc)}") from None


def sweep_runs(path: Path) -> list[Path]:
    """The run folders of a sweep folder (``apactl sweep``: sweep.json, one folder per run), or
    [] when ``path`` is not one."""
    if not path.is_dir() or (path / "recipe.yaml").is_file():
        return []
    return sorted(p for p in path.iterdir() if (p / "recipe.yaml").is_file())


def expand_policy(spec: PolicySpec, i: int) -> list[Entry]:
    """A PolicySpec -> its entries: the checkpoints (when asked, in step order), then the model
    itself. A run's last checkpoint is skipped when final/policy holds the same weights. A sweep
    folder gives every run in it, named ``<name>/<run folder>``."""
    field = f"policies.{i}.path"
    path = Path(spec.path).expanduser()
    # Checked here rather than by `recipe validate`: see EvalRecipe's _path_fields comment.
    if looks_local(spec.path) and not path.exists():
        raise UserError(f"{field}: not found: {spec.path}")
    runs = sweep_runs(path)
    if runs:
        return [e for run in runs for e in expand_policy(
            spec.model_copy(update={"name": f"{spec.name}/{run.name}", "path": str(run)}), i)]
    run = path if path.is_dir() and (path / "recipe.yaml").is_file() else None
    meta = _run_meta(run)
    ckpts = list_checkpoints(run) if spec.checkpoints and run is not None else []
    if spec.checkpoints and run is None:
        raise UserError(f"policies.{i}.checkpoints: {spec.path} is not an apactl run folder "
                        "(no recipe.yaml)")
    try:
        final: str | None = resolve_model_ref(spec.path)
    except ModelError as exc:
        if not ckpts:
            raise ModelError(f"{field}: {first_line(exc)}") from None
        final = None  # an unfinished run: its checkpoints only
    # An align run ends at train.iterations; a dpo (or sft) run's last checkpoint is its end.
    final_step = ((meta.get("train") or {}).get("iterations")
                  or (int(ckpts[-1].name.split("-")[1]) if ckpts else None)) if final else None
    common = dict(field=field, group=spec.name, run=run,
                  init=(meta.get("policy") or {}).get("name_or_path"))
    entries = []
    for ck in ckpts:
        step = int(ck.name.split("-")[1])
        if step != final_step:
            # align checkpoints hold policy/ (and critic/), supervised ones (dpo) model/
            model = ck / "policy" if (ck / "policy").is_dir() else ck / "model"
            entries.append(Entry(f"{spec.name}@{step}", str(model), step=step, **common))
    if final is not None:
        entries.append(Entry(spec.name, final, step=final_step, **common))
    return entries


def resolve_baseline(recipe: EvalRecipe, entries: list[Entry]) -> Entry:
    """``recipe.baseline``, else the initial policy of the first policy run."""
    if recipe.baseline is not None:
        b = recipe.baseline
        return Entry(b.name, _resolve(b.path, "baseline.path"), "baseline.path", b.name,
                     is_baseline=True, ref=b.path)
    for e in entries:
        if e.init:
            taken = {x.group for x in entries}
            name = "baseline" if "baseline" not in taken else "baseline-init"
            field = f"baseline (policy.name_or_path of {e.run / 'recipe.yaml'})"
            return Entry(name, _resolve(e.init, field), field, name, is_baseline=True,
                         ref=e.init)
    raise UserError("baseline: not set, and no policy is an apactl run folder naming its initial "
                    "policy; set baseline: {name: ..., path: ...}")


def same_model(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def starts_at_baseline(e: Entry, base: Entry) -> bool:
    if not e.init:
        return False
    try:
        return same_model(resolve_model_ref(e.init), base.path)
    except ModelError:  # the run's initial model is gone: nothing to connect
        return False


def load_entry(e: Entry, device, dtype):
    """(model, tokenizer), frozen in eval mode; load failures name the recipe key."""
    from apactl.models import load_policy

    try:
        return load_policy(ModelConfig(name_or_path=e.path), device, dtype, trainable=False)
    except (OSError, ValueError, ModelError) as exc:
        raise ModelError(f"{e.field}: cannot load {e.path}: {first_line(exc)}") from None


# Keys that do not make another configuration: the seed, and what a resume may change (how a
# run is operated: logging, threads, device, checkpoint cadence, offload, ...).
NOT_CONFIG = ("run.seed", *OPERATIONAL)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def group_configs(entries: list[Entry]) -> None:
    """Set ``config`` (and ``seed``) of every entry that is an apactl run: runs whose resolved
    recipes differ only in ``NOT_CONFIG`` keys share a configuration, labelled by the keys in
    which the configurations differ (``algo.name=apa train.lr=0.0001``)."""
    metas = {e.run: _flat(_run_meta(e.run)) for e in entries if e.run is not None}
    sigs = {run: tuple(sorted((k, repr(v)) for k, v in m.items() if not k.startswith(NOT_CONFIG)))
            for run, m in metas.items()}
    varying = sorted({k for s in set(sigs.values()) for k, _ in s
                      if len({dict(t).get(k) for t in set(sigs.values())}) > 1})
    keys = label_keys([dict(s) for s in set(sigs.values())], varying)
    for e in entries:
        if e.run is None:
            continue
        m = metas[e.run]
        # Unset keys (None: e.g. PPO's clip for an APA run) say nothing: left out of the label.
        label = " ".join(f"{k}={m.get(k)}" for k in keys if m.get(k) is not None)
        e.config, e.seed = label or e.group.split("/")[0], m.get("run.seed")


def label_keys(sigs: list[dict[str, str]], varying: list[str]) -> list[str]:
    """The fewest varying keys (greedy, ``algo.name`` first) that tell every configuration
    apart: an algorithm's name implies its defaults (kl.beta, vf_coef, ...), so APA vs PPO at
    lambda 0.1 and 0.3 reads ``algo.name=apa algo.lam=0.3``, not every key that differs."""
    def distinct(keys: list[str]) -> int:
        return len({tuple(s.get(k) for k in keys) for s in sigs})

    chosen: list[str] = []
    for k in sorted(varying, key=lambda k: (k != "algo.name", k)):
        if distinct(chosen) == distinct(varying):
            break
        if distinct([*chosen, k]) > distinct(chosen):
            chosen.append(k)
    return chosen
