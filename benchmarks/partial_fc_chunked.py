"""Partial-FC head with ``row_chunk`` or ``class_chunk``: working memory and step time per rank,
chunked vs unchunked.

Claims: with ``PartialFC(..., row_chunk=r)`` a rank's step allocates, besides its static
centres + optimizer state, one r × S logit block next to the S × D gathered rows and their
gradient — not the B × S block (S = r·C/N sampled classes) — and costs the unchunked step's
time (three GEMMs either way: each chunk's gradients are computed in the forward). With
``class_chunk=c`` the block is B × c and the gathered rows c × D, for one more GEMM (≈ 4/3 of
the time where the unchunked step fits at all).

Setup (defaults): 10,000,000 classes, D = 128, r = 0.1, global batch 4,096, 2 gloo ranks with
one thread each, ArcFace (m 0.5, s 64), SGD momentum 0.9 + weight decay 5e-4 through
``PartialFC.make_optimizer`` (unsampled rows untouched), class chunk 8,192, row chunk 128
(``--row-chunk``; at D = 128 its block is the gathered rows' size). Each rank holds
5M classes: 2.56 GB of centres + 2.56 GB of momentum; it scores the 4,096 × 500,000 block,
which unchunked is 8.2 GB of fp32 logits per rank. The unchunked mode runs only if its estimate
fits in this machine's available memory (else it prints why it was skipped), so a second,
smaller size (``--compare-classes``, default 1M) runs both modes for the time ratio.

Memory, per rank process, from /proc/self/status: ``static`` = VmRSS once the head and its
momentum exist, minus VmRSS of the bare runtime (process, torch, gloo, MKL after one GEMM);
``peak`` = the highest VmHWM over the timed steps (reset before each step through
``/proc/self/clear_refs``, so set-up transients do not count); ``working`` = peak − VmRSS once
the static state existed: everything the steps added, including what the allocator kept.
Step time = median over the timed steps (after warm-up), max over ranks. The GEMM rate printed
first (4096×128 · 128×8192 fp32, both ranks at once) shows how busy the machine was.

    .venv/bin/python benchmarks/partial_fc_chunked.py                     # the full run (minutes)
    .venv/bin/python benchmarks/partial_fc_chunked.py --quick            # smoke run, about a minute

``--device cuda`` (or ``cpu``): one process, no process group, the head's numbers on one
accelerator for ``--runs CLASSES:GLOBAL_BATCH`` pairs (classes on that device), chunked and
unchunked where the unchunked fits its free memory; memory from torch.cuda's allocator
(``max_memory_allocated`` over the last step − allocated once centres and momentum exist); it
also compares the chunked and unchunked heads' loss and gradients on the device and times the
CPU draw of the class-sampling scores. The printed memory table is BENCHMARKS.md's (formula).

    python3 benchmarks/partial_fc_chunked.py --device cuda --dim 512 --chunk 8192 --steps 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _common import GB, available_gb, memory_formula, reset_peak, spawn_ranks, status_gb

log = logging.getLogger("benchmarks.partial_fc_chunked")


def _gemm_rate(reps: int = 3) -> float:
    """GFLOP/s of one fp32 GEMM at a chunk-like shape, best of ``reps`` (ranks in lockstep)."""
    a, b = torch.randn(4096, 128), torch.randn(128, 8192)
    best = float("inf")
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * 128 * 8192 / best / 1e9


def _head_and_optimizer(args, classes: int, mode):
    """The benchmark's head (ArcFace m 0.5, s 64) in ``mode`` and its lazy-row SGD optimizer."""
    from megaclass.training.heads import PartialFC

    head = PartialFC(classes, args.dim, sample_rate=args.rate, margin="arcface", m=0.5,
                     scale=64.0, seed=0, **_mode_kwargs(mode))  # fmt: skip
    return head, head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)


def _worker(rank: int, world: int, port: int, args, classes: int, mode, queue) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    from megaclass.training.heads import PartialFC

    # Before the runtime figure: MKL's first GEMM allocates buffers, and the first optimizer
    # imports ≈0.15 GB of torch modules; neither belongs to the head's static state.
    gflops = _gemm_rate()
    PartialFC(world, 4).make_optimizer()
    rss_runtime = status_gb("VmRSS")
    head, opt = _head_and_optimizer(args, classes, mode)
    opt.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)  # what step 1 makes
    rss_static = status_gb("VmRSS")
    b = args.batch // world
    g = torch.Generator().manual_seed(1234 + rank)
    times, peaks = [], []
    can_reset = True
    for i in range(args.warmup + args.steps):
        x = torch.randn(b, args.dim, generator=g).requires_grad_(True)  # backbone stand-in
        y = torch.randint(0, classes, (b,), generator=g)
        dist.barrier()
        can_reset = reset_peak() and can_reset
        t0 = time.perf_counter()
        loss = head(x, y)
        loss.backward()
        opt.step()
        # After the step, as the trainer does: no old gradient is held during the forward.
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        peak = status_gb("VmHWM")
        del loss, x
        if i >= args.warmup:
            times.append(dt)
            peaks.append(peak)
        if rank == 0:
            log.info(
                "C=%d %s step %d: %.2f s, step peak %.2f GB (%.2f above static)",
                classes,
                _mode_tag(mode),
                i,
                dt,
                peak,
                peak - rss_static,
            )
    queue.put(
        {
            "rank": rank,
            "step_s": statistics.median(times),
            "working_gb": max(peaks) - rss_static,
            "peak_gb": max(peaks),
            "runtime_gb": rss_runtime,
            "static_gb": rss_static - rss_runtime,
            "sampled": max(1, int(args.rate * head.num_local)),
            "local": head.num_local,
            "gemm_gflops": gflops,
            "peak_reset": can_reset,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def _mode_kwargs(mode: tuple[str, int] | None) -> dict:
    """PartialFC keyword of a mode: None = unchunked, ("class", c) or ("row", r)."""
    return {} if mode is None else {f"{mode[0]}_chunk": mode[1]}


def _mode_tag(mode: tuple[str, int] | None) -> str:
    return "unchunked" if mode is None else f"{mode[0]}_chunk={mode[1]:,}"


def _ab_worker(rank: int, world: int, port: int, args, classes: int, modes, queue) -> None:
    """Step time of several modes in the SAME processes, steps interleaved (mode a, mode b, a,
    b, ...; each mode its own head and optimizer, the same batches): the paired comparison
    that a machine whose speed drifts from run to run (here: ±15 % between fresh process
    pairs) cannot bias. Memory is not measured here (the heads share the processes)."""
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    heads, opts = zip(*(_head_and_optimizer(args, classes, mode) for mode in modes))
    b = args.batch // world
    g = torch.Generator().manual_seed(1234 + rank)
    times: list[list[float]] = [[] for _ in modes]
    for i in range(args.warmup + args.ab_steps):
        x0 = torch.randn(b, args.dim, generator=g)
        y = torch.randint(0, classes, (b,), generator=g)
        for j, (head, opt) in enumerate(zip(heads, opts)):
            x = x0.clone().requires_grad_(True)
            dist.barrier()
            t0 = time.perf_counter()
            head(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
            if i >= args.warmup:
                times[j].append(float(t))
    queue.put({"rank": rank, "times": times})
    dist.barrier()
    dist.destroy_process_group()


def run_ab(args, classes: int, modes: list) -> None:
    """:func:`_ab_worker` for ``modes``; prints each mode's median and the paired ratios to the
    last mode (unchunked)."""
    times = spawn_ranks(_ab_worker, args.world, args, classes, modes)[0]["times"]
    base = times[-1]
    print(f"  interleaved in the same processes, {args.ab_steps} steps each:")
    for mode, ts in zip(modes, times):
        line = f"    {_mode_tag(mode):<22} median step {statistics.median(ts):6.2f} s"
        if ts is not base:
            pairs = sorted(a / u for a, u in zip(ts, base))
            ratio = statistics.median(ts) / statistics.median(base)
            line += (
                f" | / unchunked: ratio of medians {ratio:.2f}×, paired median "
                f"{statistics.median(pairs):.2f}× (min {pairs[0]:.2f}, max {pairs[-1]:.2f})"
            )
        print(line)


def run(args, classes: int, mode: tuple[str, int] | None) -> list[dict]:
    """One (classes, mode) configuration in fresh rank processes."""
    return spawn_ranks(_worker, args.world, args, classes, mode)


def estimate_gb(classes: int, args, mode: tuple[str, int] | None) -> tuple[float, float]:
    """(static, working) GB per rank: fp32 centres + momentum; the logit block (B × S, B × c
    with class chunks, r × S with row chunks; 4 bytes) plus the sampled rows (gathered copy,
    gradient, optimizer's copies)."""
    local = classes / args.world
    s = args.rate * local
    static = local * args.dim * 4 * 2
    return static / GB, (_block_bytes(args.batch, s, mode) + 4 * s * args.dim * 4) / GB


def _block_bytes(batch: int, s: float, mode: tuple[str, int] | None) -> float:
    """Bytes of one fp32 logit block: B × S, B × chunk (class chunks), rows × S (row chunks)."""
    if mode is None:
        return batch * s * 4
    if mode[0] == "class":
        return batch * min(mode[1], s) * 4
    return min(mode[1], batch) * s * 4


def print_memory_table() -> None:
    """The table of BENCHMARKS.md's chunked-logits section (D = 512, B = 32,768, r = 0.1)."""
    print("\nMemory per rank, 100M classes on 64 GPUs, D=512, global batch 32768, r=0.1:")
    modes = [(None, None), (32768, None), (8192, None), (2048, None), (None, 1024), (None, 256)]
    for chunk, rows in modes:
        parts = []
        for name, n_states in (("SGD", 1), ("AdamW", 2)):
            st, wk = memory_formula(100_000_000, 64, 512, 32768, 0.1, n_states, chunk, rows)
            parts.append(f"{name} {st / GB:5.1f} + {wk / GB:5.2f} GB")
        tag = _mode_tag(None if chunk is None and rows is None else
                        ("class", chunk) if chunk else ("row", rows))  # fmt: skip
        print(f"  {tag:<18}: " + " | ".join(parts))


def report(tag: str, res: list[dict]) -> dict:
    row = {
        "step_s": max(r["step_s"] for r in res),
        "static_gb": max(r["static_gb"] for r in res),
        "working_gb": max(r["working_gb"] for r in res),
        "peak_gb": max(r["peak_gb"] for r in res),
        "runtime_gb": max(r["runtime_gb"] for r in res),
        "gemm": min(r["gemm_gflops"] for r in res),
    }
    reset = all(r["peak_reset"] for r in res)
    print(
        f"  {tag:<22} step {row['step_s']:8.2f} s | static {row['static_gb']:5.2f} GB | "
        f"working {row['working_gb']:5.2f} GB{'' if reset else ' (HWM not reset!)'} | "
        f"peak RSS {row['peak_gb']:5.2f} GB = {row['peak_gb'] / row['static_gb']:4.2f}× static "
        f"(runtime {row['runtime_gb']:.2f}) | GEMM {row['gemm']:5.1f} GFLOP/s/rank"
    )
    return row


# --------------------------------------------------------------------------- one device
def _device_head(classes: int, args, mode, dev: torch.device, **kw):
    """The head built on the meta device and materialised on ``dev`` (N(0, 0.01) drawn there):
    the CPU initialisation of 10M × 512 centres would cost more than the whole measurement."""
    from megaclass.training.heads import PartialFC

    head = PartialFC(
        classes,
        args.dim,
        sample_rate=args.rate,
        margin=kw.pop("margin", "arcface"),
        m=kw.pop("m", 0.5),
        scale=64.0,
        seed=0,
        device="meta",
        **_mode_kwargs(mode),
        **kw,
    )
    head.to_empty(device=dev)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=torch.Generator(dev).manual_seed(0))
        head.step.zero_()
    return head


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _single_equal(dev: torch.device, args) -> list[dict]:
    """Chunked vs unchunked on ``dev`` in float32 (the CPU tests hold both to the float64
    reference): relative max errors of loss, d/dx and d/dW, for the three loss variants."""
    out = []
    cases = (
        ("arcface", {}, ("class", 4096)),
        (
            "cosface k=3 filter",
            {"margin": "cosface", "m": 0.35, "num_subcenters": 3, "interclass_threshold": 0.2},
            ("class", 3000),
        ),
        ("mlcd f=0.5", {"multi_label": True, "feature_rate": 0.5}, ("class", 4096)),
        ("arcface", {}, ("row", 100)),
        ("mlcd f=0.5", {"multi_label": True, "feature_rate": 0.5}, ("row", 100)),
    )
    c, b = 100_000, 512
    g = torch.Generator(dev).manual_seed(3)
    for tag, kw, mode in cases:
        x0 = torch.randn(b, args.dim, device=dev, generator=g) * 3
        if kw.get("multi_label"):
            y = torch.randint(0, c, (b, 4), device=dev, generator=g)
        else:
            y = torch.randint(0, c, (b,), device=dev, generator=g)
        res, w0 = [], None
        for m in (None, mode):
            head = _device_head(c, args, m, dev, sparse_grad=True, **dict(kw))
            if w0 is None:
                w0 = head.weight.detach().clone()
            with torch.no_grad():
                head.weight.copy_(w0)
            x = x0.clone().requires_grad_(True)
            loss = head(x, y, step=1)
            loss.backward()
            gw = head.weight.grad
            res.append((loss.detach(), x.grad, gw.to_dense() if gw.is_sparse else gw))
            del head
        errs = {}
        for name, a, ref in zip(("loss", "d_x", "d_w"), res[1], res[0]):
            errs[name] = float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        out.append({"case": tag, "mode": _mode_tag(mode), **errs})
        print(
            f"  {tag:<20} {_mode_tag(mode)}: rel. max error "
            + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        )
    return out


def single_main(args) -> None:
    """One process on ``--device`` (no process group): the head's numbers on one accelerator,
    for ``--runs`` (classes per device : global batch) pairs, chunked and unchunked where the
    unchunked fits. Memory = torch.cuda's allocator statistics (on CPU: VmRSS/VmHWM)."""
    import json

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(
        f"PartialFC on one {torch.cuda.get_device_name(dev) if cuda else 'CPU'}: D={args.dim}, "
        f"r={args.rate}, class chunk {args.chunk:,}, row chunk {args.row_chunk:,}, "
        f"tf32={args.tf32}"
    )
    record: dict = {"device": str(dev), "dim": args.dim, "rate": args.rate, "tf32": args.tf32}
    record["equal"] = _single_equal(dev, args)
    # The CPU draw of the class-sampling scores (what the head still does on the host).
    draws = {}
    for n in (1_000_000, 10_000_000):
        gen = torch.Generator().manual_seed(0)
        torch.rand(n, generator=gen)
        t0 = time.perf_counter()
        for _ in range(3):
            torch.rand(n, generator=gen)
        draws[n] = (time.perf_counter() - t0) / 3 * 1e3
    record["cpu_draw_ms"] = draws
    print(
        "  CPU draw of the sampling scores: "
        + ", ".join(f"{n:,} classes {ms:.1f} ms" for n, ms in draws.items())
    )
    record["runs"] = []
    for spec in args.runs:
        classes, batch = (int(v) for v in spec.split(":"))
        s = max(1, int(args.rate * classes))
        modes = [("class", args.chunk)] if args.chunk else []
        modes += [("row", args.row_chunk)] if args.row_chunk else []
        for mode in [*modes, None]:
            tag = f"C={classes:,} B={batch:,} {_mode_tag(mode)}"
            row = {"classes": classes, "batch": batch, "mode": _mode_tag(mode)}
            static = classes * args.dim * 4 * 2
            block = _block_bytes(batch, s, mode)
            need = static + 2 * block + 5 * s * args.dim * 4
            free = torch.cuda.mem_get_info(dev)[0] if cuda else available_gb() * GB
            if need > 0.9 * free:
                print(f"  {tag}: SKIPPED, needs ≈{need / GB:.0f} GB, {free / GB:.0f} GB free")
                record["runs"].append({**row, "skipped_need_gb": need / GB})
                continue
            try:
                row.update(_single_run(dev, args, classes, batch, mode))
            except Exception as exc:  # one configuration failing must not lose the others
                print(f"  {tag}: FAILED {type(exc).__name__}: {exc}")
                record["runs"].append({**row, "error": repr(exc)})
                continue
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            record["runs"].append(row)
            print(
                f"  {tag}: step {row['step_ms']:8.2f} ms ({row['tflops_3gemm']:5.1f} TFLOP/s "
                f"of the 3 GEMMs) | static {row['static_gb']:6.2f} GB | working "
                f"{row['working_gb']:6.2f} GB above static"
            )
            if args.json:  # after every configuration: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(record, f, indent=1)


def _single_run(dev: torch.device, args, classes: int, batch: int, mode) -> dict:
    """Warm-up and timed steps of one configuration on one device: time, memory."""
    cuda = dev.type == "cuda"
    flop = 2 * batch * max(1, int(args.rate * classes)) * args.dim
    head = _device_head(classes, args, mode, dev)
    opt = head.make_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)
    g = torch.Generator(dev).manual_seed(1)
    x = torch.randn(batch, args.dim, device=dev, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (batch,), device=dev, generator=g)
    _sync(dev)
    base = torch.cuda.memory_allocated(dev) if cuda else status_gb("VmRSS") * GB
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            reset_peak()
        _sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        x.grad = None
        loss = head(x, y)
        loss.backward()
        opt.step()
        _sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(dev) if cuda else status_gb("VmHWM") * GB
    ms = statistics.median(times) * 1e3
    return {
        "step_ms": ms,
        "static_gb": base / GB,
        "working_gb": (peak - base) / GB,
        "tflops_3gemm": 3 * flop / (ms * 1e-3) / 1e12,
        "loss": float(loss.detach()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=10_000_000)
    ap.add_argument(
        "--compare-classes",
        type=int,
        default=1_000_000,
        help="second size where both modes run (0: skip)",
    )
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=4096, help="global batch")
    ap.add_argument("--chunk", type=int, default=8192, help="class_chunk (0: skip the mode)")
    ap.add_argument("--row-chunk", type=int, default=128, help="row_chunk (0: skip the mode)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--ab-steps",
        type=int,
        default=8,
        help="at the compare size: steps per mode interleaved in the same processes (0: skip)",
    )
    ap.add_argument(
        "--mem-fraction",
        type=float,
        default=0.95,
        help="run a mode only if its estimate fits this share of MemAvailable",
    )
    ap.add_argument(
        "--device",
        default=None,
        help="one process on this device (cuda, cpu) instead of gloo ranks",
    )
    ap.add_argument(
        "--runs",
        nargs="+",
        default=["1000000:512", "1000000:32768", "10000000:32768"],
        help="--device mode: CLASSES:GLOBAL_BATCH pairs, classes on the device",
    )
    ap.add_argument("--tf32", action="store_true", help="--device mode: allow TF32 matmuls")
    ap.add_argument("--json", default=None, help="--device mode: write the results here")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 200,000 classes (and 100,000 for the ratio), global batch 512, "
        "chunk 1,024, one timed step (≈1 minute)",
    )
    args = ap.parse_args()
    if args.quick:
        args.classes, args.compare_classes, args.batch, args.chunk = 200_000, 100_000, 512, 1024
        args.row_chunk = 128
        args.steps = 1
    if args.device:
        return single_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    print(
        f"PartialFC, chunked vs unchunked: D={args.dim}, r={args.rate}, global batch "
        f"{args.batch}, class chunk {args.chunk:,}, row chunk {args.row_chunk:,}, {args.world} "
        f"gloo ranks × {args.threads} thread(s), SGD momentum, lazy rows"
    )
    print_memory_table()
    modes = [("class", args.chunk)] if args.chunk else []
    modes += [("row", args.row_chunk)] if args.row_chunk else []
    sizes = [args.classes] + ([args.compare_classes] if args.compare_classes else [])
    for classes in sizes:
        s = int(args.rate * classes / args.world)
        print(f"\nC = {classes:,}: {classes // args.world:,} classes, S = {s:,} sampled per rank")
        rows = {}
        for mode in [*modes, None]:
            st, wk = estimate_gb(classes, args, mode)
            need = args.world * (st + wk + 1.0)  # + ≈1 GB runtime and slack per rank
            tag = _mode_tag(mode)
            print(f"  {tag:<22} estimate per rank: static {st:.2f} GB + working {wk:.2f} GB")
            if need > args.mem_fraction * available_gb():
                print(
                    f"  {tag:<22} SKIPPED: needs ≈{need:.1f} GB for {args.world} ranks, "
                    f"{available_gb():.1f} GB available"
                )
                continue
            rows[mode] = report(tag, run(args, classes, mode))
        if args.ab_steps and len(rows) == len(modes) + 1:  # every mode fits: paired run too
            run_ab(args, classes, [*modes, None])
        for mode in modes:
            if mode in rows and ("row", args.row_chunk) in rows and mode[0] == "class":
                c, r = rows[mode], rows[("row", args.row_chunk)]
                print(f"  class / row chunks: step time {c['step_s'] / r['step_s']:.2f}×")
            if mode in rows and None in rows:
                c, u = rows[mode], rows[None]
                gemms = "4 GEMMs vs 3: 1.33×" if mode[0] == "class" else "3 GEMMs vs 3: 1.0×"
                print(
                    f"  {_mode_tag(mode)} / unchunked: step time {c['step_s'] / u['step_s']:.2f}× "
                    f"({gemms} expected), working memory "
                    f"{c['working_gb'] / u['working_gb']:.2f}×, peak RSS "
                    f"{c['peak_gb'] / u['peak_gb']:.2f}×"
                )


if __name__ == "__main__":
    main()
