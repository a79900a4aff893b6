"""Shared pytest fixtures. Each helper appends its own fixtures below its own heading."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ======================================================================================
# data layer (data helper): tiny shards, a corrupted shard, label sidecars, demo dataset
# ======================================================================================


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 0).save(buf, format="PNG")
    return buf.getvalue()


def _image_as(fmt: str, w: int = 8, h: int = 8) -> bytes:
    """A small image encoded by Pillow in format ``fmt`` ('GIF', 'BMP', 'TIFF', 'WEBP', …)."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


# The start of an Encapsulated PostScript file: Pillow's EPS plugin would parse it and hand the
# pixels to Ghostscript; named .jpg in a shard it must be refused by signature, never opened.
EPS_PAYLOAD = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"


def write_raw_tar(path: Path, members: list[tuple[str, bytes | int]]) -> Path:
    """A tar with exactly these members in this order (duplicates allowed, unlike the writer).

    A member given as an ``int`` is that many zero bytes written as a hole (a sparse file), so
    a test can carry a member over the reader's 256 MiB limit without writing it. Names may
    hold lone surrogates (``"k\\udcff"``): they are written as the raw byte, as a broken
    writer would.
    """
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, int):
                info.size = data
                header = info.tobuf(tar.format, tar.encoding, tar.errors)
                tar.fileobj.write(header)
                padded = -(-data // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                tar.fileobj.seek(padded, io.SEEK_CUR)  # the next write leaves a hole
                tar.offset += len(header) + padded
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, img: bytes | None, caption: str | bytes | None, meta, ext="jpg"):
    out = []
    if img is not None:
        out.append((f"{key}.{ext}", img))
    if caption is not None:
        out.append((f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode()))
    if meta is not None:
        out.append((f"{key}.json", meta if isinstance(meta, bytes) else json.dumps(meta).encode()))
    return out


@pytest.fixture(scope="session")
def data_helpers():
    """Small builders for test images and tars: ``jpeg(w,h,seed)``, ``png(w,h)``, ``raw_tar``."""

    class H:
        jpeg = staticmethod(_jpeg)
        png = staticmethod(_png)
        image_as = staticmethod(_image_as)
        eps = EPS_PAYLOAD
        raw_tar = staticmethod(write_raw_tar)
        sample = staticmethod(_sample)

    return H


# max_pixels used with the corrupted shard; the "big" images exceed it.
CORRUPT_MAX_PIXELS = 100_000


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory):
    """Shards with every kind of corruption and the exact counts the reader must report.

    Returns a dict: ``shards`` (paths), ``max_pixels``, ``good_keys`` (in order, per shard),
    ``skipped`` (reason → count over all shards, with full decode), ``lazy_ok`` (keys whose
    header is fine but whose pixels are not: kept by a ``decode=False`` read).
    """
    d = tmp_path_factory.mktemp("corrupt")
    good = _jpeg(32, 24, 0)
    truncated_jpeg = _jpeg(64, 64, 1)[:2000]  # valid header, pixel data cut
    members = []
    members += _sample("g000", good, "a good sample", {"caption": "x"})
    members += _sample("bad_bytes", b"this is not an image", "garbage image", {})
    members += _sample("bad_pixels", truncated_jpeg, "cut jpeg", {})
    members += _sample("g001", _png(20, 10, "RGBA"), "rgba png", {}, ext="png")
    members += _sample("no_image", None, "caption only", {"a": 1})
    members += _sample("no_caption", good, None, {"no": "caption"})
    members += _sample("empty_caption", good, "   ", {})
    members += _sample("big_warn", _png(400, 300), "over the limit", {})  # 120k > 100k
    members += _sample("big_bomb", _png(1000, 1000), "over twice the limit", {})
    members += _sample("g002", good, None, {"caption": "caption from json"})
    members += _sample("dup", good, "first copy of dup", {})
    members += _sample("bad_json", good, "broken json", b"{not json")
    members += _sample("list_json", good, "json list", b"[1, 2]")
    members += _sample("g003", good, "good", None)  # json is optional
    members += _sample("dup", good, "second copy of dup", {})
    members += _sample("two_jpgs", good, "x", None) + [("two_jpgs.jpg", good)]
    members += _sample("g004", good, "last good", {"k": "v"})
    bad = write_raw_tar(d / "corrupt-000000.tar", members)

    # a shard cut inside the 4th sample's image, and one cut exactly at a member boundary
    full = d / "full.tar"
    m2 = []
    for i in range(5):
        m2 += _sample(f"t{i:03d}", _jpeg(40, 40, 10 + i), f"sample {i}", {"i": i})
    write_raw_tar(full, m2)
    raw = full.read_bytes()
    with tarfile.open(full) as t:
        infos = t.getmembers()
    cut_mid = infos[9].offset_data + 100  # inside t003.jpg
    (d / "trunc-000001.tar").write_bytes(raw[:cut_mid])
    cut_edge = infos[6].offset  # header of t002.jpg: t000, t001 complete
    (d / "trunc-000002.tar").write_bytes(raw[:cut_edge])
    (d / "garbage-000003.tar").write_bytes(b"not a tar at all " * 100)
    (d / "empty-000004.tar").write_bytes(b"")
    missing = str(d / "missing-000005.tar")
    shards = [
        str(bad),
        str(d / "trunc-000001.tar"),
        str(d / "trunc-000002.tar"),
        str(d / "garbage-000003.tar"),
        str(d / "empty-000004.tar"),
        missing,
    ]
    return {
        "shards": shards,
        "max_pixels": CORRUPT_MAX_PIXELS,
        "good_keys": [
            ["g000", "g001", "g002", "dup", "g003", "g004"],
            ["t000", "t001", "t002"],  # t003's image is cut: t003 is the truncated one
            ["t000"],  # cut at a boundary: t001 may be incomplete, so it is the truncated one
            [],
            [],
            [],
        ],
        "lazy_ok": ["bad_pixels"],
        "skipped": {
            "undecodable_image": 2,
            "missing_image": 1,
            "missing_caption": 2,
            "too_many_pixels": 2,
            "duplicate_key": 2,
            "bad_json": 2,
            "truncated_tar": 2,
            "unreadable_shard": 3,
        },
    }


def make_tiny_dataset(root: Path, n_shards: int, per_shard: int, k: int = 2, sha: str = "c0ffee"):
    """``n_shards`` shards of ``per_shard`` tiny JPEG samples + label sidecars with top-``k``."""
    from megaclass.data.labels import write_labels
    from megaclass.data.writer import ShardWriter

    shard_dir, labels_dir = root / "shards", root / "labels"
    rng = np.random.default_rng(0)
    with ShardWriter(shard_dir, prefix="tiny-", maxcount=per_shard) as w:
        for i in range(n_shards * per_shard):
            img = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
            w.write(f"{i:06d}", img, f"caption {i}", {"i": i, "class": str(i % 7)})
    for si, shard in enumerate(w.shards):
        keys = [f"{i:06d}" for i in range(si * per_shard, (si + 1) * per_shard)]
        ids = np.array([[int(kk) * 10 + j for j in range(k)] for kk in keys], dtype=np.int64)
        write_labels(
            labels_dir / f"{Path(shard).stem}.parquet",
            keys,
            ids,
            np.ones_like(ids, dtype=np.float32),
            sha,
        )
    return {"shards": w.shards, "labels_dir": str(labels_dir), "sha": sha}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """6 shards × 20 tiny samples (keys 000000…000119) with label sidecars (label = 10·key + j)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), n_shards=6, per_shard=20)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """The built-in demo dataset (``megaclass data demo``), built once per session."""
    from megaclass.data.builders import build_dataset

    out = tmp_path_factory.mktemp("demo_data")
    summary = build_dataset("demo", str(out), seed=0)
    return {"root": str(out), "summary": summary}
