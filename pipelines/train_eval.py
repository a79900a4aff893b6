"""Eval during training (``train.eval_every``): the hook the trainer calls every N steps.

Why it lives here and not in training/: it reads the eval shards and computes retrieval
metrics (pipelines/retrieval.py), both above the training floor. The train stage builds the
hook with :func:`make_eval_hook` and hands it to the trainer inside the ``TrainJob``; the
trainer only calls ``hook(step, backbone, transform)`` and logs what it returns.

What it guarantees: the training result is the same with and without it. Rank 0 embeds with
the backbone in eval mode under ``torch.no_grad`` and restores train mode; the Python, NumPy,
torch (and CUDA) RNG states are saved before and restored after (nothing here draws random
numbers, the restore is a second line of defence); the training loader is never touched. The
other ranks wait at a barrier, so every rank leaves the hook at the same point.

What it measures: Recall@1 and mAP@R with every image querying all the others (the ``all``
protocol, whatever eval.protocol says) on the first ``train.eval_max_images`` labelled images of
``data.eval_shards`` in shard order — a fixed subset, so the curve compares like with like. The
images are decoded and transformed (with the student's eval transform) once, on the first
call, and kept in memory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megaclass.data.reader import iter_samples
from megaclass.data.shards import expand_shards
from megaclass.data.stats import SampleStats
from megaclass.pipelines.config import ConfigError, RunConfig
from megaclass.pipelines.retrieval import evaluate_features
from megaclass.training.checkpoint import rng_state, set_rng_state

log = logging.getLogger(__name__)

EvalHook = Callable[[int, torch.nn.Module, Callable[[Any], torch.Tensor]], dict[str, float]]


def load_eval_images(
    cfg: RunConfig, transform: Callable[[Any], torch.Tensor]
) -> tuple[torch.Tensor, list[str]]:
    """(N, C, H, W) float32 transformed images and their classes: the first
    ``train.eval_max_images`` samples of data.eval_shards that have a class."""
    limit = cfg.train.eval_max_images
    field = cfg.data.class_field
    stats = SampleStats()
    xs: list[torch.Tensor] = []
    classes: list[str] = []
    for url in expand_shards(cfg.data.eval_shards):
        samples = iter_samples(
            url,
            stats,
            max_pixels=cfg.data.max_image_pixels,
            decode=True,
            max_caption_bytes=cfg.data.max_caption_bytes,
            max_json_bytes=cfg.data.max_json_bytes,
        )
        for s in samples:
            cls = s.meta.get(field) if isinstance(s.meta, dict) else None
            if cls is None or (isinstance(cls, str) and not cls.strip()):
                continue
            xs.append(transform(s.image))
            classes.append(str(cls))
            if len(xs) >= limit:
                break
        if len(xs) >= limit:
            break
    if len(xs) < 2:
        raise ConfigError(
            f"train.eval_every: data.eval_shards holds {len(xs)} labelled images "
            f"(need at least 2 with a '{field}' field; {stats.summary()})"
        )
    return torch.stack(xs), classes


def make_eval_hook(cfg: RunConfig) -> EvalHook | None:
    """The hook for ``train.eval_every`` > 0 (None when it is 0)."""
    if cfg.train.eval_every <= 0:
        return None
    cache: dict[str, Any] = {}
    batch = cfg.eval.batch_size

    def hook(
        step: int, backbone: torch.nn.Module, transform: Callable[[Any], torch.Tensor]
    ) -> dict[str, float]:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        out: dict[str, float] = {}
        if rank == 0:
            out = _evaluate(step, backbone, transform)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return out

    def _evaluate(
        step: int, backbone: torch.nn.Module, transform: Callable[[Any], torch.Tensor]
    ) -> dict[str, float]:
        t0 = time.perf_counter()
        rng = rng_state()
        was_training = backbone.training
        try:
            if "x" not in cache:
                cache["x"], cache["classes"] = load_eval_images(cfg, transform)
                log.info(
                    "train eval: %d held-out images cached (%.0f MB)",
                    len(cache["classes"]),
                    cache["x"].numel() * 4 / 2**20,
                )
            p = next(backbone.parameters())
            backbone.eval()
            feats = []
            with torch.no_grad():
                for i in range(0, cache["x"].shape[0], batch):
                    xb = cache["x"][i : i + batch].to(p.device, p.dtype)
                    feats.append(torch.nn.functional.normalize(backbone(xb).float(), dim=-1))
            x = torch.cat(feats).cpu().numpy().astype(np.float32)
            res = evaluate_features(
                x, cache["classes"], recall_ks=(1,), knn_k=1, compact_dims=[], device="cpu"
            )["full"]
        finally:
            backbone.train(was_training)
            set_rng_state(rng)
        out = {k: float(res[k]) for k in ("recall@1", "map@r") if res[k] is not None}
        return {**out, "seconds": round(time.perf_counter() - t0, 3)}

    return hook
