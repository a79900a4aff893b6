"""k-means core: chunked top-k, updates and empty clusters, allocation, backends without Ray."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from megaclass.clustering import lloyd
from megaclass.clustering.backends import train_kmeans
from megaclass.clustering.cluster_stats import imbalance, quality, size_stats
from megaclass.clustering.hierarchical import allocate
from megaclass.clustering.kmeans import KMeansParams, init_centroids
from megaclass.clustering.lloyd import (
    assign_reduce,
    chunked_topk,
    lloyd_reference,
    row_argmax,
    update_centroids,
)
from megaclass.clustering.search import CentroidSearcher, build_tree, tree_topk
from megaclass.clustering.synthetic import planted_sphere
from sklearn.metrics import normalized_mutual_info_score


def _brute(x: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = x.astype(np.float64) @ c.astype(np.float64).T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, axis=1)


@pytest.mark.parametrize("topk", [1, 5])
@pytest.mark.parametrize("chunk,block", [(7, 1 << 20), (64, 300), (64, 40), (1000, 1 << 24)])
def test_chunked_topk_equals_brute_force(topk: int, chunk: int, block: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((301, 12)).astype(np.float32)
    c = rng.standard_normal((97, 12)).astype(np.float32)
    # block=300: 3 rows per block; block=40: 40 centroids per block, so 3 centroid blocks per
    # row (the running top-k merge across centroid blocks)
    lab, sc = chunked_topk(x, c, topk, chunk_size=chunk, block=block)
    ref_i, ref_s = _brute(x, c, topk)
    np.testing.assert_array_equal(lab, ref_i)
    np.testing.assert_allclose(sc, ref_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 64), (1, 64), (5, 63), (40, 100), (64, 1024), (9, 17)])
def test_row_argmax_equals_torch_max_including_ties(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    s = torch.randn(shape, generator=g)
    if shape[0] >= 4 and shape[1] >= 64:
        # (16 lanes) a tie across lanes in the opposite order of the indices: 5 (lane 5) wins
        # over 18 (lane 2); a tie inside one lane (21, 37); a tie with the last column
        s[1, [5, 18]] = 9.0
        s[2, [37, 21]] = 9.0
        s[3, [shape[1] - 1, 18]] = 9.0
    heavy = torch.round(s * 2) / 2  # many ties per row
    for t in (s, heavy, -heavy):
        v, i = row_argmax(t)
        v0, i0 = t.max(dim=1)
        assert torch.equal(v, v0) and torch.equal(i, i0)


def test_cache_sizes_and_tile_choice() -> None:
    """The CPU tile comes from the machine's caches (sysfs, sysconf or the fallback constants):
    twice the L2 in elements, at least MIN_TILE_FLOP of GEMM per tile, >= MIN_TILE_ROWS rows."""
    c = lloyd.cache_sizes()
    assert c["L2"] > 0 and c["L3"] > 0 and c["source"] in ("sysfs", "sysconf", "fallback")
    assert lloyd._read_size("1024K") == 1 << 20 and lloyd._read_size("32M") == 32 << 20
    xeon = {"L2": 2 << 20, "L3": 105 << 20}
    assert lloyd.cpu_tile(512, xeon) == int((2 << 20) * lloyd.TILE_L2_FRACTION) // 4
    assert lloyd.cpu_tile(8, xeon) == lloyd.MIN_TILE_FLOP // 16  # small d: the FLOP floor
    rb, kb = lloyd._tile_shape(10**6, 10**6, 32, 65536, None)
    assert rb >= lloyd.MIN_TILE_ROWS and kb <= lloyd.MAX_CENTROID_BLOCK


@pytest.mark.parametrize("d,k", [(64, 300), (16, 300), (64, 4100)])
def test_default_cpu_paths_equal_float64(d: int, k: int) -> None:
    """The paths the default block takes (d >= 64, k <= 4096: faiss tiles; otherwise torch tiles
    of the cache-sized shape) on 2 tile threads give the float64 labels, sums and counts; Lloyd
    partial sums are bit-for-bit repeatable and equal to 1 thread up to float32 rounding."""
    rng = np.random.default_rng(d + k)
    x = rng.standard_normal((4200, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x[rng.choice(len(x), k, replace=False)]
    s = x.astype(np.float64) @ c.astype(np.float64).T
    ref = s.argmax(1)
    uses_faiss = lloyd._use_faiss(k, d, torch.float32, None)
    assert uses_faiss == (d >= lloyd.FAISS_MIN_D and k <= lloyd.FAISS_MAX_K)
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lab, sc = chunked_topk(x, c, 1, chunk_size=1000)
        np.testing.assert_array_equal(lab[:, 0], ref)
        np.testing.assert_allclose(sc[:, 0], s.max(1), atol=1e-5)
        sums, counts, obj = assign_reduce(x, c, chunk_size=1000)
        again = assign_reduce(x, c, chunk_size=1000)
        np.testing.assert_array_equal(sums, again[0])
        torch.set_num_threads(1)
        one = assign_reduce(x, c, chunk_size=1000)
    finally:
        torch.set_num_threads(prev)
    dense = np.zeros((k, d))
    np.add.at(dense, ref, x.astype(np.float64))
    for sm, cn, ob in ((sums, counts, obj), one):
        np.testing.assert_allclose(sm, dense, atol=1e-4)
        np.testing.assert_array_equal(cn, np.bincount(ref, minlength=k))
        assert ob == pytest.approx(s.max(1).sum(), rel=1e-6)


def test_topk_larger_than_k_is_an_error() -> None:
    with pytest.raises(ValueError, match="topk=4 exceeds"):
        chunked_topk(np.ones((2, 3), np.float32), np.ones((3, 3), np.float32), 4)


@pytest.mark.parametrize("chunk,block", [(33, 1 << 21), (33, 60), (100000, 5)])
def test_assign_reduce_matches_dense(chunk: int, block: int) -> None:
    x, _ = planted_sphere(500, 6, 8, 0.5, 1)
    c = init_centroids(x, 6, 0)
    # block=60: 10-row blocks, float32 partial sums flushed every 40 rows; block=5: centroid
    # blocks of 5 (running maximum across two blocks), one row per block, one flush at the end
    sums, counts, obj = assign_reduce(x, c, chunk_size=chunk, block=block)
    s = x.astype(np.float64) @ c.T.astype(np.float64)
    lab = s.argmax(1)
    ref = np.zeros((6, 8))
    np.add.at(ref, lab, x.astype(np.float64))
    np.testing.assert_allclose(sums, ref, atol=1e-4)
    np.testing.assert_array_equal(counts, np.bincount(lab, minlength=6))
    assert obj == pytest.approx(s.max(1).sum(), rel=1e-6)


def test_empty_clusters_are_split_from_the_largest_deterministically() -> None:
    rng = np.random.default_rng(0)
    sums = rng.standard_normal((5, 4))
    counts = np.array([0, 10, 0, 3, 40])
    sums[[0, 2]] = 0
    a, n1 = update_centroids(sums, counts, np.random.default_rng(7))
    b, n2 = update_centroids(sums, counts, np.random.default_rng(7))
    assert n1 == n2 == 2
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-6)
    big = sums[4] / np.linalg.norm(sums[4])
    # the first empty cluster splits cluster 4 (40 points); after halving (20 each) the second
    # empty cluster splits the next largest, again one of the halves of 4's pair
    assert np.dot(a[0], big) > 0.99 and np.dot(a[4], big) > 0.99
    assert len({tuple(np.round(r, 6)) for r in a}) == 5  # all distinct now


def test_lloyd_reseeds_when_init_has_duplicates() -> None:
    x, _ = planted_sphere(2000, 8, 16, 0.3, 2)
    init = init_centroids(x, 8, 0)
    init[3] = init[5]  # identical centroids: cluster 5 gets nothing (argmax takes the lower index)
    for backend in ("lloyd", "faiss"):
        res = train_kmeans(x, KMeansParams(k=8, niter=6, backend=backend), init=init)
        assert res.n_reseeded[0] >= 1, backend
        lab, _ = chunked_topk(x, res.centroids, 1)
        assert np.bincount(lab[:, 0], minlength=8).min() > 0, backend


@pytest.mark.parametrize("backend", ["faiss", "lloyd", "hierarchical"])
def test_planted_clusters_are_recovered(backend: str) -> None:
    x, y = planted_sphere(4000, 25, 32, 0.15, 3)
    res = train_kmeans(
        x, KMeansParams(k=25, niter=12, backend=backend, seed=1, hier_parallel="threads")
    )
    assert res.centroids.shape == (25, 32)
    lab, _ = chunked_topk(x, res.centroids, 1)
    assert normalized_mutual_info_score(y, lab[:, 0]) >= 0.95


def test_faiss_backend_equals_faiss_kmeans_and_reference() -> None:
    x, _ = planted_sphere(3000, 12, 16, 0.4, 4)
    init = init_centroids(x, 12, 0)
    ref, objs = lloyd_reference(x, init, 7)
    km = faiss.Kmeans(16, 12, niter=7, spherical=True, max_points_per_centroid=10**9, verbose=False)
    km.train(x, init_centroids=init)
    ours = train_kmeans(x, KMeansParams(k=12, niter=7, backend="faiss"), init=init)
    np.testing.assert_allclose(ours.centroids, km.centroids, atol=1e-5)
    np.testing.assert_allclose(ours.centroids, ref, atol=1e-5)
    np.testing.assert_allclose(ours.objective, objs, rtol=1e-5)


def test_resume_from_checkpoint_gives_identical_centroids(tmp_path) -> None:
    x, _ = planted_sphere(3000, 10, 16, 0.5, 5)
    p_full = KMeansParams(k=10, niter=8, backend="lloyd")
    full = train_kmeans(x, p_full, state_dir=tmp_path / "a")
    train_kmeans(x, KMeansParams(k=10, niter=3, backend="lloyd"), state_dir=tmp_path / "b")
    assert (tmp_path / "b" / "iter-0003.npz").exists()
    resumed = train_kmeans(x, p_full, state_dir=tmp_path / "b")
    np.testing.assert_array_equal(full.centroids, resumed.centroids)
    assert full.objective == resumed.objective
    # a torn newest checkpoint is ignored in favour of the previous one
    (tmp_path / "b" / "iter-0008.npz").write_bytes(b"garbage")
    again = train_kmeans(x, p_full, state_dir=tmp_path / "b")
    np.testing.assert_array_equal(full.centroids, again.centroids)


def test_hierarchical_resume_after_lost_batches(tmp_path) -> None:
    x, _ = planted_sphere(6000, 40, 16, 0.4, 6)
    p = KMeansParams(k=120, niter=6, backend="hierarchical", group_batch=2, hier_parallel="threads")
    a = train_kmeans(x, p, state_dir=tmp_path)
    batches = sorted(tmp_path.glob("groups-*/batch-*.npz"))
    assert len(batches) >= 3
    for b in batches[1::2]:
        b.unlink()  # as if killed before these batches finished
    b2 = train_kmeans(x, p, state_dir=tmp_path)
    np.testing.assert_array_equal(a.centroids, b2.centroids)
    # the level-2 time split is reported (the first run clustered every group itself)
    assert a.extra["thread_seconds_sub_kmeans"] > 0 and a.extra["thread_seconds_sub_gather"] >= 0
    assert a.extra["seconds_group_search"] >= 0 and a.extra["sub_workers"] == p.num_workers
    offs = a.extra["group_offsets"]
    assert offs[-1] == 120 and np.all(np.diff(offs) >= 1)


def test_allocate_is_proportional_bounded_and_exact() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        g = int(rng.integers(1, 60))
        pop = rng.integers(0, 50, size=g) * rng.integers(0, 2, size=g) + rng.integers(0, 3, size=g)
        if pop.sum() == 0:
            continue
        nonempty = int((pop > 0).sum())
        k = int(rng.integers(nonempty, pop.sum() + 1))
        a = allocate(pop, k)
        assert a.sum() == k
        assert np.all(a <= pop) and np.all(a[pop > 0] >= 1) and np.all(a[pop == 0] == 0)
        # proportional: a bigger group never gets fewer sub-centroids than a smaller one
        order = np.lexsort((a, pop))  # by population, ties by allocation
        assert np.all(np.diff(a[order]) >= 0)
    # the case that breaks faiss.contrib's two-level helper: tiny groups next to huge ones
    pop = np.array([1] * 50 + [100000])
    a = allocate(pop, 1000)
    assert a.sum() == 1000 and a[:50].tolist() == [1] * 50 and a[-1] == 950
    with pytest.raises(ValueError, match="exceeds the number of points"):
        allocate(np.array([2, 3]), 6)
    with pytest.raises(ValueError, match="smaller than the number of non-empty groups"):
        allocate(np.array([2, 3, 1]), 2)


def test_tree_and_hnsw_search_agree_with_exact() -> None:
    x, _ = planted_sphere(3000, 50, 16, 0.6, 7)
    c = train_kmeans(x, KMeansParams(k=400, niter=5, backend="faiss")).centroids
    ex, exs = chunked_topk(x, c, 3)
    tree = build_tree(c)
    full, _ = tree_topk(x, c, tree, 3, nprobe=len(tree.coarse))
    np.testing.assert_array_equal(full, ex)  # probing every group is exact
    approx, _ = tree_topk(x, c, tree, 1, nprobe=4)
    assert (approx[:, 0] == ex[:, 0]).mean() > 0.9
    h = CentroidSearcher(c, "hnsw")
    hl, hs = h.search(x, 3)
    assert (hl[:, 0] == ex[:, 0]).mean() > 0.95
    np.testing.assert_allclose(
        hs[:, 0][hl[:, 0] == ex[:, 0]], exs[:, 0][hl[:, 0] == ex[:, 0]], atol=1e-5
    )
    h2 = CentroidSearcher(c, "hnsw")  # single-threaded build: reproducible labels
    np.testing.assert_array_equal(h2.search(x, 3)[0], hl)


def test_stats() -> None:
    assert imbalance(np.array([5, 5, 5, 5])) == pytest.approx(1.0)
    assert imbalance(np.array([20, 0, 0, 0])) == pytest.approx(4.0)
    s = size_stats(np.array([0, 1, 5, 6]))
    assert s["empty"] == 1 and s["singleton"] == 1 and s["points"] == 12
    q = quality(["a", "a", "b", "b", None], np.array([3, 3, 1, 1, 0]))
    assert q["rows"] == 4 and q["nmi"] == pytest.approx(1.0) and q["ami"] == pytest.approx(1.0)
    q2 = quality(["a", "b", "a", "b"], np.array([0, 0, 1, 1]))
    assert q2["nmi"] < 0.01 and q2["homogeneity"] < 0.01


def test_hierarchical_makes_no_sorted_copy_of_the_sample() -> None:
    """Peak memory of the hierarchical backend beyond the sample stays well under one more
    sample (it used to sort a full copy of it): numpy's allocations are traced by tracemalloc."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p = KMeansParams(k=400, niter=2, backend="hierarchical", hier_parallel="threads", seed=0)
    tracemalloc.start()
    try:
        res = train_kmeans(x, p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.centroids.shape == (400, 64)
    assert peak < 0.5 * x.nbytes, f"peak {peak / 1e6:.1f} MB for a {x.nbytes / 1e6:.1f} MB sample"
