"""One training step of the model-parallel PartialFC head alone, against this machine's GEMM floor.

Claim: at sample rate r = 0.1 a step (forward, backward, optimizer) costs at most 1.5× the
time of its three matmuls (the GEMM floor, measured in the same processes right before), peak
memory stays ≤ 4 GB per rank, and r = 0.1 takes ≤ 0.12× the time of r = 1.0.

Setup (defaults): 1,000,000 classes, D = 512, global batch 512, 2 gloo ranks with one thread
each (``torch.set_num_threads(1)``), SGD with momentum 0.9 and weight decay 5e-4 through
``PartialFC.make_optimizer`` (unsampled rows untouched), ArcFace m = 0.5, s = 64. Each rate runs
in fresh processes so that the peak-memory figure (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
the process's peak resident set, including the Python/torch runtime) belongs to that rate.

GEMM floor: the step's three matmuls at the step's shapes — logits (B×D)·(D×S), embedding
gradient (B×S)·(S×D), centre gradient (S×B)·(B×D), S = sampled classes per rank — timed on
random data, both ranks at once (so they share the machine exactly like the step does).

    .venv/bin/python benchmarks/partial_fc.py                      # the recorded run
    .venv/bin/python benchmarks/partial_fc.py --classes 100000     # quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megaclass.core.net import free_port

log = logging.getLogger("benchmarks.partial_fc")
GB = 1e9


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux


def _gemm_floor(b: int, s: int, d: int, reps: int) -> float:
    """Seconds for the step's three matmuls (best of ``reps``)."""
    e = torch.randn(b, d)
    w = torch.randn(s, d)
    g = torch.randn(b, s)
    best = float("inf")
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        torch.mm(e, w.T)
        torch.mm(g, w)
        torch.mm(g.T, e)
        best = min(best, time.perf_counter() - t0)
    del e, w, g
    return best


def _worker(rank: int, world: int, port: int, args, rate: float, queue) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from megaclass.training.heads import PartialFC

    rss_runtime = _rss_gb()
    head = PartialFC(
        args.classes, args.dim, sample_rate=rate, margin="arcface", m=0.5, scale=64.0, seed=0
    )
    opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    b = args.batch // world
    g = torch.Generator().manual_seed(1234 + rank)
    s_local = head.num_local if rate >= 1 else max(1, int(rate * head.num_local))
    floor = _gemm_floor(args.batch, s_local, args.dim, reps=args.gemm_reps if rate < 1 else 1)

    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randn(b, args.dim, generator=g).requires_grad_(True)  # backbone stand-in
        y = torch.randint(0, args.classes, (b,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        loss = head(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        if rank == 0:
            log.info("r=%.2f step %d: %.2f s, loss %.3f", rate, i, dt, loss.item())
    queue.put(
        {
            "rank": rank,
            "step_s": statistics.median(times),
            "floor_s": floor,
            "peak_gb": _rss_gb(),
            "runtime_gb": rss_runtime,
            "sampled": s_local,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def run_rate(args, rate: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, args.world, port, args, rate, q))
        for r in range(args.world)
    ]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return res


def memory_formula(classes: int, gpus: int, d: int, batch: int, rate: float, opt_states: int):
    """Bytes per rank: fp32 centres + optimizer state, plus the sampled working set."""
    local = classes / gpus
    s = rate * local
    static = local * d * 4 * (1 + opt_states)
    working = s * d * 4 * 4 + batch * s * 4 * 2  # rows, normalised rows, grads; logits + probs
    return static, working


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=512, help="global batch")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gemm-reps", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    print(
        f"PartialFC step: C={args.classes:,}, D={args.dim}, global batch {args.batch}, "
        f"{args.world} gloo ranks × {args.threads} thread(s), SGD momentum, lazy rows"
    )
    results = {}
    for rate in args.rates:
        res = run_rate(args, rate)
        results[rate] = res
        step = max(r["step_s"] for r in res)
        floor = max(r["floor_s"] for r in res)
        peak = max(r["peak_gb"] for r in res)
        flops = 3 * 2 * args.batch * res[0]["sampled"] * args.dim
        print(
            f"r={rate:<4}: step {step:7.2f} s | GEMM floor {floor:6.2f} s "
            f"({flops / floor / 1e9:5.1f} GFLOP/s/rank) | step/floor {step / floor:4.2f} | "
            f"peak RSS/rank {peak:5.2f} GB (runtime alone {res[0]['runtime_gb']:.2f} GB) | "
            f"S/rank {res[0]['sampled']:,}"
        )
    if 0.1 in results and 1.0 in results:
        t01 = max(r["step_s"] for r in results[0.1])
        t10 = max(r["step_s"] for r in results[1.0])
        print(f"time ratio r=0.1 / r=1.0: {t01 / t10:.3f} (target ≤ 0.12)")

    print("\nMemory per rank (fp32 centres, D=512, global batch 32768, r=0.1):")
    print("  static = C/N·D·4·(1 + optimizer states)   [SGD momentum: 1 state, AdamW: 2]")
    print("  working ≈ r·C/N·D·4·4 + B·r·C/N·4·2        [sampled rows+grads; logits+probs]")
    for classes in (10_000_000, 100_000_000):
        for gpus in (8, 64):
            parts = []
            for name, n_states in (("SGD", 1), ("AdamW", 2)):
                st, wk = memory_formula(classes, gpus, 512, 32768, 0.1, n_states)
                parts.append(f"{name} {st / GB:6.1f} + {wk / GB:5.1f} GB")
            print(f"  {classes / 1e6:5.0f}M classes on {gpus:2d} GPUs: " + " | ".join(parts))


if __name__ == "__main__":
    main()
