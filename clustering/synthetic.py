"""Planted clusters on the unit sphere, for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def planted_sphere(
    n: int, k: int, d: int, noise: float = 0.1, seed: int = 0, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``k`` random unit centres (Gaussian noise of std ``noise`` per
    coordinate·√d scale-free), with their true cluster ids. Generated in blocks to stay lean."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, size=n)
    x = np.empty((n, d), dtype=dtype)
    step = 1 << 20
    for s in range(0, n, step):
        e = min(n, s + step)
        blk = centres[labels[s:e]] + rng.standard_normal((e - s, d)).astype(np.float32) * (
            noise / np.sqrt(d)
        )
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        x[s:e] = blk
    return x, labels
