"""Retrieval metrics against hand-computed values and an independent brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from megaclass.pipelines.retrieval import (
    MetricsError,
    _knn_votes,
    compact_features,
    evaluate_features,
    retrieval_metrics,
    topk_neighbors,
)

S = 1 / math.sqrt(2)
# Six items in 2-D; items 0/1 and 2/5 are identical vectors (exact ties), item 3 is at exactly
# the same cosine S from 0, 1, 2 and 5, item 4 is the only member of class C.
HAND_X = np.array([[1, 0], [1, 0], [0, 1], [S, S], [-1, 0], [0, 1]], dtype=np.float32)
HAND_Y = ["A", "B", "A", "B", "C", "A"]
# Rankings (similarity desc, ties by lower index), worked out by hand:
#   q0 (A, R=2): 1 B, 3 B, 2 A, 5 A, 4 C     q1 (B, R=1): 0 A, 3 B, 2 A, 5 A, 4 C
#   q2 (A, R=2): 5 A, 3 B, 0 A, 1 B, 4 C     q3 (B, R=1): 0 A, 1 B, 2 A, 5 A, 4 C
#   q5 (A, R=2): 2 A, 3 B, 0 A, 1 B, 4 C     q4: singleton class, excluded as a query
HAND_ORDER = {0: [1, 3, 2, 5, 4], 1: [0, 3, 2, 5, 4], 2: [5, 3, 0, 1, 4], 3: [0, 1, 2, 5, 4]}


def test_hand_computed_neighbours_with_ties():
    idx, sims = topk_neighbors(HAND_X, 5)
    for q, order in HAND_ORDER.items():
        assert idx[q].tolist() == order, q
    assert idx[5].tolist() == [2, 3, 0, 1, 4]
    # q3's first three neighbours are an exact three-way tie at cosine S
    assert sims[3, 0] == sims[3, 1] == sims[3, 2]
    assert sims[3, 0] == pytest.approx(S, abs=1e-6)
    assert (idx != np.arange(6)[:, None]).all()  # self never retrieved


def test_hand_computed_metrics():
    m = retrieval_metrics(HAND_X, HAND_Y, recall_ks=(1, 2, 4), knn_k=3)
    assert m["queries"] == 5 and m["excluded_singletons"] == 1
    assert m["classes"] == 3 and m["n"] == 6 and m["dim"] == 2
    # R@1: q2, q5 hit; R@2: also q1, q3 (q3 only because the tie goes to index 0 first)
    assert m["recall@1"] == pytest.approx(2 / 5)
    assert m["recall@2"] == pytest.approx(4 / 5)
    assert m["recall@4"] == pytest.approx(1.0)
    # mAP@R: q2 and q5 have R=2 with ranks (hit, miss) -> 1/2; every other AP is 0
    assert m["map@r"] == pytest.approx((0.5 + 0.5) / 5)
    # kNN k=3: q2 and q5 correct (A,B,A votes), q0 -> B, q1 -> A, q3 -> A: 2/5
    assert m["knn_acc"] == pytest.approx(2 / 5) and m["knn_k"] == 3


def test_knn_tie_breaking_rules():
    # k=2 on the hand set: q1 ties 1-1, A wins on summed similarity (1 vs S); q3 ties 1-1 with
    # equal sums: the nearest (index 0, class A) wins -> wrong. Correct: q2, q5 only.
    m = retrieval_metrics(HAND_X, HAND_Y, recall_ks=(1,), knn_k=2)
    assert m["knn_acc"] == pytest.approx(2 / 5)
    labels = torch.tensor([[1, 2, 2, 1], [1, 2, 2, 1], [3, 1, 2, 2]])
    sims = torch.tensor([[0.75, 0.5, 0.5, 0.25], [0.75, 0.625, 0.5, 0.125], [0.9, 0.8, 0.2, 0.2]])
    # row 0: 2-2 votes, sums 1.0/1.0 (exact) -> nearest (1); row 1: sums 0.875 vs 1.125 -> 2;
    # row 2: class 2 has the most votes even though 3 and 1 are nearer -> 2
    assert _knn_votes(labels, sims).tolist() == [1, 2, 2]


def test_singleton_class_and_clamped_k():
    # only the singleton changes between these two sets: metrics over the other queries stay
    m = retrieval_metrics(HAND_X, HAND_Y, recall_ks=(1, 100), knn_k=50)
    assert m["recall@100"] == 1.0  # K beyond the gallery is clamped to n-1
    assert m["knn_k"] == 5
    # every class a singleton: no queries, metrics None (not 0, not an exception)
    m = retrieval_metrics(HAND_X[:3], ["a", "b", "c"], recall_ks=(1,), knn_k=1)
    assert m["queries"] == 0 and m["excluded_singletons"] == 3
    assert m["recall@1"] is None and m["map@r"] is None and m["knn_acc"] is None


def test_compact_features_and_oversized_dimension():
    rng = np.random.default_rng(0)
    x = np.concatenate([HAND_X * 3.0, rng.normal(size=(6, 2)).astype(np.float32)], axis=1)
    c = compact_features(x, 2)
    assert c.shape == (6, 2)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, rtol=1e-6)
    res = evaluate_features(x, HAND_Y, recall_ks=(1, 2, 4), knn_k=3, compact_dims=[2])
    hand = retrieval_metrics(HAND_X, HAND_Y, recall_ks=(1, 2, 4), knn_k=3)
    for key in ("recall@1", "recall@2", "recall@4", "map@r", "knn_acc"):
        assert res["compact"]["2"][key] == pytest.approx(hand[key]), key
    assert res["full"]["dim"] == 4 and res["compact"]["2"]["dim"] == 2
    with pytest.raises(MetricsError, match="compact dimension 5 is larger than the feature size 4"):
        compact_features(x, 5)
    with pytest.raises(MetricsError, match="larger than the feature size 4"):
        evaluate_features(x, HAND_Y, compact_dims=[2, 5])
    skipped = evaluate_features(x, HAND_Y, compact_dims=[2, 5], skip_oversized=True)
    assert list(skipped["compact"]) == ["2"] and "5" in skipped["compact_skipped"]
    with pytest.raises(MetricsError, match="positive integer"):
        compact_features(x, 0)


def test_bad_inputs_name_the_row():
    x = HAND_X.copy()
    x[4] = np.nan
    with pytest.raises(MetricsError, match="row 4 is not finite"):
        retrieval_metrics(x, HAND_Y)
    x = HAND_X.copy()
    x[2] = 0
    with pytest.raises(MetricsError, match="row 2 has zero norm"):
        retrieval_metrics(x, HAND_Y)
    with pytest.raises(MetricsError, match="label of row 1 is missing"):
        retrieval_metrics(HAND_X, ["A", None, "A", "B", "C", "A"])
    with pytest.raises(MetricsError, match="6 feature rows but 5 labels"):
        retrieval_metrics(HAND_X, HAND_Y[:5])
    with pytest.raises(MetricsError, match="at least 2"):
        retrieval_metrics(HAND_X[:1], ["A"])


# --------------------------------------------------------------------------------------
# chunked == unchunked == an independent float64 brute force
# --------------------------------------------------------------------------------------


def _tied_set(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn from templates whose cosines are exact in any summation order (many ties)."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(8, dtype=np.float32)
    halves = np.zeros((24, 8), np.float32)
    halves[:, :4] = rng.choice([-0.5, 0.5], size=(24, 4))
    halves[:, 4:] = 0
    templates = np.concatenate([onehot, halves])
    x = templates[rng.integers(0, len(templates), n)]
    y = rng.integers(0, 9, n)
    y[-1] = 99  # a singleton class
    return x, y


def _reference(x: np.ndarray, y: np.ndarray, ks, knn_k: int) -> dict:
    """Brute force: full float64 matrix, stable argsort (ties by lower index), Python loops."""
    xn = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :-1]
    hits = {k: 0 for k in ks}
    aps, knn, q = [], 0, 0
    for i in range(len(x)):
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        q += 1
        rel = y[order[i]] == y[i]
        for k in ks:
            hits[k] += bool(rel[:k].any())
        aps.append(sum(rel[:j].sum() / j for j in range(1, r + 1) if rel[j - 1]) / r)
        nb = order[i][:knn_k]
        best = None
        for j, c in enumerate(y[nb]):
            votes = int((y[nb] == c).sum())
            ssum = float(sim[i, nb][y[nb] == c].sum())
            key = (votes, ssum, -j)
            if best is None or key > best[0]:
                best = (key, c)
        knn += best[1] == y[i]
    out = {f"recall@{k}": hits[k] / q for k in ks}
    out.update({"map@r": float(np.mean(aps)), "knn_acc": knn / q})
    return out, order


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_equals_unchunked_and_reference(seed):
    x, y = _tied_set(120, seed)
    ks = (1, 2, 4, 8)
    ref, order = _reference(x, y, ks, knn_k=5)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for chunk in (8, 48, 4096):
            idx, _ = topk_neighbors(x, 20, chunk_size=chunk, device=dev)
            np.testing.assert_array_equal(idx, order[:, :20], err_msg=f"{dev} chunk {chunk}")
            m = retrieval_metrics(x, y, ks, knn_k=5, chunk_size=chunk, device=dev)
            assert m["excluded_singletons"] == 1
            for key, v in ref.items():
                assert m[key] == pytest.approx(v, abs=1e-12), (dev, chunk, key)


def test_random_features_match_reference():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(12, 32))
    y = rng.integers(0, 12, 400)
    x = (centers[y] + 1.5 * rng.normal(size=(400, 32))).astype(np.float32)
    ref, _ = _reference(x, y, (1, 4), knn_k=10)
    a = retrieval_metrics(x, y, (1, 4), knn_k=10, chunk_size=4096)
    b = retrieval_metrics(x, y, (1, 4), knn_k=10, chunk_size=33)
    for key, v in ref.items():
        assert a[key] == pytest.approx(v, abs=1e-9) and b[key] == pytest.approx(v, abs=1e-9), key
    assert 0.2 < a["recall@1"] < 1.0  # a non-trivial set, not all-or-nothing
