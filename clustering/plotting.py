"""Headless matplotlib: one Agg setup and one atomic PNG save for every plot megaclass writes.

Why a module of its own: the cluster stage (``clustering/cluster_stats.py``) and the run report
(``pipelines/report_plots.py``) both draw PNGs on nodes without a display, and both must write
them so that a killed process leaves a whole plot or none (``core/atomic.py``). Keeping the
backend choice, resolution and save in one place keeps the two sets of plots alike. It sits in
``clustering/`` (floor 2, docs/architecture.md) so that the cluster stage can use it without
importing from ``pipelines/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megaclass.core.atomic import atomic_path

DPI = 100


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig: Any, path: str | Path) -> None:
    """Write ``fig`` to ``path`` as PNG through a temporary file and rename, then close it."""
    with atomic_path(Path(path), suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
