"""Model-parallel partial-FC classification head (margin softmax and MLCD multi-label loss).

Layout: the C class centres (K sub-centres each) are split contiguously over the ranks of a
process group; rank r owns ``C//W + (r < C%W)`` classes starting at ``r·(C//W) + min(r, C%W)``
(:func:`shard_range`). Each step the local embeddings and labels are all-gathered, every rank
scores the whole global batch against its *sampled* centres, and a distributed softmax
(row max and sum-exp all-reduces) turns the partial logits into the exact global loss.

Dual random selection (Unicom):
- classes: every class that is a positive of the global batch is kept, random negatives fill
  the budget ``int(sample_rate·C_local)``; the generator is seeded from (seed, step, rank) so
  ranks draw different negatives and a rerun draws the same ones;
- feature dimensions: ``int(feature_rate·D)`` dimensions drawn from a generator seeded from
  (seed, step) only — identical on every rank without any communication; both the embeddings
  and the centres are renormalised inside that subspace.
The draws of the last forward are exposed as :attr:`PartialFC.last_sample`.

The loss (:class:`_RowChunkedLoss`): every rank scores the global batch's rows against all its
S sampled classes, ``row_chunk`` rows at a time (default: all B at once). A chunk of rows
against every class has complete softmax statistics once its two all-reduces ran (row max, then
sum-exp and target logit), so its gradients are computed right there, in the forward: the
embedding rows' p·Y, and pᵀ·e_n accumulated into the centres' gradient; the backward only
scales them by the upstream gradient. Three GEMMs per step, whatever the chunk; the working
set is ``row_chunk`` × S logits next to the S·K × D gathered rows and their gradient, which at
10M+ classes and large batches is what keeps the head in memory.

Class chunks (``class_chunk``, :class:`_ChunkedMarginCE`, :class:`_ChunkedMultiLabel`): for when
even the S·K × D gathered rows are too many. The sampled classes are scored a chunk at a time,
the softmax statistics merged online across chunks and then across ranks, and the backward
recomputes each chunk's logits (the centres' gradient of a chunk needs every row's global
normaliser, known only after all chunks): B × chunk logits and chunk·K gathered rows at a
time, for a fourth GEMM per step. Both give the unchunked loss and gradients
(tests/test_partial_fc_chunked.py).

Speed on the host (the step's cost besides its three GEMMs, BENCHMARKS.md): the big per-step
tensors — the S·K × D gathered rows, the logit block, the rows' gradient, the optimizer's
gathered rows — live in buffers reused from step to step
(:class:`~megaclass.core.workspace.Workspace`: a fresh 100 MB tensor costs more in page faults
than the pass that fills it), the logit scale rides on the first GEMM, the probabilities are
never normalised on their own (one scaling), the normalisation backward runs in place in the
gradient buffer, and the target cosines' gradient is added into that buffer
(:class:`_TargetRows`) instead of arriving as a second S × D gradient. The head keeps those
buffers between steps (on the CPU: about 3 × 4·S·K·D + 4·b·S·K bytes, b = the rows scored at
once; accelerators use their caching allocator instead).

Gradient convention: the loss returned on every rank is the mean over the *global* batch (the
same value everywhere). The all-gather's backward sums the embedding gradient over ranks and
hands each rank its slice, so with ``grad_average=False`` each rank's local embeddings get
exactly ∂L/∂x of the global-mean loss — right for a trainer that does not average backbone
gradients. A trainer that averages them over the W ranks (DDP / DeepSpeed) builds the head with
``grad_average=True``: the all-gather backward then multiplies the embedding gradient by W, and
the averaging all-reduce brings it back to ∂L/∂x. megaclass's trainer does this and
back-propagates the plain loss (no loss scaling, no rescaling of the head's gradients). Either
way the backbone update equals the single-process one, and the centres, which are never
averaged, get the exact gradient of the global loss on the rank that owns them.

Unsampled rows: the centres are gathered with a *sparse* gradient, so only the sampled rows
ever carry a gradient and nothing of size C_local×D is allocated per step. The optimizer from
:meth:`PartialFC.make_optimizer` (:class:`~megaclass.training.optim.RowSparseOptimizer`) by default updates only those
rows — weight decay, momentum and Adam moments do not touch unsampled rows (insightface's v1
behaviour; v2 lets them drift). ``update_unsampled=True`` selects the v2 behaviour (decay and
momentum applied to every row each step, at the cost of a full pass over the shard).
Until :meth:`PartialFC.make_optimizer` is called (and unless ``sparse_grad`` is forced), the
gradient is dense instead, so a stock torch optimizer also works — with v2 semantics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from megaclass.core.workspace import Workspace
from megaclass.training.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_,
    is_dist,
    rank_world,
)
from megaclass.training.margins import Margin, make_margin
from megaclass.training.optim import RowSparseOptimizer
from torch import Tensor, nn

__all__ = ["PartialFC", "SampledState", "shard_range", "step_generator"]

log = logging.getLogger(__name__)
_MAX = torch.distributed.ReduceOp.MAX


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """(first class, number of classes) owned by ``rank`` of ``world`` (contiguous shards)."""
    base, rem = divmod(num_classes, world)
    return rank * base + min(rank, rem), base + (1 if rank < rem else 0)


def step_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from an integer tuple (e.g. (seed, step, rank)) via SeedSequence,
    so nearby keys give unrelated streams."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


@dataclass
class SampledState:
    """What the last forward drew (for tests, logging and debugging)."""

    step: int
    rank: int
    class_start: int
    """Global id of this rank's first class."""
    class_index: Tensor | None
    """Sorted *local* indices of the sampled classes; None = all local classes."""
    dims: Tensor | None
    """Sorted sampled feature dimensions (same on every rank); None = all."""


class _Normalize(torch.autograd.Function):
    """Row L2-normalisation keeping one saved buffer (F.normalize's graph keeps several)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        n = x.norm(dim=1, keepdim=True).clamp_min_(1e-12)
        y = x / n
        ctx.save_for_backward(y, n)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        y, n = ctx.saved_tensors
        dot = (g * y).sum(dim=1, keepdim=True)
        return (g - y * dot).div_(n)


def _gather_normalized(
    weight: Tensor,
    rows: Tensor | None,
    dims: Tensor | None,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rows ``rows`` (None = all) and columns ``dims`` (None = all) of ``weight`` in ``dtype``,
    L2-normalised, and their norms. One copy: the normalisation runs in place on it whenever the
    gather or the cast already made one, and never writes into ``weight`` itself. ``out``: a
    buffer of the result's shape to hold that copy (used when no column selection or cast is
    needed)."""
    if out is not None and dims is None and weight.dtype == dtype:
        if rows is None:
            n = torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min_(1e-12)
            return torch.div(weight, n, out=out), n
        w = torch.index_select(weight, 0, rows, out=out)
        n = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(1e-12)
        return w.div_(n), n
    w = weight if rows is None else weight.index_select(0, rows)
    if dims is not None:
        w = w.index_select(1, dims)
    copied = w is not weight
    w = w.to(dtype)
    copied = copied or w.dtype != weight.dtype
    n = w.norm(dim=1, keepdim=True).clamp_min_(1e-12)
    y = w.div_(n) if copied else w / n
    return y, n


def _normalized_rows_backward(
    g: Tensor, y: Tensor, n: Tensor, dims: Tensor | None, width: int, wdtype: torch.dtype
) -> Tensor:
    """Gradient w.r.t. the raw rows of :func:`_gather_normalized`, given the gradient ``g`` of
    its output: (g − y·⟨g, y⟩)/n in ``wdtype``, scattered back to full ``width`` columns (zero
    outside ``dims``)."""
    dot = torch.linalg.vecdot(g, y, dim=1).unsqueeze_(1)
    gx = torch.addcmul(g, y, dot, value=-1.0).div_(n).to(wdtype)
    if dims is not None:
        full = gx.new_zeros((gx.shape[0], width))
        gx = full.index_copy_(1, dims, gx)
    return gx


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two (N, D) matrices, in blocks of ≈1M elements through one small
    product buffer: ``torch.linalg.vecdot`` materialises the whole N × D product (a fresh page-
    faulted tensor, 2x slower than this at S = 50,000, D = 512)."""
    n, d = a.shape
    out = a.new_empty(n)
    step = max(1, (1 << 20) // max(1, d))
    tmp = a.new_empty((min(step, n), d))
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        t = torch.mul(a[lo:hi], b[lo:hi], out=tmp[: hi - lo])
        torch.sum(t, dim=1, out=out[lo:hi])
    return out


def _normalized_rows_backward_(g: Tensor, y: Tensor, n: Tensor) -> Tensor:
    """:func:`_normalized_rows_backward` in place on ``g`` (same dtype, all columns): two passes
    over the rows and no temporary of their size."""
    dot = _rowdot(g, y).unsqueeze_(1)
    return g.addcmul_(y, dot, value=-1.0).div_(n)


def _to_subcentres(g: Tensor, k: int, arg: Tensor | None) -> Tensor:
    """Gradient of the (B, S) max-over-K cosines -> (B, S·K): all of it to the winning
    sub-centre."""
    if k > 1:
        full = g.new_zeros((g.shape[0], g.shape[1], k))
        g = full.scatter_(2, arg.unsqueeze(2), g.unsqueeze(2)).view(g.shape[0], -1)
    return g


# ---------------------------------------------------------- class-chunked loss (bounded memory)
@dataclass
class _ChunkPlan:
    """How a chunked loss walks this rank's S sampled classes: chunks of ``chunk`` classes (the
    last one shorter), each gathered, normalised and scored on its own, in the forward and again
    in the backward (recomputed, never stored), so that no B × S block and no S × D copy of the
    centres exists — only B × chunk and chunk·K × D at a time. It also assembles the centres'
    gradient chunk by chunk into one buffer of the sampled rows (the optimizer needs it whole),
    which the target rows' backward (:class:`_TargetRows`) completes: one gradient, sorted and
    unique, so nothing has to be summed or coalesced afterwards."""

    shape: torch.Size
    """Shape of the weight (C_local·K, D)."""
    wdtype: torch.dtype
    k: int
    idx: Tensor | None
    """Sorted sampled local classes (on the weight's device); None = every local class."""
    dims: Tensor | None
    chunk: int
    sparse: bool
    dtype: torch.dtype
    """Compute dtype of the cosines (float32 or better)."""
    pending: Tensor | None = None
    """The loss's gradient buffer between its backward and :class:`_TargetRows`'s."""
    ws: Workspace | None = None
    """Scratch buffers reused across steps and chunks (gathered rows, logit blocks, the rows'
    gradient; :class:`~megaclass.core.workspace.Workspace`); None = fresh tensors."""

    def scratch(self, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised buffer: from :attr:`ws` when set, else fresh."""
        if self.ws is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return self.ws.get(shape, dtype, device)

    @property
    def n_classes(self) -> int:
        return self.shape[0] // self.k if self.idx is None else int(self.idx.numel())

    def spans(self) -> list[tuple[int, int]]:
        """(first, end) positions of each chunk among the sampled classes."""
        s = self.n_classes
        return [(lo, min(lo + self.chunk, s)) for lo in range(0, s, self.chunk)]

    def class_rows(self, cls: Tensor) -> Tensor:
        """Weight rows (K per class, in order) of the local classes ``cls``."""
        if self.k == 1:
            return cls
        return (cls[:, None] * self.k + torch.arange(self.k, device=cls.device)).reshape(-1)

    def _rows(self, lo: int, hi: int) -> Tensor:
        return self.class_rows(self.idx[lo:hi])

    def buffer_rows(self, cls: Tensor) -> Tensor:
        """Rows of the gradient buffer that hold the sampled local classes ``cls``."""
        if self.idx is not None and self.sparse:
            return self.class_rows(torch.searchsorted(self.idx, cls))
        return self.class_rows(cls)

    def gather(self, weight: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Normalised centre rows of chunk [lo, hi) and their norms ((hi−lo)·K rows)."""
        out = None
        if self.ws is not None and self.dims is None and self.wdtype == self.dtype:
            out = self.ws.get(((hi - lo) * self.k, self.shape[1]), self.dtype, weight.device)
        if self.idx is None:  # contiguous rows: a view, copied once by the cast or the division
            return _gather_normalized(
                weight[lo * self.k : hi * self.k], None, self.dims, self.dtype, out
            )
        return _gather_normalized(weight, self._rows(lo, hi), self.dims, self.dtype, out)

    def grad_buffer(self, device: torch.device) -> Tensor:
        """The centres' gradient buffer: the sampled rows only (sparse) or the whole shard.
        Uninitialised where the chunks write every row of it (they cover all sampled rows)."""
        if self.idx is not None and self.sparse:
            rows = (self.n_classes * self.k, self.shape[1])
            return self.scratch(rows, self.wdtype, device)
        if self.idx is None:
            return self.scratch(self.shape, self.wdtype, device)
        return torch.zeros(self.shape, dtype=self.wdtype, device=device)

    def _direct(self) -> bool:
        """The gradient buffer's rows are the gathered block's rows, in the compute dtype."""
        return self.dims is None and self.wdtype == self.dtype and (self.idx is None or self.sparse)

    def product_buffer(self, device: torch.device, width: int) -> Tensor:
        """Where :class:`_RowChunkedLoss` accumulates pᵀ·e_n (∂L/∂ the normalised gathered rows,
        S·K × ``width``): the centres' gradient buffer itself when :meth:`_direct`, so that
        the normalisation backward then runs in place there; else a temporary."""
        if self._direct():
            return self.grad_buffer(device)
        return torch.empty((self.n_classes * self.k, width), dtype=self.dtype, device=device)

    def rows_grad(self, acc: Tensor, y: Tensor, n: Tensor, device: torch.device) -> Tensor:
        """The centres' gradient buffer from the accumulated :meth:`product_buffer`: the
        normalisation backward of the gathered rows ``y`` (norms ``n``), in place when
        :meth:`_direct`; the buffer :meth:`hand_over` then hands to autograd."""
        if self._direct():
            return _normalized_rows_backward_(acc, y, n)
        gx = _normalized_rows_backward(acc, y, n, self.dims, self.shape[1], self.wdtype)
        buf = self.grad_buffer(device)
        self.put(buf, 0, self.n_classes, gx)
        return buf

    def hand_over(self, ctx, buf: Tensor) -> Tensor | None:
        """End of a chunked loss's backward: the weight gradient to return now, or None when
        the target rows' backward — which autograd runs later, the target cosines feeding
        this loss — will add its rows to ``buf`` and return the whole gradient."""
        if ctx.needs_input_grad[2] and ctx.n_targets:  # _TargetRows' backward follows
            self.pending = buf
            return None
        return self.finish(buf)

    def put(self, buf: Tensor, lo: int, hi: int, gx: Tensor) -> None:
        """Write chunk [lo, hi)'s full-width row gradient ``gx`` into ``buf``."""
        if self.idx is None or self.sparse:  # buffer rows are in chunk order
            buf[lo * self.k : hi * self.k].copy_(gx)
        else:
            buf.index_copy_(0, self._rows(lo, hi), gx)

    def finish(self, buf: Tensor) -> Tensor:
        """The gradient handed to autograd: sparse over the sampled rows (sorted and unique, so
        pre-coalesced), or ``buf`` itself when dense; the forms of :class:`_GatherNormalize`."""
        if self.idx is None or not self.sparse:
            return buf
        rows = self._rows(0, self.n_classes)
        return torch.sparse_coo_tensor(
            rows[None], buf, self.shape, is_coalesced=True, check_invariants=False
        )


class _TargetRows(torch.autograd.Function):
    """Normalised centre rows of the distinct local positive classes ``cls`` (sorted), for the
    target cosines of a chunked loss, which has no gathered S·K × D block to index.

    Why a Function of its own: its backward adds the rows' gradient into the chunked loss's
    gradient buffer (:attr:`_ChunkPlan.pending`, left there by the loss's backward, which
    autograd runs first because the target cosines feed the loss) and returns the centres'
    whole gradient, so the optimizer gets one sorted, unique sparse gradient. Two gradients
    would be summed by autograd into an unsorted one that the optimizer must coalesce — a sort
    and two more copies of the S·K × D rows per step (measured: BENCHMARKS.md). Without a
    pending buffer (the loss needed no centre gradient) it returns its own rows' gradient.
    """

    @staticmethod
    def forward(ctx, weight, cls, plan):
        y, n = _gather_normalized(weight, plan.class_rows(cls), plan.dims, plan.dtype)
        ctx.save_for_backward(y, n, cls)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, g):
        y, n, cls = ctx.saved_tensors
        plan = ctx.plan
        gx = _normalized_rows_backward(g, y, n, plan.dims, plan.shape[1], plan.wdtype)
        buf, plan.pending = plan.pending, None
        if buf is not None:
            buf.index_add_(0, plan.buffer_rows(cls), gx)
            return plan.finish(buf), None, None
        if not cls.numel():
            return None, None, None
        rows = plan.class_rows(cls)
        if plan.sparse:
            out = torch.sparse_coo_tensor(
                rows[None], gx, plan.shape, is_coalesced=True, check_invariants=False
            )
        else:
            out = gx.new_zeros(plan.shape).index_copy_(0, rows, gx)
        return out, None, None


def _chunk_targets(cols: Tensor, plan: _ChunkPlan) -> list[Tensor]:
    """For each chunk, the positions (into ``rows``/``cols``) of the target entries it holds.
    One host sync per forward (the per-chunk counts), none per chunk."""
    spans = plan.spans()
    cid = torch.div(cols, plan.chunk, rounding_mode="floor")
    order = torch.argsort(cid, stable=True)
    counts = torch.bincount(cid, minlength=len(spans)).tolist()
    return list(order.split(counts))


def _chunk_cosines(
    e_n: Tensor, y: Tensor, plan: _ChunkPlan, want_arg: bool
) -> tuple[Tensor, Tensor | None]:
    """(B, chunk) clamped cosines, max over K; the argmax only when the backward needs it (an
    int64 per logit is twice the logit itself). The raw products go to a reused buffer."""
    k = plan.k
    cos = torch.mm(e_n, y.T, out=plan.scratch((e_n.shape[0], y.shape[0]), e_n.dtype, e_n.device))
    arg = None
    if k > 1:
        cos3 = cos.view(cos.shape[0], -1, k)
        cos, arg = cos3.max(dim=2) if want_arg else (cos3.amax(dim=2), None)
    return cos.clamp_(-1.0, 1.0), arg


def _filter(cos: Tensor, tr: Tensor, tc: Tensor, thresh: float | None) -> Tensor | None:
    """Inter-class filter of one chunk: negatives above ``thresh`` get cosine 0 (in place);
    returns the mask (None when off)."""
    if thresh is None:
        return None
    filt = cos > thresh
    filt[tr, tc] = False
    cos.masked_fill_(filt, 0.0)
    return filt


def _backward_chunks(ctx, e_n, weight, rows, cols, lse, cs) -> tuple[Tensor, Tensor | None]:
    """The backward loop both chunked losses share: per chunk the cosines are recomputed and
    turned into the gradient of the loss w.r.t. them, p = exp(s·cos − lse)·c·s (three passes
    over the block), with the target entries zeroed (margin CE: their gradient flows through
    ``tgt``; MLCD: positives are not in the negative term) and filtered negatives too; then the
    two GEMMs and the normalisation backward of the chunk's rows. Returns (∂/∂e_n, centres'
    gradient or None, see :meth:`_ChunkPlan.hand_over`)."""
    plan, s = ctx.plan, ctx.scale
    neg_lse = lse.neg().unsqueeze_(1)
    ge = torch.zeros_like(e_n)
    buf = plan.grad_buffer(weight.device) if ctx.needs_input_grad[1] else None
    for (lo, hi), sel in zip(plan.spans(), ctx.groups):
        tr, tc = rows[sel], cols[sel] - lo
        y, n = plan.gather(weight, lo, hi)
        p, arg = _chunk_cosines(e_n, y, plan, want_arg=True)
        filt = _filter(p, tr, tc, ctx.thresh)
        torch.add(neg_lse, p, alpha=s, out=p).exp_().mul_(cs)
        p[tr, tc] = 0.0
        if filt is not None:
            p.masked_fill_(filt, 0.0)
            del filt
        p = _to_subcentres(p, plan.k, arg)
        ge.addmm_(p, y)
        if buf is not None:
            gw = torch.mm(p.T, e_n)
            del p, arg
            gx = _normalized_rows_backward(gw, y, n, plan.dims, plan.shape[1], plan.wdtype)
            plan.put(buf, lo, hi, gx)
    if plan.ws is not None:
        # The chunk blocks go back to the system now: the optimizer's gathered rows (S·K × D)
        # would not fit in them, and kept next to those they would raise the step's peak.
        plan.ws.trim()
    return ge, None if buf is None else plan.hand_over(ctx, buf)


class _ChunkedMarginCE(torch.autograd.Function):
    """:class:`_DistMarginCE` over chunks of the sampled classes, in bounded memory.

    Forward: per chunk the (B, chunk) logits are formed exactly as the unchunked loss forms them
    (clamp, filter, scale, targets replaced) and reduced to a row log-sum-exp; the chunks are
    merged online (logaddexp), then across ranks as the unchunked loss does — an all-reduce MAX
    of the B local log-sum-exps and an all-reduce SUM of exp(local − max) with the target logit
    (2B floats). Nothing of the chunk is kept: the backward gathers and scores each chunk again
    and turns it into p = exp(logit − global log-sum-exp) directly. Costs one more GEMM (4
    instead of 3) and ≈1.15× the unchunked loss's memory traffic per logit (≈88 vs ≈76 bytes
    in fp32 with K = 1, counted in BENCHMARKS.md), for a working set of B × chunk.

    ``weight`` is the raw (C_local·K, D) parameter: it is saved, so an in-place update between
    this forward and its backward is an autograd error rather than a silently wrong gradient.
    """

    @staticmethod
    def forward(ctx, e_n, weight, tgt, rows, cols, plan, scale, thresh, group, n_rows):
        b = e_n.shape[0]
        z_t = tgt * scale
        groups = _chunk_targets(cols, plan)
        lse = e_n.new_full((b,), -math.inf)
        for (lo, hi), sel in zip(plan.spans(), groups):
            tr, tc = rows[sel], cols[sel] - lo
            y, _ = plan.gather(weight, lo, hi)
            z, _ = _chunk_cosines(e_n, y, plan, want_arg=False)
            del y
            _filter(z, tr, tc, thresh)
            z.mul_(scale)
            z[tr, tc] = z_t[sel]
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            del z
        row_max = lse.clone()
        all_reduce_(row_max, _MAX, group)
        stats = torch.zeros((b, 2), dtype=e_n.dtype, device=e_n.device)
        stats[:, 0] = (lse - row_max).exp()
        stats[rows, 1] = z_t
        all_reduce_(stats, group=group)
        lse_g = stats[:, 0].log().add_(row_max)
        loss = (lse_g - stats[:, 1]).sum() / n_rows
        ctx.save_for_backward(e_n, weight, tgt, rows, cols, lse_g)
        ctx.groups, ctx.plan, ctx.scale, ctx.thresh = groups, plan, scale, thresh
        ctx.n_rows, ctx.n_targets = n_rows, rows.numel()
        return loss

    @staticmethod
    def backward(ctx, g):
        e_n, weight, tgt, rows, cols, lse = ctx.saved_tensors
        s = ctx.scale
        cs = g / ctx.n_rows * s
        p_t = (tgt * s - lse[rows]).exp_()  # target probabilities
        grad_tgt = (p_t - 1.0).mul_(cs)
        ge, gw = _backward_chunks(ctx, e_n, weight, rows, cols, lse, cs)
        return ge, gw, grad_tgt, None, None, None, None, None, None, None


class _ChunkedMultiLabel(torch.autograd.Function):
    """:class:`_DistMultiLabel` over chunks of the sampled classes, in bounded memory.

    Only the negative term touches the (B, S) block: its log-sum-exp over each rank's negatives
    is built chunk by chunk (online logaddexp; a row with no negative in a chunk contributes
    −inf there), then merged across ranks with the "1" term as the unchunked loss merges it
    (all-reduces MAX and SUM of 2B floats). The positive term is O(number of positives) and
    computed as before. The backward recomputes each chunk (see :class:`_ChunkedMarginCE`).
    """

    @staticmethod
    def forward(ctx, e_n, weight, tgt, rows, cols, plan, scale, group, n_rows):
        b = e_n.shape[0]
        groups = _chunk_targets(cols, plan)
        lse = e_n.new_full((b,), -math.inf)
        for (lo, hi), sel in zip(plan.spans(), groups):
            y, _ = plan.gather(weight, lo, hi)
            z, _ = _chunk_cosines(e_n, y, plan, want_arg=False)
            del y
            z.mul_(scale)
            z[rows[sel], cols[sel] - lo] = -math.inf
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            del z
        q = -tgt * scale
        maxes = torch.zeros((b, 2), dtype=e_n.dtype, device=e_n.device)  # the "1" term: max ≥ 0
        maxes[:, 0] = lse.clamp_min(0.0)
        maxes[:, 1] = maxes[:, 1].scatter_reduce(0, rows, q, reduce="amax")
        all_reduce_(maxes, _MAX, group)
        m_neg, m_pos = maxes[:, 0], maxes[:, 1]
        e_pos = (q - m_pos[rows]).exp()
        sums = torch.zeros((b, 2), dtype=e_n.dtype, device=e_n.device)
        sums[:, 0] = (lse - m_neg).exp()
        sums[:, 1].index_add_(0, rows, e_pos)
        all_reduce_(sums, group=group)
        s_neg = sums[:, 0] + torch.exp(-m_neg)
        s_pos = sums[:, 1] + torch.exp(-m_pos)
        lse_neg = s_neg.log().add_(m_neg)
        loss = (lse_neg + m_pos + s_pos.log()).sum() / n_rows
        w_pos = e_pos / s_pos[rows]
        ctx.save_for_backward(e_n, weight, w_pos, rows, cols, lse_neg)
        ctx.groups, ctx.plan, ctx.scale, ctx.thresh = groups, plan, scale, None
        ctx.n_rows, ctx.n_targets = n_rows, rows.numel()
        return loss

    @staticmethod
    def backward(ctx, g):
        e_n, weight, w_pos, rows, cols, lse = ctx.saved_tensors
        cs = g / ctx.n_rows * ctx.scale
        grad_tgt = -w_pos * cs
        ge, gw = _backward_chunks(ctx, e_n, weight, rows, cols, lse, cs)
        return ge, gw, grad_tgt, None, None, None, None, None, None


# ------------------------------------------- the row-chunked loss (gradients in the forward)
def _block_logits(
    e_n: Tensor, y: Tensor, plan: _ChunkPlan, scale: float
) -> tuple[Tensor, Tensor | None]:
    """(b, S) logits s·clamp(cos, −1, 1) of rows ``e_n`` against every sampled class (max over
    the K sub-centres, with its argmax): the scale rides on the GEMM (``alpha``) and the clamp
    is then to ±s, one pass over the block instead of a clamp and a multiplication. The raw
    products go to a reused buffer (:class:`~megaclass.core.workspace.Workspace`)."""
    b, k = e_n.shape[0], plan.k
    z = plan.scratch((b, y.shape[0]), e_n.dtype, e_n.device)
    if scale > 0:
        torch.addmm(z, e_n, y.T, beta=0, alpha=scale, out=z)
    else:
        torch.mm(e_n, y.T, out=z)
    arg = None
    if k > 1:
        z, arg = z.view(b, -1, k).max(dim=2)
    if scale > 0:
        return z.clamp_(-scale, scale), arg
    return z.clamp_(-1.0, 1.0).mul_(scale), arg


def _row_groups(rows: Tensor, b: int, chunk: int) -> list[tuple[int, int, Tensor]]:
    """(first row, end row, positions of the target entries in those rows) for each chunk of
    ``chunk`` rows of the global batch. One host sync (the per-chunk counts)."""
    starts = range(0, b, chunk)
    cid = torch.div(rows, chunk, rounding_mode="floor")
    order = torch.argsort(cid, stable=True)
    counts = torch.bincount(cid, minlength=len(starts)).tolist()
    return [(lo, min(lo + chunk, b), sel) for lo, sel in zip(starts, order.split(counts))]


def _margin_ce_rows(z, tr, tc, tgt, scale, thresh, group, cs, want_p):
    """Softmax cross-entropy of a chunk of rows whose (b, S) logits ``z`` are split column-wise
    across ranks. The targets at ``tr``/``tc`` are replaced by ``scale·tgt`` (their gradient
    flows through ``tgt``), filtered negatives get logit 0 and no gradient. Two all-reduces (b
    floats, MAX; 2b floats, SUM). Returns (sum over the rows of −log p(target), and — when
    ``want_p``, else None — ∂/∂tgt and ∂/∂cosines written over ``z``: cs·softmax, zero at
    targets and filtered entries; ``cs`` = s/B, the gradient for an upstream gradient of 1)."""
    filt = None
    if thresh is not None:
        filt = z > thresh * scale
        filt[tr, tc] = False
        z.masked_fill_(filt, 0.0)
    z_t = tgt * scale
    z[tr, tc] = z_t
    row_max = z.amax(dim=1)
    all_reduce_(row_max, _MAX, group)
    torch.sub(z, row_max[:, None], out=z).exp_()
    stats = torch.zeros((z.shape[0], 2), dtype=z.dtype, device=z.device)
    torch.sum(z, dim=1, out=stats[:, 0])
    stats[tr, 1] = z_t
    all_reduce_(stats, group=group)
    sum_exp = stats[:, 0]
    loss = (sum_exp.log() + row_max - stats[:, 1]).sum()
    if not want_p:
        return loss, None, None
    p = z.mul_((cs / sum_exp)[:, None])  # the probabilities are never normalised on their own
    grad_tgt = p[tr, tc] - cs
    p[tr, tc] = 0.0
    if filt is not None:
        p.masked_fill_(filt, 0.0)
    return loss, grad_tgt, p


def _multi_label_rows(z, tr, tc, tgt, scale, group, cs, want_p):
    """MLCD loss of a chunk of rows, logits split column-wise across ranks:
    Σ_i [ log(1 + Σ_pos exp(−s_p)) + log(1 + Σ_neg exp(s_n)) ], s = scale·cosine, the positives
    (``tr``/``tc``) margined (``tgt``); two all-reduces of 2b floats. Returns what
    :func:`_margin_ce_rows` returns (positives are exactly 0 in ``p``: exp(−inf))."""
    b = z.shape[0]
    z[tr, tc] = -math.inf
    q = -tgt * scale
    maxes = torch.zeros((b, 2), dtype=z.dtype, device=z.device)  # the "1" term: max ≥ 0
    maxes[:, 0] = z.amax(dim=1).clamp_min(0.0)
    maxes[:, 1] = maxes[:, 1].scatter_reduce(0, tr, q, reduce="amax")
    all_reduce_(maxes, _MAX, group)
    m_neg, m_pos = maxes[:, 0], maxes[:, 1]
    torch.sub(z, m_neg[:, None], out=z).exp_()
    e_pos = (q - m_pos[tr]).exp()
    sums = torch.zeros((b, 2), dtype=z.dtype, device=z.device)
    torch.sum(z, dim=1, out=sums[:, 0])
    sums[:, 1].index_add_(0, tr, e_pos)
    all_reduce_(sums, group=group)
    s_neg = sums[:, 0] + torch.exp(-m_neg)
    s_pos = sums[:, 1] + torch.exp(-m_pos)
    loss = (m_neg + s_neg.log() + m_pos + s_pos.log()).sum()
    if not want_p:
        return loss, None, None
    return loss, e_pos.div_(s_pos[tr]).mul_(-cs), z.mul_((cs / s_neg)[:, None])


class _RowChunkedLoss(torch.autograd.Function):
    """Margin softmax or MLCD loss over this rank's S sampled classes, the global batch's rows
    scored ``row_chunk`` at a time, each chunk's gradients computed in the forward.

    Why in the forward: a row's softmax needs every class, and a chunk of rows scored against
    all S classes has them — its log-sum-exp is complete (after the two all-reduces of its
    rows), so the chunk's probabilities, hence its embedding gradient (p·Y) and its share of the
    centres' gradient (pᵀ·e_n, accumulated over the chunks), follow at once, and the (b, S)
    block is then dropped. Three GEMMs per step as without chunks, no recomputation (chunking
    the classes instead needs a fourth: :class:`_ChunkedMarginCE`); the working set is
    ``row_chunk`` × S logits next to the S·K × D gathered rows and their gradient. One chunk
    of all B rows is the unchunked head. The gradients are those of an upstream gradient of 1;
    the backward scales them by the one it gets (DeepSpeed's fp16 loss scale, a weighted sum).

    ``want_grad`` (no autograd graph under ``torch.no_grad``, where ``needs_input_grad`` still
    says True) skips the gradient GEMMs.
    """

    @staticmethod
    def forward(
        ctx, e_n, weight, tgt, rows, cols, plan, scale, thresh, group, n_rows, row_chunk,
        multi, want_grad,
    ):  # fmt: skip
        b = e_n.shape[0]
        y, n = plan.gather(weight, 0, plan.n_classes)
        want_ge = want_grad and ctx.needs_input_grad[0]
        want_gw = want_grad and ctx.needs_input_grad[1]
        want_p = want_ge or want_gw
        cs = scale / n_rows
        ge = torch.empty_like(e_n) if want_ge else None
        acc = plan.product_buffer(e_n.device, y.shape[1]) if want_gw else None
        grad_tgt = torch.empty_like(tgt) if want_p else None
        total = e_n.new_zeros(())
        first = True
        for lo, hi, sel in _row_groups(rows, b, row_chunk):
            tr, tc = rows[sel] - lo, cols[sel]
            z, arg = _block_logits(e_n[lo:hi], y, plan, scale)
            if multi:
                loss, g_t, p = _multi_label_rows(z, tr, tc, tgt[sel], scale, group, cs, want_p)
            else:
                loss, g_t, p = _margin_ce_rows(
                    z, tr, tc, tgt[sel], scale, thresh, group, cs, want_p
                )
            del z
            total += loss
            if p is not None:
                grad_tgt[sel] = g_t
                p = _to_subcentres(p, plan.k, arg)
                if ge is not None:
                    torch.mm(p, y, out=ge[lo:hi])
                if acc is not None:
                    torch.addmm(acc, p.T, e_n[lo:hi], beta=0 if first else 1, out=acc)
                first = False
            del p, arg
        ctx.ge, ctx.grad_tgt = ge, grad_tgt
        ctx.gw = None if acc is None else plan.rows_grad(acc, y, n, e_n.device)
        ctx.plan, ctx.n_targets = plan, rows.numel()
        return total / n_rows

    @staticmethod
    def backward(ctx, g):
        ge, gw, grad_tgt = ctx.ge, ctx.gw, ctx.grad_tgt
        ctx.ge = ctx.gw = ctx.grad_tgt = None
        if not bool(g == 1.0):  # one host sync; a pass over the gradients only when needed
            for t in (ge, gw, grad_tgt):
                if t is not None:
                    t.mul_(g)
        gw = None if gw is None else ctx.plan.hand_over(ctx, gw)
        return (ge, gw, grad_tgt) + (None,) * 10


class PartialFC(nn.Module):
    """Partial-FC head: sharded class centres, class and feature sampling, margin softmax or MLCD.

    Args:
        num_classes: C, total over all ranks.
        embed_dim: D.
        sample_rate: r; each rank scores int(r·C_local) classes per step in total: its positives
            first, random negatives for the rest (MLCD too: r is the whole budget, not a
            negative ratio; positives alone may fill it). 1.0 = every class.
        feature_rate: f; fraction of embedding dimensions used each step (same on all ranks).
        margin: a :class:`~megaclass.training.margins.Margin` or a name for ``make_margin``.
        scale: logit scale s (overrides the margin's); None keeps the margin's own default.
        m: margin value passed to ``make_margin`` when ``margin`` is a name.
        num_subcenters: K centres per class; the cosine to a class is the max over its K.
        multi_label: MLCD loss; labels are then (B, l) with −1 as padding.
        interclass_threshold: negatives with cosine above it get logit 0 and no gradient
            (noisy-label filtering); None disables. Single-label loss only.
        group: process group the head is split over; None = the default (world) group.
        seed: seeds initialisation and every per-step draw.
        grad_average: multiply the embedding gradient by the world size (see the module
            docstring); False (default) = exact ∂L/∂x of the global-mean loss.
        sparse_grad: True = the centres get a sparse gradient of the sampled rows only (needs
            :meth:`make_optimizer`'s optimizer); False = a dense C_local×D gradient that stock
            torch optimizers accept (they then decay/advance every row). None (default) =
            sparse once :meth:`make_optimizer` has been called on this head, dense before,
            so a stock optimizer keeps working (with a one-time warning when sampling).
        margin_m: alias of ``m`` (the name TrainConfig uses).
        margin_kwargs: further ``make_margin`` arguments (e.g. m1/m2/m3, std, h).
        init_std: centres ~ N(0, init_std).
        dtype: storage dtype of the centres (float32; float64 for references).
        class_chunk: score the sampled classes in chunks of this many classes, merging the
            softmax statistics online, and recompute each chunk's logits in the backward
            instead of storing them: the working set is then B × class_chunk logits (×K raw
            cosines) and class_chunk·K gathered rows, not B × S and S·K, for one more GEMM
            per step. None (default) = every sampled class in one block, the path without
            recomputation. Same loss and gradients either way
            (tests/test_partial_fc_chunked.py). For when even the S·K × D gathered rows are too
            many; otherwise ``row_chunk`` bounds the block for less time.
        row_chunk: score the global batch's rows this many at a time against all sampled
            classes and compute each chunk's gradients at once (:class:`_RowChunkedLoss`):
            the working set is row_chunk × S logits (×K raw cosines) next to the S·K × D
            gathered rows and their gradient, for no extra GEMM. None (default) = all B rows
            in one chunk. Excludes ``class_chunk``.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        sample_rate: float = 1.0,
        feature_rate: float = 1.0,
        margin: Margin | str = "arcface",
        scale: float | None = None,
        m: float | None = None,
        num_subcenters: int = 1,
        multi_label: bool = False,
        interclass_threshold: float | None = None,
        group=None,
        seed: int = 0,
        grad_average: bool = False,
        sparse_grad: bool | None = None,
        margin_m: float | None = None,
        margin_kwargs: dict | None = None,
        init_std: float = 0.01,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        class_chunk: int | None = None,
        row_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0.0 < feature_rate <= 1.0:
            raise ValueError(f"feature_rate must be in (0, 1], got {feature_rate}")
        if num_subcenters < 1:
            raise ValueError(f"num_subcenters must be >= 1, got {num_subcenters}")
        if class_chunk is not None and class_chunk < 1:
            raise ValueError(f"class_chunk must be >= 1 or None, got {class_chunk}")
        if row_chunk is not None and row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1 or None, got {row_chunk}")
        if class_chunk is not None and row_chunk is not None:
            raise ValueError("class_chunk and row_chunk exclude each other: set one")
        if multi_label and interclass_threshold is not None:
            raise ValueError("interclass_threshold applies to the single-label loss only")
        self.group = group
        self.rank, self.world = rank_world(group)
        if num_classes < self.world:
            raise ValueError(f"num_classes={num_classes} < world size {self.world}")
        self.num_classes, self.embed_dim = int(num_classes), int(embed_dim)
        self.sample_rate, self.feature_rate = float(sample_rate), float(feature_rate)
        self.num_subcenters, self.multi_label = int(num_subcenters), bool(multi_label)
        self.interclass_threshold = interclass_threshold
        self.seed, self.grad_average = int(seed), bool(grad_average)
        self.sparse_grad = sparse_grad
        self.class_chunk = None if class_chunk is None else int(class_chunk)
        self.row_chunk = None if row_chunk is None else int(row_chunk)
        self._owns_optimizer = False
        self._warned_dense = False
        if m is not None and margin_m is not None and m != margin_m:
            raise ValueError(f"m={m} and margin_m={margin_m} disagree")
        m = m if m is not None else margin_m
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world)
        if isinstance(margin, str):
            kw = dict(margin_kwargs or {})
            if scale is not None:
                kw["scale"] = scale
            if m is not None:
                kw["m"] = m
            margin = make_margin(margin, **kw)
        elif scale is not None:
            margin.scale = float(scale)
        self.margin = margin
        weight = torch.empty(
            self.num_local * self.num_subcenters, embed_dim, dtype=dtype, device=device
        )
        weight.normal_(0.0, init_std, generator=step_generator(self.seed, 7, self.rank))
        self.weight = nn.Parameter(weight)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.last_sample: SampledState | None = None
        self._ws = Workspace()

    # ----------------------------------------------------------------------------- helpers
    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, local=[{self.class_start}, "
            f"{self.class_start + self.num_local}), embed_dim={self.embed_dim}, "
            f"sample_rate={self.sample_rate}, feature_rate={self.feature_rate}, "
            f"K={self.num_subcenters}, multi_label={self.multi_label}, world={self.world}"
            + ("" if self.class_chunk is None else f", class_chunk={self.class_chunk}")
            + ("" if self.row_chunk is None else f", row_chunk={self.row_chunk}")
        )

    @torch.no_grad()
    def load_full_weight(self, full: Tensor) -> None:
        """Copy this rank's rows out of a full (C·K, D) or (C, K, D) centre matrix."""
        full = full.reshape(self.num_classes * self.num_subcenters, self.embed_dim)
        k = self.num_subcenters
        self.weight.copy_(full[self.class_start * k : (self.class_start + self.num_local) * k])

    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """All-gather the whole (C·K, D) centre matrix (for export and re-sharding)."""
        if not is_dist(self.group):
            return self.weight.detach().clone()
        k = self.num_subcenters
        rows_max = shard_range(self.num_classes, 0, self.world)[1] * k
        pad = torch.zeros(
            rows_max, self.embed_dim, dtype=self.weight.dtype, device=self.weight.device
        )
        pad[: self.weight.shape[0]] = self.weight
        parts = all_gather_no_grad(pad, self.group).split(rows_max)
        return torch.cat(
            [p[: shard_range(self.num_classes, r, self.world)[1] * k] for r, p in enumerate(parts)]
        )

    def make_optimizer(
        self,
        name: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        update_unsampled: bool = False,
    ) -> RowSparseOptimizer:
        """The head's optimizer (it must not go through DeepSpeed/DDP: it is not replicated).

        Calling it switches the head (``sparse_grad=None``) to sparse row gradients; with
        ``update_unsampled=False`` unsampled rows are then never read or written.
        """
        self._owns_optimizer = True
        return RowSparseOptimizer(
            [self.weight],
            algo=name,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            betas=betas,
            eps=eps,
            update_unsampled=update_unsampled,
            workspace=self._ws,
        )

    def _check_labels(self, labels: Tensor, b: int) -> Tensor:
        if self.multi_label:
            if labels.dim() != 2 or labels.shape[0] != b:
                raise ValueError(f"MLCD labels must be (B={b}, l), got {tuple(labels.shape)}")
            lo = -1
        else:
            if labels.dim() == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.dim() != 1 or labels.shape[0] != b:
                raise ValueError(f"labels must be (B={b},), got {tuple(labels.shape)}")
            lo = 0
        if labels.numel() and (int(labels.min()) < lo or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels out of range [{lo}, {self.num_classes}): "
                f"min {int(labels.min())}, max {int(labels.max())}"
            )
        return labels.long()

    def _sample_classes(
        self, pos_local: Tensor, gen: torch.Generator, device: torch.device | None = None
    ) -> Tensor | None:
        """The sampled local classes, sorted: the positives plus the negatives with the highest
        random scores. The scores come from the CPU generator (the same draws whatever the
        device); the top-k over them runs on ``device`` — on a GPU that is ~20x cheaper than on
        the host at 1M classes per rank (BENCHMARKS.md, GPU validation)."""
        budget = max(1, int(self.sample_rate * self.num_local))
        if budget >= self.num_local:
            return None
        if pos_local.numel() >= budget:
            return pos_local
        scores = torch.rand(self.num_local, generator=gen)
        if device is not None and device.type != "cpu":
            scores, pos_local = scores.to(device), pos_local.to(device)
        scores[pos_local] = 2.0
        return scores.topk(budget, sorted=False).indices.sort().values

    # ----------------------------------------------------------------------------- forward
    def forward(self, embeddings: Tensor, labels: Tensor, step: int | None = None) -> Tensor:
        """Loss (mean over the global batch, same value on every rank).

        ``embeddings``: (B, D) local batch (any float dtype; the head computes in fp32 or
        better). ``labels``: (B,) global class ids, or (B, l) for MLCD (−1 = padding). B must be
        the same on every rank. ``step`` overrides the internal draw counter (which advances by
        one per forward in training mode).
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"embeddings must be (B, {self.embed_dim}), got {tuple(embeddings.shape)}"
            )
        b = embeddings.shape[0]
        labels = self._check_labels(labels.to(embeddings.device), b)
        if step is None:
            step = int(self.step)
            if self.training:
                self.step += 1
        device, k = self.weight.device, self.num_subcenters
        cdtype = torch.promote_types(self.weight.dtype, torch.float32)

        scale = self.world if self.grad_average else 1
        emb = all_gather_with_grad(embeddings, self.group, grad_scale=scale)
        lab = all_gather_no_grad(labels, self.group)
        n_rows = emb.shape[0]

        shared = step_generator(self.seed, step, 0, 0)
        local = step_generator(self.seed, step, 1, self.rank)
        dims = None
        n_dims = max(1, int(self.feature_rate * self.embed_dim))
        if n_dims < self.embed_dim:
            dims = torch.randperm(self.embed_dim, generator=shared)[:n_dims].sort().values

        # Local positives: (row in global batch, local class id).
        flat = lab.reshape(-1)
        in_shard = (flat >= self.class_start) & (flat < self.class_start + self.num_local)
        pos_flat = in_shard.nonzero().squeeze(1)
        rows = pos_flat // lab.shape[1] if lab.dim() == 2 else pos_flat
        local_cls = flat[pos_flat] - self.class_start
        if self.multi_label and local_cls.numel():  # duplicate labels in a row count once
            key = torch.unique(rows * self.num_local + local_cls)
            rows, local_cls = key // self.num_local, key % self.num_local
        idx = self._sample_classes(torch.unique(local_cls).cpu(), local, device)
        self.last_sample = SampledState(step, self.rank, self.class_start, idx, dims)
        if idx is not None:
            idx = idx.to(device)
            cols = torch.searchsorted(idx, local_cls)
        else:
            cols = local_cls

        with torch.autocast(device_type=device.type, enabled=False):
            e = emb.to(cdtype)
            norms = e.detach().norm(dim=1)
            if dims is not None:
                dims = dims.to(device)
                e = e[:, dims]
            e_n = _Normalize.apply(e)
            sparse = self._owns_optimizer if self.sparse_grad is None else self.sparse_grad
            if not sparse and idx is not None and not self._warned_dense:
                self._warned_dense = True
                log.warning(
                    "PartialFC: dense centre gradients (no head.make_optimizer()): a stock "
                    "optimizer will decay/advance unsampled rows too (PartialFC v2 semantics)"
                )
            # Without class chunks: one chunk of every sampled class (rows chunked or not), its
            # big buffers reused across steps.
            n_sampled = self.num_local if idx is None else int(idx.numel())
            if self.class_chunk is not None:  # bounded memory: reuse within the step only
                self._ws.trim()
            plan = _ChunkPlan(
                self.weight.shape, self.weight.dtype, k, idx, dims,
                self.class_chunk or max(1, n_sampled), sparse, cdtype,
                ws=self._ws,
            )  # fmt: skip
            # Target cosines through a small side path whose backward adds its rows to the
            # loss's centre gradient (no S × D zeros, no second gradient to sum): each
            # distinct positive class gathered once, expanded to the positives.
            uniq, inv = torch.unique(local_cls, return_inverse=True)
            w_u = _TargetRows.apply(self.weight, uniq, plan)
            w_t = w_u.view(-1, k, w_u.shape[1])[inv]
            cos_t = (w_t * e_n[rows, None, :]).sum(dim=2).amax(dim=1).clamp(-1.0, 1.0)

            mg = self.margin
            cos_global = None
            if mg.needs_global_cos:
                if self.multi_label:
                    raise ValueError(f"{type(mg).__name__} with plus=True needs a single label")
                cos_global = torch.zeros(n_rows, dtype=cdtype, device=device)
                cos_global[rows] = cos_t.detach()
                all_reduce_(cos_global, group=self.group)
            params = mg.prepare(norms=norms, cos_target=cos_global, generator=shared)
            tgt = mg(cos_t, None if params is None else params.to(device)[rows])

            if self.class_chunk is not None:
                if self.multi_label:
                    return _ChunkedMultiLabel.apply(
                        e_n, self.weight, tgt, rows, cols, plan, mg.scale, self.group, n_rows
                    )
                return _ChunkedMarginCE.apply(
                    e_n, self.weight, tgt, rows, cols, plan, mg.scale, self.interclass_threshold,
                    self.group, n_rows,
                )  # fmt: skip
            return _RowChunkedLoss.apply(
                e_n, self.weight, tgt, rows, cols, plan, mg.scale, self.interclass_threshold,
                self.group, n_rows, self.row_chunk or n_rows, self.multi_label,
                torch.is_grad_enabled(),
            )  # fmt: skip
