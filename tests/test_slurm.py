"""sbatch rendering, and the rendered scripts run for real against stand-in Slurm commands.

The stand-ins (tests/slurm_standins.py) only replace ``sbatch``/``srun``/``scontrol``; what
runs inside is real: the DeepSpeed trainer on 2 CPU ranks (USR1 → checkpoint → ``scontrol
requeue`` → the requeued job resumes), and a 2-node Ray cluster started by the script's own
``ray start`` lines with the assign stage's Ray Data actors running on it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from megaclass.pipelines.config import ConfigError, load_config
from megaclass.pipelines.slurm import STAGES, render

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_standins  # noqa: E402

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
SHELLCHECK = shutil.which("shellcheck") or str(Path(PY).parent / "shellcheck")


def _cfg(tmp_path: Path, **slurm):
    s = {
        "partition": "gpu",
        "account": "proj-1",
        "nodes": 2,
        "setup": ["module load cuda/12.4", "source /opt/venv/bin/activate"],
        "extra_sbatch": ["--constraint=a100", "#SBATCH --exclusive"],
    }
    s.update(slurm)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "slurm": s}))
    return load_config(p), p


@pytest.mark.parametrize("stage", STAGES)
def test_rendered_scripts_pass_bash_n_and_shellcheck(tmp_path, stage):
    cfg, path = _cfg(tmp_path)
    script = render(cfg, stage, path)
    f = tmp_path / f"{stage}.sbatch"
    f.write_text(script)
    subprocess.run(["bash", "-n", str(f)], check=True)
    res = subprocess.run([SHELLCHECK, str(f)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert f"#SBATCH --job-name=megaclass-{stage}" in lines
    for opt in ("--nodes=2", "--partition=gpu", "--account=proj-1", "--gpus-per-node=8"):
        assert f"#SBATCH {opt}" in lines
    assert "#SBATCH --constraint=a100" in lines and "#SBATCH --exclusive" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --signal=B:USR1@120" in lines
    assert "#SBATCH --open-mode=append" in lines
    # the resolved config is embedded and loads back to the same config
    body = script.split("<<'MEGACLASS_CONFIG_EOF'\n", 1)[1].split("\nMEGACLASS_CONFIG_EOF\n", 1)[0]
    (tmp_path / "back.yaml").write_text(body)
    back = load_config(tmp_path / "back.yaml")
    assert back.slurm == cfg.slurm and back.run_dir == str((tmp_path / "run").resolve())
    if stage in ("train", "run"):
        assert "#SBATCH --ntasks-per-node=8" in lines
        assert 'WORLD_SIZE="$SLURM_NTASKS"' in script and "scontrol requeue" in script
    else:
        assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --cpus-per-task=64" in lines
    if stage != "train":
        assert "ray.scripts.scripts start --head" in script and "--block" in script


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_render(tmp_path, config, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their run_dir is relative: its slurm/ log folder lands here
    cfg = load_config(config)
    for stage in STAGES:
        f = tmp_path / f"{stage}.sbatch"
        f.write_text(render(cfg, stage, config))
        res = subprocess.run([SHELLCHECK, str(f)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout


def test_render_cpu_cluster_and_no_requeue(tmp_path):
    cfg, path = _cfg(tmp_path, gpus_per_node=0, tasks_per_node=4, cpus_per_task=2, requeue=False)
    script = render(cfg, "train", path)
    assert "--gpus-per-node" not in script
    assert "#SBATCH --ntasks-per-node=4" in script.splitlines()
    assert "#SBATCH --requeue" not in script and "#SBATCH --signal" not in script
    assert "REQUEUE=0" in script


@pytest.mark.parametrize(
    "override, msg",
    [
        ("slurm.partition='a\nb'", "slurm.partition"),
        ("slurm.nodes=0", "slurm.nodes"),
        ("ray.address=auto", "ray.address"),
        ("ray.num_cpus=4", "ray.num_cpus"),
        ("slurm.tasks_per_node=0", "slurm.tasks_per_node"),
    ],
)
def test_render_refuses_bad_settings(tmp_path, override, msg):
    key, _, value = override.partition("=")
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, yaml.safe_load(value) if "\n" not in value else value)
    with pytest.raises(ConfigError, match=msg):
        render(cfg, "run", None)


def test_cli_writes_script(tmp_path):
    _, path = _cfg(tmp_path)
    out = tmp_path / "job.sbatch"
    res = subprocess.run(
        [PY, "-m", "megaclass.pipelines.cli", "slurm", str(path), "slurm.nodes=3", "--stage", "embed", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=3" in out.read_text().splitlines()
    # the log folder exists before any job does (Slurm opens --output before the script runs)
    logs = (tmp_path / "run" / "slurm").resolve()
    assert logs.is_dir() and f"megaclass slurm: created {logs} for the job log" in res.stderr


def test_cli_printing_the_script_creates_the_log_folders_too(tmp_path):
    _, path = _cfg(tmp_path, output=str(tmp_path / "logs" / "deep" / "%x-%j.out"))
    res = subprocess.run(
        [PY, "-m", "megaclass.pipelines.cli", "slurm", str(path), "--stage", "train"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("#!/bin/bash\n")  # stdout is the script alone
    assert f"#SBATCH --output={tmp_path / 'logs' / 'deep' / '%x-%j.out'}" in res.stdout
    for folder in (tmp_path / "run" / "slurm", tmp_path / "logs" / "deep"):
        assert folder.is_dir() and f"created {folder.resolve()} " in res.stderr
    again = subprocess.run(
        [PY, "-m", "megaclass.pipelines.cli", "slurm", str(path), "--stage", "train"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert again.returncode == 0 and "created" not in again.stderr  # said only when it did


def test_output_folder_with_a_slurm_pattern_is_refused(tmp_path):
    cfg, _ = _cfg(tmp_path, output=str(tmp_path / "logs-%j" / "x.out"))
    with pytest.raises(ConfigError, match=r"slurm\.output: .* % pattern in its folder"):
        render(cfg, "train", None)
    assert not (tmp_path / "run").exists()  # a refused config creates nothing


# ---------------------------------------------------------------------------------------
# Running the scripts against the stand-ins
# ---------------------------------------------------------------------------------------


def _free_port_in(lo: int, hi: int) -> int:
    for _ in range(200):
        p = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port")


def _clean_env(bin_dir: Path, state: Path, **extra) -> dict[str, str]:
    drop = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "RAY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        # only the stand-ins are added: a second ninja on PATH (the venv's) would make torch
        # rebuild DeepSpeed's cached CPU op for every other process on the machine
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        STANDIN_DIR=str(state),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def _wait_for(pred, timeout: float, what: str, logs: list[Path] = ()):  # noqa: B006
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


class _Job:
    """One stand-in sbatch submission; kills its whole process group on exit."""

    def __init__(self, script: Path, env: dict[str, str], state: Path):
        self.state = state
        res = subprocess.run(
            ["sbatch", str(script)], env=env, capture_output=True, text=True, check=True
        )
        assert res.stdout.startswith("Submitted batch job ")

    def batch_pid(self, restart: int) -> int:
        return int((self.state / f"batch-{restart}.pid").read_text())

    def kill_all(self) -> None:
        for f in self.state.glob("batch-*.pid"):
            pid = int(f.read_text())
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


STAND_IN_TRAINER = r"""
import json, os, signal, sys, time
import yaml
run = yaml.safe_load(open(sys.argv[-1]))["run_dir"]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
ck = os.path.join(run, "train", "ckpt.json")
step = json.load(open(ck))["step"] if os.path.exists(ck) else 0
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
log = open(os.path.join(run, "train", f"steps-{rank}.log"), "a")
print(f"start {step} restart={os.environ.get('SLURM_RESTART_COUNT')}", file=log, flush=True)
while step < 40:
    time.sleep(0.05)
    step += 1
    print(step, file=log, flush=True)
    if stop:
        if rank == 0:
            json.dump({"step": step}, open(ck + ".tmp", "w")); os.replace(ck + ".tmp", ck)
        sys.exit(0)
if rank == 0:
    json.dump({"steps": step}, open(os.path.join(run, "train", "_SUCCESS.json"), "w"))
"""


def test_train_script_wiring_ranks_usr1_requeue_resume_with_a_stand_in_trainer(tmp_path):
    """Fast check of the script's own logic; the slow test below runs the real trainer."""
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = slurm_standins.install(tmp_path / "bin")
    (bin_dir / "trainer.py").write_text(STAND_IN_TRAINER)
    probe = bin_dir / "python-probe"
    probe.write_text(
        "#!/bin/bash\n"
        'if [ "$2" = megaclass.pipelines.train ]; then\n'
        '  echo "$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $SLURM_RESTART_COUNT $MEGACLASS_SETUP_RAN" >> "$STANDIN_DIR/rank-env.log"\n'
        f'  exec {PY} {bin_dir / "trainer.py"} "$3"\n'
        "fi\n"
        f'exec {PY} "$@"\n'
    )
    probe.chmod(0o755)
    cfg, _ = _cfg(
        tmp_path,
        nodes=2,
        gpus_per_node=0,
        tasks_per_node=2,
        cpus_per_task=1,
        python=str(probe),
        setup=["export MEGACLASS_SETUP_RAN=yes"],
    )
    cfg.run_dir = str(run)
    script = tmp_path / "train.sbatch"
    script.write_text(render(cfg, "train", None))
    job_id = 4242
    env = _clean_env(
        bin_dir, state, STANDIN_JOB_ID=str(job_id), STANDIN_NODELIST="localhost,127.0.0.1"
    )
    out = run / "slurm" / f"megaclass-train-{job_id}.out"
    logs = [out, state / "slurmd.err"]
    job = _Job(script, env, state)
    steps0 = run / "train" / "steps-0.log"
    try:
        _wait_for(
            lambda: steps0.exists() and len(steps0.read_text().splitlines()) >= 5, 60, "steps", logs
        )
        os.kill(job.batch_pid(0), signal.SIGUSR1)
        _wait_for(lambda: (state / "finished").exists(), 60, "the job to end", logs)
    finally:
        job.kill_all()
    assert [(state / f"batch-{r}.rc").read_text() for r in (0, 1)] == ["0", "0"]
    assert (state / "scontrol.log").read_text() == f"requeue {job_id} restart=0\n"
    ck = json.loads((run / "train" / "ckpt.json").read_text())["step"]
    lines = steps0.read_text().splitlines()
    starts = [x for x in lines if x.startswith("start")]
    assert starts == ["start 0 restart=0", f"start {ck} restart=1"]  # resumed from the checkpoint
    assert json.loads((run / "train" / "_SUCCESS.json").read_text()) == {"steps": 40}
    # 2 nodes x 2 tasks: RANK 0..3, LOCAL_RANK 0,1 per node, WORLD_SIZE 4, master = first host
    seen = sorted(tuple(x.split()) for x in (state / "rank-env.log").read_text().splitlines())
    port = str(20000 + job_id % 20000)
    want = [
        (str(r), str(r % 2), "4", "localhost", port, str(k), "yes")
        for r in range(4)
        for k in (0, 1)
    ]
    assert seen == sorted(want)
    text = out.read_text()
    assert "USR1: sending USR1" in text and text.count("requeueing job") == 1


def _done_probe(bin_dir: Path, run: Path) -> Path:
    """A python stand-in whose "training" just writes RUN/train/_SUCCESS.json."""
    probe = bin_dir / "python-done"
    probe.write_text(
        "#!/bin/bash\n"
        'if [ "$2" = megaclass.pipelines.train ]; then\n'
        f'  mkdir -p "{run}/train" && echo "{{}}" > "{run}/train/_SUCCESS.json"; exit 0\n'
        "fi\n"
        f'exec {PY} "$@"\n'
    )
    probe.chmod(0o755)
    return probe


def _submit_fresh(tmp_path: Path, make_log_dirs: bool, capsys) -> tuple[Path, Path, str]:
    run = tmp_path / "fresh" / "run"  # nothing of it exists yet: a brand-new run
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = slurm_standins.install(tmp_path / "bin")
    cfg, _ = _cfg(
        tmp_path, nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1, setup=[],
        extra_sbatch=[], python=str(_done_probe(bin_dir, run)),
    )  # fmt: skip
    cfg.run_dir = str(run)
    script = tmp_path / "train.sbatch"
    script.write_text(render(cfg, "train", None, make_log_dirs=make_log_dirs))
    stderr = capsys.readouterr().err
    env = _clean_env(bin_dir, state, STANDIN_JOB_ID="777", STANDIN_NODELIST="localhost")
    job = _Job(script, env, state)
    try:
        _wait_for(lambda: (state / "finished").exists(), 60, "the job", [state / "slurmd.err"])
    finally:
        job.kill_all()
    return run, state, stderr


def test_first_job_of_a_fresh_run_dir_runs_and_logs(tmp_path, capsys):
    """Rendering creates RUN/slurm/, so the job's log opens and the script runs."""
    run, state, stderr = _submit_fresh(tmp_path, True, capsys)
    assert f"created {run.resolve() / 'slurm'} for the job log" in stderr
    assert (state / "job-state").read_text() == "COMPLETED"
    assert (state / "batch-0.rc").read_text() == "0"
    log = (run / "slurm" / "megaclass-train-777.out").read_text()
    assert "job 777 (train)" in log and "done:" in log
    assert (run / "train" / "_SUCCESS.json").exists()


def test_stand_in_fails_a_job_whose_log_folder_is_missing_like_slurm(tmp_path, capsys):
    """What the old renderer led to: sbatch accepts the job, which then fails on the node
    before its script starts, leaving no log at all (only slurmstepd's error in the node log)."""
    run, state, _ = _submit_fresh(tmp_path, False, capsys)
    assert (state / "job-state").read_text() == "FAILED"
    assert not (state / "batch-0.pid").exists()  # the script never started
    assert not (run / "slurm").exists() and not (run / "train").exists()
    err = (state / "slurmd.err").read_text()
    want = f"Could not open stdout file {run.resolve()}/slurm/megaclass-train-777.out"
    assert f"slurmstepd: error: {want}: No such file or directory" in err


def test_stand_in_sbatch_refuses_a_script_it_cannot_open(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = slurm_standins.install(tmp_path / "bin")
    res = subprocess.run(
        ["sbatch", str(tmp_path / "missing.sbatch")],
        env=_clean_env(bin_dir, state), capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.strip() == f"sbatch: error: Unable to open file {tmp_path / 'missing.sbatch'}"
    time.sleep(0.5)
    assert list(state.iterdir()) == []  # no job was started


def _tiny_train_run(root: Path):
    """Shards + centroids + label sidecars for a 2-rank run of the real trainer."""
    from megaclass.data.labels import file_sha256, write_labels
    from megaclass.data.writer import ShardWriter
    from PIL import Image

    rng = np.random.default_rng(0)
    keys = {}
    with ShardWriter(root / "shards", prefix="train-", maxcount=16, image_ext="png") as w:
        for i in range(32):
            c = i % 4
            arr = np.full((32, 32, 3), 60 * c, np.uint8) + rng.integers(
                0, 30, (32, 32, 3), dtype=np.uint8
            )
            w.write(f"{i:06d}", Image.fromarray(arr), f"class {c}", {"class": str(c)})
            keys.setdefault(f"train-{i // 16:06d}", []).append((f"{i:06d}", c))
    run = root / "run"
    (run / "cluster").mkdir(parents=True)
    np.save(run / "cluster" / "centroids.npy", rng.normal(size=(4, 8)).astype(np.float32))
    sha = file_sha256(run / "cluster" / "centroids.npy")
    (run / "cluster" / "centroids.sha256").write_text(sha)
    for stem, items in keys.items():
        lab = np.array([[c] for _, c in items], np.int64)
        write_labels(
            run / "labels" / f"{stem}.parquet",
            [k for k, _ in items],
            lab,
            np.ones(lab.shape, np.float32),
            sha,
        )
    return run


def _metrics_steps(run: Path) -> list[int]:
    f = run / "train" / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_train_script_two_ranks_usr1_checkpoints_requeues_and_resumes(tmp_path):
    run = _tiny_train_run(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = slurm_standins.install(tmp_path / "bin")
    # A transparent probe in front of the real interpreter records what each rank sees.
    probe = bin_dir / "python-probe"
    probe.write_text(
        "#!/bin/bash\n"
        'if [ "$2" = megaclass.pipelines.train ]; then\n'
        '  echo "$RANK $LOCAL_RANK $WORLD_SIZE $MASTER_ADDR $MASTER_PORT $SLURM_RESTART_COUNT" >> "$STANDIN_DIR/rank-env.log"\n'
        "fi\n"
        f'exec {PY} "$@"\n'
    )
    probe.chmod(0o755)
    port = _free_port_in(20000, 39999)
    job_id = 100000 + (port - 20000)  # the script's MASTER_PORT = 20000 + job id mod 20000
    cfg = {
        "run_dir": str(run),
        "data": {"shards": str(tmp_path / "shards" / "train-{000000..000001}.tar"), "image_size": 32,
                 "shuffle_buffer": 8},
        "cluster": {"k": 4},
        "train": {"objective": "pfc", "model": "open_clip:megaclass-tiny-vit", "embed_dim": 16,
                  "steps": 100000, "micro_batch_size": 4, "ckpt_every": 100000, "log_every": 1,
                  "warmup_steps": 1, "sample_rate": 1.0},
        "slurm": {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 2, "cpus_per_task": 1,
                  "python": str(probe), "time": "00:10:00"},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    script = tmp_path / "train.sbatch"
    script.write_text(render(load_config(tmp_path / "cfg.yaml"), "train", tmp_path / "cfg.yaml"))
    env = _clean_env(bin_dir, state, STANDIN_JOB_ID=str(job_id), STANDIN_NODELIST="localhost")
    out = run / "slurm" / f"megaclass-train-{job_id}.out"
    logs = [out, state / "slurmd.err"]
    job = _Job(script, env, state)
    try:
        # first allocation: train a few steps, then Slurm's USR1 to the batch shell
        _wait_for(lambda: len(_metrics_steps(run)) >= 3, 300, "training steps", logs)
        os.kill(job.batch_pid(0), signal.SIGUSR1)
        _wait_for(lambda: (state / "batch-0.rc").exists(), 120, "the batch shell to exit", logs)
        assert (state / "batch-0.rc").read_text() == "0"
        first = sorted(int(p.name.split("-")[1]) for p in (run / "train" / "ckpt").glob("step-*"))
        assert len(first) == 1, first  # ckpt_every is huge: this is the USR1 checkpoint
        s1 = first[0]
        assert (state / "scontrol.log").read_text() == f"requeue {job_id} restart=0\n"
        # the requeued job resumes from that checkpoint and goes on
        _wait_for(lambda: (state / "batch-1.pid").exists(), 60, "the requeued job", logs)
        _wait_for(lambda: max(_metrics_steps(run), default=0) >= s1 + 2, 300, "resumed steps", logs)
        os.kill(job.batch_pid(1), signal.SIGUSR1)
        _wait_for(lambda: (state / "finished").exists(), 120, "the job to end", logs)
    finally:
        job.kill_all()
    assert (state / "batch-1.rc").read_text() == "0"
    assert (state / "scontrol.log").read_text().splitlines() == [
        f"requeue {job_id} restart=0",
        f"requeue {job_id} restart=1",
    ]
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "train" / "ckpt").glob("step-*"))
    assert steps[0] == s1 and len(steps) == 2 and steps[1] > s1 + 1
    heads = sorted(
        p.name for p in (run / "train" / "ckpt" / f"step-{steps[1]:07d}" / "head").iterdir()
    )
    assert heads == ["rank-00000-of-00002.pt", "rank-00001-of-00002.pt"]
    # the metrics continue exactly where the checkpoint left off: every step once
    m = _metrics_steps(run)
    assert m == list(range(1, len(m) + 1)) and m[-1] == steps[1]
    # each rank saw its own RANK/LOCAL_RANK and the job's WORLD_SIZE/MASTER_ADDR/MASTER_PORT
    seen = sorted(tuple(x.split()) for x in (state / "rank-env.log").read_text().splitlines())
    assert seen == sorted(
        (str(r), str(r), "2", "localhost", str(port), str(restart))
        for r in (0, 1)
        for restart in (0, 1)
    )
    text = out.read_text()
    assert "USR1: sending USR1" in text and text.count("requeueing job") == 2
    assert not (run / "train" / "_SUCCESS.json").exists()  # never finished: it was preempted twice


def _tiny_embeddings(root: Path, n_stems: int = 2, rows: int = 40, d: int = 8) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    emb = root / "emb"
    for sub in ("img_emb", "metadata"):
        (emb / sub).mkdir(parents=True)
    for s in range(n_stems):
        stem = f"part-{s:05d}"
        x = rng.normal(size=(rows, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(emb / "img_emb" / f"{stem}.npy", x.astype(np.float16))
        keys = [f"{s:03d}{i:05d}" for i in range(rows)]
        table = pa.table(
            {
                "key": keys,
                "shard": [f"{stem}.tar"] * rows,
                "caption": [f"c {k}" for k in keys],
                "class": [str(i % 3) for i in range(rows)],
                "json": ["{}"] * rows,
            }
        )
        pq.write_table(table, emb / "metadata" / f"{stem}.parquet")
    return emb


@pytest.mark.slow
def test_ray_script_starts_a_two_node_cluster_and_runs_the_stage_on_it(tmp_path):
    from megaclass.pipelines.cluster import run_cluster

    emb = _tiny_embeddings(tmp_path)
    run = tmp_path / "run"
    job_id = 900000 + random.randint(0, 1499) * 1 + random.randint(0, 50) * 1500
    base = 41000 + 10 * random.randint(0, 500)
    cfg_d = {
        "run_dir": str(run),
        "embed": {"embeddings_dir": str(emb)},
        "cluster": {"k": 4, "feature": "image", "niter": 5},
        "assign": {"topk": 2, "concurrency": 2, "batch_size": 64},
        "slurm": {"nodes": 2, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1,
                  "python": PY, "ray_port_base": base, "ray_temp_root": "/tmp", "ray_start_timeout": 120},
    }  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg_d))
    cfg = load_config(tmp_path / "cfg.yaml")
    run_cluster(cfg)  # faiss, in-process: the centroids the assign stage needs
    script = tmp_path / "assign.sbatch"
    script.write_text(render(cfg, "assign", tmp_path / "cfg.yaml"))
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = slurm_standins.install(tmp_path / "bin")
    env = _clean_env(
        bin_dir, state, STANDIN_JOB_ID=str(job_id), STANDIN_NODELIST="127.0.0.1,localhost"
    )
    out = run / "slurm" / f"megaclass-assign-{job_id}.out"
    job = _Job(script, env, state)
    try:
        _wait_for(
            lambda: (state / "finished").exists(), 240, "the Ray job", [out, state / "slurmd.err"]
        )
    finally:
        job.kill_all()
        shutil.rmtree(f"/tmp/ray-{job_id}", ignore_errors=True)
    text = out.read_text()
    assert (state / "batch-0.rc").read_text() == "0", text[-5000:]
    assert "Ray cluster" in text and "2 node(s) up" in text
    sruns = [json.loads(x) for x in (state / "srun.log").read_text().splitlines()]
    starts = [s for s in sruns if s["cmd"][1:4] == ["-m", "ray.scripts.scripts", "start"]]
    assert [("--head" in s["cmd"], s["ntasks"]) for s in starts] == [(True, 1), (False, 1)]
    assert f"--port={base + 10 * (job_id % 1500)}" in starts[0]["cmd"]
    assert all(f"--temp-dir=/tmp/ray-{job_id}" in s["cmd"] for s in starts)
    summary = json.loads((run / "labels" / "_SUCCESS.json").read_text())
    assert summary["rows"] == 80 and summary["topk"] == 2
    # the labels the cluster's actors wrote are the brute-force top-2
    from megaclass.data.labels import read_labels

    cent = np.load(run / "cluster" / "centroids.npy")
    sha = (run / "cluster" / "centroids.sha256").read_text().strip()
    for stem in ("part-00000", "part-00001"):
        x = np.load(emb / "img_emb" / f"{stem}.npy").astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        want = np.argsort(-(x @ cent.T), axis=1, kind="stable")[:, :2]
        assert np.array_equal(
            read_labels(run / "labels" / f"{stem}.parquet", expected_sha=sha).labels, want
        )
    # the cluster was stopped: nothing of this job's Ray is left running
    for s in starts:
        assert not _alive(s["pid"])
    assert "stopping the Ray cluster" in text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}/status").exists()
        and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    )
