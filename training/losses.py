"""SigLIP's pairwise sigmoid loss, distributed (neighbour exchange or all-gather) and chunked.

Definition (per rank k with n local image/text pairs and the texts of all W ranks):
    L_k = −(1/n) Σ_{i local} Σ_j log σ(z_ij · (s·x_i·y_j + b)),  z_ij = +1 for the own pair, −1 else.
The mean of L_k over the ranks equals the single-process loss on the concatenated batch, and
each rank's feature gradients equal W × that loss's gradient: a trainer that averages gradients
over ranks (DDP / DeepSpeed) therefore applies exactly the single-process update.

``logit_scale`` is the multiplier s itself (already exponentiated), ``logit_bias`` the bias b —
the same convention as ``open_clip.loss.SigLipLoss``. :class:`SigLipLogits` holds the learnable
log-scale t' (init log 10, s = exp t') and b (init −10) and calls :func:`siglip_loss`.

Memory: the block losses are computed by an autograd function that keeps no B×B matrix
between forward and backward (it recomputes logits in the backward), optionally in row chunks
of ``chunk_size`` so the peak is chunk_size × n_text instead of n × n_text.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megaclass.training.distributed import (
    all_gather_with_grad,
    is_dist,
    neighbour_exchange,
    neighbour_exchange_bidir,
    rank_world,
)
from torch import Tensor, nn

__all__ = ["siglip_loss", "SigLipLogits", "VARIANTS"]

VARIANTS = ("exchange", "gather")


class _SigmoidPairs(torch.autograd.Function):
    """Σ_ij −log σ(z_ij (s·x_i·y_j + b)); z = +1 at (i, pos_offset + i), −1 elsewhere
    (no positives when pos_offset < 0). Row-chunked; logits recomputed in the backward."""

    @staticmethod
    def _labels(rows: slice, n_text: int, pos_offset: int, like: Tensor) -> Tensor:
        z = torch.full((rows.stop - rows.start, n_text), -1.0, dtype=like.dtype, device=like.device)
        if pos_offset >= 0:
            i = torch.arange(rows.start, rows.stop, device=like.device)
            z[i - rows.start, pos_offset + i] = 1.0
        return z

    @staticmethod
    def forward(ctx, x, y, scale, bias, pos_offset: int, chunk: int):
        ctx.save_for_backward(x, y, scale, bias)
        ctx.pos_offset, ctx.chunk = pos_offset, chunk
        total = x.new_zeros(())
        for start in range(0, x.shape[0], chunk):
            rows = slice(start, min(start + chunk, x.shape[0]))
            u = (x[rows] @ y.T).mul_(scale).add_(bias)
            z = _SigmoidPairs._labels(rows, y.shape[0], pos_offset, u)
            total += F.softplus(-z * u).sum()
        return total

    @staticmethod
    def backward(ctx, g):
        x, y, scale, bias = ctx.saved_tensors
        gx = torch.empty_like(x)
        gy = torch.zeros_like(y)
        gs = x.new_zeros(())
        gb = x.new_zeros(())
        for start in range(0, x.shape[0], ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, x.shape[0]))
            dots = x[rows] @ y.T
            u = dots * scale + bias
            z = _SigmoidPairs._labels(rows, y.shape[0], ctx.pos_offset, u)
            gu = torch.sigmoid(-z * u).mul_(-z).mul_(g)  # d softplus(−z u)/du
            gs += (gu * dots).sum()
            gb += gu.sum()
            gu.mul_(scale)
            gx[rows] = gu @ y
            gy.addmm_(gu.T, x[rows])
        return gx, gy, gs.reshape(scale.shape), gb.reshape(bias.shape), None, None


def _pairs(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, pos_offset: int, chunk: int):
    return _SigmoidPairs.apply(x, y, scale, bias, pos_offset, chunk)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    variant: str = "exchange",
    group=None,
    chunk_size: int | None = None,
) -> Tensor:
    """SigLIP loss of this rank's pairs against the texts of every rank (see module docstring).

    Features must already be L2-normalised, (n, d) with the same n on every rank.
    ``variant``: 'exchange' (texts travel around the ring: ⌊(W−1)/2⌋ bidirectional rounds plus
    one one-way step when W−1 is odd; memory O(n·d) per rank) or 'gather' (one all-gather of
    the texts; fewer messages, O(W·n·d) memory). Distributed over ``group`` (default world)
    whenever torch.distributed is initialised with more than one rank.
    """
    if variant not in VARIANTS:
        raise ValueError(f"siglip variant must be one of {VARIANTS}, got {variant!r}")
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image/text features must both be (n, d); got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    x, y = image_features, text_features
    scale = torch.as_tensor(logit_scale, dtype=x.dtype, device=x.device)
    bias = torch.as_tensor(logit_bias, dtype=x.dtype, device=x.device)
    n = x.shape[0]
    chunk = max(1, int(chunk_size)) if chunk_size else max(1, n)
    if not is_dist(group):
        return _pairs(x, y, scale, bias, 0, chunk) / n
    rank, world = rank_world(group)
    if variant == "gather":
        y_all = all_gather_with_grad(y, group, grad_scale=1.0)
        return _pairs(x, y_all, scale, bias, rank * n, chunk) / n
    loss = _pairs(x, y, scale, bias, 0, chunk)
    left, right = (rank - 1) % world, (rank + 1) % world
    to_left = to_right = y
    rounds, one_way = divmod(world - 1, 2)
    for _ in range(rounds):
        from_left, from_right = neighbour_exchange_bidir(to_left, to_right, left, right, group)
        loss = loss + _pairs(x, from_left, scale, bias, -1, chunk)
        loss = loss + _pairs(x, from_right, scale, bias, -1, chunk)
        to_left, to_right = from_right, from_left  # keep travelling the same way
    if one_way:
        from_left = neighbour_exchange(to_right, left, right, group)
        loss = loss + _pairs(x, from_left, scale, bias, -1, chunk)
    return loss / n


class SigLipLogits(nn.Module):
    """Learnable SigLIP temperature and bias: s = exp(logit_scale) (init log 10), b (init −10)."""

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        variant: str = "exchange",
        group=None,
        chunk_size: int | None = None,
    ) -> Tensor:
        """Loss on already-normalised features (see :func:`siglip_loss`)."""
        dt = image_features.dtype
        return siglip_loss(
            image_features,
            text_features,
            self.logit_scale.to(dt).exp(),
            self.logit_bias.to(dt),
            variant=variant,
            group=group,
            chunk_size=chunk_size,
        )
