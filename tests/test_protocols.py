"""The published retrieval protocols: 'all' (SOP, CUB, Cars) and 'query_gallery' (In-Shop).

Our chunked, tie-exact Recall@K / mAP@R / kNN are checked against an independent brute force
written here in float64 (full similarity matrix, stable sort, plain loops), on data full of
exact ties and on random data, on every device present; against pytorch-metric-learning's
AccuracyCalculator when it is installed; and end to end: a miniature In-Shop archive converted
by ``megaclass data inshop`` and evaluated by the real eval stage with a real encoder.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megaclass.core.config import ConfigError
from megaclass.pipelines.config import EvalConfig, load_config
from megaclass.pipelines.eval import format_table, run_eval
from megaclass.pipelines.retrieval import (
    PROTOCOLS,
    MetricsError,
    evaluate_features,
    query_gallery_metrics,
    retrieval_metrics,
    split_query_gallery,
    topk_neighbors,
)
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------------------
# an independent brute force, float64
# --------------------------------------------------------------------------------------


def _brute(
    q: np.ndarray,
    yq: np.ndarray,
    g: np.ndarray,
    yg: np.ndarray,
    ks: tuple[int, ...],
    knn_k: int,
    same_set: bool,
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of queries ``q`` against gallery ``g``; ``same_set``: q is g, self excluded.

    Written without the module's helpers: full float64 matrix, stable argsort (ties by lower
    gallery index), Python loops over queries and ranks.
    """
    qn = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64), axis=1, keepdims=True)
    gn = g.astype(np.float64) / np.linalg.norm(g.astype(np.float64), axis=1, keepdims=True)
    sim = qn @ gn.T
    if same_set:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    if same_set:
        order = order[:, :-1]  # self is last (-inf)
    hits = dict.fromkeys(ks, 0)
    aps: list[float] = []
    knn = 0
    for i in range(len(q)):
        r = int((yg == yq[i]).sum()) - (1 if same_set else 0)
        if r == 0:
            continue
        rel = yg[order[i]] == yq[i]
        for k in ks:
            hits[k] += bool(rel[:k].any())
        precisions = [rel[:j].sum() / j for j in range(1, r + 1) if rel[j - 1]]
        aps.append(sum(precisions) / r)
        nb = order[i][:knn_k]
        best = None
        for j, c in enumerate(yg[nb]):
            key = (int((yg[nb] == c).sum()), float(sim[i, nb][yg[nb] == c].sum()), -j)
            if best is None or key > best[0]:
                best = (key, c)
        knn += best[1] == yq[i]
    n = len(aps)
    out = {f"recall@{k}": hits[k] / n for k in ks}
    out.update({"map@r": float(np.mean(aps)), "knn_acc": knn / n, "queries": n})
    return out, order


def _tied(n: int, seed: int, n_classes: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """Rows from a few unit templates (one-hot, or ±0.5 in 4 of 8 places) whose cosines are
    multiples of 1/4, exact in float32 in any summation order: many exact ties."""
    rng = np.random.default_rng(seed)
    halves = np.zeros((16, 8), np.float32)
    for row in halves:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    templates = np.concatenate([np.eye(8, dtype=np.float32), halves])
    x = templates[rng.integers(0, len(templates), n)]
    return x, rng.integers(0, n_classes, n)


# --------------------------------------------------------------------------------------
# query_gallery == brute force, chunked or not, on every device
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_query_gallery_matches_brute_force_with_ties(seed):
    q, yq = _tied(70, seed)
    g, yg = _tied(90, seed + 10)
    yq[-1] = 77  # a class with no gallery item: excluded, counted
    ks = (1, 2, 10, 20)
    ref, order = _brute(q, yq, g, yg, ks, knn_k=5, same_set=False)
    for dev in DEVICES:
        for chunk in (7, 40, 4096):
            idx, _ = topk_neighbors(q, 30, chunk_size=chunk, device=dev, gallery=g)
            np.testing.assert_array_equal(idx, order[:, :30], err_msg=f"{dev} chunk {chunk}")
            m = query_gallery_metrics(q, yq, g, yg, ks, knn_k=5, chunk_size=chunk, device=dev)
            assert m["queries"] == ref["queries"] == 69 and m["excluded_no_match"] == 1
            assert (m["query_items"], m["gallery"], m["protocol"]) == (70, 90, "query_gallery")
            for key in ("recall@1", "recall@2", "recall@10", "recall@20", "map@r", "knn_acc"):
                assert m[key] == pytest.approx(ref[key], abs=1e-12), (dev, chunk, key)


def test_all_protocol_matches_the_same_brute_force():
    x, y = _tied(120, 3)
    y[0] = 99  # a singleton class
    ks = (1, 10, 100)
    ref, order = _brute(x, y, x, y, ks, knn_k=7, same_set=True)
    for chunk in (13, 4096):
        m = retrieval_metrics(x, y, ks, knn_k=7, chunk_size=chunk)
        assert m["protocol"] == "all" and m["excluded_singletons"] == 1
        for key in ("recall@1", "recall@10", "recall@100", "map@r", "knn_acc"):
            assert m[key] == pytest.approx(ref[key], abs=1e-12), (chunk, key)


def test_random_features_both_protocols_nontrivial():
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(15, 24))
    y = rng.integers(0, 15, 500)
    x = (centers[y] + 1.3 * rng.normal(size=(500, 24))).astype(np.float32)
    splits = np.where(np.arange(500) % 3 == 0, "query", "gallery")
    q_idx, g_idx, others = split_query_gallery(splits)
    assert others == {} and len(q_idx) + len(g_idx) == 500
    ks = (1, 10, 20, 30, 40, 50)
    ref, _ = _brute(x[q_idx], y[q_idx], x[g_idx], y[g_idx], ks, 10, same_set=False)
    m = query_gallery_metrics(x[q_idx], y[q_idx], x[g_idx], y[g_idx], ks, 10, chunk_size=37)
    for key, v in ref.items():
        assert m[key] == pytest.approx(v, abs=1e-9), key
    assert 0.2 < m["recall@1"] < m["recall@10"] < 1.0  # neither trivial nor saturated


# --------------------------------------------------------------------------------------
# evaluate_features with a protocol
# --------------------------------------------------------------------------------------


def test_evaluate_features_query_gallery_ignores_and_reports_other_splits():
    x, y = _tied(60, 7)
    x = np.concatenate([x, np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)], 1)
    splits = ["query"] * 20 + ["gallery"] * 30 + ["train"] * 8 + [""] * 2
    res = evaluate_features(
        x, list(y), (1, 4), knn_k=3, compact_dims=[8, 99], skip_oversized=True,
        protocol="query_gallery", splits=splits,
    )  # fmt: skip
    direct = query_gallery_metrics(x[:20], y[:20], x[20:50], y[20:50], (1, 4), knn_k=3)
    for key in ("recall@1", "recall@4", "map@r", "knn_acc", "queries", "gallery"):
        assert res["full"][key] == direct[key], key
    ref8, _ = _brute(x[:20, :8], y[:20], x[20:50, :8], y[20:50], (1, 4), 3, same_set=False)
    assert res["compact"]["8"]["map@r"] == pytest.approx(ref8["map@r"], abs=1e-12)
    assert "99" in res["compact_skipped"]
    assert split_query_gallery(splits)[2] == {"": 2, "train": 8}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"protocol": "ring"}, "protocol 'ring' is not one of all, query_gallery"),
        ({"protocol": "query_gallery"}, "needs one split per row: 10 rows, none splits"),
        ({"protocol": "query_gallery", "splits": ["gallery"] * 10}, "found 0 and 10"),
        ({"protocol": "query_gallery", "splits": ["test"] * 10}, "other splits: {'test': 10}"),
    ],
)
def test_protocol_errors_are_clear(kwargs, needle):
    x, y = _tied(10, 0)
    with pytest.raises(MetricsError) as e:
        evaluate_features(x, list(y), **kwargs)
    assert needle in str(e.value)


def test_query_gallery_input_errors():
    x, y = _tied(10, 0)
    with pytest.raises(MetricsError, match="8 dimensions but the gallery 4"):
        query_gallery_metrics(x, y, np.ones((10, 4), np.float32), y)
    with pytest.raises(MetricsError, match="10 gallery feature rows but 9 gallery labels"):
        query_gallery_metrics(x, y, x, y[:9])
    # K beyond the gallery is clamped, as in the 'all' protocol
    m = query_gallery_metrics(x[:3], y[:3], x[3:], y[3:], recall_ks=(1, 50), knn_k=40)
    assert m["knn_k"] == 7 and m["recall@50"] in (None, 1.0)


# --------------------------------------------------------------------------------------
# pytorch-metric-learning's AccuracyCalculator, when installed
# --------------------------------------------------------------------------------------


def test_against_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(20, 16))
    y = rng.integers(0, 20, 300)
    x = (centers[y] + 1.0 * rng.normal(size=(300, 16))).astype(np.float32)  # no exact ties
    y[:3] = [100, 101, 102]  # singletons ('all') / queries without a match ('query_gallery')
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = pml.AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),  # its torch k-NN: no faiss needed
    )
    theirs = calc.get_accuracy(x, y)
    ours = retrieval_metrics(x, y, (1,), knn_k=1)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    q, g = np.arange(0, 300, 2), np.arange(1, 300, 2)
    theirs = calc.get_accuracy(x[q], y[q], x[g], y[g], ref_includes_query=False)
    ours = query_gallery_metrics(x[q], y[q], x[g], y[g], (1,), knn_k=1)
    assert ours["excluded_no_match"] >= 2  # the singletons at 0 and 2 are queries
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)


# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------

PUBLISHED_R1 = {"sop": "70.0", "inshop": "72.8", "cub": "83.7", "cars": "95.9"}
PAPER_KS = {
    "sop": [1, 10, 100, 1000],
    "cub": [1, 2, 4, 8],
    "cars": [1, 2, 4, 8],
    "inshop": [1, 10, 20, 30, 40, 50],
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_R1))
def test_benchmark_configs_load_and_say_how_to_run(name):
    path = REPO / "configs" / "eval" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.eval.protocol == ("query_gallery" if name == "inshop" else "all")
    assert cfg.eval.recall_ks == PAPER_KS[name]
    assert cfg.data.eval_shards == f"/data/{name}-shards/eval.txt"
    head = path.read_text().split("\n\n")[0]
    assert head.startswith("# ")
    assert f"megaclass data {name} --src " in head and f"--out /data/{name}-shards" in head
    assert f"megaclass eval configs/eval/{name}.yaml eval.encoders=" in head
    assert f"ViT-B/32 {PUBLISHED_R1[name]}" in head
    # the override the comment shows is accepted as written
    cfg = load_config(path, ["eval.encoders=[unicom=/weights/x]"])
    assert cfg.eval.encoders == ["unicom=/weights/x"]


def test_protocol_choices_match_the_metrics_module():
    from megaclass.pipelines.probes import CLASSIFICATION

    assert EvalConfig.CHOICES["protocol"] == (*PROTOCOLS, CLASSIFICATION)
    assert EvalConfig().protocol == "all"
    with pytest.raises(
        ConfigError, match="eval.protocol: 'ring' is not one of all, query_gallery, classification"
    ):
        load_config(None, ["eval.protocol=ring"])


def test_format_table_names_the_protocol():
    m = {"recall@1": 0.5, "map@r": 0.25, "knn_acc": None, "knn_k": 3}
    summary = {
        "eval_set": {"n": 5, "classes": 2},
        "settings": {"protocol": "query_gallery"},
        "encoders": {"t": {"dim": 4, "full": m, "compact": {}}},
    }
    assert "query/gallery protocol" in format_table(summary).splitlines()[0]
    summary["settings"]["protocol"] = "all"
    assert "SOP protocol" in format_table(summary).splitlines()[0]


# --------------------------------------------------------------------------------------
# end to end: `megaclass data inshop` shards through the real eval stage
# --------------------------------------------------------------------------------------

ITEM_COLOURS = {
    "id_00000001": (200, 40, 40),
    "id_00000002": (40, 180, 60),
    "id_00000003": (40, 60, 200),
    "id_00000004": (220, 200, 40),
}


def _photo(rgb: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (48, 40, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _inshop(root: Path) -> Path:
    """An In-Shop archive: items 1-2 train; 3 queries + 5 gallery images of items 2-4."""
    rows = []
    for item, statuses in (
        ("id_00000001", ["train", "train"]),
        ("id_00000002", ["train", "query", "gallery", "gallery"]),
        ("id_00000003", ["query", "gallery", "gallery"]),
        ("id_00000004", ["query", "gallery"]),
    ):
        for j, status in enumerate(statuses):
            rel = f"img/MEN/Tees_Tanks/{item}/0{j + 1}_1_front.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_photo(ITEM_COLOURS[item], len(rows)))
            rows.append(f"{rel} {item} {status}")
    (root / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n"
    )
    return root


def test_inshop_end_to_end(tmp_path, capsys):
    from megaclass.pipelines.cli import main

    src = _inshop(tmp_path / "inshop")
    out = tmp_path / "inshop-shards"
    assert main(["data", "inshop", "--src", str(src), "--out", str(out)]) == 0
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        # train shards too: they must be counted as outside the protocol, not evaluated
        f"data.eval_shards={out / 'eval.txt'}::{out / 'train.txt'}",
        "embed.image_teacher=efficientnet-lite0",
        "embed.image_size=64",
        "eval.encoders=[teacher]",
        "eval.compact_dims=[16]",
        "eval.knn_k=2",
        "eval.chunk_size=3",
    ]
    cfg = load_config(REPO / "configs" / "eval" / "inshop.yaml", overrides)
    summary = run_eval(cfg)
    es = summary["eval_set"]
    assert es["protocol"] == "query_gallery"
    assert es["splits"] == {"gallery": 5, "query": 3, "train": 3}
    assert es["outside_protocol"] == {"train": 3}
    full = summary["encoders"]["teacher"]["full"]
    assert (full["queries"], full["gallery"], full["excluded_no_match"]) == (3, 5, 0)
    assert set(full) >= {f"recall@{k}" for k in (1, 10, 20, 30, 40, 50)}
    # the stage's numbers are the brute force's on the features it stored
    z = np.load(tmp_path / "run" / "eval" / "features" / "teacher.npz")
    splits, classes = z["splits"], z["classes"]
    q, g = splits == "query", splits == "gallery"
    ref, _ = _brute(z["x"][q], classes[q], z["x"][g], classes[g], (1, 10), knn_k=2, same_set=False)
    for key in ("recall@1", "recall@10", "map@r", "knn_acc"):
        assert full[key] == pytest.approx(ref[key], abs=1e-9), key
    printed = capsys.readouterr().out
    assert "query/gallery protocol" in printed
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["settings"]["protocol"] == "query_gallery"

    # the same shards under 'all' lack nothing; under query_gallery without query rows: clear
    cfg = load_config(
        REPO / "configs" / "eval" / "inshop.yaml",
        [*overrides[:1], f"data.eval_shards={out / 'train.txt'}", *overrides[2:]],
    )
    from megaclass.pipelines.eval import EvalError

    with pytest.raises(EvalError, match=r"needs samples whose json 'split' is 'query'.*'train': 3"):
        run_eval(cfg, force=True)
