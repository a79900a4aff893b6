"""``megaclass run CONFIG``: embed → cluster → assign → train → eval → report, resumable.

Why this is thin: every stage already resumes its own partial work (per-shard ``_done``
records, per-iteration k-means state, training checkpoints) and writes
``<stage folder>/_SUCCESS.json`` last. So the orchestrator only has to decide, per stage,
whether to skip it (complete, or replaced by bring-your-own inputs) or to call it, in order.
A run killed at any moment and started again therefore ends with the same files.

Bring your own inputs:
- ``embed.embeddings_dir``: embeddings in LAION's layout → embed is skipped; cluster and assign
  read that folder.
- ``cluster.centroids``: a k×d ``.npy`` → no k-means; the cluster stage imports the file into
  ``RUN/cluster`` (centroids.npy + sha256, stats, _SUCCESS.json).
- ``assign.labels_dir``: label sidecars → embed, cluster and assign are all skipped (training
  needs only shards + labels); the trainer reads the labels from there.

Before a stage runs, the ``.tmp-*`` files that a killed writer left in that stage's folders
are deleted (every output is written to such a temporary name and renamed, so they are never
read; the deletion just keeps the run directory clean). Torn multi-file outputs (a shard
without its ``_done`` record, a checkpoint folder without its marker) are the stages' own
business: they redo or ignore them.

The run holds the run directory's lock (core/lock.py) from start to end, so a second
``megaclass`` on the same run directory is refused instead of deleting this one's temporaries
and checkpoints; the stages it calls in-process take the same lock reentrantly.

Training with ``train.nproc > 1`` is launched by the train stage itself as a subprocess
(``train.launcher``: torchrun or the deepspeed launcher); a local Ray instance started by
the Ray stages is shut down first so that the ranks get the CPUs.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaclass.core.rundir import RunDir
from megaclass.core.stages import PIPELINE, STAGES, load_entry
from megaclass.data.labels import label_path
from megaclass.data.shards import expand_shards, shard_stem
from megaclass.pipelines.config import (
    ConfigError,
    RunConfig,
    labels_dir_of,
    load_config,
    write_run_config,
)

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """What :func:`run_pipeline` will do with one stage, and why."""

    stage: str
    action: str  # "run" | "skip"
    reason: str


def success_path(cfg: RunConfig, stage: str) -> Path | None:
    """The file whose presence marks ``stage`` complete (None for the report: always rebuilt)."""
    return RunDir(cfg.run_dir).success_path(stage) if STAGES[stage].marked else None


def plan(cfg: RunConfig, stages: tuple[str, ...] | list[str] = PIPELINE) -> list[StagePlan]:
    """Decide for each requested stage whether it runs or is skipped (and why), in order."""
    unknown = [s for s in stages if s not in PIPELINE]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown} (valid: {', '.join(PIPELINE)})")
    out: list[StagePlan] = []
    for stage in PIPELINE:
        if stage not in stages:
            continue
        done = success_path(cfg, stage)
        if stage in ("embed", "cluster", "assign") and cfg.assign.labels_dir:
            out.append(StagePlan(stage, "skip", f"assign.labels_dir={cfg.assign.labels_dir}"))
        elif stage == "embed" and cfg.embed.embeddings_dir:
            out.append(StagePlan(stage, "skip", f"embed.embeddings_dir={cfg.embed.embeddings_dir}"))
        elif done is not None and done.is_file():
            out.append(StagePlan(stage, "skip", f"complete ({done})"))
        elif stage == "cluster" and cfg.cluster.centroids:
            out.append(StagePlan(stage, "run", f"import cluster.centroids={cfg.cluster.centroids}"))
        else:
            out.append(
                StagePlan(
                    stage, "run", "report is always rebuilt" if done is None else "not complete"
                )
            )
    return out


def remove_stale_temporaries(run_dir: str | Path, stage: str) -> list[Path]:
    """Delete the ``.tmp-*`` files a killed writer of ``stage`` left in its run-dir folders."""
    removed = []
    for sub in STAGES[stage].folders:
        folder = Path(run_dir) / sub
        if not folder.is_dir():
            continue
        for p in folder.glob(".tmp-*") if sub == "" else folder.rglob(".tmp-*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        log.info("run: %-7s removed %d stale temporary file(s)", stage, len(removed))
    return removed


def check_labels_for_training(cfg: RunConfig) -> None:
    """Refuse to train when no training shard has a label sidecar (all samples would be skipped).

    The trainer joins labels to a shard through ``<labels dir>/<shard stem>.parquet``. Labels
    assigned on bring-your-own embeddings are named after the embedding files (LAION's
    published parts: ``metadata_<i>``), which are not the training shards.
    """
    if cfg.train.objective == "siglip":  # trains on the captions, no labels
        return

    labels_dir = labels_dir_of(cfg)
    shards = expand_shards(cfg.data.shards)
    if any(label_path(labels_dir, shard_stem(u)).exists() for u in shards):
        return  # the loader warns about (and counts) shards without a sidecar
    present = sorted(p.stem for p in labels_dir.glob("*.parquet") if not p.name.startswith("."))
    raise ConfigError(
        f"none of the {len(shards)} training shards (data.shards, e.g. "
        f"{shard_stem(shards[0])!r}) has a label sidecar <shard stem>.parquet in {labels_dir} "
        f"(it holds {len(present)}: {', '.join(present[:3]) or 'none'}{', …' if len(present) > 3 else ''}). "
        "Labels are joined to a training shard by its name: embeddings (and so labels) must be "
        "per training shard, e.g. from the embed stage run on data.shards; labels assigned on "
        "embedding files named otherwise (LAION's metadata_<i>) need regrouping per shard first."
    )


def _entry(stage: str) -> Any:
    return load_entry(STAGES[stage].entry)


def _shutdown_local_ray() -> None:
    """Free the CPUs of a Ray instance the Ray stages started in this process."""
    if "ray" not in sys.modules:
        return
    import ray

    if ray.is_initialized():
        log.info("run: shutting down Ray before training")
        ray.shutdown()


def _pin_local_ray(cfg: RunConfig) -> None:
    """With ``ray.address`` unset, make the stages start their own Ray instance.

    ``ray.init()`` without an address silently joins the latest cluster that ``ray start`` left
    on this machine (/tmp/ray/ray_current_cluster) — someone else's, and then fails on
    ``num_cpus``. RAY_ADDRESS=local forces a fresh local instance; an address the user (or
    the Slurm script) exported is kept.
    """
    if cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = "local"


def run_pipeline(
    cfg: RunConfig, force: bool = False, stages: tuple[str, ...] | list[str] = PIPELINE
) -> dict[str, Any]:
    """Run the requested stages in order, skipping complete or bring-your-own ones.

    Returns ``{"stages": {stage: {"action", "reason", "seconds", "summary"}}, "interrupted": bool}``.
    A training run stopped by SIGUSR1/SIGTERM (checkpointed, no _SUCCESS.json) ends the
    pipeline early with ``interrupted`` True; run it again to resume.
    """
    rd = RunDir(cfg.run_dir)
    with rd.lock():  # reentrant: `megaclass run` holds it already; the stages run in-process
        return _run_locked(cfg, rd, force, stages)


def _run_locked(
    cfg: RunConfig, rd: RunDir, force: bool, stages: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    write_run_config(rd, cfg, force)
    _pin_local_ray(cfg)
    result: dict[str, Any] = {"run_dir": str(cfg.run_dir), "stages": {}, "interrupted": False}
    t_all = time.time()
    for p in plan(cfg, stages):
        rec: dict[str, Any] = {"action": p.action, "reason": p.reason}
        result["stages"][p.stage] = rec
        if p.action == "skip":
            log.info("run: %-7s skipped: %s", p.stage, p.reason)
            continue
        log.info("run: %-7s starting (%s)", p.stage, p.reason)
        t0 = time.time()
        remove_stale_temporaries(cfg.run_dir, p.stage)
        if p.stage == "train":
            check_labels_for_training(cfg)
            _shutdown_local_ray()
        if p.stage == "report":
            summary = _entry("report")(cfg.run_dir)
        else:
            summary = _entry(p.stage)(cfg, force=force)
        rec["seconds"] = round(time.time() - t0, 3)
        rec["summary"] = summary
        log.info("run: %-7s finished in %.1f s", p.stage, rec["seconds"])
        if p.stage == "train" and isinstance(summary, dict) and summary.get("interrupted"):
            log.warning("run: training was interrupted after a checkpoint; run again to resume")
            result["interrupted"] = True
            break
        done = success_path(cfg, p.stage)
        if done is not None and not done.is_file():
            raise RuntimeError(f"stage {p.stage} returned without writing {done}")
    result["seconds"] = round(time.time() - t_all, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m megaclass.pipelines.run CONFIG [k=v …] [--stages a,b] [--force]`` (used by slurm/)."""
    ap = argparse.ArgumentParser(prog="python -m megaclass.pipelines.run")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--stages", default=",".join(PIPELINE), help="comma-separated subset, in order")
    ap.add_argument("--force", action="store_true", help="resume even if the config changed")
    ap.add_argument("--debug", action="store_true", help="tracebacks of user errors too")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from megaclass.pipelines.cli import run_guarded

    def go() -> int:
        cfg = load_config(args.config, args.overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        given = sys.argv[1:] if argv is None else argv
        command = shlex.join(["python", "-m", "megaclass.pipelines.run", *given])
        with RunDir(cfg.run_dir).lock(command):  # run_pipeline re-enters it
            run_pipeline(cfg, force=args.force, stages=stages)
        return 0  # an interrupted (checkpointed) training also exits 0, like the trainer

    return run_guarded(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
