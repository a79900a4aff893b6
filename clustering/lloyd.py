"""The arithmetic of spherical Lloyd iterations, shared by every backend.

Distances are inner products of L2-normalised vectors (cosines). Assignment is a chunked
matmul with a running top-k/argmax so memory stays at ``block`` floats however large n and k
are — the n×k score matrix is never formed. The update (sum / count, renormalised) and the
re-seeding of empty clusters live here too, so that the faiss-free backends and the float64
reference used by the tests share one definition of an iteration.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

# Score-matrix elements computed at once (rows x centroids): 2^24 floats = 64 MB.
DEFAULT_BLOCK = 1 << 24


def _blocks(n: int, k: int, chunk_size: int, block: int) -> tuple[int, int]:
    """Rows and centroids per block: centroid blocks of at most 2^16, rows to fill ``block``."""
    kb = min(k, 1 << 16)
    rb = max(1, min(chunk_size, block // kb, n))
    return rb, kb


def topk_torch(
    xt: torch.Tensor,
    ct: torch.Tensor,
    topk: int = 1,
    chunk_size: int = 65536,
    block: int = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor version of :func:`chunked_topk` (runs on whatever device the tensors are on)."""
    n, k = xt.shape[0], ct.shape[0]
    if topk > k:
        raise ValueError(f"topk={topk} exceeds the number of centroids k={k}")
    rb, kb = _blocks(n, k, chunk_size, block)
    cd = ct.to(dtype)
    labels = torch.empty((n, topk), dtype=torch.int64, device=xt.device)
    scores = torch.empty((n, topk), dtype=torch.float32, device=xt.device)
    for r0 in range(0, n, rb):
        xr = xt[r0 : r0 + rb].to(dtype)
        best_s = best_i = None
        for c0 in range(0, k, kb):
            s = (xr @ cd[c0 : c0 + kb].T).float()
            if topk == 1:
                v, i = s.max(dim=1, keepdim=True)
            else:
                v, i = torch.topk(s, min(topk, s.shape[1]), dim=1)
            i = i + c0
            if best_s is None:
                best_s, best_i = v, i
            elif topk == 1:
                better = v > best_s  # strict: the lower index wins ties, like argmax
                best_s = torch.where(better, v, best_s)
                best_i = torch.where(better, i, best_i)
            else:
                cat_s = torch.cat([best_s, v], dim=1)
                cat_i = torch.cat([best_i, i], dim=1)
                best_s, j = torch.topk(cat_s, topk, dim=1)
                best_i = torch.gather(cat_i, 1, j)
        labels[r0 : r0 + rb] = best_i
        scores[r0 : r0 + rb] = best_s
    return labels, scores


def chunked_topk(
    x: np.ndarray,
    c: np.ndarray,
    topk: int = 1,
    chunk_size: int = 65536,
    block: int = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k centroids (by inner product) of every row of ``x``, best first.

    Returns ``(labels int64 (n, topk), scores float32 (n, topk))``. Rows are processed in chunks
    and centroids in blocks, keeping a running top-k, so no n×k matrix exists.
    """
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ct = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
    lab, sc = topk_torch(xt, ct, topk, chunk_size, block, dtype)
    return lab.numpy(), sc.numpy()


def assign_reduce_torch(
    xt: torch.Tensor,
    ct: torch.Tensor,
    chunk_size: int = 65536,
    block: int = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One assignment pass on tensors: per-centroid sums (float64 (k, d)), counts (int64) and
    the objective (sum of best cosines, float64 scalar) — what a worker all-reduces."""
    n, d = xt.shape
    k = ct.shape[0]
    dev = xt.device
    sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
    counts = torch.zeros(k, dtype=torch.int64, device=dev)
    obj = torch.zeros((), dtype=torch.float64, device=dev)
    rb, _ = _blocks(n, k, chunk_size, block)
    part = torch.empty((k, d), dtype=torch.float32, device=dev)
    for r0 in range(0, n, rb):
        xr = xt[r0 : r0 + rb]
        lab, sc = topk_torch(xr, ct, 1, chunk_size, block, dtype)
        li = lab[:, 0]
        part.zero_()
        part.index_add_(0, li, xr.float())
        sums += part
        counts += torch.bincount(li, minlength=k)
        obj += sc[:, 0].double().sum()
    return sums, counts, obj


def assign_reduce(
    x: np.ndarray,
    c: np.ndarray,
    chunk_size: int = 65536,
    block: int = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Numpy wrapper of :func:`assign_reduce_torch`: (sums float64, counts int64, objective)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ct = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))
    sums, counts, obj = assign_reduce_torch(xt, ct, chunk_size, block, dtype)
    return sums.numpy(), counts.numpy(), float(obj)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-30)


def update_centroids(
    sums: np.ndarray,
    counts: np.ndarray,
    rng: np.random.Generator,
    eps: float = 1e-3,
) -> tuple[np.ndarray, int]:
    """New centroids = normalised sums; empty clusters re-seeded by splitting large ones.

    Deterministic given ``rng``'s state: each empty cluster takes the currently largest cluster
    (lowest index on ties), and the two get the big centroid nudged by ±eps·noise, renormalised;
    the big cluster's count is halved so the next empty cluster splits another one (faiss's
    rule). Returns ``(centroids float32 (k, d), number re-seeded)``.
    """
    k, d = sums.shape
    c = normalise_rows(sums.astype(np.float64))
    counts = counts.astype(np.int64).copy()
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        if counts.sum() == 0:
            raise ValueError("all clusters are empty")
        heap = [(-int(counts[j]), int(j)) for j in np.flatnonzero(counts > 1)]
        heapq.heapify(heap)
        for e in empty:
            if not heap:
                break  # fewer points than clusters: nothing left to split
            negc, b = heapq.heappop(heap)
            noise = rng.standard_normal(d) * eps
            base = c[b].copy()
            c[e] = base + noise
            c[b] = base - noise
            c[[e, b]] = normalise_rows(c[[e, b]])
            half = (-negc) // 2
            counts[b] = -negc - half
            counts[e] = half
            for j in (b, int(e)):
                if counts[j] > 1:
                    heapq.heappush(heap, (-int(counts[j]), j))
    return c.astype(np.float32), int(len(empty))


def lloyd_reference(
    x: np.ndarray, init: np.ndarray, niter: int, seed: int = 0
) -> tuple[np.ndarray, list[float]]:
    """Plain float64 numpy Lloyd (full score matrix; small inputs only) — the tests' yardstick."""
    x64 = x.astype(np.float64)
    c = init.astype(np.float32)
    rng = np.random.default_rng(seed)
    objs = []
    for _ in range(niter):
        s = x64 @ c.astype(np.float64).T
        lab = s.argmax(axis=1)
        objs.append(float(s[np.arange(len(x)), lab].sum()))
        sums = np.zeros_like(c, dtype=np.float64)
        np.add.at(sums, lab, x64)
        counts = np.bincount(lab, minlength=len(c))
        c, _ = update_centroids(sums, counts, rng)
    return c, objs
