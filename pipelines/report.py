"""``megaclass report RUN``: one report of a run directory, complete or not.

Reads only what the stages leave behind (DESIGN.md run directory; nothing is recomputed from
the data):

==========  ==========================================================================
stage       files read
==========  ==========================================================================
(run)       ``RUN/config.yaml``
embed       ``RUN/embed/_SUCCESS.json``; when absent, the per-shard ``RUN/embed/_done/*.json``
cluster     ``RUN/cluster/_SUCCESS.json`` (= stats.json); when absent, ``stats.json`` or the
            per-iteration ``RUN/cluster/state/*`` (progress only)
assign      ``RUN/labels/_SUCCESS.json``, the ``cls`` column of ``RUN/labels/*.parquet`` for
            the full cluster-size distribution (up to ``MAX_LABEL_ROWS`` rows), else the
            size percentiles of the cluster stats; ``RUN/labels/_done/*.json`` when partial
train       ``RUN/train/_SUCCESS.json``, ``RUN/train/metrics.jsonl``, ``RUN/train/ckpt/``
eval        ``RUN/eval/metrics.json`` (``_SUCCESS.json`` marks it complete)
==========  ==========================================================================

Writes ``RUN/report.json`` (one section per stage with ``status`` = complete | partial |
missing | unreadable | skipped — the last for embed/cluster/assign under bring-your-own labels), ``RUN/report.md``, ``RUN/report.html`` (self-contained: the PNG plots are
embedded as base64 data URIs, no scripts, no external links) and ``RUN/plots/*.png``:
k-means objective, cluster-size distribution, training loss and learning rate, Recall@K per
encoder, metric against feature dimension. A plot whose data is not there is listed as missing
with the reason instead.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.core.atomic import atomic_path, write_json_atomic, write_text_atomic
from megaclass.core.rundir import STAGES, RunDir

log = logging.getLogger(__name__)

# Above this many label rows the size plot uses the percentiles of the cluster stats instead
# of streaming the label sidecars' cls column.
MAX_LABEL_ROWS = 50_000_000

PLOT_TITLES = {
    "kmeans_objective": "k-means objective per iteration",
    "cluster_sizes": "Cluster-size distribution",
    "train_loss_lr": "Training loss and learning rate",
    "eval_recall": "Recall@K per encoder",
    "eval_dims": "Metric against feature dimension",
}


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(content, None), (None, None) when absent, or (None, error) when unreadable."""
    if not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: {type(e).__name__}: {e}"
    if not isinstance(obj, dict):
        return None, f"{path}: expected a JSON object, got {type(obj).__name__}"
    return obj, None


def _done_records(stage_dir: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted((stage_dir / "_done").glob("*.json")):
        rec, _ = _read_json(p)
        if rec is not None:
            out.append(rec)
    return out


def _pick(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: d[k] for k in keys if k in d}


def _section(status: str, **kw: Any) -> dict[str, Any]:
    return {"status": status, **kw}


def read_config(rd: RunDir) -> dict[str, Any]:
    import yaml

    if not rd.config_path.is_file():
        return _section("missing", note="no config.yaml: no stage has started in this folder")
    try:
        cfg = yaml.safe_load(rd.config_path.read_text()) or {}
    except yaml.YAMLError as e:
        return _section("unreadable", error=f"{rd.config_path}: {e}")
    g = lambda sec, key: (cfg.get(sec) or {}).get(key)  # noqa: E731
    return _section(
        "complete",
        file=str(rd.config_path),
        key_settings={
            "data.shards": g("data", "shards"),
            "data.eval_shards": g("data", "eval_shards"),
            "embed.image_teacher": g("embed", "image_teacher"),
            "embed.text_teacher": g("embed", "text_teacher"),
            "cluster.feature": g("cluster", "feature"),
            "cluster.k": g("cluster", "k"),
            "cluster.backend": g("cluster", "backend"),
            "assign.topk": g("assign", "topk"),
            "assign.labels_dir": g("assign", "labels_dir"),
            "train.objective": g("train", "objective"),
            "train.model": g("train", "model"),
            "train.steps": g("train", "steps"),
            "eval.encoders": g("eval", "encoders"),
        },
    )


def _top_shards(by_shard: dict[str, dict[str, int]], n: int = 20) -> dict[str, dict[str, int]]:
    """The ``n`` shards with the most skipped samples (a 40k-shard run would bloat the report)."""
    total = {s: sum(int(v) for v in c.values()) for s, c in by_shard.items()}
    return {s: by_shard[s] for s in sorted(total, key=lambda s: (-total[s], s))[:n]}


def read_embed(rd: RunDir) -> dict[str, Any]:
    s, err = _read_json(rd.embed / "_SUCCESS.json")
    if err:
        return _section("unreadable", error=err)
    if s is not None:
        teacher = s.get("teacher") or {}
        return _section(
            "complete",
            bring_your_own=bool(s.get("skipped_stage")),
            rows=s.get("rows"),
            seen=s.get("seen"),
            shards=s.get("shards"),
            shards_embedded=s.get("shards_embedded"),
            shards_failed=s.get("shards_failed"),
            skipped=s.get("skipped") or {},
            skipped_total=s.get("skipped_total", 0),
            skipped_by_shard=_top_shards(s.get("skipped_by_shard") or {}),
            failed_shards=s.get("failed") or {},
            samples_per_s=s.get("samples_per_s"),
            wall_s=s.get("wall_s"),
            image_teacher=teacher.get("image_teacher"),
            text_teacher=teacher.get("text_teacher"),
            image_dim=s.get("image_dim"),
            text_dim=s.get("text_dim"),
            embeddings_dir=s.get("embeddings_dir"),
        )
    recs = _done_records(rd.embed)
    failed, _ = _read_json(rd.embed / "_FAILED.json")
    if not recs and not failed:
        return _section("missing", note="no RUN/embed/_SUCCESS.json and no finished shard")
    fail_note = ""
    if failed and failed.get("failed"):
        fail_note = (
            f"; {len(failed['failed'])} shard(s) failed after retries (RUN/embed/_FAILED.json)"
        )
    skipped: dict[str, int] = {}
    for r in recs:
        for reason, n in ((r.get("stats") or {}).get("skipped") or {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
    return _section(
        "partial",
        note=f"{len(recs)} shard(s) embedded, stage not finished (no _SUCCESS.json){fail_note}",
        shards_done=len(recs),
        failed_shards=(failed or {}).get("failed") or {},
        rows=sum(int(r.get("rows", 0)) for r in recs),
        skipped=skipped,
        skipped_total=sum(skipped.values()),
    )


def read_cluster(rd: RunDir) -> dict[str, Any]:
    s, err = _read_json(rd.cluster / "_SUCCESS.json")
    if err:
        return _section("unreadable", error=err)
    status = "complete"
    if s is None:
        s, err = _read_json(rd.cluster / "stats.json")
        if err:
            return _section("unreadable", error=err)
        status = "partial"
    if s is None:
        state = rd.cluster / "state"
        n = len(list(state.glob("*"))) if state.is_dir() else 0
        if n:
            return _section(
                "partial", note=f"k-means in progress: {n} checkpoint file(s) in {state}"
            )
        return _section("missing", note="no RUN/cluster/_SUCCESS.json")
    sizes = s.get("sizes") or {}
    obj = [float(v) for v in s.get("objective") or []]
    return _section(
        status,
        **({"note": "stats.json without _SUCCESS.json"} if status == "partial" else {}),
        k=s.get("k"),
        backend=s.get("backend"),
        feature=s.get("feature"),
        dim=s.get("dim"),
        sample_rows=s.get("sample_rows"),
        total_rows=s.get("total_rows"),
        iterations=len(obj),
        objective=obj,
        objective_per_point=[float(v) for v in s.get("objective_per_point") or []],
        final_mean_cosine=s.get("final_mean_cosine"),
        sizes=_pick(sizes, "empty", "singleton", "imbalance", "size_percentiles", "largest"),
        quality=s.get("quality"),
        seconds_kmeans=s.get("seconds_kmeans"),
        points_per_s=(
            s["sample_rows"] * len(obj) / s["seconds_kmeans"]
            if s.get("sample_rows") and obj and s.get("seconds_kmeans")
            else None
        ),
        centroid_sha256=s.get("centroid_sha256"),
    )


def read_assign(rd: RunDir, cluster: dict[str, Any]) -> dict[str, Any]:
    s, err = _read_json(rd.labels / "_SUCCESS.json")
    if err:
        return _section("unreadable", error=err)
    if s is None:
        recs = _done_records(rd.labels)
        if not recs:
            return _section("missing", note="no RUN/labels/_SUCCESS.json")
        return _section(
            "partial",
            note=f"{len(recs)} shard(s) assigned, stage not finished (no _SUCCESS.json)",
            shards_done=len(recs),
            rows=sum(int(r.get("rows", 0)) for r in recs),
        )
    out = _section(
        "complete",
        **_pick(
            s,
            "rows",
            "k",
            "topk",
            "method",
            "stems",
            "low_score_threshold",
            "low_score_rows",
            "low_score_share",
            "rows_per_second",
            "seconds",
            "centroid_sha256",
        ),
        label_histogram=_pick(
            s.get("label_histogram") or {},
            "empty",
            "singleton",
            "imbalance",
            "size_percentiles",
            "largest",
        ),
    )
    c_sha = cluster.get("centroid_sha256")
    if c_sha and s.get("centroid_sha256") and c_sha != s["centroid_sha256"]:
        out["warning"] = (
            "labels were made from different centroids than RUN/cluster/centroids.npy "
            f"({s['centroid_sha256'][:12]}… vs {c_sha[:12]}…): re-run assign"
        )
    return out


def read_train(rd: RunDir) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    s, err = _read_json(rd.train / "_SUCCESS.json")
    if err:
        return _section("unreadable", error=err), []
    records, bad = [], 0
    mpath = rd.train / "metrics.jsonl"
    if mpath.is_file():
        for line in mpath.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # a torn last line of a killed run
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
    ckpts = sorted(p.name for p in rd.ckpt.glob("step-*")) if rd.ckpt.is_dir() else []
    curve = _curve_summary(records)
    if bad:
        curve["unreadable_lines"] = bad
    if s is not None:
        return (
            _section(
                "complete",
                **_pick(
                    s,
                    "steps",
                    "final_loss",
                    "samples",
                    "samples_per_s",
                    "wall_s",
                    "world_size",
                    "global_batch",
                    "bad_steps",
                    "resumed_from",
                    "interrupted",
                    "export",
                ),
                checkpoints=ckpts,
                metrics=curve,
            ),
            records,
        )
    if not records and not ckpts:
        return _section("missing", note="no RUN/train/_SUCCESS.json, no metrics, no checkpoint"), []
    last = int(records[-1]["step"]) if records else None
    return (
        _section(
            "partial",
            note=(
                "training not finished (no _SUCCESS.json): "
                + (f"last logged step {last}" if last is not None else "no metrics logged")
                + f", {len(ckpts)} checkpoint(s)"
            ),
            checkpoints=ckpts,
            metrics=curve,
        ),
        records,
    )


def _finite(vals: list[Any]) -> list[float]:
    return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]


def _curve_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    if not records:
        return {"records": 0}
    loss = _finite([r.get("loss") for r in records])
    sps = _finite([r.get("samples_per_s") for r in records])
    wait = _finite([r.get("data_wait_share") for r in records])
    lr = _finite([r.get("lr") for r in records])
    return {
        "records": len(records),
        "first_step": int(records[0]["step"]),
        "last_step": int(records[-1]["step"]),
        "loss_first": loss[0] if loss else None,
        "loss_last": loss[-1] if loss else None,
        "loss_min": min(loss) if loss else None,
        "lr_max": max(lr) if lr else None,
        "samples_per_s_mean": float(np.mean(sps)) if sps else None,
        "data_wait_share_mean": float(np.mean(wait)) if wait else None,
    }


def read_eval(rd: RunDir) -> dict[str, Any]:
    m, err = _read_json(rd.eval / "metrics.json")
    if err:
        return _section("unreadable", error=err)
    if m is None:
        n = len(list((rd.eval / "_done").glob("*.json"))) if (rd.eval / "_done").is_dir() else 0
        if n:
            return _section("partial", note=f"features of {n} encoder(s) embedded, no metrics yet")
        return _section("missing", note="no RUN/eval/metrics.json")
    status = "complete" if (rd.eval / "_SUCCESS.json").is_file() else "partial"
    encoders = {}
    found = m.get("encoders") or {}
    # metrics.json is written with sorted keys: restore the config order (teacher, student first)
    order = [n for n in m.get("encoder_order") or [] if n in found]
    order += sorted(
        (n for n in found if n not in order), key=lambda n: (n != "teacher", n != "student", n)
    )
    for name in order:
        r = found[name]
        encoders[name] = {
            **_pick(r, "kind", "spec", "dim", "images_per_s", "compact_skipped"),
            "full": r.get("full") or {},
            "compact": r.get("compact") or {},
        }
    return _section(
        status,
        eval_set=_pick(m.get("eval_set") or {}, "n", "classes", "class_field", "read"),
        settings=_pick(m.get("settings") or {}, "recall_ks", "knn_k", "compact_dims", "device"),
        encoders=encoders,
        comparison=m.get("comparison"),
        wall_s=m.get("wall_s"),
    )


def cluster_sizes(
    rd: RunDir, k: int | None, labels_dir: str | Path | None = None
) -> tuple[np.ndarray | None, str]:
    """Points per cluster over all labelled samples (label sidecars' cls column), or None.

    ``labels_dir`` (bring-your-own labels) replaces RUN/labels; without ``k`` the number of
    clusters is taken as the largest label + 1.
    """
    folder = Path(labels_dir) if labels_dir else rd.labels
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return None, "no label sidecars"
    import pyarrow.parquet as pq

    try:
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if total > MAX_LABEL_ROWS:
            return None, f"{total} label rows > {MAX_LABEL_ROWS}: percentiles only"
        hist = np.zeros(int(k or 0), dtype=np.int64)
        for f in files:
            cls = pq.read_table(f, columns=["cls"]).column("cls").to_numpy()
            cls = cls[(cls >= 0) & ((cls < k) if k else True)]
            add = np.bincount(cls, minlength=len(hist))
            if len(add) > len(hist):
                hist = np.pad(hist, (0, len(add) - len(hist)))
            hist += add[: len(hist)]
    except Exception as e:  # a broken sidecar must not break the report
        return None, f"label sidecars unreadable ({type(e).__name__}: {e})"
    if not len(hist):
        return None, "label sidecars hold no rows"
    where = str(folder) if labels_dir else "RUN/labels"
    return hist, f"all {int(hist.sum())} labelled samples ({where})"


# --------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:  # noqa: ANN001
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=96, bbox_inches="tight")
    _plt().close(fig)


def plot_objective(cl: dict[str, Any], path: Path) -> str | None:
    y = cl.get("objective_per_point") or cl.get("objective")
    if not y:
        return "no objective per iteration in the cluster stats (bring-your-own centroids?)"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot(np.arange(1, len(y) + 1), y, marker="o", ms=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel(
        "mean cosine to centroid" if cl.get("objective_per_point") else "Σ cosine to centroid"
    )
    ax.set_title(f"k-means ({cl.get('backend')}, k={cl.get('k')})")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def plot_sizes(sizes: np.ndarray | None, source: str, cl: dict[str, Any], path: Path) -> str | None:
    plt = _plt()
    if sizes is not None:
        h = np.sort(sizes)[::-1]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
        a1.hist(h, bins=min(50, max(5, len(np.unique(h)))), color="#4c72b0")
        from matplotlib.ticker import MaxNLocator

        a1.yaxis.set_major_locator(MaxNLocator(integer=True))
        a1.set_xlabel("samples per cluster")
        a1.set_ylabel("clusters")
        a2.plot(np.arange(1, len(h) + 1), np.maximum(h, 0.5), color="#4c72b0")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.set_xlabel("cluster rank")
        a2.set_ylabel("samples")
        k = len(h)
        imb = k * float((h.astype(np.float64) ** 2).sum()) / max(float(h.sum()) ** 2, 1e-300)
        fig.suptitle(f"{source}: k={k}, {int((h == 0).sum())} empty, imbalance {imb:.3f}")
        _save(fig, path)
        return None
    pct = ((cl.get("sizes") or {}).get("size_percentiles")) or {}
    if not pct:
        return "no cluster sizes (no label sidecars and no size percentiles in the cluster stats)"
    ps = sorted((float(k[1:]), float(v)) for k, v in pct.items() if k.startswith("p"))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([p for p, _ in ps], [v for _, v in ps], marker="o")
    ax.set_xlabel("percentile of clusters")
    ax.set_ylabel("points per cluster")
    ax.set_title(f"cluster sizes of the k-means sample (k={cl.get('k')}; {source})")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def plot_train(records: list[dict[str, Any]], path: Path) -> str | None:
    pts = [
        (r["step"], r.get("loss"), r.get("lr"), r.get("head_lr"))
        for r in records
        if isinstance(r.get("step"), (int, float))
    ]
    if not pts:
        return "no records in RUN/train/metrics.jsonl"
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
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
    _save(fig, path)
    return None


def _recall_ks(m: dict[str, Any]) -> list[int]:
    return sorted(int(k[7:]) for k in m if k.startswith("recall@") and k[7:].isdigit())


def plot_recall(ev: dict[str, Any], path: Path) -> str | None:
    encs = {n: r for n, r in (ev.get("encoders") or {}).items() if _recall_ks(r["full"])}
    if not encs:
        return "no Recall@K in RUN/eval/metrics.json"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, r in encs.items():
        ks = _recall_ks(r["full"])
        vals = [r["full"][f"recall@{k}"] for k in ks]
        ax.plot(
            ks,
            [np.nan if v is None else 100 * v for v in vals],
            marker="o",
            label=f"{name} ({r.get('dim')}d)",
        )
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({k for r in encs.values() for k in _recall_ks(r["full"])}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("retrieval on held-out classes")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
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
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for name, pts in series.items():
        ds = [d for d, _ in pts]
        for ax, key in ((a1, "recall@1"), (a2, "map@r")):
            vals = [m.get(key) for _, m in pts]
            ax.plot(ds, [np.nan if v is None else 100 * v for v in vals], marker="o", label=name)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted({d for pts in series.values() for d, _ in pts})
    for ax, label in ((a1, "Recall@1 (%)"), (a2, "mAP@R (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("feature dimension (first d, renormalised)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("compact features")
    _save(fig, path)
    return None


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 120 else s[:117] + "…"
    return str(v)


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


SCALARS = {
    "config": [],
    "embed": [
        ("rows", "rows embedded"),
        ("seen", "samples read"),
        ("skipped_total", "samples skipped"),
        ("shards", "shards"),
        ("shards_done", "shards done"),
        ("shards_failed", "shards failed"),
        ("samples_per_s", "samples/s"),
        ("wall_s", "wall time (s)"),
        ("image_teacher", "image teacher"),
        ("text_teacher", "text teacher"),
        ("image_dim", "image dim"),
        ("text_dim", "text dim"),
        ("bring_your_own", "bring-your-own embeddings"),
    ],
    "cluster": [
        ("k", "k"),
        ("backend", "backend"),
        ("feature", "feature"),
        ("dim", "dim"),
        ("sample_rows", "sample rows"),
        ("total_rows", "total rows"),
        ("iterations", "iterations"),
        ("final_mean_cosine", "mean cosine to centroid"),
        ("seconds_kmeans", "k-means time (s)"),
        ("points_per_s", "point-iterations/s"),
    ],
    "assign": [
        ("rows", "rows labelled"),
        ("shards_done", "shards done"),
        ("k", "k"),
        ("topk", "labels per sample"),
        ("method", "method"),
        ("low_score_share", "low-score share"),
        ("low_score_threshold", "low-score threshold"),
        ("rows_per_second", "rows/s"),
    ],
    "train": [
        ("steps", "steps"),
        ("final_loss", "final loss"),
        ("samples", "samples"),
        ("samples_per_s", "samples/s"),
        ("wall_s", "wall time (s)"),
        ("world_size", "ranks"),
        ("global_batch", "global batch"),
        ("bad_steps", "non-finite steps"),
        ("resumed_from", "resumed from step"),
    ],
    "eval": [("wall_s", "wall time (s)")],
}


def _kv_rows(sec: dict[str, Any], stage: str) -> list[tuple[str, str]]:
    rows = [(label, _fmt(sec[key])) for key, label in SCALARS.get(stage, []) if key in sec]
    if stage == "cluster":
        sz = sec.get("sizes") or {}
        for key, label in (
            ("empty", "empty clusters"),
            ("singleton", "singleton clusters"),
            ("imbalance", "imbalance factor"),
        ):
            if key in sz:
                rows.append((label, _fmt(sz[key])))
        q = sec.get("quality") or {}
        for key in ("nmi", "ami", "homogeneity", "completeness"):
            if q.get(key) is not None:
                rows.append(
                    (f"{key.upper() if len(key) == 3 else key} vs ground truth", _fmt(q[key]))
                )
    if stage == "assign":
        h = sec.get("label_histogram") or {}
        for key, label in (("empty", "classes without samples"), ("imbalance", "label imbalance")):
            if key in h:
                rows.append((label, _fmt(h[key])))
    if stage == "train":
        m = sec.get("metrics") or {}
        for key, label in (
            ("last_step", "last logged step"),
            ("loss_first", "first logged loss"),
            ("loss_min", "lowest loss"),
            ("lr_max", "peak lr"),
            ("samples_per_s_mean", "mean samples/s (logged)"),
            ("data_wait_share_mean", "data-wait share"),
        ):
            if m.get(key) is not None:
                rows.append((label, _fmt(m[key])))
        if sec.get("checkpoints"):
            rows.append(("checkpoints", ", ".join(sec["checkpoints"][-3:])))
    if stage == "eval":
        es = sec.get("eval_set") or {}
        for key, label in (("n", "eval images"), ("classes", "classes")):
            if key in es:
                rows.append((label, _fmt(es[key])))
        read = es.get("read") or {}
        if read.get("skipped"):
            rows.append(
                ("eval samples skipped", ", ".join(f"{k}: {v}" for k, v in read["skipped"].items()))
            )
    return rows


def headline(stage: str, sec: dict[str, Any]) -> str:
    """One line per stage for the overview table (empty when the stage is not complete)."""
    if sec.get("status") != "complete":
        return ""
    g = sec.get
    if stage == "embed":
        return (
            f"{_fmt(g('rows'))} rows from {_fmt(g('shards'))} shards, "
            f"{_fmt(g('skipped_total'))} samples skipped, {_fmt(g('samples_per_s'))} samples/s"
        )
    if stage == "cluster":
        q = (g("quality") or {}).get("nmi")
        return (
            f"k={_fmt(g('k'))} ({g('backend')}), {g('iterations')} iterations, "
            f"imbalance {_fmt((g('sizes') or {}).get('imbalance'))}"
            + (f", NMI {_fmt(q)}" if q is not None else "")
        )
    if stage == "assign":
        share = g("low_score_share")
        return f"{_fmt(g('rows'))} rows, top-{g('topk')} ({g('method')})" + (
            f", {100 * share:.1f}% below score {g('low_score_threshold')}"
            if share is not None
            else ""
        )
    if stage == "train":
        return (
            f"{_fmt(g('steps'))} steps, final loss {_fmt(g('final_loss'))}, "
            f"{_fmt(g('samples_per_s'))} samples/s on {_fmt(g('world_size'))} rank(s)"
        )
    if stage == "eval":
        parts = [
            f"{name} R@1 {_pct(r['full'].get('recall@1'))}%"
            for name, r in (g("encoders") or {}).items()
        ]
        return ", ".join(parts)
    return ""


def eval_table(ev: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per encoder × feature size, metrics in %."""
    encs = ev.get("encoders") or {}
    if not encs:
        return [], []
    first = next(iter(encs.values()))["full"]
    ks = _recall_ks(first)
    knn_k = first.get("knn_k")
    header = ["encoder", "dim"] + [f"R@{k}" for k in ks] + ["mAP@R", f"kNN@{knn_k}", "images/s"]
    keys = [f"recall@{k}" for k in ks] + ["map@r", "knn_acc"]
    rows = []
    for name, r in encs.items():
        rows.append(
            [name, str(r.get("dim"))]
            + [_pct(r["full"].get(k)) for k in keys]
            + [_fmt(r.get("images_per_s"))]
        )
        for d, m in sorted((r.get("compact") or {}).items(), key=lambda kv: int(kv[0])):
            rows.append([f"{name} (first {d})", d] + [_pct(m.get(k)) for k in keys] + [""])
    cmp_ = ev.get("comparison") or {}
    if cmp_.get("full"):
        rows.append(
            ["Δ student − teacher", "full"]
            + [
                "—" if cmp_["full"].get(k) is None else f"{100 * cmp_['full'][k]:+.1f}"
                for k in keys
            ]
            + [""]
        )
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out


STAGE_TITLES = {
    "config": "Run configuration",
    "embed": "Embed (teacher features)",
    "cluster": "Cluster (spherical k-means)",
    "assign": "Assign (pseudo-labels)",
    "train": "Train (student)",
    "eval": "Eval (held-out classes)",
}
STAGE_PLOTS = {
    "cluster": ["kmeans_objective", "cluster_sizes"],
    "train": ["train_loss_lr"],
    "eval": ["eval_recall", "eval_dims"],
}


def _overview_note(sec: dict[str, Any]) -> str:
    return sec.get("note") or sec.get("error") or sec.get("headline") or ""


def render_md(report: dict[str, Any]) -> str:
    lines = [
        f"# megaclass report — `{report['run_dir']}`",
        "",
        f"Generated {report['generated_at']}.",
        "",
    ]
    lines.append(
        "**All stages complete.**"
        if not report["missing"]
        else "**Incomplete run — stages not complete: " + ", ".join(report["missing"]) + ".**"
    )
    lines += [
        "",
        *_md_table(
            ["stage", "status", "note"],
            [
                [
                    s,
                    report["stages"][s]["status"],
                    _overview_note(report["stages"][s]),
                ]
                for s in STAGES
            ],
        ),
        "",
    ]
    for stage in ("config", *STAGES):
        sec = report["stages"][stage] if stage in report["stages"] else report["config"]
        lines += [
            f"## {STAGE_TITLES[stage]}",
            "",
            f"Status: **{sec['status']}**" + (f" — {sec['note']}" if sec.get("note") else ""),
            "",
        ]
        if sec.get("error"):
            lines += [f"Error: `{sec['error']}`", ""]
        if sec.get("warning"):
            lines += [f"⚠ {sec['warning']}", ""]
        if stage == "config" and sec.get("key_settings"):
            lines += _md_table(
                ["setting", "value"], [[k, _fmt(v)] for k, v in sec["key_settings"].items()]
            ) + [""]
        kv = _kv_rows(sec, stage)
        if kv:
            lines += _md_table(["", "value"], [list(r) for r in kv]) + [""]
        if stage == "embed" and sec.get("skipped"):
            lines += ["Skipped samples by reason:", ""]
            lines += _md_table(
                ["reason", "samples"], [[k, str(v)] for k, v in sorted(sec["skipped"].items())]
            ) + [""]
        if stage == "embed" and sec.get("failed_shards"):
            lines += ["Failed shards:", ""]
            lines += _md_table(
                ["shard", "error"], [[k, str(v)] for k, v in sorted(sec["failed_shards"].items())]
            ) + [""]
        if stage == "eval":
            header, rows = eval_table(sec)
            if rows:
                lines += [
                    "Metrics in %, SOP protocol (every image a query, the rest the gallery; singleton classes excluded as queries):",
                    "",
                ]
                lines += _md_table(header, rows) + [""]
        for p in STAGE_PLOTS.get(stage, []):
            plot = report["plots"].get(p, {})
            if plot.get("file"):
                lines += [f"![{PLOT_TITLES[p]}]({plot['file']})", ""]
            else:
                lines += [
                    f"*{PLOT_TITLES[p]}: not available — {plot.get('missing', 'no data')}.*",
                    "",
                ]
    return "\n".join(lines) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1040px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6em;margin:0.2em 0 0.1em}h2{font-size:1.25em;margin:1.6em 0 0.5em;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5a6375;margin-bottom:14px}
table{border-collapse:collapse;margin:8px 0 14px;background:#fff;font-size:0.92em}
th,td{border:1px solid #d8dce3;padding:4px 10px;text-align:left}th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:0.85em;font-weight:600}
.complete{background:#d9f2e1;color:#17663a}.partial{background:#fff1c9;color:#7a5a00}
.missing,.skipped{background:#f1f2f4;color:#5a6375}.unreadable{background:#fbdada;color:#8a1c1c}
.banner{padding:10px 14px;border-radius:6px;margin:10px 0}.ok{background:#d9f2e1}.warn{background:#fff1c9}
figure{margin:8px 0 14px;background:#fff;border:1px solid #d8dce3;padding:8px;display:inline-block}
figure img{max-width:100%;display:block}figcaption{color:#5a6375;font-size:0.88em;margin-top:4px}
.na{color:#7a8192;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:0 22px;align-items:flex-start}.full{flex-basis:100%}
"""


def render_html(report: dict[str, Any], plot_dir: Path) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>megaclass report — {e(report['run_dir'])}</title>",
        f"<style>{CSS}</style></head><body><main>",
        f"<h1>megaclass report</h1><div class='sub'>{e(report['run_dir'])} · generated {e(report['generated_at'])}</div>",
    ]
    if report["missing"]:
        out.append(
            f"<div class='banner warn'><b>Incomplete run.</b> Stages not complete: {e(', '.join(report['missing']))}.</div>"
        )
    else:
        out.append("<div class='banner ok'><b>All stages complete.</b></div>")

    def table(header: list[str], rows: list[list[str]], num_from: int = 1) -> str:
        h = "".join(f"<th>{e(c)}</th>" for c in header)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td{' class=num' if i >= num_from else ''}>{e(str(c))}</td>"
                for i, c in enumerate(r)
            )
            + "</tr>"
            for r in rows
        )
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    status_rows = "".join(
        f"<tr><td>{e(s)}</td><td><span class='badge {e(report['stages'][s]['status'])}'>{e(report['stages'][s]['status'])}</span></td>"
        f"<td>{e(_overview_note(report['stages'][s]))}</td></tr>"
        for s in STAGES
    )
    out.append(
        f"<table><thead><tr><th>stage</th><th>status</th><th>note</th></tr></thead><tbody>{status_rows}</tbody></table>"
    )
    for stage in ("config", *STAGES):
        sec = report["stages"][stage] if stage in report["stages"] else report["config"]
        out.append(
            f"<h2 id='{stage}'>{e(STAGE_TITLES[stage])} <span class='badge {e(sec['status'])}'>{e(sec['status'])}</span></h2>"
        )
        if sec.get("note"):
            out.append(f"<p>{e(sec['note'])}</p>")
        if sec.get("error"):
            out.append(f"<p class='banner warn'>{e(sec['error'])}</p>")
        if sec.get("warning"):
            out.append(f"<p class='banner warn'>{e(sec['warning'])}</p>")
        if stage == "config" and sec.get("key_settings"):
            out.append(
                table(
                    ["setting", "value"], [[k, _fmt(v)] for k, v in sec["key_settings"].items()], 99
                )
            )
        kv = _kv_rows(sec, stage)
        out.append("<div class='row'>")
        if kv:
            out.append(table(["", "value"], [list(r) for r in kv]))
        if stage == "embed" and sec.get("skipped"):
            out.append(
                table(
                    ["skipped: reason", "samples"],
                    [[k, str(v)] for k, v in sorted(sec["skipped"].items())],
                )
            )
        if stage == "embed" and sec.get("failed_shards"):
            out.append(
                table(
                    ["failed shard", "error"],
                    [[k, str(v)] for k, v in sorted(sec["failed_shards"].items())],
                    99,
                )
            )
        if stage == "eval":
            header, rows = eval_table(sec)
            if rows:
                out.append(
                    "<div class='full'><p>Metrics in %, SOP protocol: every image a query, the rest "
                    "the gallery; queries of single-member classes excluded.</p>"
                    + table(header, rows, 2)
                    + "</div>"
                )
        for p in STAGE_PLOTS.get(stage, []):
            plot = report["plots"].get(p, {})
            if plot.get("file"):
                data = base64.b64encode((plot_dir.parent / plot["file"]).read_bytes()).decode()
                out.append(
                    f"<figure><img alt='{e(PLOT_TITLES[p])}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{e(PLOT_TITLES[p])}</figcaption></figure>"
                )
            else:
                out.append(
                    f"<p class='na'>{e(PLOT_TITLES[p])}: not available — {e(plot.get('missing', 'no data'))}.</p>"
                )
        out.append("</div>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """Read every stage's files under ``run_dir``, write report.json/.md/.html and plots/."""
    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise FileNotFoundError(f"{rd.root}: run directory not found")
    cluster = read_cluster(rd)
    train, records = read_train(rd)
    stages = {
        "embed": read_embed(rd),
        "cluster": cluster,
        "assign": read_assign(rd, cluster),
        "train": train,
        "eval": read_eval(rd),
    }
    config = read_config(rd)
    byo_labels = (config.get("key_settings") or {}).get("assign.labels_dir")
    if byo_labels:  # `megaclass run` skips these three stages: not missing, skipped by design
        for name in ("embed", "cluster", "assign"):
            if stages[name]["status"] == "missing":
                stages[name] = _section(
                    "skipped",
                    note=f"bring-your-own labels (assign.labels_dir = {byo_labels}): not run",
                )
    for name, sec in stages.items():
        sec["headline"] = headline(name, sec)
    report: dict[str, Any] = {
        "run_dir": str(rd.root.resolve()),
        "generated_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "config": config,
        "stages": stages,
        "missing": [s for s in STAGES if stages[s]["status"] not in ("complete", "skipped")],
        "plots": {},
    }
    k = stages["assign"].get("k") or cluster.get("k")
    sizes, source = cluster_sizes(rd, k, byo_labels)
    if sizes is None:
        source = f"size percentiles from the cluster stats ({source})"
    jobs = {
        "kmeans_objective": lambda p: plot_objective(cluster, p),
        "cluster_sizes": lambda p: plot_sizes(sizes, source, cluster, p),
        "train_loss_lr": lambda p: plot_train(records, p),
        "eval_recall": lambda p: plot_recall(stages["eval"], p),
        "eval_dims": lambda p: plot_dims(stages["eval"], p),
    }
    plot_stage = {
        "kmeans_objective": "cluster",
        "cluster_sizes": "cluster",
        "train_loss_lr": "train",
        "eval_recall": "eval",
        "eval_dims": "eval",
    }
    for name, job in jobs.items():
        path = rd.plots / f"{name}.png"
        stage_status = stages[plot_stage[name]]["status"]
        try:
            if stage_status in ("missing", "unreadable", "skipped") and not (
                name == "cluster_sizes" and sizes is not None
            ):
                why = f"the {plot_stage[name]} stage is {stage_status}"
            else:
                why = job(path)
        except Exception as e:  # a plot must never cost the whole report
            log.warning("report: plot %s failed: %s", name, e)
            why = f"plotting failed: {type(e).__name__}: {e}"
        if why is None:
            report["plots"][name] = {"file": f"plots/{name}.png", "title": PLOT_TITLES[name]}
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier build would mislead
            report["plots"][name] = {"missing": why, "title": PLOT_TITLES[name]}
    write_json_atomic(rd.root / "report.json", report)
    write_text_atomic(rd.root / "report.md", render_md(report))
    write_text_atomic(rd.root / "report.html", render_html(report, rd.plots))
    msg = (
        "all stages complete"
        if not report["missing"]
        else "missing: " + ", ".join(report["missing"])
    )
    print(f"report: {rd.root / 'report.html'} ({msg})")
    return report
