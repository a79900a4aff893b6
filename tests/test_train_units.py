"""Fast tests of the train stage's pieces: launcher env mapping, DeepSpeed config, schedule,
checkpoint listing/pruning/markers, head re-sharding, metrics truncation on resume."""

from __future__ import annotations

import json

import pytest
import torch
from megaclass.pipelines.config import ConfigError, TrainConfig
from megaclass.training import checkpoint as ckpt
from megaclass.training.engine import (
    WarmupCosine,
    build_ds_config,
    check_precision,
    map_launcher_env,
    remove_deepspeed_shm,
)
from megaclass.training.tracking import MetricsLogger


def test_launcher_env_mapping():
    # torch launchers (deepspeed/torchrun) set RANK/WORLD_SIZE: taken as is
    out = map_launcher_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert out == {"LOCAL_RANK": "1"}
    # srun: Slurm's variables mapped, master = first host of the node list, port from job id
    out = map_launcher_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[003-004,010]",
            "SLURM_JOB_ID": "1234",
        }
    )
    assert out["RANK"] == "5" and out["WORLD_SIZE"] == "8" and out["LOCAL_RANK"] == "1"
    assert out["MASTER_ADDR"] == "gpu003" and out["MASTER_PORT"] == str(20000 + 1234)
    out = map_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "MASTER_ADDR": "h"})
    assert "MASTER_ADDR" not in out
    # no launcher: a world of one on a free port
    out = map_launcher_env({})
    assert out["RANK"] == "0" and out["WORLD_SIZE"] == "1" and int(out["MASTER_PORT"]) > 0


def test_ds_config_from_train_config_and_user_merge(tmp_path):
    tc = TrainConfig(
        micro_batch_size=4, grad_accum=3, zero_stage=2, precision="bf16", grad_clip=0.5
    )
    c = build_ds_config(tc, world_size=2)
    assert c["train_batch_size"] == 24 and c["gradient_accumulation_steps"] == 3
    assert (
        c["zero_optimization"]["stage"] == 2 and c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    )
    assert c["gradient_clipping"] == 0.5
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps({"zero_optimization": {"overlap_comm": True}, "gradient_accumulation_steps": 2})
    )
    tc.ds_config = str(user)
    c = build_ds_config(tc, world_size=2)
    assert c["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert c["train_batch_size"] == 4 * 2 * 2  # recomputed from the merged values
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json"):
        build_ds_config(tc, 1)
    tc.ds_config = None
    tc.zero_stage = 3
    with pytest.raises(ConfigError, match="zero_stage"):
        build_ds_config(tc, 1)


def test_half_precision_refused_where_deepspeed_cannot_run_it(tmp_path):
    """fp16 on DeepSpeed's CPU accelerator needs oneDNN fp16 kernels (absent on most CPUs):
    refused up front with an error naming train.precision, from our key or a user's ds_config."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    fp16 = build_ds_config(TrainConfig(precision="fp16"), 1)
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"fp16": {"enabled": True}}))
    via_file = build_ds_config(TrainConfig(precision="fp32", ds_config=str(user)), 1)
    for ds in (fp16, via_file):
        if acc.is_fp16_supported():  # a GPU (or an fp16-capable CPU) runs it
            check_precision(ds, acc)
        else:
            with pytest.raises(ConfigError, match=r"train\.precision: fp16 is not supported"):
                check_precision(ds, acc)
    check_precision(build_ds_config(TrainConfig(precision="fp32"), 1), acc)
    if acc.is_bf16_supported():
        check_precision(build_ds_config(TrainConfig(precision="bf16"), 1), acc)


@pytest.mark.parametrize("unsampled", [False, True])
def test_trainer_head_optimizer_follows_head_update_unsampled(unsampled):
    """train.head_update_unsampled=false: AdamW + weight decay touch only the sampled rows."""
    from megaclass.training.heads import PartialFC
    from megaclass.training.trainer import make_head_optimizer

    tc = TrainConfig(head_update_unsampled=unsampled, lr=0.1, head_lr_mult=2.0, weight_decay=0.1)
    head = PartialFC(200, 8, sample_rate=0.1, margin="cosface", m=0.35, scale=16.0)
    opt = make_head_optimizer(head, tc)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    w0, sampled = head.weight.detach().clone(), set()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        head(torch.randn(4, 8, generator=g), torch.tensor([3, 5, 7, 3])).backward()
        sampled |= set(head.last_sample.class_index.tolist())
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = set((head.weight.detach() != w0).any(1).nonzero().squeeze(1).tolist())
    assert {3, 5, 7} <= changed
    assert changed == (set(range(200)) if unsampled else sampled) and len(sampled) <= 40


def test_warmup_cosine():
    f = WarmupCosine(warmup=4, total=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5)
    assert f(14) == pytest.approx(0.0) and f(100) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def _fake_ckpt(root, step, complete=True):
    d = root / ckpt.step_tag(step)
    (d / "head").mkdir(parents=True)
    if complete:
        (d / ckpt.MARKER).write_text(json.dumps({"step": step, "world_size": 2}))
    return d


def test_listing_and_pruning(tmp_path):
    for s in (10, 20, 30):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 25, complete=False)  # torn save from a killed run
    _fake_ckpt(tmp_path, 40, complete=False)  # newer, incomplete: ignored by resume
    (tmp_path / "step-0000010_universal").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10, 20, 30]
    assert ckpt.latest_complete(tmp_path).name == "step-0000030"
    removed = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-0000010", "step-0000025"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step-0000020", "step-0000030", "step-0000040"]


def test_plan_resume_refuses_other_world_size_without_reshard(tmp_path):
    _fake_ckpt(tmp_path / "train" / "ckpt", 5)
    root = tmp_path / "train" / "ckpt"
    plan = ckpt.plan_resume(root, rank=1, world=2)
    assert plan.step == 5 and plan.same_world and plan.head_file.name == "rank-00001-of-00002.pt"
    with pytest.raises(ckpt.CheckpointError, match="reshard"):
        ckpt.plan_resume(root, rank=0, world=3)
    assert ckpt.plan_resume(tmp_path / "nothing", 0, 1) is None


@pytest.mark.parametrize("old_w,new_w", [(2, 1), (2, 3), (3, 2)])
def test_reshard_head_files(tmp_path, old_w, new_w):
    """Row-sharded tensors are concatenated and re-split by the partition; replicated kept."""
    C, D, K = 7, 4, 2
    full_w = torch.randn(C * K, D)
    full_m = torch.randn(C * K, D)
    folder = tmp_path / ckpt.step_tag(3)
    for r, (s, c) in enumerate(ckpt.class_partition(C, old_w)):
        st = {
            "head": {"weight": full_w[s * K : (s + c) * K], "step": torch.tensor(3)},
            "head_opt": {
                "state": {
                    0: {"exp_avg": full_m[s * K : (s + c) * K], "row_step": torch.full((c * K,), 3)}
                },
                "param_groups": [{"lr": 0.1, "params": [0]}],
            },
            "head_sched": {"last_epoch": 3},
            "head_rng": {},
            "rng": {},
            "loader": {"rank": r},
            "trainer": {"step": 3},
        }
        (folder / "head").mkdir(parents=True, exist_ok=True)
        torch.save(st, folder / "head" / ckpt.shard_name(r, old_w))
    (folder / ckpt.MARKER).write_text(
        json.dumps({"step": 3, "world_size": old_w, "num_classes": C})
    )
    ckpt.reshard(folder, new_w)
    rec = json.loads((folder / f"reshard-ws{new_w}.json").read_text())
    assert rec["universal"] is False and rec["ds_tag"] == folder.name
    parts = [
        torch.load(folder / rec["head_dir"] / ckpt.shard_name(r, new_w), weights_only=True)
        for r in range(new_w)
    ]
    assert torch.equal(torch.cat([p["head"]["weight"] for p in parts]), full_w)
    assert torch.equal(torch.cat([p["head_opt"]["state"][0]["exp_avg"] for p in parts]), full_m)
    for p, (_, c) in zip(parts, ckpt.class_partition(C, new_w)):
        assert p["head"]["weight"].shape == (c * K, D) and int(p["head"]["step"]) == 3
    plan = ckpt.plan_resume(tmp_path, rank=new_w - 1, world=new_w)
    assert plan.head_file.is_file() and not plan.same_world


def test_reshard_refuses_incomplete(tmp_path):
    d = _fake_ckpt(tmp_path, 1, complete=False)
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.reshard(d, 1)


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    st = ckpt.rng_state()
    torch.save(st, tmp_path / "r.pt")
    a = (random.random(), np.random.rand(), torch.rand(1))
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True))
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_metrics_truncated_to_resumed_step(tmp_path):
    m = MetricsLogger(tmp_path, enabled=True)
    rec = dict(loss=1.0, lr=0.1, samples_per_s=1.0, data_wait_share=0.0)
    for s in (1, 2, 3, 4):
        m.log({"step": s, **rec})
    m.close()
    m = MetricsLogger(tmp_path, enabled=True, resume_step=2)  # killed after step 4, resumed at 2
    m.log({"step": 3, **rec, "loss": float("nan")})
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[-1]["loss"] is None
    assert any((tmp_path / "tb").iterdir())


def test_train_loader_refuses_labels_from_other_centroids(tmp_path, tiny_dataset):
    """The trainer's loader expects the sha of RUN/cluster/centroids; stale sidecars fail."""
    import shutil

    from megaclass.data.labels import LabelShaMismatchError
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.train import make_job
    from megaclass.training.engine import DistEnv
    from megaclass.training.trainer import build_loader

    run = tmp_path / "run"
    shutil.copytree(tiny_dataset["labels_dir"], run / "labels")
    (run / "cluster").mkdir()
    shards = "::".join(tiny_dataset["shards"])
    cfg = load_config(None, [f"run_dir={run}", f"data.shards={shards}", "data.num_workers=0",
                             "data.image_size=16", "train.micro_batch_size=4"])  # fmt: skip
    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    tf = lambda im: torch.zeros(3, 16, 16)  # noqa: E731
    (run / "cluster" / "centroids.sha256").write_text(tiny_dataset["sha"])
    batch = next(iter(build_loader(make_job(cfg), env, tf)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].shape[0] == 4
    (run / "cluster" / "centroids.sha256").write_text("0123abcd")  # re-clustered since
    with pytest.raises(LabelShaMismatchError, match="0123abcd"):
        next(iter(build_loader(make_job(cfg), env, tf)))


def test_launched_ranks_die_with_a_killed_driver(tmp_path):
    """The train stage's launcher child is tied to the driver: SIGKILL the driver and the
    child (standing in for torchrun) gets SIGTERM instead of training on unattended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    child = (
        "import os, pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
        "time.sleep(120)\n"
    )
    driver = (
        "import sys\n"
        "from megaclass.pipelines.train import run_tied_to_parent\n"
        f"run_tied_to_parent([sys.executable, '-c', {child!r}])\n"
    )
    d = subprocess.Popen([sys.executable, "-c", driver])
    try:
        deadline = time.time() + 60
        while not pid_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        child_pid = int(pid_file.read_text())
        os.kill(d.pid, signal.SIGKILL)
        d.wait()

        def alive(pid: int) -> bool:
            try:
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return False
            return state not in ("Z", "X")

        deadline = time.time() + 20
        while alive(child_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(child_pid), "the launcher child outlived its killed driver"
    finally:
        if d.poll() is None:
            d.kill()


def test_shutdown_distributed_leaves_the_group(tmp_path):
    """The launcher entry destroys its process group before exiting (a live gloo group at
    interpreter exit can abort a rank that already finished: status -6)."""
    import torch.distributed as dist
    from megaclass.training.engine import shutdown_distributed

    shutdown_distributed()  # no group: a no-op, not an error
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    assert dist.is_initialized()
    shutdown_distributed()
    assert not dist.is_initialized()


def test_remove_deepspeed_shm_takes_only_that_jobs_files(tmp_path):
    """The names DeepSpeed's CPU all-reduce gives its /dev/shm workspaces
    (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>): a job's files go, by port, and by
    rank for one rank; another port's or another user's stay."""
    import os

    uid = os.getuid()
    names = [
        f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29500_0",
        f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29500_1",
        f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29501_0",
        f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_29500_0",
        "unrelated_29500_0",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    gone = remove_deepspeed_shm(29500, "127.0.0.1", 1, shm_dir=tmp_path)
    assert [p.name for p in gone] == [names[1]]
    gone = remove_deepspeed_shm("29500", shm_dir=tmp_path)
    assert [p.name for p in gone] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
