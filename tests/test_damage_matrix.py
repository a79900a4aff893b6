"""Every kind of damaged input, through every stage that reads it: embed, assign, training loader.

One set of shards carries each damage kind that the reader handles (and that the other tests
plant one at a time): a truncated tar, a file that is not a tar, undecodable images, images with
too many pixels, images in formats the pipeline does not decode, missing captions and images,
keys that are not UTF-8, json that is broken, not UTF-8-writable or too large, a member over the
size limit (a sparse 256 MiB hole), a duplicate key, plus what is counted but kept (a caption
over the cap, a member of an unknown kind). Each stage must end, keep every good sample, and
count every bad one with the same reason: the embed stage in its ``_done`` records and summary,
the assign stage by labelling exactly the rows embedded, the loader in its stats.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from megaclass.core.rundir import RunDir
from megaclass.data.embeddings import read_keys
from megaclass.data.labels import read_labels
from megaclass.data.loader import TrainLoader
from megaclass.data.reader import DEFAULT_MAX_FILE_BYTES, iter_samples
from megaclass.data.stats import SampleStats
from megaclass.pipelines.assign import run_assign
from megaclass.pipelines.cluster import run_cluster
from megaclass.pipelines.config import load_config
from megaclass.pipelines.embed import run_embed

MAX_PIXELS = 100_000
TINY = "open_clip:megaclass-tiny"


@pytest.fixture(scope="module")
def local_ray():
    # "local": a fresh instance even when another Ray on this machine was started by `ray start`
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, data_helpers):
    """The shards, the keys that must survive (per shard, in order) and the exact counts."""
    d = tmp_path_factory.mktemp("damage")
    h = data_helpers
    img = h.jpeg(24, 20, 1)
    lines: list[tuple[str, list, str | None]] = [  # (key, members, skip reason or None: kept)
        ("g00", h.sample("g00", img, "good zero", {"class": "a"}) + [("g00.cls", b"7")], None),
        ("garbage", h.sample("garbage", b"this is not an image", "x", {}), "undecodable_image"),
        ("cut_jpeg", h.sample("cut_jpeg", h.jpeg(64, 64, 2)[:1500], "x", {}), "undecodable_image"),
        ("huge", h.sample("huge", h.png(400, 300), "x", {}), "too_many_pixels"),
        ("gif", h.sample("gif", h.image_as("GIF"), "a gif named .jpg", {}), "unsupported_format"),
        ("eps", h.sample("eps", h.eps, "an eps named .jpg", {}), "unsupported_format"),
        ("g01", h.sample("g01", img, "good one", {"class": "b"}), None),
        ("nocap", h.sample("nocap", img, None, {"no": "caption"}), "missing_caption"),
        ("noimg", h.sample("noimg", None, "caption only", {}), "missing_image"),
        ("bad\udcffkey", h.sample("bad\udcffkey", img, "raw byte in the name", {}), "bad_key"),
        ("surrogate", h.sample("surrogate", img, "x", b'{"a": "\\ud800"}'), "bad_metadata"),
        ("brokenjson", h.sample("brokenjson", img, "x", b"{not json"), "bad_json"),
        (
            "bigjson",
            h.sample("bigjson", img, "x", b'{"p": "' + b"y" * (1 << 20) + b'"}'),
            "json_too_large",
        ),
        ("longcap", h.sample("longcap", img, "w" * 70_000, {"class": "c"}), None),
        (  # a sparse hole: over the limit without being written or read into memory
            "bigfile",
            [("bigfile.jpg", DEFAULT_MAX_FILE_BYTES + 1), ("bigfile.txt", b"x")],
            "oversized_file",
        ),
        ("g01", h.sample("g01", img, "the same key again", {}), "duplicate_key"),
        ("g02", h.sample("g02", h.png(16, 12, "RGBA"), "good two", {}, ext="png"), None),
    ]
    mixed = h.raw_tar(d / "00000.tar", [m for _, members, _ in lines for m in members])

    full = d / "full.tar"
    members = []
    for i in range(5):
        members += h.sample(f"t{i}", h.jpeg(20, 20, 10 + i), f"sample {i}", {"i": i})
    h.raw_tar(full, members)
    with tarfile.open(full) as t:
        cut = t.getmembers()[9].offset_data + 100  # inside t3's image
    (d / "00001.tar").write_bytes(full.read_bytes()[:cut])
    (d / "00002.tar").write_bytes(b"not a tar at all " * 64)
    clean = d / "00003.tar"
    members = []
    for i in range(4):
        members += h.sample(f"c{i}", h.jpeg(18, 22, 20 + i), f"clean {i}", {"class": "d"})
    h.raw_tar(clean, members)

    skipped = Counter(r for _, _, r in lines if r)
    skipped["truncated_tar"] += 1
    return {
        "shards": [str(mixed), str(d / "00001.tar"), str(d / "00002.tar"), str(clean)],
        "keys": {
            "00000": [k for k, _, r in lines if r is None],
            "00001": ["t0", "t1", "t2"],  # t3 is the one cut
            "00003": ["c0", "c1", "c2", "c3"],
        },
        "skipped": dict(skipped),  # all but the unreadable shard
        "noted": {"caption_truncated": 1, "ignored_member": 1},
    }


def test_reader_counts_match_the_matrix(damaged):
    """The plain reader (no stage) as the reference for the stages below."""
    stats = SampleStats()
    keys = {}
    for url in damaged["shards"]:
        keys[Path(url).stem] = [s.key for s in iter_samples(url, stats, max_pixels=MAX_PIXELS)]
    assert {k: v for k, v in keys.items() if v} == damaged["keys"]
    assert dict(stats.skipped) == {**damaged["skipped"], "unreadable_shard": 1}
    assert dict(stats.noted) == damaged["noted"]
    assert stats.seen == stats.kept + stats.total_skipped


def test_every_stage_counts_every_damage_kind(local_ray, tmp_path, damaged):
    shards = damaged["shards"]
    unreadable = shards[2]
    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data.shards={'::'.join(shards)}",
        f"data.max_image_pixels={MAX_PIXELS}",
        "ray.num_cpus=2",
        f"embed.image_teacher={TINY}",
        f"embed.text_teacher={TINY}",
        "embed.allow_random_teacher=true",
        "embed.batch_size=4",
        "embed.max_retries=0",
        "embed.allow_failed_shards=true",
        "cluster.k=2",
        "cluster.niter=3",
        "cluster.feature=image",
        "assign.concurrency=1",
        "assign.batch_size=8",
    ]
    cfg = load_config(None, args)
    rd = RunDir(cfg.run_dir)
    rows = sum(len(k) for k in damaged["keys"].values())

    # embed: the good samples of every readable shard, each bad one counted, the bad shard listed
    summary = run_embed(cfg)
    assert summary["skipped"] == damaged["skipped"]
    assert summary["noted"] == damaged["noted"]
    assert summary["rows"] == rows and summary["seen"] == rows + sum(damaged["skipped"].values())
    assert list(summary["failed"]) == [unreadable] and "unreadable" in summary["failed"][unreadable]
    for stem, keys in damaged["keys"].items():
        assert read_keys(rd.embed, stem) == keys
        done = RunDir.read_done(rd.embed, stem)
        assert done["stats"]["seen"] == done["rows"] + sum(done["skipped"].values())
    assert RunDir.read_done(rd.embed, "00001")["skipped"] == {"truncated_tar": 1}
    assert RunDir.read_done(rd.embed, "00003")["skipped"] == {}
    long_caption = read_keys(rd.embed, "00000").index("longcap")
    captions = pq.read_table(rd.embed / "metadata" / "00000.parquet").column("caption")
    assert len(captions[long_caption].as_py()) == 65536  # cut to data.max_caption_bytes

    # assign: exactly the embedded rows get labels, shard by shard
    run_cluster(cfg)
    assigned = run_assign(cfg)
    assert assigned["rows"] == rows and assigned["stems"] == 3
    sha = (rd.cluster / "centroids.sha256").read_text().strip()
    for stem, keys in damaged["keys"].items():
        assert read_labels(rd.labels / f"{stem}.parquet", expected_sha=sha).keys == keys

    # the training loader over the same shards: the same samples, the same counts
    loader = TrainLoader(
        shards,
        batch_size=4,
        labels_dir=rd.labels,
        centroid_sha=sha,
        shuffle_buffer=0,
        shuffle_shards=False,
        max_pixels=MAX_PIXELS,
    )
    seen_keys, seen_captions = [], {}
    for batch in loader:
        assert batch["label"].shape[0] == len(batch["key"])
        seen_keys += batch["key"]
        seen_captions.update(zip(batch["key"], batch["caption"]))
    assert seen_keys == [k for s in ("00000", "00001", "00003") for k in damaged["keys"][s]]
    # The loader reads headers only and joins labels before it decodes: the JPEG whose header
    # is fine but whose pixels are cut has no label (embed could not decode it), so it is
    # counted there as missing_label instead of undecodable_image; every other count is equal.
    expect = {**damaged["skipped"], "unreadable_shard": 1, "missing_label": 1}
    expect["undecodable_image"] -= 1
    assert dict(loader.stats.skipped) == expect
    assert [e["key"] for e in loader.stats.examples if e["reason"] == "missing_label"] == [
        "cut_jpeg"
    ]
    assert len(seen_captions["longcap"].encode()) == 65536
    assert loader.stats.seen == loader.stats.kept + loader.stats.total_skipped
    assert np.isfinite(assigned["low_score_share"])
    json.dumps(loader.stats.as_dict())  # the stats of damaged input stay serialisable
