"""Labels assigned on embedding parts (LAION's layout) regrouped into per-training-shard sidecars.

Parts cut across shards as LAION's published parts do; every mismatch kind is planted (bad keys,
keys of shards that are not training shards, a key in two parts, a training shard with no label
row) and must be counted, never dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from megaclass.data.labels import read_labels, write_labels
from megaclass.data.regroup import (
    RegroupError,
    infer_shard_digits,
    key_from_path,
    regroup_labels,
    shard_of_keys,
)
from megaclass.pipelines.config import labels_dir_of, load_config
from megaclass.pipelines.regroup import run_regroup

SHA = "ab" * 32
SHARDS = [f"{i:05d}" for i in range(5)]  # 00003 gets no label row


def _label(key: str) -> list[int]:
    h = sum(map(ord, key))
    return [h % 97, (h + 1) % 97]


def _parts(root: Path) -> tuple[Path, dict[str, list[str]]]:
    """Three parts cutting across shards 0-4 (no rows for shard 3) plus planted mismatches."""
    keys = [f"{s:05d}{i:04d}" for s in (0, 1, 2, 4) for i in range(7)]
    cuts = [0, 10, 19, len(keys)]
    parts = [keys[a:b] for a, b in zip(cuts, cuts[1:])]
    parts[0] += ["abc", "123"]  # bad keys: not digits / not longer than the shard number
    parts[1] += ["000990001"]  # shard 00099 is not a training shard
    parts[2] += [parts[0][0]]  # the same key in two parts: the first part's row wins
    out = root / "labels_by_part"
    for j, ks in enumerate(parts):
        lab = np.array([_label(k) for k in ks], dtype=np.int64)
        if j == 2:
            lab[-1] = [96, 96]  # the duplicate carries other labels: must not win
        write_labels(out / f"metadata_{j}.parquet", ks, lab, lab.astype(np.float32) / 100, SHA)
    expected = {s: [k for k in keys if k.startswith(s)] for s in SHARDS}
    return out, expected


def test_regroup_counts_every_mismatch_and_resumes(tmp_path: Path) -> None:
    src, expected = _parts(tmp_path)
    out = tmp_path / "shard_labels"
    summary = regroup_labels(src, SHARDS, out)
    assert summary["key_shard_digits"] == 5 and summary["parts"] == 3
    for s in SHARDS:
        t = read_labels(out / f"{s}.parquet", expected_sha=SHA)
        assert t.keys == expected[s]
        assert t.labels.tolist() == [_label(k) for k in expected[s]]
    m = summary["mismatches"]["counts"]
    assert m == {
        "bad_key": 2,
        "not_in_training_shards": 1,
        "duplicate_key": 1,
        "training_shard_without_labels": 1,
    }
    ex = summary["mismatches"]["examples"]
    assert set(ex["bad_key"]) == {"abc", "123"} and ex["not_in_training_shards"] == ["000990001"]
    assert ex["training_shard_without_labels"] == ["00003"]
    assert summary["rows_in"] == 28 + 4 and summary["rows_out"] == 28

    # resume: a shard whose sidecar and record are gone, a part whose record is gone
    before = (out / "00001.parquet").read_bytes()
    (out / "00001.parquet").unlink()
    (out / "_done" / "shards" / "00001.json").unlink()
    (out / "_done" / "parts" / "metadata_1.json").unlink()
    again = regroup_labels(src, SHARDS, out)
    assert (out / "00001.parquet").read_bytes() == before
    assert again["mismatches"] == summary["mismatches"] and again["rows_out"] == 28


def test_key_digits_inference_and_errors(tmp_path: Path) -> None:
    assert infer_shard_digits(["00012", "41455"]) == 5
    with pytest.raises(RegroupError, match="assign.key_shard_digits"):
        infer_shard_digits(["shard-a", "00001"])
    shard, valid = shard_of_keys(pa.array(["000120034", "x1", None, "00012"]), 5)
    assert shard[0] == 12 and valid.tolist() == [True, False, False, False]
    src, _ = _parts(tmp_path)
    with pytest.raises(RegroupError, match="not a 5-digit shard number"):
        regroup_labels(src, ["00001", "7"], tmp_path / "o", shard_digits=5)


def test_key_from_clip_retrieval_image_path() -> None:
    paths = pa.array(["/data/laion/00012/000120034.jpg", "00012.tar/000120035.webp", "000120036"])
    assert key_from_path(paths).to_pylist() == ["000120034", "000120035", "000120036"]


def test_stage_regroups_byo_labels_and_points_training_there(tmp_path: Path) -> None:
    src, expected = _parts(tmp_path)
    shards = "::".join(f"/data/laion/{s}.tar" for s in SHARDS)
    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", f"data.shards={shards}", f"assign.labels_dir={src}"])
    assert labels_dir_of(cfg) == src
    summary = run_regroup(cfg)
    assert summary["regrouped"] and summary["training_shards"] == 5
    assert labels_dir_of(cfg) == run / "shard_labels"
    assert read_labels(run / "shard_labels" / "00004.parquet").keys == expected["00004"]
    assert run_regroup(cfg) == summary  # complete: not redone

    # labels already per training shard: nothing to do, training reads them where they are
    per_shard = tmp_path / "per_shard"
    for s in SHARDS:
        write_labels(per_shard / f"{s}.parquet", ["k"], np.zeros((1, 1)), np.zeros((1, 1)), SHA)
    cfg2 = load_config(
        None,
        [f"run_dir={tmp_path / 'run2'}", f"data.shards={shards}", f"assign.labels_dir={per_shard}"],
    )
    assert run_regroup(cfg2)["regrouped"] is False
    assert labels_dir_of(cfg2) == per_shard
