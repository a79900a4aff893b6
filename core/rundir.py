"""The run directory contract: one folder per stage under one root (docs/architecture.md).

A stage reads only the previous stage's folder and writes only its own; a per-shard
``_done`` record, written last and atomically, is what marks a shard complete, and the stage's
``_SUCCESS.json`` (written last of all, see :meth:`RunDir.finish_stage`) marks the stage complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from megaclass.core import lock as _lock
from megaclass.core.atomic import write_json_atomic, write_text_atomic
from megaclass.core.config import config_to_dict, dump_config
from megaclass.core.errors import UserError
from megaclass.core.stages import MARKED, SUCCESS, stage

log = logging.getLogger(__name__)

STAGES = MARKED  # the stages with a success marker, in pipeline order

# Config sections that say where/how a run executes, not what it computes.
_NOT_COMPARED = ("run_dir", "slurm", "ray")


# Files in stage folders that are no stage output: a killed writer's temporary, the embed
# stage's report of shards that all failed (a run that failed on its inputs made no progress).
_NOT_OUTPUT_PREFIXES = (".tmp-", "_FAILED")


class ConfigChangedError(UserError, RuntimeError):
    """The run directory was created with a different config; resuming needs --force."""


@dataclass
class RunDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- stage folders -----------------------------------------------------------------
    @property
    def embed(self) -> Path:
        return self.root / "embed"

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def labels(self) -> Path:
        return self.root / "labels"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def ckpt(self) -> Path:
        return self.root / "train" / "ckpt"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    # --- config ------------------------------------------------------------------------
    def write_config(
        self, cfg: Any, force: bool = False, ignore: Collection[str] = ()
    ) -> list[str]:
        """Write RUN/config.yaml; a different config on resume is refused unless forced.

        ``run_dir`` itself is not compared (the same run may be reached by another path), nor
        are the ``slurm`` and ``ray`` sections: where a run executes does not change its results.

        ``ignore``: dotted keys (``"train.nproc"``) the caller allows to change on resume. Where
        the stored file and ``cfg`` both hold such a key with different values, that is no
        config change: the file is rewritten with the new value and the difference returned
        (``"train.nproc: 2 -> 1"``, one per key) for the caller to report. Why here: the caller
        (the elastic resume of pipelines/config.py) needs exactly this comparison with a few
        keys left out, and a second copy of it would drift from this one. Returns ``[]``
        when nothing ignored differed (or ``force``).

        The file is provisional until a stage has produced output (:meth:`has_stage_output`):
        a first run that failed on its inputs (a wrong shard path, ``cluster.k`` above the
        sample) must not lock its config against the corrected retry, so a different config
        then replaces it, with a warning. Once any stage has written output, results would mix
        two configs: refused unless forced.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        new = config_to_dict(cfg)
        skipped: list[str] = []
        if self.config_path.exists() and not force:
            old = yaml.safe_load(self.config_path.read_text()) or {}
            skipped = _take_ignored(old, new, ignore)
            # keys added to the config since the run started take their defaults: a new option
            # that keeps the old behaviour must not stop an existing run from resuming
            if dataclasses.is_dataclass(cfg):
                old = _with_defaults(config_to_dict(type(cfg)()), old)
            diffs = _diff(
                {k: v for k, v in old.items() if k not in _NOT_COMPARED},
                {k: v for k, v in new.items() if k not in _NOT_COMPARED},
            )
            if diffs:
                shown = "; ".join(diffs[:10])
                output = self.has_stage_output()
                if output is not None:
                    raise ConfigChangedError(
                        f"{self.config_path} was written with a different config ({shown}), "
                        f"and the run has output made with it ({output}). Use a new run "
                        "directory, or pass --force to resume with the new config."
                    )
                log.warning(
                    "%s: replacing the config of an earlier attempt that produced no stage "
                    "output (%s)",
                    self.config_path,
                    shown,
                )
            elif not skipped:
                return []
        write_text_atomic(self.config_path, dump_config(cfg))
        return skipped

    def has_stage_output(self) -> Path | None:
        """The first file a stage wrote in its folders, or None while no stage has output.

        Not output: temporaries of a killed writer (``.tmp-*``) and ``_FAILED*`` reports.
        Folders that exist but hold nothing else do not count either.
        """
        seen: set[str] = set()
        for name in MARKED:
            for sub in stage(name).folders:
                if not sub or sub in seen:
                    continue
                seen.add(sub)
                found = _first_file(self.root / sub)
                if found is not None:
                    return found
        return None

    # --- lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, command: str | None = None) -> Iterator[_lock.RunLock | None]:
        """Hold this run directory for the block (``core/lock.py``): the exclusive lock for a
        command or rank 0, the shared rank lock for ranks launched by the holder, nothing for
        other ranks of an external launcher. Reentrant; raises RunDirLockedError naming the
        holder."""
        with _lock.for_process(self.root, command) as lk:
            yield lk

    # --- stage markers --------------------------------------------------------------------
    def folder(self, name: str) -> Path:
        """The first folder of stage ``name`` (the one holding its success marker)."""
        return self.root / stage(name).folders[0]

    def success_path(self, name: str) -> Path:
        """``<stage folder>/_SUCCESS.json``: present only once stage ``name`` is complete."""
        return self.folder(name) / SUCCESS

    def read_success(self, name: str) -> dict[str, Any] | None:
        """The summary stage ``name`` wrote when it completed; None while it is not complete."""
        p = self.success_path(name)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a torn marker counts as not complete

    def begin_stage(self, cfg: Any, name: str, force: bool = False) -> dict[str, Any] | None:
        """Open stage ``name``: guard config.yaml, then return its summary if it is already
        complete (and not forced); otherwise remove the marker (a re-run is incomplete until it
        ends), create the folder and return None."""
        self.write_config(cfg, force)
        done = self.read_success(name)
        if done is not None and not force:
            return done
        self.success_path(name).unlink(missing_ok=True)
        self.folder(name).mkdir(parents=True, exist_ok=True)
        return None

    def finish_stage(self, name: str, summary: dict[str, Any]) -> None:
        """Mark stage ``name`` complete: its summary goes to the marker, written atomically last."""
        write_json_atomic(self.success_path(name), summary)

    # --- per-shard done records ----------------------------------------------------------
    @staticmethod
    def done_path(stage_dir: Path, stem: str) -> Path:
        return stage_dir / "_done" / f"{stem}.json"

    @staticmethod
    def read_done(stage_dir: Path, stem: str) -> dict[str, Any] | None:
        p = RunDir.done_path(stage_dir, stem)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a torn record counts as not done

    @staticmethod
    def write_done(stage_dir: Path, stem: str, record: dict[str, Any]) -> None:
        write_json_atomic(RunDir.done_path(stage_dir, stem), record)


def _first_file(folder: Path) -> Path | None:
    """Depth-first: the first regular file under ``folder`` that is stage output."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return None
    dirs = []
    for e in entries:
        if e.name.startswith(_NOT_OUTPUT_PREFIXES):
            continue
        if e.is_file(follow_symlinks=False):
            return Path(e.path)
        if e.is_dir(follow_symlinks=False):
            dirs.append(e.path)
    for d in sorted(dirs):
        found = _first_file(Path(d))
        if found is not None:
            return found
    return None


def _take_ignored(old: dict[str, Any], new: dict[str, Any], ignore: Collection[str]) -> list[str]:
    """For :meth:`RunDir.write_config`'s ``ignore``: every dotted key that ``old`` and ``new``
    both hold with different values takes ``new``'s value in ``old`` (in place), so the
    comparison passes over it; returns those differences, ``"key: old -> new"``. A key the
    stored file lacks is left to the comparison (it takes its default there)."""
    skipped = []
    for key in ignore:
        *path, leaf = key.split(".")
        a: Any = old
        b: Any = new
        for part in path:
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if isinstance(a, dict) and isinstance(b, dict) and leaf in a and leaf in b:
            if a[leaf] != b[leaf]:
                skipped.append(f"{key}: {a[leaf]!r} -> {b[leaf]!r}")
                a[leaf] = b[leaf]
    return skipped


def _with_defaults(default: Any, old: Any) -> Any:
    """``old`` with the keys it lacks taken from ``default`` (nested sections too)."""
    if isinstance(default, dict) and isinstance(old, dict):
        return {**default, **{k: _with_defaults(default.get(k), v) for k, v in old.items()}}
    return old


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{key}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
            else:
                out.extend(_diff(a[k], b[k], key))
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]
