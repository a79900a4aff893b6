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
random data, both ranks at once (so they share the machine exactly like the step does). Also
printed, for information: the same three matmuls into preallocated outputs (the head reuses
its buffers on the CPU, so its own GEMMs do not page-fault fresh outputs the way the floor's do).

``--insightface-dir DIR`` runs insightface's PartialFC_V2 the same way after megaclass (DIR: a
checkout of its ``recognition/arcface_torch``; imported from there, nothing of it is copied
here). ``--repeat N``: N runs per rate, each in fresh processes with its own floor.

    .venv/bin/python benchmarks/partial_fc.py                          # both rates, one run each
    .venv/bin/python benchmarks/partial_fc.py --rates 0.1 --steps 5 --repeat 3   # the r=0.1 claim
    .venv/bin/python benchmarks/partial_fc.py --quick                  # smoke run (≈20 s)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
from _common import GB, memory_formula, peak_rss_gb, spawn_ranks

log = logging.getLogger("benchmarks.partial_fc")


def _gemm_floor(b: int, s: int, d: int, reps: int) -> tuple[float, float]:
    """Seconds for the step's three matmuls (best of ``reps``): the GEMM floor, each product
    into a fresh tensor (the definition the recorded ratios use); and, for information, the
    same three with their outputs written into preallocated buffers (what the head does on the
    CPU since it reuses its buffers: the first figure includes page-faulting two fresh
    outputs of ~B·S and S·D floats)."""
    e = torch.randn(b, d)
    w = torch.randn(s, d)
    g = torch.randn(b, s)
    out1, out2, out3 = torch.empty(b, s), torch.empty(b, d), torch.empty(s, d)
    best = best_out = float("inf")
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        torch.mm(e, w.T)
        torch.mm(g, w)
        torch.mm(g.T, e)
        best = min(best, time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        torch.mm(e, w.T, out=out1)
        torch.mm(g, w, out=out2)
        torch.mm(g.T, e, out=out3)
        best_out = min(best_out, time.perf_counter() - t0)
    del e, w, g, out1, out2, out3
    return best, best_out


def _insightface_head(args, rate: float):
    """insightface's PartialFC_V2 (arcface_torch) from a checkout given by ``--insightface-dir``
    (imported, not copied), ArcFace m = 0.5, s = 64 through its CombinedMarginLoss, and the
    stock SGD its training script uses (momentum 0.9, weight decay 5e-4: v2 semantics, every
    row decayed and advanced). Its module moves tensors with ``.cuda()``; on the CPU that is
    made the identity in this rank process."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # its torch.cuda.amp.autocast
    sys.path.insert(0, os.path.abspath(args.insightface_dir))
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    import losses  # noqa: PLC0415  (from the checkout)
    import partial_fc_v2  # noqa: PLC0415

    margin = losses.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0)
    head = partial_fc_v2.PartialFC_V2(margin, args.dim, args.classes, sample_rate=rate)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    s_local = max(1, int(rate * head.num_local))
    return head, opt, s_local


def _worker(rank: int, world: int, port: int, args, rate: float, impl: str, queue) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    rss_runtime = peak_rss_gb()
    if impl == "insightface":
        head, opt, s_local = _insightface_head(args, rate)
    else:
        from megaclass.training.heads import PartialFC

        head = PartialFC(
            args.classes, args.dim, sample_rate=rate, margin="arcface", m=0.5, scale=64.0, seed=0
        )
        opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        s_local = head.num_local if rate >= 1 else max(1, int(rate * head.num_local))
    b = args.batch // world
    g = torch.Generator().manual_seed(1234 + rank)
    reps = args.gemm_reps if rate < 1 else 1
    floor, floor_out = _gemm_floor(args.batch, s_local, args.dim, reps=reps)

    times = []
    for i in range(args.warmup + args.steps):
        x = torch.randn(b, args.dim, generator=g).requires_grad_(True)  # backbone stand-in
        y = torch.randint(0, args.classes, (b,), generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        loss = head(x, y)
        loss.backward()
        opt.step()
        # After the step, as the trainer does: no old gradient is held during the forward.
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        if rank == 0:
            log.info("%s r=%.2f step %d: %.2f s, loss %.3f", impl, rate, i, dt, loss.item())
    queue.put(
        {
            "rank": rank,
            "step_s": statistics.median(times),
            "floor_s": floor,
            "floor_out_s": floor_out,
            "peak_gb": peak_rss_gb(),
            "runtime_gb": rss_runtime,
            "sampled": s_local,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def run_rate(args, rate: float, impl: str = "megaclass") -> list[dict]:
    """One rate in fresh rank processes (so the peak-memory figure belongs to it)."""
    return spawn_ranks(_worker, args.world, args, rate, impl, timeout=3600)


def summarise(res: list[dict]) -> dict:
    """Max over ranks (the slowest rank sets the step; the floor is taken the same way)."""
    return {
        "step": max(r["step_s"] for r in res),
        "floor": max(r["floor_s"] for r in res),
        "floor_out": max(r["floor_out_s"] for r in res),
        "peak": max(r["peak_gb"] for r in res),
        "runtime": res[0]["runtime_gb"],
        "sampled": res[0]["sampled"],
    }


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
    ap.add_argument("--repeat", type=int, default=1, help="runs per rate, each in fresh processes")
    ap.add_argument(
        "--insightface-dir",
        default=None,
        help="a checkout of insightface's recognition/arcface_torch (partial_fc_v2.py, "
        "losses.py): its PartialFC_V2 runs the same way, after megaclass, per rate",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 100,000 classes, r = 0.1, one timed step (≈20 s)",
    )
    args = ap.parse_args()
    if args.quick:
        args.classes, args.rates, args.steps, args.gemm_reps = 100_000, [0.1], 1, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    print(
        f"PartialFC step: C={args.classes:,}, D={args.dim}, global batch {args.batch}, "
        f"{args.world} gloo ranks × {args.threads} thread(s), SGD momentum, lazy rows; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    impls = ["megaclass"] + (["insightface"] if args.insightface_dir else [])
    results: dict = {}
    for rate in args.rates:
        for impl in impls:
            ratios = []
            for run in range(args.repeat):
                row = summarise(run_rate(args, rate, impl))
                results.setdefault((impl, rate), []).append(row)
                ratios.append(row["step"] / row["floor"])
                flops = 3 * 2 * args.batch * row["sampled"] * args.dim
                print(
                    f"{impl:<11} r={rate:<4} run {run + 1}: step {row['step']:7.2f} s | GEMM "
                    f"floor {row['floor']:6.2f} s ({flops / row['floor'] / 1e9:5.1f} GFLOP/s/rank)"
                    f" | step/floor {ratios[-1]:4.2f} | peak RSS/rank {row['peak']:5.2f} GB "
                    f"(runtime alone {row['runtime']:.2f} GB) | S/rank {row['sampled']:,} | "
                    f"floor with preallocated outputs {row['floor_out']:6.2f} s "
                    f"(step / it {row['step'] / row['floor_out']:4.2f}) | load "
                    f"{os.getloadavg()[0]:.2f}"
                )
            if args.repeat > 1:
                print(
                    f"{impl:<11} r={rate:<4} step/floor over {args.repeat} runs: median "
                    f"{statistics.median(ratios):.2f} (each: "
                    + ", ".join(f"{r:.2f}" for r in ratios)
                    + ")"
                )
    for impl in impls:
        if (impl, 0.1) in results and (impl, 1.0) in results:
            t01 = statistics.median(r["step"] for r in results[(impl, 0.1)])
            t10 = statistics.median(r["step"] for r in results[(impl, 1.0)])
            print(f"{impl}: time ratio r=0.1 / r=1.0: {t01 / t10:.3f} (target ≤ 0.12)")
    if args.insightface_dir:
        for rate in args.rates:
            ours = statistics.median(r["step"] for r in results[("megaclass", rate)])
            theirs = statistics.median(r["step"] for r in results[("insightface", rate)])
            print(f"r={rate}: insightface PartialFC_V2 / megaclass step time {theirs / ours:.2f}×")

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
