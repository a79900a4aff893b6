"""PartialFC (margin softmax and MLCD) against a dense float64 single-process reference.

The reference below is written independently of training/heads.py: full B×C cosine matrix,
margins from their textbook formulas, F.cross_entropy / logsumexp, plain autograd. One process
is checked in-process; world sizes 1, 2, 4 run every check in ONE gloo spawn each (start-up is
the expensive part). The spawned workers execute this very file via runpy (pytest's importlib
mode makes test modules unimportable by name in a child process).
"""

from __future__ import annotations

import math
import os
import runpy
import traceback
import zlib

import pytest
import torch
import torch.nn.functional as F
from megaclass.core.net import free_port
from megaclass.training.heads import PartialFC, shard_range, step_generator
from megaclass.training.optim import RowSparseOptimizer

C, D, BG, SCALE, SEED = 23, 12, 12, 16.0, 3

# name -> constructor kwargs; references below must agree on the hyper-parameters.
MARGIN_CASES = {
    "none": {},
    "arcface": {"m": 0.5},
    "arcface_detached": {"m": 0.5},
    "cosface": {"m": 0.35},
    "combined": {"m1": 1.1, "m2": 0.3, "m3": 0.1},
    "adaface": {"m": 0.4},
    "elastic_arc": {"m": 0.5, "std": 0.05},
    "elastic_cos": {"m": 0.35, "std": 0.05},
    "elastic_arc_plus": {"m": 0.5, "std": 0.05},
    "elastic_cos_plus": {"m": 0.35, "std": 0.05},
}


# --------------------------------------------------------------------------- reference
def _arc(c: torch.Tensor, m) -> torch.Tensor:
    th = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
    sin_m = math.sin(m) if isinstance(m, float) else torch.sin(m)
    return torch.where(th + m <= math.pi, torch.cos(th + m), c - m * sin_m)


def ref_target(name: str, kw: dict, c: torch.Tensor, emb: torch.Tensor, step: int) -> torch.Tensor:
    """Margined target cosine; ``c`` is (B, n) (each row's entries are that sample's targets)."""
    if name == "none":
        return c
    if name == "arcface":
        return _arc(c, kw["m"])
    if name == "arcface_detached":
        return c + (_arc(c, kw["m"]) - c).detach()
    if name == "cosface":
        return c - kw["m"]
    if name == "combined":
        m1, m2, m3 = kw["m1"], kw["m2"], kw["m3"]
        th = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
        th_star = (math.pi - m2) / m1
        line = c - math.cos(th_star) - 1 - m3
        return torch.where(th <= th_star, torch.cos(m1 * th + m2) - m3, line)
    if name == "adaface":
        n = emb.detach().norm(dim=1).clamp(0.001, 100)
        mean = 0.99 * 20.0 + 0.01 * n.mean()
        std = 0.99 * 100.0 + 0.01 * n.std()
        z = (0.333 * (n - mean) / (std + 1e-3)).clamp(-1, 1)[:, None]
        th = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
        th = (th - kw["m"] * z).clamp(1e-3, math.pi - 1e-3)
        return torch.cos(th) - kw["m"] - kw["m"] * z
    if name.startswith("elastic"):
        # Contract of the head: margins ~ N(m, std) from the shared per-step generator.
        g = step_generator(SEED, step, 0, 0)
        mi = torch.randn(c.shape[0], generator=g, dtype=torch.float64) * kw["std"] + kw["m"]
        if name.endswith("plus"):  # closest to its centre -> smallest margin
            order = torch.argsort(c[:, 0].detach(), descending=True)
            mi_sorted = torch.sort(mi).values
            mi = torch.empty_like(mi)
            mi[order] = mi_sorted
        mi = mi[:, None]
        return _arc(c, mi) if "_arc" in name else c - mi
    raise KeyError(name)


def ref_loss(name, kw, emb, w, labels, *, step=0, classes=None, dims=None, thresh=None):
    """Dense reference. w: (C, K, D); labels (B,) or (B, l) with −1 padding (MLCD)."""
    e, ww = (emb, w) if dims is None else (emb[:, dims], w[..., dims])
    cos = torch.einsum("bd,ckd->bck", F.normalize(e, dim=1), F.normalize(ww, dim=2)).amax(2)
    multi = labels.dim() == 2
    onehot = torch.zeros(cos.shape, dtype=torch.bool)
    if multi:
        r, j = (labels >= 0).nonzero(as_tuple=True)
        onehot[r, labels[r, j]] = True
    else:
        onehot[torch.arange(len(labels)), labels] = True
    if classes is not None:
        cos, onehot = cos[:, classes], onehot[:, classes]
    tgt_c = torch.where(onehot, cos, torch.zeros_like(cos))
    if not multi:
        ct = tgt_c.sum(1, keepdim=True)
        tgt = ref_target(name, kw, ct, emb, step)
        logits = SCALE * torch.where(onehot, tgt.expand_as(cos), cos)
        if thresh is not None:
            logits = torch.where((cos > thresh) & ~onehot, torch.zeros_like(logits), logits)
        return F.cross_entropy(logits, onehot.float().argmax(1))
    tgt = ref_target(name, kw, cos, emb, step)
    neg_inf = torch.full_like(cos, -math.inf)
    zero = torch.zeros(cos.shape[0], 1, dtype=cos.dtype)
    pos = torch.logsumexp(torch.cat([zero, torch.where(onehot, -SCALE * tgt, neg_inf)], 1), 1)
    neg = torch.logsumexp(torch.cat([zero, torch.where(onehot, neg_inf, SCALE * cos)], 1), 1)
    return (pos + neg).mean()


def make_data(k: int = 1, multi: bool = False, seed: int = 0, c: int = C):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, k, D, generator=g, dtype=torch.float64)
    emb = torch.randn(BG, D, generator=g, dtype=torch.float64) * 2
    if multi:
        labels = torch.stack([torch.randperm(c, generator=g)[:4] for _ in range(BG)])
        labels[0, 3] = -1  # padding
        labels[1, 3] = labels[1, 2]  # a duplicate counts once
        first = labels[:, 0]
    else:
        labels = torch.randint(0, c, (BG,), generator=g)
        first = labels
    # Two samples sit almost opposite their centre: exercises the θ + m > π branch.
    emb[:2] = -3 * w[first[:2], 0] + 0.01 * torch.randn(2, D, generator=g, dtype=torch.float64)
    return w, emb, labels


# --------------------------------------------------------------------------- the checks
def _close(a, b, what, fails, tol=1e-9):
    if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
        err = (a - b).abs().max().item() if a.shape == b.shape else f"{a.shape} vs {b.shape}"
        fails.append(f"{what}: mismatch (max abs err {err})")


def _dense(g):
    return g.to_dense() if g.is_sparse else g


def _compare(
    rank, world, name, kw, *, k=1, multi=False, rate=1.0, frate=1.0, thresh=None, c=C, avg=False,
    chunk=None, sparse=None, row_chunk=None,
):  # fmt: skip
    """Run the head on this rank's slice and compare with the reference; returns (fails, info).
    ``chunk``/``row_chunk``/``sparse``: the head's ``class_chunk``/``row_chunk``/``sparse_grad``
    (test_partial_fc_chunked.py);
    ``info`` carries the head's loss and gradients for comparisons between heads."""
    fails: list[str] = []
    seed = zlib.crc32(f"{name}{k}{multi}{rate}".encode()) % 1000
    w, emb, labels = make_data(k, multi, seed=seed, c=c)
    b = BG // world
    head = PartialFC(
        c, D, sample_rate=rate, feature_rate=frate, margin=name, scale=SCALE,
        num_subcenters=k, multi_label=multi, interclass_threshold=thresh, seed=SEED,
        dtype=torch.float64, margin_kwargs=kw, grad_average=avg, class_chunk=chunk,
        sparse_grad=sparse, row_chunk=row_chunk,
    )  # fmt: skip
    head.load_full_weight(w)
    x = emb[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = head(x, labels[rank * b : (rank + 1) * b])
    loss.backward()
    st = head.last_sample
    info = {"dims": st.dims, "local_idx": st.class_index, "seed": seed}
    # Global ids of all sampled classes (from every rank) for the restricted reference.
    start, count = shard_range(c, rank, world)
    mine = torch.arange(start, start + count) if st.class_index is None else st.class_index + start
    classes = mine
    if world > 1:
        sizes = [None] * world
        torch.distributed.all_gather_object(sizes, mine.tolist())
        classes = torch.tensor(sorted(sum(sizes, [])))
    if len(classes) == c:
        classes = None
    info["classes"] = classes
    wr = w.clone().requires_grad_(True)
    er = emb.clone().requires_grad_(True)
    ref = ref_loss(name, kw, er, wr, labels, classes=classes, dims=st.dims, thresh=thresh)
    ref.backward()
    tag = (
        f"{name} k={k} multi={multi} r={rate} f={frate} chunk={chunk} rows={row_chunk} "
        f"rank={rank}/{world}"
    )
    _close(loss.detach(), ref.detach(), f"{tag} loss", fails)
    factor = world if avg else 1  # grad_average=True: ready for DDP-style averaging
    _close(x.grad, factor * er.grad[rank * b : (rank + 1) * b], f"{tag} d/d embeddings", fails)
    info["sparse_grad"] = head.weight.grad.is_sparse
    gw = _dense(head.weight.grad).view(count, k, D)
    _close(gw, wr.grad[start : start + count], f"{tag} d/d centres", fails)
    info.update(loss=loss.detach(), d_x=x.grad, d_w=gw, n_sampled=count)
    if st.class_index is not None:
        info["n_sampled"] = len(st.class_index)
    return fails, info


def run_checks(rank: int, world: int) -> dict:
    """Every distributed check in one go; returns failures and what the parent compares."""
    torch.manual_seed(0)
    fails: list[str] = []
    for name, kw in MARGIN_CASES.items():
        fails += _compare(rank, world, name, kw)[0]
    fails += _compare(rank, world, "arcface", {"m": 0.5}, k=3)[0]
    fails += _compare(rank, world, "cosface", {"m": 0.35}, thresh=0.2)[0]
    fails += _compare(rank, world, "cosface", {"m": 0.35}, avg=True)[0]
    for name in ("arcface", "adaface"):
        fails += _compare(rank, world, name, MARGIN_CASES[name], multi=True)[0]
    f1, sampled = _compare(rank, world, "arcface", {"m": 0.5}, rate=0.4, frate=0.5, c=61)
    f2, _ = _compare(rank, world, "arcface", {"m": 0.5}, rate=0.4, frate=0.5, c=61, multi=True)
    f3, _ = _compare(rank, world, "arcface", {"m": 0.5}, rate=0.4, c=61, k=2)
    fails += f1 + f2 + f3
    # Reproducible: the same (seed, step, rank) draws the same classes and dims.
    _, again = _compare(rank, world, "arcface", {"m": 0.5}, rate=0.4, frate=0.5, c=61)
    for key in ("dims", "local_idx"):
        if not torch.equal(sampled[key], again[key]):
            fails.append(f"rank {rank}: {key} not reproducible")
    # Shards reassemble into the full matrix (export / re-sharding), K = 2, uneven split.
    full = torch.randn(C * 2, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    h = PartialFC(C, D, num_subcenters=2, dtype=torch.float64)
    h.load_full_weight(full)
    if not torch.equal(h.full_weight(), full):
        fails.append(f"rank {rank}: full_weight() does not reassemble the shards")
    # Negatives on a larger head (the positives differ per rank anyway; compare the rest).
    big = PartialFC(4000, 8, sample_rate=0.1, seed=SEED)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(BG, 8, generator=g), torch.randint(0, 4000, (BG,), generator=g)
    b = BG // world
    big(x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b], step=11)
    start, count = shard_range(4000, rank, world)
    local_pos = {int(v) - start for v in y if start <= v < start + count}
    negatives = sorted(set(big.last_sample.class_index.tolist()) - local_pos)
    if len(negatives) != int(0.1 * count) - len(local_pos):
        fails.append(f"rank {rank}: {len(negatives)} negatives, budget {int(0.1 * count)}")
    # Plain lists: tensors in a multiprocessing queue outlive their (exiting) sender badly.
    return {"fails": fails, "dims": sampled["dims"].tolist(), "negatives": negatives}


# --------------------------------------------------------------------------- launcher


def spawn_gloo(world: int, timeout: float = 240.0, script: str | None = None) -> list[dict]:
    """Run ``script``'s (default: this file's) gloo worker on ``world`` ranks; returns each
    rank's result dict.

    Shared with other test files (they load this one with ``runpy.run_path``): the script is
    executed with ``run_name="__gloo_worker__"`` and a ``GLOO`` global (rank, world, port,
    queue), and must then call :func:`_worker` with those and its own ``checks`` function.
    """
    ctx = torch.multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = []
    for r in range(world):
        g = {"GLOO": {"rank": r, "world": world, "port": port, "queue": q}}
        p = ctx.Process(
            target=runpy.run_path,
            args=(os.path.abspath(script or __file__),),
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


def _worker(rank: int, world: int, port: int, queue, checks=None) -> None:
    """One gloo rank: init the process group, run ``checks(rank, world)`` (default
    :func:`run_checks`), put ``(rank, result)`` on the queue. The torch.distributed variables
    are exported too, so code that reads them (DeepSpeed, the trainer) sees the same world."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )  # fmt: skip
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        res = (checks or run_checks)(rank, world)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except Exception:  # report, never hang the parent
        res = {"fails": [f"rank {rank} crashed:\n{traceback.format_exc()}"]}
    queue.put((rank, res))


if __name__ == "__gloo_worker__":
    _worker(**GLOO)  # noqa: F821  (injected by spawn_gloo)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(MARGIN_CASES))
def test_single_process_margins_equal_reference(name):
    fails, _ = _compare(0, 1, name, MARGIN_CASES[name])
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize(
    "opts",
    [
        {"k": 3},
        {"thresh": 0.2},
        {"multi": True},
        {"multi": True, "rate": 0.4, "frate": 0.5, "c": 61},
        {"rate": 0.4, "frate": 0.5, "c": 61},
        {"rate": 0.4, "c": 61, "k": 2},
    ],
)
def test_single_process_variants_equal_reference(opts):
    name = "arcface"
    fails, info = _compare(0, 1, name, MARGIN_CASES[name], **opts)
    assert not fails, "\n".join(fails)
    if opts.get("rate", 1.0) < 1:  # positives kept, negatives fill the budget
        _, _, labels = make_data(
            opts.get("k", 1), opts.get("multi", False), seed=info["seed"], c=61
        )
        pos = set(labels[labels >= 0].tolist())
        assert pos <= set(info["classes"].tolist())
        assert len(info["classes"]) == max(int(0.4 * 61), len(pos))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_equals_reference(world):
    results = spawn_gloo(world)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails)
    dims = [r["dims"] for r in results]
    assert dims[0] is not None and len(dims[0]) == D // 2
    assert all(d == dims[0] for d in dims), "feature subset differs across ranks"
    if world > 1:
        # Same seed and step, equal shard sizes: with one shared stream the negative sets would
        # nearly coincide (≈95 %); independent per-rank streams overlap ≈ 10 %.
        negs = [set(r["negatives"]) for r in results]
        for i in range(1, world):
            overlap = len(negs[0] & negs[i]) / len(negs[0])
            assert overlap < 0.5, f"ranks 0 and {i} drew {overlap:.0%} the same negatives"


def test_labels_validated():
    head = PartialFC(10, 4, margin="cosface")
    with pytest.raises(ValueError, match=r"labels out of range \[0, 10\)"):
        head(torch.randn(3, 4), torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="embeddings must be"):
        head(torch.randn(3, 5), torch.tensor([0, 1, 1]))
    mlcd = PartialFC(10, 4, multi_label=True)
    with pytest.raises(ValueError, match="MLCD labels must be"):
        mlcd(torch.randn(3, 4), torch.tensor([0, 1, 1]))


def _train_steps(head, opt, steps=2):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, head.embed_dim, generator=g)
        y = torch.randint(0, head.num_classes, (8,), generator=g)
        opt.zero_grad()
        head(x, y).backward()
        opt.step()


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_unsampled_rows_untouched_by_default(algo):
    head = PartialFC(400, 16, sample_rate=0.05, margin="arcface", m=0.3, scale=32)
    opt = head.make_optimizer(algo, lr=0.1, weight_decay=0.1)
    _train_steps(head, opt, 1)  # momentum / moments now exist for the first draw's rows
    before = head.weight.detach().clone()
    head.train()
    _train_steps(head, opt, 1)
    sampled = head.last_sample.class_index
    assert head.weight.grad.is_sparse
    untouched = torch.ones(400, dtype=torch.bool)
    untouched[sampled] = False
    assert torch.equal(head.weight[untouched], before[untouched])  # bit-identical
    assert not torch.equal(head.weight[sampled], before[sampled])

    # v2 semantics on request: decay and momentum move every row.
    head2 = PartialFC(400, 16, sample_rate=0.05, margin="arcface", m=0.3, scale=32)
    opt2 = head2.make_optimizer(algo, lr=0.1, weight_decay=0.1, update_unsampled=True)
    _train_steps(head2, opt2, 1)
    before2 = head2.weight.detach().clone()
    _train_steps(head2, opt2, 1)
    moved = (head2.weight != before2).any(dim=1)
    assert bool(moved.all()), "update_unsampled=True left rows untouched"


def test_lazy_sgd_matches_torch_sgd_on_sampled_rows():
    """On rows sampled every step the lazy optimizer is ordinary SGD / AdamW."""
    for algo in ("sgd", "adamw"):
        torch.manual_seed(0)
        w0 = torch.randn(20, 5, dtype=torch.float64)
        p1 = torch.nn.Parameter(w0.clone())
        p2 = torch.nn.Parameter(w0.clone())
        ours = RowSparseOptimizer([p1], algo=algo, lr=0.05, weight_decay=0.01, momentum=0.9)
        if algo == "sgd":
            ref = torch.optim.SGD([p2], lr=0.05, weight_decay=0.01, momentum=0.9)
        else:  # torch AdamW decays before the update, as ours does
            ref = torch.optim.AdamW([p2], lr=0.05, weight_decay=0.01)
        for _ in range(3):
            g = torch.randn(20, 5, dtype=torch.float64)
            idx = torch.arange(20)
            p1.grad = torch.sparse_coo_tensor(idx[None], g, (20, 5), check_invariants=True)
            p2.grad = g.clone()
            ours.step()
            ref.step()
        assert torch.allclose(p1, p2, atol=1e-12), algo


def test_bf16_autocast_is_stable():
    torch.manual_seed(0)
    head = PartialFC(1000, 64, sample_rate=0.2, margin="arcface", m=0.5, scale=64)
    x = torch.randn(16, 64) * 30
    y = torch.randint(0, 1000, (16,))
    ref = head(x, y, step=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = x.to(torch.bfloat16).requires_grad_(True)
        loss = head(xb, y, step=5)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(xb.grad.float()).all()
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())  # bf16 inputs only


def test_gradient_accumulation_sparse_equals_dense():
    """Two micro-batches before one step: the accumulated sparse gradient (overlapping, unsorted
    rows -> coalesced) gives the same update as the dense-gradient head with torch's SGD."""
    heads = [
        PartialFC(300, 8, sample_rate=0.1, margin="cosface", m=0.35, scale=16, sparse_grad=sp)
        for sp in (True, False)
    ]
    heads[1].load_state_dict(heads[0].state_dict())
    opts = [
        # no momentum/decay: torch's SGD would move unsampled rows otherwise (v2 semantics)
        heads[0].make_optimizer("sgd", lr=0.5, momentum=0.0, weight_decay=0.0),
        torch.optim.SGD(heads[1].parameters(), lr=0.5),
    ]
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        data = [
            (torch.randn(6, 8, generator=g), torch.randint(0, 300, (6,), generator=g))
            for _ in range(2)
        ]
        for head, opt in zip(heads, opts):
            opt.zero_grad()
            for x, y in data:
                head(x, y).backward()
            opt.step()
    assert heads[0].weight.grad.is_sparse and not heads[1].weight.grad.is_sparse
    assert torch.allclose(heads[0].weight, heads[1].weight, atol=1e-6)


def test_stock_optimizer_gets_dense_gradient_until_make_optimizer():
    head = PartialFC(200, 8, sample_rate=0.1, margin="arcface", m=0.3, scale=16)
    opt = torch.optim.AdamW(head.parameters(), lr=0.01)
    x, y = torch.randn(4, 8), torch.randint(0, 200, (4,))
    head(x, y).backward()
    assert not head.weight.grad.is_sparse
    opt.step()  # a stock optimizer works (v2 semantics)
    head.weight.grad = None
    head.make_optimizer("adamw")
    head(x, y).backward()
    assert head.weight.grad.is_sparse


def test_workspace_hands_out_idle_buffers_only():
    """A scratch buffer comes back only once nothing holds its storage: not while a view of it
    lives, nor while an autograd graph saved it."""
    from megaclass.training.optim import Workspace

    ws = Workspace()
    a = ws.get((4, 5), torch.float32, "cpu")
    ptr = a.data_ptr()
    view = a[1:]
    del a
    b = ws.get((4, 5), torch.float32, "cpu")  # `view` still uses the first buffer
    assert b.data_ptr() != ptr
    del view
    assert ws.get((2, 10), torch.float32, "cpu").data_ptr() == ptr  # idle again: reused
    ws = Workspace()
    x = torch.ones(3, requires_grad=True)
    two = ws.get((3,), torch.float32, "cpu").fill_(2.0)
    out = torch.mul(x, two)  # the graph saves `two` for the backward
    ptr = two.data_ptr()
    del two
    assert ws.get((3,), torch.float32, "cpu").data_ptr() != ptr  # still saved: not handed out
    out.sum().backward()  # the backward reads the saved 2.0s
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    del out
    assert ws.get((3,), torch.float32, "cpu").data_ptr() == ptr


@pytest.mark.parametrize("chunk", [None, 40])
def test_reused_buffers_never_change_a_pending_backward(chunk):
    """Two forwards before one backward, a no-grad forward in between, then training steps:
    the head's reused buffers (gathered rows, logits, gradient) give exactly what fresh
    heads give, and steady-state steps allocate no new buffer."""
    kw = dict(sample_rate=0.5, margin="arcface", m=0.5, scale=16, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    data = [
        (torch.randn(10, 8, generator=g, dtype=torch.float64), torch.randint(0, 300, (10,)))
        for _ in range(3)
    ]
    head = PartialFC(300, 8, class_chunk=chunk, sparse_grad=True, **kw)
    w0 = head.weight.detach().clone()
    xs = [x.clone().requires_grad_(True) for x, _ in data]
    loss = head(xs[0], data[0][1], step=1) + head(xs[1], data[1][1], step=2)
    with torch.no_grad():
        head(data[2][0], data[2][1], step=3)
    loss.backward()
    want_x, want_w = [], torch.zeros_like(w0)
    for i in range(2):  # each forward in a fresh head: nothing shared
        ref = PartialFC(300, 8, class_chunk=chunk, sparse_grad=True, **kw)
        ref.load_full_weight(w0)
        x = data[i][0].clone().requires_grad_(True)
        ref(x, data[i][1], step=i + 1).backward()
        want_x.append(x.grad)
        want_w += ref.weight.grad.to_dense()
    for got, want in zip(xs, want_x):
        torch.testing.assert_close(got.grad, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.weight.grad.to_dense(), want_w, rtol=1e-12, atol=1e-12)
    # Training steps: after the first, the pool stops growing (every buffer is reused).
    opt = head.make_optimizer("sgd", lr=0.1)
    sizes = []
    for i in range(4):
        opt.zero_grad(set_to_none=True)
        head(data[i % 3][0], data[i % 3][1], step=10 + i).backward()
        opt.step()
        sizes.append(len(head._ws._bufs))
    assert sizes[1:] == [sizes[0]] * 3, sizes
