"""Elastic resume end to end: a float64 run on 2 ranks, resumed mid-epoch on 1 and on 4 ranks,
equals the uninterrupted 2-rank run (loss curve, final weights ≤ 1e-9 relative, batches.jsonl).

Real launches (``megaclass.pipelines.train`` with ``train.nproc``: torchrun, DeepSpeed on CPU,
gloo). The data cover an epoch boundary (4 shards × 8 samples = 4 steps of 8) and the resume
point is mid-epoch (step 3). No random layers: the tiny ViT has no dropout, the head scores
every class (sample_rate 1), and the augmentations are seeded per sample by the loader. The
2-rank run's step-3 checkpoint is what a stop at step 3 writes (a signal takes the same save
path); the resumed copies start from it with the other world size's split of the same global
batch of 8 (1 rank: `train.nproc=1` only — grad_accum becomes 2 by itself; 4 ranks: micro
batch 2), re-shard automatically, and first drop the copied metrics/batches lines after step 3.
"""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from megaclass.data.labels import file_sha256
from megaclass.data.writer import ShardWriter
from PIL import Image

_T = runpy.run_path(str(Path(__file__).with_name("test_train.py")), run_name="test_train_helpers")
PY, REPO, _check, _env, _heads, _metrics = (
    _T[k] for k in ("PY", "REPO", "_check", "_env", "_heads", "_metrics")
)
write_label_sidecars, write_train_config = _T["write_label_sidecars"], _T["write_train_config"]

NCLS, STEPS, STOP = 8, 6, 3
SPLIT = {2: (4, 1), 1: (4, 2), 4: (2, 1)}  # ranks: (micro_batch_size, grad_accum); global 8
OVERRIDES = {2: [], 1: [], 4: ["train.micro_batch_size=2"]}  # 1 rank: grad_accum 1 → 2 by itself
TOL = 1e-9


def _dataset(root: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    keys: dict[str, list[tuple[str, int]]] = {}
    with ShardWriter(root / "shards", prefix="el-", maxcount=8, image_ext="png") as w:
        for i in range(32):
            c = i % NCLS
            arr = rng.integers(0, 255, (36, 36, 3)).astype(np.uint8)
            key = f"{i:06d}"
            w.write(key, Image.fromarray(arr), f"class {c}", {"class": str(c)})
            keys.setdefault(f"el-{i // 8:06d}", []).append((key, c))
    return root / "shards", keys


def _make_run(root: Path) -> Path:
    shard_dir, keys = _dataset(root)
    run = root / "run"
    (run / "cluster").mkdir(parents=True)
    np.save(run / "cluster" / "centroids.npy", np.ones((NCLS, 4), np.float32))
    sha = file_sha256(run / "cluster" / "centroids.npy")
    write_label_sidecars(run, keys, sha, top=1, ncls=NCLS)
    micro, accum = SPLIT[2]
    write_train_config(
        run / "cfg.yaml",
        run,
        str(shard_dir / "el-{000000..000003}.tar"),
        shuffle_buffer=4,
        cluster={"k": NCLS},
        train=dict(
            objective="pfc",
            model="open_clip:megaclass-tiny-vit",
            embed_dim=16,
            precision="fp64",
            optimizer="sgd",
            lr=0.02,
            weight_decay=0.01,
            warmup_steps=1,
            grad_clip=50.0,
            sample_rate=1.0,
            scale=16.0,
            margin_m=0.2,
            steps=STEPS,
            ckpt_every=STOP,
            log_every=1,
            keep_last=3,
            nproc=2,
            micro_batch_size=micro,
            grad_accum=accum,
            log_batch_keys=True,
        ),  # fmt: skip
    )
    return run


def _train(cfg: Path, world: int) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "megaclass.pipelines.train", str(cfg), f"train.nproc={world}"]
    cmd += OVERRIDES[world]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=500, cwd=REPO)
    _check(res)
    return res


def _weights(run: Path, world: int) -> dict[str, torch.Tensor]:
    ck = run / "train" / "ckpt" / f"step-{STEPS:07d}"
    out = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    out = {k: v for k, v in out.items() if v.is_floating_point()}
    out["head"] = torch.cat([h["head"]["weight"] for h in _heads(ck, world)])
    return out


def test_config_keys_of_the_split(tmp_path):
    """The ranks must divide train.virtual_streams (named); fp64 needs ZeRO 0; a resume may
    change how the global batch is split over ranks, nothing else, without --force."""
    from megaclass.core.config import ConfigError
    from megaclass.core.rundir import ConfigChangedError, RunDir
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.train import write_run_config

    run = f"run_dir={tmp_path / 'run'}"
    with pytest.raises(ConfigError, match="train.virtual_streams: 64 is not divisible by train.n"):
        load_config(None, [run, "train.nproc=3"])
    with pytest.raises(ConfigError, match="train.precision: fp64 runs with train.zero_stage=0"):
        load_config(None, [run, "train.precision=fp64", "train.zero_stage=1"])
    rd = RunDir(tmp_path / "run")
    write_run_config(rd, load_config(None, [run, "train.nproc=2", "train.micro_batch_size=4"]))
    (rd.train / "ckpt").mkdir(parents=True)
    (rd.train / "ckpt" / "x").write_text("output")  # the run has output: changes are refused
    assert rd.has_stage_output() is not None
    write_run_config(rd, load_config(None, [run, "train.nproc=1", "train.grad_accum=2",
                                            "train.micro_batch_size=4"]))  # fmt: skip
    saved = yaml.safe_load(rd.config_path.read_text())["train"]
    assert saved["nproc"] == 1 and saved["grad_accum"] == 2
    with pytest.raises(ConfigChangedError, match="lr"):
        write_run_config(rd, load_config(None, [run, "train.nproc=4", "train.lr=0.5"]))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = _make_run(tmp_path_factory.mktemp("elastic"))
    _train(run / "cfg.yaml", 2)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_resume_at_another_world_size_equals_uninterrupted(full_run, tmp_path, world):
    ref = full_run
    run = tmp_path / "run"
    shutil.copytree(ref, run, symlinks=True)
    cfg = yaml.safe_load((run / "cfg.yaml").read_text())
    cfg["run_dir"] = str(run)
    (run / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # the state a stop at step 3 leaves: its checkpoint, no later one, no _SUCCESS
    shutil.rmtree(run / "train" / "ckpt" / f"step-{STEPS:07d}")
    for p in ("_SUCCESS.json", "export"):
        shutil.rmtree(run / p, ignore_errors=True)
        (run / "train" / p).unlink(missing_ok=True)
    (run / ".lock.json").unlink(missing_ok=True)
    res = _train(run / "cfg.yaml", world)
    assert "re-sharding it now" in res.stderr  # automatic, logged
    micro, accum = SPLIT[world]
    assert f"train.grad_accum 1 -> {accum}" in res.stderr or accum == 1
    ck = run / "train" / "ckpt" / f"step-{STOP:07d}"
    assert (ck / f"reshard-ws{world}.json").is_file() and (ck / "loader.json").is_file()
    success = json.loads((run / "train" / "_SUCCESS.json").read_text())
    assert success["world_size"] == world and success["resumed_from"].endswith(ck.name)

    # the same global batches, in the same order, as the uninterrupted 2-rank run
    lines = (run / "train" / "batches.jsonl").read_text()
    ref_lines = (ref / "train" / "batches.jsonl").read_text()
    assert [json.loads(x)["step"] for x in ref_lines.splitlines()] == list(range(1, STEPS + 1))
    assert lines == ref_lines
    keys = [json.loads(x)["keys"] for x in ref_lines.splitlines()]
    assert all(len(k) == 8 for k in keys)  # epoch 0 (steps 1-4) uses each sample once
    assert sorted(k for s in keys[:4] for k in s) == [f"{i:06d}" for i in range(32)]
    # the same loss curve and final weights (float64: only the reduction order differs)
    ma, mb = _metrics(ref), _metrics(run)
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in mb] == pytest.approx([m["loss"] for m in ma], rel=TOL, abs=0)
    wa, wb = _weights(ref, 2), _weights(run, world)
    assert set(wa) == set(wb)
    moved = sum(float((wa[k].double() - v.double()).pow(2).sum()) for k, v in wb.items())
    scale = sum(float(v.double().pow(2).sum()) for v in wa.values())
    assert wa["head"].dtype == torch.float64
    assert (moved / scale) ** 0.5 <= TOL, (moved / scale) ** 0.5
