"""Cluster statistics and plots: sizes, balance, objective, agreement with ground truth.

Why one module: the cluster stage writes these numbers and plots into ``RUN/cluster/``, the
assign stage summarises its labels with the same :func:`size_stats`, and the run report
(``pipelines/report_plots.py``) draws its objective and size plots with the same functions, so
each statistic and each plot has one definition (docs/architecture.md, floor 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megaclass.clustering.plotting import pyplot, save_fig

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


def plot_objective(
    objective: list[float],
    path: str | Path,
    title: str = "k-means objective",
    ylabel: str = "Σ cosine to assigned centroid",
) -> None:
    """The k-means objective against the iteration (one marker per iteration)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = pyplot().subplots(figsize=(5.5, 3.4))
    ax.plot(np.arange(1, len(objective) + 1), objective, marker="o", ms=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    save_fig(fig, path)


def plot_sizes(
    sizes: np.ndarray,
    path: str | Path,
    title: str = "cluster sizes",
    *,
    unit: str = "points",
    log_y: bool = False,
    counts: bool = False,
) -> None:
    """Histogram of the cluster sizes and the sizes against their rank (log rank axis).

    ``unit`` names what a cluster holds in the axis labels; ``log_y`` puts the sizes on a log
    axis too (empty clusters drawn at 0.5); ``counts`` adds k and the empty clusters to the
    title, which always ends with the imbalance factor.
    """
    from matplotlib.ticker import MaxNLocator

    h = np.sort(np.asarray(sizes))[::-1]
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    a1.hist(h, bins=min(50, max(5, len(np.unique(h)))), color="#4c72b0")
    a1.yaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel(f"{unit} per cluster")
    a1.set_ylabel("clusters")
    a2.plot(np.arange(1, len(h) + 1), np.maximum(h, 0.5) if log_y else h, color="#4c72b0")
    a2.set_xscale("log")
    if log_y:
        a2.set_yscale("log")
    a2.set_xlabel("cluster rank")
    a2.set_ylabel(unit)
    imb = f"imbalance {imbalance(h):.3f}"
    fig.suptitle(
        f"{title}: k={len(h)}, {int((h == 0).sum())} empty, {imb}" if counts else f"{title} ({imb})"
    )
    save_fig(fig, path)
