"""The arithmetic of spherical Lloyd iterations, shared by every backend.

Distances are inner products of L2-normalised vectors (cosines). Assignment is a chunked
matmul with a running top-k/argmax so memory stays at ``block`` floats however large n and k
are — the n×k score matrix is never formed. The update (sum / count, renormalised) and the
re-seeding of empty clusters live here too, so that the faiss-free backends and the float64
reference used by the tests share one definition of an iteration.

On CPU, top-1 search and the Lloyd pass run whole row tiles per thread (:func:`_run_tiles`):
GEMM, row maximum and sums of a tile back to back on one core, the tile sized from that core's
L2 read at run time (:func:`cache_sizes`, :func:`cpu_tile`), or faiss's fused blocked search
per tile at the shapes where it measured faster (:data:`FAISS_MAX_K`). Why: these memory- and
call-bound steps do not speed up with the GEMM, so on a CPU with a faster GEMM they decided
the rate (issue #20: 0.82 of the GEMM rate on a 2-core EPYC, 0.63 on a Xeon). faiss is used
when importable and never required.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch
from megaclass.clustering.faiss_import import import_faiss

# Score-matrix elements computed at once (rows x centroids) by the single-pool path (GPU, and CPU
# when one thread): 2^22 floats = 16 MB, so that the block the GEMM writes is still in the
# last-level cache (32 MB here) when the row maximum reads it back, yet large enough that the
# per-block fixed costs of the reduction ops stay small (measured on k = 1024, d = 128, top-1
# search, medians of interleaved repetitions: 2^20 0.76, 2^21 0.84-0.86, 2^22 0.84-0.86 of the
# GEMM rate; the old 2^24 gave 0.45 with torch's max). Kept as the fallback when the cache sizes
# cannot be read; on CPU the block is otherwise sized from the caches (:func:`cpu_tile`).
DEFAULT_BLOCK = 1 << 22
# On a GPU the score block is sized for the GEMM, not a CPU cache: measured on an H200
# (BENCHMARKS.md, GPU validation), 2^22 ran the assignment at 11-15 TFLOP/s, 2^27 at 185 (bf16).
GPU_BLOCK = 1 << 27
# Centroids per block at most (large k: a few hundred rows against 8192 centroids per GEMM).
MAX_CENTROID_BLOCK = 1 << 13
# Lanes of the column-folded maximum in :func:`row_argmax` (measured: 32 is fastest here; 16
# falls off torch's vectorised reduction path and is 30x slower).
ARGMAX_LANES = 32
# Cache sizes assumed when /sys and sysconf say nothing (the 2-core EPYC the targets were met on).
FALLBACK_L2 = 1 << 20
FALLBACK_L3 = 32 << 20
# Per-thread score tile on CPU = TILE_L2_FRACTION x the core's L2 (see :func:`cpu_tile`), and at
# least this many rows per tile (fewer rows: the GEMM re-reads the centroid panel too often).
TILE_L2_FRACTION = 2.0
MIN_TILE_ROWS = 256
MIN_TILE_FLOP = 64 << 20
# Thread-tiled path's extra float32 partial sums ((threads - 1) x k x d) allowed at most; above,
# assign_reduce keeps one partial and the single-pool path.
MAX_EXTRA_PARTIAL_BYTES = 1 << 30
# Top-1 of a tile through faiss's fused blocked search (``faiss.knn``, one OpenMP thread inside a
# tile thread) where it measured faster than our GEMM + row_argmax: per core (CPU time, 1 thread,
# 2026-12-04) 0.88-0.94 of the GEMM rate against our 0.76-0.79 at k = 1,024, d = 128, and
# 1.08 against 0.86 at k = 4,096, d = 512; but 0.19-0.61 against our 0.55-0.65 at k = 65,536,
# d = 32, and 0.39 with 512-row calls (it allocates a 16 MB block per call). Hence: float32,
# k <= FAISS_MAX_K, d >= FAISS_MIN_D, tiles of FAISS_TILE_ROWS rows.
FAISS_MAX_K = 4096
FAISS_MIN_D = 64
FAISS_TILE_ROWS = 2048


def _read_size(text: str) -> int:
    """'1024K' / '32M' / '512' (sysfs cache size) -> bytes."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * mult


@functools.lru_cache(maxsize=1)
def cache_sizes() -> dict[str, int]:
    """Data-cache sizes of CPU 0 in bytes: ``{"L1": .., "L2": .., "L3": .., "source": ..}``.

    Why: the score tiles must stay in cache between the GEMM that writes them and the row
    maximum that reads them, and the right size differs between CPU families (1 MB L2 on the
    EPYC the targets were met on, 2 MB on recent Xeons). Read from
    ``/sys/devices/system/cpu/cpu0/cache/index*/`` (Linux), else ``os.sysconf``
    (``SC_LEVEL2_CACHE_SIZE``...), else the constants :data:`FALLBACK_L2` / :data:`FALLBACK_L3`.
    """
    out: dict = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/type") as f:
                kind = f.read().strip()
            if kind == "Instruction":
                continue
            with open(f"{base}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{base}/{entry}/size") as f:
                out[f"L{level}"] = _read_size(f.read())
        out["source"] = "sysfs"
    except (OSError, ValueError):
        out = {}
    if "L2" not in out:
        for lvl, name in (
            (1, "SC_LEVEL1_DCACHE_SIZE"),
            (2, "SC_LEVEL2_CACHE_SIZE"),
            (3, "SC_LEVEL3_CACHE_SIZE"),
        ):
            try:
                v = os.sysconf(name)
            except (ValueError, OSError):
                v = 0
            if v and v > 0:
                out[f"L{lvl}"] = int(v)
        out["source"] = "sysconf"
    if "L2" not in out:
        out["source"] = "fallback"
    out.setdefault("L2", FALLBACK_L2)
    out.setdefault("L3", FALLBACK_L3)
    return out


def cpu_tile(d: int = 128, caches: dict[str, int] | None = None) -> int:
    """Score elements per thread tile on CPU: one core's L2 (:data:`TILE_L2_FRACTION` of it),
    but at least :data:`MIN_TILE_FLOP` of GEMM work per tile.

    The thread-tiled path (:func:`_run_tiles`) runs one single-threaded GEMM per tile and the
    row maximum right after it on the same core, so the tile is read back from that core's own
    cache instead of the shared L3 or DRAM (the memory-bound share that grows with a faster
    GEMM). The FLOP floor keeps the fixed cost of the ~15 small torch calls per tile (tens of
    microseconds) small next to the GEMM when d is small.
    """
    c = caches or cache_sizes()
    by_cache = int(c["L2"] * TILE_L2_FRACTION) // 4
    by_flop = MIN_TILE_FLOP // (2 * max(1, d))
    return max(1 << 14, by_cache, by_flop)


def _tile_shape(n: int, k: int, d: int, chunk_size: int, block: int | None) -> tuple[int, int]:
    """(rows, centroids) of one CPU tile: ``block`` elements if given (tests force small tiles),
    else :func:`cpu_tile` with at least :data:`MIN_TILE_ROWS` rows."""
    if block is not None:
        return _blocks(n, k, chunk_size, block)
    t = cpu_tile(d)
    kb = max(1, min(k, MAX_CENTROID_BLOCK, t // MIN_TILE_ROWS))
    rb = max(1, min(chunk_size, t // kb, n))
    return rb, kb


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


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """The tile threads of this process (kept: MKL keeps per-thread buffers; keyed by pid so a
    forked child never waits on its parent's threads)."""
    key = (os.getpid(), threads)
    with _POOLS_LOCK:
        p = _POOLS.get(key)
        if p is None:
            p = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="megaclass-tile")
        return p


def tile_threads(xt: torch.Tensor) -> int:
    """Threads of the tiled CPU path: this thread's torch thread count (1 inside a tile thread,
    so nested calls run inline; 1 for CUDA tensors, which take the single-pool path)."""
    return 1 if xt.is_cuda else max(1, torch.get_num_threads())


def _run_tiles(threads: int, work: Callable[[int], None]) -> None:
    """``work(w)`` for w in 0..threads-1, each on its own pool thread with ONE torch thread.

    Why not torch's own threading: every torch op splits its rows over all threads and joins
    them again (about 15 fork/joins per score block), and the block both threads write lies in
    the shared cache. Here each thread runs whole tiles — GEMM, row maximum, sums — on its own
    core: no join until the chunk ends, the tile stays in that core's cache, and a thread that
    the OS preempts delays only its own tiles, not every op of the other one."""
    if threads == 1:
        work(0)
        return
    prev = torch.get_num_threads()

    def one(w: int) -> None:
        torch.set_num_threads(1)  # thread-local under OpenMP (this thread's ICV + MKL local)
        work(w)

    try:
        futs = [_pool(threads).submit(one, w) for w in range(threads)]
        for f in futs:
            f.result()
    finally:
        torch.set_num_threads(prev)  # builds whose setting is process-wide: restore it


def _faiss_knn() -> ModuleType | None:
    """The faiss module (for ``faiss.knn``, its exact blocked search), or None without faiss:
    the tiled paths then use torch alone."""
    try:
        return import_faiss()
    except ImportError:
        return None


def _use_faiss(k: int, d: int, dtype: torch.dtype, block: int | None) -> bool:
    """Whether CPU top-1 tiles go through faiss (see :data:`FAISS_MAX_K`); never when the
    caller forces a tile size (``block``)."""
    return (
        block is None
        and dtype == torch.float32
        and k <= FAISS_MAX_K
        and d >= FAISS_MIN_D
        and _faiss_knn() is not None
    )


def _faiss_top1_into(
    faiss: ModuleType,
    xr: torch.Tensor,
    c_np: np.ndarray,
    best_s: torch.Tensor,
    best_i: torch.Tensor,
) -> None:
    """Top-1 of the rows ``xr`` by faiss (this thread's OpenMP team: one thread)."""
    sc, lab = faiss.knn(xr.numpy(), c_np, 1, metric=faiss.METRIC_INNER_PRODUCT)
    best_s.copy_(torch.from_numpy(sc[:, 0]))
    best_i.copy_(torch.from_numpy(lab[:, 0]))


@dataclasses.dataclass(frozen=True, eq=False)
class _CpuTiles:
    """How one CPU pass cuts its work into tiles and finds a tile's top-1.

    Why one object: top-1 search (:func:`_top1_tiles`) and the Lloyd pass
    (:func:`_assign_reduce_tiles`) must choose faiss or torch, size their tiles and set up each
    tile thread by the same rule, or the two would drift apart (the Lloyd objective is checked
    against the search's scores). With ``faiss`` set, tiles are :data:`FAISS_TILE_ROWS` rows
    against all k centroids (``c_np``: the centroids faiss reads); else they are
    :func:`_tile_shape` and the score buffer is torch's."""

    cd: torch.Tensor
    dtype: torch.dtype
    rows: int
    cols: int
    faiss: ModuleType | None = None
    c_np: np.ndarray | None = None

    @classmethod
    def plan(
        cls,
        xt: torch.Tensor,
        cd: torch.Tensor,
        chunk_size: int,
        block: int | None,
        dtype: torch.dtype,
    ) -> _CpuTiles:
        """Tiling of the rows ``xt`` against the centroids ``cd`` (already in ``dtype``)."""
        n, d = xt.shape
        k = cd.shape[0]
        faiss = (
            _faiss_knn() if _use_faiss(k, d, dtype, block) and xt.dtype == torch.float32 else None
        )
        if faiss is not None:
            rows = max(1, min(FAISS_TILE_ROWS, n))
            return cls(cd, dtype, rows, k, faiss, np.ascontiguousarray(cd.numpy()))
        rows, cols = _tile_shape(n, k, d, chunk_size, block)
        return cls(cd, dtype, rows, cols)

    def thread_buffer(self) -> torch.Tensor | None:
        """First thing in every tile thread: faiss's OpenMP team of this thread set to one thread
        (the setting is per thread), or this thread's own score buffer for torch tiles."""
        if self.faiss is not None:
            self.faiss.omp_set_num_threads(1)
            return None
        return torch.empty(self.rows * self.cols, dtype=self.dtype)

    def top1_into(
        self,
        xr: torch.Tensor,
        buf: torch.Tensor | None,
        best_s: torch.Tensor,
        best_i: torch.Tensor,
    ) -> None:
        """Best centroid of every row of the tile ``xr`` into ``best_s`` / ``best_i``, with the
        ``buf`` of :meth:`thread_buffer`."""
        if self.faiss is not None:
            _faiss_top1_into(self.faiss, xr, self.c_np, best_s, best_i)
            return
        xr = xr if xr.dtype == self.dtype else xr.to(self.dtype)
        _top1_into(xr, self.cd, self.cols, buf, best_s, best_i)


def _add_assigned(
    part: torch.Tensor,
    counts: torch.Tensor,
    obj: torch.Tensor,
    xr: torch.Tensor,
    best_s: torch.Tensor,
    best_i: torch.Tensor,
    ones: torch.Tensor,
) -> None:
    """Adds rows ``xr``, just assigned to ``best_i`` with scores ``best_s``, to the float32
    partial sums ``part``, the ``counts`` and the float64 objective ``obj`` (all in place) —
    the Lloyd reduction of one block, the same on the tile threads and the single pool."""
    part.index_add_(0, best_i, xr if xr.dtype == torch.float32 else xr.float())
    counts.index_add_(0, best_i, ones)
    obj.add_(best_s.sum(dtype=torch.float64))


def _top1_tiles(
    xt: torch.Tensor,
    cd: torch.Tensor,
    chunk_size: int,
    block: int | None,
    dtype: torch.dtype,
    best_s: torch.Tensor,
    best_i: torch.Tensor,
) -> None:
    """Top-1 of every row on CPU, tile by tile on :func:`tile_threads` threads (dynamic: a
    thread takes the next tile when done, so a preempted core slows only its own tiles)."""
    n = xt.shape[0]
    plan = _CpuTiles.plan(xt, cd, chunk_size, block, dtype)
    rb = plan.rows
    threads = min(tile_threads(xt), -(-n // rb))
    starts = iter(range(0, n, rb))
    lock = threading.Lock()

    def work(_: int) -> None:
        buf = plan.thread_buffer()
        while True:
            with lock:
                r0 = next(starts, None)
            if r0 is None:
                return
            xr = xt[r0 : r0 + rb]
            r = xr.shape[0]
            plan.top1_into(xr, buf, best_s[r0 : r0 + r], best_i[r0 : r0 + r])

    _run_tiles(threads, work)


def topk_torch(
    xt: torch.Tensor,
    ct: torch.Tensor,
    topk: int = 1,
    chunk_size: int = 65536,
    block: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor version of :func:`chunked_topk` (runs on whatever device the tensors are on)."""
    n, k = xt.shape[0], ct.shape[0]
    if topk > k:
        raise ValueError(f"topk={topk} exceeds the number of centroids k={k}")
    cd = ct if ct.dtype == dtype else ct.to(dtype)
    labels = torch.empty((n, topk), dtype=torch.int64, device=xt.device)
    scores = torch.empty((n, topk), dtype=torch.float32, device=xt.device)
    if topk == 1 and not xt.is_cuda and n > 0:
        _top1_tiles(xt, cd, chunk_size, block, dtype, scores[:, 0], labels[:, 0])
        return labels, scores
    block = block or (GPU_BLOCK if xt.is_cuda else DEFAULT_BLOCK)
    rb, kb = _blocks(n, k, chunk_size, block)
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
    every ``chunk_size`` rows. On CPU this runs on tile threads with one partial per thread
    (:func:`_assign_reduce_tiles`) unless those partials would exceed
    :data:`MAX_EXTRA_PARTIAL_BYTES`; CUDA tensors take one pool of ``block`` elements."""
    n, d = xt.shape
    k = ct.shape[0]
    threads = tile_threads(xt)
    if not xt.is_cuda and (threads - 1) * k * d * 4 <= MAX_EXTRA_PARTIAL_BYTES:
        return _assign_reduce_tiles(xt, ct, chunk_size, block, dtype, threads)
    block = block or (GPU_BLOCK if xt.is_cuda else DEFAULT_BLOCK)
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
        _add_assigned(part, counts, obj, xr, best_s[:r], best_i[:r], ones[:r])
        pending += r
        if pending >= flush or r0 + rb >= n:
            sums += part
            part.zero_()
            pending = 0
    return sums, counts, obj


def _assign_reduce_tiles(
    xt: torch.Tensor,
    ct: torch.Tensor,
    chunk_size: int,
    block: int | None,
    dtype: torch.dtype,
    threads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`assign_reduce_torch` on CPU, tile by tile on ``threads`` threads.

    Each thread adds its tiles' rows to its own float32 partial sums right after their
    assignment (rows and tile still in its cache). Tiles are dealt round-robin inside each chunk
    of ``chunk_size`` rows and the partials go into the float64 totals in thread order at every
    chunk's end, so a run is bit-for-bit repeatable for a given thread count (resume relies on
    it); other thread counts differ by float32 rounding of the partial sums only."""
    n, d = xt.shape
    k = ct.shape[0]
    cd = ct if ct.dtype == dtype else ct.to(dtype)
    plan = _CpuTiles.plan(xt, cd, chunk_size, block, dtype)
    rb = plan.rows
    threads = max(1, min(threads, -(-n // rb)))
    sums = torch.zeros((k, d), dtype=torch.float64)
    parts = [torch.zeros((k, d), dtype=torch.float32) for _ in range(threads)]
    counts = [torch.zeros(k, dtype=torch.int64) for _ in range(threads)]
    objs = [torch.zeros((), dtype=torch.float64) for _ in range(threads)]
    ones = torch.ones(rb, dtype=torch.int64)
    flush = rb * max(threads, -(-chunk_size // rb))  # whole tiles per chunk
    for c0 in range(0, n, flush):
        tiles = range(c0, min(n, c0 + flush), rb)

        def work(w: int, tiles: range = tiles) -> None:
            buf = plan.thread_buffer()
            best_s = torch.empty(rb, dtype=torch.float32)
            best_i = torch.empty(rb, dtype=torch.int64)
            for r0 in tiles[w::threads]:
                xr = xt[r0 : min(r0 + rb, n)]
                r = xr.shape[0]
                plan.top1_into(xr, buf, best_s[:r], best_i[:r])
                _add_assigned(parts[w], counts[w], objs[w], xr, best_s[:r], best_i[:r], ones[:r])

        _run_tiles(threads, work)
        for p in parts:
            sums += p
            p.zero_()
    total = counts[0]
    obj = objs[0]
    for w in range(1, threads):
        total += counts[w]
        obj += objs[w]
    return sums, total, obj


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
