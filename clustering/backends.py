"""Every k-means backend behind one entry: ``train_kmeans(x, params, state_dir)``.

Why a module of its own: the hierarchical backend is built from the flat one (it runs flat
k-means per group), so the dispatch that chooses between them must sit above both; keeping it in
``kmeans.py`` made kmeans and hierarchical import each other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megaclass.clustering.distributed import DistributedLloyd
from megaclass.clustering.hierarchical import train_hierarchical
from megaclass.clustering.kmeans import (
    BACKENDS,
    KMeansParams,
    KMeansResult,
    data_fingerprint,
    faiss_iterate,
    init_centroids,
    lloyd_iterate,
    run_iterations,
)

__all__ = ["BACKENDS", "KMeansParams", "KMeansResult", "train_kmeans"]


def train_kmeans(
    x: np.ndarray,
    params: KMeansParams,
    state_dir: str | Path | None = None,
    init: np.ndarray | None = None,
    ray_address: str | None = None,
) -> KMeansResult:
    """Spherical k-means of the (L2-normalised, float32) rows of ``x``.

    ``state_dir`` enables per-iteration checkpoints and resume; ``init`` overrides the seeded
    initialisation (the tests start every backend from the same centroids).
    """
    if params.backend not in BACKENDS:
        raise ValueError(f"backend {params.backend!r} is not one of {', '.join(BACKENDS)}")
    if params.k > len(x):
        raise ValueError(f"k={params.k} exceeds the number of training points {len(x)}")
    if params.backend == "hierarchical":
        return train_hierarchical(x, params, state_dir)
    if init is None:
        init = init_centroids(x, params.k, params.seed)
    fp = data_fingerprint(x, params.backend, params.k, params.seed, init[:4].tobytes())
    if params.backend == "faiss":
        return run_iterations(
            faiss_iterate(x, params.k), init, params.niter, params.seed, state_dir, fp, "faiss"
        )
    if params.backend == "lloyd":
        return run_iterations(
            lloyd_iterate(x, params.chunk_size), init, params.niter, params.seed, state_dir, fp
        )
    with DistributedLloyd(x, params.num_workers, params.chunk_size, params.bf16) as dl:
        res = run_iterations(dl.iterate, init, params.niter, params.seed, state_dir, fp, "dist")
        res.extra.update(dl.report(res.centroids))
    return res
