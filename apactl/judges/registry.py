"""The judge registry: names -> factories, and the one way to build a judge from its spec.

``@register_judge("name", "what it measures")`` on a factory makes ``name`` usable wherever a
judge is named (``reward.name`` in align, ``judges[].name`` in eval, ``judge.name`` in label).
A judge may also be named by import path, ``package.module:factory``, without registering.

A factory takes its ``args`` as keyword arguments plus, only if its signature names them, the
context ``path``, ``device``, ``dtype``, ``batch_size`` and ``normalize``; ``args`` a factory
does not take are a recipe error. No torch import here: validation must be instant.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from apactl.errors import ModelError, UserError

if TYPE_CHECKING:
    from apactl.config import JudgeSpec

Messages = list[dict[str, str]]
CONTEXT = ("path", "device", "dtype", "batch_size", "normalize")


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """One float per (prompt, response); higher is better."""


@dataclass
class JudgeInfo:
    factory: Callable[..., Judge]
    description: str
    needs_path: bool = False


JUDGES: dict[str, JudgeInfo] = {}


def register_judge(name: str, description: str, needs_path: bool = False):
    def deco(factory: Callable[..., Judge]) -> Callable[..., Judge]:
        JUDGES[name] = JudgeInfo(factory, description, needs_path)
        return factory

    return deco


def available() -> str:
    return ", ".join(sorted(JUDGES))


def _import_path(name: str) -> Callable[..., Judge]:
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"judge {name!r}: cannot import: {exc}") from None
    if not callable(factory):
        raise ValueError(f"judge {name!r}: {attr} is not callable")
    return factory


def _check_import_path(name: str) -> None:
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"judge {name!r}: an import path is 'package.module:factory'")
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ValueError(f"judge {name!r}: module {module!r} not found")


def _takes(factory: Callable) -> tuple[set[str], bool]:
    """(keyword parameter names, accepts **kwargs)."""
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_args(name: str, factory: Callable, args: dict[str, Any]) -> None:
    names, var_kw = _takes(factory)
    unknown = sorted(set(args) - (names - set(CONTEXT)))
    if unknown and not var_kw:
        takes = sorted(names - set(CONTEXT))
        raise ValueError(f"judge {name!r}: unknown args {', '.join(unknown)}; it takes: "
                         f"{', '.join(takes) or 'no args'}")


def check_judge(name: str, path: str | None, args: dict[str, Any] | None = None) -> None:
    """Raise ValueError (shown as a recipe problem) for an unknown judge, a missing path or
    args the judge does not take."""
    if ":" in name:
        _check_import_path(name)
        return
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; available judges: {available()} "
                         "(or an import path 'package.module:factory')")
    info = JUDGES[name]
    if info.needs_path and not path:
        raise ValueError(f"judge {name!r} needs a path (a reward-model folder)")
    _check_args(name, info.factory, args or {})


def build_judge(spec: JudgeSpec, device: Any = "cpu", dtype: Any = None,
                field: str = "judge") -> Judge:
    """The judge a ``JudgeSpec`` describes, loaded (a reward model is read from disk).

    ``field``: where the recipe names the judge (``reward``, ``judges.0``, ...); a model that
    cannot be used is reported as ``<field>.path: ...``."""
    try:
        check_judge(spec.name, spec.path, spec.args)
        factory = _import_path(spec.name) if ":" in spec.name else JUDGES[spec.name].factory
        _check_args(spec.name, factory, spec.args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    context = {"path": spec.path, "device": device, "dtype": dtype,
               "batch_size": spec.batch_size, "normalize": spec.normalize}
    names, _ = _takes(factory)
    try:
        return factory(**spec.args, **{k: v for k, v in context.items() if k in names})
    except ModelError as exc:  # e.g. a causal LM named as a reward model
        raise ModelError(f"{field}{'.path' if spec.path else ''}: {exc}") from None
    except (TypeError, ValueError) as exc:  # args of the wrong type or value, e.g. chars: 5
        raise UserError(f"judge {spec.name!r}: args {spec.args}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
