"""Claim: TrainLoader (label join + resumable state) decodes and augments as fast as open_clip.

Same shards, same torchvision v2 transform, same batch size and worker count, same process:

* ``ours``      — megaclass.data.loader.TrainLoader, label sidecars joined by key, sha checked,
  with its world-size-invariant order (``--virtual-streams`` streams, each with its own
  shuffle buffer of ``--shuffle-buffer`` samples, the workers' slots placed into each batch).
* ``open_clip`` — a plain ``wds.DataPipeline`` built stage for stage as open_clip's
  ``get_wds_dataset`` builds its training pipeline (detshuffle → split_by_node/worker →
  tarfile_to_samples → shuffle → select → decode("pilrgb") → rename → map_dict → to_tuple →
  batched, in a WebLoader), using open_clip's own filter and error handler; the text is
  passed through untokenized so both sides do the same work.

Runs alternate (ours, open_clip, ours, …) to spread the noise of a shared machine;
each rate is decoded+augmented samples per second over one pass of all shards, timed from
the first batch (worker start-up excluded; it is reported separately). Prints the median
rates and the ratio ours/open_clip (target ≥ 0.95).

    .venv/bin/python benchmarks/loader.py [--shards SPEC] [--workers 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from megaclass.data.builders import build_dataset
from megaclass.data.labels import write_labels
from megaclass.data.loader import TrainLoader
from megaclass.data.reader import iter_samples
from megaclass.data.shards import expand_shards, shard_stem
from megaclass.data.stats import SampleStats
from torchvision.transforms import v2


def make_transform(size: int) -> v2.Compose:
    # open_clip's training preprocessing, in torchvision v2 form
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=(0.9, 1.0), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276)),
        ]
    )


def write_sidecars(urls: list[str], labels_dir: Path, k: int = 8) -> str:
    """Random top-k labels for every sample (as the assign stage would write)."""
    sha = "bench" * 8
    rng = np.random.default_rng(0)
    for u in urls:
        keys = [s.key for s in iter_samples(u, SampleStats(), decode=False)]
        labels = rng.integers(0, 1000, (len(keys), k))
        write_labels(
            labels_dir / f"{shard_stem(u)}.parquet", keys, labels, np.ones((len(keys), k)), sha
        )
    return sha


def run_ours(urls, transform, a, labels_dir, sha):
    loader = TrainLoader(
        urls,
        batch_size=a.batch_size,
        num_workers=a.workers,
        seed=0,
        transform=transform,
        labels_dir=labels_dir,
        centroid_sha=sha,
        shuffle_buffer=a.shuffle_buffer,
        virtual_streams=a.virtual_streams,
    )
    return timed(iter(loader), lambda b: len(b["key"]))


def run_open_clip_style(urls, transform, a):
    """open_clip's training pipeline (open_clip_train.data.get_wds_dataset), stage for stage.

    open_clip 3.3's own ``tarfile_to_samples_nothrow`` cannot read webdataset ≥ 1.0 streams
    (it chokes on the end-of-shard marker, KeyError 'fname'), so the tar stage is
    webdataset's ``tarfile_to_samples`` with open_clip's error handler; every other stage
    and open_clip's own filter/handler functions are used as they are.
    """
    from open_clip_train.data import filter_no_caption_or_no_image, log_and_continue

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.detshuffle(bufsize=2000, initial=500, seed=0, epoch=0),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=log_and_continue),
        wds.shuffle(bufsize=a.shuffle_buffer, initial=min(1000, a.shuffle_buffer)),
        wds.select(filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=transform, text=lambda t: t),
        wds.to_tuple("image", "text"),
        wds.batched(a.batch_size, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=a.workers)
    return timed(iter(loader), lambda b: len(b[1]))


def timed(it, size):
    t0 = time.perf_counter()
    first = size(next(it))
    t1 = time.perf_counter()
    n = 0
    for b in it:
        n += size(b)
    t2 = time.perf_counter()
    return {"rate": n / (t2 - t1), "startup_s": t1 - t0, "samples": n + first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default="", help="shard spec (default: build the demo dataset)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--virtual-streams", type=int, default=64, help="ours: train.virtual_streams")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory(prefix="megaclass-bench-")
    root = Path(tmp.name)
    if a.shards:
        urls = expand_shards(a.shards)
    else:
        summary = build_dataset("demo", str(root / "demo"), seed=0)
        urls = expand_shards(summary["splits"]["train"]["spec"])
    n_samples = sum(1 for u in urls for _ in iter_samples(u, SampleStats(), decode=False))
    sha = write_sidecars(urls, root / "labels")
    transform = make_transform(a.size)
    print(
        f"{len(urls)} shards, {n_samples} samples, batch {a.batch_size}, {a.workers} workers, "
        f"crop {a.size}, torch threads {torch.get_num_threads()}"
    )
    rates: dict[str, list[float]] = {"ours": [], "open_clip": []}
    for r in range(a.repeats):
        for name in rates:
            if name == "ours":
                res = run_ours(urls, transform, a, str(root / "labels"), sha)
            else:
                res = run_open_clip_style(urls, transform, a)
            rates[name].append(res["rate"])
            print(
                f"  run {r} {name:9s} {res['rate']:8.1f} samples/s "
                f"({res['samples']} samples, start-up {res['startup_s']:.2f} s)"
            )
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("median samples/s: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
    print(f"ratio ours/open_clip = {med['ours'] / med['open_clip']:.3f}  (target ≥ 0.95)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
