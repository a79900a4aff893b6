"""Does it work? A small Unicom/MLCD reproduction on real clip-art, with ablations.

Claim under test (Unicom, ICLR 2023; MLCD, ECCV 2024): an encoder trained with a margin softmax
on *pseudo-classes* obtained by clustering a teacher's features retrieves *unseen* classes
better than the teacher's own features; several labels per image (MLCD) help; sampling ~10 %
of the classes is as good as or better than using all of them.

Setting (everything real, everything offline, sized for a 2-core CPU in < 45 min):

1. data: ``megaclass.data.builders.build_dataset("openclipart")`` — Debian openclipart-png,
   class = category folder, a seeded share of the categories held out (``eval`` shards); the
   rest (``train`` shards) is the "seen" part. Captions come from the folder/file names.
2. teacher: ``load_teacher("efficientnet-lite0", "minilm")`` (ImageNet EfficientNet-Lite0,
   1280-d pooled features; MiniLM-L6 on the captions, 384-d). The fused feature is
   ``megaclass.data.embeddings.fuse(..., "mean")`` (the dims differ, so it is the concatenation
   of the two unit vectors divided by √2).
3. pseudo-classes: the seen part's teacher features are clustered into K classes with
   ``megaclass.clustering.kmeans.train_kmeans`` (faiss backend) and every image gets its
   top-l nearest centroids with ``megaclass.clustering.search.CentroidSearcher``.
4. student, *initialised from the teacher*: the same EfficientNet-Lite0 weights. The early
   trunk (stem + blocks ``< train_from``) is frozen and its activations are computed once per
   image (the pass that also yields the teacher vector, checked equal to
   ``Teacher.encode_images``) and cached, together with a horizontally flipped view of every
   image. Each ablation row then trains only: blocks ``>= train_from`` (with their BN), the
   1×1 head conv + BN, a linear projection 1280→D (initialised to the teacher's centred PCA,
   so the untrained student *is* the PCA-D teacher; or, in the LDA row, to the closed-form
   LDA map of the pseudo-classes) and the PartialFC head
   (``megaclass.training.heads.PartialFC``, centres initialised to the pseudo-class means of
   the initial embeddings). The defaults (chosen on a validation split of the *seen*
   categories, ``--dev-split 0.3``; BENCHMARKS.md): the whole set, ``train_from=14`` (the last
   two MBConv blocks are trained, a "head only" row trains none), 12 epochs, D = 512. Nothing
   else of the pipeline is bypassed: the heads, margins, sampling and losses are the library's.
5. evaluation: Recall@1 and mAP@R (SOP protocol, ``megaclass.pipelines.retrieval``) on the
   held-out categories, for the teacher (raw 1280-d, PCA-d, and "teacher + LDA": a closed-form
   linear map fitted to the base row's pseudo-classes) and each student row. Seed s of a
   repeated row also draws category split s (0 = the builder's), and every student is
   compared with the teacher *on its own split* (paired Δ), since which categories are unseen
   moves R@1 by ±0.1 while training moves it by ±0.01.

Run ``python benchmarks/quality.py --help``; the run recorded in BENCHMARKS.md is
``python benchmarks/quality.py --threads 2`` (defaults). ``--max-per-class 40 --train-from 16
--epochs 4 --dim 128 --no-vary-split`` is the first, smaller table; ``--dev-split 0.3 --rows
...`` tunes on seen categories only; ``--rerender RESULTS.json`` re-summarises a saved run;
``--quick`` is the smoke run (also a test).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

log = logging.getLogger("megaclass.benchmarks.quality")

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------


@dataclass
class QualityConfig:
    """Everything that decides the numbers (written next to the results)."""

    work: str = "/tmp/megaclass-quality"
    """Scratch folder: built shards and the activation cache (reused when the inputs match)."""
    data_seed: int = 0
    """Seed of the dataset build (which categories are held out)."""
    held_out_fraction: float = 0.3
    """Share of the categories held out as unseen (evaluation only)."""
    max_per_class: int | None = None
    """Images per category (the builder takes the first N files in name order); ``None`` (the
    default, ``none`` on the command line) = every image of every category with >=
    ``min_per_class`` images: the whole set, ≈7.5k images. The first table in BENCHMARKS.md
    used 40 (≈3k images)."""
    min_per_class: int = 20
    image_size: int = 128
    """Teacher and student input size (resize shorter side + centre crop, the teacher's own
    transform)."""
    train_from: int = 14
    """First EfficientNet-Lite0 block (of 16) that is trained; earlier blocks are frozen and
    their output cached (a row may start later, never earlier). 14 = the last two MBConv
    blocks + the head conv, projection and classifier (chosen on the validation split); 16 =
    no MBConv block. When < 16 the table gains a "head only" row."""
    flip_view: bool = True
    """Cache a horizontally flipped copy of every image (the only augmentation; used for the
    training part, whichever categories that is)."""
    epochs: int = 12
    batch_size: int = 128
    lr: float = 3e-4
    """AdamW learning rate of the projection; the trained trunk blocks use ``lr * lr_trunk``."""
    lr_trunk: float = 0.3
    weight_decay: float = 0.05
    head_lr: float = 0.05
    """SGD (momentum 0.9) learning rate of the PartialFC centres (row-sparse optimizer)."""
    scale: float = 32.0
    """Logit scale s (Unicom's fine-tuning scripts use 32)."""
    margin_m: float = 0.3
    """ArcFace m (Unicom pretraining 0.3); CosFace rows use 0.35."""
    kmeans_niter: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the repeated ('main') rows: k-means init, head init, sampling, batch order and,
    with ``vary_split``, the category split."""
    vary_split: bool = True
    """Seed s also draws its own seen/unseen category split (s = 0: the builder's split; s > 0:
    ``held_out_fraction`` of all categories drawn with that seed), so a repeated row's spread
    includes which categories are unseen, and student and teacher are compared per split
    (paired Δ). Rows that run once use split 0. False: every seed uses the builder's split."""
    threads: int = 1
    device: str = "cpu"
    quick: bool = False
    """Tiny smoke version (few images, small K, 1 epoch): checks the machinery only."""
    dev_split: float = 0.0
    """Tuning mode: when > 0, this share of the *seen* categories is held out as a validation
    gallery (seeded by ``dev_seed``) and every number is measured there; the unseen categories
    are not touched. The defaults were chosen in this mode (BENCHMARKS.md)."""
    dev_seed: int = 123
    dim: int = 512
    """Embedding size D of the base row (and of every row that does not change it)."""


@dataclass(frozen=True)
class Row:
    """One ablation row: how pseudo-classes are made and how the student is trained."""

    name: str
    k: int = 256
    sample_rate: float = 0.1
    feature_rate: float = 1.0
    margin: str = "arcface"
    objective: str = "pfc"
    """pfc: margin softmax on the top-1 pseudo-class; mlcd: top-``labels`` multi-label loss."""
    labels: int = 1
    feature: str = "mean"
    """Teacher feature that is clustered: 'mean' (fused image+text) or 'image'."""
    dim: int = 128
    epochs: int | None = None
    train_from: int | None = None
    init: str = "pca"
    """Projection 1280→D at the start: 'pca' (the teacher's centred PCA: the untrained student
    is teacher PCA-D) or 'lda' (the closed-form LDA map fitted to this row's top-1
    pseudo-classes: the untrained student is the "teacher + LDA" reference)."""
    repeat: bool = False
    """A 'main' row: run for every seed (others: first seed only)."""


BASE = Row("base: K=256 r=0.1 f=1 arcface pfc fused D=128", repeat=True)


def default_rows(cfg: QualityConfig | None = None) -> list[Row]:
    """The ablation table: each row changes one thing relative to the base row (``BASE`` at
    ``cfg.dim``). Repeated rows run for every seed (and, with ``vary_split``, every category
    split); the others once. When blocks are trained (``train_from < 16``) a "head only" row
    is added."""
    cfg = cfg or QualityConfig()
    base = replace(BASE, dim=cfg.dim, name=BASE.name.replace("D=128", f"D={cfg.dim}"))
    once = {"repeat": False}
    rows = [
        base,
        replace(base, name="objective MLCD top-8", objective="mlcd", labels=8),
        replace(base, name="image-only clusters", feature="image"),
        replace(base, name="projection initialised by LDA", init="lda"),
        replace(base, name="K=64", k=64, **once),
        replace(base, name="K=1024", k=1024, **once),
        replace(base, name="r=1.0 (all classes)", sample_rate=1.0, **once),
        replace(base, name="f=0.5 (feature sampling)", feature_rate=0.5, **once),
        replace(base, name="margin CosFace", margin="cosface", **once),
    ]
    if cfg.dim > 128:  # compact: trained at 128 (the base row also reports its first d dims)
        rows.append(replace(base, name="D=128", dim=128, **once))
    if cfg.train_from < 16:
        rows.append(replace(base, name="head only (no MBConv block trained)", train_from=16))
    return rows


def quick_rows() -> list[Row]:
    base = Row("base", k=8, dim=16, repeat=True)
    return [
        base,
        replace(base, name="mlcd", objective="mlcd", labels=3, feature="image", repeat=False),
        replace(
            base,
            name="r=0.5 f=0.5 cosface",
            sample_rate=0.5,
            feature_rate=0.5,
            margin="cosface",
            repeat=False,
        ),
    ]


# --------------------------------------------------------------------------------------
# data + teacher + frozen trunk cache
# --------------------------------------------------------------------------------------


@dataclass
class Cache:
    """Per image: the frozen trunk's output (float32), teacher vectors, class and split."""

    files: list[str]
    classes: list[str]
    split: np.ndarray  # 0 = seen (train shards), 1 = unseen (eval shards)
    act: np.ndarray  # (n, C, h, w) float32: input of block train_from
    act_flip: np.ndarray  # (n, C, h, w) float32: the same for the flipped image (or empty)
    t_img: np.ndarray  # (n, 1280) float32 unit
    t_txt: np.ndarray  # (n, 384) float32 unit
    info: dict = field(default_factory=dict)
    folded: dict = field(default_factory=dict)
    """start block -> (act, act_flip) pushed through the frozen blocks [train_from, start)."""

    @property
    def seen(self) -> np.ndarray:
        return np.flatnonzero(self.split == 0)

    @property
    def unseen(self) -> np.ndarray:
        return np.flatnonzero(self.split == 1)


def load_backbone():  # noqa: ANN201 (EfficientNet from the library wheel)
    """The student's EfficientNet-Lite0 with the teacher's (shipped ImageNet) weights."""
    from megaclass.training.encoders import EfficientNetFeatures

    return EfficientNetFeatures(pretrained=True).net.eval()


def trunk_forward(net, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:  # noqa: ANN001
    """Blocks [start, stop) of EfficientNet-Lite0 (start=0 includes the stem), with the
    drop-connect schedule of ``extract_features`` (active only in training mode)."""
    if start == 0:
        x = net._swish(net._bn0(net._conv_stem(x)))
    n = len(net._blocks)
    rate = net._global_params.drop_connect_rate
    for idx in range(start, stop):
        x = net._blocks[idx](x, drop_connect_rate=rate * idx / n if rate else rate)
    return x


class Tail(nn.Module):
    """Trained part of the student: blocks >= start, head conv + BN, pool, projection."""

    def __init__(self, net, start: int, proj: nn.Linear) -> None:  # noqa: ANN001
        super().__init__()
        self.start, self.n = start, len(net._blocks)
        self.rate = net._global_params.drop_connect_rate
        self.blocks = nn.ModuleList(copy.deepcopy(list(net._blocks)[start:]))
        self.conv_head = copy.deepcopy(net._conv_head)
        self.bn1 = copy.deepcopy(net._bn1)
        self.act = copy.deepcopy(net._swish)
        self.proj = proj

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.blocks):
            idx = self.start + j
            x = block(x, drop_connect_rate=self.rate * idx / self.n if self.rate else self.rate)
        return self.act(self.bn1(self.conv_head(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The teacher vector is the unit pooled feature; projecting that same unit vector makes
        # the untrained student exactly the teacher's centred PCA.
        return self.proj(F.normalize(self.pooled(x), dim=-1))


def _cache_key(cfg: QualityConfig) -> str:
    parts = (
        cfg.data_seed,
        cfg.held_out_fraction,
        cfg.max_per_class,
        cfg.min_per_class,
        cfg.image_size,
        cfg.train_from,
        cfg.flip_view,
        cfg.quick,
        5,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def dev_cache(cache: Cache, share: float, seed: int) -> Cache:
    """The seen part only, re-split by category: ``share`` of the seen categories become the
    validation gallery (split 1), the rest stay the training part (split 0)."""
    seen = cache.seen
    cats = sorted({cache.classes[i] for i in seen})
    n_val = int(round(share * len(cats)))
    if not 0 < n_val < len(cats):
        raise ValueError(f"dev_split={share} leaves no training or no validation category")
    val = set(np.random.default_rng(seed).choice(cats, size=n_val, replace=False).tolist())
    is_val = np.array([cache.classes[i] in val for i in seen])
    info = dict(cache.info, dev_split=share, dev_seed=seed)
    info.update(
        seen_images=int((~is_val).sum()),
        unseen_images=int(is_val.sum()),
        seen_classes=len(cats) - n_val,
        unseen_classes=n_val,
        images=len(seen),
    )
    return Cache(
        [cache.files[i] for i in seen],
        [cache.classes[i] for i in seen],
        is_val.astype(np.int8),
        cache.act[seen],
        cache.act_flip[seen] if len(cache.act_flip) else cache.act_flip,
        cache.t_img[seen],
        cache.t_txt[seen],
        info,
    )


def split_cache(cache: Cache, share: float, seed: int) -> Cache:
    """The same images with another seen/unseen category split: ``share`` of all categories,
    drawn with ``seed``, become unseen. Seed 0 keeps the builder's split. Arrays are shared,
    not copied (so is the fold memo: it depends on the images, not on the split)."""
    if seed == 0:
        return cache
    cats = sorted(set(cache.classes))
    n_un = int(round(share * len(cats)))
    if not 0 < n_un < len(cats):
        raise ValueError(f"held_out_fraction={share} leaves no seen or no unseen category")
    rng = np.random.default_rng([seed, 77])
    held = set(rng.choice(cats, size=n_un, replace=False).tolist())
    split = np.array([c in held for c in cache.classes], dtype=np.int8)
    info = dict(cache.info, split_seed=seed)
    info.update(
        seen_images=int((split == 0).sum()),
        unseen_images=int(split.sum()),
        seen_classes=len(cats) - n_un,
        unseen_classes=n_un,
    )
    return Cache(
        cache.files,
        cache.classes,
        split,
        cache.act,
        cache.act_flip,
        cache.t_img,
        cache.t_txt,
        info,
        cache.folded,
    )


def build_data(cfg: QualityConfig) -> Path:
    """Shards of openclipart (seen = train/, unseen = eval/), built once per settings."""
    from megaclass.data.builders import build_dataset

    out = Path(cfg.work) / f"data-{_cache_key(cfg)}"
    if (out / "dataset.json").exists():
        return out
    t0 = time.perf_counter()
    build_dataset(
        "openclipart",
        str(out),
        seed=cfg.data_seed,
        held_out_fraction=cfg.held_out_fraction,
        max_per_class=cfg.max_per_class,
        min_per_class=cfg.min_per_class,
        workers=max(1, cfg.threads),
    )
    log.info("built openclipart shards in %.1f s → %s", time.perf_counter() - t0, out)
    return out


def _iter_split(data_dir: Path, split: str):  # noqa: ANN202
    from megaclass.data.reader import iter_samples
    from megaclass.data.stats import SampleStats

    stats = SampleStats()
    for url in sorted(str(p) for p in (data_dir / split).glob("*.tar")):
        yield from iter_samples(url, stats, max_pixels=4_000_000)
    if stats.total_skipped:
        log.warning("%s: skipped %s", split, stats.as_dict())


def build_cache(cfg: QualityConfig) -> Cache:
    """Embed every image once: frozen-trunk activations (+ flipped view) and teacher vectors."""
    from megaclass.core.atomic import atomic_path
    from megaclass.training.teachers import load_teacher

    path = Path(cfg.work) / f"cache-{_cache_key(cfg)}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        info = json.loads(str(z["info"]))
        log.info("activation cache hit: %s", path)
        return Cache(
            list(z["files"]),
            list(z["classes"]),
            z["split"],
            z["act"],
            z["act_flip"],
            z["t_img"],
            z["t_txt"],
            info,
        )
    data_dir = build_data(cfg)
    t_start = time.perf_counter()
    teacher = load_teacher("efficientnet-lite0", "minilm", image_size=cfg.image_size)
    net = load_backbone()
    files, classes, split, captions = [], [], [], []
    acts, flips, t_img = [], [], []
    checked = False

    def flush(batch: list[torch.Tensor]) -> None:
        nonlocal checked
        x = torch.stack(batch)
        with torch.inference_mode():
            a = trunk_forward(net, x, 0, cfg.train_from)
            feats = F.normalize(
                net._swish(
                    net._bn1(net._conv_head(trunk_forward(net, a, cfg.train_from, 16)))
                ).mean((2, 3)),
                dim=-1,
            )
            if not checked:  # the student's start really is the teacher
                ref = teacher.encode_images(x)
                diff = float(np.abs(ref - feats.numpy()).max())
                if diff > 1e-4:
                    raise RuntimeError(f"student trunk differs from the teacher by {diff:.2e}")
                log.info("student init == teacher (max |Δ| = %.1e)", diff)
                checked = True
            acts.append(a.numpy())
            t_img.append(feats.numpy())
            if cfg.flip_view:  # every image: any category may be seen under another split
                flips.append(trunk_forward(net, x.flip(3), 0, cfg.train_from).numpy())

    n_img = sum(
        json.loads((data_dir / "dataset.json").read_text())["splits"][s]["samples"]
        for s in ("train", "eval")
    )
    bar = tqdm(total=n_img, desc="teacher + frozen trunk", unit="img", mininterval=5)
    for s_id, s_name in enumerate(("train", "eval")):
        batch = []
        for sample in _iter_split(data_dir, s_name):
            files.append(str(sample.meta.get("file", sample.key)))
            classes.append(str(sample.meta["class"]))
            split.append(s_id)
            captions.append(sample.caption)
            batch.append(teacher.image_transform(sample.image))
            if len(batch) == 64:
                flush(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            flush(batch)
            bar.update(len(batch))
    bar.close()
    t_img_s = time.perf_counter() - t_start
    t_txt = np.concatenate(
        [teacher.encode_texts(captions[i : i + 256]) for i in range(0, len(captions), 256)]
    )
    info = {
        "images": len(files),
        "seen_images": int(np.sum(np.asarray(split) == 0)),
        "unseen_images": int(np.sum(np.asarray(split) == 1)),
        "seen_classes": len({c for c, s in zip(classes, split) if s == 0}),
        "unseen_classes": len({c for c, s in zip(classes, split) if s == 1}),
        "embed_seconds": round(time.perf_counter() - t_start, 1),
        "images_per_second": round(len(files) / max(t_img_s, 1e-9), 2),
        "dataset": json.loads((data_dir / "dataset.json").read_text()).get("skipped"),
    }
    cache = Cache(
        files,
        classes,
        np.asarray(split, np.int8),
        np.concatenate(acts),
        np.concatenate(flips) if flips else np.zeros((0,), np.float32),
        np.concatenate(t_img),
        t_txt,
        info,
    )
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                files=np.asarray(files),
                classes=np.asarray(classes),
                split=cache.split,
                act=cache.act,
                act_flip=cache.act_flip,
                t_img=cache.t_img,
                t_txt=t_txt,
                info=np.asarray(json.dumps(info)),
            )
    log.info(
        "embedded %d images in %.0f s (%.1f img/s)",
        len(files),
        info["embed_seconds"],
        info["images_per_second"],
    )
    return cache


# --------------------------------------------------------------------------------------
# pseudo-classes
# --------------------------------------------------------------------------------------


def pseudo_labels(cache: Cache, feature: str, k: int, topk: int, seed: int, niter: int) -> dict:
    """Cluster the seen images' teacher features into k classes; top-``topk`` labels each."""
    from megaclass.clustering.backends import KMeansParams, train_kmeans
    from megaclass.clustering.cluster_stats import imbalance, quality
    from megaclass.clustering.search import CentroidSearcher
    from megaclass.data.embeddings import fuse

    s = cache.seen
    x = fuse(cache.t_img[s], cache.t_txt[s], feature)
    t0 = time.perf_counter()
    res = train_kmeans(x, KMeansParams(k=k, niter=niter, seed=seed, backend="faiss"))
    labels, scores = CentroidSearcher(res.centroids).search(x, topk)
    sizes = np.bincount(labels[:, 0], minlength=k)
    truth = [cache.classes[i] for i in s]
    q = quality(truth, labels[:, 0], max_ami_cells=0)
    return {
        "labels": labels,
        "sizes": sizes,
        "nmi": float(q.get("nmi", float("nan"))),
        "imbalance": float(imbalance(sizes)),
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------
# student
# --------------------------------------------------------------------------------------


_PCA: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def pca_basis(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal directions (rows, by decreasing variance) of ``x``; memoised."""
    key = (x.shape, hashlib.sha256(np.ascontiguousarray(x[:: max(1, len(x) // 64)])).hexdigest())
    if key not in _PCA:
        mu = x.mean(0, dtype=np.float64)
        xc = torch.from_numpy(x.astype(np.float64) - mu)
        evals, evecs = torch.linalg.eigh(xc.T @ xc)
        _PCA[key] = (mu.astype(np.float32), evecs.flip(1).T.numpy().astype(np.float32))
    return _PCA[key]


def pca_projection(x: np.ndarray, dim: int) -> nn.Linear:
    """Linear map to the top-``dim`` centred principal directions of ``x`` (rows ordered by
    variance, so the first d outputs are also the best d-dim compact feature)."""
    mu, basis = pca_basis(x)
    v = basis[:dim]
    proj = nn.Linear(x.shape[1], dim)
    with torch.no_grad():
        proj.weight.copy_(torch.from_numpy(v))
        proj.bias.copy_(torch.from_numpy(-(v @ mu)))
    return proj


def embed(tail: Tail, act: np.ndarray, batch: int = 256) -> np.ndarray:
    tail.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(act), batch):
            out.append(tail(torch.from_numpy(act[i : i + batch]).float()))
    return torch.cat(out).numpy()


def metrics(x: np.ndarray, labels: Sequence[str]) -> dict:
    from megaclass.pipelines.retrieval import retrieval_metrics

    m = retrieval_metrics(x, labels, recall_ks=(1,), device="cpu")
    return {"R@1": m["recall@1"], "mAP@R": m["map@r"]}


def train_row(cfg: QualityConfig, cache: Cache, row: Row, seed: int, pl: dict, net) -> dict:  # noqa: ANN001
    """Train one student (tail + projection + PartialFC) and evaluate it on unseen classes."""
    from megaclass.training.heads import PartialFC

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 11])
    start = cfg.train_from if row.train_from is None else row.train_from
    if start < cfg.train_from:
        raise ValueError(f"row {row.name!r}: train_from={start} < cached {cfg.train_from}")
    seen = cache.seen
    act = cache.act
    act_flip = cache.act_flip if cfg.flip_view else None
    # Blocks between the cached point and `start` are frozen: fold them into the inputs once.
    if start > cfg.train_from:
        if start not in cache.folded:

            def fold(a: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return np.concatenate(
                        [
                            trunk_forward(
                                net, torch.from_numpy(a[i : i + 256]).float(), cfg.train_from, start
                            ).numpy()
                            for i in range(0, len(a), 256)
                        ]
                    )

            cache.folded[start] = (fold(act), fold(act_flip) if act_flip is not None else None)
        act, act_flip = cache.folded[start]
    if row.init == "lda":
        proj = lda_projection(cache.t_img[seen], pl["labels"][:, 0], row.dim)
    elif row.init == "pca":
        proj = pca_projection(cache.t_img[seen], row.dim)
    else:
        raise ValueError(f"row {row.name!r}: init must be 'pca' or 'lda', got {row.init!r}")
    tail = Tail(net, start, proj)
    labels = torch.from_numpy(
        pl["labels"][:, : row.labels] if row.objective == "mlcd" else pl["labels"][:, 0]
    )
    # Centres start at the pseudo-class means of the initial embeddings.
    e0 = F.normalize(torch.from_numpy(embed(tail, act[seen])), dim=1)
    top1 = torch.from_numpy(pl["labels"][:, 0])
    centres = torch.zeros(row.k, row.dim).index_add_(0, top1, e0)
    empty = centres.norm(dim=1) == 0
    centres[empty] = torch.randn(
        int(empty.sum()), row.dim, generator=torch.Generator().manual_seed(seed)
    )
    head = PartialFC(
        row.k,
        row.dim,
        sample_rate=row.sample_rate,
        feature_rate=row.feature_rate,
        margin=row.margin,
        scale=cfg.scale,
        m=cfg.margin_m if row.margin == "arcface" else 0.35,
        multi_label=row.objective == "mlcd",
        seed=seed,
    )
    head.load_full_weight(F.normalize(centres, dim=1))
    trunk_params = [p for n, p in tail.named_parameters() if not n.startswith("proj.")]
    opt = torch.optim.AdamW(
        [
            {"params": trunk_params, "lr": cfg.lr * cfg.lr_trunk},
            {"params": tail.proj.parameters(), "lr": cfg.lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    hopt = head.make_optimizer("sgd", lr=cfg.head_lr, momentum=0.9, weight_decay=5e-4)
    epochs = cfg.epochs if row.epochs is None else row.epochs
    n = len(seen)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = epochs * steps_per_epoch
    base_lrs = [g["lr"] for g in opt.param_groups] + [g["lr"] for g in hopt.param_groups]
    t0 = time.perf_counter()
    losses = []
    step = 0
    for _ in range(epochs):
        tail.train()
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            rows = seen[idx]
            xb = act[rows]
            if act_flip is not None:  # each image: original or flipped view, at random
                flip = rng.random(len(idx)) < 0.5
                xb = np.where(flip[:, None, None, None], act_flip[rows], xb)
            warm = min(1.0, (step + 1) / max(1, steps_per_epoch))
            lr_mult = warm * 0.5 * (1 + math.cos(math.pi * step / total))
            for g, lr0 in zip(opt.param_groups + hopt.param_groups, base_lrs):
                g["lr"] = lr0 * lr_mult
            loss = head(tail(torch.from_numpy(xb).float()), labels[idx])
            opt.zero_grad(set_to_none=True)
            hopt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hopt.step()
            losses.append(float(loss.detach()))
            step += 1
    train_s = time.perf_counter() - t0
    un = cache.unseen
    emb = embed(tail, act[un])
    truth = [cache.classes[i] for i in un]
    out = {"row": row.name, "seed": seed, **metrics(emb, truth)}
    out["compact"] = {str(d): metrics(emb[:, :d], truth) for d in (32, 64, 128, 256) if d < row.dim}
    out.update(
        loss_first=float(np.mean(losses[:steps_per_epoch])) if losses else None,
        loss_last=float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        steps=step,
        train_seconds=round(train_s, 2),
        samples_per_second=round(step * cfg.batch_size / max(train_s, 1e-9), 1),
        nmi=pl["nmi"],
        imbalance=pl["imbalance"],
        trained=f"blocks {start}-15 + head conv/BN + proj 1280→{row.dim} + PartialFC"
        if start < 16
        else f"head conv/BN + proj 1280→{row.dim} + PartialFC",
    )
    return out


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def lda_map(x: np.ndarray, y: np.ndarray, dim: int, shrink: float = 1.0):  # noqa: ANN201
    """Linear discriminant map fitted on features ``x`` with class labels ``y``: whiten the
    within-class scatter (shrunk toward ``shrink`` × its mean eigenvalue, so it stays well
    posed with few images per class), then keep the ``dim`` directions of largest
    between-class spread. A closed-form reference for what a *linear* student can learn from
    the pseudo-classes."""
    x = x.astype(np.float64)
    mu = x.mean(0)
    xc = x - mu
    total = xc.T @ xc / len(x)
    within = np.zeros_like(total)
    for c in np.unique(y):
        d = x[y == c] - x[y == c].mean(0)
        within += d.T @ d
    within /= len(x)
    between = total - within
    within += shrink * np.trace(within) / len(within) * np.eye(len(within))
    ev, u = np.linalg.eigh(within)
    w = u / np.sqrt(ev)
    ev2, v = np.linalg.eigh(w.T @ between @ w)
    p = w @ v[:, ::-1][:, :dim]
    return lambda q: ((q.astype(np.float64) - mu) @ p).astype(np.float32)


def lda_projection(x: np.ndarray, y: np.ndarray, dim: int) -> nn.Linear:
    """``lda_map`` as a linear layer, scaled so its rows have unit norm on average (like the
    PCA start: a global scale does not change cosine similarities, only the optimizer's
    step relative to the weights)."""
    f = lda_map(x, y, dim)
    bias = f(np.zeros((1, x.shape[1]), np.float32))[0]  # = -mu @ P
    weight = (f(np.eye(x.shape[1], dtype=np.float32)) - bias).T  # rows: P^T
    scale = 1.0 / np.sqrt((weight**2).sum(1).mean())
    proj = nn.Linear(x.shape[1], dim)
    with torch.no_grad():
        proj.weight.copy_(torch.from_numpy(weight * scale))
        proj.bias.copy_(torch.from_numpy(bias * scale))
    return proj


def teacher_baselines(cfg: QualityConfig, cache: Cache, dims: Sequence[int]) -> dict:
    """Teacher metrics on the unseen classes: raw 1280-d, centred PCA-d, fused is not
    available at query time (no captions for unseen images in a retrieval setting)."""
    un = cache.unseen
    truth = [cache.classes[i] for i in un]
    out = {"teacher (raw 1280-d)": metrics(cache.t_img[un], truth)}
    for d in dims:
        proj = pca_projection(cache.t_img[cache.seen], d)
        with torch.no_grad():
            x = proj(torch.from_numpy(cache.t_img[un])).numpy()
        out[f"teacher PCA-{d}"] = metrics(x, truth)
    return out


RAW = "teacher (raw 1280-d)"


def run(cfg: QualityConfig, rows: list[Row]) -> dict:
    """Embed once, then every (row, seed): split (memoised), cluster (memoised), train,
    evaluate; each student is compared with the teacher on the same split (paired Δ)."""
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, cfg.threads))
    full = build_cache(cfg)
    if cfg.dev_split > 0:
        full = dev_cache(full, cfg.dev_split, cfg.dev_seed)
        log.info(
            "dev split: %d training / %d validation images of the seen part; unseen untouched",
            len(full.seen),
            len(full.unseen),
        )
    net = load_backbone()
    dims = sorted({r.dim for r in rows} | {128, 256, 512} - {1280})
    jobs = [(r, s) for r in rows for s in (cfg.seeds if r.repeat else cfg.seeds[:1])]
    split_of = {s: (s if cfg.vary_split else 0) for _, s in jobs}
    splits: dict[int, Cache] = {}
    teachers: dict[int, dict] = {}
    for sp in sorted(set(split_of.values())):
        c = splits[sp] = full if sp == 0 else split_cache(full, cfg.held_out_fraction, sp)
        teachers[sp] = teacher_baselines(cfg, c, dims)
        log.info(
            "split %d: %d seen / %d unseen images, %d / %d categories",
            sp,
            len(c.seen),
            len(c.unseen),
            c.info["seen_classes"],
            c.info["unseen_classes"],
        )
        for name, m in teachers[sp].items():
            log.info("  %-24s R@1 %.4f  mAP@R %.4f", name, m["R@1"], m["mAP@R"])
    clusters: dict[tuple, dict] = {}
    results = []
    labels_needed = max(r.labels for r in rows)
    for row, seed in tqdm(jobs, desc="ablation rows", unit="run"):
        sp = split_of[seed]
        cache = splits[sp]
        key = (sp, row.feature, row.k, seed, labels_needed)
        if key not in clusters:
            clusters[key] = pseudo_labels(
                cache, row.feature, row.k, labels_needed, seed, cfg.kmeans_niter
            )
            if (row.feature, row.k) == (rows[0].feature, rows[0].k):
                # the closed-form linear reference on the base row's pseudo-classes
                s_idx, un = cache.seen, cache.unseen
                f = lda_map(cache.t_img[s_idx], clusters[key]["labels"][:, 0], rows[0].dim)
                name = f"teacher + LDA on its pseudo-classes (K={row.k}, D={rows[0].dim})"
                teachers[sp].setdefault(
                    name, metrics(f(cache.t_img[un]), [cache.classes[i] for i in un])
                )
        res = train_row(cfg, cache, row, seed, clusters[key], net)
        res["split"] = sp
        paired_deltas(res, teachers[sp], row.dim)
        log.info(
            "%-40s seed %d  R@1 %.4f (Δ %+.4f)  mAP@R %.4f (Δ %+.4f)  (%.0f s, loss %.2f→%.2f)",
            row.name,
            seed,
            res["R@1"],
            res["delta_R@1"],
            res["mAP@R"],
            res["delta_mAP@R"],
            res["train_seconds"],
            res["loss_first"] or 0,
            res["loss_last"] or 0,
        )
        results.append(res)
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "rows": [asdict(r) for r in rows],
        "data": full.info,
        "splits": {str(sp): c.info for sp, c in splits.items()},
        "teacher_by_split": {str(sp): t for sp, t in teachers.items()},
        "teacher": summarise_teacher(teachers, [split_of[s] for s in cfg.seeds if s in split_of]),
        "results": results,
        "summary": summarise(rows, results),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def paired_deltas(res: dict, teacher: dict, dim: int) -> None:
    """Student minus teacher on the same split: vs the raw 1280-d teacher (``delta_*``) and vs
    the teacher's centred PCA at the student's dimension (``pca_delta_*``), which separates
    what training adds from what centring + PCA alone give."""
    pca = teacher.get(f"teacher PCA-{dim}")
    for m in ("R@1", "mAP@R"):
        res[f"teacher_{m}"] = teacher[RAW][m]
        res[f"delta_{m}"] = res[m] - teacher[RAW][m]
        if pca is not None:
            res[f"pca_delta_{m}"] = res[m] - pca[m]


def _stats(v: Sequence[float]) -> tuple[float, float, list[float]]:
    a = np.asarray(v, dtype=np.float64)
    return (
        float(a.mean()),
        float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        [float(a.min()), float(a.max())],
    )


def summarise_teacher(teachers: dict[int, dict], splits: Sequence[int]) -> dict:
    """Each teacher baseline averaged over the splits the repeated rows use."""
    splits = sorted(set(splits)) or sorted(teachers)
    out = {}
    for name in teachers[splits[0]]:
        vals = [teachers[sp][name] for sp in splits if name in teachers[sp]]
        entry: dict = {"splits": len(vals)}
        for m in ("R@1", "mAP@R"):
            entry[m], entry[f"{m}_std"], _ = _stats([v[m] for v in vals])
        out[name] = entry
    return out


def summarise(rows: list[Row], results: list[dict]) -> list[dict]:
    """Per row over its seeds: mean, std and range of each metric, and of the paired
    difference to the raw teacher on the same split (with the count of seeds it is > 0)."""
    out = []
    for r in rows:
        rs = [x for x in results if x["row"] == r.name]
        if not rs:
            continue
        entry = {"row": r.name, "seeds": len(rs), "splits": sorted({x["split"] for x in rs})}
        for m in ("R@1", "mAP@R"):
            entry[m], entry[f"{m}_std"], entry[f"{m}_range"] = _stats([x[m] for x in rs])
            d = [x[f"delta_{m}"] for x in rs]
            entry[f"delta_{m}"], entry[f"delta_{m}_std"], entry[f"delta_{m}_range"] = _stats(d)
            entry[f"wins_{m}"] = int(sum(v > 0 for v in d))
            if all(f"pca_delta_{m}" in x for x in rs):
                d = [x[f"pca_delta_{m}"] for x in rs]
                entry[f"pca_delta_{m}"], entry[f"pca_delta_{m}_std"], _ = _stats(d)
                entry[f"pca_wins_{m}"] = int(sum(v > 0 for v in d))
        entry["nmi"] = float(np.mean([x["nmi"] for x in rs]))
        entry["train_seconds"] = float(np.mean([x["train_seconds"] for x in rs]))
        out.append(entry)
    return out


def markdown_table(res: dict) -> str:
    lines = [
        "| encoder / row | seeds (splits) | R@1 (unseen) | Δ R@1 vs teacher raw (> 0 on) "
        "| Δ R@1 vs teacher PCA-D | mAP@R (unseen) | Δ mAP@R vs raw | Δ mAP@R vs PCA-D | NMI "
        "| train s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pm(e: dict, m: str, n: int, signed: bool = False) -> str:
        if m not in e:
            return "–"
        v = ("{:+.3f}" if signed else "{:.3f}").format(e[m])
        return v + (f" ± {e[m + '_std']:.3f}" if n > 1 else "")

    for name, e in res["teacher"].items():
        n = e["splits"]
        r1, mp = pm(e, "R@1", n), pm(e, "mAP@R", n)
        lines.append(f"| {name} | – ({n}) | {r1} | – | – | {mp} | – | – | – | – |")
    for e in res["summary"]:
        n = e["seeds"]
        lines.append(
            f"| student {e['row']} | {n} ({len(e['splits'])}) | {pm(e, 'R@1', n)} | "
            f"{pm(e, 'delta_R@1', n, True)} ({e['wins_R@1']}/{n}) | "
            f"{pm(e, 'pca_delta_R@1', n, True)} | {pm(e, 'mAP@R', n)} | "
            f"{pm(e, 'delta_mAP@R', n, True)} | {pm(e, 'pca_delta_mAP@R', n, True)} | "
            f"{e['nmi']:.3f} | {e['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def rerender(path: Path) -> dict:
    """Recompute the paired differences, summary and table of a saved results JSON (no
    training): for reading an old run with a newer summary."""
    res = json.loads(path.read_text())
    dim_of = {r["name"]: r["dim"] for r in res["rows"]}
    for r in res["results"]:
        paired_deltas(r, res["teacher_by_split"][str(r["split"])], dim_of[r["row"]])
    rows = [Row(**r) for r in res["rows"]]
    res["summary"] = summarise(rows, res["results"])
    return res


def plot(res: dict, fig_dir: Path, tag: str = "") -> list[str]:
    """Δ Recall@1 / mAP@R vs the teacher per row (paired over seeds and splits), and metric vs
    embedding dimension on split 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    summ = res["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.42 * len(summ) + 1.6), sharey=True)
    y = np.arange(len(summ))[::-1]
    for ax, m in zip(axes, ("R@1", "mAP@R")):
        means = [e[f"delta_{m}"] for e in summ]
        lo = [e[f"delta_{m}"] - e[f"delta_{m}_range"][0] for e in summ]
        hi = [e[f"delta_{m}_range"][1] - e[f"delta_{m}"] for e in summ]
        ax.barh(
            y,
            means,
            xerr=[lo, hi],
            color=["C0" if e["seeds"] > 1 else "C9" for e in summ],
            capsize=3,
        )
        ax.axvline(0.0, color="C3", ls="--", label="teacher raw 1280-d (same split)")
        ax.set_xlabel(f"Δ {m} vs teacher on unseen categories\n(bar: mean, whiskers: min–max)")
        ax.legend(loc="lower right", fontsize=7)
    axes[0].set_yticks(y, [f"{e['row']} (n={e['seeds']})" for e in summ], fontsize=8)
    fig.tight_layout()
    p = fig_dir / f"quality_recall_rows{tag}.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(str(p))

    # metric vs dims on split 0: teacher PCA-d, students trained at D, base's first d dims
    t0 = res["teacher_by_split"]["0"]
    r0 = [r for r in res["results"] if r["split"] == 0 and r["seed"] == res["config"]["seeds"][0]]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, m in zip(axes, ("R@1", "mAP@R")):
        tp = sorted(
            (int(k.split("-")[1]), v[m]) for k, v in t0.items() if k.startswith("teacher PCA")
        )
        ax.plot([d for d, _ in tp], [v for _, v in tp], "o-", color="C3", label="teacher PCA-d")
        ax.axhline(t0[RAW][m], color="C3", ls="--", label="teacher raw 1280-d")
        dim_of = {x["name"]: x["dim"] for x in res["rows"]}
        trained = sorted(
            (dim_of[r["row"]], r[m]) for r in r0 if r["row"].startswith(("base", "D="))
        )
        ax.plot(
            [d for d, _ in trained],
            [v for _, v in trained],
            "s-",
            color="C0",
            label="student trained at D",
        )
        base = [r for r in r0 if r["row"].startswith("base")]
        if base:
            cd = sorted(int(d) for d in base[0]["compact"])
            xs = cd + [dim_of[base[0]["row"]]]
            ys = [base[0]["compact"][str(d)][m] for d in cd] + [base[0][m]]
            ax.plot(xs, ys, "^:", color="C2", label="base student, first d dims")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("embedding dimension")
        ax.set_ylabel(f"{m} (unseen, split 0)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    p = fig_dir / f"quality_dims{tag}.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    paths.append(str(p))
    return paths


def parse_args(argv: Sequence[str] | None = None) -> tuple[QualityConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    d = QualityConfig()
    for f_name, val in asdict(d).items():
        flag = "--" + f_name.replace("_", "-")
        if isinstance(val, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=val)
        elif isinstance(val, tuple):
            ap.add_argument(flag, type=int, nargs="+", default=list(val))
        elif val is None or f_name == "max_per_class":
            ap.add_argument(
                flag, type=lambda s: None if s.lower() == "none" else int(s), default=val
            )
        else:
            ap.add_argument(flag, type=type(val), default=val)
    ap.add_argument(
        "--out",
        default=str(HERE / "results" / "quality.json"),
        help="results JSON (a .md table is written next to it)",
    )
    ap.add_argument("--figures", default=str(HERE / "figures"), help="folder for the PNG plots")
    ap.add_argument("--rows", nargs="*", default=None, help="only rows whose name starts so")
    ap.add_argument(
        "--rerender",
        default=None,
        metavar="RESULTS.json",
        help="no training: recompute summary, table and plots of a saved run into --out",
    )
    args = ap.parse_args(argv)
    cfg = QualityConfig(
        **{
            k: (tuple(getattr(args, k)) if isinstance(v, tuple) else getattr(args, k))
            for k, v in asdict(d).items()
        }
    )
    if cfg.quick:
        cfg = replace(
            cfg,
            max_per_class=min(cfg.max_per_class or 6, 6),
            image_size=64,
            epochs=1,
            batch_size=32,
            seeds=cfg.seeds[:2],
            kmeans_niter=5,
        )
    return cfg, args


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    cfg, args = parse_args(argv)
    rows = quick_rows() if cfg.quick else default_rows(cfg)
    if args.rows:
        rows = [r for r in rows if any(r.name.startswith(p) for p in args.rows)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.rerender:
        res = rerender(Path(args.rerender))
        cfg = replace(cfg, quick=bool(res["config"].get("quick")))
    else:
        res = run(cfg, rows)
        res["command"] = shlex.join(["python", "benchmarks/quality.py", *(argv or sys.argv[1:])])
    table = markdown_table(res)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from megaclass.core.atomic import write_json_atomic, write_text_atomic

    res["figures"] = plot(res, Path(args.figures), "_quick" if cfg.quick else "")
    write_json_atomic(out, res)
    write_text_atomic(out.with_suffix(".md"), table + f"\n\nwall time {res['wall_seconds']} s\n")
    print(f"wall time {res['wall_seconds']:.0f} s → {out}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
