"""Reading a run directory into the report's dict: one section per stage, nothing recomputed.

Why a module of its own: the report must describe any run directory, complete, half-finished
or broken, from only the files the stages leave behind (docs/architecture.md, the run
directory), so every reader here tolerates a missing or unreadable file and says so in the
section's ``status`` instead of raising. Rendering (``report.py``) and plots
(``report_plots.py``) only consume what this module returns.

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
train       ``RUN/train/_SUCCESS.json``, ``RUN/train/metrics.jsonl`` (training lines; lines
            with ``"kind": "eval"`` are held-out metrics during training, kept apart),
            ``RUN/train/ckpt/``
eval        ``RUN/eval/metrics.json`` (``_SUCCESS.json`` marks it complete); for the
            retrieval examples ``RUN/eval/features/<encoder>.npz`` and the eval shards that
            ``metrics.json`` lists (thumbnails; reading stops once every shown image is found)
==========  ==========================================================================

Section ``status`` is complete | partial | missing | unreadable | skipped — the last for
embed/cluster/assign under bring-your-own labels.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.core.rundir import STAGES, RunDir

# Above this many label rows the size plot uses the percentiles of the cluster stats instead
# of streaming the label sidecars' cls column.
MAX_LABEL_ROWS = 50_000_000


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
            "embed.embeddings_dir": g("embed", "embeddings_dir"),
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


def read_train(
    rd: RunDir,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The train section, the training records of ``metrics.jsonl`` and its held-out eval
    records (lines with ``"kind": "eval"``, written by eval during training), kept apart so
    that the loss curves and their summary see training lines only."""
    s, err = _read_json(rd.train / "_SUCCESS.json")
    if err:
        return _section("unreadable", error=err), [], []
    records, evals, bad = [], [], 0
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
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                continue
            if "kind" not in rec:  # a training line
                records.append(rec)
            elif rec["kind"] == "eval":  # other kinds: not ours to plot
                evals.append(rec)
    ckpts = sorted(p.name for p in rd.ckpt.glob("step-*")) if rd.ckpt.is_dir() else []
    curve = _curve_summary(records)
    if bad:
        curve["unreadable_lines"] = bad
    if evals:
        curve["eval_records"] = len(evals)
        last = evals[-1]
        curve["eval_last"] = _pick(last, "step", "encoder", "recall@1", "map@r")
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
            evals,
        )
    if not records and not ckpts:
        return (
            _section("missing", note="no RUN/train/_SUCCESS.json, no metrics, no checkpoint"),
            [],
            [],
        )
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
        evals,
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


def read_regroup(rd: RunDir, train: dict[str, Any]) -> dict[str, Any]:
    """RUN/shard_labels/_SUCCESS.json: labels rebuilt per training shard, with every mismatch."""
    s, err = _read_json(rd.success_path("regroup"))
    if err:
        return _section("unreadable", error=err)
    if s is None:
        if train.get("status") == "complete":  # a run from before the stage existed
            return _section("skipped", note="no regroup record: labels were read as assigned")
        return _section("missing", note="no RUN/shard_labels/_SUCCESS.json")
    if not s.get("regrouped"):
        return _section("complete", note=f"nothing to regroup: {s.get('reason', '')}")
    mm = s.get("mismatches") or {}
    return _section(
        "complete",
        **_pick(s, "parts", "training_shards", "rows_in", "rows_out", "key_shard_digits"),
        mismatches=dict(mm.get("counts") or {}),
        mismatch_examples={k: list(v)[:3] for k, v in (mm.get("examples") or {}).items()},
    )


def read_eval(rd: RunDir) -> dict[str, Any]:
    m, err = _read_json(rd.eval / "metrics.json")
    if err:
        return _section("unreadable", error=err)
    done, _ = _read_json(rd.success_path("eval"))
    if m is None and done and done.get("skipped"):  # no held-out set: skipped by design
        return _section("skipped", note=done.get("note", "eval skipped"))
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
        if r.get("probes"):  # eval.protocol=classification: kNN / linear top-1 instead
            encoders[name]["probes"] = r["probes"]
    return _section(
        status,
        eval_set=_pick(m.get("eval_set") or {}, "n", "classes", "class_field", "read"),
        settings=_pick(
            m.get("settings") or {}, "recall_ks", "knn_k", "compact_dims", "device", "protocol"
        ),
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


def recall_ks(m: dict[str, Any]) -> list[int]:
    """The K of every ``recall@K`` in one encoder's metrics, ascending."""
    return sorted(int(k[7:]) for k in m if k.startswith("recall@") and k[7:].isdigit())


@dataclass
class RunData:
    """Everything the report is made of."""

    report: dict[str, Any]
    """The JSON-ready report: run_dir, generated_at, config, stages, missing, plots (empty)."""
    train_records: list[dict[str, Any]]
    """The readable records of ``RUN/train/metrics.jsonl`` (plotted; the report keeps a summary)."""
    sizes: np.ndarray | None
    """Points per cluster from the label sidecars (:func:`cluster_sizes`), or None."""
    sizes_source: str
    """Where the cluster sizes come from, as the size plot names it."""
    train_eval_records: list[dict[str, Any]] = field(default_factory=list)
    """The ``"kind": "eval"`` lines of ``RUN/train/metrics.jsonl`` (held-out metrics by step)."""
    thumbs: dict[str, bytes] = field(default_factory=dict)
    """JPEG thumbnails of the retrieval examples' images, by eval key."""


def read_run(rd: RunDir) -> RunData:
    """Read every stage's files under ``rd`` into a :class:`RunData`."""
    cluster = read_cluster(rd)
    train, records, evals = read_train(rd)
    stages = {
        "embed": read_embed(rd),
        "cluster": cluster,
        "assign": read_assign(rd, cluster),
        "regroup": read_regroup(rd, train),
        "train": train,
        "eval": read_eval(rd),
    }
    config = read_config(rd)
    byo_labels = (config.get("key_settings") or {}).get("assign.labels_dir")
    byo_emb = (config.get("key_settings") or {}).get("embed.embeddings_dir")
    if byo_emb and stages["embed"]["status"] == "missing":  # `megaclass run` skips embed then
        stages["embed"] = _section(
            "skipped", note=f"bring-your-own embeddings (embed.embeddings_dir = {byo_emb}): not run"
        )
    if byo_labels:  # `megaclass run` skips these three stages: not missing, skipped by design
        for name in ("embed", "cluster", "assign"):
            if stages[name]["status"] == "missing":
                stages[name] = _section(
                    "skipped",
                    note=f"bring-your-own labels (assign.labels_dir = {byo_labels}): not run",
                )
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
    examples, thumbs = read_retrieval_examples(rd, stages["eval"])
    report["retrieval_examples"] = examples
    return RunData(report, records, sizes, source, evals, thumbs)


# --------------------------------------------------------------------------------------
# retrieval examples: a few held-out queries and their neighbours, per encoder
# --------------------------------------------------------------------------------------

EXAMPLE_QUERIES = 4
"""How many held-out queries the report shows (drawn with ``EXAMPLE_SEED``)."""
EXAMPLE_K = 5
"""Neighbours shown per query and encoder."""
EXAMPLE_SEED = 0
EXAMPLE_ENCODERS = 3
"""At most this many encoders side by side (teacher and student first)."""
THUMB_PX = 96


def _slug(name: str) -> str:
    """The file stem the eval stage gives an encoder's features (pipelines/eval.py)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "encoder"


def _load_npz(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def retrieval_examples(
    feats: dict[str, dict[str, Any]],
    protocol: str | None = None,
    n_queries: int = EXAMPLE_QUERIES,
    k: int = EXAMPLE_K,
    seed: int = EXAMPLE_SEED,
) -> list[dict[str, Any]]:
    """Seeded held-out queries and each encoder's top-``k`` neighbours by cosine.

    ``feats`` maps encoder → the arrays of its ``RUN/eval/features/<encoder>.npz`` (same keys in
    the same order for all). Queries are drawn among samples whose class has another member in
    the gallery (so a right answer exists); the query itself is never its own neighbour. Under
    ``query_gallery`` queries come from the ``query`` split and neighbours from ``gallery``."""
    first = next(iter(feats.values()))
    classes = first["classes"].astype(str)
    n = len(classes)
    splits = first.get("splits")
    if protocol == "query_gallery" and splits is not None:
        q_pool = np.flatnonzero(splits.astype(str) == "query")
        gallery = np.flatnonzero(splits.astype(str) == "gallery")
    else:
        q_pool = gallery = np.arange(n)
    g_classes, g_counts = np.unique(classes[gallery], return_counts=True)
    count = dict(zip(g_classes.tolist(), g_counts.tolist()))
    own = 0 if protocol == "query_gallery" else 1  # the query is in its own gallery
    ok = [i for i in q_pool if count.get(classes[i], 0) > own]
    if not ok:
        return []
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(ok, min(n_queries, len(ok)), replace=False).tolist())
    keys = first["keys"].astype(str)
    out = []
    for q in picked:
        entry: dict[str, Any] = {"key": keys[q], "class": classes[q], "neighbours": {}}
        for name, z in feats.items():
            x = z["x"].astype(np.float32, copy=False)
            scores = x[gallery] @ x[q]
            scores[gallery == q] = -np.inf
            order = np.argsort(-scores, kind="stable")[: min(k, len(gallery) - own)]
            entry["neighbours"][name] = [
                {
                    "key": keys[gallery[j]],
                    "class": classes[gallery[j]],
                    "score": float(scores[j]),
                    "correct": bool(classes[gallery[j]] == classes[q]),
                }
                for j in order
            ]
        out.append(entry)
    return out


def _thumb(data: bytes) -> bytes | None:
    from megaclass.data.reader import DEFAULT_MAX_PIXELS, ImageRejected, decode_image
    from PIL import Image

    try:
        img = decode_image(data, DEFAULT_MAX_PIXELS)
    except ImageRejected:
        return None
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def example_thumbs(shards: list[str], wanted: set[str]) -> tuple[dict[str, bytes], str | None]:
    """Thumbnails of the ``wanted`` keys read from the eval shards (stops once all are found;
    the first sample of a key wins, as in the eval stage's reading order)."""
    from megaclass.data.reader import iter_samples
    from megaclass.data.stats import SampleStats

    found: dict[str, bytes] = {}
    stats = SampleStats()
    for url in shards:
        for s in iter_samples(url, stats, decode=False):
            if s.key in wanted and s.key not in found:
                t = _thumb(s.image_bytes)
                if t is not None:
                    found[s.key] = t
        if len(found) == len(wanted):
            break
    missing = len(wanted) - len(found)
    return found, (f"{missing} image(s) not found in the eval shards" if missing else None)


def read_retrieval_examples(
    rd: RunDir, ev: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The report's retrieval examples from ``RUN/eval/features/*.npz``, with thumbnails from
    the eval shards named in ``RUN/eval/metrics.json``; never raises (a section says why not)."""
    if ev.get("status") not in ("complete", "partial") or not ev.get("encoders"):
        return _section("missing", note=f"the eval stage is {ev.get('status')}"), {}
    names = sorted(
        ev["encoders"],
        key=lambda n: (n != "teacher", n != "student", list(ev["encoders"]).index(n)),
    )
    paths = {n: rd.eval / "features" / f"{_slug(n)}.npz" for n in names}
    names = [n for n in names if paths[n].is_file()][:EXAMPLE_ENCODERS]
    if not names:
        return _section("missing", note="no features in RUN/eval/features"), {}
    try:
        feats = {n: _load_npz(paths[n]) for n in names}
        ref = feats[names[0]]
        for n in names[1:]:
            if feats[n]["keys"].tolist() != ref["keys"].tolist():
                return _section(
                    "unreadable", error=f"{paths[n]}: other keys than {paths[names[0]]}"
                ), {}
        protocol = (ev.get("settings") or {}).get("protocol")
        queries = retrieval_examples(feats, protocol)
    except Exception as e:  # a broken features file must not cost the report
        return _section("unreadable", error=f"RUN/eval/features: {type(e).__name__}: {e}"), {}
    if not queries:
        return _section("missing", note="no class with two or more held-out images"), {}
    wanted = {q["key"] for q in queries} | {
        h["key"] for q in queries for hits in q["neighbours"].values() for h in hits
    }
    m, _ = _read_json(rd.eval / "metrics.json")
    shards = ((m or {}).get("eval_set") or {}).get("shards") or []
    try:
        thumbs, why = example_thumbs(list(shards), wanted)
    except Exception as e:  # unreachable remote shards: the keys still tell the story
        thumbs, why = {}, f"eval shards unreadable ({type(e).__name__}: {e})"
    if not shards:
        why = "no eval shards listed in RUN/eval/metrics.json"
    sec = _section(
        "complete",
        encoders=names,
        k=EXAMPLE_K,
        seed=EXAMPLE_SEED,
        queries=queries,
        accuracy={
            n: float(np.mean([h["correct"] for q in queries for h in q["neighbours"][n]]))
            for n in names
        },
    )
    if why:
        sec["thumbnails_note"] = why
    return sec, thumbs
