"""Data-parallel Lloyd iterations: Ray actors joined by a torch.distributed process group.

Each actor holds one contiguous slice of the training points (on its GPU when it has one).
An iteration broadcasts the centroids (through Ray's object store), every actor assigns its
slice by chunked matmul + running argmax (never the slice×k matrix) and the per-centroid sums,
counts and objective are summed with one ``all_reduce`` (gloo on CPU, NCCL on GPU) in float64,
so the result does not depend on the number of workers beyond float rounding of the sums.
The driver then applies the shared update (:func:`update_centroids`, which also re-seeds
empty clusters) — the same code as the in-process reference.

With ``bf16`` on GPU the score matmuls run in bfloat16 (tensor cores); :meth:`report` measures
the top-1 agreement of bf16 against fp32 on the final centroids.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import ray
import torch
from megaclass.clustering.lloyd import assign_reduce_torch, topk_torch, update_centroids
from megaclass.core.net import free_port

log = logging.getLogger(__name__)


@ray.remote
class LloydWorker:
    """One rank: a slice of the points and a membership in the process group."""

    def __init__(self, rank: int, world: int, threads: int, use_gpu: bool) -> None:
        torch.set_num_threads(max(1, threads))
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
        self.rank, self.world = rank, world
        self.device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else None
        self.device = self.device or torch.device("cpu")
        self.x: torch.Tensor | None = None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def setup(self, master: str, port: int) -> bool:
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{master}:{port}", rank=self.rank, world_size=self.world
        )
        return True

    def load(self, x: np.ndarray) -> int:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.device.type == "cpu" and not x.flags.writeable:
            # Ray hands large arrays over zero-copy from its object store (read-only). The slice
            # is only ever read, so keep that buffer rather than copying it once more.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                self.x = torch.from_numpy(x)
        else:
            self.x = torch.from_numpy(np.array(x, copy=True)).to(self.device)
        return int(self.x.shape[0])

    def unload(self) -> None:
        self.x = None

    def step(self, c: np.ndarray, chunk_size: int, bf16: bool) -> tuple | None:
        """Assign the slice, all-reduce (sums, counts, objective); rank 0 returns them."""
        import torch.distributed as dist

        k, d = c.shape
        ct = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(self.device)
        dtype = torch.bfloat16 if bf16 and self.device.type == "cuda" else torch.float32
        sums, counts, obj = assign_reduce_torch(self.x, ct, chunk_size, dtype=dtype)
        buf = torch.cat([sums.reshape(-1), counts.double(), obj.reshape(1)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if self.rank != 0:
            return None
        buf = buf.cpu().numpy()
        return (
            buf[: k * d].reshape(k, d),
            np.rint(buf[k * d : k * d + k]).astype(np.int64),
            float(buf[-1]),
        )

    def agreement(self, c: np.ndarray, chunk_size: int, max_rows: int = 65536) -> tuple | None:
        """(rows where bf16 top-1 == fp32 top-1, rows compared), summed over ranks."""
        import torch.distributed as dist

        ct = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(self.device)
        xs = self.x[:max_rows]
        a, _ = topk_torch(xs, ct, 1, chunk_size, dtype=torch.float32)
        b, _ = topk_torch(xs, ct, 1, chunk_size, dtype=torch.bfloat16)
        buf = torch.tensor(
            [float((a == b).sum()), float(xs.shape[0])], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(buf)
        return (int(buf[0]), int(buf[1])) if self.rank == 0 else None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# The last worker pool, reused by later runs in this process with the same world size (starting
# Ray workers and importing torch costs seconds per actor; releasing their CPUs is asynchronous).
_POOL: dict = {}


def _make_pool(world: int) -> dict:
    total_cpu = ray.cluster_resources().get("CPU", 1.0)
    total_gpu = ray.cluster_resources().get("GPU", 0.0)
    use_gpu = total_gpu >= world
    cpus = min(1.0, total_cpu / world)
    threads = max(1, int(total_cpu // world))
    opts = {"num_cpus": cpus, "num_gpus": 1 if use_gpu else 0}
    workers = [LloydWorker.options(**opts).remote(r, world, threads, use_gpu) for r in range(world)]
    master = ray.get(workers[0].node_ip.remote())
    port = free_port()
    ray.get([w.setup.remote(master, port) for w in workers])
    return {
        "world": world,
        "workers": workers,
        "use_gpu": use_gpu,
        "job": ray.get_runtime_context().get_job_id(),
    }


def shutdown_pool() -> None:
    """Stop the cached workers (and their process group)."""
    pool = _POOL.pop("pool", None)
    if pool is None:
        return
    try:
        ray.get([w.close.remote() for w in pool["workers"]], timeout=30)
    except Exception as e:  # the group may be broken if a worker died; killing is enough
        log.warning("closing workers: %s", e)
    for w in pool["workers"]:
        ray.kill(w)


def get_pool(world: int) -> dict:
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    pool = _POOL.get("pool")
    job = ray.get_runtime_context().get_job_id()
    if pool is not None and (pool["world"] != world or pool["job"] != job):
        if pool["job"] == job:
            shutdown_pool()
        _POOL.pop("pool", None)
        pool = None
    if pool is not None:
        try:
            ray.get([w.node_ip.remote() for w in pool["workers"]], timeout=30)
        except Exception:
            _POOL.pop("pool", None)
            pool = None
    if pool is None:
        pool = _POOL["pool"] = _make_pool(world)
    return pool


class DistributedLloyd:
    """Context manager over a pool of ``world`` LloydWorker actors, each loaded with one slice of
    ``x``; ``iterate`` fits :func:`run_iterations`. The pool outlives the context (it is reused by
    the next run of the same size; :func:`shutdown_pool` or Ray's shutdown stops it)."""

    def __init__(self, x: np.ndarray, world: int, chunk_size: int = 65536, bf16: bool = False):
        if world < 1:
            raise ValueError(f"num_workers must be >= 1, got {world}")
        self.world, self.chunk_size, self.bf16 = world, chunk_size, bf16
        try:
            pool = get_pool(world)
        except Exception:
            _POOL.pop("pool", None)
            raise
        self.workers, self.use_gpu = pool["workers"], pool["use_gpu"]
        bounds = np.linspace(0, len(x), world + 1).astype(np.int64)
        ray.get([w.load.remote(x[bounds[r] : bounds[r + 1]]) for r, w in enumerate(self.workers)])
        self.n = len(x)

    def iterate(self, c: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float, int]:
        cref = ray.put(np.ascontiguousarray(c, dtype=np.float32))
        outs = ray.get([w.step.remote(cref, self.chunk_size, self.bf16) for w in self.workers])
        sums, counts, obj = outs[0]
        new, nre = update_centroids(sums, counts, rng)
        return new, obj, nre

    def report(self, c: np.ndarray) -> dict:
        out = {"workers": self.world, "device": "cuda" if self.use_gpu else "cpu"}
        if self.use_gpu:
            same, total = ray.get([w.agreement.remote(c, self.chunk_size) for w in self.workers])[0]
            out["bf16_top1_agreement"] = same / max(1, total)
            out["bf16"] = self.bf16
        return out

    def __enter__(self) -> DistributedLloyd:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for w in self.workers:
            w.unload.remote()  # free the slice; keep the process group
        if exc_type is not None:
            shutdown_pool()  # a failed step may leave the group inconsistent
