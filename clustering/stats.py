"""Cluster statistics and plots: sizes, balance, objective, agreement with ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megaclass.core.atomic import atomic_path

PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)


def imbalance(sizes: np.ndarray) -> float:
    """k·Σh²/(Σh)²: 1.0 when every cluster has the same size (faiss's imbalance factor)."""
    h = np.asarray(sizes, dtype=np.float64)
    return float(len(h) * (h**2).sum() / max(h.sum() ** 2, 1e-300))


def size_stats(sizes: np.ndarray) -> dict:
    h = np.asarray(sizes, dtype=np.int64)
    pct = np.percentile(h, PERCENTILES)
    return {
        "k": int(len(h)),
        "points": int(h.sum()),
        "empty": int((h == 0).sum()),
        "singleton": int((h == 1).sum()),
        "imbalance": imbalance(h),
        "size_percentiles": {f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)},
        "largest": [int(v) for v in np.sort(h)[::-1][:10]],
    }


def quality(truth: list, pred: np.ndarray, max_ami_cells: int = 50_000_000) -> dict:
    """NMI/AMI/homogeneity/completeness of ``pred`` against ground-truth classes.

    Rows whose class is missing (None/'') are left out. AMI's expected-MI term costs about
    classes × clusters × n operations, so it is skipped (reported as None) beyond
    ``max_ami_cells`` classes·clusters.
    """
    from sklearn import metrics

    t = np.array(["" if c is None else str(c) for c in truth], dtype=object)
    keep = t != ""
    if keep.sum() == 0:
        return {}
    t, p = t[keep], np.asarray(pred)[keep]
    _, t_ids = np.unique(t, return_inverse=True)
    n_cls, n_clu = int(t_ids.max()) + 1, int(len(np.unique(p)))
    h, c, v = metrics.homogeneity_completeness_v_measure(t_ids, p)
    out = {
        "rows": int(keep.sum()),
        "classes": n_cls,
        "nmi": float(metrics.normalized_mutual_info_score(t_ids, p)),
        "homogeneity": float(h),
        "completeness": float(c),
        "ami": None,
    }
    if n_cls * n_clu <= max_ami_cells:
        out["ami"] = float(metrics.adjusted_mutual_info_score(t_ids, p))
    return out


def _save_fig(fig, path: Path) -> None:  # noqa: ANN001
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


def plot_objective(
    objective: list[float], path: str | Path, title: str = "k-means objective"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(objective) + 1), objective, marker="o", ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("Σ cosine to assigned centroid")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save_fig(fig, Path(path))
    plt.close(fig)


def plot_sizes(sizes: np.ndarray, path: str | Path, title: str = "cluster sizes") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.sort(np.asarray(sizes))[::-1]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.hist(h, bins=min(50, max(5, len(np.unique(h)))))
    a1.set_xlabel("points per cluster")
    a1.set_ylabel("clusters")
    a2.plot(np.arange(1, len(h) + 1), h)
    a2.set_xscale("log")
    a2.set_xlabel("cluster rank")
    a2.set_ylabel("points")
    fig.suptitle(f"{title} (imbalance {imbalance(h):.3f})")
    _save_fig(fig, Path(path))
    plt.close(fig)
