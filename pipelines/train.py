"""The train stage: ``megaclass train CONFIG [key=value …]`` and ``megaclass train reshard``.

Launch any of these ways (one code path; the process group comes from the environment):

    megaclass train cfg.yaml            # one process; with train.nproc=N it starts N ranks
                                        # itself (train.launcher: torchrun, the default, or
                                        # the deepspeed launcher)
    deepspeed --num_gpus 8 --module megaclass.pipelines.train cfg.yaml
    torchrun --nproc_per_node 8 -m megaclass.pipelines.train cfg.yaml
    srun --ntasks-per-node 8 python -m megaclass.pipelines.train cfg.yaml

Each rank runs :func:`run_train`; rank 0 exports the encoder and writes RUN/train/_SUCCESS.json.
A signal (SIGUSR1/SIGTERM) makes every rank checkpoint and return normally (exit status 0),
without _SUCCESS.json, so the next start resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.core.errors import InputError
from megaclass.core.lock import TOKEN_ENV, RunDirLockedError
from megaclass.core.net import free_port
from megaclass.core.rundir import RunDir
from megaclass.data.labels import file_sha256
from megaclass.pipelines.config import (
    RunConfig,
    dump_config,
    labels_dir_of,
    load_config,
    write_run_config,
)
from megaclass.pipelines.export import hub_dataset_ids
from megaclass.training import checkpoint as ckpt
from megaclass.training.config import TrainJob
from megaclass.training.engine import remove_deepspeed_shm, shutdown_distributed
from megaclass.training.export import export_encoder
from megaclass.training.tracking import require_wandb

log = logging.getLogger(__name__)

_LAUNCHED_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def _under_launcher() -> bool:
    return any(v in os.environ for v in _LAUNCHED_VARS)


def run_train(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Train (resuming from the newest complete checkpoint), export, write _SUCCESS.json.

    With ``train.nproc > 1`` and no launcher around us, starts ``train.nproc`` ranks of this
    module with ``train.launcher`` (torchrun by default, or the deepspeed launcher) and waits
    for them (the ranks do the work).
    """
    rd = RunDir(cfg.run_dir)
    write_run_config(rd, cfg, force)
    if cfg.train.wandb_project:
        require_wandb()  # a missing package fails here, before any rank starts
    if cfg.train.nproc > 1 and not _under_launcher():
        return _launch_local(cfg, rd)

    from megaclass.training import trainer  # DeepSpeed: imported only where ranks train

    t0 = time.time()
    try:
        summary = trainer.train(make_job(cfg))
    except Exception as e:
        if type(e).__name__ == "LabelShaMismatchError":  # re-raised by a loader worker too
            raise InputError(
                f"{e}. The label sidecars were made from different centroids than "
                "RUN/cluster/centroids.npy: re-run `megaclass assign` (or point "
                "assign.labels_dir at matching labels)."
            ) from e
        raise
    model = summary.pop("_model")
    summary["wall_s"] = time.time() - t0
    summary["samples_per_s"] = summary["samples"] / max(summary["wall_s"], 1e-9)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if not summary["interrupted"] and rank == 0:
        summary["export"] = export_run(cfg, rd, summary, model)
        rd.finish_stage("train", summary)
    if dist.is_initialized():
        dist.barrier()
    return summary


def make_job(cfg: RunConfig) -> TrainJob:
    """The trainer's whole input, resolved from the run config and the run directory: the
    class count (rows of the centroids), where the labels are and which centroids they must
    come from. The trainer itself never looks at other stages' folders."""
    from megaclass.pipelines.train_eval import make_eval_hook

    rd = RunDir(cfg.run_dir)
    labels = None if cfg.train.objective == "siglip" else labels_dir_of(cfg)
    return TrainJob(
        train=cfg.train,
        data=cfg.data,
        seed=cfg.seed,
        train_dir=rd.train,
        num_classes=count_classes(cfg) if labels is not None else 0,
        labels_dir=labels,
        centroid_sha=expected_centroid_sha(cfg) if labels is not None else None,
        eval_hook=make_eval_hook(cfg),  # train.eval_every (None when 0)
    )


def count_classes(cfg: RunConfig) -> int:
    """Pseudo-classes = rows of RUN/cluster/centroids.npy (or cluster.centroids), else cluster.k."""
    for p in (cfg.cluster.centroids, str(RunDir(cfg.run_dir).cluster / "centroids.npy")):
        if p and Path(p).is_file():
            return int(np.load(p, mmap_mode="r", allow_pickle=False).shape[0])
    return int(cfg.cluster.k)


def expected_centroid_sha(cfg: RunConfig) -> str | None:
    """The sha that every label sidecar must carry (None when labels are brought by the user)."""
    if cfg.assign.labels_dir:
        return None
    rd = RunDir(cfg.run_dir)
    f = rd.cluster / "centroids.sha256"
    if f.is_file():
        return f.read_text().strip()
    npy = rd.cluster / "centroids.npy"
    if npy.is_file():
        return file_sha256(npy)
    return None


def export_run(cfg: RunConfig, rd: RunDir, summary: dict[str, Any], model: Any) -> dict[str, str]:
    """Export the trained StudentModel into RUN/export with a model card."""
    import json

    eval_numbers = None
    mpath = rd.eval / "metrics.json"
    if mpath.is_file():
        eval_numbers = json.loads(mpath.read_text())
    card = {
        "training": {k: v for k, v in summary.items() if k != "export"},
        "data": {"shards": cfg.data.shards, "labels": str(labels_dir_of(cfg))},
        "objective": cfg.train.objective,
        "datasets": hub_dataset_ids(cfg.data.shards),
        "eval": eval_numbers,
        "config": dump_config(cfg),
    }
    return export_encoder(model, rd.export, card, seed=cfg.seed)


def _launch_local(cfg: RunConfig, rd: RunDir) -> dict[str, Any]:
    """Start ``train.nproc`` ranks on this machine (torchrun or the deepspeed launcher).

    The run directory's lock is held (reentrantly) for as long as the ranks run; they learn
    through MEGACLASS_LOCK_TOKEN that their launcher holds it (core/lock.py), and each holds
    the shared rank lock while it lives, so a new run waits for ranks that outlive a killed
    driver (checkpointing on their way out) instead of deleting their files.
    """
    n, port = str(cfg.train.nproc), str(free_port())
    if cfg.train.launcher == "deepspeed":
        head = ["-m", "deepspeed.launcher.runner", "--num_gpus", n, "--master_port", port]
        head += ["--module", "megaclass.pipelines.train"]
    else:
        head = ["-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", port]
        head += ["-m", "megaclass.pipelines.train"]
    # run_dir is passed explicitly: RUN/config.yaml keeps the path the run was started under,
    # and a run directory that was moved or copied must train where it is now
    cmd = [sys.executable, *head, str(rd.config_path), f"run_dir={rd.root}"]
    with rd.lock(f"megaclass train {rd.config_path} (train.nproc={n})") as held:
        env = dict(os.environ)
        if held is not None:
            env[TOKEN_ENV] = held.env_value()
        log.info("launching: %s", " ".join(cmd))
        try:
            res = run_tied_to_parent(cmd, env=env)
        finally:  # what killed ranks left in /dev/shm (a clean rank removes its own)
            remove_deepspeed_shm(port)
    if res.returncode != 0:
        raise RuntimeError(f"the training ranks exited with {res.returncode}: {' '.join(cmd)}")
    return rd.read_success("train") or {"interrupted": True}


def run_tied_to_parent(
    cmd: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)``, but on Linux the child gets SIGTERM when this process dies.

    The launcher (torchrun / deepspeed) starts the ranks in sessions of their own, so a killed
    driver (SIGKILL, OOM) would otherwise leave them training on — and a restarted run would
    then train twice into one run directory. torchrun forwards the SIGTERM to the ranks, whose
    signal handler checkpoints and exits; the restart resumes from that checkpoint. Should the
    launcher itself be SIGKILLed, each rank dies with it too (:func:`die_with_launcher`).
    """
    return subprocess.run(cmd, env=env, preexec_fn=_die_with_parent(os.getpid()))


_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    """libc's prctl (Linux), resolved here: a child between fork and exec must not import."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    prctl = _prctl()
    if prctl is None:
        return None

    def arm() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def die_with_launcher(poll_s: float = 1.0) -> None:
    """Make this rank get SIGTERM when its launcher (the parent process) dies.

    Why: torchrun and the deepspeed launcher start the ranks in sessions of their own, so a
    SIGKILL to the launcher (or to the job's process group) would leave the ranks training on,
    writing into a run directory that a restarted run then also writes. SIGTERM takes the
    trainer's signal path: checkpoint at the next step, exit 0; before that handler is
    installed (start-up) SIGTERM simply ends the process, which has written nothing yet.
    Linux: PR_SET_PDEATHSIG, then a check that the parent did not die before it took effect.
    Elsewhere: a daemon thread that watches the parent pid every ``poll_s`` seconds.
    """
    parent = os.getppid()  # (1 is no proof of a dead launcher: in a container it may be init)
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="megaclass-launcher-watch", daemon=True).start()


def reshard_main(argv: list[str]) -> int:
    """``megaclass train reshard RUN --world-size N [--step S]``."""
    ap = argparse.ArgumentParser(
        prog="megaclass train reshard",
        description="Prepare a checkpoint for a different number of ranks: re-split the "
        "model-parallel head and convert ZeRO state to a DeepSpeed universal checkpoint.",
    )
    ap.add_argument("run_dir", help="run directory (holds train/ckpt)")
    ap.add_argument("--world-size", type=int, required=True, help="ranks of the next run")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    args = ap.parse_args(argv)

    rd = RunDir(args.run_dir)
    root = rd.ckpt
    if args.step is None:
        folder = ckpt.latest_complete(root)
        if folder is None:
            print(f"megaclass: no complete checkpoint under {root}", file=sys.stderr)
            return 2
    else:
        folder = root / ckpt.step_tag(args.step)
    try:
        with rd.lock(shlex.join(["megaclass", "train", "reshard", *argv])):  # rewrites ckpt/
            ckpt.reshard(folder, args.world_size)
    except (ckpt.CheckpointError, RunDirLockedError) as e:
        print(f"megaclass: {e}", file=sys.stderr)
        return 2
    print(f"{folder}: ready for {args.world_size} ranks")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry for launchers: ``python -m megaclass.pipelines.train CONFIG [overrides] [--force]``.

    Under a launcher the rank first ties its life to the launcher (:func:`die_with_launcher`);
    then it holds the run directory's lock as core/lock.py decides (rank 0 of an external
    launcher takes it, ranks launched by ``megaclass train``/``run`` share their driver's).
    A user error prints one line and exits 2 (``--debug``/MEGACLASS_DEBUG=1: with traceback).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if _under_launcher():
        die_with_launcher()
    if argv[:1] == ["reshard"]:
        return reshard_main(argv[1:])
    ap = argparse.ArgumentParser(prog="megaclass.pipelines.train")
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--debug", action="store_true", help="tracebacks of user errors too")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None)  # deepspeed adds it
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    from megaclass.pipelines.cli import run_guarded

    def go() -> int:
        cfg = load_config(args.config, args.overrides)
        command = shlex.join(["python", "-m", "megaclass.pipelines.train", *argv])
        try:
            with RunDir(cfg.run_dir).lock(command):
                run_train(cfg, force=args.force)  # raises ConfigError too (train.precision)
        except Exception:
            shutdown_distributed(barrier=False)  # exit with the message, not a gloo abort
            raise
        shutdown_distributed()  # a live gloo group at exit can abort a finished rank (-6)
        return 0

    return run_guarded(go, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
