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
    assert cache.act_flip.shape == cache.act.shape  # every image: any may be seen in a split
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
    # the flipped views follow their images: row i of dev.act_flip is the flip of dev image i
    pos = {f: j for j, f in enumerate(cache.files)}
    for i in range(len(dev.files)):
        np.testing.assert_array_equal(dev.act_flip[i], cache.act_flip[pos[dev.files[i]]])
    np.testing.assert_array_equal(dev.act, cache.act[cache.seen])
    assert dev.info["unseen_images"] == len(dev.unseen)
    with pytest.raises(ValueError, match="dev_split"):
        q.dev_cache(cache, 0.0, seed=3)


def test_split_seeds_draw_other_category_splits_and_deltas_are_paired(quick_run):
    q, cfg, res, _ = quick_run
    cache = q.build_cache(cfg)
    assert q.split_cache(cache, cfg.held_out_fraction, 0) is cache  # seed 0: the builder's
    other = q.split_cache(cache, cfg.held_out_fraction, 1)
    assert other.act is cache.act and other.files == cache.files  # shared, not copied
    seen_cls = {other.classes[i] for i in other.seen}
    unseen_cls = {other.classes[i] for i in other.unseen}
    assert seen_cls and unseen_cls and not seen_cls & unseen_cls
    assert unseen_cls != {cache.classes[i] for i in cache.unseen}
    assert len(unseen_cls) == round(cfg.held_out_fraction * len(seen_cls | unseen_cls))
    assert other.info["unseen_images"] == len(other.unseen)
    # the repeated row ran on two splits; each result is compared with the teacher on its own
    # split, and that teacher number is the one measured on that split
    base = [r for r in res["results"] if r["row"] == "base"]
    assert sorted(r["split"] for r in base) == [0, 1]
    for r in base:
        t = res["teacher_by_split"][str(r["split"])]["teacher (raw 1280-d)"]
        assert r["teacher_R@1"] == t["R@1"]
        assert r["delta_R@1"] == pytest.approx(r["R@1"] - t["R@1"])
    split1 = res["teacher_by_split"]["1"]["teacher (raw 1280-d)"]["R@1"]
    fresh = q.teacher_baselines(cfg, other, [])["teacher (raw 1280-d)"]["R@1"]
    assert split1 == pytest.approx(fresh)
    e = res["summary"][0]
    assert e["delta_R@1"] == pytest.approx(np.mean([r["delta_R@1"] for r in base]))
    assert e["wins_R@1"] == sum(r["delta_R@1"] > 0 for r in base)


def test_lda_map_separates_classes_it_was_fitted_on():
    q = _load_quality()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 20)) * 0.5
    y = np.repeat(np.arange(5), 40)
    noise = rng.normal(size=(200, 20)) * np.r_[np.full(4, 3.0), np.full(16, 0.3)]
    x = centres[y] + noise  # 4 loud nuisance dimensions carry no class information
    z = q.lda_map(x, y, 4)(x)
    assert z.shape == (200, 4)

    def nn_acc(v: np.ndarray) -> float:
        d = ((v[:, None] - v[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return float((y[d.argmin(1)] == y).mean())

    assert nn_acc(z) > nn_acc(x) + 0.2


def test_rerender_reproduces_the_summary_from_the_saved_json(quick_run):
    q, cfg, res, tmp = quick_run
    again = q.rerender(tmp / "res" / "quality.json")
    assert [e["row"] for e in again["summary"]] == [e["row"] for e in res["summary"]]
    for a, b in zip(again["summary"], res["summary"]):
        for key in ("R@1", "delta_R@1", "pca_delta_R@1", "mAP@R", "wins_mAP@R"):
            assert a[key] == pytest.approx(b[key]), key
    # vs PCA-D is the student minus the teacher's PCA at the student's own D, on its split
    r = res["results"][0]
    pca = res["teacher_by_split"][str(r["split"])][f"teacher PCA-{res['rows'][0]['dim']}"]
    assert r["pca_delta_R@1"] == pytest.approx(r["R@1"] - pca["R@1"])
    assert "Δ R@1 vs teacher PCA-D" in q.markdown_table(again)


def test_lda_initialised_student_starts_at_the_lda_reference(quick_run):
    q, cfg, _, _ = quick_run
    cache = q.build_cache(cfg)
    net = q.load_backbone()
    row = replace(q.quick_rows()[0], init="lda", epochs=0)
    pl = q.pseudo_labels(cache, row.feature, row.k, 1, 0, cfg.kmeans_niter)
    untrained = q.train_row(cfg, cache, row, 0, pl, net)
    f = q.lda_map(cache.t_img[cache.seen], pl["labels"][:, 0], row.dim)
    ref = q.metrics(f(cache.t_img[cache.unseen]), [cache.classes[i] for i in cache.unseen])
    assert untrained["R@1"] == pytest.approx(ref["R@1"], abs=1e-3)
    assert untrained["mAP@R"] == pytest.approx(ref["mAP@R"], abs=1e-3)
    with pytest.raises(ValueError, match="init"):
        q.train_row(cfg, cache, replace(row, init="random"), 0, pl, net)
