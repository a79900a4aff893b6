"""PartialFC with ``class_chunk``: the chunked loss (online softmax over class chunks, logits
recomputed in the backward) against the float64 reference and against the unchunked head.

Why a file of its own: the chunked path is a second implementation of the same loss, so every
check runs it twice on the same data — once against tests/test_partial_fc.py's independent dense
reference (1e-9, as the unchunked head is held to) and once against the unchunked head itself
(1e-12: the two differ only by summation order). The reference, its data and the gloo launcher
are tests/test_partial_fc.py's (loaded with runpy, as tests/test_train.py does); world sizes 1, 2
and 4 run every case in one spawn each. Chunk sizes are chosen so that, at every world size,
some shards split into equal chunks and some leave a shorter last chunk (asserted below).
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from megaclass.training.heads import PartialFC
from torch.utils._python_dispatch import TorchDispatchMode

HELPERS = Path(__file__).with_name("test_partial_fc.py")

# (margin, _compare options incl. chunk): C = 23 (prime) gives uneven shards, 24 shards into
# 24 / 12+12 / 6·4 classes, which chunks of 2, 3 and 6 divide; 61 is for sampling (r = 0.4).
CASES: list[tuple[str, dict]] = [
    ("arcface", {"c": 24, "chunk": 3}),
    ("arcface", {"chunk": 5, "sparse": True}),
    ("arcface", {"chunk": 1}),
    ("arcface", {"chunk": 1000}),  # one chunk, larger than the block
    ("cosface", {"chunk": 4}),
    ("cosface", {"chunk": 4, "avg": True}),
    ("arcface", {"k": 3, "chunk": 5}),
    ("arcface", {"k": 3, "c": 24, "chunk": 2, "sparse": True}),
    ("cosface", {"thresh": 0.2, "chunk": 3}),
    ("cosface", {"thresh": 0.2, "c": 24, "chunk": 6, "k": 3}),
    ("elastic_arc_plus", {"chunk": 5}),  # margin from the global batch's target cosines
    ("arcface", {"rate": 0.4, "frate": 0.5, "c": 61, "chunk": 4, "sparse": True}),
    ("cosface", {"rate": 0.4, "c": 61, "k": 2, "chunk": 3}),
    ("arcface", {"multi": True, "chunk": 5}),
    ("cosface", {"multi": True, "c": 24, "chunk": 3, "sparse": True}),
    ("arcface", {"multi": True, "k": 3, "chunk": 4}),
    ("arcface", {"multi": True, "rate": 0.4, "frate": 0.5, "c": 61, "chunk": 4, "sparse": True}),
    # Row chunks (gradients in the forward): the global batch of 12 rows in chunks of 1, 5
    # (a shorter last chunk) and 4 (even; at 4 ranks one chunk per rank's rows).
    ("arcface", {"row_chunk": 5}),
    ("arcface", {"row_chunk": 1, "sparse": True}),
    ("cosface", {"row_chunk": 4, "avg": True}),
    ("arcface", {"k": 3, "c": 24, "row_chunk": 5, "sparse": True}),
    ("cosface", {"thresh": 0.2, "c": 24, "row_chunk": 4, "k": 3}),
    ("elastic_arc_plus", {"row_chunk": 5}),
    ("arcface", {"rate": 0.4, "frate": 0.5, "c": 61, "row_chunk": 5, "sparse": True}),
    ("cosface", {"rate": 0.4, "c": 61, "k": 2, "row_chunk": 4}),
    ("arcface", {"multi": True, "row_chunk": 5}),
    ("arcface", {"multi": True, "k": 3, "row_chunk": 4, "sparse": True}),
    ("arcface", {"multi": True, "rate": 0.4, "frate": 0.5, "c": 61, "row_chunk": 1}),
]
TOL_HEADS = 1e-12


def _helpers() -> dict:
    """tests/test_partial_fc.py's globals: reference, data, comparison and gloo launcher."""
    return runpy.run_path(str(HELPERS), run_name="test_partial_fc_helpers")


def _check_case(h: dict, rank: int, world: int, name: str, opts: dict) -> tuple[list, dict]:
    """Chunked head vs the reference, then vs the unchunked head on the same data and draws."""
    kw = h["MARGIN_CASES"][name]
    fails, got = h["_compare"](rank, world, name, kw, **opts)
    base_opts = {**opts, "chunk": None, "row_chunk": None}
    fails += h["_compare"](rank, world, name, kw, **base_opts)[0]
    _, want = h["_compare"](rank, world, name, kw, **base_opts)
    tag = f"{name} {opts} rank={rank}/{world}: chunked vs unchunked"
    for key in ("loss", "d_x", "d_w"):
        h["_close"](got[key], want[key], f"{tag} {key}", fails, tol=TOL_HEADS)
    if got["sparse_grad"] != want["sparse_grad"]:
        fails.append(f"{tag}: gradient sparse={got['sparse_grad']} vs {want['sparse_grad']}")
    if opts.get("sparse") and opts.get("rate", 1.0) < 1 and not got["sparse_grad"]:
        fails.append(f"{tag}: sparse_grad=True with sampling gave a dense gradient")
    return fails, {"n_sampled": got["n_sampled"], "chunk": opts.get("chunk")}


def _no_positive_rank(h: dict, rank: int, world: int, multi: bool) -> list[str]:
    """Every label in rank 0's shard: the other ranks have no positive (no target rows to
    gather), which the chunked backward must handle; compared with the unchunked head."""
    c, b = 24, h["BG"] // world
    w, emb, labels = h["make_data"](1, multi, seed=11, c=c)
    labels = torch.where(labels >= 0, labels % (c // world), labels)
    out = []
    for ch in (5, None):
        head = PartialFC(c, h["D"], margin="arcface", scale=h["SCALE"], multi_label=multi,
                         dtype=torch.float64, class_chunk=ch, sparse_grad=True)  # fmt: skip
        head.load_full_weight(w)
        x = emb[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = head(x, labels[rank * b : (rank + 1) * b])
        loss.backward()
        out.append((loss.detach(), x.grad, h["_dense"](head.weight.grad)))
    fails: list[str] = []
    for key, got, want in zip(("loss", "d_x", "d_w"), *out):
        h["_close"](got, want, f"no positives multi={multi} rank={rank}/{world} {key}", fails)
    return fails


def run_chunked_checks(rank: int, world: int) -> dict:
    """Every case on this rank; returns failures and (sampled classes, chunk) per case."""
    torch.manual_seed(0)
    h = _helpers()
    fails, shapes = [], []
    for name, opts in CASES:
        f, shape = _check_case(h, rank, world, name, opts)
        fails += f
        shapes.append(shape)
    if world > 1:
        for multi in (False, True):
            fails += _no_positive_rank(h, rank, world, multi)
    return {"fails": fails, "shapes": shapes}


if __name__ == "__gloo_worker__":
    _helpers()["_worker"](**GLOO, checks=run_chunked_checks)  # noqa: F821 (set by spawn_gloo)


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-{o}" for n, o in CASES])
def test_single_process_chunked_equals_reference_and_unchunked(case):
    name, opts = CASES[case]
    fails, shape = _check_case(_helpers(), 0, 1, name, opts)
    assert not fails, "\n".join(fails)
    assert shape["n_sampled"] > 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_distributed_chunked_equals_reference_and_unchunked(world):
    results = _helpers()["spawn_gloo"](world, script=__file__)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails)
    shapes = [s for r in results for s in r["shapes"]]
    assert len(shapes) == world * len(CASES)
    shapes = [s for s in shapes if s["chunk"] is not None]  # class chunks
    # The cases exercised both an even split into several chunks and a shorter last chunk.
    even = [s for s in shapes if s["n_sampled"] % s["chunk"] == 0 and s["n_sampled"] > s["chunk"]]
    ragged = [s for s in shapes if s["n_sampled"] % s["chunk"] and s["n_sampled"] > s["chunk"]]
    assert even and ragged, shapes


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t.is_sparse:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_working_set_has_no_batch_by_classes_block(k):
    """The memory claim, structurally: with class chunks no tensor of the step (forward and
    backward) is larger than B × chunk·K or the static (C_local·K, D) shard; with row chunks
    none is larger than rows × S·K or that shard; without either the B × S block appears.
    (Sizes chosen so that B × S dwarfs every bound.)"""
    c, d, b, chunk, rows = 3000, 8, 64, 100, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    largest = {}
    for mode, kw in (("none", {}), ("class", {"class_chunk": chunk}), ("row", {"row_chunk": rows})):
        head = PartialFC(c, d, sample_rate=0.5, num_subcenters=k, sparse_grad=True, **kw)
        xg = x.clone().requires_grad_(True)
        with _LargestTensor() as mode_:
            head(xg, y, step=1).backward()
        largest[mode] = mode_.largest
    s = int(0.5 * c)  # sampled classes (the 64 positives fit in the budget)
    assert largest["none"] >= b * s * k
    assert largest["class"] <= max(b * chunk * k, c * k * d), largest
    assert largest["row"] <= max(rows * s * k, c * k * d), largest


class _SparseOps(TorchDispatchMode):
    """Records the ops that take a sparse tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(a, torch.Tensor) and a.is_sparse for a in args):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [{"class_chunk": 37}, {"row_chunk": 5}], ids=["class", "row"])
@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_chunked_training_steps_equal_unchunked(algo, chunk):
    """Three optimizer steps with the row-sparse optimizer (sparse gradients from the chunks and
    from the target side path, summed by autograd and coalesced by the optimizer) move the
    centres exactly as the unchunked head does."""
    heads = [
        PartialFC(
            500,
            16,
            sample_rate=0.2,
            margin="arcface",
            m=0.5,
            scale=32,
            num_subcenters=2,
            dtype=torch.float64,
            **kw,
        )  # fmt: skip
        for kw in ({}, chunk)
    ]
    heads[1].load_state_dict(heads[0].state_dict())
    opts = [h.make_optimizer(algo, lr=0.1, weight_decay=5e-4) for h in heads]
    start = heads[0].weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(12, 16, generator=g, dtype=torch.float64)
        y = torch.randint(0, 500, (12,), generator=g)
        losses = []
        for head, opt in zip(heads, opts):
            opt.zero_grad()
            loss = head(x, y)
            with _SparseOps() as ops:
                loss.backward()
            # One gradient of sorted, unique rows: the target rows' share was merged into the
            # chunks' buffer, not a second sparse gradient for autograd to add (and coalesce).
            assert not [op for op in ops.seen if "add" in op or "coalesce" in op], ops.seen
            grad = head.weight.grad
            rows = grad._indices()[0]
            assert grad.is_sparse and bool((rows[1:] > rows[:-1]).all())
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-12)
    assert not torch.equal(heads[0].weight, start)
    torch.testing.assert_close(heads[1].weight, heads[0].weight, rtol=1e-12, atol=1e-12)


def test_frozen_centres_chunked_equals_unchunked():
    """Centres frozen (no weight gradient wanted): the chunked backward skips the centre GEMM
    and still gives the unchunked embedding gradient."""
    grads = []
    for kw in ({}, {"class_chunk": 7}, {"row_chunk": 3}):
        head = PartialFC(200, 8, sample_rate=0.3, num_subcenters=2, dtype=torch.float64, **kw)
        head.weight.requires_grad_(False)
        g = torch.Generator().manual_seed(4)
        x = torch.randn(10, 8, generator=g, dtype=torch.float64).requires_grad_(True)
        head(x, torch.randint(0, 200, (10,), generator=g), step=2).backward()
        assert head.weight.grad is None
        grads.append(x.grad)
    for got in grads[1:]:
        torch.testing.assert_close(got, grads[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("row_chunk", [None, 4])
def test_row_chunked_gradients_follow_the_upstream_gradient(row_chunk, multi):
    """The row-chunked loss computes its gradients in the forward for an upstream gradient of
    1: the backward must scale them by the one it gets (a loss scale, a weighted sum), and a
    forward under no_grad (evaluation) must give the same loss without computing them."""
    c, d, b = 300, 8, 10
    g = torch.Generator().manual_seed(5)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b, 2) if multi else (b,), generator=g)
    out = []
    for factor in (1.0, 3.5):
        head = PartialFC(c, d, sample_rate=0.3, num_subcenters=2, multi_label=multi,
                         row_chunk=row_chunk, dtype=torch.float64, sparse_grad=True)  # fmt: skip
        xg = x.clone().requires_grad_(True)
        loss = head(xg, y, step=3)
        (factor * loss).backward()
        with torch.no_grad():
            again = head(x, y, step=3)
        assert again.item() == pytest.approx(loss.item(), rel=1e-14)
        out.append((xg.grad, head.weight.grad.to_dense()))
    for one, scaled in zip(*out):
        torch.testing.assert_close(scaled, 3.5 * one, rtol=1e-12, atol=1e-14)
        assert one.abs().sum() > 0


def test_chunks_validated_and_reach_the_head_from_the_config():
    with pytest.raises(ValueError, match="class_chunk must be >= 1"):
        PartialFC(10, 4, class_chunk=0)
    with pytest.raises(ValueError, match="row_chunk must be >= 1"):
        PartialFC(10, 4, row_chunk=0)
    with pytest.raises(ValueError, match="exclude each other"):
        PartialFC(10, 4, row_chunk=8, class_chunk=8)
    from megaclass.pipelines.config import load_config
    from megaclass.training.config import TrainJob
    from megaclass.training.engine import DistEnv
    from megaclass.training.trainer import build_head

    env = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")
    cases = (
        ([], (None, None)),
        (["train.head_class_chunk=64"], (64, None)),
        (["train.head_row_chunk=32"], (None, 32)),
    )
    for over, want in cases:
        cfg = load_config(None, ["train.embed_dim=4", *over])
        job = TrainJob(cfg.train, cfg.data, cfg.seed, Path("/nonexistent"), num_classes=8)
        head = build_head(job, env, 8)
        assert (head.class_chunk, head.row_chunk) == want
