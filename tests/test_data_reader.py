"""Reader: every kind of corruption is skipped and counted exactly; good samples survive."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds
from megaclass.data.reader import iter_samples, split_key
from megaclass.data.stats import SampleStats
from PIL import Image


def _read_all(shards, max_pixels, decode=True):
    stats = SampleStats()
    keys = [
        [s.key for s in iter_samples(u, stats, max_pixels=max_pixels, decode=decode)]
        for u in shards
    ]
    return keys, stats


def test_corrupt_shards_exact_counts(corrupt_shards):
    keys, stats = _read_all(corrupt_shards["shards"], corrupt_shards["max_pixels"])
    assert keys == corrupt_shards["good_keys"]
    assert dict(stats.skipped) == corrupt_shards["skipped"]
    n_good = sum(map(len, keys))
    assert stats.kept == n_good
    assert stats.seen == stats.kept + stats.total_skipped
    # per-shard attribution: the missing file and the garbage file are each one unreadable shard
    by_shard = stats.skipped_by_shard
    assert by_shard[corrupt_shards["shards"][5]] == {"unreadable_shard": 1}
    assert by_shard[corrupt_shards["shards"][3]] == {"unreadable_shard": 1}
    assert by_shard[corrupt_shards["shards"][1]] == {"truncated_tar": 1}
    assert by_shard[corrupt_shards["shards"][2]] == {"truncated_tar": 1}
    assert sum(by_shard[corrupt_shards["shards"][0]].values()) == 11


def test_truncation_names_the_lost_sample(corrupt_shards):
    _, stats = _read_all(corrupt_shards["shards"][1:3], corrupt_shards["max_pixels"])
    lost = [(e["shard"].rsplit("/", 1)[-1], e["key"]) for e in stats.examples]
    assert lost == [("trunc-000001.tar", "t003"), ("trunc-000002.tar", "t001")]


def test_good_samples_intact(corrupt_shards):
    stats = SampleStats()
    samples = list(
        iter_samples(corrupt_shards["shards"][0], stats, max_pixels=corrupt_shards["max_pixels"])
    )
    by_key = {s.key: s for s in samples}
    assert by_key["g002"].caption == "caption from json"
    assert by_key["dup"].caption == "first copy of dup"
    assert by_key["g003"].meta == {}
    assert by_key["g004"].meta == {"k": "v"}
    for s in samples:
        assert s.image is not None and s.image.mode == "RGB"
        assert s.shard == corrupt_shards["shards"][0]
        assert Image.open(io.BytesIO(s.image_bytes)).size == s.image.size
    # the RGBA png was composited onto white (its pixels are transparent black)
    assert by_key["g001"].image.getpixel((0, 0)) == (255, 255, 255)


def test_lazy_read_checks_header_only(corrupt_shards):
    """decode=False keeps an image whose header is fine; the pixel limit still applies."""
    keys, stats = _read_all(
        corrupt_shards["shards"][:1], corrupt_shards["max_pixels"], decode=False
    )
    assert set(corrupt_shards["lazy_ok"]) <= set(keys[0])
    assert stats.skipped["undecodable_image"] == 1
    assert stats.skipped["too_many_pixels"] == 2


def test_pixel_limit_is_configurable(corrupt_shards):
    keys, stats = _read_all(corrupt_shards["shards"][:1], 2_000_000)
    assert "big_warn" in keys[0] and "big_bomb" in keys[0]
    assert "too_many_pixels" not in stats.skipped


def test_key_split_agrees_with_webdataset(tmp_path, data_helpers):
    """Our key splitting agrees with webdataset's on the same tar (dirs, multi-dot names)."""
    names = ["a/b/000.jpg", "a/b/000.txt", "x.y.json", "x.seg.png", "d.v1/k1.jpg", "d.v1/k1.txt"]
    path = data_helpers.raw_tar(tmp_path / "k.tar", [(n, b"1") for n in names])
    ours = [split_key(n) for n in names]
    ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    theirs = [(s["__key__"], e) for s in ds for e in s if not e.startswith("__")]
    assert sorted(ours) == sorted(theirs)


@pytest.mark.parametrize("spec_kind", ["pipe", "file_url"])
def test_pipe_and_file_urls(tiny_dataset, spec_kind):
    path = tiny_dataset["shards"][0]
    url = f"pipe:cat {path}" if spec_kind == "pipe" else f"file://{path}"
    stats = SampleStats()
    keys = [s.key for s in iter_samples(url, stats, decode=False)]
    assert keys == [f"{i:06d}" for i in range(20)]
    assert stats.total_skipped == 0


def test_failing_pipe_is_counted(tmp_path):
    stats = SampleStats()
    assert list(iter_samples(f"pipe:cat {tmp_path}/nope.tar", stats)) == []
    assert stats.skipped["unreadable_shard"] >= 1


def test_gzipped_shard_and_its_truncation(tmp_path, data_helpers):
    members = []
    for i in range(4):
        members += data_helpers.sample(f"z{i}", data_helpers.jpeg(16, 16, i), f"c{i}", {"i": i})
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats = SampleStats()
    assert [s.key for s in iter_samples(str(tmp_path / "z.tar.gz"), stats)] == [
        "z0",
        "z1",
        "z2",
        "z3",
    ]
    raw = (tmp_path / "z.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) * 2 // 3])
    stats = SampleStats()
    keys = [s.key for s in iter_samples(str(tmp_path / "cut.tar.gz"), stats)]
    assert len(keys) < 4 and keys == ["z0", "z1", "z2", "z3"][: len(keys)]
    assert dict(stats.skipped) == {"truncated_tar": 1}


def test_oversized_member_is_skipped_unread(tmp_path, data_helpers):
    members = data_helpers.sample("a", data_helpers.jpeg(8, 8, 0), "small", {})
    members += data_helpers.sample("b", b"\xff" * 5000, "huge member", {})
    members += data_helpers.sample(
        "c", data_helpers.jpeg(8, 8, 1), "small", b"[" * 2000 + b"]" * 2000
    )
    members += data_helpers.sample("d", data_helpers.jpeg(8, 8, 2), "small", {})
    path = data_helpers.raw_tar(tmp_path / "o.tar", members)
    stats = SampleStats()
    keys = [s.key for s in iter_samples(str(path), stats, max_file_bytes=4096)]
    assert keys == ["a", "d"]
    assert dict(stats.skipped) == {"oversized_file": 1, "bad_json": 1}
