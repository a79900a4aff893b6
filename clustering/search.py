"""Top-k nearest centroids for many points: exact, HNSW, or through a two-level tree.

- ``exact``: chunked matmul with a running top-k (:func:`chunked_topk`) — the right answer
  whenever n·k·d flops are affordable (always on GPU).
- ``hnsw``: faiss ``IndexHNSWFlat`` over the centroids (inner product). The graph is built
  with one thread so that it — and therefore every label — is reproducible.
- ``tree``: the hierarchical backend's structure (coarse centroids, sub-centroids stored by
  group). A point is compared with the coarse centroids, then exactly with the sub-centroids
  of its ``nprobe`` best groups: 2·d·(√k + nprobe·k/√k) flops per point instead of 2·d·k, as
  BLAS matmuls per group. Built from any centroid set by clustering the centroids when the
  cluster stage did not leave a tree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from megaclass.clustering.faiss_import import import_faiss
from megaclass.clustering.lloyd import chunked_topk, topk_torch

log = logging.getLogger(__name__)
METHODS = ("exact", "hnsw", "tree")


@dataclass
class Tree:
    coarse: np.ndarray  # (G, d) float32
    offsets: np.ndarray  # (G+1,) int64: group g's sub-centroids are rows offsets[g]:offsets[g+1]
    order: np.ndarray | None = None  # tree row -> original centroid id (None: identity)


def build_tree(centroids: np.ndarray, coarse_k: int | None = None, seed: int = 0) -> Tree:
    """Group arbitrary centroids under ≈√k coarse centroids (faiss k-means of the centroids)."""
    faiss = import_faiss()

    k, d = centroids.shape
    g = min(k, coarse_k or max(1, round(np.sqrt(k))))
    km = faiss.Kmeans(d, g, niter=10, spherical=True, seed=seed + 1, verbose=False)
    km.train(np.ascontiguousarray(centroids, dtype=np.float32))
    coarse = km.centroids.astype(np.float32)
    lab, _ = chunked_topk(centroids, coarse, 1)
    lab = lab[:, 0]
    order = np.argsort(lab, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(lab, minlength=g))]).astype(np.int64)
    return Tree(coarse, offsets, order)


def tree_topk(
    x: np.ndarray,
    centroids: np.ndarray,
    tree: Tree,
    topk: int = 1,
    nprobe: int = 8,
    chunk_size: int = 131072,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k through the tree; exact within the ``nprobe`` probed groups.

    ``workers`` > 1 runs row chunks on a thread pool (the matmuls release the GIL).
    """
    c = centroids if tree.order is None else centroids[tree.order]
    c = np.ascontiguousarray(c, dtype=np.float32)
    n = len(x)
    nprobe = min(nprobe, len(tree.coarse))
    labels = np.empty((n, topk), dtype=np.int64)
    scores = np.empty((n, topk), dtype=np.float32)
    starts = list(range(0, n, chunk_size))

    def one(r0: int) -> None:
        xr = np.ascontiguousarray(x[r0 : r0 + chunk_size], dtype=np.float32)
        labels[r0 : r0 + len(xr)], scores[r0 : r0 + len(xr)] = _tree_chunk(
            xr, c, tree, topk, nprobe
        )

    if workers > 1 and len(starts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, starts))
    else:
        for r0 in starts:
            one(r0)
    if tree.order is not None:
        labels = np.where(labels >= 0, tree.order[np.maximum(labels, 0)], -1)
    return labels, scores


def _tree_chunk(
    xr: np.ndarray, c: np.ndarray, tree: Tree, topk: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    R, G, off = len(xr), len(tree.coarse), tree.offsets
    gl, _ = chunked_topk(xr, tree.coarse, nprobe)
    cand_s = np.full((R, nprobe * topk), -np.inf, dtype=np.float32)
    cand_i = np.full((R, nprobe * topk), -1, dtype=np.int64)
    flat = gl.ravel()
    srt = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[srt], np.arange(G + 1))
    for g in range(G):
        b0, b1 = bounds[g], bounds[g + 1]
        c0, c1 = off[g], off[g + 1]
        if b0 == b1 or c0 == c1:
            continue
        sel = srt[b0:b1]
        rows, slot = sel // nprobe, sel % nprobe
        s = xr[rows] @ c[c0:c1].T
        kk = min(topk, c1 - c0)
        if kk == 1:
            j = s.argmax(axis=1)[:, None]
        else:
            j = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        v = np.take_along_axis(s, j, axis=1)
        cols = slot[:, None] * topk + np.arange(kk)[None, :]
        cand_s[rows[:, None], cols] = v
        cand_i[rows[:, None], cols] = j + c0
    if topk == 1:
        best = cand_s.argmax(axis=1)[:, None]
    else:
        best = np.argsort(-cand_s, axis=1, kind="stable")[:, :topk]
    return np.take_along_axis(cand_i, best, axis=1), np.take_along_axis(cand_s, best, axis=1)


class CentroidSearcher:
    """Holds the centroids (and the index for approximate methods); built once per actor."""

    def __init__(
        self,
        centroids: np.ndarray,
        method: str = "exact",
        *,
        chunk_size: int = 65536,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        tree: Tree | None = None,
        nprobe: int = 8,
        seed: int = 0,
        device: str = "cpu",
        bf16: bool = False,
    ) -> None:
        """``device`` 'cuda' runs the exact search on the GPU (centroids kept there); ``bf16``
        computes its scores in bfloat16 there (near-ties may then order differently)."""
        if method not in METHODS:
            raise ValueError(f"assign method {method!r} is not one of {', '.join(METHODS)}")
        self.c = np.ascontiguousarray(centroids, dtype=np.float32)
        self.method, self.chunk_size, self.nprobe = method, chunk_size, nprobe
        self.index = None
        self.tree = None
        if method == "hnsw":
            faiss = import_faiss()

            index = faiss.IndexHNSWFlat(self.c.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            prev = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)  # a parallel build gives a different graph each time
            try:
                index.add(self.c)
            finally:
                faiss.omp_set_num_threads(prev)
            index.hnsw.efSearch = ef_search
            self.index = index
        elif method == "tree":
            self.tree = tree if tree is not None else build_tree(self.c, seed=seed)
        self.device = device
        self.ct = None
        if method == "exact" and device != "cpu":
            self.ct = torch.from_numpy(self.c).to(device)
        self.dtype = torch.bfloat16 if bf16 else torch.float32

    def search(self, x: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """``(labels int64 (n, topk), scores float32 (n, topk))``, best first."""
        if topk > len(self.c):
            raise ValueError(f"topk={topk} exceeds the number of centroids {len(self.c)}")
        if self.method == "exact" and self.ct is not None:
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            lab, sc = topk_torch(xt, self.ct, topk, self.chunk_size, dtype=self.dtype)
            return lab.cpu().numpy(), sc.cpu().numpy()
        if self.method == "exact":
            return chunked_topk(x, self.c, topk, self.chunk_size)
        if self.method == "tree":
            return tree_topk(x, self.c, self.tree, topk, self.nprobe)
        self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, topk)
        s, i = self.index.search(np.ascontiguousarray(x, dtype=np.float32), topk)
        return i.astype(np.int64), s.astype(np.float32)
