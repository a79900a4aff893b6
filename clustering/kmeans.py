"""Flat spherical k-means: parameters, initialisation, the checkpointed iteration loop, and the
faiss and in-process Lloyd iterations. ``clustering/backends.py`` puts every backend behind
one entry, ``train_kmeans(x, params, state_dir)``.

Backends (``params.backend``, the registry :data:`BACKENDS`):

- ``faiss``: one faiss Lloyd iteration per call (``faiss.Kmeans(niter=1)`` started from the
  current centroids), so that every iteration can be checkpointed; faiss does the assignment
  with its BLAS kernels and splits empty clusters itself (seeded from our RNG). GPU faiss is
  used when faiss-gpu sees GPUs.
- ``distributed``: data-parallel Lloyd on Ray workers joined by torch.distributed
  (:mod:`megaclass.clustering.distributed`).
- ``hierarchical``: two levels, ≈√k coarse clusters then population-proportional
  sub-clusters (:mod:`megaclass.clustering.hierarchical`).
- ``lloyd``: the same chunked iteration as ``distributed`` in this process (no Ray).

All flat backends run through :func:`run_iterations`, which owns initialisation, the RNG,
per-iteration checkpoints and resume.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from megaclass.clustering.faiss_import import import_faiss
from megaclass.clustering.fault import maybe_die
from megaclass.clustering.lloyd import assign_reduce, update_centroids
from megaclass.clustering.state import KMeansState, load_latest, rng_from_state, save_state
from tqdm import tqdm

log = logging.getLogger(__name__)

BACKENDS = ("faiss", "distributed", "hierarchical", "lloyd")


@dataclass
class KMeansParams:
    k: int
    niter: int = 20
    seed: int = 0
    backend: str = "faiss"
    chunk_size: int = 65536
    num_workers: int = 2
    bf16: bool = False
    coarse_k: int | None = None
    coarse_niter: int | None = None
    """Hierarchical: iterations of the coarse level (None: niter)."""
    sub_niter: int | None = None
    """Hierarchical: iterations inside each group (None: niter)."""
    refine_niter: int = 0
    """Hierarchical: flat refinement iterations after the two levels."""
    group_sizes: bool = False
    """Hierarchical: one more pass per group to report the two-level cluster sizes."""
    group_batch: int = 64
    hier_parallel: str = "threads"
    """'ray' (Ray tasks) or 'threads' (a local thread pool) for the hierarchical groups."""


@dataclass
class KMeansResult:
    centroids: np.ndarray
    objective: list[float]
    n_reseeded: list[int]
    seconds: float
    extra: dict = field(default_factory=dict)


# An iteration: (centroids, rng) -> (new centroids, objective of the assignment, re-seeded count)
Iterate = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, float, int]]


# k-means++ seeding up to this k (it costs k passes over a subsample); random rows above.
KMEANSPP_MAX_K = 1024


def init_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Seeded initial centroids: k-means++ (on a subsample of ≤ 64·k rows) for k ≤ 1024,
    k distinct random rows for larger k, where k-means++ would cost more than the clustering."""
    if k > len(x):
        raise ValueError(f"k={k} centroids need at least k points, got {len(x)}")
    rng = np.random.default_rng([seed, 1])
    if k > KMEANSPP_MAX_K:
        idx = np.sort(rng.choice(len(x), size=k, replace=False))
        c = x[idx].astype(np.float32)
        return c / np.linalg.norm(c, axis=1, keepdims=True)
    m = min(len(x), 64 * k)
    sub = x if m == len(x) else x[np.sort(rng.choice(len(x), size=m, replace=False))]
    sub = np.ascontiguousarray(sub, dtype=np.float32)
    chosen = [int(rng.integers(m))]
    d2 = np.maximum(2.0 - 2.0 * (sub @ sub[chosen[0]]), 0.0).astype(np.float64)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: take unused rows in order
            j = int(np.flatnonzero(~np.isin(np.arange(m), chosen))[0])
        else:
            j = int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right"))
            j = min(j, m - 1)
        chosen.append(j)
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (sub @ sub[j]), 0.0))
    c = sub[chosen].astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def data_fingerprint(x: np.ndarray, *parts: object) -> str:
    """Identity of (data, parameters) for checkpoints: shape + a strided content hash."""
    h = hashlib.sha256(repr((x.shape, str(x.dtype)) + parts).encode())
    step = max(1, len(x) // 4096)
    h.update(np.ascontiguousarray(x[::step]).tobytes())
    return h.hexdigest()[:32]


def run_iterations(
    iterate: Iterate,
    init: np.ndarray,
    niter: int,
    seed: int,
    state_dir: str | Path | None,
    fingerprint: str,
    desc: str = "k-means",
) -> KMeansResult:
    """Drive ``niter`` iterations from ``init`` with a checkpoint after each one; resume from
    the newest checkpoint of the same fingerprint."""
    t0 = time.perf_counter()
    st = load_latest(state_dir, fingerprint) if state_dir is not None else None
    if st is None:
        rng = np.random.default_rng([seed, 2])
        st = KMeansState(init.astype(np.float32), 0, [], rng.bit_generator.state, [])
        if state_dir is not None:
            save_state(state_dir, st, fingerprint)
    else:
        log.info("%s: resuming after iteration %d of %d", desc, st.iteration, niter)
    rng = rng_from_state(st.rng_state)
    c = st.centroids
    bar = tqdm(total=niter, initial=st.iteration, desc=desc, leave=False, mininterval=2)
    for it in range(st.iteration, niter):
        c, obj, nre = iterate(c, rng)
        st = KMeansState(
            c, it + 1, st.objective + [obj], rng.bit_generator.state, st.n_reseeded + [nre]
        )
        if state_dir is not None:
            save_state(state_dir, st, fingerprint)
            maybe_die("kmeans_iter", it + 1)
        bar.update(1)
        bar.set_postfix(obj=f"{obj:.4g}", reseeded=nre)
    bar.close()
    return KMeansResult(c, st.objective, st.n_reseeded, time.perf_counter() - t0)


def faiss_iterate(x: np.ndarray, k: int) -> Iterate:
    """One faiss Lloyd iteration from the given centroids (faiss splits empty clusters)."""
    faiss = import_faiss()

    x = np.ascontiguousarray(x, dtype=np.float32)
    gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False

    def step(c: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
        km = faiss.Kmeans(
            x.shape[1],
            k,
            niter=1,
            spherical=True,
            seed=int(rng.integers(1, 2**31 - 1)),
            max_points_per_centroid=1 << 30,  # we sample ourselves; never let faiss subsample
            min_points_per_centroid=1,
            verbose=False,
            gpu=gpu,
        )
        km.train(x, init_centroids=np.ascontiguousarray(c, dtype=np.float32))
        stats = km.iteration_stats[0]
        return km.centroids.astype(np.float32), float(stats["obj"]), int(stats["nsplit"])

    return step


def lloyd_iterate(x: np.ndarray, chunk_size: int = 65536) -> Iterate:
    """The chunked iteration in this process (reference for the distributed backend)."""

    def step(c: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
        sums, counts, obj = assign_reduce(x, c, chunk_size)
        new, nre = update_centroids(sums, counts, rng)
        return new, obj, nre

    return step
