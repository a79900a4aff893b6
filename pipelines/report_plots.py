"""The report's plots, drawn from what ``report_read`` read; one PNG per plot in ``RUN/plots/``.

Why a module of its own: plotting needs matplotlib and can fail on odd data, and the report must
still be written then, so every plot here either writes its PNG and returns None or returns the
reason it could not (missing data, a failed stage), and :func:`write_plots` records that reason
instead of the file. The k-means objective and cluster-size plots are the cluster stage's own
(``clustering/cluster_stats.py``), called with the report's titles, so each plot has one implementation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.clustering.cluster_stats import plot_objective, plot_sizes
from megaclass.clustering.plotting import pyplot, save_fig
from megaclass.core.rundir import RunDir
from megaclass.pipelines.report_read import RunData, recall_ks

log = logging.getLogger(__name__)

PLOT_TITLES = {
    "kmeans_objective": "k-means objective per iteration",
    "cluster_sizes": "Cluster-size distribution",
    "train_loss_lr": "Training loss and learning rate",
    "train_eval": "Held-out Recall@1 / mAP@R during training",
    "eval_recall": "Recall@K per encoder",
    "eval_dims": "Metric against feature dimension",
}
STAGE_PLOTS = {
    "cluster": ["kmeans_objective", "cluster_sizes"],
    "train": ["train_loss_lr", "train_eval"],
    "eval": ["eval_recall", "eval_dims"],
}
PLOT_STAGE = {p: stage for stage, plots in STAGE_PLOTS.items() for p in plots}
"""The stage whose files each plot is drawn from."""


def plot_kmeans_objective(cl: dict[str, Any], path: Path) -> str | None:
    y = cl.get("objective_per_point") or cl.get("objective")
    if not y:
        return "no objective per iteration in the cluster stats (bring-your-own centroids?)"
    plot_objective(
        y,
        path,
        title=f"k-means ({cl.get('backend')}, k={cl.get('k')})",
        ylabel=(
            "mean cosine to centroid" if cl.get("objective_per_point") else "Σ cosine to centroid"
        ),
    )
    return None


def plot_cluster_sizes(
    sizes: np.ndarray | None, source: str, cl: dict[str, Any], path: Path
) -> str | None:
    if sizes is not None:
        plot_sizes(sizes, path, source, unit="samples", log_y=True, counts=True)
        return None
    pct = ((cl.get("sizes") or {}).get("size_percentiles")) or {}
    if not pct:
        return "no cluster sizes (no label sidecars and no size percentiles in the cluster stats)"
    ps = sorted((float(k[1:]), float(v)) for k, v in pct.items() if k.startswith("p"))
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4))
    ax.plot([p for p, _ in ps], [v for _, v in ps], marker="o")
    ax.set_xlabel("percentile of clusters")
    ax.set_ylabel("points per cluster")
    ax.set_title(f"cluster sizes of the k-means sample (k={cl.get('k')}; {source})")
    ax.grid(alpha=0.3)
    save_fig(fig, path)
    return None


def plot_train(records: list[dict[str, Any]], path: Path) -> str | None:
    pts = [
        (r["step"], r.get("loss"), r.get("lr"), r.get("head_lr"))
        for r in records
        if isinstance(r.get("step"), (int, float))
    ]
    if not pts:
        return "no records in RUN/train/metrics.jsonl"
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    ls = [(s, v) for s, v, _, _ in pts if isinstance(v, (int, float)) and math.isfinite(v)]
    a1.plot(
        [s for s, _ in ls],
        [v for _, v in ls],
        color="#c44e52",
        marker="." if len(ls) < 50 else None,
    )
    from matplotlib.ticker import MaxNLocator

    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a1.set_xlabel("step")
    a1.set_ylabel("loss")
    a1.set_title("training loss")
    a1.grid(alpha=0.3)
    lrs = [(s, v) for s, _, v, _ in pts if isinstance(v, (int, float))]
    a2.plot([s for s, _ in lrs], [v for _, v in lrs], label="backbone lr")
    hl = [(s, v) for s, _, _, v in pts if isinstance(v, (int, float))]
    if hl and any(abs(v - w) > 1e-15 for (_, v), (_, w) in zip(hl, lrs)):
        a2.plot([s for s, _ in hl], [v for _, v in hl], label="head lr", ls="--")
        a2.legend()
    a2.set_xlabel("step")
    a2.set_ylabel("learning rate")
    a2.set_title("learning rate")
    a2.grid(alpha=0.3)
    save_fig(fig, path)
    return None


def plot_train_eval(records: list[dict[str, Any]], path: Path) -> str | None:
    """Recall@1 and mAP@R on the held-out set against the step, one line per encoder, from the
    ``"kind": "eval"`` lines of ``RUN/train/metrics.jsonl``."""
    series: dict[str, list[tuple[float, Any, Any]]] = {}
    for r in records:
        series.setdefault(str(r.get("encoder") or "student"), []).append(
            (r["step"], r.get("recall@1"), r.get("map@r"))
        )
    if not series:
        return "no held-out eval lines in RUN/train/metrics.jsonl (no eval during training)"
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    from matplotlib.ticker import MaxNLocator

    for col, (ax, label) in enumerate(zip(axes, ("Recall@1 (%)", "mAP@R (%)"))):
        for name, pts in series.items():
            pts = sorted(pts, key=lambda p: p[0])
            ys = [
                100 * v if isinstance(v, (int, float)) and math.isfinite(v) else np.nan
                for v in (p[1 + col] for p in pts)
            ]
            ax.plot([p[0] for p in pts], ys, marker="o", label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("held-out retrieval during training")
    save_fig(fig, path)
    return None


def _percent(vals: list[Any]) -> list[float]:
    """Metric fractions as percent; None (a metric not computed) becomes NaN, a gap in the line."""
    return [np.nan if v is None else 100 * v for v in vals]


def _log2_axis(ax: Any, ticks: list[int]) -> None:
    """x on a base-2 log scale, a tick at each of ``ticks``, labelled as plain numbers.

    Why shared: Recall@K and the compact-feature plots both have powers-of-two x values (K, d)
    and must label them alike (1, 2, 4 ... not 2^0, 2^1 ..., no minor labels)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_recall(ev: dict[str, Any], path: Path) -> str | None:
    encs = {n: r for n, r in (ev.get("encoders") or {}).items() if recall_ks(r["full"])}
    if not encs:
        return "no Recall@K in RUN/eval/metrics.json"
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4))
    for name, r in encs.items():
        ks = recall_ks(r["full"])
        vals = [r["full"][f"recall@{k}"] for k in ks]
        ax.plot(ks, _percent(vals), marker="o", label=f"{name} ({r.get('dim')}d)")
    _log2_axis(ax, sorted({k for r in encs.values() for k in recall_ks(r["full"])}))
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("retrieval on held-out classes")
    ax.grid(alpha=0.3)
    ax.legend()
    save_fig(fig, path)
    return None


def plot_dims(ev: dict[str, Any], path: Path) -> str | None:
    encs = ev.get("encoders") or {}
    series = {}
    for name, r in encs.items():
        pts = {int(d): m for d, m in (r.get("compact") or {}).items()}
        if r.get("dim"):
            pts[int(r["dim"])] = r["full"]
        if len(pts) >= 2:
            series[name] = sorted(pts.items())
    if not series:
        return "fewer than two feature sizes per encoder (set eval.compact_dims)"
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for name, pts in series.items():
        ds = [d for d, _ in pts]
        for ax, key in ((a1, "recall@1"), (a2, "map@r")):
            vals = [m.get(key) for _, m in pts]
            ax.plot(ds, _percent(vals), marker="o", label=name)
    ticks = sorted({d for pts in series.values() for d, _ in pts})
    for ax, label in ((a1, "Recall@1 (%)"), (a2, "mAP@R (%)")):
        _log2_axis(ax, ticks)
        ax.set_xlabel("feature dimension (first d, renormalised)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("compact features")
    save_fig(fig, path)
    return None


def write_plots(rd: RunDir, run: RunData) -> dict[str, dict[str, str]]:
    """Draw every plot into ``rd.plots``: per plot, its file and title or why it is missing."""
    stages = run.report["stages"]
    cluster, ev = stages["cluster"], stages["eval"]
    jobs = {
        "kmeans_objective": lambda p: plot_kmeans_objective(cluster, p),
        "cluster_sizes": lambda p: plot_cluster_sizes(run.sizes, run.sizes_source, cluster, p),
        "train_loss_lr": lambda p: plot_train(run.train_records, p),
        "train_eval": lambda p: plot_train_eval(run.train_eval_records, p),
        "eval_recall": lambda p: plot_recall(ev, p),
        "eval_dims": lambda p: plot_dims(ev, p),
    }
    out: dict[str, dict[str, str]] = {}
    for name, job in jobs.items():
        path = rd.plots / f"{name}.png"
        stage_status = stages[PLOT_STAGE[name]]["status"]
        try:
            if stage_status in ("missing", "unreadable", "skipped") and not (
                name == "cluster_sizes" and run.sizes is not None
            ):
                why = f"the {PLOT_STAGE[name]} stage is {stage_status}"
            else:
                why = job(path)
        except Exception as e:  # a plot must never cost the whole report
            log.warning("report: plot %s failed: %s", name, e)
            why = f"plotting failed: {type(e).__name__}: {e}"
        if why is None:
            out[name] = {"file": f"plots/{name}.png", "title": PLOT_TITLES[name]}
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier build would mislead
            out[name] = {"missing": why, "title": PLOT_TITLES[name]}
    return out
