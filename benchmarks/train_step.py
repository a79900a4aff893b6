"""Train-step throughput: our DeepSpeed loop vs a plain PyTorch DDP loop, and the data-wait share.

Claims measured (BENCHMARKS.md "Train step"):

1. samples/s of the real training loop (``megaclass.training.trainer.train``: DeepSpeed engine,
   model-parallel PartialFC head outside it, the per-step flag all-reduce, metrics) divided by
   samples/s of a plain ``DistributedDataParallel`` loop with the same model, the same head and
   the same in-memory batch, run in the same processes one after the other. Target ≥ 0.9.
2. The share of wall time the real loop waits for the real loader (``TrainLoader`` decoding
   JPEG shards with label sidecars + augmenting, ``--num-workers`` processes per rank), from
   the loop's own metrics. Target < 5 %. Also printed: samples/s with the real loader over
   samples/s with the in-memory batch (on a CPU-only machine the loader's workers take cores
   from the ranks, so this can fall below 1 even when the wait share is small).

Both loops: the same student (``--model``), the PartialFC head built by the trainer's own
``build_head`` with its own row-sparse optimizer, AdamW on the backbone, gradient clipping;
ours adds what the real loop does per step (the non-finite-loss flag, the stop-signal
agreement, head clipping, metrics every ``--warmup`` steps).

Run (2 CPU ranks; on GPUs use --nproc_per_node = number of GPUs and drop DS_ACCELERATOR):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/train_step.py

or as a single process (world of one): ``python benchmarks/train_step.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="open_clip:megaclass-small-vit")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="micro-batch per rank")
    ap.add_argument("--classes", type=int, default=20000)
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternating DeepSpeed/DDP rounds")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2])
    ap.add_argument("--loader-samples", type=int, default=1024, help="samples in the loader shards")
    ap.add_argument("--num-workers", type=int, default=1, help="loader workers per rank")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    return ap.parse_args()


def make_cfg(a: argparse.Namespace, run_dir: str, steps: int):
    from megaclass.pipelines.config import load_config

    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"train.model={a.model}",
            f"data.image_size={a.image_size}",
            f"train.micro_batch_size={a.batch}",
            f"train.steps={steps}",
            f"train.log_every={a.warmup}",
            "train.ckpt_every=1000000",
            f"train.sample_rate={a.sample_rate}",
            f"train.precision={a.precision}",
            f"train.zero_stage={a.zero_stage}",
            f"cluster.k={a.classes}",
            "train.warmup_steps=1",
        ],
    )


class MemoryLoader:
    """The same batch forever (isolates the step from data loading)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def fixed_batch(a: argparse.Namespace, rank: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    return {
        "image": torch.randn(a.batch, 3, a.image_size, a.image_size, generator=g),
        "label": torch.randint(0, a.classes, (a.batch,), generator=g),
    }


def run_ours(a, run_dir: str, loader_factory) -> tuple[float, float]:
    """samples/s and data-wait share of trainer.train() after its first metric window
    (the first --warmup steps: engine start, first-touch allocations)."""
    from megaclass.pipelines.train import make_job
    from megaclass.training import trainer

    shutil_rm(run_dir)
    steps = a.warmup + a.steps
    cfg = make_cfg(a, run_dir, steps)
    trainer.train(make_job(cfg), make_loader=loader_factory, resume=False)
    if dist.get_rank() == 0:
        recs = [
            json.loads(x)
            for x in (Path(run_dir) / "train" / "metrics.jsonl").read_text().splitlines()
        ]
        # windows after the first: total samples / total time, wait time / total time
        n = [b["samples"] - a_["samples"] for a_, b in zip(recs, recs[1:])]
        dt = [k / r["samples_per_s"] for k, r in zip(n, recs[1:])]
        sps = sum(n) / sum(dt)
        wait = sum(r["data_wait_share"] * t for r, t in zip(recs[1:], dt)) / sum(dt)
        out = torch.tensor([sps, wait], dtype=torch.float64)
    else:
        out = torch.zeros(2, dtype=torch.float64)
    dist.broadcast(out, 0)
    return float(out[0]), float(out[1])


def run_ddp(a, device: torch.device) -> float:
    """Plain DDP loop: same student, same PartialFC head (own optimizer), same batch."""
    from megaclass.pipelines.train import make_job
    from megaclass.training.encoders import build_student
    from megaclass.training.engine import DistEnv
    from megaclass.training.trainer import build_head, make_head_optimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    cfg = make_cfg(a, "/nonexistent", a.warmup + a.steps)  # the same model/head settings
    tc = cfg.train
    model = build_student(tc, a.image_size).to(device)
    ddp = DDP(model)
    world = dist.get_world_size()
    env = DistEnv(dist.get_rank(), 0, world, device, dist.get_backend())
    head = build_head(make_job(cfg), env, a.classes).to(device)
    head.grad_average = False  # DDP averages; the plain loop accepts the 1/W (same cost)
    opt = torch.optim.AdamW(ddp.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    hopt = make_head_optimizer(head, tc)
    b = fixed_batch(a, dist.get_rank())
    images, labels = b["image"].to(device), b["label"].to(device)
    bf16 = a.precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = ddp(images)
        loss = head(emb.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), tc.grad_clip)
        opt.step()
        hopt.step()
        opt.zero_grad(set_to_none=True)
        hopt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync(device)
    return a.steps * a.batch * world / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def shutil_rm(p: str) -> None:
    import shutil

    if dist.get_rank() == 0:
        shutil.rmtree(p, ignore_errors=True)
    dist.barrier()


def write_shards(a, root: Path) -> tuple[str, Path]:
    """PNG shards with label sidecars (like the demo's), written by rank 0."""
    from megaclass.data.labels import write_labels
    from megaclass.data.writer import ShardWriter
    from PIL import Image

    # the sidecars live outside the run directory: run_ours() wipes that before each run
    shard_dir, labels_dir = root / "shards", root / "labels"
    if dist.get_rank() == 0:
        rng = np.random.default_rng(0)
        per = a.loader_samples // 4
        keys: dict[str, list[str]] = {}
        with ShardWriter(shard_dir, prefix="b-", maxcount=per, image_ext="jpg") as w:
            for i in range(a.loader_samples):
                img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
                w.write(f"{i:07d}", Image.fromarray(img), f"sample {i}", {})
                keys.setdefault(f"b-{i // per:06d}", []).append(f"{i:07d}")
        for stem, ks in keys.items():
            lab = rng.integers(0, a.classes, (len(ks), 1))
            write_labels(
                labels_dir / f"{stem}.parquet", ks, lab, np.ones(lab.shape, np.float32), "bench"
            )
    dist.barrier()
    return str(shard_dir / "b-{000000..000003}.tar"), labels_dir


def main() -> None:
    a = parse()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    from megaclass.training.engine import init_distributed

    env = init_distributed()
    load_start = os.getloadavg()
    if env.rank == 0:
        print(f"load average at start: {load_start}", flush=True)
    tmp = Path(tempfile.gettempdir()) / "megaclass-bench-train"
    ours, ddp = [], []
    mem = lambda cfg, env_, tf: MemoryLoader(fixed_batch(a, env_.rank))  # noqa: E731
    for i in range(a.rounds):  # alternate which loop goes first (warm caches, turbo, …)
        if i % 2:
            ours.append(run_ours(a, str(tmp / "mem"), mem)[0])
            ddp.append(run_ddp(a, env.device))
        else:
            ddp.append(run_ddp(a, env.device))
            ours.append(run_ours(a, str(tmp / "mem"), mem)[0])

    # the real loader over real shards: how much of the loop is spent waiting for data
    spec, labels_dir = write_shards(a, tmp)
    from megaclass.data.loader import TrainLoader

    def real(cfg, env_, tf):
        return TrainLoader(spec, a.batch, rank=env_.rank, world_size=env_.world_size, num_workers=a.num_workers,
                           transform=tf, labels_dir=labels_dir, centroid_sha="bench", resampled=True,
                           drop_last=True)  # fmt: skip

    sps_real, wait = run_ours(a, str(tmp / "run"), real)
    res = {
        "world_size": env.world_size,
        "device": str(env.device),
        "model": a.model,
        "image_size": a.image_size,
        "micro_batch": a.batch,
        "classes": a.classes,
        "sample_rate": a.sample_rate,
        "precision": a.precision,
        "ours_samples_per_s": ours,
        "ddp_samples_per_s": ddp,
        "zero_stage": a.zero_stage,
        "ratio_ours_over_ddp": statistics.median(ours) / statistics.median(ddp),
        "ratio_per_round": [o / d for o, d in zip(ours, ddp)],
        "real_over_memory_samples_per_s": sps_real / statistics.median(ours),
        "real_loader_samples_per_s": sps_real,
        "data_wait_share": wait,
        "loader_workers_per_rank": a.num_workers,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
    }
    if env.rank == 0:
        print(json.dumps(res, indent=2))
        print(
            f"ours/DDP samples/s ratio: {res['ratio_ours_over_ddp']:.3f} (target >= 0.9); "
            f"data-wait share with the real loader: {100 * wait:.1f}% (target < 5%)"
        )
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=2))
    shutil_rm(str(tmp))


if __name__ == "__main__":
    main()
