"""Collectives with autograd-correct backward passes for the model-parallel head and SigLIP.

Everything here degrades to the identity on one process, including when torch.distributed is
not initialised at all, so the heads run unchanged on a laptop.

Gradient conventions of the callers: PartialFC's loss is the global-batch mean, identical on
every rank, and its all-gather backward gives each rank exactly ∂L/∂x for its local rows (a
trainer that averages backbone gradients over W ranks back-propagates W·L, or sets the head's
``grad_average=True`` to have the factor W applied here). SigLIP's per-rank loss covers the
rank's own rows, its mean over ranks is the global loss, and the exchange / gather backward
then gives each rank W·∂L/∂x: plain DDP-style averaging is exact.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_dist",
    "rank_world",
    "all_gather_with_grad",
    "all_gather_no_grad",
    "all_reduce_",
    "neighbour_exchange",
    "neighbour_exchange_bidir",
]


def is_dist(group: dist.ProcessGroup | None = None) -> bool:
    """True if collectives are needed (initialised and more than one rank in ``group``)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank within ``group``, size of ``group``); (0, 1) without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def all_reduce_(t: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, group=None) -> Tensor:
    """In-place all-reduce (no-op on one process); returns ``t``."""
    if is_dist(group):
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather_no_grad(t: Tensor, group=None) -> Tensor:
    """Concatenate ``t`` (same shape on every rank) from all ranks along dim 0, no autograd."""
    if not is_dist(group):
        return t
    _, world = rank_world(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class _AllGatherGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gathered gradient over ranks and hands each
    rank its own slice, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, group, grad_scale: float) -> Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        ctx.rank, ctx.world = rank_world(group)
        ctx.n = x.shape[0]
        return all_gather_no_grad(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        n, r = ctx.n, ctx.rank
        backend = dist.get_backend(ctx.group)
        if backend == "nccl":
            out = torch.empty((n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter: all-reduce the (small) B_global×D block and slice
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
            out = grad[r * n : (r + 1) * n]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


def all_gather_with_grad(x: Tensor, group=None, grad_scale: float = 1.0) -> Tensor:
    """All-gather ``x`` (same shape on all ranks) with gradient routed back to its owner.

    The owner receives the *sum* over ranks of the gradient of its slice, times ``grad_scale``.
    Identity on one process (``grad_scale`` is then ignored, world size being 1).
    """
    if not is_dist(group):
        return x
    return _AllGatherGrad.apply(x, group, float(grad_scale))


def _exchange(sends: list[tuple[Tensor, int]], recvs: list[tuple[Tensor, int]], group) -> None:
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group) for t, peer in recvs]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to ``to_rank`` and receive a same-shaped tensor from ``from_rank``;
    backward sends the received tensor's gradient back to ``from_rank`` and receives ``x``'s
    gradient from ``to_rank``."""

    @staticmethod
    def forward(ctx, x: Tensor, from_rank: int, to_rank: int, group) -> Tensor:
        ctx.peers, ctx.group = (from_rank, to_rank), group
        out = torch.empty_like(x)
        _exchange([(x, to_rank)], [(out, from_rank)], group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        from_rank, to_rank = ctx.peers
        gx = torch.empty_like(grad)
        _exchange([(grad, from_rank)], [(gx, to_rank)], ctx.group)
        return gx, None, None, None


class _NeighbourExchangeBidir(torch.autograd.Function):
    """Send ``to_left`` left and ``to_right`` right; receive from left and from right.
    Needs left ≠ right (world size ≥ 3)."""

    @staticmethod
    def forward(ctx, to_left: Tensor, to_right: Tensor, left: int, right: int, group):
        ctx.peers, ctx.group = (left, right), group
        from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
        ctx.meta = (from_left.shape, from_right.shape, to_left.dtype, to_left.device)
        _exchange(
            [(to_left, left), (to_right, right)], [(from_left, left), (from_right, right)], group
        )
        return from_left, from_right

    @staticmethod
    def backward(ctx, g_from_left: Tensor | None, g_from_right: Tensor | None):
        left, right = ctx.peers
        # What came from the left went there as the left rank's to_right, and vice versa.
        s_left, s_right, dtype, device = ctx.meta
        if g_from_left is None:
            g_from_left = torch.zeros(s_left, dtype=dtype, device=device)
        if g_from_right is None:
            g_from_right = torch.zeros(s_right, dtype=dtype, device=device)
        g_to_left, g_to_right = torch.empty_like(g_from_right), torch.empty_like(g_from_left)
        _exchange(
            [(g_from_left, left), (g_from_right, right)],
            [(g_to_left, left), (g_to_right, right)],
            ctx.group,
        )
        return g_to_left, g_to_right, None, None, None


def neighbour_exchange(x: Tensor, from_rank: int, to_rank: int, group=None) -> Tensor:
    """One-way ring step with autograd (ranks are ranks within ``group``)."""
    return _NeighbourExchange.apply(
        x, _global_rank(group, from_rank), _global_rank(group, to_rank), group
    )


def neighbour_exchange_bidir(
    to_left: Tensor, to_right: Tensor, left: int, right: int, group=None
) -> tuple[Tensor, Tensor]:
    """Two-way ring step with autograd: returns (received from left, received from right)."""
    if left == right:
        raise ValueError("bidirectional exchange needs distinct left and right neighbours")
    return _NeighbourExchangeBidir.apply(
        to_left, to_right, _global_rank(group, left), _global_rank(group, right), group
    )
