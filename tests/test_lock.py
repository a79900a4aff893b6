"""One process per run directory (core/lock.py), and training ranks that die with their launcher.

Real processes throughout: holders are separate Python processes that take the real flock and
are SIGKILLed; training is real torchrun + DeepSpeed (gloo, CPU) on tiny shards. The one
stand-in is a file system without flock (the call fails with ENOLCK, as on NFS without a lock
daemon), which this machine does not have.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml
from megaclass.core import lock
from megaclass.core.lock import RunDirLockedError

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from megaclass.core import lock
    root = sys.argv[1]
    lk = lock.acquire(root, "holder for the test")
    if len(sys.argv) > 2:  # also start a "rank" that inherits the lock, as _launch_local does
        env = dict(os.environ, **{lock.TOKEN_ENV: lk.env_value()})
        rank = subprocess.Popen([sys.executable, "-c", sys.argv[2], root], env=env)
        while not os.path.exists(os.path.join(root, "rank-ready")):
            time.sleep(0.05)
        print("rank", rank.pid, flush=True)
    print("held", flush=True)
    time.sleep(600)
    """
)

RANK = textwrap.dedent(
    """
    import sys, time
    from megaclass.core import lock
    from megaclass.core.errors import UserError
    root = sys.argv[1]
    try:
        with lock.for_process(root) as held:
            assert held is None  # a rank of the holder takes no exclusive lock
            open(root + "/rank-ready", "w").close()
            time.sleep(600)
    except UserError as e:
        print("refused:", e, flush=True)
        sys.exit(2)
    """
)


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
    )


def _wait_line(p: subprocess.Popen, prefix: str) -> str:
    while True:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before {prefix!r}: {p.stderr.read()[-3000:]}")
        if line.startswith(prefix):
            return line.strip()


def _kill(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(timeout=30)


def test_second_holder_refused_naming_the_holder_then_takes_over_after_kill(tmp_path, caplog):
    root = tmp_path / "run"
    holder = _start(["-c", HOLDER, str(root)])
    try:
        _wait_line(holder, "held")
        with pytest.raises(RunDirLockedError) as ei:
            lock.acquire(root)
        msg = str(ei.value)
        assert f"pid {holder.pid} on host {socket.gethostname()} since 20" in msg, msg
        assert "holder for the test" in msg and str(root.resolve()) in msg
        # the command line: one line, exit status 2, no traceback
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"run_dir": str(root)}))
        res = subprocess.run(
            [PY, "-m", "megaclass.pipelines.cli", "cluster", str(cfg)],
            capture_output=True, text=True, cwd=REPO, timeout=300,
        )  # fmt: skip
        assert res.returncode == 2, res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        lines = [x for x in res.stderr.splitlines() if x.startswith("megaclass")]
        assert len(lines) == 1 and lines[0].startswith("megaclass: run directory "), res.stderr
        assert f"in use by pid {holder.pid} on host" in res.stderr
        assert not (root / "cluster").exists()  # refused before the stage touched anything
    finally:
        _kill(holder)
    # the kernel released the flock; the record of the dead holder is reported and replaced
    with caplog.at_level(logging.WARNING, logger="megaclass.core.lock"):
        lk = lock.acquire(root, "second")
    try:
        assert f"taking over the lock left by pid {holder.pid}" in caplog.text
        rec = lock.read_holder(root)
        assert rec is not None and rec.pid == os.getpid() and rec.command == "second"
    finally:
        lock.release(lk)
    assert lock.read_holder(root) is None and (root / lock.LOCK_NAME).exists()


def test_reentrant_within_a_process_and_refused_across_processes(tmp_path):
    root = tmp_path / "run"
    probe = "import sys; from megaclass.core import lock; lock.acquire(sys.argv[1])"
    with lock.exclusive(root, "outer") as outer:
        with lock.exclusive(root / ".." / "run", "inner") as inner:  # another spelling
            assert inner is outer and outer.count == 2
        assert lock.held(root) is outer and outer.count == 1
        res = subprocess.run([PY, "-c", probe, str(root)], capture_output=True, text=True)
        assert res.returncode != 0 and "RunDirLockedError" in res.stderr
        assert f"pid {os.getpid()}" in res.stderr and "(outer)" in res.stderr
    assert lock.held(root) is None and lock.read_holder(root) is None
    res = subprocess.run([PY, "-c", probe, str(root)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_ranks_of_a_killed_holder_are_waited_for_and_orphans_refuse(tmp_path, monkeypatch):
    root = tmp_path / "run"
    holder = _start(["-c", HOLDER, str(root), RANK])
    rank_pid = 0
    try:
        rank_pid = int(_wait_line(holder, "rank").split()[1])
        _wait_line(holder, "held")
        holder.kill()  # the driver dies; its rank lives on (it would be checkpointing)
        holder.wait(timeout=30)
        monkeypatch.setattr(lock, "RANKS_WAIT_S", 1.0)
        t0 = time.monotonic()
        with pytest.raises(RunDirLockedError, match=f"ranks started by pid {holder.pid} .* still"):
            lock.acquire(root)
        assert time.monotonic() - t0 >= 1.0
        assert lock.read_holder(root) is None  # the refused starter left no record
        # a rank started with the dead holder's token does not train
        env = dict(os.environ, **{lock.TOKEN_ENV: f"deadbeef@{root.resolve()}"})
        late = subprocess.run([PY, "-c", RANK, str(root)], capture_output=True, text=True,
                              env=env, timeout=120)  # fmt: skip
        assert late.returncode == 2 and "no longer holds its lock" in late.stdout, late.stderr
    finally:
        if rank_pid:
            os.kill(rank_pid, signal.SIGKILL)
        _kill(holder)
    deadline = time.monotonic() + 30
    while True:  # the rank's exit releases the rank lock
        try:
            with lock.exclusive(root):
                break
        except RunDirLockedError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_rank_policy_of_an_external_launcher(tmp_path, monkeypatch):
    root = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    with lock.for_process(root) as lk:
        assert lk is None and lock.held(root) is None  # only rank 0 holds the lock
    monkeypatch.setenv("RANK", "0")
    with lock.for_process(root, "rank 0") as lk:
        assert lk is not None and lock.read_holder(root).command == "rank 0"
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "3")
    with lock.for_process(root) as lk:
        assert lk is None


def _foreign_record(root: Path, host: str, pid: int = 4242, token: str = "f" * 32) -> dict:
    now = time.time()
    rec = {"host": host, "pid": pid, "started": now - 60, "command": "megaclass run x.yaml",
           "token": token, "heartbeat": now}  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    (root / lock.RECORD_NAME).write_text(json.dumps(rec))
    return rec


def test_record_from_another_host_alive_is_refused_stale_is_taken_over(tmp_path, monkeypatch):
    """Locks that do not reach other hosts (NFS local_lock, Lustre localflock): the flock is
    free here, and the heartbeat of the other host's record decides."""
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(lock, "STALE_AFTER_S", 1.0)
    root = tmp_path / "run"
    rec = _foreign_record(root, "node-b.example")
    stop = threading.Event()

    def beat() -> None:  # the other host's holder, alive
        while not stop.wait(0.1):
            (root / lock.RECORD_NAME).write_text(json.dumps({**rec, "heartbeat": time.time()}))

    t = threading.Thread(target=beat)
    t.start()
    try:
        with pytest.raises(RunDirLockedError) as ei:
            lock.acquire(root)
    finally:
        stop.set()
        t.join()
    msg = str(ei.value)
    assert "pid 4242 on host node-b.example" in msg and "do not reach across hosts" in msg
    # its heartbeat stops (the node died): taken over after STALE_AFTER_S
    _foreign_record(root, "node-b.example")
    t0 = time.monotonic()
    with lock.exclusive(root) as lk:
        assert time.monotonic() - t0 >= 0.9
        assert lock.read_holder(root).token == lk.token
        beat0 = lock.read_holder(root).heartbeat
        time.sleep(0.5)
        assert lock.read_holder(root).heartbeat > beat0  # our own heartbeat moves


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    """Stand-in for a file system without flock: flock fails with ENOLCK, as there."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    root = tmp_path / "run"
    alive = subprocess.Popen([PY, "-c", "import time; time.sleep(600)"])
    try:
        _foreign_record(root, socket.gethostname(), pid=alive.pid)
        with pytest.raises(RunDirLockedError, match=f"pid {alive.pid} .*remove .*lock.json"):
            lock.acquire(root)
    finally:
        _kill(alive)
    with lock.exclusive(root) as lk:  # its pid is gone: stale
        assert not lk.flocked and lock.read_holder(root).pid == os.getpid()
    assert lock.read_holder(root) is None


def test_a_torn_or_foreign_record_is_no_holder(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    for text in ("{not json", "[1, 2]", '{"host": "h", "pid": "x", "started": 1, "token": "t"}'):
        (root / lock.RECORD_NAME).write_text(text)
        assert lock.read_holder(root) is None
    with lock.exclusive(root):
        assert lock.read_holder(root).pid == os.getpid()


# ======================================================================================
# Real training: ranks die with a killed torchrun; a second `megaclass run` is refused
# ======================================================================================


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train import write_shards

    return write_shards(tmp_path_factory.mktemp("shards"))


def _train_run(root: Path, shards, **train) -> Path:
    from test_train import _make_run

    return _make_run(root, shards, "run", **train)


def _train_env() -> dict[str, str]:
    from test_train import _env

    return _env()


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _metrics_steps(run: Path) -> list[int]:
    path = run / "train" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]


def _wait_until(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"ended (rc {proc.returncode}) before {what}:\n"
                                 f"{log.read_text()[-4000:]}")  # fmt: skip
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_ranks_die_with_a_sigkilled_torchrun_and_checkpoint_on_the_way(tmp_path, train_shards):
    from megaclass.core.net import free_port

    run = _train_run(tmp_path, train_shards, steps=400, ckpt_every=1000, log_every=1)
    log = tmp_path / "torchrun.log"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "megaclass.pipelines.train", str(run / "cfg.yaml")]  # fmt: skip
    with open(log, "wb") as out:
        agent = subprocess.Popen(cmd, env=_train_env(), stdout=out, stderr=subprocess.STDOUT,
                                 cwd=REPO, start_new_session=True)  # fmt: skip
    ranks: list[int] = []
    try:
        _wait_until(lambda: len(_metrics_steps(run)) >= 2, "two logged steps", agent, log)
        ranks = _children(agent.pid)
        assert len(ranks) == 2, ranks
        for r in ranks:  # torchrun starts each rank in a session of its own
            assert os.getsid(r) != os.getsid(agent.pid)
        os.kill(agent.pid, signal.SIGKILL)  # the agent only, not the ranks
        agent.wait(timeout=30)
        deadline = time.monotonic() + 120
        while any(_alive(r) for r in ranks):
            assert time.monotonic() < deadline, f"ranks still alive 120 s after the kill: {ranks}"
            time.sleep(0.2)
        # the SIGTERM path: a checkpoint at the step reached, no completion marker
        steps = _metrics_steps(run)
        assert 2 <= len(steps) and steps[-1] < 400
        done = sorted((run / "train" / "ckpt").glob("step-*/COMPLETE.json"))
        assert done and int(done[-1].parent.name.split("-")[1]) == steps[-1], (done, steps)
        assert not (run / "train" / "_SUCCESS.json").exists()
        # and nothing writes any more
        before = _snapshot(run)
        time.sleep(3)
        assert _snapshot(run) == before
    finally:
        for pid in [agent.pid, *ranks]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_second_run_refused_while_the_first_trains_then_takes_over_after_kill(
    tmp_path, train_shards
):
    run = _train_run(tmp_path, train_shards, steps=1000, ckpt_every=5000, log_every=1, nproc=2)
    cfg = yaml.safe_load((run / "cfg.yaml").read_text())
    cfg["assign"] = {"labels_dir": str(run / "labels")}  # embed, cluster, assign: skipped
    (run / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = _train_env()
    log1 = tmp_path / "first.log"
    with open(log1, "wb") as out:
        first = subprocess.Popen(
            [PY, "-m", "megaclass.pipelines.run", str(run / "cfg.yaml"), "--stages", "regroup,train"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )  # fmt: skip
    family: list[int] = []
    try:
        _wait_until(lambda: len(_metrics_steps(run)) >= 1, "training", first, log1)
        # the second `megaclass run`: one line naming the holder, exit status 2, nothing touched
        before = _metrics_steps(run)
        second = subprocess.run([PY, "-m", "megaclass.pipelines.cli", "run", str(run / "cfg.yaml")],
                                env=env, capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        head = f"megaclass: run directory {run.resolve()} is in use by pid {first.pid} on host"
        lines = [x for x in second.stderr.splitlines() if x.startswith("megaclass")]
        assert len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"{head} {socket.gethostname()} since "), lines
        assert "pipelines.run" in second.stderr  # the holder's command
        assert len(_metrics_steps(run)) >= len(before)  # the first kept training
        # SIGKILL the first run's process group (driver + torchrun): its ranks, in sessions
        # of their own, must stop too (after a checkpoint), then a new run takes over
        torchrun = _children(first.pid)
        family = [first.pid, *torchrun, *(r for t in torchrun for r in _children(t))]
        assert len(family) == 4, family  # driver, torchrun, two ranks
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        log3 = tmp_path / "third.log"
        with open(log3, "wb") as out:
            third = subprocess.run(
                [PY, "-m", "megaclass.pipelines.run", str(run / "cfg.yaml"), "--stages",
                 "regroup,train"],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, timeout=900,
            )  # fmt: skip
        text = log3.read_text()
        assert third.returncode == 0, text[-4000:]
        assert f"taking over the lock left by pid {first.pid}" in text
        assert not any(_alive(p) for p in family)
        summary = json.loads((run / "train" / "_SUCCESS.json").read_text())
        assert summary["steps"] == 1000
        assert summary.get("resumed_from"), summary  # from the killed ranks' last checkpoint
        assert lock.read_holder(run) is None
    finally:
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
