"""Label sidecars: per input shard, ``key → cls, top-k labels, scores``, tied to one centroid set.

``RUN/labels/<stem>.parquet`` has columns ``key`` (string), ``cls`` (int64, = labels[0]),
``labels`` (list<int64>, best first), ``scores`` (list<float32>), and the parquet file
metadata entry ``b"centroid_sha256"`` = hex sha256 of the ``centroids.npy`` bytes the labels
were computed from. Training refuses a sidecar whose sha differs from the centroids it
expects: labels from an older clustering would silently train against the wrong classes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from megaclass.core.atomic import atomic_path
from megaclass.core.errors import UserError

SHA_KEY = b"centroid_sha256"


class LabelFileError(UserError, ValueError):
    """A label sidecar that is missing columns or has inconsistent rows (names the file)."""


class LabelShaMismatchError(UserError, ValueError):
    """A label sidecar computed from other centroids than the ones expected.

    Constructed as ``LabelShaMismatchError(path, found, expected)``; a single argument is
    taken as the whole message (so the error survives a DataLoader worker's re-raise).
    """

    def __init__(self, path: str, found: str | None = None, expected: str | None = None) -> None:
        self.path, self.found, self.expected = str(path), found, expected
        if found is None and expected is None:
            msg = str(path)
        else:
            msg = (
                f"{path}: label sidecar was computed from centroids with sha256 {found!r}, "
                f"but this run expects {expected!r}; re-run the assign stage for the "
                "current centroids (stale labels would train against the wrong classes)"
            )
        super().__init__(msg)


@dataclass
class LabelTable:
    """One sidecar in memory: row i ↔ keys[i]; ``labels`` (n,k) int64, ``scores`` (n,k) float32."""

    keys: list[str]
    labels: np.ndarray
    scores: np.ndarray
    centroid_sha: str | None = None

    def index(self) -> dict[str, int]:
        """key → row, for joining samples to their labels."""
        return {k: i for i, k in enumerate(self.keys)}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (used for ``centroids.npy``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def label_path(labels_dir: str | os.PathLike, stem: str) -> Path:
    """Where the sidecar of shard ``stem`` lives."""
    return Path(labels_dir) / f"{stem}.parquet"


def _list_array(values: np.ndarray, typ: pa.DataType) -> pa.Array:
    n, k = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=typ))


def write_labels(
    path: str | os.PathLike,
    keys: list[str],
    labels: np.ndarray,
    scores: np.ndarray,
    centroid_sha: str,
) -> None:
    """Write one sidecar atomically. ``labels`` (n,k) int64 best first, ``scores`` (n,k)."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if labels.ndim == 1:
        labels = labels[:, None]
    if scores.ndim == 1:
        scores = scores[:, None]
    n = len(keys)
    if labels.shape[0] != n or scores.shape != labels.shape or labels.shape[1] < 1:
        raise ValueError(
            f"{path}: {n} keys but labels {labels.shape} and scores {scores.shape} "
            "(expected both (n, k) with k ≥ 1)"
        )
    if not centroid_sha:
        raise ValueError(f"{path}: a centroid sha is required")
    table = pa.table(
        {
            "key": pa.array(list(keys), type=pa.string()),
            "cls": pa.array(labels[:, 0], type=pa.int64()),
            "labels": _list_array(labels, pa.int64()),
            "scores": _list_array(scores, pa.float32()),
        }
    )
    table = table.replace_schema_metadata({SHA_KEY: centroid_sha.encode()})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def read_label_sha(path: str | os.PathLike) -> str | None:
    """The centroid sha stored in a sidecar's footer (reads only the metadata)."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(SHA_KEY)
    return raw.decode() if raw is not None else None


def check_label_sha(path: str | os.PathLike, expected_sha: str | None) -> str | None:
    """Raise :class:`LabelShaMismatchError` unless the sidecar's sha is ``expected_sha``."""
    found = read_label_sha(path)
    if expected_sha is not None and found != expected_sha:
        raise LabelShaMismatchError(str(path), found, expected_sha)
    return found


def fixed_width(col: pa.ChunkedArray, n: int, dtype: np.dtype, path: str, name: str) -> np.ndarray:
    """A list column whose rows all have the same length k as an (n, k) array (names the file)."""
    arr = col.combine_chunks()
    if arr.null_count:
        raise LabelFileError(f"{path}: column {name!r} has null rows")
    offsets = np.asarray(arr.offsets)
    lengths = np.diff(offsets)
    if n and (lengths.min() != lengths.max() or lengths[0] < 1):
        raise LabelFileError(f"{path}: column {name!r} rows have different lengths")
    k = int(lengths[0]) if n else 0
    flat = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=dtype)
    flat = flat[offsets[0] : offsets[0] + n * k]
    return flat.reshape(n, k)


def read_labels(path: str | os.PathLike, expected_sha: str | None = None) -> LabelTable:
    """Load a sidecar; refuse it if its centroid sha is not ``expected_sha`` (when given)."""
    path = str(path)
    found = check_label_sha(path, expected_sha)
    table = pq.read_table(path)
    missing = {"key", "labels", "scores"} - set(table.column_names)
    if missing:
        raise LabelFileError(f"{path}: missing column(s) {sorted(missing)}")
    n = table.num_rows
    keys = table.column("key").to_pylist()
    labels = fixed_width(table.column("labels"), n, np.int64, path, "labels")
    scores = fixed_width(table.column("scores"), n, np.float32, path, "scores")
    if labels.shape != scores.shape:
        raise LabelFileError(f"{path}: labels {labels.shape} vs scores {scores.shape}")
    return LabelTable(keys=keys, labels=labels, scores=scores, centroid_sha=found)
