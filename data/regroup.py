"""Label sidecars per training shard, rebuilt by key from labels grouped any other way.

Why: labels are assigned where the embeddings are. When those are LAION's published parts
(``metadata_<i>.parquet``, ~1M rows each, cutting across the img2dataset shards) or any other
bring-your-own folder, the sidecars are named after the parts, while the trainer joins labels
to a shard through ``<labels dir>/<shard stem>.parquet``. img2dataset's keys say which shard a
sample is in: the shard number zero-padded, then the index inside the shard
(``000120034`` = shard ``00012``, sample ``0034`` with 5 + 4 digits). This module streams the
parts once and writes one sidecar per training shard.

Two passes, both linear and resumable:

1. every part is split by shard into fragments ``OUT/.fragments/<shard>/<part>.parquet`` (one part in memory per
   thread); a ``_done/parts/<part>.json`` record, written last, marks a part done;
2. every training shard's fragments are merged (part order; the first row of a key wins) into
   ``OUT/<shard>.parquet``, written atomically, then its ``_done/shards/<shard>.json`` record.

Nothing is dropped silently: label rows whose key is malformed (``bad_key``) or names a shard
that is not a training shard (``not_in_training_shards``), keys seen more than once
(``duplicate_key``) and training shards that get no label row are counted, with examples, in the
summary. Training samples without a label row are counted by the loader (``missing_label``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from megaclass.core.atomic import atomic_path, write_json_atomic
from megaclass.core.errors import UserError
from megaclass.data.embeddings import key_from_path  # noqa: F401  (moved there; re-exported)
from megaclass.data.labels import fixed_width, read_label_sha, write_labels
from tqdm import tqdm

log = logging.getLogger(__name__)

EXAMPLES = 10
"""Example keys kept per mismatch kind in the summary."""


class RegroupError(UserError, ValueError):
    """The labels cannot be regrouped as configured; the message names the key or file."""


def infer_shard_digits(stems: Iterable[str]) -> int:
    """Width of the shard number in keys: the width of the training shard names when they are
    all zero-padded numbers of one width (img2dataset's ``00012.tar``)."""
    widths = {len(s) for s in stems if s.isdigit()}
    non_digit = [s for s in stems if not s.isdigit()]
    if non_digit or len(widths) != 1:
        shown = ", ".join(non_digit[:3]) or f"widths {sorted(widths)}"
        raise RegroupError(
            "cannot infer the shard-number width of the keys from the training shard names "
            f"({shown}): set assign.key_shard_digits"
        )
    return widths.pop()


def shard_of_keys(keys: pa.Array, shard_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(shard number int64, valid bool)`` per key: a valid key is all digits and longer than
    ``shard_digits``; its shard is the number in its first ``shard_digits`` characters."""
    keys = pc.cast(keys, pa.string())
    valid = pc.and_(
        pc.fill_null(pc.utf8_is_digit(keys), False),
        pc.greater(pc.fill_null(pc.utf8_length(keys), 0), shard_digits),
    )
    head = pc.utf8_slice_codeunits(
        pc.if_else(valid, keys, pa.scalar("0" * (shard_digits + 1))), 0, shard_digits
    )
    shard = pc.cast(head, pa.int64()).to_numpy(zero_copy_only=False)
    return shard, np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)


@dataclass
class Tally:
    """Counts and example keys of every mismatch kind."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, keys: list[str], n: int | None = None) -> None:
        if n is None:
            n = len(keys)
        if n == 0:
            return
        self.counts[kind] = self.counts.get(kind, 0) + n
        ex = self.examples.setdefault(kind, [])
        ex.extend(k for k in keys[: EXAMPLES - len(ex)] if k is not None)

    def merge(self, other: dict[str, Any]) -> None:
        for kind, n in other.get("counts", {}).items():
            self.add(kind, list(other.get("examples", {}).get(kind, [])), n)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": dict(self.examples)}


def _done(out: Path, kind: str, name: str) -> Path:
    return out / "_done" / kind / f"{name}.json"


def _read_done(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent or torn: not done


def split_part(
    part: Path, out: Path, shard_names: dict[int, str], shard_digits: int
) -> dict[str, Any]:
    """Pass 1 for one part: its rows by shard into fragments; returns the part's record."""
    table = pq.read_table(part, columns=["key", "labels", "scores"])
    tally = Tally()
    shard, valid = shard_of_keys(table.column("key").combine_chunks(), shard_digits)
    keys = table.column("key")
    bad = np.flatnonzero(~valid)
    tally.add(
        "bad_key", [str(k) for k in keys.take(pa.array(bad[:EXAMPLES])).to_pylist()], len(bad)
    )
    known = valid & np.isin(shard, np.fromiter(shard_names, dtype=np.int64, count=len(shard_names)))
    foreign = np.flatnonzero(valid & ~known)
    tally.add(
        "not_in_training_shards",
        keys.take(pa.array(foreign[:EXAMPLES])).to_pylist(),
        len(foreign),
    )
    rows = np.flatnonzero(known)
    order = rows[np.argsort(shard[rows], kind="stable")]
    sorted_shards = shard[order]
    bounds = np.flatnonzero(np.diff(sorted_shards)) + 1
    fragments = 0
    for chunk in np.split(order, bounds) if len(order) else []:
        name = shard_names[int(shard[chunk[0]])]
        with atomic_path(
            out / ".fragments" / name / f"{part.stem}.parquet", suffix=".parquet"
        ) as tmp:
            pq.write_table(table.take(pa.array(chunk)), tmp)
        fragments += 1
    record = {"rows": table.num_rows, "kept": len(rows), "fragments": fragments, **tally.as_dict()}
    write_json_atomic(_done(out, "parts", part.stem), record)
    return record


def merge_shard(out: Path, name: str, parts: list[str], sha: str) -> dict[str, Any]:
    """Pass 2 for one training shard: its fragments (part order) into ``OUT/<name>.parquet``."""
    tables = []
    for p in parts:
        f = out / ".fragments" / name / f"{p}.parquet"
        if f.is_file():
            tables.append(pq.read_table(f))
    tally = Tally()
    if tables:
        t = pa.concat_tables(tables)
        if pc.count_distinct(t.column("key")).as_py() < t.num_rows:  # rare: find the repeats
            seen: set[str] = set()
            keep, dups = [], []
            for i, k in enumerate(t.column("key").to_pylist()):
                if k in seen:
                    dups.append(k)
                else:
                    seen.add(k)
                    keep.append(i)
            tally.add("duplicate_key", dups)
            t = t.take(pa.array(keep, type=pa.int64()))
        where = str(out / ".fragments" / name)
        labels = fixed_width(t.column("labels"), t.num_rows, np.int64, where, "labels")
        scores = fixed_width(t.column("scores"), t.num_rows, np.float32, where, "scores")
        out_keys = t.column("key").to_pylist()
    else:
        out_keys, labels, scores = [], np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32)
    write_labels(out / f"{name}.parquet", out_keys, labels, scores, sha)
    record = {"rows": len(out_keys), **tally.as_dict()}
    write_json_atomic(_done(out, "shards", name), record)
    return record


def regroup_labels(
    labels_dir: str | Path,
    shard_stems: list[str],
    out_dir: str | Path,
    shard_digits: int | None = None,
    threads: int = 8,
) -> dict[str, Any]:
    """Write one sidecar per training shard in ``out_dir`` from the sidecars in ``labels_dir``
    (any grouping), resuming from the done records; returns the summary with every count."""
    labels_dir, out = Path(labels_dir), Path(out_dir)
    parts = sorted(p for p in labels_dir.glob("*.parquet") if not p.name.startswith("."))
    if not parts:
        raise RegroupError(f"{labels_dir}: no label sidecars (*.parquet) to regroup")
    digits = shard_digits if shard_digits is not None else infer_shard_digits(shard_stems)
    names: dict[int, str] = {}
    for s in shard_stems:
        if not (s.isdigit() and len(s) == digits):
            raise RegroupError(
                f"training shard {s!r} is not a {digits}-digit shard number, so no key can name "
                "it (assign.key_shard_digits, data.shards)"
            )
        names[int(s)] = s
    shas = {read_label_sha(p) for p in parts}
    if len(shas) != 1 or None in shas:
        raise RegroupError(
            f"{labels_dir}: the sidecars carry different centroid shas {sorted(map(str, shas))}"
        )
    sha = shas.pop()
    out.mkdir(parents=True, exist_ok=True)

    tally = Tally()
    rows_in = 0
    todo = [p for p in parts if _read_done(_done(out, "parts", p.stem)) is None]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(
            tqdm(
                pool.map(lambda p: split_part(p, out, names, digits), todo),
                total=len(todo),
                desc="regroup: split parts",
                unit="part",
                mininterval=2,
            )
        )
        for p in parts:
            rec = _read_done(_done(out, "parts", p.stem)) or {}
            rows_in += rec.get("rows", 0)
            tally.merge(rec)
        part_names = [p.stem for p in parts]
        todo_shards = [s for s in shard_stems if _read_done(_done(out, "shards", s)) is None]
        list(
            tqdm(
                pool.map(lambda s: merge_shard(out, s, part_names, sha), todo_shards),
                total=len(todo_shards),
                desc="regroup: merge shards",
                unit="shard",
                mininterval=2,
            )
        )
    rows_out = 0
    empty: list[str] = []
    for s in shard_stems:
        rec = _read_done(_done(out, "shards", s)) or {}
        rows_out += rec.get("rows", 0)
        tally.merge(rec)
        if rec.get("rows", 0) == 0:
            empty.append(s)
    tally.add("training_shard_without_labels", empty)
    summary = {
        "regrouped": True,
        "labels_dir": str(labels_dir),
        "parts": len(parts),
        "training_shards": len(shard_stems),
        "key_shard_digits": digits,
        "rows_in": rows_in,
        "rows_out": rows_out,
        "centroid_sha256": sha,
        "mismatches": tally.as_dict(),
    }
    log.info(
        "regroup: %d label rows from %d parts -> %d rows in %d shard sidecars; mismatches %s",
        rows_in,
        len(parts),
        rows_out,
        len(shard_stems),
        tally.counts or "none",
    )
    return summary
