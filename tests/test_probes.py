"""Classification probes: kNN against a brute-force numpy vote, the linear probe against
scikit-learn, and the classification protocol end to end on `megaclass data imagefolder` shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megaclass.pipelines.probes import (
    ProbeError,
    fit_logreg,
    knn_predict,
    linear_probe,
    logreg_loss,
    probe_splits,
    run_probes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _clusters(n: int, d: int, c: int, seed: int, spread: float = 0.8):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    y = rng.integers(0, c, n)
    x = centres[y] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def _knn_numpy(gx, gy, qx, c, k, t):
    sims = qx.astype(np.float64) @ gx.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(qx), c))
    for i in range(len(qx)):
        np.add.at(votes[i], gy[order[i]], np.exp(sims[i, order[i]] / t))
    return votes.argmax(1)


def test_knn_equals_brute_force_numpy():
    gx, gy = _clusters(300, 12, 7, 0, spread=1.5)
    qx, qy = _clusters(101, 12, 7, 0, spread=1.5)
    for k, t in ((20, 0.07), (5, 0.5), (1, 0.07)):
        ours = knn_predict(gx, gy, qx, 7, k=k, temperature=t, chunk_size=16)
        np.testing.assert_array_equal(ours, _knn_numpy(gx, gy, qx, 7, k, t))
    # the temperature matters: with a soft T the vote differs somewhere from a hard one
    soft = knn_predict(gx, gy, qx, 7, k=20, temperature=5.0)
    hard = knn_predict(gx, gy, qx, 7, k=20, temperature=0.01)
    assert (soft != hard).any() and 0.4 < (hard == qy).mean()


def test_linear_probe_matches_sklearn_and_gradient():
    from sklearn.linear_model import LogisticRegression

    x, y = _clusters(240, 10, 4, 1, spread=1.2)
    x = x.astype(np.float64)
    lam = 1e-2
    w, b = fit_logreg(x, y, 4, lam)
    # sklearn minimises C·Σ CE + ½‖W‖², i.e. ours (mean CE + λ/2‖W‖²) times 1/λ at C = 1/(nλ)
    sk = LogisticRegression(C=1.0 / (len(x) * lam), tol=1e-12, max_iter=10_000).fit(x, y)
    p_ours = torch.softmax(torch.from_numpy(x.astype(np.float64)) @ w + b, 1).numpy()
    np.testing.assert_allclose(p_ours, sk.predict_proba(x), atol=1e-5)
    np.testing.assert_allclose(w.numpy().T, sk.coef_, atol=1e-4)
    # the objective's float64 gradient is the analytic one
    wt = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(4, dtype=torch.float64, requires_grad=True)
    xt, yt = torch.from_numpy(x[:30].astype(np.float64)), torch.from_numpy(y[:30])
    assert torch.autograd.gradcheck(lambda a, c: logreg_loss(a, c, xt, yt, 0.3), (wt, bt))


def test_linear_probe_separable_and_lambda_choice():
    x, y = _clusters(200, 8, 3, 2, spread=0.05)  # tight clusters: perfectly separable
    idx = np.arange(200)
    res = linear_probe(x, y, idx[:120], idx[120:160], idx[160:], 3, [1e-1, 1e-3])
    assert res["top1"] == 1.0
    assert res["l2"] == 1e-1  # both reach 100 % on val: the tie keeps the stronger λ
    assert set(res["val_top1"]) == {"0.1", "0.001"}
    with pytest.raises(ProbeError, match="eval.probe_l2"):
        linear_probe(x, y, idx[:120], idx[120:160], idx[160:], 3, [0.0])


def test_probe_splits_carve_val_with_the_seed():
    splits = ["train"] * 50 + ["val"] * 10
    tr, va, te, note = probe_splits(splits, 0.2, seed=3)
    # no test split: val is scored, val for λ is carved from train (10 of 50), reproducibly
    assert note["test_split"] == "val" and len(te) == 10 and len(va) == 10 and len(tr) == 40
    assert set(tr) | set(va) == set(range(50)) and not set(tr) & set(va)
    tr2, va2, _, _ = probe_splits(splits, 0.2, seed=3)
    assert (va2 == va).all() and (tr2 == tr).all()
    assert not np.array_equal(probe_splits(splits, 0.2, seed=4)[1], va)
    tr, va, te, note = probe_splits(["train"] * 5 + ["val"] * 2 + ["test"] * 3, 0.2, 0)
    assert (len(tr), len(va), len(te), note["val_split"]) == (5, 2, 3, "val")
    with pytest.raises(ProbeError, match="'train'"):
        probe_splits(["test", "val"], 0.1, 0)
    with pytest.raises(ProbeError, match="'test' or 'val'"):
        run_probes(np.eye(3), ["a", "b", "c"], ["train"] * 3, ["knn"])


def test_classification_protocol_on_imagefolder_shards(tmp_path, capsys):
    """`megaclass data imagefolder` shards → eval.protocol=classification → metrics.json."""
    from megaclass.data.converters import convert_imagefolder
    from megaclass.pipelines.config import ConfigError, load_config
    from megaclass.pipelines.eval import run_eval
    from test_eval import COLORS, _image

    src = tmp_path / "tree"
    n = 0
    for split, reps in (("train", 6), ("test", 3)):
        for name, rgb in COLORS.items():
            (src / split / name).mkdir(parents=True)
            for r in range(reps):
                _image(rgb, n).save(src / split / name / f"{r}.png")
                n += 1
    convert_imagefolder(src, tmp_path / "shards")
    spec = f"{tmp_path}/shards/train.txt::{tmp_path}/shards/test.txt"
    over = [
        f"run_dir={tmp_path / 'run'}",
        f"data.eval_shards={spec}",
        "eval.encoders=[teacher]",
        "eval.protocol=classification",
        "eval.probe_knn_k=5",
        "eval.probe_l2=[0.01, 0.0001]",
        "embed.image_teacher=open_clip:megaclass-tiny",
        "embed.text_teacher=none",
    ]
    summary = run_eval(load_config(None, over))
    m = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    p = m["encoders"]["teacher"]["probes"]
    assert (p["n_train"], p["n_test"], p["classes"]) == (30, 15, 5)
    assert p["val_split"].startswith("carved from train (3 of 30")
    # the numbers are the probes' on the stored features, the kNN also numpy's brute force
    z = np.load(tmp_path / "run" / "eval" / "features" / "teacher.npz")
    again = run_probes(
        z["x"], z["classes"].tolist(), z["splits"].tolist(), ["knn", "linear"],
        knn_k=5, l2_grid=[1e-2, 1e-4], val_fraction=0.1, seed=0,
    )  # fmt: skip
    assert (
        again["knn"]["top1"] == p["knn"]["top1"] and again["linear"]["top1"] == p["linear"]["top1"]
    )
    cls = sorted(set(z["classes"].tolist()))
    yi = np.array([cls.index(c) for c in z["classes"].tolist()])
    tr, te = z["splits"] == "train", z["splits"] == "test"
    ref = _knn_numpy(z["x"][tr], yi[tr], z["x"][te], 5, 5, 0.07)
    assert p["knn"]["top1"] == pytest.approx((ref == yi[te]).mean())
    assert p["knn"]["top1"] > 0.5 and p["linear"]["top1"] > 0.5  # colours: far above 1/5
    out = capsys.readouterr().out
    assert "kNN@5 top-1" in out and "linear top-1" in out and summary["comparison"] is None
    # bad values name the key; probe options without the classification protocol are refused
    with pytest.raises(ConfigError, match="eval.probes: 'svm'"):
        load_config(None, [*over, "eval.probes=[knn, svm]"])
    with pytest.raises(ConfigError, match="eval.probe_knn_k: only used by"):
        load_config(None, ["eval.probe_knn_k=5"])
    # the report and the export's model card show the probes' top-1, not an empty retrieval table
    from megaclass.core.rundir import RunDir
    from megaclass.pipelines.export import eval_headline, eval_rows
    from megaclass.pipelines.report import build_report

    build_report(tmp_path / "run")
    md = (tmp_path / "run" / "report.md").read_text()
    knn_pct = f"{100 * p['knn']['top1']:.1f}"
    assert "kNN top-1" in md and knn_pct in md
    cols, rows = eval_rows(json.loads((RunDir(tmp_path / "run").eval / "metrics.json").read_text()))
    assert cols[2:] == ["kNN top-1", "linear top-1"] and rows[0][2] == float(knn_pct)
    assert eval_headline(m)["teacher/linear_top1"] == p["linear"]["top1"]
