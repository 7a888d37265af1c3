"""Reading recipes: YAML -> OmegaConf (with ``key=value`` overrides) -> the pydantic schema.

Every problem becomes a ``RecipeError`` whose lines name the dotted key, all problems at once;
nothing here imports torch, so ``apactl recipe validate`` is instant. The schema itself lives in
``apactl.config``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from apactl.config import RECIPES, AlignRecipe, EvalRecipe, RecipeBase
from apactl.errors import RecipeError
from apactl.sources import BUILTIN, looks_local, resolve_source

ALGO_NAMES = ("apa", "ppo", "awr")


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
    if not p.is_file():
        raise RecipeError([f"recipe: file not found: {p}"])
    base = _parse_yaml(p)
    if not isinstance(base, DictConfig):
        raise RecipeError([f"recipe: {p} must be a mapping of sections (kind:, run:, ...) at "
                           f"the top level, not a {type(base).__name__.removesuffix('Config')}"])
    try:
        merged = OmegaConf.merge(base, *_overrides(overrides))
        data = OmegaConf.to_container(merged, resolve=True)
    except RecipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a list index into a mapping
        raise RecipeError([f"override: {str(exc).splitlines()[0]}"]) from None
    return data


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
    problems = missing_files(recipe) if check_files else []
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


def missing_files(recipe: RecipeBase) -> list[str]:
    """``key: file not found: path`` for every local input of the recipe that does not exist."""
    problems = []
    for dotted, value in path_fields(recipe):
        if value and value.startswith(BUILTIN):
            try:
                resolve_source(value)
            except RecipeError as exc:
                problems += exc.problems
        elif value and looks_local(value) and not Path(value).expanduser().exists():
            problems.append(f"{dotted}: file not found: {value}")
    return problems


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
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_schema(kind: str) -> dict[str, Any]:
    if kind not in RECIPES:
        raise RecipeError([f"kind: unknown recipe kind {kind!r}; expected one of: "
                           f"{', '.join(RECIPES)}"])
    return RECIPES[kind].model_json_schema()
