"""The training loop: DeepSpeed backbone, model-parallel head outside the engine, exact resume.

Read :func:`train` top to bottom — the whole loop is there. :func:`setup` builds everything
(process group, model, head, engine, optimizers, loader) and restores the newest complete
checkpoint; the helpers below the loop are small and single-purpose.

Why the head is outside DeepSpeed: pfc/mlcd heads hold a different slice of the class centres
on every rank. ``deepspeed.initialize`` broadcasts replicated parameters from rank 0 and the
engine averages their gradients — both would silently destroy a sharded head. So the head has
its own optimizer and LR schedule (``lr × head_lr_mult``), is stepped when the engine reaches
a gradient-accumulation boundary, and is saved per rank. Its loss still goes through
``engine.backward`` (which applies the loss scale and the 1/grad_accum averaging to both).

Gradient scale: the pfc/mlcd loss is the mean over the *global* batch and is identical on
every rank. The head's all-gather multiplies each rank's embedding gradient by the world size
(built with ``PartialFC(grad_average=True)``), so the engine's averaging all-reduce yields exactly the
gradient of the global loss for the backbone, and the head's shards get the exact gradient of
their rows. The result is the same update for any number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megaclass.core.atomic import write_text_atomic
from megaclass.core.config import ConfigError
from megaclass.core.errors import UserError
from megaclass.data.loader import TrainLoader, VirtualStreamsError, global_order
from megaclass.data.shards import expand_shards
from megaclass.training import checkpoint as ckpt
from megaclass.training.config import TrainJob, margin_kwargs
from megaclass.training.encoders import StudentModel, build_student
from megaclass.training.engine import (
    DistEnv,
    build_ds_config,
    check_precision,
    init_distributed,
    make_optimizer,
    make_scheduler,
    param_groups,
)
from megaclass.training.heads import PartialFC
from megaclass.training.losses import siglip_loss
from megaclass.training.tracking import MetricsLogger
from torch import nn

log = logging.getLogger(__name__)

TEST_SIGNAL_ENV = "MEGACLASS_TEST_SIGNAL_AT_STEP"
"""Tests only: rank 0 sends itself SIGTERM after this optimizer step (exercises the real handler)."""


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive optimizer steps had a NaN/inf loss."""


@dataclass
class TrainState:
    """Everything the loop touches; built by :func:`setup`."""

    job: TrainJob
    env: DistEnv
    model: StudentModel
    engine: Any
    head: nn.Module | None
    head_opt: torch.optim.Optimizer | None
    head_sched: torch.optim.lr_scheduler.LRScheduler | None
    loader: Any
    num_classes: int
    dtype: torch.dtype
    step: int = 0
    samples: int = 0
    bad_total: int = 0
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ======================================================================================
# The loop
# ======================================================================================


def train(job: TrainJob, **setup_kw: Any) -> dict[str, Any]:
    """Train to ``job.train.steps`` optimizer steps (resuming if a checkpoint exists).

    Returns a summary dict; ``summary["interrupted"]`` is True when a signal stopped the run
    after a checkpoint (the caller then exits 0 so that Slurm requeues it).
    """
    st = setup(job, **setup_kw)
    tc, env, engine = st.job.train, st.env, st.engine  # (grad_accum may be adapted on resume)
    stop = _StopFlag()
    test_signal_step = int(os.environ.get(TEST_SIGNAL_ENV, "0") or 0)
    metrics = MetricsLogger(st.job.train_dir, enabled=env.is_main, resume_step=st.step, job=st.job)
    global_batch = tc.micro_batch_size * tc.grad_accum * env.world_size
    keylog = BatchKeyLog(st.job.train_dir, st.step, env.is_main) if tc.log_batch_keys else None
    data_iter = iter(st.loader)
    bad_in_row = 0
    window = _Window()
    pbar = _progress(tc.steps, st.step, env.is_main)
    interrupted = False
    last_loss = float("nan")

    while st.step < tc.steps:
        # ---- one optimizer step = grad_accum micro-batches ------------------------------
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        micro = 0
        t0 = time.perf_counter()
        queue, data_iter = step_batches(st, data_iter)
        window.wait += time.perf_counter() - t0
        used: list[list[str]] = []
        while micro < tc.grad_accum:
            if queue:
                batch = queue.pop(0)
            else:  # a replacement for a skipped non-finite micro-batch
                t0 = time.perf_counter()
                more, data_iter = step_batches(st, data_iter, n=1)
                batch = more[0]
                window.wait += time.perf_counter() - t0
            loss = forward_loss(st, batch)
            # one tiny all-reduce: is the loss non-finite on any rank? (all must skip together)
            bad = (~torch.isfinite(loss.detach())).float().reshape(1)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() > 0:
                # Drop this micro-batch without backward: nothing reaches the optimizers, and
                # the engine's micro-step counter is untouched (DeepSpeed never saw it).
                bad_in_row += 1
                st.bad_total += 1
                log.warning(
                    "step %d: non-finite loss (%d in a row), batch skipped", st.step, bad_in_row
                )
                if bad_in_row >= tc.max_bad_steps:
                    raise NonFiniteLossError(
                        f"{bad_in_row} consecutive non-finite losses at step {st.step} "
                        f"(train.max_bad_steps={tc.max_bad_steps}); lower train.lr "
                        f"(now {tc.lr}), enable train.grad_clip, or use precision=fp32/bf16"
                    )
                continue
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:  # the LR this step uses (the schedule advances inside engine.step)
                st.extra["lr"] = engine.get_lr()[0]
                if st.head_opt is not None:
                    st.extra["head_lr"] = st.head_opt.param_groups[0]["lr"]
            engine.backward(loss)
            if boundary and tc.precision == "fp64":
                average_backbone_grads(st)
            if boundary and (st.step + 1) % tc.log_every == 0 and tc.zero_stage == 0:
                st.extra["grad_norm"] = _grad_norm(st.model)  # DeepSpeed reports none at stage 0
            if boundary and st.head is not None:
                head_grad_prepare(st)
            engine.step()  # steps the backbone optimizer + schedule only on the boundary
            if boundary and st.head_opt is not None:
                if not _engine_overflowed(engine):
                    st.head_opt.step()
                st.head_opt.zero_grad(set_to_none=True)
                st.head_sched.step()
            loss_sum += loss.detach().double()
            micro += 1
            if keylog is not None:
                used.append(list(batch["key"]))
        bad_in_row = 0
        st.step += 1
        st.samples += global_batch
        window.steps += 1
        last_loss_t = loss_sum / tc.grad_accum
        pbar.update(1)
        if keylog is not None:
            keylog.log(st.step, used, env)

        # ---- metrics ---------------------------------------------------------------------
        if st.step % tc.log_every == 0 or st.step == tc.steps:
            last_loss = float(last_loss_t)
            rec = window.record(st, last_loss, global_batch)
            metrics.log(rec)
            pbar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{rec['samples_per_s']:.0f}")
            window = _Window()

        # ---- eval during training: the hook embeds on rank 0 (the others wait), restores the
        # RNG states and train mode, so the training result is unchanged (pipelines/train_eval.py)
        if job.eval_hook is not None and tc.eval_every > 0 and st.step % tc.eval_every == 0:
            enc = st.model.encoder
            metrics.log_eval(st.step, job.eval_hook(st.step, enc, enc.transform_eval))

        if test_signal_step and st.step == test_signal_step and env.is_main:
            os.kill(os.getpid(), signal.SIGTERM)

        # ---- checkpoint ------------------------------------------------------------------
        # a signal may reach only some ranks: agree first (a collective save needs everyone)
        stop_now = _any_rank(stop.requested, env)
        if stop_now or st.step % tc.ckpt_every == 0 or st.step == tc.steps:
            save(st)
        if stop_now and st.step < tc.steps:
            log.warning("signal received: checkpointed step %d, exiting", st.step)
            interrupted = True
            break
    pbar.close()
    metrics.close()
    if keylog is not None:
        keylog.close()
    stop.restore()
    return {
        "steps": st.step,
        "final_loss": last_loss,
        "samples": st.samples,
        "bad_steps": st.bad_total,
        "world_size": env.world_size,
        "interrupted": interrupted,
        "resumed_from": st.resumed_from,
        "global_batch": global_batch,
        "_model": st.engine.module,
    }


def forward_loss(st: TrainState, batch: dict[str, Any]) -> torch.Tensor:
    """The objective's scalar loss for one micro-batch (identical definition on every rank)."""
    tc = st.job.train
    images = batch["image"].to(st.env.device, st.dtype, non_blocking=True)
    if tc.objective == "siglip":
        tokens = st.model.text.tokenize(list(batch["caption"])).to(st.env.device)
        img, txt = st.engine(images, tokens)
        m = st.engine.module
        return siglip_loss(
            F.normalize(img.float(), dim=-1),
            F.normalize(txt.float(), dim=-1),
            m.logit_scale.float().exp().squeeze(),
            m.logit_bias.float().squeeze(),
        )
    emb = st.engine(images)
    emb = emb.double() if st.dtype == torch.float64 else emb.float()
    # pfc: (B,) top-1 labels; mlcd: (B, l) top-l labels (the loader slices them)
    return st.head(emb, batch["label"].to(st.env.device))


def average_backbone_grads(st: TrainState) -> None:
    """fp64: the data-parallel gradient average DeepSpeed would do (sum over ranks, then ÷ world
    size), done here because DeepSpeed's CPU accelerator refuses to reduce float64 gradients
    (its own all-reduce is switched off for fp64 in :func:`setup`)."""
    if st.env.world_size == 1:
        return
    for p in st.model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(st.env.world_size)


def head_grad_prepare(st: TrainState) -> None:
    """Undo DeepSpeed's fp16 loss scale on the head's gradients (the engine does it only for its
    own), then clip them by their global norm over all head shards (one scalar all-reduce).
    No host sync: the clip factor min(1, clip / (norm + 1e-6)) stays a device tensor (1 when
    the norm is not finite); the norm is read only when metrics are logged."""
    scale = _engine_loss_scale(st.engine)
    params = [p for p in st.head.parameters() if p.grad is not None]
    if scale != 1.0:
        for p in params:
            p.grad.mul_(1.0 / scale)
    clip = st.job.train.grad_clip
    if clip > 0 and params:
        sq = torch.zeros((), dtype=torch.float64, device=st.env.device)
        for p in params:
            g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            sq += g.double().pow(2).sum()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        st.extra["head_grad_norm"] = norm
        coef = (clip / (norm + 1e-6)).clamp(max=1.0)
        coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef)).float()
        for p in params:
            p.grad.mul_(coef)


# ======================================================================================
# Setup and resume
# ======================================================================================


def setup(
    job: TrainJob,
    make_loader: Callable[..., Any] | None = None,
    make_head: Callable[..., nn.Module] | None = None,
    resume: bool = True,
) -> TrainState:
    """Process group, model, head, DeepSpeed engine, optimizers, loader; then resume."""
    import deepspeed

    tc = job.train
    env = init_distributed()
    _seed_all(job.seed)  # identical backbone init on every rank (DeepSpeed broadcasts anyway)
    model = build_student(tc, job.data.image_size)
    if tc.precision == "fp64":  # DeepSpeed runs it as given (its fp32 path casts nothing)
        model = model.double()
    num_classes = 0
    head = None
    if tc.objective in ("pfc", "mlcd"):
        num_classes = job.num_classes
        head = (make_head or build_head)(job, env, num_classes)
    # another world size than the checkpoint's: rank 0 re-shards it (logged), the others wait
    plan = (
        ckpt.plan_resume(job.ckpt_dir, env.rank, env.world_size, auto_reshard=True)
        if resume
        else None
    )
    if plan is not None and not plan.same_world:
        job = keep_global_batch(job, plan, env.world_size)
        tc = job.train
    ds_config = build_ds_config(tc, env.world_size, load_universal=bool(plan and plan.universal))
    check_precision(ds_config)
    opt = make_optimizer(param_groups(model, tc.weight_decay), tc, tc.lr)
    sched = make_scheduler(opt, tc)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config
    )
    if tc.precision == "fp64":  # float64 grads are averaged by average_backbone_grads
        engine.enable_backward_allreduce = False
    # the engine's dtype (a user's ds_config may switch bf16/fp16 on): inputs are cast to it
    dtype = (
        torch.float64
        if tc.precision == "fp64"
        else torch.bfloat16
        if engine.bfloat16_enabled()
        else torch.float16
        if engine.fp16_enabled()
        else torch.float32
    )
    head_opt = head_sched = None
    if head is not None:
        head.to(env.device)
        head_opt = make_head_optimizer(head, tc)
        head_sched = make_scheduler(head_opt, tc)
    # per-rank streams for augmentation / sampling from here on
    _seed_all(job.seed * 7919 + 1000 + env.rank)
    loader = (make_loader or build_loader)(job, env, model.encoder.transform_train)
    st = TrainState(job, env, model, engine, head, head_opt, head_sched, loader, num_classes, dtype)
    if plan is not None:
        restore(st, plan)
    return st


def keep_global_batch(job: TrainJob, plan: ckpt.ResumePlan, world: int) -> TrainJob:
    """A resume on another number of ranks keeps the checkpoint's global batch: when
    ``micro_batch_size × grad_accum × ranks`` differs, ``grad_accum`` becomes
    ``global batch / (micro_batch_size × ranks)`` (logged) — so a requeued job that got another
    node count goes on without a config edit. Refused, naming the keys, when that is no whole
    number."""
    tc = job.train
    saved = ckpt.read_marker(plan.folder).get("global_batch")
    if saved is None or int(saved) == tc.micro_batch_size * tc.grad_accum * world:
        return job
    accum, rest = divmod(int(saved), tc.micro_batch_size * world)
    if rest or accum < 1:
        raise ConfigError(
            f"{plan.folder} was trained with a global batch of {saved} samples, which "
            f"train.micro_batch_size={tc.micro_batch_size} × {world} ranks does not divide: set "
            f"train.micro_batch_size so that micro_batch_size × ranks × train.grad_accum = {saved}"
        )
    log.warning(
        "resuming %s (global batch %s) on %d ranks: train.grad_accum %d -> %d keeps it",
        plan.folder, saved, world, tc.grad_accum, accum,
    )  # fmt: skip
    return replace(job, train=replace(tc, grad_accum=accum))


def restore(st: TrainState, plan: ckpt.ResumePlan) -> None:
    """Load the DeepSpeed state and this rank's head/RNG/loader state from ``plan``."""
    path, _ = st.engine.load_checkpoint(
        str(plan.folder.parent),
        tag=plan.ds_tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise ckpt.CheckpointError(f"DeepSpeed could not load {plan.folder.parent / plan.ds_tag}")
    saved = ckpt.load_head_file(plan.head_file)
    if st.head is not None:
        st.head.load_state_dict(saved["head"])
        st.head_opt.load_state_dict(saved["head_opt"])
        st.head_sched.load_state_dict(saved["head_sched"])
        ckpt.set_generator_states(st.head, saved["head_rng"])
    if plan.same_world:
        ckpt.set_rng_state(saved["rng"])
    tc = st.job.train
    global_batch = tc.micro_batch_size * tc.grad_accum * st.env.world_size
    saved_batch = ckpt.read_marker(plan.folder).get("global_batch")
    if saved_batch is not None and int(saved_batch) != global_batch:
        raise ConfigError(
            f"{plan.folder} was trained with a global batch of {saved_batch} samples; this run's "
            f"is {global_batch} (train.micro_batch_size={tc.micro_batch_size} × "
            f"train.grad_accum={tc.grad_accum} × {st.env.world_size} ranks): keep the global "
            "batch when the number of ranks changes (adjust micro_batch_size or grad_accum)"
        )
    # the loader state is world-size free and saved once (loader.json); older checkpoints
    # kept a per-rank state in the head file (the loader then restarts at an epoch boundary)
    loader_state = ckpt.load_loader_state(plan.folder)
    if loader_state is None:
        loader_state = saved["loader"]
    if loader_state is not None and hasattr(st.loader, "load_state_dict"):
        st.loader.load_state_dict(loader_state)
    tr = saved["trainer"]
    st.step, st.samples, st.bad_total = tr["step"], tr["samples"], tr["bad_total"]
    st.resumed_from = str(plan.folder)
    if st.env.is_main:
        log.info("resumed from %s (step %d)", plan.folder, st.step)


def save(st: TrainState) -> Path:
    state = ckpt.HeadState(
        head=st.head.state_dict() if st.head is not None else None,
        head_opt=st.head_opt.state_dict() if st.head_opt is not None else None,
        head_sched=st.head_sched.state_dict() if st.head_sched is not None else None,
        head_rng=ckpt.generator_states(st.head) if st.head is not None else {},
        rng=ckpt.rng_state(),
        loader=None,  # saved once, world-size free: loader.json (below)
        trainer={
            "step": st.step,
            "samples": st.samples,
            "bad_total": st.bad_total,
            "backbone_checksum": backbone_checksum(st.model),
        },
    )
    info = {
        "num_classes": st.num_classes,
        "objective": st.job.train.objective,
        "model": st.job.train.model,
        "zero_stage": st.job.train.zero_stage,
        "encoder_spec": st.model.encoder.spec.to_dict(),
        "global_batch": st.job.train.micro_batch_size * st.job.train.grad_accum * st.env.world_size,
    }
    return ckpt.save_checkpoint(
        st.job.ckpt_dir,
        st.step,
        st.engine,
        state,
        st.env.rank,
        st.env.world_size,
        info,
        st.job.train.keep_last,
        loader_state=merged_loader_state(st),
    )


def merged_loader_state(st: TrainState) -> dict[str, Any] | None:
    """Every rank's loader part joined into one world-size-free state (a collective; None for a
    loader without state). Only rank 0's copy is written."""
    if not hasattr(st.loader, "state_dict"):
        return None
    part = st.loader.state_dict()
    parts = [part]
    if st.env.world_size > 1:
        parts = [None] * st.env.world_size
        dist.all_gather_object(parts, part)
    merge = getattr(st.loader, "merge_states", None)
    return merge(parts) if merge is not None else parts[0]


def step_batches(
    st: TrainState, data_iter: Iterator[Any], n: int | None = None
) -> tuple[list[Any], Iterator[Any]]:
    """The ``n`` (default grad_accum) micro-batches of the next step, and the iterator to go on
    with.

    Why the agreement: the epoch ends at the first *global* batch that some rank cannot fill
    (one of its virtual streams ran dry). A rank knows only its own streams, so all ranks agree
    with one tiny all-reduce per step; if any rank came up short, every rank starts the next
    epoch (``loader.set_epoch``) and fetches again. The decision depends on the global sample
    sequence only, so the epoch ends at the same global batch for any number of ranks.
    """
    tc, env = st.job.train, st.env
    n = tc.grad_accum if n is None else n
    for _attempt in range(2):
        epoch = getattr(st.loader, "epoch", None)
        got = []
        while len(got) < n and (b := next(data_iter, None)) is not None:
            got.append(b)
        full = len(got) == n
        if env.world_size > 1:
            full = not _any_rank(not full, env)
        if full:
            return got, data_iter
        if epoch is not None and hasattr(st.loader, "set_epoch"):
            st.loader.set_epoch(epoch + 1)
        data_iter = iter(st.loader)
    raise ConfigError(
        f"the loader yields no full global batch of {tc.micro_batch_size * n} × "
        f"{env.world_size} ranks in an epoch (too few shards/samples; use data.resampled=true "
        "or more shards)"
    )


class BatchKeyLog:
    """``train.log_batch_keys``: RUN/train/batches.jsonl, one line per optimizer step with the
    keys of its global batch in global order (rank 0 writes; a gather of keys per step).

    Global order: micro-step k of all ranks is one contiguous range of the global sample
    sequence, in which rank r holds positions r, r+R, … (data/loader.py), so the ranks' parts
    are interleaved with :func:`~megaclass.data.loader.global_order`. On resume the lines after
    the resumed step are dropped first (a step re-run after the checkpoint writes its line
    again), like metrics.jsonl.
    """

    def __init__(self, train_dir: Path, resume_step: int, enabled: bool) -> None:
        self.path = Path(train_dir) / "batches.jsonl"
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a torn last line
            write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
        self._f = open(self.path, "a")  # noqa: SIM115 - kept open for the run

    def log(self, step: int, micro_keys: list[list[str]], env: DistEnv) -> None:
        parts = [micro_keys]
        if env.world_size > 1:
            parts = [None] * env.world_size
            dist.all_gather_object(parts, micro_keys)
        if self._f is None:
            return
        keys = [k for m in range(len(micro_keys)) for k in global_order([p[m] for p in parts])]
        self._f.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


# ======================================================================================
# Building blocks: classes, head, loader
# ======================================================================================


def build_head(job: TrainJob, env: DistEnv, num_classes: int) -> nn.Module:
    """PartialFC over this rank's slice of the classes (pfc: one label, mlcd: top-l labels)."""
    tc = job.train
    return PartialFC(
        num_classes,
        tc.embed_dim,
        sample_rate=tc.sample_rate,
        feature_rate=tc.feature_rate,
        margin=tc.margin,
        m=tc.margin_m,
        scale=tc.scale,
        num_subcenters=tc.num_subcenters,
        class_chunk=tc.head_class_chunk,
        row_chunk=tc.head_row_chunk,
        multi_label=tc.objective == "mlcd",
        interclass_threshold=tc.interclass_threshold,
        margin_kwargs=margin_kwargs(tc),
        seed=job.seed,
        dtype=torch.float64 if tc.precision == "fp64" else torch.float32,
        grad_average=True,  # embedding grads × W: the engine's averaging then gives the true gradient
    )


def make_head_optimizer(head: nn.Module, tc: Any) -> torch.optim.Optimizer:
    """The head's own optimizer (never DeepSpeed's): lr × head_lr_mult, same algorithm and
    hyper-parameters as the backbone's.

    A PartialFC head gets its row-sparse optimizer: with ``train.head_update_unsampled=false``
    (default) only the sampled class rows are decayed/updated and nothing of size C_local×D is
    touched per step (Partial FC v1); ``true`` advances every row each step (v2). Other heads
    get the stock torch optimizer.
    """
    lr = tc.lr * tc.head_lr_mult
    if hasattr(head, "make_optimizer"):
        return head.make_optimizer(
            name=tc.optimizer,
            lr=lr,
            weight_decay=tc.weight_decay,
            momentum=0.9,
            betas=(0.9, 0.999),
            eps=1e-8,
            update_unsampled=tc.head_update_unsampled,
        )
    return make_optimizer(param_groups(head, tc.weight_decay), tc, lr)


def build_loader(job: TrainJob, env: DistEnv, transform: Callable) -> Any:
    """The streaming shard loader with label sidecars joined by key (megaclass.data.loader).

    Its global batches depend on the seed, the shards, ``train.virtual_streams`` and the
    global batch size only, so a checkpoint resumes mid-epoch at any world size dividing the
    streams; every batch is full (the model-parallel head needs the same size on every rank)
    and all ranks end an epoch together (:func:`step_batches`).
    """
    tc = job.train
    if not job.data.shards:
        raise ConfigError("data.shards: empty; the train stage needs training shards")
    labels_dir = None
    if tc.objective != "siglip":  # SigLIP trains on captions, no labels needed
        labels_dir = str(job.labels_dir)
        if job.labels_dir is None or not job.labels_dir.is_dir():
            raise ConfigError(
                f"train.objective={tc.objective!r} needs label sidecars, but {labels_dir} does "
                "not exist: run `megaclass assign` first (or set assign.labels_dir)"
            )
    try:
        return TrainLoader(
            expand_shards(job.data.shards, job.data.allow_pipe_in_lists),
            tc.micro_batch_size,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=job.data.num_workers,
            seed=job.seed,
            virtual_streams=tc.virtual_streams,
            transform=transform,
            labels_dir=labels_dir,
            centroid_sha=job.centroid_sha if labels_dir else None,
            num_labels=tc.num_positive_labels if tc.objective == "mlcd" else None,
            shuffle_buffer=job.data.shuffle_buffer,
            resampled=job.data.resampled,
            drop_last=True,
            max_pixels=job.data.max_image_pixels,
            max_caption_bytes=job.data.max_caption_bytes,
            max_json_bytes=job.data.max_json_bytes,
        )
    except VirtualStreamsError as e:
        raise ConfigError(f"train.virtual_streams: {e}") from e


# ======================================================================================
# Small helpers
# ======================================================================================


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _engine_loss_scale(engine: Any) -> float:
    """The fp16 dynamic loss scale DeepSpeed multiplied into the backward (1.0 otherwise)."""
    if not engine.fp16_enabled():
        return 1.0
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    scaler = getattr(opt, "loss_scaler", None)
    return float(getattr(scaler, "cur_scale", getattr(scaler, "loss_scale", 1.0)))


def _engine_overflowed(engine: Any) -> bool:
    return bool(getattr(engine.optimizer, "overflow", False)) if engine.fp16_enabled() else False


def _any_rank(flag: bool, env: DistEnv) -> bool:
    t = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def backbone_checksum(model: nn.Module) -> list[float]:
    """(Σw, Σw²) over the replicated parameters in float64: equal on every rank when the
    backbone is in sync (saved per rank; a cheap check that nothing diverged)."""
    s1 = torch.zeros((), dtype=torch.float64)
    s2 = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        d = p.detach().double()
        s1 += d.sum().cpu()
        s2 += d.pow(2).sum().cpu()
    return [float(s1), float(s2)]


def _grad_norm(model: nn.Module) -> float:
    """2-norm of the (already all-reduced) backbone gradients, before clipping."""
    sq = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


class _StopFlag:
    """SIGUSR1/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness thread)
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class _Window:
    """Timing between two metric records."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    steps: int = 0

    def record(self, st: TrainState, loss: float, global_batch: int) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        gn = st.engine.get_global_grad_norm()
        gn = st.extra.get("grad_norm") if gn is None else gn
        return {
            "step": st.step,
            "loss": loss,
            "lr": st.extra.get("lr"),
            "head_lr": st.extra.get("head_lr"),
            "samples_per_s": self.steps * global_batch / dt,
            "data_wait_share": self.wait / dt,
            "grad_norm": float(gn) if gn is not None else None,
            "head_grad_norm": _as_float(st.extra.get("head_grad_norm")),
            "bad_steps": st.bad_total,
            "samples": st.samples,
            "time": time.time(),
        }


def _as_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step")


def batches_forever(loader: Any) -> Iterator[Any]:
    """Cycle an epoch-based loader (helper for benchmarks)."""
    while True:
        yield from loader
