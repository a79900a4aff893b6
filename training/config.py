"""The train section of the run config (``train.*``) and what a training job is handed.

Owned by the training package, beside the trainer. The margin names come from the margin
registry (``training/margins.py``); the other lists of choices are owned here and used by the
code that dispatches on them. ``TrainJob`` is the trainer's whole input: the train stage
(``pipelines/train.py``) resolves the run directory, bring-your-own inputs and the class
count, so the trainer never looks at other stages' folders (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from megaclass.data.config import DataConfig
from megaclass.training.margins import MARGINS

OBJECTIVES = ("pfc", "mlcd", "siglip")
"""Training objectives: partial-FC margin softmax, MLCD multi-label, SigLIP image-text."""
OPTIMIZERS = ("adamw", "sgd")
"""Backbone (and head) optimizers built by training/engine.py."""
PRECISIONS = ("fp32", "bf16", "fp16", "fp64")
"""Training precisions (fp16 is refused on CPU by engine.check_precision; fp64 is for CPU
references and determinism checks: backbone, head and inputs in float64)."""
LAUNCHERS = ("torchrun", "deepspeed")
"""How `megaclass run` starts several local ranks."""


@dataclass
class TrainConfig:
    """Student training on pseudo-labels with DeepSpeed (the train stage)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "objective": OBJECTIVES,
        "margin": MARGINS,
        "optimizer": OPTIMIZERS,
        "precision": PRECISIONS,
        "launcher": LAUNCHERS,
    }

    objective: str = "pfc"
    """'pfc' (partial-FC margin softmax), 'mlcd' (multi-label) or 'siglip' (image-text)."""
    model: str = "efficientnet-lite0"
    """Backbone: 'efficientnet-lite0' or 'open_clip:<model name>' (its vision tower)."""
    pretrained: str | None = None
    """open_clip backbones: pretrained tag or local file; efficientnet-lite0 loads its shipped weights when set to 'shipped'."""
    embed_dim: int = 256
    """Size of the projected embedding the head sees."""
    margin: str = "arcface"
    """Margin: 'arcface', 'arcface_detached', 'cosface', 'combined', 'adaface', 'elastic_arc', 'elastic_cos',
    'elastic_arc_plus', 'elastic_cos_plus', 'none' (the registry of training/margins.py)."""
    margin_m: float = 0.3
    """Margin m (ArcFace angle / CosFace cosine offset)."""
    scale: float = 32.0
    """Logit scale s."""
    margin_m1: float = 1.0
    """Margin 'combined': multiplicative angular margin m1 in s·(cos(m1·θ + m2) − m3); m2 is margin_m."""
    margin_m3: float = 0.0
    """Margin 'combined': additive cosine margin m3 in s·(cos(m1·θ + m2) − m3)."""
    elastic_std: float | None = None
    """ElasticFace margins: σ of the per-sample margin N(margin_m, σ). None: the paper's value for
    the chosen margin (elastic_arc/elastic_cos 0.05, elastic_arc_plus 0.0175, elastic_cos_plus 0.02)."""
    adaface_h: float = 0.333
    """Margin 'adaface': h, how strongly the feature norm adapts the margin (paper: 0.333)."""
    adaface_t_alpha: float = 0.01
    """Margin 'adaface': momentum of the feature-norm mean/std running averages (paper: 0.01)."""
    interclass_threshold: float | None = None
    """Objective 'pfc': negatives with cosine above this get logit 0 and no gradient (Unicom's
    inter-class filtering of near-duplicate classes; None: off)."""
    sample_rate: float = 0.1
    """Class sampling rate r of partial FC: each rank scores int(r x its classes) per step in
    total, the batch's positive classes first and random negatives for the rest (1.0 = all
    classes). The same budget for pfc and mlcd: for MLCD it is not a negative ratio."""
    feature_rate: float = 1.0
    """Feature-dimension sampling rate f (Unicom's dual random selection; 1.0 = all dims)."""
    num_subcenters: int = 1
    """Sub-centres per class in the head (sub-center ArcFace uses 3)."""
    head_class_chunk: int | None = None
    """Partial-FC head: score each rank's sampled classes in chunks of this many and recompute
    each chunk's logits in the backward, so the head's working memory is bounded by global batch
    x head_class_chunk instead of global batch x sampled classes (for 10M+ classes; same loss and
    gradients, one more matmul per step). For when even the sampled rows (r·C/N × D) are too
    many; head_row_chunk is faster. None: one block (docs/training.md, partial-FC head)."""
    head_row_chunk: int | None = None
    """Partial-FC head: score the global batch's rows this many at a time against all sampled
    classes and compute their gradients at once, so the logit block is head_row_chunk x sampled
    classes instead of global batch x sampled classes; no extra matmul, same loss and gradients.
    Excludes head_class_chunk. None: all rows at once (docs/training.md, partial-FC head)."""
    head_update_unsampled: bool = False
    """Head optimizer also decays/advances momentum of unsampled class rows (Partial FC v2); False = only sampled rows change (v1)."""
    num_positive_labels: int = 8
    """MLCD: positive labels per sample (top-l of the assignment)."""
    steps: int = 100
    """Optimizer steps to train."""
    micro_batch_size: int = 32
    """Samples per rank per forward pass."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    lr: float = 1e-3
    """Peak learning rate of the backbone."""
    head_lr_mult: float = 1.0
    """Head learning rate = lr x this."""
    weight_decay: float = 0.05
    """AdamW weight decay (backbone and head)."""
    optimizer: str = "adamw"
    """'adamw' or 'sgd'."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    grad_clip: float = 1.0
    """Gradient-norm clipping of the backbone (0 disables)."""
    precision: str = "fp32"
    """'fp32', 'bf16', 'fp16' or 'fp64' (float64 backbone and head: slow, for reference runs and
    the world-size determinism tests)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2."""
    ds_config: str | None = None
    """A DeepSpeed JSON config file merged over the generated one."""
    ckpt_every: int = 50
    """Checkpoint every N steps (and on SIGUSR1/SIGTERM)."""
    keep_last: int = 2
    """Complete checkpoints kept."""
    log_every: int = 10
    """Metrics every N steps."""
    eval_every: int = 0
    """Retrieval eval of the student on data.eval_shards every N optimizer steps (0: off): rank 0
    embeds up to train.eval_max_images held-out images and logs Recall@1 and mAP@R to
    metrics.jsonl ("kind": "eval") and TensorBoard/W&B (eval/…); the other ranks wait. It
    consumes no randomness and leaves the training result unchanged (docs/evaluation.md)."""
    eval_max_images: int = 2000
    """train.eval_every: the first N labelled images of data.eval_shards, decoded and transformed
    once and kept in memory (N x 3 x size² x 4 bytes: 1.2 GB for 2000 at 224 px)."""
    wandb_project: str | None = None
    """Weights & Biases project that rank 0 also logs the training scalars, the config and the
    eval table to (None: off). Needs `pip install wandb`; WANDB_MODE=offline and WANDB_DIR are
    honoured (default folder RUN/train/wandb)."""
    wandb_run_name: str | None = None
    """Weights & Biases run name (None: W&B picks one). Only with train.wandb_project."""
    wandb_tags: list[str] = field(default_factory=list)
    """Weights & Biases run tags. Only with train.wandb_project."""
    max_bad_steps: int = 5
    """Stop with an error after this many consecutive non-finite losses."""
    freeze_backbone: bool = False
    """Train only the projection and head."""
    nproc: int = 1
    """Ranks that `megaclass run` and `megaclass train` start on this machine (an outer
    deepspeed/torchrun/srun launch sets the ranks itself)."""
    virtual_streams: int = 64
    """Virtual data streams V of the training loader: the shard list is dealt to V streams (each
    with its own shuffle buffer and augmentation seeds) whose round robin is the sample order,
    so the global batches depend on the seed, the shards and the global batch size only. Any
    world size that divides V (with fewer shards than V: the largest divisor of V not above the
    shard count) resumes mid-epoch with the same batches. Changing it changes the order
    (docs/training.md, 'Elastic resume')."""
    log_batch_keys: bool = False
    """Rank 0 writes RUN/train/batches.jsonl: per optimizer step {"step", "keys"}, the sample keys
    of the global batch in global order (one gather of keys per step), to check the order."""
    launcher: str = "torchrun"
    """How `megaclass run` starts nproc > 1 ranks on this machine: 'torchrun' (torch.distributed.run) or 'deepspeed' (the deepspeed launcher)."""


ELASTIC_STD = {
    "elastic_arc": 0.05,
    "elastic_cos": 0.05,
    "elastic_arc_plus": 0.0175,
    "elastic_cos_plus": 0.02,
}
"""ElasticFace's σ per margin, from the paper's configurations."""


def margin_kwargs(tc: TrainConfig) -> dict[str, float]:
    """The constructor arguments of ``tc.margin`` beyond scale and m, from the typed fields."""
    if tc.margin == "combined":
        return {"m1": tc.margin_m1, "m3": tc.margin_m3}
    if tc.margin == "adaface":
        return {"h": tc.adaface_h, "t_alpha": tc.adaface_t_alpha}
    if tc.margin in ELASTIC_STD:
        return {"std": ELASTIC_STD[tc.margin] if tc.elastic_std is None else tc.elastic_std}
    return {}


def margin_option_errors(tc: TrainConfig) -> list[str]:
    """Margin settings that the chosen margin or objective would ignore, or that are invalid."""
    out = []
    d = TrainConfig
    used = {
        "margin_m1": tc.margin == "combined",
        "margin_m3": tc.margin == "combined",
        "elastic_std": tc.margin in ELASTIC_STD,
        "adaface_h": tc.margin == "adaface",
        "adaface_t_alpha": tc.margin == "adaface",
        "interclass_threshold": tc.objective == "pfc",
    }
    for key, ok in used.items():
        if not ok and getattr(tc, key) != getattr(d, key):
            out.append(
                f"train.{key}: not used with train.margin={tc.margin!r}, objective={tc.objective!r}"
            )
    if tc.margin_m1 <= 0:
        out.append(f"train.margin_m1: must be > 0, got {tc.margin_m1}")
    if tc.elastic_std is not None and tc.elastic_std < 0:
        out.append(f"train.elastic_std: must be >= 0, got {tc.elastic_std}")
    if not 0.0 < tc.adaface_t_alpha <= 1.0:
        out.append(f"train.adaface_t_alpha: must be in (0, 1], got {tc.adaface_t_alpha}")
    if tc.head_class_chunk is not None and tc.head_class_chunk < 1:
        out.append(f"train.head_class_chunk: must be >= 1 or null, got {tc.head_class_chunk}")
    if tc.head_row_chunk is not None and tc.head_row_chunk < 1:
        out.append(f"train.head_row_chunk: must be >= 1 or null, got {tc.head_row_chunk}")
    if tc.head_row_chunk is not None and tc.head_class_chunk is not None:
        out.append("train.head_row_chunk: excludes train.head_class_chunk; set one of them")
    if tc.precision == "fp64" and tc.zero_stage != 0:
        out.append(f"train.precision: fp64 runs with train.zero_stage=0 only, got {tc.zero_stage}")
    if tc.virtual_streams < 1:
        out.append(f"train.virtual_streams: must be >= 1, got {tc.virtual_streams}")
    elif tc.virtual_streams % max(1, tc.nproc):
        out.append(
            f"train.virtual_streams: {tc.virtual_streams} is not divisible by train.nproc="
            f"{tc.nproc} (each rank reads an equal share of the virtual streams)"
        )
    for key in ("head_class_chunk", "head_row_chunk"):
        if getattr(tc, key) is not None and tc.objective == "siglip":
            out.append(f"train.{key}: siglip has no class head; remove it")
    return out


@dataclass
class TrainJob:
    """Everything one training run needs, resolved by the train stage before the ranks start."""

    train: TrainConfig
    """The train section."""
    data: DataConfig
    """The data section (shards, decoding, loader workers)."""
    seed: int
    """The run's global seed."""
    train_dir: Path
    """RUN/train: metrics.jsonl, TensorBoard events and ckpt/ go here."""
    num_classes: int = 0
    """Pseudo-classes of the head (rows of the centroids); 0 for SigLIP."""
    labels_dir: Path | None = None
    """Folder of <shard stem>.parquet label sidecars (None for SigLIP)."""
    centroid_sha: str | None = None
    """sha256 of the centroids the labels must come from (None: not checked)."""
    eval_hook: Callable[[int, Any, Any], dict[str, float]] | None = None
    """Not user config: ``hook(step, backbone, eval_transform) -> metrics`` that the trainer calls
    every train.eval_every steps (set by the train stage: pipelines/train_eval.py)."""

    @property
    def ckpt_dir(self) -> Path:
        """RUN/train/ckpt: one step-NNNNNNN folder per checkpoint."""
        return self.train_dir / "ckpt"
