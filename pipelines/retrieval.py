"""Retrieval metrics on unit vectors: Recall@K and mAP@R, kNN accuracy, compact features.

The eval stage embeds a labelled image set and hands the features and class labels here, so
everything in this module is a pure function of ``(features, labels)`` (and, for the
query/gallery protocol, each item's split) and testable without a model.

Protocols (``eval.protocol``; the published ones of Unicom's and Musgrave et al.'s evaluations)
------------------------------------------------------------------------------------------------
* ``all`` (Stanford Online Products, CUB-200-2011, Cars196): every item is a query; the gallery
  is every *other* item (the query itself is excluded).
* ``query_gallery`` (In-Shop Clothes): the items whose split is ``query`` search the items whose
  split is ``gallery``; the two sets are disjoint, nothing is excluded from the gallery, and
  items of any other split take no part (the eval stage counts them). A query's R is the
  number of gallery items of its class; a query whose class has no gallery item has no
  correct answer and is excluded like a singleton (counted in ``excluded_no_match``).

What follows holds for both:

* Similarity is the cosine: rows are L2-normalised here, then compared by dot product.
* **Ties** between gallery items with exactly the same similarity are broken by the lower
  gallery index (row order of the input; for ``query_gallery`` the order of the gallery
  items), so results are deterministic and independent of the chunk size or the device.
* **Recall@K**: share of queries with at least one same-class item among their K nearest.
* **mAP@R**: for a query with R items of its class in its gallery, the mean over the R ranks
  i ≤ R of precision@i · rel(i) (Musgrave, Belongie & Lim, "A Metric Learning Reality Check",
  2020).
* **kNN accuracy** (leave-one-out with ``all``, against the gallery with ``query_gallery``):
  the majority class among the k nearest neighbours; a tie in votes goes to the class with the larger summed similarity, and a tie in
  that to the class of the nearest neighbour among the tied classes.
* **Classes with one member** (``all``) have no correct answer: such queries are *excluded*
  from every metric (they would cap Recall at < 1 for any encoder) and counted in
  ``excluded_singletons``; they stay in the gallery as distractors for the other queries.

Memory: similarities are computed block by block (``chunk_size`` query rows × ``chunk_size``
gallery rows, 4 to at most 12 bytes per pair) with a running top-k, never the full query ×
gallery matrix. On a machine with CUDA the blocks run on the GPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from megaclass.core.errors import UserError

log = logging.getLogger(__name__)

_LOW32 = (1 << 32) - 1

PROTOCOLS = ("all", "query_gallery")
"""``eval.protocol`` values (EvalConfig.CHOICES repeats them; a test keeps the two equal)."""
QUERY, GALLERY = "query", "gallery"
"""The split values that make an item a query or a gallery item under ``query_gallery``."""


class MetricsError(UserError, ValueError):
    """Unusable features or labels for retrieval metrics (the message says which row/field)."""


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None → CUDA when present, else CPU; anything else is passed to torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Unit rows in float32; zero or non-finite rows are an error (their cosine is undefined)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise MetricsError(f"features must be a 2-D array (n, d), got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise MetricsError(f"feature row {int(np.flatnonzero(bad)[0])} is not finite")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    if (norms == 0).any():
        raise MetricsError(f"feature row {int(np.flatnonzero(norms == 0)[0])} has zero norm")
    return (x / norms[:, None]).astype(np.float32)


def compact_features(x: np.ndarray, d: int) -> np.ndarray:
    """The first ``d`` dimensions of every row, renormalised (Unicom's compact features)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise MetricsError(f"features must be a 2-D array (n, d), got shape {x.shape}")
    if not isinstance(d, (int, np.integer)) or d < 1:
        raise MetricsError(f"compact dimension must be a positive integer, got {d!r}")
    if d > x.shape[1]:
        raise MetricsError(
            f"compact dimension {d} is larger than the feature size {x.shape[1]}; "
            f"choose eval.compact_dims <= {x.shape[1]}"
        )
    return l2_normalize(x[:, :d])


def encode_labels(labels: Sequence[Hashable]) -> tuple[np.ndarray, list[Hashable]]:
    """Class labels (any hashables) → int64 ids in order of first appearance, and the names."""
    mapping: dict[Hashable, int] = {}
    ids = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        if lab is None or (isinstance(lab, float) and lab != lab):
            raise MetricsError(f"label of row {i} is missing (None/NaN)")
        ids[i] = mapping.setdefault(lab, len(mapping))
    return ids, list(mapping)


# --------------------------------------------------------------------------------------
# chunked nearest neighbours with deterministic ties
# --------------------------------------------------------------------------------------


def _sort_keys(sims: torch.Tensor, gallery_idx: torch.Tensor) -> torch.Tensor:
    """int64 keys that order (similarity desc, gallery index asc) by plain integer order.

    The float32 similarity becomes an order-preserving int32 (flip the magnitude bits of
    negatives) in the high half; ``2^32-1-index`` fills the low half, so the larger key is the
    more similar item and, on an exact tie, the one with the lower index.
    """
    bits = (sims + 0.0).contiguous().view(torch.int32)  # + 0.0 folds -0.0 into +0.0
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return mono * (1 << 32) + (_LOW32 - gallery_idx)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = torch.div(keys, 1 << 32, rounding_mode="floor")
    idx = _LOW32 - (keys - hi * (1 << 32))
    mono = hi.to(torch.int32)
    bits = torch.where(mono < 0, mono ^ 0x7FFFFFFF, mono)
    return idx, bits.view(torch.float32)


def _block_topk_keys(sims: torch.Tensor, g0: int, k: int) -> torch.Tensor:
    """Sort keys of the k best columns of one block, exact under ties.

    A float top-(k+1) finds the candidates cheaply; a row whose k-th and (k+1)-th values are
    equal has a tie across the cut, where the float top-k's choice among equal values is
    arbitrary, so only such rows are redone with integer keys over the whole block.
    """
    g = sims.shape[1]
    if k >= g:
        cols = torch.arange(g0, g0 + g, device=sims.device, dtype=torch.int64)
        return _sort_keys(sims, cols.expand_as(sims))
    vals, idx = torch.topk(sims, k + 1, dim=1, sorted=True)
    keys = _sort_keys(vals[:, :k].contiguous(), idx[:, :k] + g0)
    tied = vals[:, k - 1] == vals[:, k]
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        cols = torch.arange(g0, g0 + g, device=sims.device, dtype=torch.int64)
        full = _sort_keys(sims[rows], cols.expand(len(rows), g))
        keys[rows] = torch.topk(full, k, dim=1, sorted=False).values
    return keys


def _iter_topk(
    q: torch.Tensor, g: torch.Tensor, k: int, chunk_size: int, exclude_self: bool
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The one blockwise top-k behind both protocols (``exclude_self``: ``q`` is ``g``).

    Why one loop: the exact tie rule and the memory bound are subtle enough to exist once;
    the leave-one-out protocol differs only in masking the diagonal.
    """
    nq, ng = q.shape[0], g.shape[0]
    available = ng - 1 if exclude_self else ng
    if not 1 <= k <= available:
        raise MetricsError(f"k={k} neighbours requested but the gallery has {available} items")
    if chunk_size < 1:
        raise MetricsError(f"chunk_size must be >= 1, got {chunk_size}")
    dev = q.device
    q_rows = max(1, min(chunk_size, chunk_size * chunk_size // (chunk_size + 2 * k)))
    for s in range(0, nq, q_rows):
        e = min(nq, s + q_rows)
        qb = q[s:e]
        rows = torch.arange(e - s, device=dev)
        best: torch.Tensor | None = None
        for g0 in range(0, ng, chunk_size):
            g1 = min(ng, g0 + chunk_size)
            sims = qb @ g[g0:g1].T
            if exclude_self:
                # query row s+r sits at gallery column s+r-g0 when inside this block
                cols = rows + (s - g0)
                inside = (cols >= 0) & (cols < g1 - g0)
                if inside.any():
                    sims[rows[inside], cols[inside]] = float("-inf")
            top = _block_topk_keys(sims, g0, k)
            if best is not None:
                top = torch.cat([best, top], dim=1)
            best = torch.topk(top, min(k, top.shape[1]), dim=1, sorted=True).values
        assert best is not None
        idx, sims = _decode_keys(best)
        yield s, idx, sims


def iter_topk(
    x: torch.Tensor, k: int, chunk_size: int = 4096
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """For consecutive query blocks of the unit rows ``x``: ``(start, idx (q,k), sims (q,k))``.

    The neighbours of row i are the other rows (i itself is excluded), sorted by similarity
    descending, ties by lower index. ``k`` must be ≤ n - 1. Peak memory per block is about
    ``chunk_size² · 12`` bytes (4 when no row has a tie across its top-k cut) plus ``q · k · 16`` for the running top-k; the query block
    shrinks when k is large so the two stay within the same bound.
    """
    return _iter_topk(x, x, k, chunk_size, exclude_self=True)


def iter_topk_gallery(
    q: torch.Tensor, g: torch.Tensor, k: int, chunk_size: int = 4096
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Like :func:`iter_topk` for queries ``q`` against a separate gallery ``g`` (unit rows).

    ``idx`` indexes rows of ``g``; nothing is excluded (the sets are disjoint), so ``k`` may be
    up to the gallery size. Same tie rule and memory bound as :func:`iter_topk`.
    """
    if q.shape[1] != g.shape[1]:
        raise MetricsError(f"queries have {q.shape[1]} dimensions but the gallery {g.shape[1]}")
    return _iter_topk(q, g, k, chunk_size, exclude_self=False)


def topk_neighbors(
    x: np.ndarray,
    k: int,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    gallery: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (n, k) int64 and cosines (n, k) float32 of every row's k nearest other rows.

    With ``gallery``: the k nearest rows of ``gallery`` for every row of ``x`` instead.
    """
    dev = resolve_device(device)
    xt = torch.from_numpy(l2_normalize(x)).to(dev)
    if gallery is None:
        it = iter_topk(xt, k, chunk_size)
    else:
        it = iter_topk_gallery(xt, torch.from_numpy(l2_normalize(gallery)).to(dev), k, chunk_size)
    idx_parts, sim_parts = [], []
    for _, idx, sims in it:
        idx_parts.append(idx.cpu().numpy())
        sim_parts.append(sims.cpu().numpy())
    return np.concatenate(idx_parts), np.concatenate(sim_parts)


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------


def _knn_votes(nb_labels: torch.Tensor, nb_sims: torch.Tensor) -> torch.Tensor:
    """Predicted class per row: most votes, then larger summed similarity, then nearest."""
    eq = nb_labels[:, :, None] == nb_labels[:, None, :]  # (q, k, k): same class as position j
    votes = eq.sum(-1)
    simsum = (eq * nb_sims.double()[:, None, :]).sum(-1)
    top_votes = votes == votes.max(dim=1, keepdim=True).values
    simsum = torch.where(top_votes, simsum, torch.full_like(simsum, float("-inf")))
    winner = simsum == simsum.max(dim=1, keepdim=True).values
    first = winner.to(torch.int8).argmax(dim=1)  # first True = nearest among the tied
    return nb_labels.gather(1, first[:, None])[:, 0]


def _check_ks(recall_ks: Sequence[int], knn_k: int) -> list[int]:
    if not recall_ks or any(int(k) < 1 for k in recall_ks):
        raise MetricsError(f"recall_ks must be positive integers, got {list(recall_ks)}")
    if knn_k < 1:
        raise MetricsError(f"knn_k must be >= 1, got {knn_k}")
    return sorted({int(k) for k in recall_ks})


def _accumulate(
    topk: Iterator[tuple[int, torch.Tensor, torch.Tensor]],
    y_query: torch.Tensor,
    y_gallery: torch.Tensor,
    r_query: torch.Tensor,
    ks: list[int],
    k_max: int,
    k_knn: int,
) -> tuple[dict[int, int], float, int]:
    """Recall hits per K, the summed AP@R and kNN hits over the valid queries (R ≥ 1).

    Shared by both protocols: they differ only in who the neighbours are (``topk``) and in
    each query's R, both decided by the caller.
    """
    dev = y_query.device
    hits = {k: 0 for k in ks}
    ap_sum = 0.0
    knn_hits = 0
    pos = torch.arange(1, k_max + 1, device=dev, dtype=torch.float64)
    for s, idx, sims in topk:
        e = s + idx.shape[0]
        yq = y_query[s:e]
        valid = r_query[s:e] >= 1
        same = y_gallery[idx] == yq[:, None]
        for k in ks:
            hits[k] += int((same[:, : min(k, k_max)].any(dim=1) & valid).sum())
        r = r_query[s:e].clamp(min=1)
        rel = same & (pos[None, :] <= r[:, None])
        prec = rel.cumsum(dim=1).double() / pos[None, :]
        ap = (prec * rel).sum(dim=1) / r.double()
        ap_sum += float(ap[valid].sum())
        pred = _knn_votes(y_gallery[idx[:, :k_knn]], sims[:, :k_knn])
        knn_hits += int(((pred == yq) & valid).sum())
    return hits, ap_sum, knn_hits


def _metric_values(
    out: dict[str, Any], ks: list[int], q: int, acc: tuple[dict[int, int], float, int]
) -> None:
    hits, ap_sum, knn_hits = acc
    for k in ks:
        out[f"recall@{k}"] = hits[k] / q if q else None
    out["map@r"] = ap_sum / q if q else None
    out["knn_acc"] = knn_hits / q if q else None


def retrieval_metrics(
    x: np.ndarray,
    labels: Sequence[Hashable] | np.ndarray,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    knn_k: int = 10,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Recall@K, mAP@R and kNN accuracy of features ``x`` (n, d) with class ``labels`` (n,).

    The ``all`` protocol: every item queries all the others. Returns a flat dict:
    ``recall@K`` for each K, ``map@r``, ``knn_acc`` (with ``knn_k`` used), ``protocol``, and
    the counts ``n``, ``dim``, ``classes``, ``queries``, ``excluded_singletons``. Metric values
    are None when no class has two members. K and k larger than the gallery (n - 1) are
    clamped to it (``recall@K`` keeps the requested K as its key).
    """
    t0 = time.perf_counter()
    xn = l2_normalize(x)
    n, d = xn.shape
    if len(labels) != n:
        raise MetricsError(f"{n} feature rows but {len(labels)} labels")
    if n < 2:
        raise MetricsError(f"retrieval needs at least 2 items, got {n}")
    ks = _check_ks(recall_ks, knn_k)
    ids, names = encode_labels(list(labels))
    counts = np.bincount(ids)
    r_all = counts[ids] - 1  # other items of the same class
    k_knn = min(knn_k, n - 1)
    k_max = min(n - 1, max(max(ks), k_knn, int(r_all.max())))

    dev = resolve_device(device)
    xt = torch.from_numpy(xn).to(dev)
    y = torch.from_numpy(ids).to(dev)
    acc = _accumulate(
        iter_topk(xt, k_max, chunk_size), y, y, torch.from_numpy(r_all).to(dev), ks, k_max, k_knn
    )
    q = int((r_all >= 1).sum())
    out: dict[str, Any] = {
        "protocol": "all",
        "n": int(n),
        "dim": int(d),
        "classes": len(names),
        "queries": q,
        "excluded_singletons": int(n - q),
    }
    _metric_values(out, ks, q, acc)
    out["knn_k"] = int(k_knn)
    out["seconds"] = round(time.perf_counter() - t0, 4)
    if not q:
        log.warning("retrieval metrics: no class has two members; every metric is None")
    return out


def query_gallery_metrics(
    xq: np.ndarray,
    labels_q: Sequence[Hashable] | np.ndarray,
    xg: np.ndarray,
    labels_g: Sequence[Hashable] | np.ndarray,
    recall_ks: Sequence[int] = (1, 10, 20, 30, 40, 50),
    knn_k: int = 10,
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The ``query_gallery`` protocol: queries ``xq`` (nq, d) search the gallery ``xg`` (ng, d).

    Same metrics and tie rule as :func:`retrieval_metrics`; a query's R is the number of
    gallery items of its class. Returns the same keys with ``queries`` (the queries that
    count), ``query_items`` (all of them), ``gallery``, ``excluded_no_match`` (queries whose
    class has no gallery item) instead of ``excluded_singletons``; ``n`` is nq + ng and
    ``classes`` counts the classes of both sets. K and k beyond the gallery are clamped.
    """
    t0 = time.perf_counter()
    qn, gn = l2_normalize(xq), l2_normalize(xg)
    nq, ng = qn.shape[0], gn.shape[0]
    if len(labels_q) != nq:
        raise MetricsError(f"{nq} query feature rows but {len(labels_q)} query labels")
    if len(labels_g) != ng:
        raise MetricsError(f"{ng} gallery feature rows but {len(labels_g)} gallery labels")
    if nq < 1 or ng < 1:
        raise MetricsError(f"retrieval needs at least 1 query and 1 gallery item, got {nq}, {ng}")
    if qn.shape[1] != gn.shape[1]:
        raise MetricsError(f"queries have {qn.shape[1]} dimensions but the gallery {gn.shape[1]}")
    ks = _check_ks(recall_ks, knn_k)
    ids, names = encode_labels(list(labels_q) + list(labels_g))
    ids_q, ids_g = ids[:nq], ids[nq:]
    r_q = np.bincount(ids_g, minlength=len(names))[ids_q]  # gallery items of the query's class
    k_knn = min(knn_k, ng)
    k_max = min(ng, max(max(ks), k_knn, int(r_q.max())))

    dev = resolve_device(device)
    qt = torch.from_numpy(qn).to(dev)
    gt = torch.from_numpy(gn).to(dev)
    acc = _accumulate(
        iter_topk_gallery(qt, gt, k_max, chunk_size),
        torch.from_numpy(ids_q).to(dev),
        torch.from_numpy(ids_g).to(dev),
        torch.from_numpy(r_q).to(dev),
        ks,
        k_max,
        k_knn,
    )
    q = int((r_q >= 1).sum())
    out: dict[str, Any] = {
        "protocol": "query_gallery",
        "n": int(nq + ng),
        "dim": int(qn.shape[1]),
        "classes": len(names),
        "queries": q,
        "query_items": int(nq),
        "gallery": int(ng),
        "excluded_no_match": int(nq - q),
    }
    _metric_values(out, ks, q, acc)
    out["knn_k"] = int(k_knn)
    out["seconds"] = round(time.perf_counter() - t0, 4)
    if not q:
        log.warning("retrieval metrics: no query has a gallery item of its class; metrics None")
    return out


def split_query_gallery(splits: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Row indices of the queries and of the gallery, and the count of every other split value.

    The other rows take no part in ``query_gallery``; the caller reports their counts so that
    nothing leaves the evaluation unseen (e.g. In-Shop's ``train`` images in the eval shards).
    """
    arr = np.asarray([str(v) for v in splits], dtype=object)
    q_idx = np.flatnonzero(arr == QUERY)
    g_idx = np.flatnonzero(arr == GALLERY)
    others: dict[str, int] = {}
    for v in arr[(arr != QUERY) & (arr != GALLERY)]:
        others[v] = others.get(v, 0) + 1
    return q_idx, g_idx, dict(sorted(others.items()))


def evaluate_features(
    x: np.ndarray,
    labels: Sequence[Hashable] | np.ndarray,
    recall_ks: Sequence[int] = (1, 2, 4, 8),
    knn_k: int = 10,
    compact_dims: Sequence[int] = (),
    chunk_size: int = 4096,
    device: str | torch.device | None = None,
    skip_oversized: bool = False,
    protocol: str = "all",
    splits: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics on the full features and on the first d dimensions for each d in ``compact_dims``.

    Returns ``{"full": metrics, "compact": {"<d>": metrics, …}, "compact_skipped": {…}}``.
    A d larger than the feature size raises :class:`MetricsError`, unless ``skip_oversized``
    (the eval stage compares encoders of different widths), which records it under
    ``compact_skipped`` with the reason instead. ``protocol`` is one of :data:`PROTOCOLS`;
    ``query_gallery`` needs ``splits`` (one split value per row, see
    :func:`split_query_gallery`).
    """
    x = np.asarray(x)
    if protocol not in PROTOCOLS:
        raise MetricsError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "query_gallery":
        if splits is None or len(splits) != len(x):
            got = "none" if splits is None else len(splits)
            raise MetricsError(
                f"protocol 'query_gallery' needs one split per row: {len(x)} rows, {got} splits"
            )
        q_idx, g_idx, others = split_query_gallery(splits)
        if not len(q_idx) or not len(g_idx):
            raise MetricsError(
                f"protocol 'query_gallery' needs rows with split '{QUERY}' and rows with split "
                f"'{GALLERY}'; found {len(q_idx)} and {len(g_idx)} (other splits: {others or 'none'})"
            )
        lab = list(labels)  # any hashables, tuples too: no numpy fancy indexing on them
        lab_q, lab_g = [lab[i] for i in q_idx], [lab[i] for i in g_idx]

        def metrics(f: np.ndarray) -> dict[str, Any]:
            return query_gallery_metrics(
                f[q_idx], lab_q, f[g_idx], lab_g, recall_ks, knn_k, chunk_size, device
            )
    else:

        def metrics(f: np.ndarray) -> dict[str, Any]:
            return retrieval_metrics(f, labels, recall_ks, knn_k, chunk_size, device)

    out: dict[str, Any] = {"full": metrics(x), "compact": {}, "compact_skipped": {}}
    for d in sorted({int(v) for v in compact_dims}):
        if skip_oversized and d > x.shape[1]:
            out["compact_skipped"][str(d)] = f"larger than the feature size {x.shape[1]}"
            continue
        out["compact"][str(d)] = metrics(compact_features(x, d))
    return out
