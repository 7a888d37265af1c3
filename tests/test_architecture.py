"""The structure the architecture promises (docs/architecture.md), checked on the source: no
import cycle inside apactl (lazy imports included, TYPE_CHECKING ones excluded), no private name
imported from another module, and no module over ~400 lines but data.py and the schema."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PKG = ROOT / "apactl"
LIMIT, EXEMPT = 420, {"apactl.data", "apactl.config"}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def runtime_tree(path: Path) -> ast.Module:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports do not run
        body = getattr(node, "body", None)
        if isinstance(body, list):
            node.body = [c for c in body if not (isinstance(c, ast.If)
                                                 and getattr(c.test, "id", "") == "TYPE_CHECKING")]
    return tree


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    out = set()
    for n in ast.walk(runtime_tree(path)):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("apactl"):
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods}
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("apactl")}
    return {m for m in out if m in mods}


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports(p, mods) - {m} for m, p in mods.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_no_private_name_crosses_a_module_boundary():
    bad = []
    for name, path in modules().items():
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("apactl"):
                bad += [f"{name}: from {n.module} import {a.name}" for a in n.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_modules_stay_small():
    big = {m: len(p.read_text().splitlines()) for m, p in modules().items()
           if m not in EXEMPT and len(p.read_text().splitlines()) > LIMIT}
    assert not big, big
