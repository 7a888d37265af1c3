"""The ``apactl`` command line: a thin typer layer.

It parses arguments, loads and validates the recipe, and hands it to one ``run_*`` workflow.
torch and transformers are imported lazily inside the commands so ``apactl --help`` is instant.
User errors (recipe, data, model) print one line per problem and exit 2, without a traceback.

Under ``torchrun``/``accelerate launch`` every rank runs this same CLI. A failing rank must bring
the job down at once with its error printed once: the first rank to fail prints it (prefixed
``[rank r]``) and every failing rank leaves with ``os._exit``, skipping the interpreter's teardown
(which could wait on peers stuck in a collective); the launcher then stops the other ranks.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer

from apactl import __version__
from apactl.errors import RecipeError, Stopped, Terminated, UserError

EXIT_USER_ERROR = 2
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped on request (a checkpoint written, or at once)

app = typer.Typer(
    name="apactl",
    help="Fine-tune language models from feedback with APA, PPO and AWR.\n\n"
    "Runs are declared in YAML recipes; override any key with key=value after the recipe path.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Validate, show and describe recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

RECIPE_ARG = typer.Argument(..., help="Path to a YAML recipe.", show_default=False)
OVERRIDES_ARG = typer.Argument(None, help="Dotted overrides, e.g. train.lr=2e-5 data.max_rows=200.",
                               show_default=False)
RESUME_OPT = typer.Option(False, "--resume", help="Continue the run in run.output_dir from its "
                          "latest checkpoint (optimizer, scheduler, RNG and data position).")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace an earlier run's results in "
                             "run.output_dir (without it, a folder holding a run is refused).")


def guarded(fn: Callable[[], Any], resume_cmd: list[str] | None = None) -> Any:
    """Run ``fn``; turn user errors into one-line messages and exit code 2.

    ``resume_cmd``: the command that resumes this run, shown when a SIGTERM stopped it."""
    try:
        return fn()
    except UserError as exc:
        _fail(exc.problems, EXIT_USER_ERROR)
    except Stopped as exc:
        how = shlex.join(resume_cmd) if resume_cmd else "the same command and --resume"
        _fail([f"{exc}; resume with: {how}"], EXIT_STOPPED, prefix="stopped")
    except Terminated as exc:
        _fail([f"terminated by a second {exc} before the next checkpoint; --resume continues "
               "from the last one"], EXIT_STOPPED)
    except KeyboardInterrupt:
        _fail(["interrupted"], 130)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:  # not a bug: say so in one line (earlier files are intact)
            _fail([f"no space left on the device ({exc.filename or 'while writing'}); free "
                   "some space and run again (checkpoints written so far are intact)"], 1)
        _reraise_or_fail()
    except Exception:
        _reraise_or_fail()


def _reraise_or_fail() -> None:
    if _rank() is None:
        raise  # noqa: PLE0704 - called inside an except block: re-raises the active exception
    _fail(None, 1)


def _rank() -> int | None:
    """This process's rank when it is part of a process group, else None (torch stays unloaded
    when no command imported it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available():
        return None
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else None


def _fail(problems: list[str] | None, code: int, prefix: str = "error") -> None:
    """Print ``problems`` (None: the current traceback) and exit with ``code``."""
    rank = _rank()
    if rank is None:
        if os.environ.get("RANK", "0") != "0":
            # Launched, but failing before the group formed (a bad recipe): every rank reads
            # the same recipe and fails the same way, so rank 0 alone reports it.
            raise typer.Exit(code)
        for p in problems or []:
            typer.echo(f"{prefix}: {p}", err=True)
        raise typer.Exit(code)
    from apactl.distributed import claim_error_report

    if claim_error_report():
        if problems is None:
            lines = traceback.format_exc().rstrip().splitlines()
            typer.echo("\n".join(f"[rank {rank}] {ln}" for ln in lines), err=True)
        for p in problems or []:
            typer.echo(f"[rank {rank}] {prefix}: {p}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _resume_cmd(kind: str, recipe: str, args: list[str] | None) -> list[str]:
    """``apactl KIND RECIPE ARGS --resume``: how to continue a run that was stopped."""
    return ["apactl", kind, recipe, *(args or []), "--resume"]


def _load(path: str, overrides: list[str] | None, kind: str | None, check_files: bool = True):
    from apactl.recipe import load_recipe

    return load_recipe(path, overrides or [], kind=kind, check_files=check_files)


def _load_to_read(path: str, overrides: list[str] | None):
    """A recipe for ``recipe validate|show``: the schema is checked, but inputs that earlier
    stages make (run folders, label files) may not exist yet, so they are warnings."""
    from apactl.recipe import builtin_problems, pending_inputs

    r = _load(path, overrides, None, check_files=False)
    problems = builtin_problems(r)
    if problems:
        raise RecipeError(problems)
    for line in pending_inputs(r):
        typer.echo(f"warning: {line}", err=True)
    return r


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"apactl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


def _train(kind: str, recipe: str, overrides: list[str], resume: bool, overwrite: bool,
           shown: list[str] | None = None) -> None:
    """One training command (sft, rm, dpo, align): load the recipe, run ``run_<kind>`` of
    ``apactl.workflows.<kind>`` with SIGTERM stopping it at a step boundary (a checkpoint, then
    exit 143 with the resume command: ``shown`` are the arguments it repeats)."""
    def go():
        r = _load(recipe, overrides, kind)
        from importlib import import_module

        from apactl.runtime import stop_on_sigterm

        run = getattr(import_module(f"apactl.workflows.{kind}"), f"run_{kind}")
        with stop_on_sigterm():
            run(r, resume=resume, overwrite=overwrite)

    guarded(go, _resume_cmd(kind, recipe, overrides if shown is None else shown))


@app.command()
def sft(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
        resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT) -> None:
    """Supervised fine-tuning (loss on response tokens only).

    Example: apactl sft recipes/sft/smollm2-135m.yaml train.lr=2e-5 data.max_rows=200
    """
    _train("sft", recipe, overrides, resume, overwrite)


@app.command()
def rm(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
       resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT) -> None:
    """Train a Bradley-Terry reward model on preference pairs.

    Example: apactl rm recipes/rm/smollm2-135m.yaml train.max_steps=50
    """
    _train("rm", recipe, overrides, resume, overwrite)


@app.command()
def dpo(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
        resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT) -> None:
    """Direct Preference Optimization of a policy on preference pairs (no reward model).

    Example: apactl dpo recipes/dpo/smollm2-135m-hh.yaml dpo.beta=0.1 train.max_steps=50
    """
    _train("dpo", recipe, overrides, resume, overwrite)


@app.command()
def align(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
          algo: str = typer.Option(None, "--algo", help="apa, ppo, awr, grpo or rloo "
                                   "(shorthand for the override algo.name=...)."),
          resume: bool = RESUME_OPT, overwrite: bool = OVERWRITE_OPT) -> None:
    """RL fine-tuning against a reward model or judge with APA, PPO, AWR, GRPO or RLOO.

    Example: apactl align recipes/align/smollm2-135m-apa.yaml --algo ppo train.iterations=20
    """
    extra = [f"algo.name={algo}"] if algo else []
    _train("align", recipe, [*extra, *(overrides or [])], resume, overwrite,
           shown=[*(["--algo", algo] if algo else []), *(overrides or [])])


JUDGE_OPT = typer.Option(None, "--judge", help="Keep only this judge of the recipe (repeatable); "
                         "a registered judge that needs no path is added if the recipe lacks it.",
                         show_default=False)


@app.command("eval")
def eval_cmd(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
             judge: list[str] = JUDGE_OPT) -> None:
    """Compare policies with a baseline: judge scores, win rates and KL.

    Every policy (and its checkpoints) against the baseline, with bootstrap intervals;
    writes report.md, report.json, samples.jsonl and plots.

    Example: apactl eval recipes/eval/smollm2-135m.yaml --judge sentiment data.eval_rows=64
    """
    def go():
        r = _load(recipe, overrides, "eval")
        if judge:
            r = r.with_judges(judge)
        from apactl.workflows.evaluate import run_eval

        run_eval(r)

    guarded(go)


@app.command()
def label(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Sample responses per prompt and let a judge pick chosen/rejected (preference data).

    Example: apactl label recipes/quickstart/1-label.yaml judge.name=sentiment label.samples=4
    """
    def go():
        r = _load(recipe, overrides, "label")
        from apactl.workflows.label import run_label

        run_label(r)

    guarded(go)


@app.command()
def quickstart(
    output: str = typer.Option(None, "--output", "-o", show_default=False,
                               help="Folder for every stage's outputs (default: "
                               "apactl-runs/quickstart; apactl-runs/quickstart-smoke "
                               "with --smoke)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model",
                              help="Base model: an alias, hub id, folder or .gguf file."),
    fresh: bool = typer.Option(False, "--fresh", help="Redo every stage, even finished ones."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny sizes: a seconds-long check of "
                               "the wiring (use with --model tiny-random)."),
) -> None:
    """The whole pipeline offline on a CPU: label -> SFT -> RM -> APA -> eval.

    Runs the shipped recipes/quickstart/*.yaml in order; a finished stage is reused when the
    same stage recipe made it, and redone otherwise.
    Example: apactl quickstart            (about 15 minutes on 2 CPU cores)
    """
    def go():
        from apactl.workflows.quickstart import run_quickstart

        # The smoke check has its own folder: its tiny stages are never the real run's.
        default = "apactl-runs/quickstart-smoke" if smoke else "apactl-runs/quickstart"
        run_quickstart(output or default, model=model, fresh=fresh, smoke=smoke)

    guarded(go)


GRID_OPT = typer.Option(None, "--grid", "-g", help="KEY=V1,V2,... (repeatable): one run per "
                        "combination of the values of every --grid.", show_default=False)
EMIT_OPT = typer.Option(None, "--emit", help="slurm: write <root>/sweep.sbatch (a job array); "
                        "commands: write <root>/commands.txt. Runs nothing.", show_default=False)


@app.command()
def sweep(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
          grid: list[str] = GRID_OPT,
          dry_run: bool = typer.Option(False, "--dry-run", help="Validate every run and print "
                                       "its folder and command; run nothing."),
          emit: str = EMIT_OPT) -> None:
    """Run a grid of an align, sft, rm or dpo recipe, one run after another.

    Each run in its own folder <run.output_dir>/<key>=<value>,...; finished runs are skipped,
    interrupted ones resumed, and <run.output_dir>/sweep.json records them all. Exit 1 if a
    run failed.

    Example: apactl sweep recipes/tiny/align.yaml --grid algo.name=apa,ppo,awr --grid run.seed=0,1
    """
    def go():
        from apactl.workflows.sweep import sweep_command

        return sweep_command(recipe, grid or [], overrides or [], dry_run=dry_run, emit=emit)

    if guarded(go):
        raise typer.Exit(1)


@app.command()
def push(run_folder: str = typer.Argument(..., help="An apactl run folder (or a model folder).",
                                          show_default=False),
         repo_id: str = typer.Option(..., "--repo-id", help="The Hub repo: NAME or OWNER/NAME.",
                                     show_default=False),
         private: bool = typer.Option(False, "--private", help="Create the repo private."),
         revision: str = typer.Option(None, "--revision", help="Branch to push to (created "
                                      "if missing; default: main).", show_default=False),
         dry_run: bool = typer.Option(False, "--dry-run", help="List the files and sizes that "
                                      "would be uploaded; upload nothing."),
         what: str = typer.Option("policy", "--what", help="policy or critic (align runs).")
         ) -> None:
    """Upload a run's final model folder (with its model card) to the Hugging Face Hub.

    What goes up: the model card, weights, tokenizer and recipe.yaml; never checkpoints or
    optimizer state.

    Example: apactl push apactl-runs/tiny-align --repo-id me/tiny-apa --dry-run
    """
    def go():
        from apactl.workflows.push import push as run_push

        run_push(run_folder, repo_id, private=private, revision=revision, dry_run=dry_run,
                 what=what, echo=typer.echo)

    guarded(go)


WORLD_SIZE_OPT = typer.Option(1, "--world-size", min=1, help="Check the batch arithmetic for "
                              "this many data-parallel processes and print the per-rank numbers.")


@recipe_app.command("validate")
def recipe_validate(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG,
                    world_size: int = WORLD_SIZE_OPT) -> None:
    """Check a recipe without loading any model; exit 2 listing every problem.

    Example: apactl recipe validate recipes/align/smollm2-135m-apa.yaml --world-size 4
    """
    def go():
        r = _load_to_read(recipe, overrides)
        derived = getattr(getattr(r, "train", None), "derived", None)
        numbers = {}
        if callable(derived):
            try:
                numbers = derived(world_size)
            except ValueError as exc:
                raise RecipeError([str(exc)]) from None
        typer.echo(f"ok: {recipe} is a valid {r.kind} recipe"
                   + (f" for {world_size} processes" if world_size > 1 else ""))
        for k, v in numbers.items():
            typer.echo(f"  {k}: {v}")

    guarded(go)


@recipe_app.command("show")
def recipe_show(recipe: str = RECIPE_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Print the fully resolved recipe (defaults filled in) as YAML.

    Example: apactl recipe show recipes/sft/smollm2-135m.yaml train.lr=1e-4
    """
    def go():
        from apactl.recipe import recipe_to_yaml

        typer.echo(recipe_to_yaml(_load_to_read(recipe, overrides)), nl=False)

    guarded(go)


@recipe_app.command("schema")
def recipe_schema_cmd(kind: str = typer.Argument(..., help="sft, rm, dpo, align, eval or "
                                                   "label.")) -> None:
    """Print the JSON Schema of a recipe kind (for editor completion).

    Example: apactl recipe schema align > align.schema.json
    """
    def go():
        from apactl.recipe import recipe_schema

        typer.echo(json.dumps(recipe_schema(kind), indent=2))

    guarded(go)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
