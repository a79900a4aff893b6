"""The stage registry: every fact about a stage in one table.

Why one table: the CLI, the orchestrator (``megaclass run``), the run directory, the report and
the Slurm renderer all need to know a stage's entry point, the folders it writes and the file
that marks it complete. Each used to keep its own copy of these facts; now they read them here
(docs/architecture.md, "Stages").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUCCESS = "_SUCCESS.json"
"""Name of the marker a stage writes last, in its first folder, when it is complete."""


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str
    """Stage name as the CLI and `--stages` spell it."""
    entry: str
    """``module:function`` taking ``(cfg, force=...)``; imported only when the stage runs."""
    folders: tuple[str, ...]
    """Run-directory folders the stage writes ("" = the run root, not recursed); the first holds
    the success marker."""
    marked: bool = True
    """Whether the stage writes ``<first folder>/_SUCCESS.json`` (the report is always rebuilt)."""
    slurm: str | None = None
    """How `megaclass slurm` runs it: 'ray' (a Ray cluster over the job's nodes), 'train'
    (one rank per task), or None (not a Slurm stage on its own)."""
    help: str = ""
    """One line for `megaclass --help`."""


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "embed",
            "megaclass.pipelines.embed:run_embed",
            ("embed",),
            slurm="ray",
            help="teacher features for every sample (Ray Data)",
        ),
        Stage(
            "cluster",
            "megaclass.pipelines.cluster:run_cluster",
            ("cluster",),
            slurm="ray",
            help="spherical k-means into pseudo-classes",
        ),
        Stage(
            "assign",
            "megaclass.pipelines.assign:run_assign",
            ("labels",),
            slurm="ray",
            help="top-k pseudo-labels for every sample (Ray Data)",
        ),
        Stage(
            "regroup",
            "megaclass.pipelines.regroup:run_regroup",
            ("shard_labels",),
            help="label sidecars per training shard, by key (labels assigned on other files)",
        ),
        Stage(
            "train",
            "megaclass.pipelines.train:run_train",
            ("train", "export"),
            slurm="train",
            help="train the student (DeepSpeed); `train reshard RUN --world-size N` too",
        ),
        Stage(
            "eval",
            "megaclass.pipelines.eval:run_eval",
            ("eval",),
            help="retrieval on held-out classes",
        ),
        Stage(
            "report",
            "megaclass.pipelines.report:build_report",
            ("plots", ""),
            marked=False,
        ),
    )
}
"""The stages in pipeline order."""

PIPELINE: tuple[str, ...] = tuple(STAGES)
"""Stage names in the order `megaclass run` runs them."""

MARKED: tuple[str, ...] = tuple(n for n, s in STAGES.items() if s.marked)
"""Stages that end by writing a success marker."""


def stage(name: str) -> Stage:
    """The registry entry of ``name``; KeyError names the valid stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r} (valid: {', '.join(PIPELINE)})") from None


def load_entry(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (a stage entry) only when it is called: a stage's heavy
    dependencies (Ray, DeepSpeed) load only when that stage runs."""
    mod_name, fn_name = spec.split(":")
    return getattr(importlib.import_module(mod_name), fn_name)
