"""Margin functions for the (partial-FC) margin softmax and the MLCD positive term.

A margin only rewrites the *target* cosine of each sample: every head in this package computes
cosines, hands the target cosines (one per sample, or one per positive label for MLCD) to
``margin(cos_t, params)`` and multiplies everything by ``margin.scale`` afterwards. Keeping the
margin out of the big B×C matrix means it costs O(B), never O(B·C), and one implementation serves
the single-process, model-parallel and multi-label heads alike.

Per-step randomness or batch statistics (ElasticFace's sampled margins, AdaFace's feature-norm
statistics) are computed once per step for the *global* batch in :meth:`Margin.prepare`, from a
generator seeded identically on every rank, so whichever rank owns a sample's class applies the
same margin the single-process reference would.

Names accepted by :func:`make_margin`: ``arcface`` (true gradient), ``arcface_detached`` (the
forward value of ArcFace with the gradient of the plain cosine, as insightface's arcface_torch
does today), ``cosface``, ``combined`` (m1, m2, m3), ``adaface``, ``elastic_arc``,
``elastic_cos``, ``elastic_arc_plus``, ``elastic_cos_plus`` and ``none``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "Margin",
    "NoMargin",
    "ArcFace",
    "CosFace",
    "CombinedMargin",
    "AdaFace",
    "ElasticFace",
    "make_margin",
    "MARGINS",
]

# Derivative of acos / sqrt(1 - c²) is infinite at |c| = 1; keep cosines strictly inside.
_COS_EPS = 1e-7


class Margin(nn.Module):
    """Base class: identity on the target cosine, logits scaled by ``scale``.

    Subclasses override :meth:`forward` (target cosine → margined target cosine, before the
    scale) and, when they need per-sample state for the global batch, :meth:`prepare`.
    """

    needs_global_cos: bool = False
    """True if :meth:`prepare` needs the detached target cosines of the whole global batch."""

    def __init__(self, scale: float = 64.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"margin scale must be > 0, got {scale}")
        self.scale = float(scale)

    def prepare(
        self,
        *,
        norms: Tensor,
        cos_target: Tensor | None,
        generator: torch.Generator,
    ) -> Tensor | None:
        """Per-sample parameters for the global batch (shape (B,)), identical on all ranks.

        ``norms`` are the detached feature norms of the global batch, ``cos_target`` the
        detached target cosines (only when ``needs_global_cos``), ``generator`` a CPU generator
        seeded per step identically on every rank.
        """
        return None

    def forward(self, cos_t: Tensor, params: Tensor | None = None) -> Tensor:
        """Margined target cosine (before the scale); ``params`` are prepare()'s rows."""
        return cos_t

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class NoMargin(Margin):
    """Plain normalised softmax (NormFace): only the scale."""


def _arc_target(cos_t: Tensor, m: float) -> Tensor:
    """cos(θ + m), and the classic linear fallback ``cos θ − m·sin m`` where θ + m > π."""
    cos_m, sin_m = math.cos(m), math.sin(m)
    sin_t = (1.0 - cos_t * cos_t).clamp_min(_COS_EPS).sqrt()
    phi = cos_t * cos_m - sin_t * sin_m
    # θ + m > π  <=>  cos θ < cos(π − m); there cos(θ + m) turns back up, so use a line below.
    return torch.where(cos_t > math.cos(math.pi - m), phi, cos_t - m * sin_m)


class ArcFace(Margin):
    """Additive angular margin: target logit s·cos(θ + m) (θ + m > π: s·(cos θ − m·sin m)).

    ``detached=False`` (``arcface``): the true gradient of that function.
    ``detached=True`` (``arcface_detached``): same forward value, gradient of the plain scaled
    cosine (what insightface's arcface_torch does; cheaper and never steeper than the cosine).
    """

    def __init__(self, scale: float = 64.0, m: float = 0.5, detached: bool = False) -> None:
        super().__init__(scale)
        if not 0.0 <= m < math.pi:
            raise ValueError(f"ArcFace margin m must be in [0, π), got {m}")
        self.m = float(m)
        self.detached = bool(detached)

    def forward(self, cos_t: Tensor, params: Tensor | None = None) -> Tensor:
        if self.detached:
            with torch.no_grad():
                delta = _arc_target(cos_t, self.m) - cos_t
            return cos_t + delta
        return _arc_target(cos_t, self.m)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}, detached={self.detached}"


class CosFace(Margin):
    """Additive cosine margin: target logit s·(cos θ − m)."""

    def __init__(self, scale: float = 64.0, m: float = 0.35) -> None:
        super().__init__(scale)
        self.m = float(m)

    def forward(self, cos_t: Tensor, params: Tensor | None = None) -> Tensor:
        return cos_t - self.m

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}"


class CombinedMargin(Margin):
    """insightface's combined margin: s·(cos(m1·θ + m2) − m3), true gradient.

    Where m1·θ + m2 > π the cosine would turn back up; there we continue with the line
    ``cos θ − cos θ* − 1 − m3`` (θ* = (π − m2)/m1), which is continuous at θ* and monotonic.
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__(scale)
        if m1 <= 0:
            raise ValueError(f"combined margin m1 must be > 0, got {m1}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)

    def forward(self, cos_t: Tensor, params: Tensor | None = None) -> Tensor:
        theta_star = (math.pi - self.m2) / self.m1
        c = cos_t.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
        if theta_star >= math.pi:  # never wraps
            return torch.cos(self.m1 * torch.acos(c) + self.m2) - self.m3
        inside = cos_t > math.cos(theta_star)
        # acos only where it is used, so no inf/NaN gradients leak through torch.where.
        safe = torch.where(inside, c, torch.zeros_like(c))
        phi = torch.cos(self.m1 * torch.acos(safe) + self.m2) - self.m3
        line = cos_t - math.cos(theta_star) - 1.0 - self.m3
        return torch.where(inside, phi, line)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


class AdaFace(Margin):
    """AdaFace: margin adapted to the feature norm (a proxy for image quality).

    ẑ = clip(h·(n − μ)/(σ + 1e-3), −1, 1) with n the detached, clipped feature norm and μ, σ
    exponential moving averages (α = ``t_alpha``) of the global batch's norm mean/std, updated
    (in training mode) before use, as in the paper's code. θ' = clip(θ − m·ẑ, ε, π − ε);
    target logit = s·(cos θ' − m − m·ẑ).
    """

    def __init__(
        self, scale: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01
    ) -> None:
        super().__init__(scale)
        self.m, self.h, self.t_alpha = float(m), float(h), float(t_alpha)
        self.eps = 1e-3
        self.register_buffer("batch_mean", torch.tensor(20.0, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(100.0, dtype=torch.float64))

    def prepare(self, *, norms: Tensor, cos_target: Tensor | None, generator) -> Tensor:
        n = norms.detach().to(torch.float64).clamp(0.001, 100.0)
        if self.training:
            with torch.no_grad():
                std = n.std() if n.numel() > 1 else torch.zeros((), dtype=n.dtype)
                self.batch_mean.mul_(1 - self.t_alpha).add_(self.t_alpha * n.mean())
                self.batch_std.mul_(1 - self.t_alpha).add_(self.t_alpha * std)
        z = (n - self.batch_mean) / (self.batch_std + self.eps)
        return (self.h * z).clamp(-1.0, 1.0)

    def forward(self, cos_t: Tensor, params: Tensor | None = None) -> Tensor:
        if params is None:
            raise ValueError("AdaFace needs prepare()'s per-sample norm scaler")
        z = params.to(cos_t.dtype)
        theta = torch.acos(cos_t.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))
        theta = (theta - self.m * z).clamp(self.eps, math.pi - self.eps)
        return torch.cos(theta) - self.m - self.m * z

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}"


class ElasticFace(Margin):
    """ElasticFace: a per-sample margin drawn from N(m, σ) every step.

    ``kind='arc'``: s·cos(θ + m_i) (with ArcFace's θ + m > π fallback); ``kind='cos'``:
    s·(cos θ − m_i). ``plus=True`` (ElasticFace+): the drawn margins are sorted and handed out
    by the samples' target cosine, the sample closest to its centre getting the smallest margin.
    """

    def __init__(
        self,
        scale: float = 64.0,
        m: float | None = None,
        std: float = 0.05,
        kind: str = "arc",
        plus: bool = False,
    ) -> None:
        super().__init__(scale)
        if kind not in ("arc", "cos"):
            raise ValueError(f"ElasticFace kind must be 'arc' or 'cos', got {kind!r}")
        self.kind = kind
        self.m = float(m if m is not None else (0.5 if kind == "arc" else 0.35))
        self.std = float(std)
        self.plus = bool(plus)
        self.needs_global_cos = self.plus

    def prepare(self, *, norms: Tensor, cos_target: Tensor | None, generator) -> Tensor:
        b = norms.shape[0]
        margins = torch.randn(b, generator=generator, dtype=torch.float64) * self.std + self.m
        if self.plus:
            if cos_target is None:
                raise ValueError("ElasticFace+ needs the global batch's target cosines")
            order = torch.argsort(cos_target.detach().cpu().to(torch.float64), descending=True)
            sorted_m = torch.sort(margins).values
            margins = torch.empty_like(margins)
            margins[order] = sorted_m
        return margins.to(norms.device)

    def forward(self, cos_t: Tensor, params: Tensor | None = None) -> Tensor:
        if params is None:
            raise ValueError("ElasticFace needs prepare()'s per-sample margins")
        m = params.to(cos_t.dtype)
        if self.kind == "cos":
            return cos_t - m
        sin_t = (1.0 - cos_t * cos_t).clamp_min(_COS_EPS).sqrt()
        phi = cos_t * torch.cos(m) - sin_t * torch.sin(m)
        return torch.where(cos_t > torch.cos(math.pi - m), phi, cos_t - m * torch.sin(m))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, kind={self.kind}, m={self.m}, std={self.std}, plus={self.plus}"


def _no_margin(**kw) -> Margin:
    kw.pop("m", None)
    return NoMargin(**kw)


def _combined(**kw) -> Margin:
    if "m" in kw:
        kw.setdefault("m2", kw.pop("m"))
    return CombinedMargin(**kw)


def _elastic(kind: str, plus: bool) -> Callable[..., Margin]:
    return lambda **kw: ElasticFace(kind=kind, plus=plus, **kw)


MARGIN_BUILDERS: dict[str, Callable[..., Margin]] = {
    "none": _no_margin,
    "arcface": ArcFace,
    "arcface_detached": lambda **kw: ArcFace(detached=True, **kw),
    "cosface": CosFace,
    "combined": _combined,
    "adaface": AdaFace,
    "elastic_arc": _elastic("arc", False),
    "elastic_cos": _elastic("cos", False),
    "elastic_arc_plus": _elastic("arc", True),
    "elastic_cos_plus": _elastic("cos", True),
}
"""The margin registry: name -> constructor. ``train.margin`` accepts exactly these names; a new
margin is a :class:`Margin` subclass above plus one entry here (docs/architecture.md)."""

MARGINS = tuple(MARGIN_BUILDERS)


def make_margin(name: str, **kw) -> Margin:
    """Build a margin by name (see :data:`MARGIN_BUILDERS`); ``kw`` go to its constructor.

    ``m`` is accepted by every margin with a single margin parameter; ``combined`` takes
    ``m1, m2, m3``; all take ``scale``.
    """
    key = name.lower().replace("-", "_")
    if key not in MARGIN_BUILDERS:
        raise ValueError(f"unknown margin {name!r}; choose one of {', '.join(MARGINS)}")
    return MARGIN_BUILDERS[key](**kw)
