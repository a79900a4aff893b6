"""Classification probes on frozen features, as MLCD reports them: kNN and a linear probe.

``eval.protocol=classification`` (see :mod:`megaclass.pipelines.eval`) reads shards whose json
``split`` says ``train`` / ``val`` / ``test`` (``megaclass data imagefolder`` writes the top
folder name), embeds them once per encoder and runs each probe in ``eval.probes``:

* ``knn`` — weighted k-nearest-neighbour vote (Wu et al. 2018, as in DINO): the k most similar
  train images (cosine) vote for their class with weight ``exp(cos / T)``; the class with the
  largest summed weight wins (ties: the lower class index). k = ``eval.probe_knn_k`` (20),
  T = ``eval.probe_temperature`` (0.07). Train images are train ∪ val.
* ``linear`` — multinomial logistic regression on the frozen (unit) features: minimise
  ``mean cross-entropy + λ/2·‖W‖²`` (bias not regularised) with full-batch L-BFGS in float64.
  λ is chosen on a validation split from ``eval.probe_l2`` (the best validation accuracy; ties
  go to the larger λ), then the probe is refitted on train ∪ val with that λ.

Splits: ``train``/``training`` train; ``val``/``valid``/``validation`` validate;
``test``/``testing`` are scored. Without a test split the validation split is scored instead
(ImageNet's ``train/`` + ``val/``) and, like when there is no val split at all, the validation
split for λ is carved from train: ``eval.probe_val_fraction`` of it, drawn with
``numpy.random.default_rng(seed)`` (the run's seed), so the choice is reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from megaclass.core.errors import UserError
from megaclass.pipelines.retrieval import encode_labels, iter_topk_gallery, l2_normalize

log = logging.getLogger(__name__)

CLASSIFICATION = "classification"
"""The ``eval.protocol`` value that runs these probes instead of retrieval."""
PROBES = ("knn", "linear")
"""The probes ``eval.probes`` may list (validated by pipelines/config.py, naming the key)."""
TRAIN_SPLITS = ("train", "training")
VAL_SPLITS = ("val", "valid", "validation")
TEST_SPLITS = ("test", "testing")


class ProbeError(UserError, ValueError):
    """The shards cannot be probed (no train split, nothing to score, one class only)."""


# --------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------


def probe_splits(
    splits: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Row indices (fit, val, test) and a note of where each came from.

    ``fit`` ∪ ``val`` is what the final probe (and kNN) learns from; ``val`` picks λ.
    """
    s = np.asarray([str(x).lower() for x in splits])
    tr = np.flatnonzero(np.isin(s, TRAIN_SPLITS))
    va = np.flatnonzero(np.isin(s, VAL_SPLITS))
    te = np.flatnonzero(np.isin(s, TEST_SPLITS))
    if not len(tr):
        raise ProbeError(
            "eval.protocol=classification needs samples whose json 'split' is 'train' "
            f"(found splits {sorted(set(s.tolist()))}); convert a DIR/train/<class>/… tree "
            "with `megaclass data imagefolder`"
        )
    note: dict[str, Any] = {"test_split": "test", "val_split": "val"}
    if not len(te):
        if not len(va):
            raise ProbeError(
                "eval.protocol=classification needs a 'test' or 'val' split to score "
                f"(found {sorted(set(s.tolist()))})"
            )
        te, va = va, np.zeros(0, np.int64)
        note["test_split"] = "val"
    if not len(va):
        if not 0.0 < val_fraction < 1.0:
            raise ProbeError(f"eval.probe_val_fraction must be in (0, 1), got {val_fraction}")
        perm = np.random.default_rng(seed).permutation(len(tr))
        n_val = max(1, int(round(val_fraction * len(tr))))
        va, tr = np.sort(tr[perm[:n_val]]), np.sort(tr[perm[n_val:]])
        note["val_split"] = f"carved from train ({n_val} of {n_val + len(tr)}, seed {seed})"
    return tr, va, te, note


# --------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------


def knn_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 4096,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predicted class index per test row: temperature-weighted votes of the k nearest
    train rows by cosine (blockwise, never the full test × train matrix)."""
    if temperature <= 0:
        raise ProbeError(f"eval.probe_temperature must be > 0, got {temperature}")
    dev = torch.device(device)
    k = min(k, len(train_x))
    g = torch.from_numpy(l2_normalize(train_x)).to(dev)
    q = torch.from_numpy(l2_normalize(test_x)).to(dev)
    y = torch.from_numpy(np.asarray(train_y, np.int64)).to(dev)
    out = np.empty(len(test_x), np.int64)
    for s, idx, sims in iter_topk_gallery(q, g, k, chunk_size):
        w = torch.exp(sims.double() / temperature)
        votes = torch.zeros(idx.shape[0], num_classes, dtype=torch.float64, device=dev)
        votes.scatter_add_(1, y[idx], w)
        out[s : s + idx.shape[0]] = votes.argmax(dim=1).cpu().numpy()  # first max: lower class
    return out


# --------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------


def logreg_loss(
    w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, l2: float
) -> torch.Tensor:
    """mean cross-entropy + l2/2·‖w‖² (the probe's objective; bias unregularised)."""
    logits = x @ w + b
    return torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * (w * w).sum()


def fit_logreg(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    l2: float,
    max_iter: int = 500,
    tol: float = 1e-8,
    device: torch.device | str = "cpu",
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (d, C), b (C,)) minimising :func:`logreg_loss` by full-batch L-BFGS in float64.

    The objective is strictly convex for l2 > 0, so the result does not depend on the start
    (zeros, or ``init``: the solution of a neighbouring λ, which saves most iterations when
    sweeping λ) beyond the tolerance; no randomness is involved.
    """
    dev = torch.device(device)
    xt = torch.from_numpy(np.asarray(x, np.float64)).to(dev)
    yt = torch.from_numpy(np.asarray(y, np.int64)).to(dev)
    if init is None:
        w0 = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=dev)
        b0 = torch.zeros(num_classes, dtype=torch.float64, device=dev)
    else:
        w0, b0 = (t.to(dev, torch.float64) for t in init)
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-2,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logreg_loss(w, b, xt, yt, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def logreg_predict(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(np.asarray(x, np.float64)).to(w.device)
    return (xt @ w + b).argmax(dim=1).cpu().numpy()


def linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    fit_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float],
    device: torch.device | str = "cpu",
    tol: float = 1e-6,
) -> dict[str, Any]:
    """Choose λ on (fit → val), refit on fit ∪ val, score test. ``tol``: L-BFGS's gradient
    tolerance (max |∂loss|); 1e-6 moves no prediction that matters and keeps the weakly
    regularised fits of a sweep affordable."""
    if not l2_grid or any(v <= 0 for v in l2_grid):
        raise ProbeError(f"eval.probe_l2 must list values > 0, got {list(l2_grid)}")
    val_acc: dict[str, float] = {}
    best, best_acc, best_wb = None, -1.0, None
    prev = None
    for lam in sorted(l2_grid, reverse=True):  # strongest first: ties keep the larger λ
        # warm start from the previous (stronger) λ: the path is smooth, L-BFGS needs far
        # fewer iterations than from zero, and the optimum is the same (convex objective)
        prev = fit_logreg(
            x[fit_idx], y[fit_idx], num_classes, lam, tol=tol, device=device, init=prev
        )
        acc = float((logreg_predict(*prev, x[val_idx]) == y[val_idx]).mean())
        val_acc[f"{lam:g}"] = acc
        if acc > best_acc:
            best, best_acc, best_wb = lam, acc, prev
    all_idx = np.sort(np.concatenate([fit_idx, val_idx]))
    w, b = fit_logreg(
        x[all_idx], y[all_idx], num_classes, float(best), tol=tol, device=device, init=best_wb
    )
    pred = logreg_predict(w, b, x[test_idx])
    return {
        "top1": float((pred == y[test_idx]).mean()),
        "l2": best,
        "val_top1": val_acc,
    }


# --------------------------------------------------------------------------------------
# both, for one encoder
# --------------------------------------------------------------------------------------


def run_probes(
    x: np.ndarray,
    classes: Sequence[str],
    splits: Sequence[str],
    probes: Sequence[str],
    *,
    knn_k: int = 20,
    temperature: float = 0.07,
    l2_grid: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
    val_fraction: float = 0.1,
    seed: int = 0,
    chunk_size: int = 4096,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1 accuracy of each probe on the test split (classes absent from train count as
    errors: no probe can predict them)."""
    for p in probes:
        if p not in PROBES:
            raise ProbeError(f"eval.probes: {p!r} is not one of {', '.join(PROBES)}")
    fit_idx, val_idx, test_idx, note = probe_splits(splits, val_fraction, seed)
    learn = np.sort(np.concatenate([fit_idx, val_idx]))
    y_all, names = encode_labels(list(classes))
    y_all = np.asarray(y_all, np.int64)
    n_cls = len(names)
    x = l2_normalize(np.asarray(x, np.float32))
    unseen = int((~np.isin(y_all[test_idx], np.unique(y_all[learn]))).sum())
    out: dict[str, Any] = {
        "n_train": int(len(learn)),
        "n_val": int(len(val_idx)),
        "n_test": int(len(test_idx)),
        "classes": n_cls,
        "test_unseen_class": unseen,
        **note,
    }
    if "knn" in probes:
        t0 = time.perf_counter()
        pred = knn_predict(
            x[learn], y_all[learn], x[test_idx], n_cls, knn_k, temperature, chunk_size, device
        )
        out["knn"] = {
            "top1": float((pred == y_all[test_idx]).mean()),
            "k": int(knn_k),
            "temperature": float(temperature),
            "seconds": round(time.perf_counter() - t0, 3),
        }
    if "linear" in probes:
        t0 = time.perf_counter()
        res = linear_probe(x, y_all, fit_idx, val_idx, test_idx, n_cls, l2_grid, device)
        out["linear"] = {**res, "seconds": round(time.perf_counter() - t0, 3)}
    return out
