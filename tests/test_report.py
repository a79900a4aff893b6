"""The report from synthetic run directories in the contract layout (complete, partial, broken),
and the HTML report rendered by headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from megaclass.core.atomic import write_json_atomic
from megaclass.core.rundir import RunDir
from megaclass.pipelines.config import RunConfig, dump_config
from megaclass.pipelines.report import build_report
from megaclass.pipelines.retrieval import evaluate_features
from PIL import Image

STAGE_FILES = {
    "embed": "embed/_SUCCESS.json",
    "cluster": "cluster/_SUCCESS.json",
    "assign": "labels/_SUCCESS.json",
    "regroup": "shard_labels/_SUCCESS.json",
    "train": "train/_SUCCESS.json",
    "eval": "eval/_SUCCESS.json",
}
K = 12


def _embed(run: Path, complete: bool) -> None:
    recs = [
        {"rows": 40, "stats": {"seen": 42, "kept": 40, "skipped": {"undecodable_image": 2}}},
        {"rows": 39, "stats": {"seen": 40, "kept": 39, "skipped": {"missing_caption": 1}}},
    ]
    for i, r in enumerate(recs):
        write_json_atomic(run / "embed" / "_done" / f"shard-{i:06d}.json", r)
    if complete:
        write_json_atomic(
            run / "embed" / "_SUCCESS.json",
            {  # keys as pipelines/embed.py writes them
                "stage": "embed",
                "skipped_stage": False,
                "teacher": {"image_teacher": "efficientnet-lite0", "text_teacher": "minilm"},
                "image_dim": 1280,
                "text_dim": 384,
                "shards": 2,
                "shards_embedded": 2,
                "shards_failed": 0,
                "rows": 79,
                "seen": 82,
                "skipped": {"undecodable_image": 2, "missing_caption": 1},
                "skipped_total": 3,
                "skipped_by_shard": {"s0.tar": {"undecodable_image": 2}},
                "wall_s": 12.5,
                "samples_per_s": 6.32,
            },
        )


def _cluster(run: Path) -> None:
    obj = [50.0 + 10 * (1 - 0.5**i) for i in range(8)]
    stats = {  # keys as pipelines/cluster.py writes them
        "backend": "faiss",
        "k": K,
        "dim": 1664,
        "feature": "mean",
        "sample_rows": 79,
        "total_rows": 79,
        "objective": obj,
        "objective_per_point": [v / 79 for v in obj],
        "final_mean_cosine": 0.76,
        "sizes": {
            "k": K,
            "points": 79,
            "empty": 0,
            "singleton": 1,
            "imbalance": 1.21,
            "size_percentiles": {"p0": 1.0, "p50": 6.0, "p100": 14.0},
            "largest": [14, 11, 9],
        },
        "quality": {"nmi": 0.81, "ami": 0.7, "homogeneity": 0.8, "completeness": 0.82},
        "seconds_kmeans": 0.4,
        "centroid_sha256": "ab" * 32,
    }
    write_json_atomic(run / "cluster" / "stats.json", stats)
    write_json_atomic(run / "cluster" / "_SUCCESS.json", stats)


def _assign(run: Path, sha: str = "ab" * 32) -> np.ndarray:
    from megaclass.data.labels import write_labels

    rng = np.random.default_rng(0)
    cls = rng.integers(0, K - 1, 79)  # cluster K-1 stays empty
    for i, (a, b) in enumerate([(0, 40), (40, 79)]):
        c = cls[a:b]
        write_labels(
            run / "labels" / f"shard-{i:06d}.parquet",
            [f"k{j}" for j in range(a, b)],
            c[:, None].astype(np.int64),
            np.full((b - a, 1), 0.8, np.float32),
            sha,
        )
    write_json_atomic(
        run / "labels" / "_SUCCESS.json",
        {
            "k": K,
            "topk": 1,
            "method": "exact",
            "centroid_sha256": sha,
            "stems": 2,
            "rows": 79,
            "seconds": 0.2,
            "rows_per_second": 395.0,
            "label_histogram": {"empty": 1, "imbalance": 1.3},
            "low_score_threshold": 0.5,
            "low_score_rows": 3,
            "low_score_share": 3 / 79,
        },
    )
    return np.bincount(cls, minlength=K)


def _train(run: Path, complete: bool, steps: int = 30, eval_lines: bool = False) -> None:
    (run / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(5, steps + 1, 5):
        if eval_lines and s % 10 == 0:  # eval during training, between the training lines
            r1, mapr = 0.3 + s / 100, 0.1 + s / 200
            lines.append(json.dumps({"step": s, "kind": "eval", "encoder": "student",
                                     "recall@1": r1, "map@r": mapr, "seconds": 0.5}))  # fmt: skip
        lines.append(
            json.dumps(
                {  # the record of training/trainer.py _Window.record
                    "step": s,
                    "loss": 9.0 / (1 + 0.1 * s),
                    "lr": 1e-3 * min(1.0, s / 10),
                    "head_lr": 1e-3 * min(1.0, s / 10),
                    "samples_per_s": 100.0 + s,
                    "data_wait_share": 0.1,
                    "grad_norm": 1.0,
                    "samples": s * 32,
                    "time": 1e9 + s,
                }
            )
        )
    (run / "train" / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3')  # torn tail
    (run / "train" / "ckpt" / "step-0000010").mkdir(parents=True)
    if complete:
        write_json_atomic(
            run / "train" / "_SUCCESS.json",
            {
                "steps": steps,
                "final_loss": 9.0 / (1 + 0.1 * steps),
                "samples": steps * 32,
                "bad_steps": 0,
                "world_size": 2,
                "interrupted": False,
                "resumed_from": 0,
                "global_batch": 32,
                "wall_s": 30.0,
                "samples_per_s": 32.0,
                "export": {"encoder": str(run / "export" / "encoder.safetensors")},
            },
        )


EVAL_COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40), (10, 10, 10),
                (140, 20, 160)]  # fmt: skip


def _eval(run: Path) -> dict:
    """metrics.json from the real evaluator, the features it was computed from, and the eval
    shards holding those keys (one colour per class) for the retrieval examples' thumbnails."""
    from megaclass.data.writer import ShardWriter

    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 60).tolist()
    centers = rng.normal(size=(6, 32))
    keys = [f"e{i:03d}" for i in range(60)]
    (run / "eval" / "features").mkdir(parents=True, exist_ok=True)
    with ShardWriter(run / "evalshards", prefix="eval-", maxcount=40) as w:
        for key, c in zip(keys, y):
            img = Image.new("RGB", (48, 40), EVAL_COLOURS[c])
            w.write(key, img, f"class {c}", {"class": str(c)})
    encoders = {}
    for name, noise, dim in (("teacher", 2.0, 32), ("student", 1.0, 16)):
        x = centers[y][:, :dim] + noise * rng.normal(size=(60, dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.savez(run / "eval" / "features" / f"{name}.npz", x=x.astype(np.float32),
                 keys=np.asarray(keys), classes=np.asarray([str(c) for c in y]),
                 splits=np.asarray([""] * 60))  # fmt: skip
        res = evaluate_features(x, y, (1, 2, 4, 8), 5, [4, 8, 64], skip_oversized=True)
        encoders[name] = {"kind": name, "spec": name, "dim": dim, "images_per_s": 50.0, **res}
    summary = {
        "stage": "eval",
        "eval_set": {
            "n": 60,
            "classes": 6,
            "class_field": "class",
            "read": {"skipped": {}},
            "shards": w.shards,
        },  # fmt: skip
        "settings": {"recall_ks": [1, 2, 4, 8], "knn_k": 5, "compact_dims": [4, 8, 64]},
        "encoders": encoders,
        "comparison": {
            "full": {
                k: encoders["student"]["full"][k] - encoders["teacher"]["full"][k]
                for k in ("recall@1", "map@r", "knn_acc")
            }
        },
        "wall_s": 3.0,
    }
    write_json_atomic(run / "eval" / "metrics.json", summary)
    write_json_atomic(run / "eval" / "_SUCCESS.json", summary)
    return summary


def make_run(root: Path, stages: set[str]) -> Path:
    """A run directory where ``stages`` are complete; embed/train are partial when not listed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(dump_config(RunConfig(run_dir=str(root))))
    _embed(root, "embed" in stages)
    if "cluster" in stages:
        _cluster(root)
    if "assign" in stages:
        _assign(root)
    if "regroup" in stages:
        (root / "shard_labels").mkdir(exist_ok=True)
        (root / "shard_labels" / "_SUCCESS.json").write_text(
            json.dumps({"regrouped": False, "reason": "every training shard has a sidecar"})
        )
    if "train" in stages or "train_partial" in stages:
        _train(root, "train" in stages)
    if "eval" in stages:
        _eval(root)
    return root


ALL = {"embed", "cluster", "assign", "regroup", "train", "eval"}


def _png_ok(path: Path) -> bool:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return arr.shape[0] > 50 and arr.shape[1] > 50 and arr.std() > 5


def test_report_complete_run(tmp_path):
    run = make_run(tmp_path / "run", ALL)
    rep = build_report(run)
    assert rep["missing"] == []
    assert {s: v["status"] for s, v in rep["stages"].items()} == dict.fromkeys(
        STAGE_FILES, "complete"
    )
    st = rep["stages"]
    assert st["embed"]["skipped"] == {"undecodable_image": 2, "missing_caption": 1}
    assert st["embed"]["samples_per_s"] == 6.32
    assert st["cluster"]["iterations"] == 8 and st["cluster"]["sizes"]["imbalance"] == 1.21
    assert st["cluster"]["quality"]["nmi"] == 0.81
    assert st["assign"]["low_score_share"] == pytest.approx(3 / 79)
    assert st["train"]["steps"] == 30 and st["train"]["metrics"]["records"] == 6
    assert st["train"]["metrics"]["unreadable_lines"] == 1  # torn tail line is counted, not fatal
    assert st["train"]["metrics"]["loss_min"] == pytest.approx(9.0 / 4)
    ev = st["eval"]["encoders"]
    assert set(ev) == {"teacher", "student"} and "64" in ev["student"]["compact_skipped"]
    # every plot written, a real image, and embedded in the HTML
    assert set(rep["plots"]) == {
        "kmeans_objective",
        "cluster_sizes",
        "train_loss_lr",
        "train_eval",
        "eval_recall",
        "eval_dims",
    }
    assert "no held-out eval lines" in rep["plots"]["train_eval"]["missing"]
    html_text = (run / "report.html").read_text()
    for name, p in rep["plots"].items():
        if name == "train_eval":
            continue
        assert "file" in p, (name, p)
        assert _png_ok(run / p["file"]), name
    assert html_text.count("data:image/png;base64,") == 5
    assert "<script" not in html_text and "http://" not in html_text and "https://" not in html_text
    md = (run / "report.md").read_text()
    assert "All stages complete" in md and "![Recall@K per encoder](plots/eval_recall.png)" in md
    r1 = 100 * ev["teacher"]["full"]["recall@1"]
    assert f"| teacher | 32 | {r1:.1f} |" in md
    assert json.loads((run / "report.json").read_text())["missing"] == []


def test_report_retrieval_examples_and_eval_during_training(tmp_path):
    """Retrieval examples: seeded held-out queries whose neighbours are the brute-force top-5
    of each encoder's eval features, right/wrong marked; eval lines of metrics.jsonl are kept
    out of the loss curves and drawn as their own plot."""
    run = make_run(tmp_path / "run", ALL - {"train"})
    _train(run, complete=True, eval_lines=True)
    rep = build_report(run)
    ex = rep["retrieval_examples"]
    assert ex["status"] == "complete" and ex["encoders"] == ["teacher", "student"]
    assert len(ex["queries"]) == 4 and "thumbnails_note" not in ex
    from megaclass.pipelines.report import examples_md
    from megaclass.pipelines.report_read import read_eval, read_retrieval_examples, read_train

    rd = RunDir(run)
    again, _ = read_retrieval_examples(rd, read_eval(rd))
    assert again == ex  # a fixed choice
    marks = {"teacher": [], "student": []}
    for name in ex["encoders"]:
        z = np.load(run / "eval" / "features" / f"{name}.npz")
        keys, cls = z["keys"].tolist(), z["classes"].tolist()
        for q in ex["queries"]:
            i = keys.index(q["key"])
            sims = z["x"].astype(np.float64) @ z["x"][i].astype(np.float64)
            sims[i] = -np.inf
            ref = [keys[j] for j in np.argsort(-sims, kind="stable")[:5]]
            hits = q["neighbours"][name]
            assert [h["key"] for h in hits] == ref
            assert [h["correct"] for h in hits] == [cls[keys.index(k)] == q["class"] for k in ref]
            marks[name] += [h["correct"] for h in hits]
    # the less noisy student finds more of the right class, and both are far above chance
    assert ex["accuracy"]["student"] == pytest.approx(np.mean(marks["student"]))
    assert np.mean(marks["student"]) >= np.mean(marks["teacher"]) > 1 / 6
    md = (run / "report.md").read_text()
    n_right = sum(sum(v) for v in marks.values())
    assert md.count(" ✓ |") == n_right and md.count(" ✗ |") == 40 - n_right
    assert "### Retrieval examples" in md and f"Query **{ex['queries'][0]['key']}**" in md
    page = (run / "report.html").read_text()
    assert (
        page.count("class='ex right'") == n_right and page.count("class='ex wrong'") == 40 - n_right
    )
    assert page.count("data:image/jpeg;base64,") == 4 + 40  # queries + neighbours, all found

    # eval-during-training lines: not in the training curve, a plot of their own
    sec, records, evals = read_train(rd)
    assert len(records) == 6 and all("kind" not in r for r in records)
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert sec["metrics"]["records"] == 6 and sec["metrics"]["eval_records"] == 3
    assert sec["metrics"]["loss_min"] == pytest.approx(9.0 / 4)
    assert sec["metrics"]["eval_last"]["recall@1"] == pytest.approx(0.6)
    assert _png_ok(run / rep["plots"]["train_eval"]["file"])

    # without the shards the keys still tell the story; no features: the section says why
    shutil.rmtree(run / "evalshards")
    ex, thumbs = read_retrieval_examples(rd, read_eval(rd))
    shown = {q["key"] for q in ex["queries"]}
    shown |= {h["key"] for q in ex["queries"] for hs in q["neighbours"].values() for h in hs}
    assert ex["status"] == "complete" and thumbs == {}
    assert f"{len(shown)} image(s) not found" in ex["thumbnails_note"]
    from megaclass.pipelines.report import examples_html

    assert examples_html(ex, thumbs).count("<div class='noimg'>no image</div>") == 44
    shutil.rmtree(run / "eval" / "features")
    ex, _ = read_retrieval_examples(rd, read_eval(rd))
    assert ex["status"] == "missing" and "no features" in ex["note"]
    assert "Retrieval examples: not available — no features" in "\n".join(examples_md(ex))


def test_report_cluster_sizes_from_labels(tmp_path):
    run = make_run(tmp_path / "run", {"embed", "cluster"})
    counts = _assign(run)
    from megaclass.pipelines.report_read import RunDir, cluster_sizes

    sizes, source = cluster_sizes(RunDir(run), K)
    np.testing.assert_array_equal(sizes, counts)
    assert "79 labelled samples" in source


def test_report_partial_run_says_what_is_missing(tmp_path):
    run = make_run(tmp_path / "run", {"cluster", "train_partial"})
    write_json_atomic(
        run / "embed" / "_FAILED.json", {"failed": {"/data/bad-000009.tar": "ray: worker died"}}
    )
    rep = build_report(run)
    assert "1 shard(s) failed after retries" in rep["stages"]["embed"]["note"]
    assert rep["stages"]["embed"]["failed_shards"] == {"/data/bad-000009.tar": "ray: worker died"}
    st = rep["stages"]
    assert st["embed"]["status"] == "partial" and st["embed"]["shards_done"] == 2
    assert st["embed"]["skipped"] == {"undecodable_image": 2, "missing_caption": 1}
    assert st["cluster"]["status"] == "complete"
    assert st["assign"]["status"] == "missing"
    assert st["train"]["status"] == "partial" and "last logged step 30" in st["train"]["note"]
    assert st["eval"]["status"] == "missing"
    assert rep["missing"] == ["embed", "assign", "regroup", "train", "eval"]
    assert "file" in rep["plots"]["kmeans_objective"] and "file" in rep["plots"]["train_loss_lr"]
    # no labels: the size plot falls back to the cluster stats' percentiles, and says so
    assert "file" in rep["plots"]["cluster_sizes"]
    assert "missing" in rep["plots"]["eval_recall"] and "missing" in rep["plots"]["eval_dims"]
    md = (run / "report.md").read_text()
    assert "Incomplete run — stages not complete: embed, assign, regroup, train, eval" in md
    assert "Recall@K per encoder: not available — the eval stage is missing" in md
    assert "| /data/bad-000009.tar | ray: worker died |" in md
    html_text = (run / "report.html").read_text()
    assert "Incomplete run" in html_text and html_text.count("data:image/png;base64,") == 3
    # a later rebuild after eval finished drops the "missing" entry and adds its plots
    _eval(run)
    rep2 = build_report(run)
    assert "eval" not in rep2["missing"] and "file" in rep2["plots"]["eval_recall"]


def test_report_bring_your_own_labels(tmp_path):
    """With assign.labels_dir, `megaclass run` skips embed/cluster/assign: skipped, not missing."""
    run = tmp_path / "run"
    run.mkdir()
    byo = tmp_path / "byo"
    counts = _assign(byo)
    cfg = RunConfig(run_dir=str(run))
    cfg.assign.labels_dir = str(byo / "labels")
    (run / "config.yaml").write_text(dump_config(cfg))
    _train(run, complete=True)
    _eval(run)
    rep = build_report(run)
    assert rep["missing"] == []
    for stage in ("embed", "cluster", "assign"):
        assert rep["stages"][stage]["status"] == "skipped"
        assert "bring-your-own labels" in rep["stages"][stage]["note"]
    assert "file" in rep["plots"]["cluster_sizes"]  # from the user's label sidecars
    assert "cluster stage is skipped" in rep["plots"]["kmeans_objective"]["missing"]
    from megaclass.pipelines.report_read import RunDir, cluster_sizes

    sizes, _ = cluster_sizes(RunDir(run), None, byo / "labels")
    np.testing.assert_array_equal(sizes, counts[: len(sizes)])
    assert len(sizes) == K - 1 and counts[-1] == 0  # k inferred from the largest label


def test_report_empty_and_broken_runs(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    rep = build_report(run)
    assert rep["missing"] == list(STAGE_FILES) and rep["config"]["status"] == "missing"
    assert all("missing" in p for p in rep["plots"].values())
    assert (run / "report.html").is_file()

    broken = make_run(tmp_path / "broken", ALL)
    (broken / "cluster" / "_SUCCESS.json").write_text("{not json")
    (broken / "eval" / "metrics.json").write_text("[1, 2]")
    rep = build_report(broken)
    assert rep["stages"]["cluster"]["status"] == "unreadable"
    assert "_SUCCESS.json" in rep["stages"]["cluster"]["error"]
    assert rep["stages"]["eval"]["status"] == "unreadable"
    assert "expected a JSON object" in rep["stages"]["eval"]["error"]
    assert rep["missing"] == ["cluster", "eval"]
    # mismatching centroid sha between labels and centroids is flagged
    mism = make_run(tmp_path / "mism", {"embed", "cluster"})
    _assign(mism, sha="cd" * 32)
    rep = build_report(mism)
    assert "different centroids" in rep["stages"]["assign"]["warning"]
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        build_report(tmp_path / "nope")


# --------------------------------------------------------------------------------------
# the HTML in a real browser
# --------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROBE = """
<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    widths: imgs.map(i => i.naturalWidth), complete: imgs.map(i => i.complete),
    errors: window.__errors, title: document.title,
    h2: Array.from(document.querySelectorAll('h2')).map(h => h.textContent)});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=cwd)
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *args,
    ]
    env = {**os.environ, "HOME": str(cwd)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)


def test_html_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path / "run", ALL - {"train"})
    _train(run, complete=True, eval_lines=True)
    build_report(run)
    page = (run / "report.html").read_text()
    assert page.count("<img") == 6 + 44  # plots, then the retrieval examples' thumbnails
    probe = run / "probe.html"  # the report itself carries no script: inject one into a copy
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    res = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stdout.find('<pre id="probe">')
    assert start >= 0, res.stdout[-2000:]
    raw = res.stdout[start + len('<pre id="probe">') : res.stdout.find("</pre>", start)]
    import html as _html

    info = json.loads(_html.unescape(raw))
    assert info["errors"] == []
    assert len(info["widths"]) == 50 and all(w > 100 for w in info["widths"][:6]), info
    assert all(w > 0 for w in info["widths"][6:]), info  # every thumbnail decoded
    assert info["title"].startswith("megaclass report")
    assert any("Eval" in h for h in info["h2"]) and any("Train" in h for h in info["h2"])

    shot = tmp_path / "report.png"
    res = _chromium(
        [
            "--window-size=1100,2600",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            (run / "report.html").as_uri(),
        ],
        tmp_path,
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("RGB")).astype(np.int16)
    assert arr.shape[:2] == (2600, 1100)
    # not blank: many distinct colours, and plot colours (saturated pixels) are on screen
    assert len(np.unique(arr.reshape(-1, 3)[::7], axis=0)) > 200
    saturation = arr.max(axis=2) - arr.min(axis=2)
    assert (saturation > 80).mean() > 0.002
    shutil.copy(shot, run / "report-screenshot.png")


def test_report_shows_regroup_mismatches_and_a_skipped_eval(tmp_path):
    """Labels regrouped per training shard: the counts of every mismatch kind reach the report;
    a run without held-out shards shows eval as skipped, not missing."""
    run = make_run(tmp_path / "run", ALL - {"eval"})
    (run / "shard_labels" / "_SUCCESS.json").write_text(
        json.dumps(
            {
                "regrouped": True,
                "parts": 3,
                "training_shards": 5,
                "rows_in": 32,
                "rows_out": 28,
                "mismatches": {
                    "counts": {"bad_key": 2, "duplicate_key": 1},
                    "examples": {"bad_key": ["abc", "123"], "duplicate_key": ["000000000"]},
                },
            }
        )
    )
    (run / "eval").mkdir()
    note = "eval skipped: data.eval_shards is empty (no held-out set to evaluate on)"
    (run / "eval" / "_SUCCESS.json").write_text(json.dumps({"skipped": True, "note": note}))
    rep = build_report(run)
    st = rep["stages"]
    assert st["regroup"]["status"] == "complete"
    assert st["regroup"]["mismatches"] == {"bad_key": 2, "duplicate_key": 1}
    assert st["eval"]["status"] == "skipped" and "eval_shards is empty" in st["eval"]["note"]
    assert rep["missing"] == []
    md = (run / "report.md").read_text()
    assert "mismatch: bad_key" in md and "abc" in md and "28 label rows" in md


def test_retrieval_examples_follow_the_query_gallery_protocol():
    from megaclass.pipelines.report_read import retrieval_examples

    rng = np.random.default_rng(3)
    n = 40
    cls = np.array([str(i % 5) for i in range(n)])
    splits = np.array(["query" if i < 15 else "gallery" for i in range(n)])
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    z = {"x": x, "keys": np.array([f"k{i}" for i in range(n)]), "classes": cls, "splits": splits}
    ex = retrieval_examples({"a": z}, "query_gallery", n_queries=4, k=5)
    assert len(ex) == 4 and all(int(q["key"][1:]) < 15 for q in ex)
    for q in ex:
        i = int(q["key"][1:])
        sims = x[15:] @ x[i]
        ref = [f"k{15 + j}" for j in np.argsort(-sims, kind="stable")[:5]]
        assert [h["key"] for h in q["neighbours"]["a"]] == ref  # the gallery only
    ex_all = retrieval_examples({"a": z}, "all", n_queries=4, k=5)
    for q in ex_all:  # every image a query, never its own neighbour
        assert q["key"] not in [h["key"] for h in q["neighbours"]["a"]]
