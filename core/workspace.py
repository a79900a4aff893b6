"""Scratch buffers reused from one use to the next on the CPU: :class:`Workspace`.

Why a pool: on the host every fresh tensor of tens of MB is a fresh ``mmap`` that the kernel
faults in and zeroes page by page — measured ≈40 ms per 100 MB here, more than the pass that
fills it. The partial-FC head (its logit block and gathered rows) and the training loader (the
batch it assembles from its workers' shares) both allocate such tensors every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_users(t: Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


class Workspace:
    """A small pool of scratch buffers reused from one step to the next, on the CPU.

    Why: on the host every fresh tensor of ~100 MB (a partial-FC step's S × D gathered rows, its
    B × S logit block, the rows' gradient, the optimizer's gathered rows) is a fresh ``mmap``
    that the kernel faults in and zeroes page by page: measured ≈40 ms per 100 MB, several times
    the pass that fills it (BENCHMARKS.md, partial-FC step). A buffer is handed out again only
    when nothing else references its storage — the saved tensors of a forward whose backward
    has not run, a gradient still held in ``.grad`` — which the storage's reference count says,
    so reuse never overwrites a live tensor (when every buffer is busy a new one is made). Each
    hand-out is a new view, which is what makes that count see its holders. The head and its
    optimizer share one pool: the optimizer's gathered rows reuse the logit and row buffers the
    finished backward left idle, so the step's peak memory does not grow. On accelerators the
    caching allocator already reuses memory: there ``get`` allocates normally.
    """

    max_buffers = 8
    """Idle buffers beyond this many are dropped (oldest first)."""

    def __init__(self) -> None:
        self._bufs: list[tuple[Tensor, int]] = []

    def get(self, shape, dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised (``torch.empty``-like) tensor of ``shape``."""
        device = torch.device(device)
        if device.type != "cpu" or _storage_use_count is None:
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        best = None
        for i, (buf, idle) in enumerate(self._bufs):
            fits = buf.dtype == dtype and numel <= buf.numel() <= 2 * numel + 4096
            if fits and (best is None or buf.numel() < self._bufs[best][0].numel()):
                if _storage_users(buf) <= idle:
                    best = i
        if best is None:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._bufs.append((buf, _storage_users(buf)))
            if len(self._bufs) > self.max_buffers:
                for i, (old, idle) in enumerate(self._bufs):
                    if _storage_users(old) <= idle:
                        del self._bufs[i]
                        break
        else:
            buf = self._bufs[best][0]
        return buf[:numel].view(shape)

    def trim(self) -> None:
        """Drop the idle buffers (their memory goes back to the system)."""
        self._bufs = [(b, idle) for b, idle in self._bufs if _storage_users(b) > idle]

    def clear(self) -> None:
        """Drop every buffer (memory goes back once no tensor handed out still uses it)."""
        self._bufs.clear()
