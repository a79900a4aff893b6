"""Render sbatch scripts from a run config: ``megaclass slurm CONFIG --stage NAME``.

Why scripts are rendered rather than shipped: every cluster differs in partition, account,
modules and node shape, and the scripts must carry the resolved config (command-line
overrides included) so that a requeued job resumes with exactly the config it started with.
The templates live in ``slurm/*.tmpl`` (plain text, ``@@{name}`` placeholders, no template
engine) and are assembled here:

- ``embed`` / ``cluster`` / ``assign``: a Ray cluster job — one Ray node per Slurm node (head
  via ``srun -w $head ray start --head --block &``, workers joining it), then the stage's
  driver with ``RAY_ADDRESS`` pointing at the head. Ports and the Ray temp dir derive from
  ``SLURM_JOB_ID``; the cluster uses a job-specific auth token.
- ``train``: one task per GPU via ``srun``; RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*, MASTER_ADDR
  from the node list. ``--requeue --signal=B:USR1@N``: the batch shell waits on ``srun … &``;
  its USR1 trap forwards USR1 to the srun step (srun relays it to every rank), the trainer
  checkpoints and exits 0, then the shell calls ``scontrol requeue``. The requeued job resumes
  from the newest complete checkpoint.
- ``run``: the Ray stages (skipping complete ones), then training, then eval and the report.

``python -m megaclass.pipelines.slurm wait-ray --nodes N`` is the small helper the Ray
scripts use to wait until all nodes have joined.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import string
import sys
import time
from pathlib import Path

from megaclass.core.stages import STAGES as REGISTRY
from megaclass.core.stages import SUCCESS
from megaclass.pipelines.config import ConfigError, RunConfig, dump_config

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
STAGES = tuple(n for n, s in REGISTRY.items() if s.slurm) + ("run",)
RAY_STAGES = tuple(n for n, s in REGISTRY.items() if s.slurm == "ray")
CONFIG_EOF = "MEGACLASS_CONFIG_EOF"


class _Template(string.Template):
    """``@@{name}`` placeholders, so that bash's own ``$var`` and ``${var}`` pass through."""

    delimiter = "@@"


def _template(name: str) -> _Template:
    return _Template((TEMPLATE_DIR / name).read_text())


def tasks_per_node(cfg: RunConfig) -> int:
    """Training ranks per node: slurm.tasks_per_node, else one per GPU (one on CPU nodes)."""
    s = cfg.slurm
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return s.gpus_per_node if s.gpus_per_node > 0 else 1


def _check(cfg: RunConfig, stage: str) -> None:
    s = cfg.slurm
    if stage not in STAGES:
        raise ConfigError(f"--stage: {stage!r} is not one of {', '.join(STAGES)}")
    for name in ("nodes", "cpus_per_task", "signal_seconds", "ray_start_timeout"):
        if getattr(s, name) < 1:
            raise ConfigError(f"slurm.{name}: must be >= 1, got {getattr(s, name)}")
    if s.gpus_per_node < 0:
        raise ConfigError(f"slurm.gpus_per_node: must be >= 0, got {s.gpus_per_node}")
    if tasks_per_node(cfg) < 1:
        raise ConfigError(f"slurm.tasks_per_node: must be >= 1, got {s.tasks_per_node}")
    if not 1024 <= s.ray_port_base <= 65535 - 15000:
        raise ConfigError(f"slurm.ray_port_base: must be in 1024..50535, got {s.ray_port_base}")
    for name in ("job_name", "partition", "account", "qos", "mem", "time", "output", "python"):
        v = getattr(s, name)
        if v is not None and ("\n" in v or "\r" in v):
            raise ConfigError(f"slurm.{name}: must be a single line, got {v!r}")
    for i, line in enumerate([*s.extra_sbatch, *s.setup]):
        if "\n" in line:
            raise ConfigError(f"slurm.extra_sbatch/setup item {i}: one line per item, got {line!r}")
    if not s.python.strip():
        raise ConfigError("slurm.python: empty")
    if stage in (*RAY_STAGES, "run") and (cfg.ray.num_cpus or cfg.ray.object_store_memory):
        raise ConfigError(
            "ray.num_cpus / ray.object_store_memory: must be unset for Slurm jobs (the stages "
            "join the job's Ray cluster through RAY_ADDRESS; size it with slurm.cpus_per_task)"
        )
    if stage in (*RAY_STAGES, "run") and cfg.ray.address:
        raise ConfigError(
            "ray.address: must be unset for Slurm jobs; the job starts its own Ray cluster "
            "and sets RAY_ADDRESS"
        )


def _sbatch_lines(cfg: RunConfig, stage: str, run_dir: Path) -> str:
    s = cfg.slurm
    ray_only = stage in RAY_STAGES
    ntasks = 1 if ray_only else tasks_per_node(cfg)
    cpus = ray_cpus(cfg) if ray_only else s.cpus_per_task
    lines = [f"--nodes={s.nodes}", f"--ntasks-per-node={ntasks}", f"--cpus-per-task={cpus}"]
    if s.gpus_per_node > 0:
        lines.append(f"--gpus-per-node={s.gpus_per_node}")
    lines += [f"--mem={s.mem}", f"--time={s.time}"]
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            lines.append(f"--{name}={getattr(s, name)}")
    lines.append(f"--output={s.output or str(run_dir / 'slurm' / '%x-%j.out')}")
    lines.append("--open-mode=append")
    if s.requeue:
        lines += ["--requeue", f"--signal=B:USR1@{s.signal_seconds}"]
    for extra in s.extra_sbatch:
        extra = extra.strip()
        if extra.startswith("#SBATCH"):
            extra = extra[len("#SBATCH") :].strip()
        lines.append(extra)
    return "\n".join(f"#SBATCH {x}" for x in lines)


def ray_cpus(cfg: RunConfig) -> int:
    """CPUs of one Ray node: all the CPUs the job holds on a node."""
    return cfg.slurm.cpus_per_task * tasks_per_node(cfg)


def _config_yaml(cfg: RunConfig) -> str:
    text = dump_config(cfg).rstrip("\n")
    if any(line.strip() == CONFIG_EOF for line in text.splitlines()):
        raise ConfigError(f"the config contains a line '{CONFIG_EOF}', which ends the heredoc")
    return text


def _done(run_dir_var: str, stage: str) -> str:
    return f'"{run_dir_var}/{REGISTRY[stage].folders[0]}/{SUCCESS}"'


def _body(cfg: RunConfig, stage: str) -> str:
    """The stage-specific end of the script (the templates hold the shared parts)."""
    py = '"$PYTHON"'
    if stage in RAY_STAGES:
        done = _done("$RUN_DIR", stage)
        return "\n".join(
            [
                "",
                f"# ---- the {stage} stage on the Ray cluster ----------------------------------",
                f"if [ -f {done} ]; then log '{stage} is already complete'; exit 0; fi",
                "start_ray",
                f'run_step TERM {done} {py} -m megaclass.pipelines.cli {stage} "$CONFIG"',
                "stop_ray",
                "",
            ]
        )
    train_done = _done("$RUN_DIR", "train")
    if stage == "train":
        return "\n".join(
            [
                "",
                f"if [ -f {train_done} ]; then log 'train is already complete'; exit 0; fi",
                "train_ranks",
                "",
            ]
        )
    # stage == "run"
    lines = ["", "# ---- the whole pipeline; complete stages are skipped ---------------------"]
    if cfg.assign.labels_dir:
        lines.append("# assign.labels_dir is set: embed, cluster and assign are skipped")
    else:
        labels_done = _done("$RUN_DIR", "assign")
        lines += [
            f"if [ ! -f {labels_done} ]; then",
            "  start_ray",
            f'  run_step TERM {labels_done} {py} -m megaclass.pipelines.run "$CONFIG" '
            "--stages embed,cluster,assign",
            "  stop_ray",
            "fi",
        ]
    lines += [
        f"if [ ! -f {train_done} ]; then train_ranks; fi",
        f'run_step TERM "" {py} -m megaclass.pipelines.run "$CONFIG" --stages eval,report',
        'log "finished; report in $RUN_DIR"',
        "",
    ]
    return "\n".join(lines)


def render(cfg: RunConfig, stage: str, config_path: str | Path | None = None) -> str:
    """The sbatch script for ``stage`` (embed|cluster|assign|train|run) as a string.

    ``config_path`` is only quoted in the header comment: the resolved ``cfg`` itself is
    embedded in the script (written to ``RUN/slurm/config-$SLURM_JOB_ID.yaml`` at start).
    """
    _check(cfg, stage)
    s = cfg.slurm
    run_dir = Path(cfg.run_dir).resolve()
    # the embedded config names the absolute run dir, so the job works from any directory
    cfg = _with_run_dir(cfg, str(run_dir))
    auth = ""
    if s.ray_auth_token:
        auth = "\n".join(
            [
                "# token authentication with a job-specific token (mode 600, on the shared run dir)",
                "export RAY_AUTH_MODE=token",
                'export RAY_AUTH_TOKEN_PATH="$RUN_DIR/slurm/ray-token-$SLURM_JOB_ID"',
                "( umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > \"$RAY_AUTH_TOKEN_PATH\" )",
            ]
        )
    setup = s.setup or ["# (none: slurm.setup is empty)"]
    values = {
        "stage": stage,
        "run_dir_comment": str(run_dir),
        "config_comment": str(config_path) if config_path else "CONFIG",
        "job_name": f"{s.job_name}-{stage}",
        "sbatch_lines": _sbatch_lines(cfg, stage, run_dir),
        "setup_lines": "\n".join(setup),
        "python": shlex.quote(s.python),
        "run_dir": shlex.quote(str(run_dir)),
        "config_yaml": _config_yaml(cfg),
        "signal_seconds": str(s.signal_seconds),
        "requeue": "1" if s.requeue else "0",
        "ray_port_base": str(s.ray_port_base),
        "ray_temp_root": shlex.quote(s.ray_temp_root.rstrip("/") or "/"),
        "ray_auth_lines": auth,
        "ray_cpus": str(ray_cpus(cfg)),
        "gpus_per_node": str(s.gpus_per_node),
        "ray_start_timeout": str(s.ray_start_timeout),
        "tasks_per_node": str(tasks_per_node(cfg)),
        "cpus_per_task": str(s.cpus_per_task),
    }
    parts = [_template("header.sbatch.tmpl").substitute(values)]
    if stage in (*RAY_STAGES, "run"):
        parts.append(_template("ray_cluster.sh.tmpl").substitute(values))
    if stage in ("train", "run"):
        parts.append(_template("train.sh.tmpl").substitute(values))
    parts.append(_body(cfg, stage))
    return "".join(parts)


def _with_run_dir(cfg: RunConfig, run_dir: str) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, run_dir=run_dir)


# --------------------------------------------------------------------------------------
# wait-ray: the helper the Ray scripts call until every node has joined
# --------------------------------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def wait_for_ray(address: str, nodes: int, timeout: float, port_only: bool = False) -> int:
    """Block until the Ray cluster at ``address`` has ``nodes`` live nodes; returns the count.

    ``port_only``: return as soon as the head's GCS port accepts connections (enough before
    starting the workers; saves a driver connection). Raises TimeoutError naming the address
    and the counts when ``timeout`` seconds pass.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while not _port_open(host, int(port)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray head {address}: port not open after {timeout:.0f} s")
        time.sleep(1.0)
    if port_only:
        return 1
    import ray

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        alive = 0
        while True:
            alive = sum(1 for n in ray.nodes() if n.get("Alive"))
            if alive >= nodes:
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Ray cluster {address}: {alive} of {nodes} nodes joined in {timeout:.0f} s"
                )
            time.sleep(1.0)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megaclass.pipelines.slurm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-ray", help="wait until the Ray cluster has N live nodes")
    w.add_argument("--address", default=os.environ.get("RAY_ADDRESS"))
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300.0)
    w.add_argument("--port-only", action="store_true", help="only wait for the head's GCS port")
    args = ap.parse_args(argv)
    if not args.address:
        ap.error("--address or RAY_ADDRESS is required")
    try:
        n = wait_for_ray(args.address, args.nodes, args.timeout, args.port_only)
    except TimeoutError as e:
        print(f"megaclass wait-ray: {e}", file=sys.stderr)
        return 1
    what = "head port open" if args.port_only else f"{n} node(s) up"
    print(f"[megaclass] Ray cluster {args.address}: {what}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
