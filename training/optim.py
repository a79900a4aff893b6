"""The head's optimizer: SGD or AdamW over parameters whose gradients touch only some rows.

Why its own module: a partial-FC head samples a few of its class rows each step, so only those
rows get a gradient. A dense optimizer would decay and advance every row (C_local x D of memory
traffic per step, and momentum that moves rows which saw no data); this one reads and writes only
the rows in the gradient (docs/training.md, "Head optimizer").
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from megaclass.core.workspace import Workspace
from torch import Tensor


class RowSparseOptimizer(torch.optim.Optimizer):
    """SGD (momentum, coupled weight decay) or AdamW for parameters with row-sparse gradients.

    With ``update_unsampled=False`` (default) only rows present in the (sparse) gradient are
    read or written: weight decay, the momentum buffer and the Adam moments of the other rows
    stay bit-identical, and AdamW keeps a per-row step count so bias correction is right for
    rarely sampled rows. With ``update_unsampled=True`` every row is decayed and its momentum /
    moments advanced every step (insightface PartialFC v2 semantics). Dense gradients are
    accepted too (every row counts as sampled).
    """

    def __init__(
        self,
        params,
        algo: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        update_unsampled: bool = False,
        workspace: Workspace | None = None,
    ) -> None:
        if algo not in ("sgd", "adamw"):
            raise ValueError(f"head optimizer must be 'sgd' or 'adamw', got {algo!r}")
        defaults = dict(
            algo=algo,
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            betas=betas,
            eps=eps,
            update_unsampled=update_unsampled,
        )
        super().__init__(params, defaults)
        self._ws = workspace if workspace is not None else Workspace()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, with AdamW's per-row step counts kept int64.

        Why: torch casts every floating-point-param state tensor to the parameter's dtype on
        load. For a bf16 head that turns ``row_step`` into bf16, where 256 + 1 rounds back to
        256: after a resume the count sticks at 256 and Adam's bias correction
        sqrt(1 - 0.999**256) scales every later update by ~0.48. The counts are taken before
        the cast and put back exactly (as int64 on the parameter's device) after it.
        """
        counts = {
            idx: st["row_step"]
            for idx, st in state_dict.get("state", {}).items()
            if isinstance(st, dict) and "row_step" in st
        }
        super().load_state_dict(state_dict)
        if not counts:
            return
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        by_id = dict(zip(saved_ids, params))
        for idx, t in counts.items():
            p = by_id[idx]
            # a checkpoint from a resume before this fix holds float counts: round them back
            t = t.round() if t.is_floating_point() else t
            self.state[p]["row_step"] = t.to(device=p.device, dtype=torch.int64, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    rows, vals = g._indices()[0], g._values()
                    # One forward's gradient has sorted unique rows already; accumulated
                    # micro-batches do not, and only they pay for a coalesce.
                    if not (g.is_coalesced() or bool((rows[1:] > rows[:-1]).all())):
                        g = g.coalesce()
                        rows, vals = g.indices()[0], g.values()
                else:
                    rows, vals = None, g.reshape(p.shape[0], -1).view_as(p)
                if group["algo"] == "sgd":
                    self._sgd(p, rows, vals, group)
                else:
                    self._adamw(p, rows, vals, group)
        return loss

    def _sgd(self, p: Tensor, rows: Tensor | None, vals: Tensor, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        st = self.state[p]
        if mu and "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p)
        if rows is None or group["update_unsampled"]:
            if rows is None:  # a copy only where it is written to (no momentum)
                d = vals if mu else torch.clone(vals)
            else:
                d = torch.zeros_like(p).index_add_(0, rows, vals) if not mu else None
            if mu:
                buf = st["momentum_buffer"]
                buf.mul_(mu)
                if wd:
                    buf.add_(p, alpha=wd)
                if rows is None:
                    buf.add_(d)
                else:
                    buf.index_add_(0, rows, vals)
                p.add_(buf, alpha=-lr)
            else:
                if wd:
                    d.add_(p, alpha=wd)
                p.add_(d, alpha=-lr)
            return
        if mu:  # buf = μ·buf + g + wd·w ; w -= lr·buf   (torch.optim.SGD's update, rows only)
            buf = st["momentum_buffer"]
            b = self._gather(buf, rows)
            torch.add(vals, b, alpha=mu, out=b)
            if wd:
                b.add_(self._gather(p, rows), alpha=wd)
            buf.index_copy_(0, rows, b)
            p.index_add_(0, rows, b, alpha=-lr)  # rows are unique: w − lr·buf, one pass
            return
        w = self._gather(p, rows)
        w.mul_(1.0 - lr * wd).add_(vals, alpha=-lr)
        p.index_copy_(0, rows, w)

    def _gather(self, src: Tensor, rows: Tensor) -> Tensor:
        """``src.index_select(0, rows)`` into a reused scratch buffer (see :class:`Workspace`)."""
        ws = self.__dict__.get("_ws") or self.__dict__.setdefault("_ws", Workspace())  # unpickled
        out = ws.get((rows.numel(), *src.shape[1:]), src.dtype, src.device)
        return torch.index_select(src, 0, rows, out=out)

    def _adamw(self, p: Tensor, rows: Tensor | None, vals: Tensor, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        st = self.state[p]
        if "exp_avg" not in st:
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
            st["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        m, v, t = st["exp_avg"], st["exp_avg_sq"], st["row_step"]
        if rows is None or group["update_unsampled"]:
            t.add_(1)
            g = vals if rows is None else torch.zeros_like(p).index_add_(0, rows, vals)
            p.mul_(1 - lr * wd)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            self._adam_apply(p, m, v, t, lr, b1, b2, eps)
            return
        t_r = t.index_select(0, rows).add_(1)
        t.index_copy_(0, rows, t_r)
        m_r = self._gather(m, rows).mul_(b1).add_(vals, alpha=1 - b1)
        v_r = self._gather(v, rows).mul_(b2).addcmul_(vals, vals, value=1 - b2)
        m.index_copy_(0, rows, m_r)
        v.index_copy_(0, rows, v_r)
        w = self._gather(p, rows).mul_(1 - lr * wd)
        self._adam_apply(w, m_r, v_r, t_r, lr, b1, b2, eps)
        p.index_copy_(0, rows, w)

    @staticmethod
    def _adam_apply(w, m, v, t, lr, b1, b2, eps) -> None:
        # Bias corrections in float32 at least, then cast: in bf16, 0.999 rounds to 1.0, so
        # 1 - 0.999**t was exactly 0 and every bf16 update was m/inf = 0 (the head never
        # moved); counts above 256 also lost their last bits. fp32/fp64 heads: unchanged.
        ft = torch.promote_types(w.dtype, torch.float32)
        tt = t.to(ft).view(-1, *([1] * (w.dim() - 1)))
        bc1 = (1 - b1**tt).to(w.dtype)
        bc2 = (1 - b2**tt).to(w.dtype)
        w.sub_(lr * (m / bc1) / ((v / bc2).sqrt_().add_(eps)))
