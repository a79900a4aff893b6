"""Smoke test of benchmarks/quality.py on a tiny openclipart subset, so the script cannot rot.

It runs the real machinery (dataset builder, EfficientNet-Lite0 + MiniLM teachers, faiss
k-means, PartialFC/MLCD heads, SOP metrics) on ~6 images per category at 64 px, and checks
properties that would break if a piece changed underneath: the student starts exactly at the
teacher (PCA) and training moves it, seen/unseen categories are disjoint, outputs are written.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OPENCLIPART = Path("/usr/share/openclipart/png")

pytestmark = pytest.mark.skipif(
    not OPENCLIPART.is_dir(), reason="needs the Debian package openclipart-png"
)


def _load_quality():
    spec = importlib.util.spec_from_file_location(
        "megaclass_bench_quality", ROOT / "benchmarks" / "quality.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    q = _load_quality()
    tmp = tmp_path_factory.mktemp("quality")
    argv = [
        "--quick",
        "--max-per-class",
        "4",
        "--work",
        str(tmp / "work"),
        "--out",
        str(tmp / "res" / "quality.json"),
        "--figures",
        str(tmp / "figs"),
        "--rows",
        "base",
        "mlcd",
        "--seeds",
        "0",
        "1",
    ]
    res = q.main(argv)
    cfg, _ = q.parse_args(argv)
    return q, cfg, res, tmp


def test_outputs_written_and_sane(quick_run):
    q, cfg, res, tmp = quick_run
    saved = json.loads((tmp / "res" / "quality.json").read_text())
    assert saved["summary"] == res["summary"]
    assert (tmp / "res" / "quality.md").read_text().startswith("| encoder / row")
    for p in res["figures"]:
        assert Path(p).stat().st_size > 1000
    # base is a repeated row (two seeds), mlcd runs once
    assert [(e["row"], e["seeds"]) for e in res["summary"]] == [("base", 2), ("mlcd", 1)]
    for r in res["results"]:
        assert 0.0 <= r["R@1"] <= 1.0 and 0.0 <= r["mAP@R"] <= 1.0
        assert np.isfinite(r["loss_first"]) and np.isfinite(r["loss_last"])
        assert r["steps"] >= 1
    d = res["data"]
    assert d["seen_classes"] > 0 and d["unseen_classes"] > 0
    assert d["seen_images"] + d["unseen_images"] == d["images"]


def test_cache_splits_and_student_starts_at_teacher(quick_run):
    q, cfg, res, _ = quick_run
    cache = q.build_cache(cfg)  # a cache hit now; build_cache checked trunk == teacher
    seen_cls = {cache.classes[i] for i in cache.seen}
    unseen_cls = {cache.classes[i] for i in cache.unseen}
    assert seen_cls and unseen_cls and not seen_cls & unseen_cls
    assert cache.act_flip.shape[0] == len(cache.seen)
    np.testing.assert_allclose(np.linalg.norm(cache.t_img, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(cache.t_txt, axis=1), 1.0, atol=1e-4)

    # The untrained student is exactly the teacher's centred PCA-D projection ...
    net = q.load_backbone()
    row = replace(q.quick_rows()[0], epochs=0)
    proj = q.pca_projection(cache.t_img[cache.seen], row.dim)
    student = q.embed(q.Tail(net, cfg.train_from, proj), cache.act[cache.unseen])
    with torch.no_grad():
        teacher_pca = proj(torch.from_numpy(cache.t_img[cache.unseen])).numpy()
    np.testing.assert_allclose(student, teacher_pca, atol=1e-4)
    # ... and so are its metrics when trained for zero epochs.
    pl = q.pseudo_labels(cache, row.feature, row.k, 1, 0, cfg.kmeans_niter)
    untrained = q.train_row(cfg, cache, row, 0, pl, net)
    baseline = q.teacher_baselines(cfg, cache, [row.dim])[f"teacher PCA-{row.dim}"]
    assert untrained["R@1"] == pytest.approx(baseline["R@1"], abs=1e-3)
    assert untrained["mAP@R"] == pytest.approx(baseline["mAP@R"], abs=1e-3)
    # and training moves it (the recorded trained runs are not the untrained student)
    trained = [r for r in res["results"] if r["row"] == "base" and r["seed"] == 0][0]
    assert trained["steps"] > 0
    assert (trained["R@1"], trained["mAP@R"]) != (untrained["R@1"], untrained["mAP@R"])


def test_dev_split_holds_out_seen_categories_only(quick_run):
    q, cfg, _, _ = quick_run
    cache = q.build_cache(cfg)
    dev = q.dev_cache(cache, 0.5, seed=3)
    seen_files = [cache.files[i] for i in cache.seen]
    unseen_files = {cache.files[i] for i in cache.unseen}
    # only the seen part, in its order; the unseen categories never enter the tuning split
    assert dev.files == seen_files and not unseen_files & set(dev.files)
    train_cls = {dev.classes[i] for i in dev.seen}
    val_cls = {dev.classes[i] for i in dev.unseen}
    assert train_cls and val_cls and not train_cls & val_cls
    assert len(val_cls) == round(0.5 * len(train_cls | val_cls))
    # the flipped views follow their images: row j of dev.act_flip is the flip of dev.seen[j]
    pos = {f: j for j, f in enumerate(seen_files)}
    for j, i in enumerate(dev.seen):
        np.testing.assert_array_equal(dev.act_flip[j], cache.act_flip[pos[dev.files[i]]])
    np.testing.assert_array_equal(dev.act, cache.act[cache.seen])
    assert dev.info["unseen_images"] == len(dev.unseen)
    with pytest.raises(ValueError, match="dev_split"):
        q.dev_cache(cache, 0.0, seed=3)
