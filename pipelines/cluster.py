"""The cluster stage: spherical k-means of the fused teacher features into pseudo-classes.

Reads ``RUN/embed`` (or ``embed.embeddings_dir`` for bring-your-own LAION embeddings), draws
the training sample by a seeded hash of the key, runs the configured backend with a checkpoint
per iteration in ``RUN/cluster/state/``, and writes ``centroids.npy`` (float32, L2-normalised)
+ ``centroids.sha256``, ``stats.json``, ``plots/*.png`` and finally ``_SUCCESS.json``. A killed
run started again resumes from the newest checkpoint and ends with the same centroids.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.clustering.backends import KMeansParams, train_kmeans
from megaclass.clustering.cluster_stats import plot_objective, plot_sizes, quality, size_stats
from megaclass.clustering.hierarchical import hierarchical_peak_bytes
from megaclass.clustering.lloyd import chunked_topk
from megaclass.clustering.sampling import load_sample
from megaclass.clustering.search import Tree, tree_topk
from megaclass.core.atomic import atomic_path, write_json_atomic, write_text_atomic
from megaclass.core.errors import InputError
from megaclass.core.memory import MemoryPlan
from megaclass.core.rundir import RunDir
from megaclass.data.embeddings import validate_embeddings_dir
from megaclass.data.labels import file_sha256
from megaclass.pipelines.config import RunConfig, embeddings_dir_of
from megaclass.pipelines.ray_session import connect_ray

log = logging.getLogger(__name__)

# Above this many flops (2·n·k·d) the stats assign the sample through the tree, not exactly.
EXACT_STATS_FLOPS = 2e11


def save_array(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr, allow_pickle=False)


def _params(cfg: RunConfig) -> KMeansParams:
    c = cfg.cluster
    return KMeansParams(
        k=c.k,
        niter=c.niter,
        seed=c.seed,
        backend=c.backend,
        chunk_size=c.chunk_size,
        num_workers=c.num_workers,
        bf16=c.bf16,
        coarse_k=c.coarse_k,
        refine_niter=c.refine_niter,
        group_batch=c.group_batch,
        hier_parallel=c.hier_parallel,
    )


def _load_byo_centroids(path: str, k: int) -> np.ndarray:
    try:
        c = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cluster.centroids: cannot read {path} as .npy ({e})") from None
    if c.ndim != 2 or not np.isfinite(c).all():
        raise InputError(f"cluster.centroids: {path} must be a finite 2-D array, got {c.shape}")
    if c.shape[0] != k:
        raise InputError(f"cluster.centroids: {path} has {c.shape[0]} rows but cluster.k = {k}")
    c = c.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-30)


def _feature_width(info: dict[str, Any], feature: str) -> int:
    di, dt = info.get("d_img"), info.get("d_txt")
    if feature == "image" or dt is None:
        return int(di or dt)
    if feature == "text" or di is None:
        return int(dt)
    return int(di) if di == dt else int(di + dt)


def memory_plan(cfg: RunConfig, n: int, d: int) -> MemoryPlan:
    """What the cluster stage will hold: the sample (n x d float32, allocated once), its keys,
    the centroids, and what the backend adds (see each backend's docstring)."""
    c = cfg.cluster
    plan = MemoryPlan(
        "cluster", keys=["cluster.sample_size", "cluster.points_per_centroid", "cluster.k"]
    )
    plan.add(f"sample {n:,} x {d} float32", 4 * n * d)
    plan.add("sample keys and row lists", 100 * n)
    plan.add(f"centroids {c.k:,} x {d} (two copies)", 8 * c.k * d)
    if c.backend == "hierarchical":
        coarse_k = min(c.coarse_k or max(1, round(c.k**0.5)), c.k)
        plan.add(
            "hierarchical groups in flight", hierarchical_peak_bytes(n, d, coarse_k, _params(cfg))
        )
        plan.keys += ["cluster.hier_parallel", "cluster.group_batch", "cluster.num_workers"]
    elif c.backend == "distributed":
        plan.add("Ray object-store copy of the sample", 4 * n * d)
        plan.add("score blocks", 4 * c.chunk_size * c.k)
        plan.keys += ["cluster.chunk_size"]
    else:
        plan.add("score blocks", 4 * min(n, c.chunk_size) * c.k)
        plan.keys += ["cluster.chunk_size"]
    return plan


def run_cluster(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    rd = RunDir(cfg.run_dir)
    done = rd.begin_stage(cfg, "cluster", force)
    if done is not None:
        log.info("cluster: %s exists, stage already complete", rd.success_path("cluster"))
        return done
    out = rd.cluster
    c = cfg.cluster
    t0 = time.perf_counter()
    embed_dir = embeddings_dir_of(cfg)
    info = validate_embeddings_dir(embed_dir)
    target = c.sample_size if c.sample_size is not None else c.k * c.points_per_centroid
    memory_plan(cfg, min(target, info["rows"]), _feature_width(info, c.feature)).check(
        cfg.memory_check
    )
    sample = load_sample(embed_dir, info["stems"], c.feature, target, c.seed)
    x = sample.x
    if len(x) < c.k:
        raise InputError(
            f"cluster.k = {c.k} but the sample has only {len(x)} points "
            f"({info['rows']} rows in {embed_dir}); lower cluster.k or raise cluster.sample_size"
        )
    t_sample = time.perf_counter() - t0

    params = _params(cfg)
    extra: dict[str, Any] = {}
    if c.centroids:
        centroids = _load_byo_centroids(c.centroids, c.k)
        if centroids.shape[1] != x.shape[1]:
            raise InputError(
                f"cluster.centroids: {c.centroids} has width {centroids.shape[1]}, "
                f"the '{c.feature}' feature has {x.shape[1]}"
            )
        objective: list[float] = []
        reseeded: list[int] = []
        seconds = 0.0
    else:
        if c.backend == "distributed" or (c.backend == "hierarchical" and c.hier_parallel == "ray"):
            connect_ray(cfg)
        res = train_kmeans(x, params, state_dir=out / "state")
        centroids = res.centroids.astype(np.float32)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
        objective, reseeded, seconds, extra = res.objective, res.n_reseeded, res.seconds, res.extra

    # Tree of the hierarchical backend: lets assign (method 'tree') avoid an exact 1M-way search.
    tree = None
    if "coarse" in extra and "group_offsets" in extra:
        tree = Tree(extra.pop("coarse"), np.asarray(extra.pop("group_offsets"), dtype=np.int64))
        save_array(out / "tree_coarse.npy", tree.coarse.astype(np.float32))
        save_array(out / "tree_offsets.npy", tree.offsets)
    else:
        for name in ("tree_coarse.npy", "tree_offsets.npy"):
            (out / name).unlink(missing_ok=True)  # a tree from an earlier run would not fit
    extra.pop("two_level_sizes", None)

    # Final assignment of the sample: sizes, balance, agreement with ground-truth classes.
    t1 = time.perf_counter()
    if tree is not None and 2.0 * len(x) * c.k * x.shape[1] > EXACT_STATS_FLOPS:
        lab, sc = tree_topk(x, centroids, tree, 1, c.stats_nprobe)
        how = f"tree(nprobe={c.stats_nprobe})"
    else:
        lab, sc = chunked_topk(x, centroids, 1, c.chunk_size)
        how = "exact"
    lab = lab[:, 0]
    sizes = np.bincount(lab, minlength=c.k)
    stats: dict[str, Any] = {
        "backend": "byo" if c.centroids else c.backend,
        "k": c.k,
        "dim": int(x.shape[1]),
        "feature": c.feature,
        "seed": c.seed,
        "embeddings_dir": str(embed_dir),
        "sample_rows": int(len(x)),
        "sample_target": int(target),
        "total_rows": int(sample.total_rows),
        "objective": [float(v) for v in objective],
        "objective_per_point": [float(v) / len(x) for v in objective],
        "reseeded_per_iteration": [int(v) for v in reseeded],
        "final_assignment": how,
        "final_mean_cosine": float(sc[:, 0].astype(np.float64).mean()),
        "sizes": size_stats(sizes),
        "seconds_sample": t_sample,
        "seconds_kmeans": seconds,
        "seconds_stats": time.perf_counter() - t1,
        "backend_extra": {
            k: v for k, v in extra.items() if np.isscalar(v) or isinstance(v, (list, str))
        },
    }
    if sample.classes is not None:
        stats["quality"] = quality(sample.classes, lab)

    save_array(out / "centroids.npy", centroids)
    sha = file_sha256(out / "centroids.npy")
    write_text_atomic(out / "centroids.sha256", sha + "\n")
    stats["centroid_sha256"] = sha
    plots = out / "plots"
    if objective:
        plot_objective(objective, plots / "objective.png", f"{stats['backend']} k={c.k}")
    plot_sizes(sizes, plots / "sizes.png", f"cluster sizes, k={c.k}")
    stats["plots"] = sorted(str(p.relative_to(out)) for p in plots.glob("*.png"))
    write_json_atomic(out / "stats.json", stats)
    rd.finish_stage("cluster", stats)
    log.info(
        "cluster: k=%d from %d points in %.1f s, imbalance %.3f, %d empty",
        c.k,
        len(x),
        time.perf_counter() - t0,
        stats["sizes"]["imbalance"],
        stats["sizes"]["empty"],
    )
    return stats
