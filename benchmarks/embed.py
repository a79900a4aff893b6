"""Claim: the Ray embed stage with one teacher actor runs at >= 0.9x the samples/s of a plain
single-process loop with the same teacher over the same shards; two actors scale on top.

Everything runs in this one process and one run: the shards are built once, the plain loop
(read -> preprocess -> encode -> save, in tar order, chunks of ``--batch-size``) is the baseline,
then the stage (``run_embed``) with 1 and with 2 actors joins one local Ray started here, so Ray's
own start-up is paid once and reported separately. The plain loop is run again at the end to
show how much the (shared) machine drifted during the measurement.

Two rates per run: ``end-to-end`` (teacher loading / actor start-up included) and ``steady``
(from the first embedded chunk to the last: what a long run converges to).

    .venv/bin/python benchmarks/embed.py                       # EfficientNet-Lite0, 128 px
    .venv/bin/python benchmarks/embed.py --teacher open_clip:megaclass-tiny --text open_clip:megaclass-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_shards(out: Path, n_shards: int, per_shard: int, side: int, seed: int = 0) -> list[str]:
    from megaclass.data.writer import ShardWriter
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth random images (JPEG-friendly, realistic decode cost) at varying sizes
    with ShardWriter(out, maxcount=per_shard) as w:
        for i in range(n_shards * per_shard):
            h, wd = int(side * rng.uniform(0.8, 1.2)), int(side * rng.uniform(0.8, 1.4))
            base = rng.integers(0, 256, (h // 8 + 1, wd // 8 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((wd, h), Image.BILINEAR)
            w.write(f"{i:07d}", img, f"sample {i} of class {i % 10}", {"class": str(i % 10)})
    return w.shards


def plain_loop(
    shards: list[str], args: argparse.Namespace, out_dir: Path
) -> tuple[float, float, int]:
    """Baseline: one process, no Ray. Returns (end-to-end samples/s, steady samples/s, rows)."""
    import torch
    from megaclass.data.reader import iter_samples
    from megaclass.data.shards import shard_stem
    from megaclass.data.stats import SampleStats
    from megaclass.training.teachers import load_teacher

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    t = load_teacher(args.teacher, args.text, image_size=args.image_size)
    t1 = time.perf_counter()
    rows = 0
    for url in shards:
        stats = SampleStats()
        samples = list(iter_samples(url, stats, max_pixels=64_000_000))
        img_parts, txt_parts = [], []
        for i in range(0, len(samples), args.batch_size):
            part = samples[i : i + args.batch_size]
            img_parts.append(
                t.encode_images(torch.stack([t.image_transform(s.image) for s in part]))
            )
            if t.has_text:
                txt_parts.append(t.encode_texts([s.caption for s in part]))
        img = np.concatenate(img_parts)
        rows += len(img)
        np.save(out_dir / f"{shard_stem(url)}.npy", img.astype(np.float16))
        if txt_parts:
            txt = np.concatenate(txt_parts).astype(np.float16)
            np.save(out_dir / f"{shard_stem(url)}.txt.npy", txt)
    t2 = time.perf_counter()
    return rows / (t2 - t0), rows / (t2 - t1), rows


def ray_stage(shards: list[str], args: argparse.Namespace, run_dir: Path, actors: int) -> dict:
    from megaclass.pipelines.config import DataConfig, EmbedConfig, RayConfig, RunConfig
    from megaclass.pipelines.embed import run_embed

    cfg = RunConfig(
        run_dir=str(run_dir),
        data=DataConfig(shards="::".join(shards)),
        ray=RayConfig(),
        embed=EmbedConfig(
            image_teacher=args.teacher,
            text_teacher=args.text,
            image_size=args.image_size,
            batch_size=args.batch_size,
            concurrency=actors,
            num_cpus_per_actor=float(args.threads),
            num_cpus_per_decoder=1.0,
        ),
    )
    t0 = time.perf_counter()
    s = run_embed(cfg)
    return {
        "end_to_end": s["rows"] / (time.perf_counter() - t0),
        "steady": s["samples_per_s_steady"],
        "rows": s["rows"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--text", default="none")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=48)
    ap.add_argument("--side", type=int, default=160, help="typical source image side in pixels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per actor and in the plain loop"
    )
    ap.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: 2 actors x threads + 1 decoder)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import ray

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    shards = build_shards(work / "shards", args.shards, args.per_shard, args.side)
    n = args.shards * args.per_shard
    print(
        f"{len(shards)} shards x {args.per_shard} samples, teacher {args.teacher} + {args.text}, "
        f"{args.image_size}px, batch {args.batch_size}, {args.threads} thread(s); cores: {os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    (work / "plain").mkdir()
    plain_e2e, plain_steady, rows = plain_loop(shards, args, work / "plain")
    assert rows == n
    print(
        f"plain loop            : {plain_e2e:8.1f} samples/s end-to-end, {plain_steady:8.1f} steady",
        flush=True,
    )

    t = time.perf_counter()
    ray.init(
        num_cpus=args.ray_cpus or 2 * args.threads + 1,
        include_dashboard=False,
        configure_logging=False,
    )
    ray_start = time.perf_counter() - t
    print(f"ray.init              : {ray_start:.1f} s (paid once, excluded below)", flush=True)
    r1 = ray_stage(shards, args, work / "run1", 1)
    print(
        f"ray stage, 1 actor    : {r1['end_to_end']:8.1f} samples/s end-to-end, {r1['steady']:8.1f} steady",
        flush=True,
    )
    r2 = ray_stage(shards, args, work / "run2", 2)
    print(
        f"ray stage, 2 actors   : {r2['end_to_end']:8.1f} samples/s end-to-end, {r2['steady']:8.1f} steady",
        flush=True,
    )
    ray.shutdown()
    (work / "plain2").mkdir()
    plain2_e2e, plain2_steady, _ = plain_loop(shards, args, work / "plain2")
    print(
        f"plain loop (again)    : {plain2_e2e:8.1f} samples/s end-to-end, {plain2_steady:8.1f} steady",
        flush=True,
    )

    # the outputs agree (fp16 files): the stage computes what the loop computes
    from megaclass.data.shards import shard_stem

    worst = 0.0
    for url in shards:
        a = np.load(work / "plain" / f"{shard_stem(url)}.npy").astype(np.float32)
        b = np.load(work / "run1" / "embed" / "img_emb" / f"{shard_stem(url)}.npy").astype(
            np.float32
        )
        worst = max(worst, float(np.abs(a - b).max()))

    base_steady = (plain_steady + plain2_steady) / 2
    base_e2e = (plain_e2e + plain2_e2e) / 2
    res = {
        "plain": {"end_to_end": base_e2e, "steady": base_steady},
        "ray_1_actor": r1,
        "ray_2_actors": r2,
        "ratio_1_actor_vs_plain_steady": r1["steady"] / base_steady,
        "ratio_1_actor_vs_plain_end_to_end": r1["end_to_end"] / base_e2e,
        "scaling_2_vs_1_actor_steady": r2["steady"] / r1["steady"],
        "max_abs_diff_vs_plain": worst,
        "ray_init_s": ray_start,
        "load_avg_end": os.getloadavg()[0],
    }
    print(
        f"ratio ray(1 actor)/plain : {res['ratio_1_actor_vs_plain_steady']:.2f} steady, "
        f"{res['ratio_1_actor_vs_plain_end_to_end']:.2f} end-to-end  (target >= 0.9)"
    )
    print(f"scaling 2 actors / 1     : {res['scaling_2_vs_1_actor_steady']:.2f} steady")
    print(f"max |ray - plain| (fp16) : {worst:.2e}; load avg at end {res['load_avg_end']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
