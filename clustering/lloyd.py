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

# Score-matrix elements computed at once (rows x centroids): 2^22 floats = 16 MB, so that the
# block the GEMM writes is still in the last-level cache (32 MB here) when the row maximum reads
# it back, yet large enough that the per-block fixed costs of the reduction ops stay small
# (measured on k = 1024, d = 128, top-1 search, medians of interleaved repetitions: 2^20 0.76,
# 2^21 0.84-0.86, 2^22 0.84-0.86 of the GEMM rate; the old 2^24 gave 0.45 with torch's max).
DEFAULT_BLOCK = 1 << 22
# On a GPU the score block is sized for the GEMM, not a CPU cache: measured on an H200
# (BENCHMARKS.md, GPU validation), 2^22 ran the assignment at 11-15 TFLOP/s, 2^27 at 185 (bf16).
GPU_BLOCK = 1 << 27
# Centroids per block at most (large k: a few hundred rows against 8192 centroids per GEMM).
MAX_CENTROID_BLOCK = 1 << 13
# Lanes of the column-folded maximum in :func:`row_argmax` (measured: 32 is fastest here; 16
# falls off torch's vectorised reduction path and is 30x slower).
ARGMAX_LANES = 32


def _blocks(n: int, k: int, chunk_size: int, block: int) -> tuple[int, int]:
    """Rows and centroids per block: centroid blocks of at most 2^13, rows to fill ``block``."""
    kb = max(1, min(k, MAX_CENTROID_BLOCK, block))
    rb = max(1, min(chunk_size, block // kb, n))
    return rb, kb


def row_argmax(s: torch.Tensor, lanes: int = ARGMAX_LANES) -> tuple[torch.Tensor, torch.Tensor]:
    """``s.max(dim=1)`` of a 2-D CPU tensor — same values, same indices (the first maximum of a
    row) — about three times faster.

    torch's max-with-index reduction runs a scalar loop; a plain maximum is vectorised. So the
    row is folded into ``lanes`` columns (``view(R, K/lanes, lanes).amax(1)``, vectorised), the
    best lane found on that small (R, lanes) result, and the index inside the winning lane by an
    argmax over its K/lanes entries. Where the row maximum occurs in two lanes, the lane order
    may differ from the index order, so those (rare) rows are redone with a plain argmax.
    """
    R, K = s.shape
    km = K - K % lanes
    if s.is_cuda or km < 4 * lanes or R == 0:
        return s.max(dim=1)
    nb = km // lanes
    v3 = s[:, :km].unflatten(1, (nb, lanes))
    lane = v3.amax(dim=1)  # (R, lanes)
    v, ln = lane.max(dim=1)
    rows = _arange(R, s.device)
    idx = v3[rows, :, ln].argmax(dim=1).mul_(lanes).add_(ln)
    ties = lane.eq_(v[:, None]).sum(dim=1, dtype=torch.int32)  # lanes holding the maximum
    if int(ties.max()) > 1:
        redo = torch.nonzero(ties > 1).flatten()
        idx[redo] = s[redo, :km].argmax(dim=1)
    if km != K:  # the last K % lanes columns
        tv, ti = s[:, km:].max(dim=1)
        better = tv > v
        v = torch.where(better, tv, v)
        idx = torch.where(better, ti + km, idx)
    return v, idx


_ARANGE: dict = {}


def _arange(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    a = _ARANGE.get(key)
    if a is None:
        if len(_ARANGE) > 64:
            _ARANGE.clear()
        a = _ARANGE[key] = torch.arange(n, device=device)
    return a


def _scores_into(buf: torch.Tensor, xr: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``xr @ cb.T`` written into the preallocated ``buf`` (no allocation per block)."""
    s = buf[: xr.shape[0] * cb.shape[0]].view(xr.shape[0], cb.shape[0])
    torch.mm(xr, cb.T, out=s)
    return s


def _top1_into(
    xr: torch.Tensor,
    cd: torch.Tensor,
    kb: int,
    buf: torch.Tensor,
    best_s: torch.Tensor,
    best_i: torch.Tensor,
) -> None:
    """Best centroid of every row of ``xr`` into ``best_s`` (float32) / ``best_i`` (int64),
    ``kb`` centroids at a time with a running maximum (the lower index wins ties)."""
    for c0 in range(0, cd.shape[0], kb):
        v, i = row_argmax(_scores_into(buf, xr, cd[c0 : c0 + kb]))
        if c0 == 0:
            best_s.copy_(v)
            best_i.copy_(i)
        else:
            better = v > best_s  # strict: the lower index wins ties, like argmax
            best_s.copy_(torch.where(better, v.to(best_s.dtype), best_s))
            best_i.copy_(torch.where(better, i + c0, best_i))


def topk_torch(
    xt: torch.Tensor,
    ct: torch.Tensor,
    topk: int = 1,
    chunk_size: int = 65536,
    block: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor version of :func:`chunked_topk` (runs on whatever device the tensors are on)."""
    block = block or (GPU_BLOCK if xt.is_cuda else DEFAULT_BLOCK)
    n, k = xt.shape[0], ct.shape[0]
    if topk > k:
        raise ValueError(f"topk={topk} exceeds the number of centroids k={k}")
    rb, kb = _blocks(n, k, chunk_size, block)
    cd = ct if ct.dtype == dtype else ct.to(dtype)
    labels = torch.empty((n, topk), dtype=torch.int64, device=xt.device)
    scores = torch.empty((n, topk), dtype=torch.float32, device=xt.device)
    buf = torch.empty(rb * kb, dtype=dtype, device=xt.device)
    for r0 in range(0, n, rb):
        xr = xt[r0 : r0 + rb]
        xr = xr if xr.dtype == dtype else xr.to(dtype)
        if topk == 1:
            _top1_into(xr, cd, kb, buf, scores[r0 : r0 + rb, 0], labels[r0 : r0 + rb, 0])
            continue
        best_s = best_i = None
        for c0 in range(0, k, kb):
            s = _scores_into(buf, xr, cd[c0 : c0 + kb]).float()
            v, i = torch.topk(s, min(topk, s.shape[1]), dim=1)
            i = i + c0
            if best_s is None:
                best_s, best_i = v, i
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
    block: int | None = None,
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
    block: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One assignment pass on tensors: per-centroid sums (float64 (k, d)), counts (int64) and
    the objective (sum of best cosines, float64 scalar) — what a worker all-reduces.

    Each block of rows is added to its centroids' float32 partial sums right after its
    assignment (while the rows are still in cache); the partial sums go into the float64 totals
    every ``chunk_size`` rows."""
    block = block or (GPU_BLOCK if xt.is_cuda else DEFAULT_BLOCK)
    n, d = xt.shape
    k = ct.shape[0]
    dev = xt.device
    sums = torch.zeros((k, d), dtype=torch.float64, device=dev)
    counts = torch.zeros(k, dtype=torch.int64, device=dev)
    obj = torch.zeros((), dtype=torch.float64, device=dev)
    rb, kb = _blocks(n, k, chunk_size, block)
    cd = ct if ct.dtype == dtype else ct.to(dtype)
    buf = torch.empty(rb * kb, dtype=dtype, device=dev)
    part = torch.zeros((k, d), dtype=torch.float32, device=dev)
    best_s = torch.empty(rb, dtype=torch.float32, device=dev)
    best_i = torch.empty(rb, dtype=torch.int64, device=dev)
    ones = torch.ones(rb, dtype=torch.int64, device=dev)
    flush = max(chunk_size, rb)
    pending = 0
    for r0 in range(0, n, rb):
        xr = xt[r0 : r0 + rb]
        r = xr.shape[0]
        _top1_into(xr if xr.dtype == dtype else xr.to(dtype), cd, kb, buf, best_s[:r], best_i[:r])
        li = best_i[:r]
        part.index_add_(0, li, xr if xr.dtype == torch.float32 else xr.float())
        counts.index_add_(0, li, ones[:r])
        obj += best_s[:r].sum(dtype=torch.float64)
        pending += r
        if pending >= flush or r0 + rb >= n:
            sums += part
            part.zero_()
            pending = 0
    return sums, counts, obj


def assign_reduce(
    x: np.ndarray,
    c: np.ndarray,
    chunk_size: int = 65536,
    block: int | None = None,
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
