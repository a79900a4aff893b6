"""LAION-shaped rehearsal: 41,456 img2dataset shards + LAION-layout embeddings -> trained model.

Claim: everything that is paid per shard (embedding bookkeeping, clustering sample, assign,
regroup, the trainer's start-up over the shard list, the report) grows linearly with the shard
count, the first training step comes within 60 s of the launch at 41,456 shards, and a training
rank's memory does not grow with the shard count (≤ 200 MB more at full than at a quarter).

What it builds, per fraction f of ``--shards`` (a quarter, then all by default), under WORK/f:

- ``shards/NNNNN.tar``: img2dataset's layout — members ``<key>.jpg/.txt/.json`` with keys
  ``<shard 5 digits><index 4 digits>`` (real small JPEGs), and ``NNNNN_stats.json``;
- ``emb/``: LAION's published layout — ``img_emb/img_emb_<i>.npy``, ``text_emb/text_emb_<i>.npy``
  (float16) and ``metadata/metadata_<i>.parquet`` (``key``, ``caption``) in ``--parts`` parts that
  cut across the shards, as LAION's ~1M-row parts do;

then ``megaclass run`` with ``embed.embeddings_dir`` (embed is skipped): cluster (k ≥ 10,000) ->
assign (on the parts) -> regroup (one label sidecar per training shard, by key) -> train
(``--steps`` steps on 2 ranks, the loader over every shard) -> eval (skipped: no held-out set)
-> report. Each stage runs as its own process; wall time, peak RSS (the stage's process tree,
sampled every 0.2 s) and, for training, the time from launch to the first step are printed,
with the full/quarter ratios at the end. Heavy: run it alone, under the benchmarks' lock:

    flock -x /tmp/megaclass-bench.lock .venv/bin/python benchmarks/scale.py --work /tmp/scale

``--shards 2000 --fractions 1`` is the quick version the test suite runs (tests/test_scale.py).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
STAGES = ("cluster", "assign", "regroup", "train", "eval", "report")
PER_SHARD = ("cluster", "assign", "regroup", "train", "report")  # parts whose cost the ratio checks


def _jpegs(n: int = 8) -> list[bytes]:
    out = []
    rng = np.random.default_rng(0)
    for _ in range(n):
        arr = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    tf.addfile(ti, io.BytesIO(data))


def build_shards(root: Path, n_shards: int, per_shard: int) -> list[str]:
    """img2dataset-shaped tars; returns every key in shard order."""
    root.mkdir(parents=True, exist_ok=True)
    imgs = _jpegs()
    keys = []
    for s in range(n_shards):
        name = f"{s:05d}"
        with tarfile.open(root / f"{name}.tar", "w") as tf:
            for i in range(per_shard):
                key = f"{name}{i:04d}"
                keys.append(key)
                _add(tf, f"{key}.jpg", imgs[(s + i) % len(imgs)])
                _add(tf, f"{key}.txt", f"a photo number {i} of shard {s}".encode())
                meta = {"key": key, "status": "success", "caption": f"photo {i}"}
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        stats = {"count": per_shard, "successes": per_shard, "failed_to_download": 0}
        (root / f"{name}_stats.json").write_text(json.dumps(stats))
    return keys


def build_embeddings(root: Path, keys: list[str], parts: int, dim: int, seed: int = 0) -> None:
    """LAION's layout, ``parts`` parts of equal size cutting across the shards."""
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((256, dim)).astype(np.float32)
    bounds = np.linspace(0, len(keys), parts + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        n = b - a
        cls = rng.integers(0, len(centers), n)
        img = centers[cls] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        txt = centers[cls] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", img.astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", txt.astype(np.float16))
        table = pa.table({"key": keys[a:b], "caption": [f"photo {k}" for k in keys[a:b]]})
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")


def _tree_rss(proc: psutil.Process) -> dict[int, int]:
    out = {}
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            out[p.pid] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def run_stage(config: Path, stage: str, log: Path) -> dict:
    """One stage as its own process: wall time, peak RSS of the whole tree and of one process."""
    cmd = [sys.executable, "-m", "megaclass.pipelines.run", str(config), "--stages", stage]
    t0 = time.time()
    with open(log, "a") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=REPO)
        ps = psutil.Process(proc.pid)
        peak_tree = peak_proc = 0
        while proc.poll() is None:
            rss = _tree_rss(ps)
            if rss:
                peak_tree = max(peak_tree, sum(rss.values()))
                others = [v for pid, v in rss.items() if pid != proc.pid]
                peak_proc = max(peak_proc, max(others, default=0))
            time.sleep(0.2)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed ({proc.returncode}); see {log}")
    return {
        "wall_s": wall,
        "peak_tree_mb": peak_tree / 1e6,
        "peak_child_mb": peak_proc / 1e6,
        "t0": t0,
    }


def rehearse(work: Path, n_shards: int, a: argparse.Namespace) -> dict:
    t0 = time.time()
    shards, emb, run = work / "shards", work / "emb", work / "run"
    if not (work / "built.json").is_file():
        shutil.rmtree(work, ignore_errors=True)
        keys = build_shards(shards, n_shards, a.per_shard)
        build_embeddings(emb, keys, a.parts, a.dim)
        (work / "built.json").write_text(json.dumps({"shards": n_shards, "rows": len(keys)}))
    build_s = time.time() - t0
    shutil.rmtree(run, ignore_errors=True)
    config = work / "config.yaml"
    config.write_text(
        "\n".join(
            [
                f"run_dir: {run}",
                "data:",
                f"  shards: {shards}/{{00000..{n_shards - 1:05d}}}.tar",
                "  image_size: 32",
                "  shuffle_buffer: 64",
                "embed:",
                f"  embeddings_dir: {emb}",
                "cluster:",
                f"  k: {a.k}",
                "  niter: 4",
                "  points_per_centroid: 4",
                "assign:",
                "  batch_size: 65536",
                "train:",
                "  model: open_clip:megaclass-tiny-vit",
                "  embed_dim: 32",
                f"  steps: {a.steps}",
                "  micro_batch_size: 8",
                "  nproc: 2",
                f"  ckpt_every: {a.steps}",
                "  log_every: 1",
                "  warmup_steps: 2",
                "eval:",
                "  encoders: [student]",
                "",
            ]
        )
    )
    log = work / "run.log"
    res: dict = {"shards": n_shards, "rows": n_shards * a.per_shard, "build_s": build_s}
    for stage in STAGES:
        r = run_stage(config, stage, log)
        if stage == "train":
            first = json.loads((run / "train" / "metrics.jsonl").read_text().splitlines()[0])
            r["first_step_s"] = first["time"] - r["t0"]
        r.pop("t0")
        res[stage] = r
        print(f"  {n_shards} shards  {stage:8s} {r['wall_s']:7.1f} s  peak tree "
              f"{r['peak_tree_mb']:7.0f} MB  largest child {r['peak_child_mb']:6.0f} MB"
              + (f"  first step after {r['first_step_s']:.1f} s" if "first_step_s" in r else ""),
              flush=True)  # fmt: skip
    regroup = json.loads((run / "shard_labels" / "_SUCCESS.json").read_text())
    res["regroup_mismatches"] = regroup["mismatches"]["counts"]
    res["sidecars"] = len(list((run / "shard_labels").glob("*.parquet")))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/megaclass-scale"))
    ap.add_argument("--shards", type=int, default=41456)
    ap.add_argument("--fractions", default="0.25,1")
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--parts", type=int, default=40)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = []
    for f in (float(x) for x in a.fractions.split(",")):
        n = max(1, round(a.shards * f))
        print(f"== {n} shards ({f:g} of {a.shards}) ==", flush=True)
        results.append(rehearse(a.work / f"s{n}", n, a))
    if len(results) == 2:
        q, full = results
        print(
            f"\nfull/quarter ({full['shards']}/{q['shards']} shards = {full['shards'] / q['shards']:.2f}x)"
        )
        for stage in STAGES:
            ratio = full[stage]["wall_s"] / max(q[stage]["wall_s"], 1e-9)
            mark = (
                "" if stage not in PER_SHARD else ("  ok" if ratio <= 4.5 else "  MISSED (≤ 4.5)")
            )
            print(f"  {stage:8s} time {ratio:5.2f}{mark}")
        grow = full["train"]["peak_child_mb"] - q["train"]["peak_child_mb"]
        print(
            f"  train rank peak RSS +{grow:.0f} MB"
            + ("  ok" if grow <= 200 else "  MISSED (≤ 200)")
        )
        first = full["train"]["first_step_s"]
        print(
            f"  first step {first:.1f} s after launch"
            + ("  ok" if first <= 60 else "  MISSED (≤ 60)")
        )
    print(f"load average after: {os.getloadavg()}")
    if a.out:
        a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
