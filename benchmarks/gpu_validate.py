"""One-shot validation of megaclass's GPU paths on a single GPU (NCCL world size 1).

Meant to be run once on a lent GPU machine, where every second counts: every check runs in its
own try/except (one failure does not hide the others), the results are written after each
check (a run killed at its time limit still leaves them), and the whole run stays well under
four minutes on an H200. ``--device cpu`` runs the same code with tiny sizes and gloo, as a
dry run on a machine without a GPU.

Checks:
  env           torch / CUDA / cuDNN / NCCL versions, the GPU, package versions, whether faiss
                and ray are importable; the machine's own bf16 and fp32 GEMM rates (8192³)
  nccl          a process group of one rank (tcp rendezvous on 127.0.0.1, a free port) and the
                collectives the model-parallel head uses, including the all-gather autograd
                function with its reduce-scatter backward (on one rank the head itself skips
                every collective, so they are run explicitly here)
  pfc_accuracy  PartialFC forward + backward (+ one row-sparse SGD step) in float32 on the
                device against the same head in float64 on the CPU (same weights, labels and
                step, hence the same sampled classes and dims): ArcFace r=0.1; CosFace with
                3 sub-centres and the inter-class filter; MLCD with feature sampling; and
                ArcFace on bf16 inputs under autocast (the trainer's bf16 path)
  pfc_speed     one training step of the head at 1M classes, D=512, batch 512, r=0.1 (CUDA
                events), against the GEMM floor of its three matmuls (logits forward, embedding
                and centre gradients: 3 × 2·B·D·S FLOP); also the same GEMM sizes without
                class sampling (C = S, r = 1) and with TF32 allowed
  kmeans        the spherical-Lloyd assignment pass (clustering/lloyd.assign_reduce_torch, as
                clustering/distributed.py runs it, bf16 on GPU) on 4M × 256 points against 65,536
                centroids: points/s and TFLOP/s in fp32 and bf16 (the default block and a
                GPU-sized one), top-1 agreement bf16 vs fp32 (topk_torch) on clustered and on
                uniform data, and a float64 CPU check of both on a slice (regret: how much
                cosine the chosen centroid loses against the float64 best)
  deepspeed     the real trainer (training/trainer.train) for 20 steps: DeepSpeed bf16, ZeRO-1,
                NCCL world size 1, a tiny open_clip ViT student, the PartialFC head, synthetic
                learnable batches; checkpoints every 10 steps; checks losses, the engine dtype,
                samples/s and that the run directory holds complete checkpoints

Usage:
    python3 benchmarks/gpu_validate.py --device cuda --out OUT_DIR      # on the GPU machine
    .venv/bin/python benchmarks/gpu_validate.py --device cpu --out /tmp/gpuval   # dry run
Writes OUT_DIR/results.json and OUT_DIR/gpuval.txt (the log). Exit status 0 when every check
passed, 1 otherwise. ``--watchdog S`` (default 300): after S seconds every thread's stack is
dumped and the process exits, so a hung collective cannot eat the whole device lease.
Needs deepspeed, open_clip_torch and pydantic importable (carried as wheels to the device);
faiss and ray are not needed (``import faiss`` is only probed, in a child process).
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

T0 = time.time()
REPO = Path(__file__).resolve().parents[1]
FAISS_MISSING = "faiss-gpu: not available on the device (not carried: size limit)"


# ======================================================================================
# Logging and results
# ======================================================================================


class Reporter:
    """Timestamped log lines (stdout + OUT/gpuval.txt) and the results JSON, rewritten after
    every check so that a run killed at its limit still leaves what it measured."""

    def __init__(self, out: Path, meta: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / "results.json"
        self.log_file = open(out / "gpuval.txt", "w", buffering=1)  # noqa: SIM115
        self.results: dict = {"meta": meta, "checks": {}, "finished": False}
        self.save()

    def log(self, msg: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for i, line in enumerate(str(msg).splitlines() or [""]):
            text = f"[{stamp} +{time.time() - T0:6.1f}s] {line}" if i == 0 else f"    {line}"
            print(text, flush=True)
            self.log_file.write(text + "\n")
        self.log_file.flush()

    def save(self) -> None:
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=_jsonable))
        os.replace(tmp, self.json_path)


def _jsonable(x):
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    return repr(x)


class Check:
    """What one check records: status, numbers, failed criteria, warnings, the exception."""

    def __init__(self, name: str, rep: Reporter) -> None:
        self.name, self.rep = name, rep
        self.numbers: dict = {}
        self.failures: list[str] = []
        self.warnings: list[str] = []

    def set(self, key: str, value) -> None:
        self.numbers[key] = value

    def expect(self, ok: bool, what: str) -> bool:
        """Record a pass criterion; a false one fails the check (the run goes on)."""
        if not ok:
            self.failures.append(what)
            self.rep.log(f"  FAIL: {what}")
        return ok

    def warn(self, what: str) -> None:
        self.warnings.append(what)
        self.rep.log(f"  warning: {what}")


def run_check(rep: Reporter, name: str, fn, ctx: dict) -> bool:
    rep.log(f"=== {name}: start")
    chk = Check(name, rep)
    before = _top_modules()
    t = time.time()
    error = None
    try:
        fn(ctx, chk)
    except BaseException as e:  # noqa: BLE001 - one check must never stop the others
        if isinstance(e, KeyboardInterrupt):
            raise
        error = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        rep.log(f"  ERROR in {name}:\n{error.rstrip()}")
    status = "error" if error else ("fail" if chk.failures else "pass")
    rep.results["checks"][name] = {
        "status": status,
        "seconds": round(time.time() - t, 2),
        "numbers": chk.numbers,
        "failures": chk.failures,
        "warnings": chk.warnings,
        "error": error,
        "new_third_party_modules": sorted(_top_modules() - before),
    }
    rep.save()
    rep.log(f"=== {name}: {status.upper()} in {time.time() - t:.1f}s")
    _free_device(ctx)
    return status == "pass"


def _top_modules() -> set[str]:
    """Top-level third-party modules imported so far."""
    names = {m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names)
    return {m for m in names if not m.startswith("_") and m != "megaclass"}


def _free_device(ctx: dict) -> None:
    import gc

    gc.collect()
    if ctx["cuda"]:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ======================================================================================
# Helpers
# ======================================================================================


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sync(ctx: dict) -> None:
    if ctx["cuda"]:
        import torch

        torch.cuda.synchronize()


def time_ms(ctx: dict, fn, iters: int, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``iters`` calls (CUDA events on GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    sync(ctx)
    out = []
    for _ in range(iters):
        if ctx["cuda"]:
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def rel_max(a, ref) -> float:
    """max|a − ref| / max|ref| (float64)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def pkg_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_megaclass_importable() -> str:
    """The repository root IS the package: if ``megaclass`` is not importable, link it into a
    temporary folder put on sys.path (the device command does the same with PYTHONPATH)."""
    try:
        import megaclass
    except ImportError:
        tmp = Path(tempfile.mkdtemp(prefix="gpuval-pkg-"))
        (tmp / "megaclass").symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(tmp))
        import megaclass
    return str(Path(megaclass.__file__).resolve().parent)


# ======================================================================================
# a. environment
# ======================================================================================


def check_env(ctx: dict, chk: Check) -> None:
    import torch

    chk.set("python", sys.version.split()[0])
    chk.set("platform", platform.platform())
    chk.set("torch", torch.__version__)
    chk.set("torch_cuda", torch.version.cuda)
    chk.set(
        "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    )
    chk.set("cpu_threads", torch.get_num_threads())
    chk.set("float32_matmul_precision", torch.get_float32_matmul_precision())
    chk.set("megaclass_from", ctx["megaclass_path"])
    if ctx["cuda"]:
        p = torch.cuda.get_device_properties(0)
        chk.set("gpu", p.name)
        chk.set("gpu_capability", f"{p.major}.{p.minor}")
        chk.set("gpu_memory_gib", round(p.total_memory / 2**30, 1))
        chk.set("gpu_sms", p.multi_processor_count)
        chk.set("gpu_count", torch.cuda.device_count())
        chk.set("bf16_supported", torch.cuda.is_bf16_supported())
        try:
            v = torch.cuda.nccl.version()
            chk.set("nccl", ".".join(map(str, v)) if isinstance(v, tuple) else str(v))
        except Exception as e:  # noqa: BLE001
            chk.set("nccl", f"unavailable: {e}")
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            chk.set("nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
        except Exception as e:  # noqa: BLE001
            chk.set("nvidia_smi", f"failed: {e}")
        chk.expect(torch.cuda.is_bf16_supported(), "bf16 supported on the GPU")
    dists = ["numpy", "torchvision", "triton", "deepspeed", "open_clip_torch", "timm",
             "pydantic", "pydantic_core", "typing_extensions", "huggingface_hub", "safetensors",
             "webdataset", "hjson", "ftfy", "transformers", "pyarrow", "msgpack", "einops"]  # fmt: skip
    chk.set("packages", {d: pkg_version(d) for d in dists})
    # where the carried ones come from (PYTHONPATH=/tmp/site on the device)
    origins = {}
    for mod in ("deepspeed", "open_clip", "pydantic", "webdataset", "typing_extensions"):
        spec = importlib.util.find_spec(mod)
        origins[mod] = spec.origin if spec else None
    chk.set("module_origins", origins)
    # `import faiss` in a child process, so that this process's module list (reported at the
    # end) shows only what checks b-d needed
    probe = "import faiss; print(faiss.__version__, hasattr(faiss, 'StandardGpuResources'))"
    try:
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        if res.returncode == 0:
            ver, gpu = (res.stdout.split() + ["?", "?"])[:2]
            chk.set("faiss", f"importable {ver} (gpu build: {gpu})")
        else:
            chk.set("faiss", FAISS_MISSING)
            chk.set("faiss_import_error", res.stderr.strip().splitlines()[-1:])
    except Exception as e:  # noqa: BLE001
        chk.set("faiss", f"{FAISS_MISSING} (probe failed: {e})")
    chk.set("ray_importable", importlib.util.find_spec("ray") is not None)
    chk.set("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR"))

    # the machine's own GEMM rates: the ceilings the later TFLOP/s are read against
    dev, n = ctx["device"], ctx["sizes"]["gemm_n"]
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        ms = time_ms(ctx, lambda a=a, b=b: torch.mm(a, b), iters=5, warmup=2)
        chk.set(
            f"gemm_{name}_{n}_tflops", round(2 * n**3 / (statistics.median(ms) * 1e-3) / 1e12, 2)
        )
        del a, b
    ctx["gemm_ceiling"] = {
        "bf16": chk.numbers[f"gemm_bf16_{n}_tflops"],
        "fp32": chk.numbers[f"gemm_fp32_{n}_tflops"],
    }
    chk.rep.log(
        f"  torch {torch.__version__} cuda {torch.version.cuda} gpu {chk.numbers.get('gpu')} "
        f"nccl {chk.numbers.get('nccl')}; GEMM {n}³ bf16 {ctx['gemm_ceiling']['bf16']} / "
        f"fp32 {ctx['gemm_ceiling']['fp32']} TFLOP/s; faiss: {chk.numbers['faiss']}"
    )


# ======================================================================================
# b. process group + PartialFC
# ======================================================================================


def check_nccl(ctx: dict, chk: Check) -> None:
    import torch
    import torch.distributed as dist
    from megaclass.training.distributed import _AllGatherGrad

    backend = "nccl" if ctx["cuda"] else "gloo"
    port = free_port()
    kw = {"device_id": torch.device("cuda", 0)} if ctx["cuda"] else {}
    t = time.time()
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=120),
        **kw,
    )
    ctx["pg"] = True
    chk.set("backend", dist.get_backend())
    chk.set("init_s", round(time.time() - t, 2))
    dev = ctx["device"]
    x = torch.arange(1024, dtype=torch.float32, device=dev)
    y = x.clone()
    dist.all_reduce(y)
    chk.expect(torch.equal(x, y), "all_reduce(SUM) on one rank is the identity")
    m = x.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    chk.expect(torch.equal(x, m), "all_reduce(MAX) on one rank is the identity")
    parts = [torch.empty_like(x)]
    dist.all_gather(parts, x)
    chk.expect(torch.equal(parts[0], x), "all_gather")
    if backend == "nccl":
        out = torch.empty_like(x)
        dist.all_gather_into_tensor(out, x)
        chk.expect(torch.equal(out, x), "all_gather_into_tensor")
        rs = torch.empty_like(x)
        dist.reduce_scatter_tensor(rs, x)
        chk.expect(torch.equal(rs, x), "reduce_scatter_tensor")
    b = x.clone()
    dist.broadcast(b, src=0)
    chk.expect(torch.equal(b, x), "broadcast")
    dist.barrier()
    # the head's all-gather autograd function, called directly (all_gather_with_grad skips it
    # on one rank): forward all-gather, backward reduce-scatter (nccl) / all-reduce (gloo) × 3
    e = torch.randn(64, 32, device=dev, requires_grad=True)
    g = torch.randn(64, 32, device=dev)
    out = _AllGatherGrad.apply(e, None, 3.0)
    out.backward(g)
    chk.expect(torch.equal(out.detach(), e.detach()), "_AllGatherGrad forward")
    chk.expect(torch.allclose(e.grad, 3.0 * g), "_AllGatherGrad backward (grad_scale 3)")
    big = torch.ones(64 * 2**20, device=dev)  # 256 MB all-reduce: a rough rate
    ms = time_ms(ctx, lambda: dist.all_reduce(big), iters=3, warmup=1)
    chk.set("allreduce_256MB_ms", round(statistics.median(ms), 3))
    chk.rep.log(f"  {backend} up in {chk.numbers['init_s']}s; collectives ok")


def _make_pfc(torch, c, d, dtype, seed, **kw):
    from megaclass.training.heads import PartialFC

    return PartialFC(c, d, seed=seed, dtype=dtype, **kw)


def _grad_rows(head):
    """(row indices, rows) of the head's centre gradient (sparse or dense)."""
    import torch

    g = head.weight.grad
    if g.is_sparse:
        g = g.coalesce()
        return g.indices()[0].cpu(), g.values()
    return torch.arange(g.shape[0]), g


def _pfc_compare(ctx: dict, chk: Check, tag: str, spec: dict) -> None:
    """The head on the device in float32 vs on the CPU in float64, one step."""
    import torch

    dev = ctx["device"]
    c, d, b = spec["c"], spec["d"], spec["b"]
    k = spec.get("kw", {}).get("num_subcenters", 1)
    gen = torch.Generator().manual_seed(spec["seed"])
    # centres at the head's own init scale (init_std 0.01), rounded to float32 first, so the
    # reference starts from exactly the weights the float32 head holds
    w = (0.01 * torch.randn(c * k, d, generator=gen, dtype=torch.float64)).float().double()
    x = torch.randn(b, d, generator=gen, dtype=torch.float64) * 2.0
    if spec.get("multi"):
        y = torch.randint(0, c, (b, 8), generator=gen)
        y[torch.rand(b, 8, generator=gen) < 0.25] = -1  # padding
        y[:, 0] = torch.randint(0, c, (b,), generator=gen)  # at least one label per row
    else:
        y = torch.randint(0, c, (b,), generator=gen)
    step = 5
    kw = dict(spec["kw"], multi_label=bool(spec.get("multi")))

    ref = _make_pfc(torch, c, d, torch.float64, 11, **kw)
    ref.load_full_weight(w)
    ref_opt = ref.make_optimizer("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    dut = _make_pfc(torch, c, d, torch.float32, 11, **kw)
    dut.load_full_weight(w.float())
    dut.to(dev)
    dut_opt = dut.make_optimizer("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    w0 = w.clone()

    bf16 = spec.get("bf16_inputs", False)
    if bf16:  # the trainer's bf16 path: bf16 activations under autocast, fp32 centres
        xb = x.to(torch.bfloat16)
        xr = xb.double().clone().requires_grad_(True)  # reference sees the same rounded inputs
        xd = xb.to(dev).requires_grad_(True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = dut(xd, y.to(dev), step=step)
    else:
        xr = x.clone().requires_grad_(True)
        xd = x.float().to(dev).requires_grad_(True)
        loss = dut(xd, y.to(dev), step=step)
    loss.backward()
    loss_ref = ref(xr, y, step=step)
    loss_ref.backward()

    res: dict = {"C": c, "D": d, "B": b, "loss_ref": float(loss_ref.detach())}
    res["loss"] = float(loss.detach())
    res["loss_dtype"] = str(loss.dtype)
    res["loss_rel"] = abs(res["loss"] - res["loss_ref"]) / abs(res["loss_ref"])
    res["emb_grad_rel"] = rel_max(xd.grad, xr.grad)
    ri, rv = _grad_rows(ref)
    di, dv = _grad_rows(dut)
    same_rows = bool(torch.equal(ri, di))
    res["sampled_rows"] = int(ri.numel())
    res["same_sampled_rows"] = same_rows
    sd, sr = dut.last_sample, ref.last_sample
    res["same_sampled_dims"] = (sd.dims is None and sr.dims is None) or (
        sd.dims is not None and sr.dims is not None and torch.equal(sd.dims.cpu(), sr.dims.cpu())
    )
    if same_rows:
        res["weight_grad_rel"] = rel_max(dv, rv)
    dut_opt.step()
    ref_opt.step()
    moved = (ref.weight.detach() - w0).abs().max()
    res["sgd_step_rel"] = float(
        (dut.weight.detach().double().cpu() - ref.weight.detach()).abs().max() / moved
    )
    if bf16:  # also against the unrounded float64 inputs (what bf16 activations cost)
        ref2 = _make_pfc(torch, c, d, torch.float64, 11, sparse_grad=True, **kw)
        ref2.load_full_weight(w)
        with torch.no_grad():
            loss2 = float(ref2(x, y, step=step))
        res["loss_rel_vs_unrounded_inputs"] = abs(res["loss"] - loss2) / abs(loss2)
    chk.set(tag, res)
    tol = spec.get("tol", {"loss": 1e-4, "emb": 1e-3, "w": 1e-3, "sgd": 1e-3})
    chk.expect(torch.isfinite(loss).item(), f"{tag}: finite loss")
    chk.expect(same_rows and res["same_sampled_dims"], f"{tag}: same classes/dims sampled")
    chk.expect(
        res["loss_rel"] < tol["loss"], f"{tag}: loss rel {res['loss_rel']:.2e} < {tol['loss']}"
    )
    chk.expect(
        res["emb_grad_rel"] < tol["emb"],
        f"{tag}: d/dx rel {res['emb_grad_rel']:.2e} < {tol['emb']}",
    )
    if same_rows:
        chk.expect(
            res["weight_grad_rel"] < tol["w"],
            f"{tag}: d/dW rel {res['weight_grad_rel']:.2e} < {tol['w']}",
        )
    chk.expect(
        res["sgd_step_rel"] < tol["sgd"],
        f"{tag}: SGD step rel {res['sgd_step_rel']:.2e} < {tol['sgd']}",
    )
    chk.rep.log(
        f"  {tag}: loss {res['loss']:.6f} (ref {res['loss_ref']:.6f}) rel {res['loss_rel']:.1e}; "
        f"d/dx {res['emb_grad_rel']:.1e}; d/dW {res.get('weight_grad_rel', float('nan')):.1e}; "
        f"SGD step {res['sgd_step_rel']:.1e}; rows {res['sampled_rows']}"
    )


def check_pfc_accuracy(ctx: dict, chk: Check) -> None:
    import torch

    s = ctx["sizes"]["pfc_acc"]
    chk.set("float32_matmul_precision", torch.get_float32_matmul_precision())
    arc = {"margin": "arcface", "m": 0.5, "scale": 64.0, "sample_rate": 0.1}
    cases = {
        "arcface_r0.1": {**s["big"], "seed": 1, "kw": arc},
        "cosface_k3_filter_r0.2": {
            **s["mid"],
            "seed": 2,
            "kw": {
                "margin": "cosface",
                "m": 0.35,
                "scale": 64.0,
                "sample_rate": 0.2,
                "num_subcenters": 3,
                "interclass_threshold": 0.2,
            },
        },  # fmt: skip
        "mlcd_arcface_r0.1_f0.5": {
            **s["mid"],
            "seed": 3,
            "multi": True,
            "kw": {
                "margin": "arcface",
                "m": 0.3,
                "scale": 32.0,
                "sample_rate": 0.1,
                "feature_rate": 0.5,
            },
        },  # fmt: skip
        "arcface_r0.1_bf16_inputs": {
            **s["big"],
            "seed": 1,
            "kw": arc,
            "bf16_inputs": True,
            # the gradient w.r.t. bf16 inputs is bf16 itself (rounding ~2^-8)
            "tol": {"loss": 1e-4, "emb": 1e-2, "w": 1e-3, "sgd": 1e-3},
        },
    }
    for tag, spec in cases.items():
        try:
            _pfc_compare(ctx, chk, tag, spec)
        except Exception as e:  # noqa: BLE001 - the other cases still run
            chk.expect(False, f"{tag}: raised {type(e).__name__}: {e}")
            chk.set(tag, {"error": traceback.format_exc()})
            chk.rep.log(traceback.format_exc())


def check_pfc_speed(ctx: dict, chk: Check) -> None:
    import torch

    dev = ctx["device"]
    s = ctx["sizes"]["pfc_speed"]
    c, d, b, r = s["c"], s["d"], s["b"], s["r"]
    iters = s["iters"]
    t = time.time()
    head = _make_pfc(torch, c, d, torch.float32, 0, margin="arcface", m=0.5, scale=64.0,
                     sample_rate=r)  # fmt: skip
    head.to(dev).train()
    opt = head.make_optimizer("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    chk.set("build_s", round(time.time() - t, 2))
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, d, device=dev, generator=gen).requires_grad_(True)
    y = torch.randint(0, c, (b,), device=dev, generator=gen)
    n_s = max(1, int(r * c))  # sampled classes per step (positives included)
    flops = 3 * 2 * b * d * n_s

    def step_times(h, o, n):
        """Per step: forward, backward, optimizer ms (CUDA events) and wall ms."""
        rows = []
        for i in range(n + 2):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if ctx["cuda"] else None
            w0 = time.perf_counter()
            marks = []

            def mark(j, ev=ev, marks=marks):
                if ev is not None:
                    ev[j].record()
                else:
                    marks.append(time.perf_counter())

            o.zero_grad(set_to_none=True)
            x.grad = None
            mark(0)
            loss = h(x, y)
            mark(1)
            loss.backward()
            mark(2)
            o.step()
            mark(3)
            sync(ctx)
            wall = (time.perf_counter() - w0) * 1e3
            if i < 2:
                continue  # warm-up
            if ev is not None:
                t3 = [ev[0].elapsed_time(ev[j]) for j in (1, 2, 3)]
            else:
                t3 = [(marks[j] - marks[0]) * 1e3 for j in (1, 2, 3)]
            rows.append((t3[0], t3[1] - t3[0], t3[2] - t3[1], wall, float(loss.detach())))
        med = [statistics.median(col) for col in zip(*rows)]
        return {"fwd_ms": med[0], "bwd_ms": med[1], "opt_ms": med[2], "wall_ms": med[3],
                "fwd_bwd_ms": med[0] + med[1], "step_ms": med[0] + med[1] + med[2],
                "losses_finite": all(math.isfinite(row[4]) for row in rows)}  # fmt: skip

    if ctx["cuda"]:
        torch.cuda.reset_peak_memory_stats()
    main = step_times(head, opt, iters)
    if ctx["cuda"]:
        main["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # GEMM floor: the step's three matmuls at its shapes, fp32, random data
    e = torch.randn(b, d, device=dev)
    w = torch.randn(n_s, d, device=dev)
    g = torch.randn(b, n_s, device=dev)

    def gemms():
        torch.mm(e, w.T)
        torch.mm(g, w)
        torch.mm(g.T, e)

    floor = statistics.median(time_ms(ctx, gemms, iters=iters, warmup=2))
    res = {"C": c, "D": d, "B": b, "sample_rate": r, "sampled_classes": n_s, "flop": flops, **main}
    res["gemm_floor_ms"] = floor
    res["gemm_floor_tflops"] = flops / (floor * 1e-3) / 1e12
    res["fwd_bwd_tflops"] = flops / (main["fwd_bwd_ms"] * 1e-3) / 1e12
    res["step_tflops"] = flops / (main["step_ms"] * 1e-3) / 1e12
    res["step_over_floor"] = main["step_ms"] / floor
    chk.set("fp32", res)
    chk.expect(main["losses_finite"], "finite losses")
    chk.rep.log(
        f"  C={c} D={d} B={b} r={r}: step {main['step_ms']:.2f} ms (fwd {main['fwd_ms']:.2f}, "
        f"bwd {main['bwd_ms']:.2f}, opt {main['opt_ms']:.2f}; wall {main['wall_ms']:.2f}); GEMM "
        f"floor {floor:.2f} ms = {res['gemm_floor_tflops']:.1f} TFLOP/s; step achieves "
        f"{res['step_tflops']:.1f} TFLOP/s ({res['step_over_floor']:.2f}x floor)"
    )

    # the same GEMM sizes without any class sampling (C = S, r = 1): what sampling costs
    h2 = _make_pfc(torch, n_s, d, torch.float32, 0, margin="arcface", m=0.5, scale=64.0,
                   sample_rate=1.0)  # fmt: skip
    h2.to(dev).train()
    o2 = h2.make_optimizer("sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    y_keep = y
    y = torch.randint(0, n_s, (b,), device=dev, generator=gen)
    nos = step_times(h2, o2, iters)
    y = y_keep
    chk.set("fp32_no_sampling_same_gemms", nos)
    chk.rep.log(
        f"  no sampling (C=S={n_s}, r=1): step {nos['step_ms']:.2f} ms "
        f"(fwd {nos['fwd_ms']:.2f}, bwd {nos['bwd_ms']:.2f}, opt {nos['opt_ms']:.2f})"
    )
    del h2, o2
    # TF32 allowed (the head's fp32 GEMMs then run on tensor cores)
    if ctx["cuda"]:
        prev = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("high")
            tf = step_times(head, opt, iters)
            tf["step_tflops"] = flops / (tf["step_ms"] * 1e-3) / 1e12
            chk.set("tf32", tf)
            chk.rep.log(
                f"  TF32 allowed: step {tf['step_ms']:.2f} ms ({tf['step_tflops']:.1f} TFLOP/s)"
            )
        finally:
            torch.set_float32_matmul_precision(prev)


# ======================================================================================
# c. bf16 k-means assignment
# ======================================================================================


def check_kmeans(ctx: dict, chk: Check) -> None:
    import torch
    import torch.nn.functional as F
    from megaclass.clustering.lloyd import DEFAULT_BLOCK, assign_reduce_torch, topk_torch

    dev = ctx["device"]
    s = ctx["sizes"]["kmeans"]
    n, d, k, m_agree, m64 = s["n"], s["d"], s["k"], s["agree_rows"], s["f64_rows"]
    budget = s["budget_s"]
    t_start = time.time()
    gen = torch.Generator(device=dev).manual_seed(0)
    cent = F.normalize(torch.randn(k, d, device=dev, generator=gen), dim=1)
    # clustered points: a planted centroid plus noise (cosine to it ~0.55), in chunks
    x = torch.empty(n, d, device=dev)
    sigma = 1.5 / math.sqrt(d)
    for r0 in range(0, n, 1 << 20):
        r1 = min(n, r0 + (1 << 20))
        idx = torch.randint(0, k, (r1 - r0,), device=dev, generator=gen)
        noise = torch.randn(r1 - r0, d, device=dev, generator=gen) * sigma
        x[r0:r1] = F.normalize(cent[idx] + noise, dim=1)
    sync(ctx)
    chk.set("shape", {"n": n, "d": d, "k": k})
    chk.set("gen_s", round(time.time() - t_start, 2))
    flop = 2.0 * n * k * d
    gpu_block = s["gpu_block"]
    chunk = 65536  # the default chunk_size of clustering/distributed.py

    def timed_pass(dtype, block):
        assign_reduce_torch(x[: min(n, 1 << 14)], cent, chunk, block=block, dtype=dtype)  # warm
        sync(ctx)
        t = time.perf_counter()
        sums, counts, obj = assign_reduce_torch(x, cent, chunk, block=block, dtype=dtype)
        sync(ctx)
        dt = time.perf_counter() - t
        return dt, counts, float(obj)

    rates = {}
    outs = {}
    plan = [("fp32", torch.float32, DEFAULT_BLOCK), ("bf16", torch.bfloat16, DEFAULT_BLOCK),
            ("bf16", torch.bfloat16, gpu_block), ("fp32", torch.float32, gpu_block)]  # fmt: skip
    for name, dt, block in plan:
        if time.time() - t_start > budget:
            chk.warn(f"time budget: skipped {name} block=2^{int(math.log2(block))}")
            continue
        sec, counts, obj = timed_pass(dt, block)
        key = f"{name}_block2^{int(math.log2(block))}"
        rates[key] = {
            "seconds": round(sec, 3),
            "points_per_s": n / sec,
            "tflops": flop / sec / 1e12,
            "objective": obj,
        }
        outs[key] = counts
        chk.rep.log(
            f"  assign_reduce {key}: {sec:.2f}s = {n / sec / 1e6:.2f} M points/s, "
            f"{flop / sec / 1e12:.1f} TFLOP/s"
        )
    chk.set("assign_reduce", rates)
    a32, a16 = (
        f"fp32_block2^{int(math.log2(DEFAULT_BLOCK))}",
        f"bf16_block2^{int(math.log2(DEFAULT_BLOCK))}",
    )
    if a32 in rates and a16 in rates:
        chk.set(
            "objective_rel_bf16_vs_fp32",
            abs(rates[a16]["objective"] - rates[a32]["objective"]) / abs(rates[a32]["objective"]),
        )
        # half the L1 distance of the cluster sizes: a lower bound on the points reassigned
        moved = int((outs[a16] - outs[a32]).abs().sum()) // 2
        chk.set("counts_moved_fraction_lower_bound", moved / n)
    for name in rates:
        if name.startswith("bf16") and "fp32" + name[4:] in rates:
            chk.set(
                f"speedup_bf16_over_fp32_{name[5:]}",
                rates["fp32" + name[4:]]["seconds"] / rates[name]["seconds"],
            )

    # top-1 agreement bf16 vs fp32 (what DistributedLloyd.report measures), clustered + uniform
    agree = {}
    for label, data in (("clustered", x[:m_agree]),
                        ("uniform", F.normalize(torch.randn(m_agree, d, device=dev, generator=gen), dim=1))):  # fmt: skip
        a, _ = topk_torch(data, cent, 1, chunk, block=gpu_block, dtype=torch.float32)
        b, _ = topk_torch(data, cent, 1, chunk, block=gpu_block, dtype=torch.bfloat16)
        agree[label] = float((a == b).float().mean())
    chk.set("bf16_top1_agreement", agree)
    chk.rep.log(f"  bf16 vs fp32 top-1 agreement on {m_agree} rows: {agree}")

    # float64 CPU truth on a slice: regret = best float64 cosine − float64 cosine of the pick
    xs = x[:m64]
    lab32, _ = topk_torch(xs, cent, 1, chunk, dtype=torch.float32)
    lab16, _ = topk_torch(xs, cent, 1, chunk, dtype=torch.bfloat16)
    x64, c64 = xs.double().cpu(), cent.double().cpu()
    best_v, best_i, pick32, pick16 = [], [], [], []
    l32, l16 = lab32[:, 0].cpu(), lab16[:, 0].cpu()
    for r0 in range(0, m64, 1024):
        sc = x64[r0 : r0 + 1024] @ c64.T
        v, i = sc.max(dim=1)
        best_v.append(v)
        best_i.append(i)
        rows = torch.arange(sc.shape[0])
        pick32.append(sc[rows, l32[r0 : r0 + 1024]])
        pick16.append(sc[rows, l16[r0 : r0 + 1024]])
    best_v, best_i = torch.cat(best_v), torch.cat(best_i)
    reg32 = best_v - torch.cat(pick32)
    reg16 = best_v - torch.cat(pick16)
    f64 = {
        "rows": m64,
        "fp32_mismatch": int((l32 != best_i).sum()),
        "fp32_max_regret": float(reg32.max()),
        "bf16_mismatch": int((l16 != best_i).sum()),
        "bf16_max_regret": float(reg16.max()),
        "bf16_mean_regret": float(reg16.mean()),
    }
    # assign_reduce's sums/counts on the slice against float64 sums by the float64 labels
    sums, counts, obj = assign_reduce_torch(xs, cent, chunk, dtype=torch.float32)
    ref_counts = torch.bincount(best_i, minlength=k)
    ref_sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, best_i, x64)
    f64["counts_equal"] = bool(torch.equal(counts.cpu(), ref_counts))
    f64["sums_rel"] = rel_max(sums, ref_sums)
    f64["objective_rel"] = abs(float(obj) - float(best_v.sum())) / float(best_v.sum())
    chk.set("float64_check", f64)
    chk.rep.log(f"  float64 check on {m64} rows: {f64}")
    chk.expect(
        f64["fp32_max_regret"] < 1e-5, f"fp32 max regret {f64['fp32_max_regret']:.2e} < 1e-5"
    )
    chk.expect(
        f64["bf16_max_regret"] < 1e-2, f"bf16 max regret {f64['bf16_max_regret']:.2e} < 1e-2"
    )
    chk.expect(f64["sums_rel"] < 1e-4, f"assign_reduce sums rel {f64['sums_rel']:.2e} < 1e-4")
    chk.expect(
        f64["objective_rel"] < 1e-5,
        f"assign_reduce objective rel {f64['objective_rel']:.2e} < 1e-5",
    )
    if f64["fp32_mismatch"] == 0:
        chk.expect(f64["counts_equal"], "assign_reduce counts equal the float64 counts")
    chk.expect(
        agree["clustered"] > 0.9, f"bf16 agreement on clustered data {agree['clustered']:.4f} > 0.9"
    )


# ======================================================================================
# d. DeepSpeed bf16 training through the real trainer
# ======================================================================================


class SyntheticBatches:
    """A learnable stream: ``protos`` fixed random images, one class each (spread over the
    head's classes), plus fresh-looking noise; ``n_per_epoch`` micro-batches per epoch."""

    def __init__(self, torch, num_classes, image_size, batch, protos, n_per_epoch, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(protos, 3, image_size // 4, image_size // 4, generator=g)
        self.protos = torch.nn.functional.interpolate(base, size=image_size, mode="bilinear")
        self.classes = torch.arange(protos) * (num_classes // protos)
        self.pool = []
        for _ in range(8):  # a few pre-made batches, cycled (data making stays off the clock)
            j = torch.randint(0, protos, (batch,), generator=g)
            img = self.protos[j] + 0.3 * torch.randn(batch, 3, image_size, image_size, generator=g)
            self.pool.append({"image": img.contiguous(), "label": self.classes[j].clone()})
        self.n = n_per_epoch

    def __iter__(self):
        for i in range(self.n):
            yield self.pool[i % len(self.pool)]


def check_assign(ctx: dict, chk: Check) -> None:
    """The assign stage's exact search on the GPU (clustering.search.CentroidSearcher with
    device='cuda', fp32 and bf16 scores) against the CPU path on the same rows, and its rate."""
    import numpy as np
    from megaclass.clustering.search import CentroidSearcher

    small = ctx["device"].type != "cuda"
    n_ref, n_speed, d, k, topk = (
        (2000, 4000, 64, 2048, 8) if small else (20000, 1_000_000, 256, 65536, 8)
    )
    rng = np.random.default_rng(0)
    c = rng.standard_normal((k, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, k, n_speed)] + 0.08 * rng.standard_normal((n_speed, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dev = str(ctx["device"])
    cpu = CentroidSearcher(c, "exact")
    ref_l, ref_s = cpu.search(x[:n_ref], topk)
    for name, bf16 in (("fp32", False), ("bf16", True)):
        gpu = CentroidSearcher(c, "exact", device=dev, bf16=bf16)
        lab, sc = gpu.search(x[:n_ref], topk)
        top1 = float((lab[:, 0] == ref_l[:, 0]).mean())
        overlap = float(np.mean([len(set(a) & set(b)) / topk for a, b in zip(lab, ref_l)]))
        chk.set(f"{name}_top1_agreement", round(top1, 5))
        chk.set(f"{name}_top{topk}_overlap", round(overlap, 5))
        chk.set(f"{name}_max_score_diff", float(np.abs(sc - ref_s).max()))
        chk.expect(top1 >= (0.999 if not bf16 else 0.98), f"{name} top-1 agreement {top1:.4f}")
        sync(ctx)
        t0 = time.time()
        gpu.search(x, topk)
        sync(ctx)
        dt = time.time() - t0
        chk.set(f"{name}_rows_per_s", round(n_speed / dt))
        chk.set(f"{name}_tflops", round(2.0 * n_speed * k * d / dt / 1e12, 2))
    chk.set("shape", {"n": n_speed, "d": d, "k": k, "topk": topk})


def check_deepspeed(ctx: dict, chk: Check) -> None:
    import torch
    import torch.distributed as dist

    s = ctx["sizes"]["ds"]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )  # fmt: skip
    t = time.time()
    import deepspeed
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.train import make_job
    from megaclass.training import checkpoint as ckpt
    from megaclass.training import trainer
    from megaclass.training.engine import shutdown_distributed

    chk.set("import_s", round(time.time() - t, 2))
    chk.set("deepspeed", f"{deepspeed.__version__} from {Path(deepspeed.__file__).parent}")
    run = Path(tempfile.mkdtemp(prefix="gpuval-ds-"))
    ctx["cleanup"].append(run)
    over = {
        "run_dir": str(run),
        "seed": 0,
        "data.image_size": s["image_size"],
        "cluster.k": s["classes"],
        "train.objective": "pfc",
        "train.model": s["model"],
        "train.embed_dim": s["embed_dim"],
        "train.precision": "bf16",
        "train.zero_stage": 1,
        "train.optimizer": "adamw",
        "train.steps": s["steps"],
        "train.micro_batch_size": s["batch"],
        "train.lr": s["lr"],
        "train.warmup_steps": 2,
        "train.weight_decay": 0.0,
        "train.ckpt_every": s["ckpt_every"],
        "train.keep_last": 2,
        "train.log_every": 1,
        "train.sample_rate": s["sample_rate"],
        "train.scale": 32.0,
        "train.margin_m": 0.2,
    }
    chk.set("config", over)
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    job = make_job(cfg)
    data = SyntheticBatches(torch, s["classes"], s["image_size"], s["batch"], s["protos"],
                            s["steps"] + 2)  # fmt: skip
    t = time.time()
    try:
        summary = trainer.train(job, make_loader=lambda *a: data, resume=False)
        wall = time.time() - t
        model = summary.pop("_model")
        chk.set("train_wall_s", round(wall, 2))
        chk.set("summary", summary)
        pdt = sorted({str(p.dtype) for p in model.parameters()})
        chk.set("engine_param_dtypes", pdt)
        chk.set("backend", dist.get_backend() if dist.is_initialized() else None)
        chk.set("model_device", str(next(model.parameters()).device))
    finally:
        shutdown_distributed()
    metrics = [json.loads(x) for x in (job.train_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    sps = [m["samples_per_s"] for m in metrics]
    steady = sps[3:] or sps
    chk.set("losses", [round(v, 5) for v in losses])
    chk.set("samples_per_s_median", statistics.median(steady))
    chk.set("samples_per_s_max", max(steady))
    chk.set("data_wait_share_median", statistics.median(m["data_wait_share"] for m in metrics))
    chk.set("grad_norms", [m.get("grad_norm") for m in metrics])
    head_n = min(3, len(losses) // 2)
    decreasing = statistics.mean(losses[-head_n:]) < statistics.mean(losses[:head_n])
    chk.set("loss_decreasing", decreasing)
    chk.rep.log(
        f"  {len(losses)} steps in {chk.numbers['train_wall_s']}s; loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; median {chk.numbers['samples_per_s_median']:.0f} samples/s; "
        f"engine params {pdt}; backend {chk.numbers['backend']}"
    )
    chk.expect(len(losses) == s["steps"], f"{len(losses)} logged steps == {s['steps']}")
    chk.expect(all(math.isfinite(v) for v in losses), "all losses finite")
    chk.expect(summary["bad_steps"] == 0, f"bad_steps {summary['bad_steps']} == 0")
    chk.expect(pdt == ["torch.bfloat16"], f"engine parameters bf16 (got {pdt})")
    want_backend = "nccl" if ctx["cuda"] else "gloo"
    chk.expect(chk.numbers["backend"] == want_backend, f"process group backend {want_backend}")
    if not decreasing:
        chk.warn(f"loss did not decrease: {losses}")

    # the checkpoints: complete, DeepSpeed state in bf16, the head in fp32, one shard
    root = job.ckpt_dir
    complete = ckpt.list_checkpoints(root)
    allck = ckpt.list_checkpoints(root, complete_only=False)
    chk.set("checkpoints", [p.name for _, p in allck])
    chk.set("complete_checkpoints", [p.name for _, p in complete])
    want = [ckpt.step_tag(i) for i in range(s["ckpt_every"], s["steps"] + 1, s["ckpt_every"])]
    if s["steps"] % s["ckpt_every"]:
        want.append(ckpt.step_tag(s["steps"]))
    chk.expect([p.name for _, p in complete] == want[-2:], f"complete checkpoints {want[-2:]}")
    last = ckpt.latest_complete(root)
    if chk.expect(last is not None, "a complete checkpoint exists"):
        files = sorted(str(p.relative_to(last)) for p in last.rglob("*") if p.is_file())
        chk.set("last_checkpoint_files", files)
        marker = ckpt.read_marker(last)
        chk.set("marker", marker)
        chk.expect(marker["step"] == s["steps"] and marker["world_size"] == 1, "marker step/world")
        chk.expect((last / "mp_rank_00_model_states.pt").is_file(), "mp_rank_00_model_states.pt")
        chk.expect(any("optim_states" in f for f in files), "ZeRO optimizer states saved")
        head_file = last / "head" / ckpt.shard_name(0, 1)
        if chk.expect(head_file.is_file(), f"head shard {head_file.name}"):
            h = ckpt.load_head_file(head_file)
            hw = h["head"]["weight"]
            chk.set("head_weight", {"shape": list(hw.shape), "dtype": str(hw.dtype)})
            chk.expect(hw.dtype == torch.float32, "head weight fp32")
            chk.expect(h["trainer"]["step"] == s["steps"], "head file step")
        states = torch.load(
            last / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
        )
        mdt = sorted({str(v.dtype) for v in states["module"].values() if v.is_floating_point()})
        chk.set("checkpoint_module_dtypes", mdt)
        chk.expect(mdt == ["torch.bfloat16"], f"checkpointed backbone bf16 (got {mdt})")
        size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
        chk.set("last_checkpoint_mb", round(size / 1e6, 1))
        chk.rep.log(f"  checkpoint {last.name}: {len(files)} files, {size / 1e6:.1f} MB: {files}")


# ======================================================================================
# main
# ======================================================================================


def sizes_for(small: bool, ds_model: str | None) -> dict:
    if small:
        return {
            "gemm_n": 512,
            "pfc_acc": {"big": {"c": 2000, "d": 64, "b": 32}, "mid": {"c": 1000, "d": 32, "b": 24}},
            "pfc_speed": {"c": 20000, "d": 64, "b": 64, "r": 0.1, "iters": 3},
            "kmeans": {
                "n": 20000,
                "d": 32,
                "k": 512,
                "agree_rows": 4096,
                "f64_rows": 512,
                "gpu_block": 1 << 20,
                "budget_s": 60,
            },  # fmt: skip
            "ds": {
                "model": ds_model or "open_clip:megaclass-tiny-vit",
                "image_size": 32,
                "embed_dim": 32,
                "classes": 64,
                "protos": 8,
                "batch": 8,
                "steps": 6,
                "ckpt_every": 3,
                "lr": 3e-3,
                "sample_rate": 0.5,
            },  # fmt: skip
        }
    return {
        "gemm_n": 8192,
        "pfc_acc": {
            "big": {"c": 100_000, "d": 512, "b": 512},
            "mid": {"c": 20_000, "d": 256, "b": 256},
        },
        "pfc_speed": {"c": 1_000_000, "d": 512, "b": 512, "r": 0.1, "iters": 10},
        "kmeans": {
            "n": 4_000_000,
            "d": 256,
            "k": 65_536,
            "agree_rows": 1 << 20,
            "f64_rows": 4096,
            "gpu_block": 1 << 27,
            "budget_s": 60,
        },  # fmt: skip
        "ds": {
            "model": ds_model or "open_clip:megaclass-small-vit",
            "image_size": 64,
            "embed_dim": 128,
            "classes": 10_000,
            "protos": 64,
            "batch": 128,
            "steps": 20,
            "ckpt_every": 10,
            "lr": 1e-3,
            "sample_rate": 0.1,
        },  # fmt: skip
    }


CHECKS = ("env", "nccl", "pfc_accuracy", "pfc_speed", "kmeans", "assign", "deepspeed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", required=True, help="folder for results.json and gpuval.txt")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (automatic with --device cpu)")
    ap.add_argument("--full", action="store_true", help="the GPU sizes even with --device cpu")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CHECKS)}")
    ap.add_argument("--skip", default="", help="comma-separated checks to skip")
    ap.add_argument(
        "--ds-model", default=None, help="trainer student (default: a tiny open_clip ViT)"
    )
    ap.add_argument("--kmeans-n", type=int, default=None, help="points for the k-means check")
    ap.add_argument("--watchdog", type=float, default=300.0,
                    help="seconds after which all thread stacks are dumped and the run exits")  # fmt: skip
    args = ap.parse_args(argv)

    small = args.small or (args.device == "cpu" and not args.full)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before anything imports deepspeed
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    out = Path(args.out)
    sizes = sizes_for(small, args.ds_model)
    if args.kmeans_n:
        sizes["kmeans"]["n"] = args.kmeans_n
    meta = {
        "argv": sys.argv,
        "device": args.device,
        "small": small,
        "sizes": sizes,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "repo": str(REPO),
    }
    rep = Reporter(out, meta)
    if args.watchdog > 0:  # a hung collective must not eat the whole device lease
        faulthandler.dump_traceback_later(args.watchdog, exit=True, file=sys.stderr)
    rep.log(f"gpu_validate: device={args.device} small={small} out={out}")

    import torch

    ctx: dict = {"cuda": args.device == "cuda", "small": small, "sizes": sizes, "cleanup": []}
    ctx["megaclass_path"] = ensure_megaclass_importable()
    if ctx["cuda"] and not torch.cuda.is_available():
        rep.log("ERROR: --device cuda but torch.cuda.is_available() is False")
        rep.results["checks"]["env"] = {"status": "error", "error": "CUDA not available"}
        rep.save()
        return 1
    ctx["device"] = torch.device("cuda", 0) if ctx["cuda"] else torch.device("cpu")
    if ctx["cuda"]:
        torch.cuda.set_device(0)

    selected = [c for c in CHECKS if (not args.only or c in args.only.split(","))]
    selected = [c for c in selected if c not in args.skip.split(",")]
    fns = {
        "env": check_env,
        "nccl": check_nccl,
        "pfc_accuracy": check_pfc_accuracy,
        "pfc_speed": check_pfc_speed,
        "kmeans": check_kmeans,
        "assign": check_assign,
        "deepspeed": check_deepspeed,
    }
    ok = True
    for name in selected:
        if name == "kmeans" and ctx.get("pg"):
            _destroy_pg(ctx, rep)  # the trainer builds its own process group
        if name == "deepspeed" and ctx.get("pg"):
            _destroy_pg(ctx, rep)
        ok &= run_check(rep, name, fns[name], ctx)
    if ctx.get("pg"):
        _destroy_pg(ctx, rep)

    # what the run imported: carried wheels must cover it; ray/faiss must not be needed
    mods = sorted(_top_modules())
    try:
        owner = importlib.metadata.packages_distributions()
    except Exception:  # noqa: BLE001
        owner = {}
    third = {m: ",".join(owner.get(m, [])) or "?" for m in mods}
    rep.results["imported_third_party"] = third
    rep.results["imported_ray"] = "ray" in sys.modules
    rep.results["imported_faiss"] = "faiss" in sys.modules
    rep.results["imported_webdataset"] = "webdataset" in sys.modules
    for p in ctx["cleanup"]:
        shutil.rmtree(p, ignore_errors=True)
    statuses = {k: v["status"] for k, v in rep.results["checks"].items()}
    rep.results["summary"] = statuses
    rep.results["all_passed"] = bool(ok)
    rep.results["finished"] = True
    rep.results["total_s"] = round(time.time() - T0, 1)
    rep.save()
    faulthandler.cancel_dump_traceback_later()
    rep.log(f"imported third-party top-level modules: {' '.join(mods)}")
    rep.log(f"ray imported: {'ray' in sys.modules}; faiss imported: {'faiss' in sys.modules}")
    rep.log(f"SUMMARY {json.dumps(statuses)} all_passed={ok} total {time.time() - T0:.1f}s")
    rep.log(f"results: {rep.json_path}")
    return 0 if ok else 1


def _destroy_pg(ctx: dict, rep: Reporter) -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        rep.log(f"  destroy_process_group: {e}")
    ctx["pg"] = False


if __name__ == "__main__":
    sys.exit(main())
