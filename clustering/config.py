"""The cluster and assign sections of the run config (``cluster.*``, ``assign.*``).

Owned by the clustering package; the allowed values of string fields come from the registries
of the code that runs them (``BACKENDS`` in kmeans.py, ``HIER_PARALLEL`` in hierarchical.py,
``METHODS`` in search.py, ``FEATURES`` in data/embeddings.py), so the config accepts exactly
what can run (docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from megaclass.clustering.hierarchical import HIER_PARALLEL
from megaclass.clustering.kmeans import BACKENDS
from megaclass.clustering.search import METHODS
from megaclass.data.embeddings import FEATURES


@dataclass
class ClusterConfig:
    """Spherical k-means over the fused teacher features (the cluster stage)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "feature": FEATURES,
        "backend": BACKENDS,
        "hier_parallel": HIER_PARALLEL,
    }

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

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"method": METHODS}

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
    actor_crash_retries: int = 2
    """Times Ray restarts an assignment actor, and retries the shard whose process died, before
    the stage fails with Ray's error; Ray's default is unlimited (a crashing shard would be
    retried forever)."""
    key_shard_digits: int | None = None
    """Regroup stage: digits of the shard number at the start of img2dataset keys
    ('000120034' = shard 00012, sample 0034 -> 5). None: the width of the training shard names."""
    num_gpus_per_actor: float = 0.0
    """GPUs per assignment actor; > 0 runs the exact search on CUDA (method 'exact' only)."""
    bf16: bool = False
    """Exact search on CUDA with bfloat16 scores (about twice the rate; near-ties may order
    differently from float32). Needs num_gpus_per_actor > 0."""
