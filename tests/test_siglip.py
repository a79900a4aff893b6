"""SigLIP loss against open_clip's SigLipLoss: one process, chunked, and 2 / 4 gloo ranks.

Distributed runs (one spawn per world size, both variants inside) must reproduce the loss on the
concatenated batch: the mean over ranks of the per-rank losses equals it, each rank's feature
gradients equal world × its gradient, and the mean over ranks of the scale/bias gradients
equals its scale/bias gradient (what DDP-style averaging applies). Workers execute this file via
runpy (test modules are not importable by name under pytest's importlib mode).
"""

from __future__ import annotations

import math
import os
import runpy
import traceback

import pytest
import torch
import torch.nn.functional as F
from megaclass.core.net import free_port
from megaclass.training.losses import SigLipLogits, siglip_loss

N_PER_RANK, DIM = 3, 8


def make_batch(world: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = N_PER_RANK * world
    x = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.7 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=1)
    return (
        x,
        y,
        torch.tensor(math.log(10.0), dtype=torch.float64),
        torch.tensor(-3.0, dtype=torch.float64),
    )


def reference(x, y, t, b):
    """open_clip on the concatenated batch (one process): loss and gradients."""
    from open_clip.loss import SigLipLoss  # imported here: the gloo workers do not need it

    x, y, t, b = (v.clone().requires_grad_(True) for v in (x, y, t, b))
    loss = SigLipLoss()(x, y, t.exp(), b)
    loss.backward()
    return loss.detach(), x.grad, y.grad, t.grad, b.grad


def _ours(x, y, t, b, **kw):
    x, y, t, b = (v.clone().requires_grad_(True) for v in (x, y, t, b))
    loss = siglip_loss(x, y, t.exp(), b, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, t.grad, b.grad


def run_checks(rank: int, world: int) -> dict:
    """Per variant/chunking: the rank-mean loss and scale/bias grads, this rank's feature grads."""
    x, y, t, b = make_batch(world, seed=world)
    sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    out = {}
    for variant in ("exchange", "gather"):
        for chunk in (None, 2):
            loss, gx, gy, gt, gb = _ours(x[sl], y[sl], t, b, variant=variant, chunk_size=chunk)
            stats = torch.stack([loss, gt, gb])  # what a DDP-averaging trainer sees
            torch.distributed.all_reduce(stats)
            # Plain lists: tensors in a multiprocessing queue outlive their sender badly.
            out[(variant, chunk)] = ((stats / world).tolist(), gx.tolist(), gy.tolist())
    return out


def check_against_reference(world: int, results: list[dict]) -> list[str]:
    x, y, t, b = make_batch(world, seed=world)
    loss, rx, ry, rt, rb = reference(x, y, t, b)
    fails = []
    for rank, res in enumerate(results):
        sl = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        for key, (stats, gx, gy) in res.items():
            got = {
                "loss": (torch.tensor(stats[0], dtype=torch.float64), loss),
                "d/d log-scale": (torch.tensor(stats[1], dtype=torch.float64), rt),
                "d/d bias": (torch.tensor(stats[2], dtype=torch.float64), rb),
                "d/d image": (torch.tensor(gx, dtype=torch.float64), world * rx[sl]),
                "d/d text": (torch.tensor(gy, dtype=torch.float64), world * ry[sl]),
            }
            for what, (a, e) in got.items():
                if not torch.allclose(a, e, rtol=1e-10, atol=1e-12):
                    err = (a - e).abs().max().item()
                    fails.append(f"world {world} {key} rank {rank} {what}: max err {err}")
    return fails


def spawn_gloo(world: int, timeout: float = 240.0) -> list:
    """Run this file's ``_worker`` on ``world`` gloo ranks; returns each rank's result."""
    ctx = torch.multiprocessing.get_context("spawn")
    q, port, procs = ctx.Queue(), free_port(), []
    for r in range(world):
        g = {"GLOO": {"rank": r, "world": world, "port": port, "queue": q}}
        p = ctx.Process(
            target=runpy.run_path,
            args=(os.path.abspath(__file__),),
            kwargs={"init_globals": g, "run_name": "__gloo_worker__"},
        )
        p.start()
        procs.append(p)
    try:
        out = dict(q.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world)]


def _worker(rank: int, world: int, port: int, queue) -> None:
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        res = run_checks(rank, world)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:  # report, never hang the parent
        res = {"crash": f"rank {rank} crashed:\n{traceback.format_exc()}"}
    queue.put((rank, res))


if __name__ == "__gloo_worker__":
    _worker(**GLOO)  # noqa: F821  (injected by spawn_gloo)


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_single_process_equals_open_clip(chunk):
    x, y, t, b = make_batch(3)  # 9 pairs
    ref = reference(x, y, t, b)
    ours = _ours(x, y, t, b, chunk_size=chunk)
    for name, a, e in zip(("loss", "dx", "dy", "dt", "db"), ours, ref):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-12), name


def test_module_init_and_grad():
    m = SigLipLogits()
    assert math.isclose(m.logit_scale.exp().item(), 10.0, rel_tol=1e-6)
    assert m.logit_bias.item() == -10.0
    x, y, _, _ = make_batch(2)
    loss = m(x.float(), y.float())
    loss.backward()
    assert torch.isfinite(loss) and m.logit_scale.grad is not None and m.logit_bias.grad != 0
    with pytest.raises(ValueError, match="variant"):
        siglip_loss(x, y, 10.0, -10.0, variant="ring")


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_concatenated_batch(world):
    results = spawn_gloo(world)
    crashes = [r["crash"] for r in results if "crash" in r]
    assert not crashes, "\n".join(crashes)
    fails = check_against_reference(world, results)
    assert not fails, "\n".join(fails)
