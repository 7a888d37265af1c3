"""Reading recipes: YAML -> OmegaConf (with ``key=value`` overrides) -> the pydantic schema.

Every problem becomes a ``RecipeError`` whose lines name the dotted key, all problems at once;
nothing here imports torch, so ``apactl recipe validate`` is instant. The schema itself lives in
``apactl.config``.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from apactl.config import RECIPES, AlignRecipe, EvalRecipe, RecipeBase
from apactl.errors import RecipeError
from apactl.sources import BUILTIN, looks_local, resolve_source
from apactl.trackers import missing_trackers

ALGO_NAMES = ("apa", "ppo", "awr", "grpo", "rloo")
# The recipes shipped with apactl: the repository's recipes/ in a source checkout, else the
# copies inside the package (an installed wheel ships the quickstart's only).
_REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHIPPED_RECIPES = (_REPO_RECIPES if _REPO_RECIPES.is_dir()
                   else Path(__file__).resolve().parent / "assets" / "recipes")
# Top-level keys of an `accelerate config` file; a recipe has none of them.
ACCELERATE_KEYS = ("compute_environment", "distributed_type")


def _known_keys(model: type[BaseModel] | None, loc: list[str]) -> list[str]:
    """The keys the schema accepts beside ``loc[-1]`` (for "did you mean" hints)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def _suggest(kind: str | None, loc: list[str]) -> str:
    keys = _known_keys(RECIPES.get(kind or ""), loc) if loc else []
    close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.6) if loc else []
    return f"; did you mean {'.'.join([*loc[:-1], close[0]])}?" if close else ""


def format_errors(err: ValidationError, kind: str | None = None) -> list[str]:
    """pydantic errors -> one ``dotted.key: problem`` line each."""
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Drop the discriminator tag pydantic inserts for the union member (algo.apa.lam).
        if len(loc) >= 2 and loc[0] == "algo" and loc[1] in ALGO_NAMES:
            loc = [loc[0]] + loc[2:]
        path = ".".join(loc) or "<recipe>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if loc and loc[0] == "algo":
                msg += " for this algorithm (keys of another algo.name?)"
            else:
                msg += _suggest(kind, loc)
        elif e["type"] == "union_tag_invalid":
            path += ".name"
            msg = f"unknown algorithm; expected one of: {', '.join(ALGO_NAMES)}"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, list)):
            msg += f", got {e['input']!r}"
        # A recipe-level check names its own keys ("run.strategy: ..."): no "<recipe>:" prefix.
        named = path == "<recipe>" and re.match(r"^[a-z_]+(\.[a-z_0-9]+)*: ", msg)
        problems.append(msg if named else f"{path}: {msg}")
    return problems


def _parse_yaml(p: Path):
    from omegaconf import OmegaConf

    try:
        return OmegaConf.load(p)
    except Exception as exc:  # noqa: BLE001 - yaml/omegaconf errors span several lines
        scalar = re.match(r"Invalid loaded object type: (\w+)", str(exc))
        if scalar:  # a file holding one value ("42", "hello")
            raise RecipeError([f"recipe: {p} must be a mapping of sections (kind:, run:, ...) "
                               f"at the top level, not a single value ({scalar.group(1)})"]) \
                from None
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        # YAML says "while constructing X / in file, line a / PROBLEM / in file, line b": the
        # problem and where it is are the last two lines.
        where = next((ln for ln in reversed(lines) if ln.startswith("in ")), "")
        problem = next((ln for ln in reversed(lines) if not ln.startswith("in ")), "")
        line = where.rsplit(", line ", 1)[-1].split(",")[0] if ", line " in where else "?"
        raise RecipeError([f"recipe: cannot parse {p} (line {line}): {problem}"]) from None


def _overrides(overrides: list[str] | tuple[str, ...]):
    from omegaconf import OmegaConf

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError([f"override {o!r}: expected key=value" for o in bad])
    problems, parsed = [], []
    for o in overrides:
        try:
            parsed.append(OmegaConf.from_dotlist([o]))
        except Exception as exc:  # noqa: BLE001 - e.g. 'data.source=[a' is not valid YAML
            problems.append(f"override {o!r}: not a valid value: {str(exc).splitlines()[0]}")
    if problems:
        raise RecipeError(problems)
    return parsed


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read YAML and merge dotted ``key=value`` overrides (OmegaConf syntax)."""
    from omegaconf import DictConfig, OmegaConf

    p = Path(path)
    if p.is_dir():
        raise RecipeError([f"recipe: {p} is a directory; expected a recipe file (.yaml)"])
    if not p.is_file():
        close = closest_recipe_file(p)
        raise RecipeError([f"recipe: file not found: {p}"
                           + (f"; did you mean {close}?" if close else "")])
    base = _parse_yaml(p)
    if isinstance(base, DictConfig) and not base:  # an empty file, only comments, or null
        raise RecipeError([f"recipe: {p} is empty; expected a mapping of sections (kind:, run:, "
                           "...)"])
    if isinstance(base, DictConfig) and len(base) == 1:
        key, value = next(iter(OmegaConf.to_container(base, resolve=False).items()))
        if value is None and not any(key in r.model_fields for r in RECIPES.values()):
            # OmegaConf reads a file holding one word as {word: None}
            raise RecipeError([f"recipe: {p} must be a mapping of sections (kind:, run:, ...) "
                               f"at the top level, not a single value ({key!r})"])
    if not isinstance(base, DictConfig):
        raise RecipeError([f"recipe: {p} must be a mapping of sections (kind:, run:, ...) at "
                           f"the top level, not a {type(base).__name__.removesuffix('Config')}"])
    if "kind" not in base and any(k in base for k in ACCELERATE_KEYS):
        # recipes/accelerate/ sits beside the recipes: say what the file is for, in one line.
        raise RecipeError([f"recipe: {p} is an accelerate launch config, not an apactl recipe: "
                           f"use it as accelerate launch --config_file {p} -m apactl ..."])
    try:
        merged = OmegaConf.merge(base, *_overrides(overrides))
        data = OmegaConf.to_container(merged, resolve=True)
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a list index into a mapping
        raise RecipeError([f"override: {str(exc).splitlines()[0]}"]) from None
    return data


def closest_recipe_file(missing: Path) -> str | None:
    """The existing .yaml/.yml file whose path is closest to ``missing`` (a typo'd recipe
    path), looked for below the deepest folder of ``missing`` that exists."""
    base = missing.parent
    while not base.is_dir() and base != base.parent:
        base = base.parent
    if base == base.parent:  # nothing of the path exists: no folder worth searching
        return None
    depth = min(len(missing.parts) - len(base.parts) if base != Path(".") else
                len(missing.parts), 3)
    found = [str(f) for d in range(1, max(depth, 1) + 1)
             for pattern in ("*.yaml", "*.yml")
             for f in base.glob("/".join(["*"] * (d - 1) + [pattern])) if f.is_file()]
    close = difflib.get_close_matches(str(missing), found, n=1, cutoff=0.6)
    return close[0] if close else None


def parse_recipe(data: dict[str, Any], kind: str | None = None,
                 check_files: bool = True) -> RecipeBase:
    """Validate a raw mapping; ``kind`` (the command) must agree with the recipe's ``kind``."""
    rkind = data.get("kind", kind)
    if rkind is None:
        raise RecipeError([f"kind: missing; expected one of: {', '.join(RECIPES)}"])
    if rkind not in RECIPES:
        raise RecipeError([f"kind: unknown recipe kind {rkind!r}; expected one of: "
                           f"{', '.join(RECIPES)}"])
    if kind is not None and rkind != kind:
        raise RecipeError([f"kind: this is a {rkind!r} recipe, but the command runs {kind!r}"])
    try:
        recipe = RECIPES[rkind].model_validate({**data, "kind": rkind})
    except ValidationError as err:
        raise RecipeError(format_errors(err, rkind)) from None
    problems = missing_files(recipe) + missing_trackers(recipe.logging.trackers) \
        if check_files else []
    if problems:
        raise RecipeError(problems)
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), kind: str | None = None,
    check_files: bool = True,
) -> RecipeBase:
    """YAML + overrides -> a validated recipe; ``check_files=False`` skips missing-file checks
    (for pipelines whose later stages read files the earlier stages write)."""
    return parse_recipe(load_raw(path, overrides), kind, check_files)


def missing_inputs(recipe: RecipeBase) -> list[tuple[str, str]]:
    """(dotted key, path) of every local input of the recipe that does not exist (yet)."""
    return [(dotted, value) for dotted, value in path_fields(recipe)
            if value and not value.startswith(BUILTIN) and looks_local(value)
            and not Path(value).expanduser().exists()]


def missing_files(recipe: RecipeBase) -> list[str]:
    """``key: file not found: path`` for every local input of the recipe that does not exist
    (naming the shipped recipe that makes it), and every unknown ``builtin:`` dataset."""
    problems = builtin_problems(recipe)
    for dotted, value in missing_inputs(recipe):
        maker = producer_command(value)
        problems.append(f"{dotted}: file not found: {value}"
                        + (f" (made by: {maker})" if maker else ""))
    return problems


def builtin_problems(recipe: RecipeBase) -> list[str]:
    """One line per ``builtin:`` source that names no shipped dataset."""
    problems = []
    for _, value in path_fields(recipe):
        if value and value.startswith(BUILTIN):
            try:
                resolve_source(value)
            except RecipeError as exc:
                problems += exc.problems
    return problems


def pending_inputs(recipe: RecipeBase) -> list[str]:
    """``key: not found yet: path (made by: command)`` per missing local input: what
    ``recipe validate|show`` warn about, since an earlier stage may not have run yet; and
    each tracker of logging.report_to that is not installed here."""
    lines = missing_trackers(recipe.logging.trackers)
    for dotted, value in missing_inputs(recipe):
        maker = producer_command(value)
        lines.append(f"{dotted}: not found yet: {value} (made by: {maker})" if maker
                     else f"{dotted}: not found: {value}")
    return lines


def producer_command(missing: str, root: Path = SHIPPED_RECIPES) -> str | None:
    """The command of the recipe under ``root`` whose ``run.output_dir`` is ``missing`` or a
    folder above it (``apactl rm recipes/rm/x.yaml``), or None. The deepest such folder wins.

    Plain YAML reads, no schema and no torch: it runs on every missing input of a recipe.
    """
    import yaml

    target = _abs(missing)
    best: tuple[int, str] | None = None
    for path in _yaml_files(root):
        try:
            data = yaml.safe_load(path.read_text())
            out, kind = data["run"]["output_dir"], data["kind"]
        except Exception:  # noqa: BLE001 - launcher configs, partial recipes: not producers
            continue
        out_dir = _abs(str(out))
        if (target == out_dir or out_dir in target.parents) and (
                best is None or len(out_dir.parts) > best[0]):
            best = (len(out_dir.parts), f"apactl {kind} {_shown(path)}")
    return best[1] if best else None


def _yaml_files(root: Path) -> list[Path]:
    # os.walk, not rglob: recipes/quickstart is a symlink into the package, and rglob skips
    # symlinked folders.
    return sorted(Path(d) / f for d, _, files in os.walk(root, followlinks=True)
                  for f in files if f.endswith(".yaml"))


def _abs(path: str) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (as a user types it)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def path_fields(recipe: RecipeBase) -> list[tuple[str, str | None]]:
    """(dotted key, value) of every input path a recipe names."""
    out: list[tuple[str, str | None]] = []
    data = getattr(recipe, "data", None)
    if data is not None:
        out.append(("data.source", data.source))
    judge = getattr(recipe, "judge", None)
    if judge is not None and judge.path:
        out.append(("judge.path", judge.path))
    for section in ("model", "policy"):
        m = getattr(recipe, section, None)
        if m is not None:
            out.append((f"{section}.name_or_path", m.name_or_path))
    reference = getattr(recipe, "reference", None)
    if reference is not None and reference.path:
        out.append(("reference.path", reference.path))
    if isinstance(recipe, AlignRecipe):
        if recipe.reward.path:
            out.append(("reward.path", recipe.reward.path))
        if recipe.critic.init not in ("reward", "policy"):
            out.append(("critic.init", recipe.critic.init))
    if isinstance(recipe, EvalRecipe):
        # Eval policies are usually run folders that other commands create first (apactl align),
        # so a shipped eval recipe must validate before they exist: `apactl eval` checks
        # policies.N.path when it runs. The baseline and judge paths are checked here.
        if recipe.baseline is not None:
            out.append(("baseline.path", recipe.baseline.path))
        out += [(f"judges.{i}.path", j.path) for i, j in enumerate(recipe.judges)]
    return out


def recipe_to_yaml(recipe: RecipeBase) -> str:
    """The resolved recipe as YAML, without the sections this run does not use (a critic-free
    align run's ``critic`` and ``gae``), so that the file validates and reruns as it is."""
    import yaml

    data = recipe.model_dump(mode="json")
    for section in recipe.unused_sections:
        data.pop(section, None)
    return yaml.safe_dump(data, sort_keys=False)


def recipe_schema(kind: str) -> dict[str, Any]:
    if kind not in RECIPES:
        raise RecipeError([f"kind: unknown recipe kind {kind!r}; expected one of: "
                           f"{', '.join(RECIPES)}"])
    return RECIPES[kind].model_json_schema()
