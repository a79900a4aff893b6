"""The assign stage: top-k nearest centroids of every sample, one label sidecar per shard.

Ray Data runs a pool of actors; each loads ``RUN/cluster/centroids.npy`` once (and builds the
HNSW graph or tree once), then handles whole stems: it streams the stem's embedding rows in
chunks of ``assign.batch_size`` from the memory-mapped arrays, finds the top-k centroids
(exact chunked matmul, HNSW, or the hierarchical tree), and writes ``RUN/labels/<stem>.parquet``
(atomically, with the centroid sha in the file metadata) and then
``RUN/labels/_done/<stem>.json``. A stem whose done record matches the current centroids and
settings is skipped, so a killed run resumes per shard and ends with identical files. The
summary (label histogram, low-score share) goes to ``RUN/labels/_SUCCESS.json``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from megaclass.clustering.cluster_stats import size_stats
from megaclass.clustering.fault import maybe_die
from megaclass.clustering.search import CentroidSearcher, Tree
from megaclass.core.errors import InputError, MissingInputError
from megaclass.core.memory import MemoryPlan
from megaclass.core.rundir import RunDir
from megaclass.data.embeddings import fuse, list_stems, metadata_path, open_array, read_keys
from megaclass.data.labels import file_sha256, label_path, write_labels
from megaclass.pipelines.config import RunConfig, embeddings_dir_of, write_run_config
from megaclass.pipelines.ray_session import connect_ray

log = logging.getLogger(__name__)


def _settings(cfg: RunConfig, sha: str) -> dict[str, Any]:
    """What a label file depends on besides the embeddings; a done record must match it."""
    a = cfg.assign
    s: dict[str, Any] = {
        "centroid_sha256": sha,
        "topk": a.topk,
        "method": a.method,
        "feature": cfg.cluster.feature,
    }
    if a.method == "tree":
        s["nprobe"] = a.nprobe
    if a.method == "hnsw":
        s.update(hnsw_m=a.hnsw_m, ef_search=a.ef_search)
    return s


def load_tree(cluster_dir: Path, k: int):  # noqa: ANN201
    """The hierarchical backend's tree if the cluster stage left one for these centroids."""
    cp, op = cluster_dir / "tree_coarse.npy", cluster_dir / "tree_offsets.npy"
    if not (cp.exists() and op.exists()):
        return None
    offsets = np.load(op, allow_pickle=False).astype(np.int64)
    if offsets[-1] != k:
        return None
    return Tree(np.load(cp, allow_pickle=False).astype(np.float32), offsets)


class AssignActor:
    """Ray Data callable class: centroids and search index are built once per actor."""

    def __init__(
        self, cfg: RunConfig, centroid_path: str, sha: str, embed_dir: str, driver_pid: int = 0
    ) -> None:
        import torch

        a = cfg.assign
        torch.set_num_threads(max(1, int(a.num_cpus_per_actor)))
        c = np.load(centroid_path, allow_pickle=False).astype(np.float32)
        tree = load_tree(Path(centroid_path).parent, len(c)) if a.method == "tree" else None
        self.searcher = CentroidSearcher(
            c,
            a.method,
            chunk_size=cfg.cluster.chunk_size,
            hnsw_m=a.hnsw_m,
            ef_search=a.ef_search,
            tree=tree,
            nprobe=a.nprobe,
            seed=cfg.cluster.seed,
            device="cuda" if a.num_gpus_per_actor > 0 else "cpu",
            bf16=a.bf16,
        )
        self.cfg, self.sha, self.embed_dir = cfg, sha, Path(embed_dir)
        self.out = RunDir(cfg.run_dir).labels
        self.settings = _settings(cfg, sha)
        self.driver_pid = driver_pid

    def assign_stem(self, stem: str) -> dict[str, Any]:
        a = self.cfg.assign
        t0 = time.perf_counter()
        keys = read_keys(self.embed_dir, stem)
        img = open_array(self.embed_dir, stem, "img_emb")
        txt = open_array(self.embed_dir, stem, "text_emb")
        n = len(keys)
        labels = np.empty((n, a.topk), dtype=np.int64)
        scores = np.empty((n, a.topk), dtype=np.float32)
        where = f"{self.embed_dir}/*/{stem}"
        for r0 in range(0, n, a.batch_size):
            r1 = min(n, r0 + a.batch_size)
            x = fuse(
                None if img is None else img[r0:r1],
                None if txt is None else txt[r0:r1],
                self.cfg.cluster.feature,
                where,
                r0,
            )
            labels[r0:r1], scores[r0:r1] = self.searcher.search(x, a.topk)
        write_labels(label_path(self.out, stem), keys, labels, scores, self.sha)
        low = int((scores[:, 0] < a.low_score_threshold).sum()) if n else 0
        rec = dict(self.settings, rows=n, low_score=low, seconds=time.perf_counter() - t0)
        RunDir.write_done(self.out, stem, rec)
        if "MEGACLASS_FAULT" in os.environ:  # kill-and-resume tests only
            maybe_die(
                "assign_done", len(list((self.out / "_done").glob("*.json"))), self.driver_pid
            )
        return rec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        recs = [self.assign_stem(str(s)) for s in batch["stem"]]
        return {
            "stem": np.array([str(s) for s in batch["stem"]]),
            "rows": np.array([r["rows"] for r in recs], dtype=np.int64),
        }


def _is_done(out: Path, stem: str, settings: dict, rows: int) -> bool:
    rec = RunDir.read_done(out, stem)
    if rec is None or not label_path(out, stem).exists():
        return False
    return all(rec.get(k) == v for k, v in settings.items()) and rec.get("rows") == rows


def summarise(out: Path, stems: list[str], k: int, threshold: float) -> dict[str, Any]:
    """Label histogram (streamed from the sidecars' ``cls`` column) and low-score share."""
    hist = np.zeros(k, dtype=np.int64)
    rows = low = 0
    for stem in stems:
        cls = pq.read_table(label_path(out, stem), columns=["cls"]).column("cls").to_numpy()
        hist += np.bincount(cls, minlength=k)[:k]
        rec = RunDir.read_done(out, stem) or {}
        rows += int(rec.get("rows", len(cls)))
        low += int(rec.get("low_score", 0))
    return {
        "rows": rows,
        "label_histogram": size_stats(hist),
        "low_score_threshold": threshold,
        "low_score_rows": low,
        "low_score_share": low / max(1, rows),
    }


def memory_plan(cfg: RunConfig, k: int, d: int) -> MemoryPlan:
    """What the assign actors on this node hold: each its copy of the centroids (read, then as
    float32) and its search index, plus one batch of rows and the labels of one stem."""
    a = cfg.assign
    plan = MemoryPlan("assign", keys=["assign.concurrency", "assign.method", "assign.batch_size"])
    plan.add(f"centroids {k:,} x {d} per actor x {a.concurrency}", a.concurrency * 8 * k * d)
    if a.method == "hnsw":
        plan.add("HNSW graphs", a.concurrency * k * (4 * d + 8 * a.hnsw_m))
    plan.add("row batches", a.concurrency * 4 * a.batch_size * d)
    return plan


def run_assign(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    rd = RunDir(cfg.run_dir)
    write_run_config(rd, cfg, force)
    out = rd.labels
    a = cfg.assign
    t0 = time.perf_counter()
    cpath = rd.cluster / "centroids.npy"
    if not cpath.exists():
        raise MissingInputError(f"{cpath}: no centroids; run the cluster stage first")
    sha = file_sha256(cpath)
    sha_file = rd.cluster / "centroids.sha256"
    if sha_file.exists() and sha_file.read_text().strip() != sha:
        raise InputError(f"{cpath}: sha256 {sha} differs from {sha_file}; the file changed")
    cshape = np.load(cpath, mmap_mode="r").shape
    k = int(cshape[0])
    memory_plan(cfg, k, int(cshape[1])).check(cfg.memory_check)
    if a.topk > k:
        raise InputError(f"assign.topk = {a.topk} exceeds the number of centroids {k}")
    embed_dir = embeddings_dir_of(cfg)
    stems = list_stems(embed_dir)
    settings = _settings(cfg, sha)
    todo = []
    for stem in stems:
        n = pq.ParquetFile(metadata_path(embed_dir, stem)).metadata.num_rows
        if force or not _is_done(out, stem, settings, n):
            todo.append(stem)
    log.info(
        "assign: %d of %d stems to do (k=%d, %s, top-%d)",
        len(todo),
        len(stems),
        k,
        a.method,
        a.topk,
    )
    rows_done = 0
    if todo:
        import ray

        rd.success_path("assign").unlink(missing_ok=True)  # incomplete until the end
        connect_ray(cfg)
        ds = ray.data.from_items([{"stem": s} for s in todo], override_num_blocks=len(todo))
        fault = os.environ.get("MEGACLASS_FAULT")  # kill-and-resume tests: reach the actors too
        remote_args = {"runtime_env": {"env_vars": {"MEGACLASS_FAULT": fault}}} if fault else {}
        ds = ds.map_batches(
            AssignActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=a.concurrency),
            num_cpus=a.num_cpus_per_actor,
            num_gpus=a.num_gpus_per_actor,
            # Ray Data's defaults are -1 (forever): a shard that kills its actor would be retried
            # without end; bounded, the stage fails with Ray's error instead
            max_restarts=a.actor_crash_retries,
            max_task_retries=a.actor_crash_retries,
            fn_constructor_kwargs={
                "cfg": cfg,
                "centroid_path": str(cpath),
                "sha": sha,
                "embed_dir": str(embed_dir),
                "driver_pid": os.getpid(),
            },
            **remote_args,
        )
        from tqdm import tqdm

        with tqdm(total=len(todo), desc="assign", unit="shard", mininterval=2) as bar:
            for row in ds.iter_rows():
                rows_done += int(row["rows"])
                bar.update(1)
    seconds = time.perf_counter() - t0
    summary = {
        "k": k,
        "topk": a.topk,
        "method": a.method,
        "centroid_sha256": sha,
        "stems": len(stems),
        "stems_assigned_this_run": len(todo),
        "rows_assigned_this_run": rows_done,
        "seconds": seconds,
        "rows_per_second": rows_done / seconds if seconds > 0 else None,
    }
    summary.update(summarise(out, stems, k, a.low_score_threshold))
    rd.finish_stage("assign", summary)
    log.info(
        "assign: %d rows, %.0f rows/s this run, low-score share %.3f",
        summary["rows"],
        summary["rows_per_second"] or 0,
        summary["low_score_share"],
    )
    return summary
