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
- ``run``: the Ray stages (skipping complete ones), then regroup, training, eval and the report.

Rendering refuses any value that could break out of its place in the script (a line break in
run_dir, a space in an #SBATCH value: a ConfigError names the key) and creates the job's log
folder (RUN/slurm/, and that of slurm.output), which Slurm opens before the script can.

``python -m megaclass.pipelines.slurm wait-ray --nodes N`` is the small helper the Ray
scripts use to wait until all nodes have joined.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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


# Every value that enters a script is checked before anything is rendered (docs/reliability.md):
# - no value may hold a line break or other control character (a tab is fine): one would end
#   the #SBATCH line or comment it sits in and start a line of the attacker's choosing;
# - a value inside an #SBATCH line must also be plain: sbatch splits those lines at whitespace
#   and reads quotes itself, so a space would smuggle in another option;
# - values in shell positions (slurm.python, run_dir, slurm.ray_temp_root) are shlex-quoted,
#   and slurm.setup lines are shell code by design (the user's own).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
# characters allowed in #SBATCH values (regex class bodies) and how messages name them
_PLAIN = ("A-Za-z0-9_.,:/=@+-", "letters, digits and _.,:/=@+-")
# --output may also hold Slurm's %x/%j/... filename patterns
_OUTPUT = ("A-Za-z0-9_.,:/=@+%-", "letters, digits, % and _.,:/=@+-")
# extra options may also hold node lists and constraint expressions: --exclude=node[01-04],
# --constraint=a100|h100, --array=0-15%4
_EXTRA = ("A-Za-z0-9_.,:/=@+%\\[\\]|&*-", "letters, digits and _.,:/=@+-%[]|&*")


def _one_line(key: str, value: str) -> None:
    """A value that enters the script anywhere: no line breaks or control characters."""
    m = _CONTROL.search(value)
    if m:
        raise ConfigError(
            f"{key}: must be one line without control characters (a line break would start a "
            f"script line of its own); {value!r} holds {m.group()!r}"
        )


def _sbatch_value(
    key: str, value: str, allowed: tuple[str, str], option: bool = False, why: str = ""
) -> None:
    """A value that ends up inside an ``#SBATCH`` line (``option``: a whole ``--name=value``)."""
    _one_line(key, value)
    bad = sorted({c for c in value if not re.fullmatch(f"[{allowed[0]}]", c)})
    if bad or not value or (option and not value.startswith("-")):
        found = f"found {' '.join(map(repr, bad))}" if bad else "it must be non-empty"
        if not bad and option and value:
            found = "it must be one sbatch option starting with '-' ('--name=value' or '--flag')"
        raise ConfigError(
            f"{key}: {value!r} goes into an #SBATCH line{why}, where only {allowed[1]} are "
            f"accepted (sbatch splits the line at whitespace and reads quotes itself); {found}"
        )


def _check_values(cfg: RunConfig, run_dir: str, config_path: str | None) -> None:
    """Refuse every value that could break out of its place in the script (see above)."""
    s = cfg.slurm
    _one_line("run_dir", run_dir)
    if config_path is not None:
        _one_line("config path (the CONFIG argument)", config_path)
    for name in ("python", "ray_temp_root"):
        _one_line(f"slurm.{name}", getattr(s, name))
    for i, line in enumerate(s.setup):
        _one_line(f"slurm.setup[{i}]", line)
    for name in ("job_name", "partition", "account", "qos", "mem", "time"):
        v = getattr(s, name)
        if v is not None:
            _sbatch_value(f"slurm.{name}", v, _PLAIN)
    if s.output is not None:
        _sbatch_value("slurm.output", s.output, _OUTPUT)
        if "%" in os.path.dirname(s.output):
            raise ConfigError(
                f"slurm.output: {s.output!r} has a % pattern in its folder; Slurm opens the log "
                "before the script runs and creates no folders, so the folder must be fixed"
            )
    else:
        why = " (the default log path RUN/slurm/%x-%j.out; or set slurm.output)"
        _sbatch_value("run_dir", run_dir, _PLAIN, why=why)
    for i, extra in enumerate(s.extra_sbatch):
        _sbatch_value(f"slurm.extra_sbatch[{i}]", _strip_sbatch(extra), _EXTRA, option=True)


def _strip_sbatch(extra: str) -> str:
    extra = extra.strip()
    if extra.startswith("#SBATCH"):
        extra = extra[len("#SBATCH") :].strip()
    return extra


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
    world = s.nodes * tasks_per_node(cfg)
    if stage in ("train", "run") and cfg.train.virtual_streams % world:
        raise ConfigError(
            f"train.virtual_streams: {cfg.train.virtual_streams} is not divisible by the job's "
            f"{world} training ranks (slurm.nodes={s.nodes} x {tasks_per_node(cfg)} per node); "
            "use a multiple of the largest rank count the run may get (docs/training.md, "
            "'Elastic resume')"
        )
    if not 1024 <= s.ray_port_base <= 65535 - 15000:
        raise ConfigError(f"slurm.ray_port_base: must be in 1024..50535, got {s.ray_port_base}")
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
    lines += [_strip_sbatch(extra) for extra in s.extra_sbatch]
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
    regroup_done = _done("$RUN_DIR", "regroup")
    lines += [
        # labels per training shard (by key, when they were assigned on other files): no Ray
        f"if [ ! -f {regroup_done} ]; then",
        f'  run_step TERM {regroup_done} {py} -m megaclass.pipelines.run "$CONFIG" --stages regroup',
        "fi",
        f"if [ ! -f {train_done} ]; then train_ranks; fi",
        f'run_step TERM "" {py} -m megaclass.pipelines.run "$CONFIG" --stages eval,report',
        'log "finished; report in $RUN_DIR"',
        "",
    ]
    return "\n".join(lines)


def render(
    cfg: RunConfig,
    stage: str,
    config_path: str | Path | None = None,
    *,
    make_log_dirs: bool = True,
) -> str:
    """The sbatch script for ``stage`` (embed|cluster|assign|train|run) as a string.

    ``config_path`` is only quoted in the header comment: the resolved ``cfg`` itself is
    embedded in the script (written to ``RUN/slurm/config-$SLURM_JOB_ID.yaml`` at start).

    Every value that enters the script is checked first (:func:`_check_values`): a
    :class:`ConfigError` names the key. ``make_log_dirs`` creates the folder of the job's
    ``#SBATCH --output`` log (``RUN/slurm/``, and the folder of ``slurm.output`` when set) now,
    saying so on stderr: Slurm opens that log before the script runs and creates no folders, so
    the first job of a fresh run directory would otherwise fail without any log.
    """
    _check(cfg, stage)
    s = cfg.slurm
    _one_line("run_dir", cfg.run_dir)  # before resolve(), which refuses NUL bytes on its own
    run_dir = Path(cfg.run_dir).resolve()
    _check_values(cfg, str(run_dir), None if config_path is None else str(config_path))
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
        "config_comment": shlex.quote(str(config_path)) if config_path else "CONFIG",
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
    script = "".join(parts)
    if make_log_dirs:
        make_log_folders(cfg, run_dir)
    return script


def log_folders(cfg: RunConfig, run_dir: Path) -> list[Path]:
    """The folders that must exist before the job starts: RUN/slurm/ (the default log, the
    embedded config, the Ray token) and the folder of ``slurm.output`` when it is set (a
    relative one is relative to where sbatch runs: taken here as the current directory)."""
    folders = [run_dir / "slurm"]
    if cfg.slurm.output:
        folders.append(Path(cfg.slurm.output).absolute().parent)
    return folders


def make_log_folders(cfg: RunConfig, run_dir: Path) -> list[Path]:
    """Create :func:`log_folders` and say so on stderr; returns the folders created."""
    created = []
    for folder in log_folders(cfg, run_dir):
        if folder.is_dir():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        created.append(folder)
        note = ""
        if folder != run_dir / "slurm" and not Path(cfg.slurm.output or "/").is_absolute():
            note = f"; slurm.output is relative: run sbatch from {Path.cwd()}"
        print(
            f"megaclass slurm: created {folder} for the job log (Slurm opens #SBATCH --output "
            f"before the script runs and creates no folders){note}",
            file=sys.stderr,
        )
    return created


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
