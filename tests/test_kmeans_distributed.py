"""The distributed backend (Ray actors + torch.distributed gloo) and Ray-task hierarchical mode.

One real local Ray instance serves the whole module.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import ray
from megaclass.clustering.backends import train_kmeans
from megaclass.clustering.kmeans import KMeansParams, init_centroids
from megaclass.clustering.lloyd import chunked_topk, lloyd_reference
from megaclass.clustering.synthetic import planted_sphere
from sklearn.metrics import normalized_mutual_info_score


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    x, y = planted_sphere(3001, 16, 24, 0.35, 11)  # odd size: uneven slices
    return x, y, init_centroids(x, 16, 0)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_distributed_equals_faiss_lloyd_from_same_init(data, workers: int) -> None:
    x, _, init = data
    niter = 6
    km = faiss.Kmeans(
        24, 16, niter=niter, spherical=True, max_points_per_centroid=10**9, verbose=False
    )
    km.train(x, init_centroids=init)
    ref, ref_obj = lloyd_reference(x, init, niter)
    res = train_kmeans(
        x, KMeansParams(k=16, niter=niter, backend="distributed", num_workers=workers), init=init
    )
    assert res.extra["workers"] == workers
    np.testing.assert_allclose(res.centroids, km.centroids, atol=2e-5)
    np.testing.assert_allclose(res.centroids, ref, atol=2e-5)
    np.testing.assert_allclose(res.objective, km.obj, rtol=1e-5)
    np.testing.assert_allclose(res.objective, ref_obj, rtol=1e-6)


def test_distributed_recovers_planted_clusters_and_resumes(tmp_path) -> None:
    x, y = planted_sphere(3000, 20, 32, 0.15, 12)
    p = KMeansParams(k=20, niter=8, backend="distributed", num_workers=3, seed=2)
    full = train_kmeans(x, p, state_dir=tmp_path / "a")
    lab, _ = chunked_topk(x, full.centroids, 1)
    assert normalized_mutual_info_score(y, lab[:, 0]) >= 0.95
    p3 = KMeansParams(k=20, niter=3, backend="distributed", num_workers=3, seed=2)
    train_kmeans(x, p3, state_dir=tmp_path / "b")
    resumed = train_kmeans(x, p, state_dir=tmp_path / "b")
    np.testing.assert_array_equal(full.centroids, resumed.centroids)


def test_distributed_reseeds_empty_clusters(data) -> None:
    x, _, init = data
    init = init.copy()
    init[2] = init[9]  # cluster 9 starts empty
    ref, _ = lloyd_reference(x, init, 4)
    res = train_kmeans(
        x, KMeansParams(k=16, niter=4, backend="distributed", num_workers=3), init=init
    )
    assert res.n_reseeded[0] >= 1
    np.testing.assert_allclose(res.centroids, ref, atol=2e-5)
    lab, _ = chunked_topk(x, res.centroids, 1)
    assert np.bincount(lab[:, 0], minlength=16).min() > 0


def test_hierarchical_ray_tasks_equal_thread_pool() -> None:
    x, y = planted_sphere(5000, 30, 16, 0.15, 13)
    common = dict(k=30, niter=8, backend="hierarchical", group_batch=2, seed=3)
    a = train_kmeans(x, KMeansParams(**common, hier_parallel="ray"))
    b = train_kmeans(x, KMeansParams(**common, hier_parallel="threads"))
    np.testing.assert_array_equal(a.centroids, b.centroids)
    lab, _ = chunked_topk(x, a.centroids, 1)
    assert normalized_mutual_info_score(y, lab[:, 0]) >= 0.95
