"""Reader: every kind of corruption is skipped and counted exactly; good samples survive."""

from __future__ import annotations

import io
import json
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


# ----------------------------------------------------------------------------------------
# samples that used to fail a whole shard downstream, formats, and memory bounds


def test_bad_key_and_bad_metadata_are_skipped_and_counted(tmp_path, data_helpers):
    """A raw non-UTF-8 byte in a member name and a lone surrogate in the json are skipped per
    sample (``bad_key``, ``bad_metadata``); valid escapes (a surrogate pair) are kept, and the
    stats themselves stay writable as UTF-8."""
    good = data_helpers.jpeg(16, 16, 0)
    members = data_helpers.sample("g0", good, "fine", {})
    members += data_helpers.sample("raw\udcffbyte", good, "name with a raw byte", {})
    members += data_helpers.sample("lone", good, "x", b'{"note": "\\ud800 alone"}')
    members += data_helpers.sample("pair", good, "x", b'{"note": "\\ud83d\\ude00 \\u00e9"}')
    members += data_helpers.sample("g1", good, None, {"caption": "from json"})
    path = data_helpers.raw_tar(tmp_path / "k.tar", members)
    stats = SampleStats()
    samples = list(iter_samples(str(path), stats))
    assert [s.key for s in samples] == ["g0", "pair", "g1"]
    assert samples[1].meta == {"note": "\U0001f600 \u00e9"}
    assert dict(stats.skipped) == {"bad_key": 1, "bad_metadata": 1}
    assert stats.seen == stats.kept + stats.total_skipped == 5
    text = json.dumps(stats.as_dict(), ensure_ascii=False)
    text.encode("utf-8")  # no lone surrogate reached the example list
    assert "raw\\\\udcffbyte" in text


def test_only_jpeg_png_webp_are_decoded(tmp_path, data_helpers, monkeypatch):
    """Whatever the member is called, only JPEG, PNG and WEBP bytes reach a Pillow parser: a GIF,
    BMP, TIFF or EPS named .jpg is ``unsupported_format`` (the EPS plugin, which would hand the
    bytes to Ghostscript, is never entered); a PNG named .jpg is fine."""
    from PIL import EpsImagePlugin

    entered = []

    def spy(self):  # noqa: ANN001
        entered.append(self)
        raise AssertionError("the EPS parser ran on untrusted bytes")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    members = []
    for key, payload in [
        ("gif", data_helpers.image_as("GIF")),
        ("bmp", data_helpers.image_as("BMP")),
        ("tiff", data_helpers.image_as("TIFF")),
        ("eps", data_helpers.eps),
        ("png", data_helpers.image_as("PNG")),
        ("garbage", b"not an image at all"),
    ]:
        members += data_helpers.sample(key, payload, f"{key} named .jpg", {})
    members += data_helpers.sample("webp", data_helpers.image_as("WEBP"), "webp", {}, ext="webp")
    path = data_helpers.raw_tar(tmp_path / "f.tar", members)
    for decode in (True, False):
        stats = SampleStats()
        keys = [s.key for s in iter_samples(str(path), stats, decode=decode)]
        assert keys == ["png", "webp"]
        assert dict(stats.skipped) == {"unsupported_format": 4, "undecodable_image": 1}
        details = {e["key"]: e["detail"] for e in stats.examples}
        assert details["eps"].startswith("EPS image; only JPEG, PNG, WEBP")
        assert details["gif"].startswith("GIF image")
    assert entered == []


def test_members_are_bounded(tmp_path, data_helpers):
    """Members of other extensions are passed over unread (not even counted as oversized), a
    caption is cut at the cap on a character boundary and the sample kept, a json over its cap
    is skipped unread; both caps are parameters."""
    good = data_helpers.jpeg(8, 8, 0)
    members = data_helpers.sample("a", good, "short", {})
    members += [("a.cls", b"3"), ("a.npy", b"\x00" * 6000)]  # over max_file_bytes, not used
    members += data_helpers.sample("b", good, "é" * 3000, {})  # 6000 bytes of 2-byte chars
    members += data_helpers.sample("c", good, "x", b'{"pad": "' + b"y" * 3000 + b'"}')
    members += data_helpers.sample("d", good, None, {"caption": "ü" * 100})  # json caption
    members += data_helpers.sample("e", good, "ok", {})
    path = data_helpers.raw_tar(tmp_path / "m.tar", members)
    stats = SampleStats()
    samples = {
        s.key: s
        for s in iter_samples(
            str(path), stats, max_file_bytes=4096, max_caption_bytes=101, max_json_bytes=2048
        )
    }
    assert sorted(samples) == ["a", "b", "d", "e"]
    assert samples["b"].caption == "é" * 50  # 101 bytes would split a character: 100 kept
    assert samples["d"].caption == "ü" * 50
    assert dict(stats.skipped) == {"json_too_large": 1}
    assert dict(stats.noted) == {"ignored_member": 2, "caption_truncated": 2}
    assert stats.seen == stats.kept + stats.total_skipped == 5

    # defaults: 64 KiB captions, 1 MiB json; a sparse 300 MiB member of another kind is skipped
    members = data_helpers.sample("big", good, "c" * 70_000, {"k": "v"}) + [("big.bin", 300 << 20)]
    members += data_helpers.sample("j", good, "x", b'{"p": "' + b"y" * (1 << 20) + b'"}')
    path = data_helpers.raw_tar(tmp_path / "d.tar", members)
    stats = SampleStats()
    samples = list(iter_samples(str(path), stats))
    assert [s.key for s in samples] == ["big"] and len(samples[0].caption) == 65536
    assert dict(stats.skipped) == {"json_too_large": 1}
    assert dict(stats.noted) == {"ignored_member": 1, "caption_truncated": 1}
