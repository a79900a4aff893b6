"""The package floors hold: no upward import, no import cycle between the project's modules.

Floors, lowest first (docs/architecture.md, "Package floors"): core → data → clustering →
training → pipelines. A module may import its own package and any lower floor, never a higher
one; imports inside functions count too (a lazy upward import is still an upward import). The
graph is read from the source with ``ast``, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "megaclass"
FLOORS = {"core": 0, "data": 1, "clustering": 2, "training": 3, "pipelines": 4}


def _modules() -> dict[str, Path]:
    mods = {PKG: ROOT / "__init__.py"}
    for floor in FLOORS:
        for f in sorted((ROOT / floor).glob("*.py")):
            name = f"{PKG}.{floor}" if f.stem == "__init__" else f"{PKG}.{floor}.{f.stem}"
            mods[name] = f
    return mods


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from pkg import submodule`` -> the submodule)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PKG:
                continue
            while name not in mods and "." in name:  # `from m import func` -> m
                name = name.rsplit(".", 1)[0]
            if name in mods:
                out.add(name)
    return out


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1]] if len(parts) > 1 else -1


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, mods) - {m} for m, p in mods.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
        for m, deps in g.items()
        for d in deps
        if _floor(d) > _floor(m)
    )


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_floor():
    dirs = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert dirs <= set(FLOORS), f"packages without a floor: {sorted(dirs - set(FLOORS))}"
    assert len(_modules()) > 40  # the walk found the project


def test_no_upward_imports():
    assert upward_imports(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    "edges, upward, cyclic",
    [
        ({"megaclass.data.a": {"megaclass.pipelines.b"}}, 1, 0),
        (
            {"megaclass.data.a": {"megaclass.data.b"}, "megaclass.data.b": {"megaclass.data.a"}},
            0,
            1,
        ),
        ({"megaclass.pipelines.a": {"megaclass.core.b"}, "megaclass.core.b": set()}, 0, 0),
    ],
)
def test_the_checks_catch_what_they_claim(edges, upward, cyclic):
    """The checkers themselves, on small graphs with a known defect."""
    assert len(upward_imports(edges)) == upward
    assert len(cycles(edges)) == cyclic


def test_import_reader_resolves_submodules_and_lazy_imports(tmp_path):
    mods = {"megaclass.training.x": Path("x"), "megaclass.pipelines.config": Path("c")}
    src = tmp_path / "m.py"
    src.write_text(
        "from megaclass.training import x\n"
        "def f():\n    from megaclass.pipelines.config import RunConfig\n"
    )
    assert _imports(src, mods) == {"megaclass.training.x", "megaclass.pipelines.config"}
