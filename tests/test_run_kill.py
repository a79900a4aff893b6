"""``megaclass run`` on the demo config, SIGKILLed during each stage in turn and restarted.

One run directory goes through the pipeline with a kill in every stage — embed, cluster,
assign, train, eval, report, in that order — and a restart after each; a second run directory
runs uninterrupted. The numbers of both ``report.json`` files must be identical.

How a kill is made (a job whose processes all die at once, as when Slurm cancels a job or
the machine kills its cgroup): the run is started in its own session; at the kill moment the
whole process family — the run, the Ray processes it started (their own process groups, same
session), the torchrun agent and the training ranks (torchrun puts them in new sessions, so a
``killpg`` of the run's group would miss them) — is frozen with SIGSTOP, the run directory is
checked to show the stage really is half done, then everything gets SIGKILL. Where a stage is
too quick to catch from outside (k-means on a few hundred points, assigning a shard), the
stage's own fault point (``MEGACLASS_FAULT``, clustering/fault.py) SIGKILLs the driver at a
chosen checkpoint and the rest of the family is killed right after.

The demo config is scaled down by overrides only (fewer, smaller shards; k = 8; 16 training
steps with a checkpoint every 4), so the test takes ≈ 3 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
STEPS = 16

# report.json keys that measure time or name paths: everything else must match exactly
VOLATILE = {
    "generated_at", "run_dir", "config", "plots", "headline", "wall_s", "seconds",
    "seconds_kmeans", "samples_per_s", "rows_per_second", "points_per_s", "images_per_s",
    "samples_per_s_mean", "data_wait_share_mean", "embeddings_dir", "export", "resumed_from",
    "checkpoints",
    "shards_embedded",  # shards embedded by the last embed pass (the others were reused)
}  # fmt: skip


def _tiny_overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.shards={data}/train/demo-{{000000..000004}}.tar",
        f"data.eval_shards={data}/eval/demo-{{000000..000002}}.tar",
        "data.image_size=64",
        "data.shuffle_buffer=64",
        "embed.image_size=128",
        "embed.batch_size=16",
        "cluster.k=8",
        "cluster.niter=10",
        "train.embed_dim=32",
        f"train.steps={STEPS}",
        "train.micro_batch_size=8",
        "train.warmup_steps=2",
        "train.ckpt_every=4",
        "train.keep_last=3",
        "train.log_every=1",
        "eval.compact_dims=[16]",
        "eval.batch_size=32",
    ]


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


def _procs() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, session) of every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2 :].split()
        out[int(d)] = (rest[0], int(rest[1]), int(rest[3]))
    return out


def _family(root: int) -> set[int]:
    """The run and every process it started: its session plus all descendants."""
    procs = _procs()
    fam = {p for p, (_, _, sid) in procs.items() if sid == root}
    if root in procs:
        fam.add(root)
    grew = True
    while grew:
        grew = False
        for p, (_, ppid, _) in procs.items():
            if ppid in fam and p not in fam:
                fam.add(p)
                grew = True
    return {p for p in fam if procs[p][0] != "Z"}


def _freeze(root: int) -> set[int]:
    """SIGSTOP the whole family until no new process appears; wait until all are stopped."""
    stopped: set[int] = set()
    while True:
        new = _family(root) - stopped
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped |= new
    deadline = time.time() + 10
    while time.time() < deadline:
        procs = _procs()
        if all(p not in procs or procs[p][0] in "TtZX" for p in stopped):
            return stopped
        time.sleep(0.005)
    raise AssertionError("the run's processes did not stop")


def _kill_all(pids: set[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Attempt:
    """One start of ``megaclass run`` (own session, log in a file)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self.fh = open(log, "w")
        self.p = subprocess.Popen(
            [PY, "-m", "megaclass.pipelines.run", str(DEMO), *args],
            cwd=REPO, env=env, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def tail(self, n: int = 4000) -> str:
        self.fh.flush()
        return self.log.read_text()[-n:]

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not cond():
            if self.p.poll() is not None:
                raise AssertionError(
                    f"run ended (rc {self.p.returncode}) before {what}:\n{self.tail()}"
                )
            if time.time() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.005)

    def kill(self) -> None:
        _kill_all(_freeze(self.p.pid))
        self.finish()

    def finish(self) -> None:
        """After the run process ended: kill what it left behind, check nothing survives."""
        self.p.wait(timeout=60)
        _kill_all(_family(self.p.pid))
        deadline = time.time() + 30
        while _family(self.p.pid) and time.time() < deadline:
            time.sleep(0.05)
        assert not _family(self.p.pid), f"processes survived the kill: {_family(self.p.pid)}"
        self.fh.close()


def _open_files(pid: int) -> list[str]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


# --------------------------------------------------------------------------------------
# the report numbers
# --------------------------------------------------------------------------------------


def _numbers(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    return x


def _diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{where}.{k}")
        return out
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _torn_temporary(folder: Path, name: str) -> None:
    """What SIGKILL during an atomic write leaves: a partial file under a ``.tmp-`` name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".tmp-{name}.k1ll3d").write_bytes(b"\x93NUMPY half-written")


def _n_json(folder: Path) -> int:
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")}


@pytest.mark.slow
def test_run_killed_in_every_stage_and_restarted_reports_the_same_numbers(tmp_path):
    from megaclass.data.builders import build_dataset

    data = tmp_path / "data"
    summary = build_dataset(
        "demo", str(data), seed=0, n_classes=10, per_class=20, held_out_fraction=0.3, maxcount=28
    )
    assert summary["splits"]["train"]["shards"] == 5 and summary["splits"]["eval"]["shards"] == 3
    env = {k: v for k, v in os.environ.items() if k not in ("MEGACLASS_FAULT", "RAY_ADDRESS")}
    env["TQDM_DISABLE"] = "1"
    logs = tmp_path / "logs"
    logs.mkdir()

    # the reference: one uninterrupted run
    ref = Attempt(_tiny_overrides(data, tmp_path / "ref"), logs / "ref.log", env)
    assert ref.p.wait(timeout=600) == 0, ref.tail()
    ref.finish()
    ref_report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert ref_report["missing"] == [], ref_report["missing"]

    run = tmp_path / "run"
    args = _tiny_overrides(data, run)
    n = iter(range(1, 100))

    def start(fault: str | None = None) -> Attempt:
        e = dict(env, **({"MEGACLASS_FAULT": fault} if fault else {}))
        return Attempt(args, logs / f"attempt-{next(n)}.log", e)

    # 1. embed: killed once the first shard is written (5 shards)
    a = start()
    a.wait_for("an embedded shard", lambda: _n_json(run / "embed" / "_done") >= 1)
    frozen = _freeze(a.p.pid)
    done_before = _mtimes(run / "embed" / "_done")
    assert 1 <= len(done_before) < 5 and not (run / "embed" / "_SUCCESS.json").exists()
    _kill_all(frozen)
    a.finish()

    # 2. cluster: the driver dies right after k-means iteration 5 of 10 is checkpointed
    a = start("kmeans_iter:5")
    assert a.p.wait(timeout=600) == -signal.SIGKILL, a.tail()
    a.finish()
    assert (run / "embed" / "_SUCCESS.json").exists()
    assert all(_mtimes(run / "embed" / "_done")[k] == t for k, t in done_before.items())
    assert sorted(p.name for p in (run / "cluster" / "state").glob("iter-*"))[-1].startswith(
        "iter-0005"
    )
    assert not (run / "cluster" / "centroids.npy").exists()
    assert not (run / "cluster" / "_SUCCESS.json").exists()
    _torn_temporary(run / "cluster" / "state", "iter-0000006.npz")

    # 3. assign: the driver is killed once 2 of the 5 label files are written
    a = start("assign_done:2")
    assert a.p.wait(timeout=600) == -signal.SIGKILL, a.tail()
    a.finish()
    assert "resuming after iteration 5" in a.log.read_text()
    assert (run / "cluster" / "_SUCCESS.json").exists()
    labels_before = _mtimes(run / "labels" / "_done")
    assert len(labels_before) == 2 and not (run / "labels" / "_SUCCESS.json").exists()
    _torn_temporary(run / "labels", "demo-000002.parquet")

    # 4. train: frozen as soon as the step-8 checkpoint folder appears (usually mid-save)
    a = start()
    ck8 = run / "train" / "ckpt" / "step-0000008"
    a.wait_for("the step-8 checkpoint", ck8.exists)
    frozen = _freeze(a.p.pid)
    ranks = [p for p in frozen if "megaclass.pipelines.train" in _cmdline(p)]
    ranks = [p for p in ranks if "torch.distributed.run" not in _cmdline(p)]
    assert len(ranks) == 2, "the two training ranks are not in the run's process family"
    half_written = not (ck8 / "COMPLETE.json").exists()
    assert not (run / "train" / "_SUCCESS.json").exists()
    assert max(json.loads(x)["step"] for x in (run / "train" / "metrics.jsonl").open()) < STEPS
    _kill_all(frozen)
    a.finish()
    assert all(_mtimes(run / "labels" / "_done")[k] == t for k, t in labels_before.items())
    _torn_temporary(run / "train", "metrics.jsonl")

    # 5. eval: frozen while the evaluation shards are being read (teacher and student)
    a = start()
    eval_dir = str(data / "eval")
    a.wait_for(
        "eval reading its shards", lambda: any(f.startswith(eval_dir) for f in _open_files(a.p.pid))
    )
    frozen = _freeze(a.p.pid)
    assert (run / "train" / "_SUCCESS.json").exists()
    assert not (run / "eval" / "metrics.json").exists()
    _kill_all(frozen)
    a.finish()
    _torn_temporary(run / "eval" / "features", "teacher.npz")
    resumed = json.loads((run / "train" / "_SUCCESS.json").read_text())["resumed_from"]
    assert resumed and Path(resumed).name == ("step-0000004" if half_written else "step-0000008")

    # 6. report: frozen once its first plot is written
    a = start()
    a.wait_for("a report plot", lambda: any((run / "plots").glob("*.png")))
    frozen = _freeze(a.p.pid)
    assert (run / "eval" / "_SUCCESS.json").exists()
    assert not (run / "report.json").exists()
    _kill_all(frozen)
    a.finish()
    _torn_temporary(run, "report.json")

    # 7. started again: finishes
    a = start()
    assert a.p.wait(timeout=600) == 0, a.tail()
    a.finish()
    report = json.loads((run / "report.json").read_text())
    assert report["missing"] == []
    diffs = _diff(_numbers(ref_report), _numbers(report))
    assert not diffs, "report numbers differ from the uninterrupted run:\n" + "\n".join(diffs)
    # no half-written temporaries are left once the run completed (the real kills' and the
    # torn ones put in after each kill)
    stray = [str(p.relative_to(run)) for p in run.rglob(".tmp-*")]
    assert not stray, stray


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
