"""Packaging: faiss-cpu and faiss-gpu-cu12 both install the module ``faiss``, so no extra may
pull both; ``demo`` and ``dev`` (the README's install commands) get faiss-cpu; and a missing
faiss stops megaclass with one message naming both install commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]


def _closure(requirements: list[str], seen: frozenset[str] = frozenset()) -> set[str]:
    """Names of the distributions ``requirements`` install, following megaclass[...] into the
    project's own extras (as pip does)."""
    names: set[str] = set()
    for text in requirements:
        req = Requirement(text)
        if req.name.lower() != PROJECT["name"]:
            names.add(req.name.lower())
            continue
        for extra in sorted(req.extras - seen):
            assert extra in EXTRAS, f"{text!r} names an extra the project does not define"
            names |= _closure(EXTRAS[extra], seen | {extra})
    return names


def _faiss(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("faiss")}


def test_base_dependencies_install_no_faiss():
    assert _faiss(_closure(PROJECT["dependencies"])) == set()


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_no_extra_installs_two_faiss_builds(extra):
    got = _faiss(_closure(PROJECT["dependencies"] + [f"megaclass[{extra}]"]))
    assert len(got) <= 1, f"megaclass[{extra}] installs {sorted(got)}: they overwrite each other"


def test_the_faiss_extras_and_what_includes_them():
    assert _faiss(_closure(EXTRAS["cpu"])) == {"faiss-cpu"}
    assert _faiss(_closure(EXTRAS["gpu"])) == {"faiss-gpu-cu12"}
    # the README's `pip install -e ".[demo]"` / `".[dev]"` keep installing faiss-cpu
    for extra in ("demo", "dev"):
        assert "megaclass[cpu]" in _closure_texts(extra), extra
        assert _faiss(_closure(EXTRAS[extra])) == {"faiss-cpu"}
    with_cpu = {e for e in EXTRAS if "faiss-cpu" in _closure(EXTRAS[e])}
    assert with_cpu == {"cpu", "demo", "dev"}


def _closure_texts(extra: str) -> set[str]:
    """The megaclass[...] requirements of ``extra``, each split into one per named extra."""
    out = set()
    for text in EXTRAS[extra]:
        req = Requirement(text)
        if req.name == PROJECT["name"]:
            out |= {f"megaclass[{e}]" for e in req.extras}
    return out


def test_missing_faiss_names_both_install_commands(monkeypatch):
    from megaclass.clustering.faiss_import import import_faiss
    from megaclass.clustering.search import build_tree

    assert import_faiss().__name__ == "faiss"
    monkeypatch.setitem(sys.modules, "faiss", None)  # how Python reports an absent module
    for call in (import_faiss, lambda: build_tree(np.eye(4, dtype=np.float32))):
        with pytest.raises(ImportError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith("megaclass needs faiss")
        for command in ('pip install "megaclass[cpu]"', 'pip install "megaclass[gpu]"'):
            assert command in msg
        assert isinstance(e.value.__cause__, ImportError)
        named = {a or b for a, b in re.findall(r'megaclass\[(\w+)\]|"\.\[(\w+)\]"', msg)}
        assert named == {"cpu", "gpu"} and named <= set(EXTRAS)


def test_the_package_imports_faiss_only_through_the_helper():
    bare = re.compile(r"^\s*(import faiss|from faiss\b)", re.M)
    offenders = [
        str(p.relative_to(REPO))
        for folder in ("core", "data", "clustering", "training", "pipelines")
        for p in sorted((REPO / folder).rglob("*.py"))
        if p.name != "faiss_import.py" and bare.search(p.read_text())
    ]
    assert offenders == []
