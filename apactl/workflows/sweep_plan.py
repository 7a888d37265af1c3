"""``apactl sweep``'s plan: grid parsing and expansion, run names, commands and the emitted
scripts. Pure functions, no processes and no torch: validating a sweep of hundreds of runs takes
seconds.

Folder names: ``<root>/<key>=<value>,<key>=<value>...`` in ``--grid`` order, each key and value
percent-encoded (``urllib.parse.quote``: letters, digits and ``_.-~+`` kept, anything else as
``%XX`` UTF-8 bytes), so ``/``, spaces, ``,`` and ``=`` inside values never split or nest a name;
names over 200 characters are cut to 180 and end in ``~`` plus 12 hex digits of the full name's
SHA-1.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from apactl.atomic import write_file
from apactl.config import RunConfig
from apactl.errors import RecipeError
from apactl.recipe import load_raw, parse_recipe

# The commands that take --resume and write <output_dir>/final.
KINDS = ("align", "sft", "rm", "dpo")
EMIT_FILES = {"slurm": "sweep.sbatch", "commands": "commands.txt"}
MAX_NAME, CUT_NAME = 200, 180  # bytes; most file systems allow 255 per path component
SIGNAL_LEAD_S = 300  # sbatch --signal: seconds before the time limit that SIGTERM is sent


@dataclass(frozen=True)
class Axis:
    """One ``--grid KEY=V1,V2``: the raw value texts (passed on verbatim) and their parsed
    values (as OmegaConf parses a dotlist value: ``1e-4`` a float, ``true`` a bool)."""

    key: str
    texts: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Run:
    name: str
    folder: Path
    grid: dict[str, Any]  # key -> parsed value
    overrides: list[str]  # fixed overrides, then the grid's; run.output_dir comes on top
    command: list[str]  # the local command (python -m apactl ...)


@dataclass(frozen=True)
class Plan:
    recipe: str
    kind: str
    root: Path
    axes: list[Axis]
    fixed: list[str]
    runs: list[Run]


# ------------------------------------------------------------------------------ grid (pure)
def split_values(text: str) -> list[str]:
    """Split ``a,[b,c],'d,e'`` at top-level commas (not inside brackets or quotes)."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quote_ch = 0, None
    for ch in text:
        if quote_ch:
            quote_ch = None if ch == quote_ch else quote_ch
        elif ch in "'\"" and not "".join(cur).strip():  # YAML quotes only open a scalar
            quote_ch = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quote_ch or depth:
        raise ValueError(f"unbalanced brackets or quotes in {text!r}")
    return [*parts, "".join(cur).strip()]


def parse_value(text: str) -> Any:
    """A value as ``key=text`` on the command line would set it (OmegaConf dotlist rules)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]


def parse_axis(spec: str) -> Axis:
    """``KEY=V1,V2,...`` -> Axis; ValueError with a one-line reason."""
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--grid {spec!r}: expected KEY=V1,V2,...")
    try:
        texts = split_values(rest) if rest.strip() else []
    except ValueError as exc:
        raise ValueError(f"--grid {key}: {exc}") from None
    if not texts:
        raise ValueError(f"--grid {key}: no values")
    if "" in texts:
        raise ValueError(f"--grid {key}: empty value in {rest!r} (write '' for an empty string)")
    try:
        values = tuple(parse_value(t) for t in texts)
    except Exception as exc:  # OmegaConf/YAML errors span lines; the first one says it
        raise ValueError(f"--grid {key}: cannot parse {rest!r}: "
                         f"{str(exc).splitlines()[0]}") from None
    seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
    dup = next((t for t, s in zip(texts, seen) if seen.count(s) > 1), None)
    if dup is not None:
        raise ValueError(f"--grid {key}: value {dup} is listed twice")
    return Axis(key, tuple(texts), values)


def parse_grid(specs: list[str], fixed: list[str]) -> list[Axis]:
    """Every ``--grid`` spec -> axes; RecipeError listing every problem (syntax, a key given
    twice, a key also set by a fixed override, run.output_dir)."""
    problems, axes = [], []
    for spec in specs:
        try:
            axes.append(parse_axis(spec))
        except ValueError as exc:
            problems.append(str(exc))
    keys = [s.partition("=")[0].strip() for s in specs if "=" in s]
    fixed_keys = {o.partition("=")[0].strip(): o for o in fixed}
    for key in dict.fromkeys(k for k in keys if k):
        if keys.count(key) > 1:
            problems.append(f"--grid {key}: given twice; list every value in one --grid")
        if key == "run.output_dir":
            problems.append("--grid run.output_dir: the sweep names each run's folder; set the "
                            "sweep's root with the override run.output_dir=...")
        elif key == "kind":
            problems.append("--grid kind: a sweep runs one kind of recipe; sweep each apart")
        elif key in fixed_keys:
            problems.append(f"--grid {key}: also set by the override {fixed_keys[key]!r}; "
                            "drop one")
    if not specs:
        problems.append("--grid: give at least one KEY=V1,V2,...")
    if problems:
        raise RecipeError(problems)
    return axes


def expand(axes: list[Axis]) -> list[list[tuple[str, str, Any]]]:
    """The cartesian product as (key, text, value) triples per point, in --grid order: the
    first axis varies slowest, like nested loops."""
    columns = [[(a.key, t, v) for t, v in zip(a.texts, a.values)] for a in axes]
    return [list(point) for point in itertools.product(*columns)]


def run_name(pairs: list[tuple[str, str]]) -> str:
    """``key=text`` pairs -> one safe folder name (scheme in the module docstring)."""
    name = ",".join(f"{quote(k, safe='+')}={quote(t, safe='+')}" for k, t in pairs)
    if len(name) > MAX_NAME:  # quote() output is ASCII: characters are bytes
        name = f"{name[:CUT_NAME]}~{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def build_command(program: list[str], kind: str, recipe: str, overrides: list[str],
                  folder: Path) -> list[str]:
    """argv of one run; ``--resume`` continues from its latest checkpoint (or starts fresh)."""
    return [*program, kind, recipe, *overrides, f"run.output_dir={folder}", "--resume"]


def local_program() -> list[str]:
    return [sys.executable, "-m", "apactl"]


def run_finished(folder: Path) -> bool:
    """The one test of "done": every kind writes ``final/`` last, atomically (a rename)."""
    return (Path(folder) / "final").is_dir()


# ------------------------------------------------------------------------ planning (pure)
def sweep_root(recipe: str, fixed: list[str]) -> Path:
    """The recipe's run.output_dir after the fixed overrides: the sweep's root folder."""
    run = load_raw(recipe, fixed).get("run")
    root = run.get("output_dir") if isinstance(run, dict) else None
    return Path(str(root or RunConfig.model_fields["output_dir"].default))


def plan_sweep(recipe: str, grid: list[str], fixed: list[str]) -> Plan:
    """Parse the grid and validate every point as a full recipe (files checked) before anything
    runs; RecipeError with one line per problem, each naming its run."""
    axes = parse_grid(grid, fixed)
    root = sweep_root(recipe, fixed)  # a missing recipe or bad override fails once, here
    # run.output_dir=... names the root; each run gets its own folder under it instead.
    fixed = [o for o in fixed if o.partition("=")[0].strip() != "run.output_dir"]
    runs, problems, kinds = [], [], set()
    for point in expand(axes):
        name = run_name([(k, t) for k, t, _ in point])
        overrides = [*fixed, *(f"{k}={t}" for k, t, _ in point)]
        folder = root / name
        try:
            parsed = parse_recipe(load_raw(recipe, [*overrides, f"run.output_dir={folder}"]))
        except RecipeError as exc:
            problems += [f"run {name}: {p}" for p in exc.problems]
            continue
        kinds.add(parsed.kind)
        overrides = tracker_names(parsed, root, name, overrides)
        runs.append(Run(name, folder, {k: v for k, _, v in point}, overrides,
                        build_command(local_program(), parsed.kind, recipe, overrides, folder)))
    problems += _name_clashes([r.name for r in runs])
    if problems:
        raise RecipeError(problems)
    kind = kinds.pop()  # kind is not a grid key: every point has the recipe's kind
    if kind not in KINDS:
        raise RecipeError([f"kind: apactl sweep runs {', '.join(KINDS)} recipes, not {kind!r}"])
    return Plan(recipe, kind, root, axes, list(fixed), runs)


def tracker_names(parsed: Any, root: Path, name: str, overrides: list[str]) -> list[str]:
    """A sweep that reports to W&B or MLflow groups its runs: ``logging.group=<root folder
    name>`` and ``run.name=<the run's name>`` before the run's overrides, unless the recipe or
    the overrides set them (then theirs stay)."""
    if not {"wandb", "mlflow"} & set(parsed.logging.trackers):
        return overrides
    keys = {o.partition("=")[0].strip() for o in overrides}
    extra = [] if parsed.logging.group or "logging.group" in keys \
        else [f"logging.group={root.name}"]
    extra += [] if "run.name" in keys else [f"run.name={name}"]
    return [*extra, *overrides]


def _name_clashes(names: list[str]) -> list[str]:
    # apa and APA are one folder on case-insensitive file systems (macOS, Windows).
    lower = [n.lower() for n in names]
    return [f"run {n}: its folder name differs from another run's only in letter case"
            for n, low in zip(names, lower) if lower.count(low) > 1]


# --------------------------------------------------------------------- sweep.json (pure I/O)
def emit_program() -> list[str]:
    # Scripts run elsewhere (a cluster node): call the installed entry point, not this python.
    return ["apactl"]


def emitted_commands(plan: Plan) -> list[str]:
    """One shell command per run (no cd; the caller runs them from the sweep's directory)."""
    return [shlex.join(build_command(emit_program(), plan.kind, plan.recipe, r.overrides,
                                     r.folder)) for r in plan.runs]


def commands_text(plan: Plan, cwd: Path) -> str:
    """commands.txt: one self-contained line per run (relative paths need the cwd)."""
    cd = f"cd {shlex.quote(str(cwd))} && "
    return "".join(f"{cd}{c}\n" for c in emitted_commands(plan))


def sbatch_text(plan: Plan, cwd: Path) -> str:
    """A SLURM job array: task k runs run k (the order of sweep.json and --dry-run)."""
    log = shlex.quote(str((cwd / plan.root).resolve() / "slurm-%A_%a.out"))
    lines = [
        "#!/bin/bash",
        f"# apactl sweep: {len(plan.runs)} {plan.kind} runs of {plan.recipe}, one per array "
        "task.",
        "# Submit with: sbatch THIS_FILE. Add your cluster's #SBATCH options (partition, GPUs,",
        "# time) and load your environment (module load / source .venv/bin/activate) below.",
        "#SBATCH --job-name=apactl-sweep",
        f"#SBATCH --array=0-{len(plan.runs) - 1}",
        f"#SBATCH --output={log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "# SIGTERM ahead of the time limit (or of a pre-emption): the run finishes its step,",
        "# writes a checkpoint and exits; the task re-queued (or submitted again) resumes it.",
        "# Raise the lead time if one step plus a checkpoint takes longer.",
        f"#SBATCH --signal=B:TERM@{SIGNAL_LEAD_S}",
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        "RUNS=(",
    ]
    for i, (run, cmd) in enumerate(zip(plan.runs, emitted_commands(plan))):
        lines += [f"  # {i}: {run.name}", f"  {shlex.quote(cmd)}"]
    # exec: apactl becomes the batch shell, the process that --signal=B: signals.
    lines += [")", 'eval "exec ${RUNS[${SLURM_ARRAY_TASK_ID:?run with sbatch or set '
              'SLURM_ARRAY_TASK_ID}]}"']
    return "\n".join(lines) + "\n"


def dry_run_text(plan: Plan) -> str:
    out = [f"{len(plan.runs)} {plan.kind} runs of {plan.recipe} in {plan.root}:"]
    for i, run in enumerate(plan.runs):
        done = " (finished: skipped)" if run_finished(run.folder) else ""
        out += [f"[{i}] {run.name}{done}", f"    folder:  {run.folder}",
                f"    command: {shlex.join(run.command)}"]
    return "\n".join(out)


def write_script(plan: Plan, emit: str) -> Path:
    """--emit slurm|commands: write the script into the sweep's root; return its path."""
    cwd = Path.cwd()
    text = sbatch_text(plan, cwd) if emit == "slurm" else commands_text(plan, cwd)
    path = plan.root / EMIT_FILES[emit]
    write_file(path, text)
    if emit == "slurm":
        path.chmod(0o755)
    return path


# ------------------------------------------------------------------------- running (impure)
