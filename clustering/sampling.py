"""The k-means training sample: rows chosen by a seeded hash of their key.

A row is kept when ``hash(seed, key) < p · 2^64`` with ``p = target / total rows``. The choice
depends only on (seed, key), not on file order, worker count or how far a previous run got,
so a resumed or re-sharded run trains on exactly the same points. Stems are read one at a
time, and only the kept rows of each memory-mapped array are touched, so the folder is
streamed; only the sample itself is held in memory (allocated once, at its exact size). The sample size is ``target`` in
expectation (binomial), all rows when ``target >= total``.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from megaclass.data.embeddings import (
    feature_dim,
    load_shard,
    metadata_path,
    read_column,
    read_keys,
)
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
    embed_dir: str | Path,
    stems: list[str],
    feature: str,
    target: int,
    seed: int,
    threads: int = 8,
) -> ClusterSample:
    """The seeded key-hash sample of ``stems``, streamed: one pass picks the rows of every stem
    (row counts and keys only), then the sample array is allocated once at its exact size and
    filled stem by stem. Peak memory is the sample itself plus one stem's rows per thread; the
    cost is linear in the number of stems and rows (threads overlap the file reads)."""
    embed_dir = Path(embed_dir)

    def num_rows(stem: str) -> int:
        return pq.ParquetFile(metadata_path(embed_dir, stem)).metadata.num_rows

    with ThreadPoolExecutor(max(1, threads)) as pool:
        total = sum(pool.map(num_rows, stems))
        thr = keep_threshold(target, total)

        def choose(stem: str) -> np.ndarray:
            skeys = read_keys(embed_dir, stem)
            if thr is None:
                return np.arange(len(skeys), dtype=np.int64)
            return np.flatnonzero(key_hash(skeys, seed) < np.uint64(thr)).astype(np.int64)

        picked = tqdm(pool.map(choose, stems), total=len(stems), desc="sample", leave=False)
        rows = dict(zip(stems, picked, strict=True))
        n = sum(len(idx) for idx in rows.values())
        if n == 0:
            raise ValueError(f"{embed_dir}: the sample is empty (target {target}, {total} rows)")
        used = [s for s in stems if len(rows[s])]
        x = np.empty((n, feature_dim(embed_dir, used[0], feature)), dtype=np.float32)
        keys: list[str] = [""] * n
        labels: list = [None] * n
        has_classes = [True]
        starts = np.concatenate([[0], np.cumsum([len(rows[s]) for s in used])])

        def fill(j: int) -> None:
            stem, lo = used[j], int(starts[j])
            idx = rows[stem]
            k, xs = load_shard(embed_dir, stem, feature, rows=idx)
            x[lo : lo + len(idx)] = xs
            keys[lo : lo + len(idx)] = k
            col = read_column(embed_dir, stem, "class")
            if col is None:
                has_classes[0] = False
            else:
                labels[lo : lo + len(idx)] = [col[i] for i in idx]

        list(pool.map(fill, range(len(used))))
    log.info("sample: %d of %d rows (target %d, seed %d)", n, total, target, seed)
    return ClusterSample(keys, x, labels if has_classes[0] else None, rows, total)
