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


def plain_loop(shards: list[str], args: argparse.Namespace, out_dir: Path) -> dict:
    """Baseline: one process, no Ray: samples/s end-to-end and steady, rows, encode ms/sample."""
    import torch
    from megaclass.data.reader import iter_samples
    from megaclass.data.shards import shard_stem
    from megaclass.data.stats import SampleStats
    from megaclass.training.teachers import load_teacher

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    t = load_teacher(args.teacher, args.text, image_size=args.image_size)
    t1 = time.perf_counter()
    rows, t_enc = 0, 0.0
    for url in shards:
        stats = SampleStats()
        samples = list(iter_samples(url, stats, max_pixels=64_000_000))
        img_parts, txt_parts = [], []
        for i in range(0, len(samples), args.batch_size):
            part = samples[i : i + args.batch_size]
            x = torch.stack([t.image_transform(s.image) for s in part])
            te = time.perf_counter()
            img_parts.append(t.encode_images(x))
            if t.has_text:
                txt_parts.append(t.encode_texts([s.caption for s in part]))
            t_enc += time.perf_counter() - te
        img = np.concatenate(img_parts)
        rows += len(img)
        np.save(out_dir / f"{shard_stem(url)}.npy", img.astype(np.float16))
        if txt_parts:
            txt = np.concatenate(txt_parts).astype(np.float16)
            np.save(out_dir / f"{shard_stem(url)}.txt.npy", txt)
    t2 = time.perf_counter()
    return {
        "end_to_end": rows / (t2 - t0),
        "steady": rows / (t2 - t1),
        "rows": rows,
        "ms_per_sample_encode": 1000 * t_enc / max(rows, 1),
    }


def reservations(actors: int, threads: int, cores: int) -> tuple[float, float]:
    """(CPUs per actor, CPUs per decode task) that add up to at most ``cores``.

    Ray runs as many decode tasks at once as the reservations allow; more runnable processes
    than cores would slow the actors down. With room for a whole decoder core it gets one;
    otherwise the decoders get half a CPU and the actors share the rest (an actor's torch
    thread count is its reservation rounded up, so 2 actors x 0.75 CPUs still run 1 thread each).
    """
    if actors * threads + 1 <= cores:
        return float(threads), 1.0
    return (cores - 0.5) / actors, 0.5


def ray_stage(
    shards: list[str], args: argparse.Namespace, run_dir: Path, actors: int, cores: int
) -> dict:
    from megaclass.pipelines.config import DataConfig, EmbedConfig, RayConfig, RunConfig
    from megaclass.pipelines.embed import run_embed

    actor_cpus, decoder_cpus = reservations(actors, args.threads, cores)
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
            num_cpus_per_actor=actor_cpus,
            num_cpus_per_decoder=decoder_cpus,
        ),
    )
    t0 = time.perf_counter()
    s = run_embed(cfg)
    done = [json.loads(p.read_text()) for p in (run_dir / "embed" / "_done").glob("*.json")]
    busy = {k: sum(d["timing"][k] for d in done) for k in ("encode_s", "decode_s")}
    return {
        "ms_per_sample_in_actor": 1000 * busy["encode_s"] / max(s["rows"], 1),
        "ms_per_sample_in_decoder": 1000 * busy["decode_s"] / max(s["rows"], 1),
        "end_to_end": s["rows"] / (time.perf_counter() - t0),
        "steady": s["samples_per_s_steady"],
        "rows": s["rows"],
        "timing": s["timing"],
        "cpus_per_actor": actor_cpus,
        "cpus_per_decoder": decoder_cpus,
        "threads_per_actor": s["ray"]["threads_per_actor"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="efficientnet-lite0")
    ap.add_argument("--text", default="none")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=160)
    ap.add_argument("--side", type=int, default=160, help="typical source image side in pixels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per actor and in the plain loop"
    )
    ap.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: the machine's cores)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="plain, then this many rounds of (1 actor, 2 actors, plain); medians are compared",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import ray
    import ray.data

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    # Ray runs its workers at nice 15; on a machine shared with other jobs they would then lose
    # CPU to anything at nice 0, the plain loop included. Same priority on both sides.
    os.environ.setdefault("RAY_worker_niceness", "0")
    cores = args.ray_cpus or os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    shards = build_shards(work / "shards", args.shards, args.per_shard, args.side)
    n = args.shards * args.per_shard
    load_start = os.getloadavg()
    print(
        f"{len(shards)} shards x {args.per_shard} samples, teacher {args.teacher} + {args.text}, "
        f"{args.image_size}px, batch {args.batch_size}, {args.threads} thread(s); cores: {os.cpu_count()}, "
        f"load avg {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}",
        flush=True,
    )

    def run_plain(tag: str) -> dict:
        (work / tag).mkdir()
        r = plain_loop(shards, args, work / tag)
        assert r["rows"] == n
        print(
            f"plain loop            : {r['end_to_end']:8.1f} samples/s end-to-end, "
            f"{r['steady']:8.1f} steady   (encode {r['ms_per_sample_encode']:.1f} ms/sample)",
            flush=True,
        )
        return r

    def run_ray(tag: str, actors: int) -> dict:
        r = ray_stage(shards, args, work / tag, actors, cores)
        name = f"{actors} actor{'s' if actors > 1 else ' '}"
        print(
            f"ray stage, {name}    : {r['end_to_end']:8.1f} samples/s end-to-end, "
            f"{r['steady']:8.1f} steady   ({r['cpus_per_actor']:.2f} CPUs + "
            f"{r['threads_per_actor']} thread(s) per actor, {r['cpus_per_decoder']:.1f} per decoder)"
        )
        print(
            f"    time split (s)    : {r['timing']}; busy ms/sample: actor "
            f"{r['ms_per_sample_in_actor']:.1f}, decoder {r['ms_per_sample_in_decoder']:.1f}",
            flush=True,
        )
        return r

    plain, one, two = [run_plain("plain0")], [], []
    t = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False)
    # Ray Data starts its own service actors (stats, autoscaling coordinator) on a session's
    # first execution: like ray.init, a once-per-Ray-session cost, paid here by a trivial dataset
    ray.data.range(2).map_batches(lambda b: b).materialize()
    ray_start = time.perf_counter() - t
    print(
        f"ray.init + Ray Data warm-up: {ray_start:.1f} s (once per Ray session, excluded below)",
        flush=True,
    )
    for i in range(args.repeats):
        one.append(run_ray(f"run1-{i}", 1))
        two.append(run_ray(f"run2-{i}", 2))
        plain.append(run_plain(f"plain{i + 1}"))
    ray.shutdown()

    # the outputs agree (fp16 files): the stage computes what the loop computes
    from megaclass.data.shards import shard_stem

    worst = 0.0
    for url in shards:
        a = np.load(work / "plain0" / f"{shard_stem(url)}.npy").astype(np.float32)
        for tag in ("run1-0", "run2-0"):
            b = np.load(work / tag / "embed" / "img_emb" / f"{shard_stem(url)}.npy")
            worst = max(worst, float(np.abs(a - b.astype(np.float32)).max()))

    def med(rs: list[dict], k: str) -> float:
        return float(np.median([r[k] for r in rs]))

    load_end = os.getloadavg()
    res = {
        "samples": n,
        "plain": {"end_to_end": med(plain, "end_to_end"), "steady": med(plain, "steady")},
        "ray_1_actor": {"end_to_end": med(one, "end_to_end"), "steady": med(one, "steady")},
        "ray_2_actors": {"end_to_end": med(two, "end_to_end"), "steady": med(two, "steady")},
        "runs": {"plain": plain, "ray_1_actor": one, "ray_2_actors": two},
        "max_abs_diff_vs_plain": worst,
        "ray_init_s": ray_start,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
    }
    for k in ("end_to_end", "steady"):
        res[f"ratio_1_actor_vs_plain_{k}"] = res["ray_1_actor"][k] / res["plain"][k]
        res[f"scaling_2_vs_1_actor_{k}"] = res["ray_2_actors"][k] / res["ray_1_actor"][k]
    print(
        f"ratio ray(1 actor)/plain : {res['ratio_1_actor_vs_plain_end_to_end']:.2f} end-to-end, "
        f"{res['ratio_1_actor_vs_plain_steady']:.2f} steady  (target >= 0.9; medians of "
        f"{len(plain)} plain / {len(one)} ray runs)"
    )
    print(
        f"scaling 2 actors / 1     : {res['scaling_2_vs_1_actor_end_to_end']:.2f} end-to-end, "
        f"{res['scaling_2_vs_1_actor_steady']:.2f} steady"
    )
    print(
        f"max |ray - plain| (fp16) : {worst:.2e}; load avg at end "
        f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
