"""The k-means training sample: rows chosen by a seeded hash of their key.

A row is kept when ``hash(seed, key) < p · 2^64`` with ``p = target / total rows``. The choice
depends only on (seed, key), not on file order, worker count or how far a previous run got,
so a resumed or re-sharded run trains on exactly the same points. Stems are read one at a
time, and only the kept rows of each memory-mapped array are touched, so the folder is
streamed; only the sample itself is held in memory. The sample size is ``target`` in
expectation (binomial), all rows when ``target >= total``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from megaclass.data.embeddings import load_shard, metadata_path, read_column, read_keys
from tqdm import tqdm

log = logging.getLogger(__name__)


def key_hash(keys: list[str], seed: int) -> np.ndarray:
    """Deterministic uint64 hash of each key under ``seed`` (BLAKE2b, 8 bytes)."""
    salt = seed.to_bytes(8, "little", signed=True)
    out = np.empty(len(keys), dtype=np.uint64)
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(
            hashlib.blake2b(k.encode(), digest_size=8, salt=salt).digest(), "little"
        )
    return out


def keep_threshold(target: int, total: int) -> int | None:
    """uint64 threshold for the hash, or None for 'keep everything'."""
    if target >= total:
        return None
    return int(target / total * 2**64)


@dataclass
class ClusterSample:
    keys: list[str]
    x: np.ndarray  # float32 (n, d), L2-normalised
    classes: list | None  # ground-truth classes (metadata 'class'), when every stem has them
    rows: dict[str, np.ndarray]  # stem -> kept row indices
    total_rows: int


def load_sample(
    embed_dir: str | Path, stems: list[str], feature: str, target: int, seed: int
) -> ClusterSample:
    embed_dir = Path(embed_dir)
    total = sum(pq.ParquetFile(metadata_path(embed_dir, s)).metadata.num_rows for s in stems)
    thr = keep_threshold(target, total)
    keys: list[str] = []
    xs: list[np.ndarray] = []
    classes: list | None = []
    rows: dict[str, np.ndarray] = {}
    for stem in tqdm(stems, desc="sample", leave=False, mininterval=2):
        skeys = read_keys(embed_dir, stem)
        if thr is None:
            idx = np.arange(len(skeys), dtype=np.int64)
        else:
            idx = np.flatnonzero(key_hash(skeys, seed) < np.uint64(thr)).astype(np.int64)
        rows[stem] = idx
        if len(idx) == 0:
            continue
        k, x = load_shard(embed_dir, stem, feature, rows=idx)
        keys.extend(k)
        xs.append(x)
        if classes is not None:
            col = read_column(embed_dir, stem, "class")
            classes = None if col is None else classes + [col[i] for i in idx]
    if not xs:
        raise ValueError(f"{embed_dir}: the sample is empty (target {target}, {total} rows)")
    x = np.concatenate(xs)
    log.info("sample: %d of %d rows (target %d, seed %d)", len(x), total, target, seed)
    return ClusterSample(keys, x, classes, rows, total)
