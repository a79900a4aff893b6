"""Writer round trip, determinism, atomicity; shard specs; label sidecars."""

from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from megaclass.data.labels import (
    LabelFileError,
    LabelShaMismatchError,
    file_sha256,
    read_labels,
    write_labels,
)
from megaclass.data.reader import iter_samples
from megaclass.data.shards import ShardSpecError, braceexpand, expand_shards, shard_stem
from megaclass.data.stats import SampleStats
from megaclass.data.writer import ShardWriter
from PIL import Image


def _write(out, n=7, maxcount=3, seed=0):
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (8 + i, 10, 3), dtype=np.uint8)) for i in range(n)]
    with ShardWriter(out, prefix="rt-", maxcount=maxcount, image_ext="png") as w:
        for i, img in enumerate(imgs):
            w.write(f"{i:04d}", img, f"caption {i} é", {"class": f"c{i % 2}", "i": i})
    return w, imgs


def test_round_trip(tmp_path):
    w, imgs = _write(tmp_path / "a")
    assert [p.rsplit("/", 1)[-1] for p in w.shards] == [
        "rt-000000.tar",
        "rt-000001.tar",
        "rt-000002.tar",
    ]
    stats = SampleStats()
    got = [s for p in w.shards for s in iter_samples(p, stats)]
    assert [s.key for s in got] == [f"{i:04d}" for i in range(7)]
    for i, s in enumerate(got):
        assert s.caption == f"caption {i} é"
        assert s.meta == {"class": f"c{i % 2}", "i": i}
        assert np.array_equal(np.asarray(s.image), np.asarray(imgs[i]))  # png is lossless
    assert stats.total_skipped == 0 and stats.kept == 7
    # webdataset reads our shards too, with each sample's files together
    ds = wds.WebDataset(w.shards, shardshuffle=False).decode("pil")
    assert [d["__key__"] for d in ds] == [f"{i:04d}" for i in range(7)]
    # a sample's members are contiguous and in a fixed order
    with tarfile.open(w.shards[0]) as t:
        assert t.getnames() == [f"{i:04d}.{e}" for i in range(3) for e in ("png", "txt", "json")]


def test_deterministic_and_no_temp_files(tmp_path):
    wa, _ = _write(tmp_path / "a")
    wb, _ = _write(tmp_path / "b")
    ha = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in wa.shards]
    hb = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in wb.shards]
    assert ha == hb
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == [
        f"rt-00000{i}.tar" for i in range(3)
    ]


def test_crash_leaves_only_complete_shards(tmp_path):
    img = Image.new("RGB", (4, 4))
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, maxcount=2) as w:
            for i in range(3):
                w.write(f"k{i}", img, "c")
            raise RuntimeError("killed")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["000000.tar"]


def test_writer_rejects_bad_keys(tmp_path):
    img = Image.new("RGB", (4, 4))
    with ShardWriter(tmp_path) as w:
        w.write("a", img, "c")
        with pytest.raises(ValueError, match="duplicate sample key 'a'"):
            w.write("a", img, "c")
        with pytest.raises(ValueError, match="without a dot"):
            w.write("b.c", img, "c")


def test_maxsize_limit(tmp_path):
    with ShardWriter(tmp_path, maxsize=7000) as w:
        for i in range(6):
            w.write(f"k{i}", b"\0" * 2000, "c", image_ext="jpg")
    assert len(w.shards) == 3


# ------------------------------------------------------------------ shard specs
def test_braceexpand():
    assert braceexpand("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert braceexpand("{0..10}")[-2:] == ["9", "10"]
    assert braceexpand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_expand_shards(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n/x/{0..1}.tar\n\npipe:cat /y/z.tar\n")
    spec = f"/d/{{00..01}}.tar::{lst}::s3://b/k.tar"
    assert expand_shards(spec, allow_pipe_in_lists=True) == [
        "/d/00.tar", "/d/01.tar", "/x/0.tar", "/x/1.tar", "pipe:cat /y/z.tar", "s3://b/k.tar",
    ]  # fmt: skip
    with pytest.raises(ShardSpecError):
        expand_shards("  ")


def test_shard_stem():
    assert shard_stem("/data/00012.tar") == "00012"
    assert shard_stem("s3://b/x/demo-000003.tar.gz") == "demo-000003"
    assert shard_stem("pipe:aws s3 cp s3://b/x/00012.tar -") == "00012"
    assert shard_stem("file:///a/b.tar") == "b"


# ------------------------------------------------------------------ label sidecars
def test_labels_round_trip_and_sha(tmp_path):
    keys = ["a", "b", "c"]
    labels = np.array([[5, 1], [2, 3], [7, 0]], dtype=np.int64)
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]], dtype=np.float32)
    p = tmp_path / "labels" / "s.parquet"
    write_labels(p, keys, labels, scores, "abc")
    t = read_labels(p, expected_sha="abc")
    assert t.keys == keys and t.centroid_sha == "abc"
    assert np.array_equal(t.labels, labels) and np.array_equal(t.scores, scores)
    table = pq.read_table(p)
    assert table.schema.field("labels").type == pa.list_(pa.int64())
    assert table.schema.field("scores").type == pa.list_(pa.float32())
    assert table.column("cls").to_pylist() == [5, 2, 7]
    assert read_labels(p).keys == keys  # no expectation: accepted
    with pytest.raises(LabelShaMismatchError) as ei:
        read_labels(p, expected_sha="def")
    msg = str(ei.value)
    assert str(p) in msg and "'abc'" in msg and "'def'" in msg


def test_labels_bad_files(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "labels": [[1]]}), p)
    with pytest.raises(LabelFileError, match="scores"):
        read_labels(p)
    p2 = tmp_path / "ragged.parquet"
    pq.write_table(
        pa.table({"key": ["a", "b"], "labels": [[1], [1, 2]], "scores": [[1.0], [1.0, 2.0]]}), p2
    )
    with pytest.raises(LabelFileError, match="different lengths"):
        read_labels(p2)
    with pytest.raises(ValueError, match="keys but labels"):
        write_labels(tmp_path / "x.parquet", ["a"], np.zeros((2, 1)), np.zeros((2, 1)), "s")


def test_file_sha256(tmp_path):
    p = tmp_path / "c.npy"
    np.save(p, np.eye(3, dtype=np.float32))
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
