"""k-means and assignment against the machine's own limits and against faiss, in one run.

Claims measured (issue 5):
  1. float32 GEMM rate of this machine (torch matmul, all threads)            -> the limit
  2. our k-means rate 2·n·k·d·iters / time as a fraction of it                -> target ≥ 0.75
  3. `distributed` backend, 1 worker, vs faiss.Kmeans (same data, iterations) -> time ratio ≤ 1.2
  4. exact chunked assignment throughput vs the GEMM limit                     -> target ≥ 0.7
  5. scale: k = 1,000,000 from 4,000,000 points (d = 32) with `hierarchical`
     (≤ 90 s, no empty clusters, vs a plain faiss two-level run in the same process), then
     all 4M points assigned through the tree (< 2 min), top-1 agreement vs exact on 10k
     points (≥ 0.95), imbalance of the full assignment.

Every figure is printed with the CPU model and ISA ([model; avx2/avx512f/amx...; BLAS]); the JSON
result has them under "machine" (also cache sizes, torch/faiss BLAS and SIMD level, threads).

Usage:  python benchmarks/kmeans.py [--quick] [--skip-scale] [--skip-flat] [--json OUT]
        --quick: small sizes (flat n=50k, k=512, 3 iterations; scale k=100k from 400k): a smoke
        test of every path in about a minute on 2 idle cores; not for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from megaclass.clustering.backends import train_kmeans  # noqa: E402
from megaclass.clustering.cluster_stats import imbalance  # noqa: E402
from megaclass.clustering.hierarchical import allocate  # noqa: E402
from megaclass.clustering.kmeans import KMeansParams, init_centroids  # noqa: E402
from megaclass.clustering.lloyd import cache_sizes, chunked_topk, cpu_tile  # noqa: E402
from megaclass.clustering.search import Tree, tree_topk  # noqa: E402
from megaclass.clustering.synthetic import planted_sphere  # noqa: E402


class Foreign:
    """CPU seconds used by processes outside this process tree (Ray workers started here count
    as ours) while the block ran: a direct measure of interference from other jobs on the
    machine, which the load average only hints at. Linux /proc only; processes that exit inside
    the block are counted as foreign (an over-estimate)."""

    hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _procs() -> dict[int, tuple[int, int]]:
        out = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            r = st[st.rindex(")") + 2 :].split()
            out[int(p)] = (int(r[1]), int(r[11]) + int(r[12]))  # ppid, utime + stime
        return out

    @classmethod
    def _own(cls) -> dict[int, int]:
        procs = cls._procs()
        kids: dict[int, list[int]] = {}
        for pid, (pp, _) in procs.items():
            kids.setdefault(pp, []).append(pid)
        seen, stack = {}, [os.getpid()]
        while stack:
            q = stack.pop()
            if q in procs:
                seen[q] = procs[q][1]
            stack.extend(kids.get(q, []))
        return seen

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]

    def __enter__(self) -> Foreign:
        self.seconds = float("nan")
        try:
            self.b0, self.own0 = self._busy(), self._own()
        except OSError:
            self.b0 = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.b0 is None:
            return
        own1 = self._own()
        own = sum(t - self.own0.get(q, 0) for q, t in own1.items())
        self.seconds = max(0.0, (self._busy() - self.b0 - own) / self.hz)


ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def machine_info() -> dict:
    """What a figure depends on besides the code: CPU model and ISA (from /proc/cpuinfo), the
    cache sizes the CPU tiles are derived from, torch's and faiss's BLAS and SIMD level."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    cfg = torch.__config__.show()
    blas = next(
        (p.split("=", 1)[1] for p in cfg.replace(",", " ").split() if p.startswith("BLAS_INFO=")),
        "?",
    )
    mkl = next((ln.strip(" -") for ln in cfg.splitlines() if "Math Kernel Library" in ln), "")
    caches = cache_sizes()
    return {
        "cpu_model": model,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cpus": os.cpu_count(),
        "cache_bytes": {k: v for k, v in caches.items() if k != "source"},
        "cache_source": caches.get("source"),
        "cpu_tile_floats_d128": cpu_tile(128),
        "torch": torch.__version__,
        "torch_blas": blas + (f" ({mkl})" if mkl else ""),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "faiss_compile_options": faiss.get_compile_options().strip(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def cpu_tag(m: dict) -> str:
    """One short tag printed next to every figure."""
    return f"[{m['cpu_model']}; {'/'.join(m['isa']) or 'no AVX2'}; torch {m['torch_blas'].split(' ')[0]}]"


def gemm_rate(n: int = 4096, reps: int = 5) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


REPS = 3  # runs per candidate in the flat part


def gemm_block_rate(x: np.ndarray, c: np.ndarray, reps: int = 5) -> float:
    """GEMM rate at the shape of our CPU tiles (one torch tile shape, or faiss's 2048-row tiles
    where the search dispatches to faiss), run as the search runs them — one single-threaded GEMM
    per tile on every tile thread at once — for reference: not the limit the targets are
    measured against (that is the square GEMM)."""
    from megaclass.clustering.lloyd import (
        FAISS_TILE_ROWS,
        _run_tiles,
        _tile_shape,
        _use_faiss,
        tile_threads,
    )

    xt, ct = torch.from_numpy(x), torch.from_numpy(c)
    if _use_faiss(len(c), x.shape[1], torch.float32, None):
        rb, kb = min(FAISS_TILE_ROWS, len(x)), len(c)
    else:
        rb, kb = _tile_shape(len(x), len(c), x.shape[1], 65536, None)
    threads = tile_threads(xt)
    xr, cb = xt[:rb], ct[:kb]

    def work(_: int) -> None:
        out = torch.empty(rb, cb.shape[0])
        for _ in range(10):
            torch.mm(xr, cb.T, out=out)

    _run_tiles(threads, work)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        _run_tiles(threads, work)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2.0 * rb * cb.shape[0] * x.shape[1] * threads / best


def flat_claims(quick: bool) -> dict:
    out: dict = {"threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()}
    g = gemm_rate()
    out["gemm_gflops"] = g / 1e9
    n, k, d, it = (50_000, 512, 128, 3) if quick else (200_000, 1024, 128, 5)
    x, _ = planted_sphere(n, 256, d, 0.8, 1)
    init = init_centroids(x, k, 0)
    flops = 2.0 * n * k * d * it

    out["gemm_block_shape_gflops"] = gemm_block_rate(x, init) / 1e9

    # 2.-4. Every candidate runs REPS times, interleaved with its baseline so that a drift of the
    # machine hits both alike; the best run of each counts (as for the GEMM), all are recorded.
    def faiss_run() -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        km = faiss.Kmeans(
            d, k, niter=it, spherical=True, max_points_per_centroid=10**9, verbose=False
        )
        km.train(x, init_centroids=init)
        return time.perf_counter() - t, km.centroids

    t_lloyd, t_faiss, t_assign = [], [], []
    with Foreign() as fg:
        for _ in range(REPS):
            t_lloyd.append(
                train_kmeans(x, KMeansParams(k=k, niter=it, backend="lloyd"), init=init).seconds
            )
            tf, c_faiss = faiss_run()
            t_faiss.append(tf)
            t = time.perf_counter()
            chunked_topk(x, c_faiss, 1)
            t_assign.append(time.perf_counter() - t)
    tl = min(t_lloyd)
    out["lloyd"] = {"n": n, "k": k, "d": d, "iters": it, "seconds": tl, "runs": t_lloyd}
    out["lloyd"]["gflops"] = flops / tl / 1e9
    out["lloyd"]["fraction_of_gemm"] = flops / tl / g
    out["lloyd"]["fraction_of_gemm_median_run"] = flops / float(np.median(t_lloyd)) / g
    out["foreign_cpu_s_lloyd_faiss_assign"] = fg.seconds

    # 3. distributed with 1 worker vs faiss.Kmeans, same init and iterations
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    p = KMeansParams(k=k, niter=it, backend="distributed", num_workers=1)
    t = time.perf_counter()
    train_kmeans(x, p, init=init)  # first run starts the worker pool
    t_first = time.perf_counter() - t
    t_dist, t_dist_iter = [], []
    with Foreign() as fd:
        for _ in range(REPS):
            t = time.perf_counter()
            rd = train_kmeans(x, p, init=init)
            t_dist.append(time.perf_counter() - t)
            t_dist_iter.append(rd.seconds)
            tf, c_faiss = faiss_run()
            t_faiss.append(tf)
    ray.shutdown()
    tf, tdist = min(t_faiss), min(t_dist)
    out["faiss_kmeans"] = {"seconds": tf, "runs": t_faiss, "gflops": flops / tf / 1e9}
    out["distributed_1"] = {
        "seconds_incl_data_load": tdist,
        "runs": t_dist,
        "seconds_iterations": min(t_dist_iter),
        "seconds_first_run_incl_pool_start": t_first,
        "time_ratio_vs_faiss": tdist / tf,
        "time_ratio_vs_faiss_median_runs": float(np.median(t_dist) / np.median(t_faiss)),
        "max_abs_diff_vs_faiss": float(np.abs(rd.centroids - c_faiss).max()),
        "foreign_cpu_s": fd.seconds,
    }

    # 4. exact chunked assignment throughput
    ta = min(t_assign)
    out["assign_exact"] = {
        "rows_per_s": n / ta,
        "runs": t_assign,
        "gflops": 2.0 * n * k * d / ta / 1e9,
        "fraction_of_gemm": 2.0 * n * k * d / ta / g,
        "fraction_of_gemm_median_run": 2.0 * n * k * d / float(np.median(t_assign)) / g,
    }
    return out


def faiss_two_level(x: np.ndarray, k: int, coarse_k: int, niter: int, seed: int) -> np.ndarray:
    """The plain faiss route: faiss level 1, every point assigned, per-group faiss k ∝ population."""
    km = faiss.Kmeans(x.shape[1], coarse_k, niter=niter, spherical=True, seed=seed, verbose=False)
    km.train(x)
    _, lab = km.index.search(x, 1)
    lab = lab[:, 0]
    order = np.argsort(lab, kind="stable")
    pop = np.bincount(lab, minlength=coarse_k)
    off = np.concatenate([[0], np.cumsum(pop)])
    alloc = allocate(pop, k)
    xs = x[order]
    out = []
    for gi in range(coarse_k):
        pts = xs[off[gi] : off[gi + 1]]
        kg = int(alloc[gi])
        if kg == 0:
            continue
        if kg >= len(pts):
            out.append(pts[:kg])
            continue
        sub = faiss.Kmeans(
            x.shape[1],
            kg,
            niter=niter,
            spherical=True,
            seed=seed + gi,
            min_points_per_centroid=1,
            verbose=False,
        )
        sub.train(pts)
        out.append(sub.centroids)
    return np.concatenate(out)


def scale_claim(n: int, k: int, d: int, niter: int, nprobes: list[int], baseline: bool) -> dict:
    out: dict = {"n": n, "k": k, "d": d, "niter_per_level": niter}
    t = time.perf_counter()
    x, _ = planted_sphere(n, 100_000, d, 1.0, 7)  # a mixture of 100k components with heavy noise
    out["seconds_generate"] = time.perf_counter() - t
    import tempfile

    with tempfile.TemporaryDirectory() as state:
        p = KMeansParams(
            k=k, niter=niter, backend="hierarchical", hier_parallel="threads", num_workers=2
        )
        with Foreign() as fh:
            t = time.perf_counter()
            r = train_kmeans(x, p, state_dir=state)
            t_h = time.perf_counter() - t
    out["hierarchical"] = {
        "seconds": t_h,
        **{kk: v for kk, v in r.extra.items() if np.isscalar(v)},
        "with_checkpoints": True,
        "foreign_cpu_s": fh.seconds,
    }
    print("hierarchical:", json.dumps(out["hierarchical"]), flush=True)
    c = r.centroids
    tree = Tree(r.extra["coarse"], r.extra["group_offsets"])
    if baseline:
        with Foreign() as fb:
            t = time.perf_counter()
            faiss_two_level(x, k, r.extra["coarse_k"], niter, 0)
            out["faiss_two_level_seconds"] = time.perf_counter() - t
        out["faiss_two_level_foreign_cpu_s"] = fb.seconds
        out["hierarchical_vs_faiss_two_level"] = t_h / out["faiss_two_level_seconds"]

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(n, 10_000, replace=False))
    t = time.perf_counter()
    ex, ex_s = chunked_topk(x[idx], c, 1)
    out["exact_10k_seconds"] = time.perf_counter() - t
    agree = {}
    for npb in nprobes:
        lab, _ = tree_topk(x[idx], c, tree, 1, npb)
        agree[npb] = float((lab[:, 0] == ex[:, 0]).mean())
    out["top1_agreement_10k"] = agree
    print("agreement:", agree, "exact 10k s:", out["exact_10k_seconds"], flush=True)
    ok = [p for p in nprobes if agree[p] >= 0.95]
    npb = min(ok) if ok else max(nprobes)
    with Foreign() as fa:
        t = time.perf_counter()
        lab, sc = tree_topk(x, c, tree, 1, npb, workers=2)
        t_a = time.perf_counter() - t
    h = np.bincount(lab[:, 0], minlength=k)
    out["assign_all"] = {
        "nprobe": npb,
        "seconds": t_a,
        "rows_per_s": n / t_a,
        "empty_clusters": int((h == 0).sum()),
        "singleton_clusters": int((h == 1).sum()),
        "imbalance": imbalance(h),
        "mean_top1_cosine": float(sc[:, 0].mean()),
        "exact_mean_top1_cosine_10k": float(ex_s[:, 0].mean()),
        "foreign_cpu_s": fa.seconds,
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-flat", action="store_true")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain faiss two-level run")
    ap.add_argument("--niter", type=int, default=6)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    m = machine_info()
    tag = cpu_tag(m)
    res: dict = {"cpus": os.cpu_count(), "machine": m, "load_avg_start": os.getloadavg()}
    print("machine:", json.dumps(m), flush=True)
    if not args.skip_flat:
        res["flat"] = flat_claims(args.quick)
        print(json.dumps(res["flat"], indent=1), flush=True)
    if not args.skip_scale:
        n, k = (400_000, 100_000) if args.quick else (4_000_000, 1_000_000)
        res["scale"] = scale_claim(n, k, 32, args.niter, [2, 4, 8], not args.no_baseline)
        print(json.dumps(res["scale"], indent=1), flush=True)
    res["load_avg_end"] = os.getloadavg()
    f = res.get("flat", {})
    s = res.get("scale", {})
    print(f"\n== summary == {tag}")
    print(
        f"   BLAS: torch {m['torch_blas']} ({m['torch_cpu_capability']}); faiss {m['faiss']} ({m['faiss_compile_options']}); caches {m['cache_bytes']}"
    )
    if f:
        print(
            f"{tag} GEMM {f['gemm_gflops']:.1f} GFLOP/s (4096², {f['threads']} threads); "
            f"at our tile shape, 1 thread per tile {f['gemm_block_shape_gflops']:.1f}"
        )
        print(
            f"{tag} k-means (lloyd) {f['lloyd']['gflops']:.1f} GFLOP/s = {f['lloyd']['fraction_of_gemm']:.2f} of GEMM (target >= 0.75); median run {f['lloyd']['fraction_of_gemm_median_run']:.2f}"
        )
        print(f"{tag} faiss.Kmeans {f['faiss_kmeans']['gflops']:.1f} GFLOP/s")
        print(
            f"{tag} distributed(1) / faiss.Kmeans time = {f['distributed_1']['time_ratio_vs_faiss']:.2f} (target <= 1.2); medians {f['distributed_1']['time_ratio_vs_faiss_median_runs']:.2f}"
        )
        print(
            f"{tag} exact assignment {f['assign_exact']['fraction_of_gemm']:.2f} of GEMM (target >= 0.7); median run {f['assign_exact']['fraction_of_gemm_median_run']:.2f}"
        )
    if s:
        print(
            f"{tag} hierarchical k={s['k']} from n={s['n']}: {s['hierarchical']['seconds']:.1f} s (target <= 90)"
        )
        h = s["hierarchical"]
        print(
            f"   split: level 1 {h['seconds_coarse']:.1f} s, points to groups {h['seconds_group_assign']:.1f} s "
            f"(search {h['seconds_group_search']:.1f}, sort {h['seconds_group_sort']:.1f}), level 2 {h['seconds_sub']:.1f} s wall = "
            f"gathers {h['thread_seconds_sub_gather']:.1f} + k-means {h['thread_seconds_sub_kmeans']:.1f} + other "
            f"{h['thread_seconds_sub_other']:.1f} thread-s on {h['sub_workers']} threads"
        )
        if "faiss_two_level_seconds" in s:
            print(
                f"{tag} plain faiss two-level: {s['faiss_two_level_seconds']:.1f} s; ratio {s['hierarchical_vs_faiss_two_level']:.2f}"
            )
        a = s["assign_all"]
        print(
            f"{tag} assign all through tree (nprobe={a['nprobe']}): {a['seconds']:.1f} s (target < 120), empty {a['empty_clusters']}, imbalance {a['imbalance']:.3f}"
        )
        print(f"top-1 agreement vs exact on 10k: {s['top1_agreement_10k']}")
    print(f"load average start {res['load_avg_start']} end {res['load_avg_end']}")
    fr = {
        "lloyd+faiss+exact": f.get("foreign_cpu_s_lloyd_faiss_assign"),
        "distributed+faiss": f.get("distributed_1", {}).get("foreign_cpu_s"),
        "hierarchical": s.get("hierarchical", {}).get("foreign_cpu_s"),
        "faiss_two_level": s.get("faiss_two_level_foreign_cpu_s"),
        "assign_all": s.get("assign_all", {}).get("foreign_cpu_s"),
    }
    fr = {a: round(b, 2) for a, b in fr.items() if b is not None}
    print(f"CPU seconds used by other processes during each measurement: {fr}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
