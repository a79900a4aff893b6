"""Two-level spherical k-means: the way to a million centroids on modest hardware.

Level 1 clusters a subsample into ``coarse_k ≈ √k`` groups (faiss, checkpointed per iteration)
and assigns every point to its group. Level 2 gives group g ``k_g`` sub-centroids in
proportion to its population (:func:`allocate`: at least 1, never more than the group's points,
summing to exactly k — the allocation that faiss.contrib's two-level helper lacks, which makes it
fail with "clus.k > 0" on skewed input) and clusters each group independently. Groups are
processed in batches — Ray tasks, or a local thread pool (faiss releases the GIL), whichever is
faster on the machine — and each finished batch is checkpointed, so a killed run redoes at
most one batch per worker. Optional flat refinement iterations follow.

The centroids come out ordered by group; ``extra["coarse"]`` and ``extra["group_offsets"]``
describe that tree, which :mod:`megaclass.clustering.search` uses to assign points to 10^6
centroids without an exact 10^6-way search.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from megaclass.clustering.faiss_import import import_faiss
from megaclass.clustering.kmeans import (
    KMeansParams,
    KMeansResult,
    data_fingerprint,
    faiss_iterate,
    init_centroids,
    lloyd_iterate,
    run_iterations,
)
from megaclass.clustering.lloyd import chunked_topk
from megaclass.core.atomic import atomic_path
from tqdm import tqdm

HIER_PARALLEL = ("threads", "ray")
"""Where the groups run: a local thread pool (fastest on one machine) or Ray tasks (several nodes)."""

log = logging.getLogger(__name__)

# faiss's own ceiling: more points per centroid than this add time, not quality.
MAX_POINTS_PER_CENTROID = 256
# Groups asking for at most this many sub-centroids are seeded with k-means++.
SMALL_GROUP_KPP = 64


def allocate(pop: np.ndarray, k: int) -> np.ndarray:
    """Sub-centroids per group ∝ population: ≥1 for every non-empty group, ≤ its population,
    summing to exactly ``k`` (largest-remainder rounding, lowest index first on ties)."""
    pop = np.asarray(pop, dtype=np.int64)
    nonempty = pop > 0
    if k > pop.sum():
        raise ValueError(f"k={k} exceeds the number of points {int(pop.sum())}")
    if k < int(nonempty.sum()):
        raise ValueError(
            f"k={k} is smaller than the number of non-empty groups {int(nonempty.sum())}"
        )
    quota = k * pop / pop.sum()
    alloc = np.where(nonempty, np.clip(np.floor(quota), 1, pop), 0).astype(np.int64)
    idx = np.arange(len(pop))
    while (diff := k - int(alloc.sum())) != 0:
        if diff > 0:
            cand = np.flatnonzero(alloc < pop)
            prio = quota[cand] - alloc[cand]  # most under-served first
            step = 1
        else:
            cand = np.flatnonzero(alloc > 1)
            prio = alloc[cand] - quota[cand]  # most over-served first
            step = -1
        order = np.lexsort((idx[cand], -prio))[: abs(diff)]
        alloc[cand[order]] += step
    return alloc


def _cluster_group(
    x: np.ndarray, k: int, niter: int, seed: int, sizes: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Centroids of one group and (with ``sizes``, one more pass) the sizes of its clusters."""
    faiss = import_faiss()

    n, d = x.shape
    if k >= n:
        c = x[:k].copy()
    elif k == 1:
        m = x.astype(np.float64).sum(axis=0, keepdims=True)
        c = (m / max(np.linalg.norm(m), 1e-30)).astype(np.float32)
    else:
        km = faiss.Kmeans(
            d,
            k,
            niter=niter,
            spherical=True,
            seed=seed,
            min_points_per_centroid=1,
            max_points_per_centroid=MAX_POINTS_PER_CENTROID,
            verbose=False,
        )
        # k-means++ seeding where it is cheap (small k per group); faiss's random rows otherwise
        init = init_centroids(x, k, seed) if k <= SMALL_GROUP_KPP else None
        km.train(x, init_centroids=init)
        c = km.centroids.astype(np.float32)
    if not sizes:
        return c, np.full(k, -1, dtype=np.int64)
    _, lab = faiss_flat_search(c, x)
    return c, np.bincount(lab, minlength=k).astype(np.int64)


def faiss_flat_search(c: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    faiss = import_faiss()

    index = faiss.IndexFlatIP(c.shape[1])
    index.add(np.ascontiguousarray(c))
    s, i = index.search(np.ascontiguousarray(x), 1)
    return s[:, 0], i[:, 0]


def _run_batch(
    xs: np.ndarray,
    offsets: np.ndarray,
    alloc: np.ndarray,
    groups: list[int],
    niter: int,
    seed: int,
    sizes: bool = False,
    rows: np.ndarray | None = None,
    timing: SplitTimer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-cluster ``groups``. Group g's points are ``xs[offsets[g]:offsets[g+1]]`` or, with
    ``rows`` (the points' row numbers sorted by group), ``xs[rows[offsets[g]:offsets[g+1]]]``:
    gathered one group at a time, so no sorted copy of the whole sample is ever made.
    ``timing`` accumulates the thread-seconds of the gathers and of the per-group k-means."""
    cs, sizes_out = [], []
    t_gather = t_km = 0.0
    for g in groups:
        if alloc[g] == 0:
            continue
        lo, hi = offsets[g], offsets[g + 1]
        t = time.perf_counter()
        xg = xs[lo:hi] if rows is None else xs[rows[lo:hi]]
        t_gather += time.perf_counter() - t
        t = time.perf_counter()
        c, h = _cluster_group(xg, int(alloc[g]), niter, seed * 1_000_003 + g, sizes)
        t_km += time.perf_counter() - t
        cs.append(c)
        sizes_out.append(h)
    if timing is not None:
        timing.add(gather=t_gather, kmeans=t_km)
    d = xs.shape[1]
    if not cs:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64)
    return np.concatenate(cs), np.concatenate(sizes_out)


class SplitTimer:
    """Thread-safe sums of named durations (seconds), for the level-2 time split."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, **parts: float) -> None:
        with self._lock:
            for name, v in parts.items():
                self.total[name] = self.total.get(name, 0.0) + v


def _ray_batch(xb, offsets, alloc, groups, niter, seed, sizes):  # noqa: ANN001, ANN202 (Ray task)
    """One batch of groups in a Ray task; ``xb`` holds just this batch's points, sorted by group,
    and ``offsets`` are relative to it."""
    faiss = import_faiss()

    faiss.omp_set_num_threads(1)
    return _run_batch(xb, offsets, alloc, groups, niter, seed, sizes)


def _batch_points(
    x: np.ndarray, rows: np.ndarray, offsets: np.ndarray, groups: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The points of a batch of consecutive groups, sorted by group, and offsets relative to them."""
    lo, hi = int(offsets[groups[0]]), int(offsets[groups[-1] + 1])
    rel = offsets - lo
    return x[rows[lo:hi]], rel


def hierarchical_peak_bytes(n: int, d: int, coarse_k: int, params: KMeansParams) -> int:
    """Memory the hierarchical backend needs beyond the sample itself (n x d float32), in bytes:
    the group order (8n), the labels and scores of the group assignment (8n), and the points of
    the groups in flight — one group per thread, or the batches in flight on Ray (each batch is
    copied once into the object store and freed when its task ends)."""
    group = 2 * (n // max(1, coarse_k) + 1) * d * 4  # a large group, gathered
    inflight = max(1, params.num_workers) * (
        params.group_batch if params.hier_parallel == "ray" else 1
    )
    return 16 * n + min(n * d * 4, inflight * group)


def _save_batch(path: Path, c: np.ndarray, h: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, centroids=c, sizes=h)


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["centroids"].copy(), z["sizes"].copy()
    except Exception:
        return None


def _level2_split(
    t1: float, t_search: float, t2: float, t3: float, total: dict, params: KMeansParams
) -> dict:
    """The time split printed with every run: where level 2's thread-seconds went.

    ``thread_seconds_sub_other`` = workers x level-2 wall - gathers - k-means: the Python
    per-group work, checkpoint writes, and threads idle at the end of the last batches (with
    Ray, the tasks' k-means is not seen here and counts as other)."""
    workers = max(1, params.num_workers)
    gather, km = total.get("gather", 0.0), total.get("kmeans", 0.0)
    return {
        "seconds_group_search": t_search - t1,
        "seconds_group_sort": t2 - t_search,
        "sub_workers": workers,
        "thread_seconds_sub_gather": gather,
        "thread_seconds_sub_kmeans": km,
        "thread_seconds_sub_other": max(0.0, workers * (t3 - t2) - gather - km),
    }


def train_hierarchical(
    x: np.ndarray, params: KMeansParams, state_dir: str | Path | None = None
) -> KMeansResult:
    t0 = time.perf_counter()
    n, d = x.shape
    k = params.k
    coarse_k = min(params.coarse_k or max(1, round(np.sqrt(k))), k)
    sdir = Path(state_dir) if state_dir is not None else None
    coarse_niter = params.niter if params.coarse_niter is None else params.coarse_niter
    sub_niter = params.niter if params.sub_niter is None else params.sub_niter

    # Level 1: coarse clustering of a subsample (faiss's 256 points per centroid).
    rng = np.random.default_rng([params.seed, 3])
    m = min(n, coarse_k * MAX_POINTS_PER_CENTROID)
    sub = x if m == n else x[np.sort(rng.choice(n, size=m, replace=False))]
    init = init_centroids(sub, coarse_k, params.seed)
    fp = data_fingerprint(
        x,
        "hier",
        k,
        coarse_k,
        params.seed,
        coarse_niter,
        sub_niter,
        params.group_batch,
        params.group_sizes,
    )
    coarse_res = run_iterations(
        faiss_iterate(sub, coarse_k),
        init,
        coarse_niter,
        params.seed,
        None if sdir is None else sdir / "coarse",
        fp,
        "coarse",
    )
    coarse = coarse_res.centroids
    t1 = time.perf_counter()

    # Every point to its group. The groups are index ranges of ``order`` (row numbers sorted by
    # group), gathered one group or batch at a time: no sorted copy of the sample is made, so
    # the peak stays about one sample (docs/architecture.md, "Memory").
    # Our tiled exact top-1 rather than faiss's IndexFlatIP search: measured at 1M-500k points x
    # 1,000 groups x d = 32, 0.57 vs 0.63 CPU-s per core and half the wall time at load 5 (no
    # OpenMP barrier per block); same labels on that data.
    lab = chunked_topk(x, coarse, 1, params.chunk_size)[0][:, 0]
    t_search = time.perf_counter()
    order = np.argsort(lab, kind="stable")
    pop = np.bincount(lab, minlength=coarse_k)
    offsets = np.concatenate([[0], np.cumsum(pop)])
    del lab
    alloc = allocate(pop, k)
    t2 = time.perf_counter()

    # Level 2: groups in batches, each batch checkpointed.
    groups = [g for g in range(coarse_k) if alloc[g] > 0]
    batches = [
        groups[i : i + params.group_batch] for i in range(0, len(groups), params.group_batch)
    ]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    bdir = None if sdir is None else sdir / f"groups-{fp}"
    if bdir is not None:
        for b in range(len(batches)):
            got = _load_batch(bdir / f"batch-{b:05d}.npz")
            if got is not None:
                results[b] = got
    todo = [b for b in range(len(batches)) if b not in results]
    gs = params.group_sizes
    split = SplitTimer()
    bar = tqdm(
        total=len(batches), initial=len(results), desc="sub-clusters", leave=False, mininterval=2
    )

    def done(b: int, out: tuple[np.ndarray, np.ndarray]) -> None:
        results[b] = out
        if bdir is not None:
            _save_batch(bdir / f"batch-{b:05d}.npz", *out)
        bar.update(1)

    if params.hier_parallel == "ray":
        import ray
        from megaclass.clustering.distributed import shutdown_pool

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        shutdown_pool()  # cached Lloyd workers would hold the CPUs these tasks need
        task = ray.remote(num_cpus=1)(_ray_batch)
        aref = ray.put(alloc)
        # at most two batches per CPU in flight: each batch's points are copied once into the
        # object store and freed when its task returns, so the store never holds the sample
        limit = 2 * max(1, int(ray.available_resources().get("CPU", params.num_workers)))
        queue, pending = list(todo), {}
        while queue or pending:
            while queue and len(pending) < limit:
                b = queue.pop(0)
                t = time.perf_counter()
                xb, rel = _batch_points(x, order, offsets, batches[b])
                split.add(gather=time.perf_counter() - t)
                ref = task.remote(xb, rel, aref, batches[b], sub_niter, params.seed, gs)
                pending[ref] = b
                del xb
            ready, _ = ray.wait(list(pending), num_returns=1)
            for r in ready:
                done(pending.pop(r), ray.get(r))
    else:
        faiss = import_faiss()

        workers = max(1, params.num_workers)
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers) as pool:
                futs = {
                    pool.submit(
                        _run_batch,
                        x,
                        offsets,
                        alloc,
                        batches[b],
                        sub_niter,
                        params.seed,
                        gs,
                        order,
                        split,
                    ): b
                    for b in todo
                }
                for f, b in futs.items():
                    done(b, f.result())
        finally:
            faiss.omp_set_num_threads(prev)
    bar.close()
    centroids = np.concatenate([results[b][0] for b in range(len(batches))])
    sizes = np.concatenate([results[b][1] for b in range(len(batches))])
    assert centroids.shape == (k, d), centroids.shape
    t3 = time.perf_counter()
    objective = list(coarse_res.objective)
    extra = {
        "coarse_k": coarse_k,
        "coarse": coarse,
        "group_offsets": np.concatenate([[0], np.cumsum(alloc)]),
        "group_batches": len(batches),
        "seconds_coarse": t1 - t0,
        "seconds_group_assign": t2 - t1,
        "seconds_sub": t3 - t2,
        **_level2_split(t1, t_search, t2, t3, split.total, params),
        "group_population_max": int(pop.max()),
        "group_population_min": int(pop.min()),
    }
    log.info(
        "hierarchical k=%d: level 1 %.1f s, points to groups %.1f s (search %.1f, sort %.1f), "
        "level 2 %.1f s wall = gathers %.1f + k-means %.1f thread-s on %d workers, "
        "other (Python, idle, checkpoints) %.1f thread-s",
        k,
        extra["seconds_coarse"],
        extra["seconds_group_assign"],
        extra["seconds_group_search"],
        extra["seconds_group_sort"],
        extra["seconds_sub"],
        extra["thread_seconds_sub_gather"],
        extra["thread_seconds_sub_kmeans"],
        extra["sub_workers"],
        extra["thread_seconds_sub_other"],
    )
    if params.group_sizes:
        extra["two_level_sizes"] = sizes
        extra["empty_after_two_levels"] = int((sizes == 0).sum())
    del order
    # Optional flat refinement (each iteration is a full n×k pass: expensive at k = 10^6 on CPU).
    if params.refine_niter > 0:
        ref = run_iterations(
            lloyd_iterate(x, params.chunk_size),
            centroids,
            params.refine_niter,
            params.seed,
            None if sdir is None else sdir / "refine",
            data_fingerprint(x, "refine", fp),
            "refine",
        )
        centroids = ref.centroids
        objective += ref.objective
        extra["refine_reseeded"] = ref.n_reseeded
        extra.pop("group_offsets")  # refinement moves centroids across groups: tree no longer exact
        extra.pop("coarse")
    extra["seconds_refine"] = time.perf_counter() - t3
    return KMeansResult(
        centroids, objective, list(coarse_res.n_reseeded), time.perf_counter() - t0, extra
    )
