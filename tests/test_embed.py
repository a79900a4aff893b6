"""The embed stage on a real local Ray (2 CPUs): equality with a plain single-process loop,
exact bad-sample counts, restart skipping, per-shard retries and failure reports, bring-your-own
embeddings, the real offline teachers, and a SIGKILLed driver that resumes to identical files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from megaclass.core.rundir import RunDir
from megaclass.data.reader import iter_samples
from megaclass.data.shards import shard_stem
from megaclass.data.stats import SampleStats
from megaclass.data.writer import ShardWriter
from megaclass.pipelines.config import DataConfig, EmbedConfig, RayConfig, RunConfig, load_config
from megaclass.pipelines.embed import (
    WRITE_FAULT_ENV,
    EmbedError,
    done_matches,
    finish_stage,
    run_embed,
    write_fault_plan,
)
from megaclass.pipelines.embed_actor import (
    EMBED_CRASH_ENV,
    EMBED_FAULT_ENV,
    CrashLedger,
    TeacherSpec,
    actor_threads,
    crash_plan,
    fault_plan,
)
from megaclass.pipelines.embed_decode import input_signature
from megaclass.training.teachers import load_teacher
from PIL import Image

TINY = "open_clip:megaclass-tiny"


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the whole module (run_embed joins it and leaves it up)."""
    import ray

    # "local": a fresh instance even when another Ray on this machine was started by `ray start`
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def make_shards(out: Path, sizes: list[int], seed: int = 0, prefix: str = "") -> list[str]:
    """Shards of small random RGB JPEGs of varying sizes, with captions and a class field."""
    rng = np.random.default_rng(seed)
    paths = []
    for si, n in enumerate(sizes):
        with ShardWriter(out, prefix=prefix, maxcount=max(n, 1), start_index=si) as w:
            for i in range(n):
                h, wd = int(rng.integers(16, 48)), int(rng.integers(16, 48))
                img = Image.fromarray(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8))
                key = f"s{si}_{i:04d}"
                w.write(
                    key,
                    img,
                    f"picture {si} {i} {'red' if i % 2 else 'blue'}",
                    {"class": f"c{i % 3}", "i": i},
                )
        paths.extend(w.shards)
    return paths


def plain_loop(urls, image_teacher, text_teacher, batch_size, max_pixels, image_size=None):
    """The reference: one process, the same teacher, shard by shard in tar order."""
    torch.set_num_threads(1)
    t = load_teacher(image_teacher, text_teacher, image_size=image_size)
    out = {}
    for url in urls:
        stats = SampleStats()
        samples = list(iter_samples(url, stats, max_pixels=max_pixels))
        imgs, txts = [], []
        for i in range(0, len(samples), batch_size):
            part = samples[i : i + batch_size]
            imgs.append(t.encode_images(torch.stack([t.image_transform(s.image) for s in part])))
            if text_teacher != "none":
                txts.append(t.encode_texts([s.caption for s in part]))
        out[shard_stem(url)] = {
            "keys": [s.key for s in samples],
            "captions": [s.caption for s in samples],
            "img": np.concatenate(imgs) if imgs else np.zeros((0, t.image_dim), np.float32),
            "txt": (
                np.concatenate(txts)
                if txts
                else (np.zeros((0, t.text_dim), np.float32) if t.has_text else None)
            ),
            "stats": stats,
        }
    return out


def read_stem(embed_dir: Path, stem: str):
    img = np.load(embed_dir / "img_emb" / f"{stem}.npy", allow_pickle=False)
    p = embed_dir / "text_emb" / f"{stem}.npy"
    txt = np.load(p, allow_pickle=False) if p.exists() else None
    meta = pq.read_table(embed_dir / "metadata" / f"{stem}.parquet").to_pydict()
    return img, txt, meta


def cfg_for(run_dir, shards, **embed):
    e = dict(image_teacher=TINY, text_teacher=TINY, batch_size=4, max_retries=1)
    e["allow_random_teacher"] = True  # the tiny test teacher has no weights
    e.update(embed)
    return RunConfig(
        run_dir=str(run_dir),
        data=DataConfig(shards="::".join(shards), max_image_pixels=100_000),
        ray=RayConfig(num_cpus=2),
        embed=EmbedConfig(**e),
    )


# ----------------------------------------------------------------------------------------


def test_ray_equals_plain_loop_with_exact_skip_counts(
    local_ray, tmp_path, corrupt_shards, data_helpers
):
    good = make_shards(tmp_path / "shards", [13, 9])
    empty = data_helpers.raw_tar(tmp_path / "shards" / "empty.tar", [])  # a valid tar, no samples
    corrupt, truncated = corrupt_shards["shards"][0], corrupt_shards["shards"][1]
    shards = good + [str(empty), corrupt, truncated]
    cfg = cfg_for(tmp_path / "run", shards)
    summary = run_embed(cfg)

    embed_dir = RunDir(cfg.run_dir).embed
    ref = plain_loop(shards, TINY, TINY, 4, corrupt_shards["max_pixels"])
    expected_keys = {
        shard_stem(u): k for u, k in zip(corrupt_shards["shards"], corrupt_shards["good_keys"])
    }
    for url in shards:
        stem = shard_stem(url)
        img, txt, meta = read_stem(embed_dir, stem)
        r = ref[stem]
        assert meta["key"] == r["keys"]  # same samples, tar order
        if stem in expected_keys:
            assert meta["key"] == expected_keys[stem]
        assert meta["caption"] == r["captions"]
        assert meta["shard"] == [url] * len(r["keys"])
        assert img.dtype == np.float16 and txt.dtype == np.float16
        assert img.shape == r["img"].shape and txt.shape == r["txt"].shape
        np.testing.assert_allclose(img.astype(np.float32), r["img"], atol=2e-3)
        np.testing.assert_allclose(txt.astype(np.float32), r["txt"], atol=2e-3)
        if len(img):
            np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=3e-3)
        done = RunDir.read_done(embed_dir, stem)
        assert done["rows"] == len(r["keys"])
        assert done["skipped"] == dict(r["stats"].skipped)  # counts exact, per shard
        assert done["stats"]["seen"] == done["rows"] + sum(done["skipped"].values())

    # good shards: class and json columns carried through
    _, _, meta = read_stem(embed_dir, shard_stem(good[0]))
    assert meta["class"][:4] == ["c0", "c1", "c2", "c0"]
    assert json.loads(meta["json"][1]) == {"class": "c1", "i": 1}

    # the corrupt shard's counts, against the fixture's independent expectation
    corrupt_done = RunDir.read_done(embed_dir, shard_stem(corrupt))
    expect = {
        k: v
        for k, v in corrupt_shards["skipped"].items()
        if k not in ("truncated_tar", "unreadable_shard")
    }
    assert corrupt_done["skipped"] == expect
    assert RunDir.read_done(embed_dir, shard_stem(truncated))["skipped"] == {"truncated_tar": 1}

    # the stage summary adds them up
    success = json.loads((embed_dir / "_SUCCESS.json").read_text())
    assert success == json.loads(json.dumps(summary))
    assert success["rows"] == 13 + 9 + 0 + len(expected_keys[shard_stem(corrupt)]) + 3
    total = dict(expect)
    total["truncated_tar"] = 1
    assert success["skipped"] == total
    assert success["image_dim"] == 32 and success["text_dim"] == 32
    assert success["shards_embedded"] == 5 and success["shards_failed"] == 0

    # a restart finds every shard done and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in embed_dir.rglob("*.npy")}
    again = run_embed(cfg)
    assert again["shards_done_before"] == 5 and again["shards_embedded"] == 0
    assert {p: p.stat().st_mtime_ns for p in embed_dir.rglob("*.npy")} == stamps

    # a changed input shard no longer counts as done (it would be embedded again)
    rec = RunDir.read_done(embed_dir, shard_stem(good[1]))
    assert rec["input"] == input_signature(good[1])
    os.utime(good[1], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    ts = TeacherSpec.from_config(cfg)
    assert not done_matches(rec, ts, input_signature(good[1]))
    assert done_matches(
        RunDir.read_done(embed_dir, shard_stem(good[0])), ts, input_signature(good[0])
    )
    changed = TeacherSpec.from_config(cfg_for(tmp_path / "x", shards, batch_size=5))
    assert not done_matches(
        RunDir.read_done(embed_dir, shard_stem(good[0])), changed, input_signature(good[0])
    )


def test_failing_shards_are_retried_then_reported(local_ray, tmp_path, corrupt_shards):
    good = make_shards(tmp_path / "shards", [6], seed=3)
    # fails to open once, then works (a flaky network read): retried inside the decode task
    f1, f2 = tmp_path / "flaky1.flag", tmp_path / "flaky2.flag"
    flaky_open = f"pipe:if [ -e {f1} ]; then cat {good[0]}; else touch {f1}; exit 3; fi # a.tar"
    # streams the whole shard, then fails once: chunks already went out, so the driver
    # discards them and re-reads the shard in a second pass
    flaky_late = f"pipe:cat {good[0]}; if [ ! -e {f2} ]; then touch {f2}; exit 4; fi # b.tar"
    garbage = corrupt_shards["shards"][3]  # not a tar at all: fails every time
    shards = [good[0], flaky_open, flaky_late, garbage]
    cfg = cfg_for(tmp_path / "run", shards, text_teacher="none", max_retries=2)
    embed_dir = RunDir(cfg.run_dir).embed
    with pytest.raises(EmbedError, match="garbage-000003.tar"):
        run_embed(cfg)
    done = {s: RunDir.read_done(embed_dir, s) for s in ("000000", "a", "b")}
    assert (done["000000"]["attempt"], done["000000"]["read_attempts"]) == (1, 1)
    assert (done["a"]["attempt"], done["a"]["read_attempts"]) == (1, 2)
    assert (done["b"]["attempt"], done["b"]["read_attempts"]) == (2, 1)
    assert RunDir.read_done(embed_dir, shard_stem(garbage)) is None
    failed = json.loads((embed_dir / "_FAILED.json").read_text())
    assert list(failed["failed"]) == [garbage] and "unreadable" in failed["failed"][garbage]
    assert not (embed_dir / "_SUCCESS.json").exists()
    assert not (embed_dir / "text_emb").exists()  # no text teacher, no text files
    img0, _, meta0 = read_stem(embed_dir, "000000")
    for stem in ("a", "b"):  # the same tar through a pipe: the same rows and vectors
        img, _, meta = read_stem(embed_dir, stem)
        np.testing.assert_array_equal(img, img0)
        assert meta["key"] == meta0["key"] and done[stem]["rows"] == 6

    # allowed failures: the same summary marks the stage complete and lists the shard
    finish_stage(embed_dir, failed, attempts=3, allow_failed=True)
    success = json.loads((embed_dir / "_SUCCESS.json").read_text())
    assert list(success["failed"]) == [garbage] and success["shards_embedded"] == 3


def test_teacher_errors_are_retried_then_reported(local_ray, tmp_path, monkeypatch):
    """The teacher step raises (injected in the actors): one shard fails in the first pass only
    and is written by the retry pass; one fails in every pass and is reported while the others
    finish; a later run without the fault completes the stage."""
    shards = make_shards(tmp_path / "shards", [5, 6, 4], seed=9)
    ok, flaky, bad = (shard_stem(u) for u in shards)
    monkeypatch.setenv(EMBED_FAULT_ENV, f"{flaky}:1,{bad}:99")
    cfg = cfg_for(tmp_path / "run", shards, text_teacher="none", max_retries=1)
    embed_dir = RunDir(cfg.run_dir).embed
    with pytest.raises(EmbedError, match=rf"{bad}\.tar.*injected fault"):
        run_embed(cfg)
    assert RunDir.read_done(embed_dir, ok)["attempt"] == 1
    assert RunDir.read_done(embed_dir, flaky)["attempt"] == 2  # failed once, retried, written
    assert RunDir.read_done(embed_dir, bad) is None
    assert not (embed_dir / "img_emb" / f"{bad}.npy").exists()
    failed = json.loads((embed_dir / "_FAILED.json").read_text())
    assert list(failed["failed"]) == [shards[2]]
    assert failed["failed"][shards[2]].startswith("teacher: RuntimeError: injected fault")
    assert (failed["shards_embedded"], failed["shards_failed"], failed["rows"]) == (2, 1, 11)
    assert not (embed_dir / "_SUCCESS.json").exists()
    ref = plain_loop(shards, TINY, "none", 4, 100_000)
    for stem in (ok, flaky):  # the retried shard's vectors are the plain loop's
        img, _, meta = read_stem(embed_dir, stem)
        assert meta["key"] == ref[stem]["keys"]
        np.testing.assert_allclose(img.astype(np.float32), ref[stem]["img"], atol=2e-3)

    monkeypatch.delenv(EMBED_FAULT_ENV)
    again = run_embed(cfg)  # the reported shard is the only one left, and now goes through
    assert (again["shards_done_before"], again["shards_embedded"], again["rows"]) == (2, 1, 15)
    assert not (embed_dir / "_FAILED.json").exists() and (embed_dir / "_SUCCESS.json").exists()
    img, _, _ = read_stem(embed_dir, bad)
    np.testing.assert_allclose(img.astype(np.float32), ref[bad]["img"], atol=2e-3)


def test_unschedulable_reservations_are_an_error(local_ray, tmp_path):
    shards = make_shards(tmp_path / "shards", [2])
    cfg = cfg_for(tmp_path / "run", shards, concurrency=2, num_cpus_per_actor=1.0)
    with pytest.raises(
        ValueError, match=r"embed.concurrency=2 .* need 3 CPUs, the local Ray has 2"
    ):
        run_embed(cfg)  # 2 actors + a decoder at 1 CPU each would wait forever on 2 CPUs


def test_fault_plan_parsing(monkeypatch):
    monkeypatch.setenv(EMBED_FAULT_ENV, "a:1, dir-b:99")
    assert fault_plan() == {"a": 1, "dir-b": 99}
    monkeypatch.setenv(EMBED_FAULT_ENV, "a")
    with pytest.raises(ValueError, match=EMBED_FAULT_ENV):
        fault_plan()
    assert [actor_threads(c) for c in (0.25, 0.75, 1.0, 1.5, 4.0)] == [1, 1, 1, 2, 4]


def test_bring_your_own_embeddings(tmp_path):
    import pyarrow as pa
    from megaclass.data.embeddings import EmbeddingsError

    byo = tmp_path / "laion"
    (byo / "img_emb").mkdir(parents=True)
    (byo / "metadata").mkdir()
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(byo / "img_emb" / "img_emb_0.npy", x)
    pq.write_table(
        pa.table({"key": [f"k{i}" for i in range(5)]}), byo / "metadata" / "metadata_0.parquet"
    )
    cfg = cfg_for(tmp_path / "run", ["/nonexistent/{0..3}.tar"], embeddings_dir=str(byo))
    s = run_embed(cfg)
    success = json.loads((RunDir(cfg.run_dir).embed / "_SUCCESS.json").read_text())
    assert success["skipped_stage"] is True and success["embeddings_dir"] == str(byo.resolve())
    assert s["rows"] == 5 and s["image_dim"] == 8

    np.save(byo / "img_emb" / "img_emb_0.npy", x[:4])  # row count no longer matches metadata
    with pytest.raises(EmbeddingsError, match="img_emb_0.npy"):
        run_embed(cfg)


@pytest.mark.slow
def test_real_offline_teachers_equal_plain_loop(local_ray, tmp_path):
    """EfficientNet-Lite0 (shipped weights) for images, all-MiniLM-L6-v2 for captions."""
    shards = make_shards(tmp_path / "shards", [5, 4], seed=5)
    cfg = cfg_for(
        tmp_path / "run",
        shards,
        image_teacher="efficientnet-lite0",
        text_teacher="minilm",
        image_size=64,
        batch_size=3,
    )
    s = run_embed(cfg)
    assert s["image_dim"] == 1280 and s["text_dim"] == 384
    ref = plain_loop(shards, "efficientnet-lite0", "minilm", 3, 100_000, image_size=64)
    for url in shards:
        img, txt, meta = read_stem(RunDir(cfg.run_dir).embed, shard_stem(url))
        r = ref[shard_stem(url)]
        assert meta["key"] == r["keys"]
        np.testing.assert_allclose(img.astype(np.float32), r["img"], atol=2e-3)
        np.testing.assert_allclose(txt.astype(np.float32), r["txt"], atol=2e-3)


# ----------------------------------------------------------------------------------------
# kill the driver mid-run, start again: identical files


def write_embed_yaml(path: Path, run_dir: Path, shards: list[str], **embed: object) -> Path:
    """``path``: the config file of an embed run of ``shards`` on 2 Ray CPUs with the tiny test
    teacher for images; ``embed`` adds ``embed.*`` keys (values written as JSON, which YAML
    reads as written).

    Shared with tests/test_embed_crash.py: the tests that start the stage in another process
    differ only in their embed settings."""
    lines = [
        f"run_dir: {run_dir}",
        "data:",
        f"  shards: '{'::'.join(shards)}'",
        "ray:",
        "  num_cpus: 2",
        "embed:",
        f"  image_teacher: '{TINY}'",
        "  allow_random_teacher: true",  # the tiny test teacher has no weights
        *(f"  {k}: {json.dumps(v)}" for k, v in embed.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_yaml(path: Path, run_dir: Path, shards: list[str]) -> Path:
    return write_embed_yaml(path, run_dir, shards, text_teacher=TINY, image_size=64, batch_size=4)


def _snapshot(embed_dir: Path) -> dict[str, bytes]:
    out = {}
    for sub in ("img_emb", "text_emb", "metadata"):
        for p in sorted((embed_dir / sub).glob("*")):
            if not p.name.startswith("."):
                out[f"{sub}/{p.name}"] = p.read_bytes()
    return out


@pytest.mark.slow
def test_sigkill_driver_then_resume_gives_identical_files(local_ray, tmp_path):
    shards = make_shards(tmp_path / "shards", [10] * 16, seed=7)
    killed_dir = tmp_path / "killed"
    yaml_path = _write_yaml(tmp_path / "killed.yaml", killed_dir, shards)
    done_dir = killed_dir / "embed" / "_done"
    megaclass = Path(sys.executable).with_name("megaclass")
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0", RAY_ADDRESS="local")
    proc = subprocess.Popen(
        [str(megaclass), "embed", str(yaml_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its Ray processes stay in this session: we clean them up below
        env=env,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if done_dir.is_dir() and any(done_dir.glob("*.json")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the driver finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the Ray daemons the killed driver started
        except ProcessLookupError:
            pass
    finished_before = sorted(p.stem for p in done_dir.glob("*.json"))
    assert 0 < len(finished_before) < len(shards)

    cfg = load_config(str(yaml_path), [])
    resumed = run_embed(cfg)
    assert resumed["shards_done_before"] == len(finished_before)
    assert resumed["shards_embedded"] == len(shards) - len(finished_before)

    clean_cfg = load_config(
        str(_write_yaml(tmp_path / "clean.yaml", tmp_path / "clean", shards)), []
    )
    run_embed(clean_cfg)
    assert not list((killed_dir / "embed").rglob(".tmp-*"))  # killed writes cleaned up
    a, b = _snapshot(killed_dir / "embed"), _snapshot(tmp_path / "clean" / "embed")
    assert sorted(a) == sorted(b) and len(a) == 3 * len(shards)
    for name in a:
        assert a[name] == b[name], name  # byte-identical arrays and metadata
    keys = []
    for url in shards:
        keys += (
            pq.read_table(killed_dir / "embed" / "metadata" / f"{shard_stem(url)}.parquet")
            .column("key")
            .to_pylist()
        )
    assert len(keys) == len(set(keys)) == 160  # no duplicate, no missing key


# ----------------------------------------------------------------------------------------
# one bad sample or one failed write stays with its shard; start-up; LAION metadata


def test_bad_key_and_metadata_skip_the_sample_not_the_shard(local_ray, tmp_path, data_helpers):
    """A raw byte in a member name and a lone surrogate in a json used to reach the parquet
    writer, fail every shard in flight and leave img_emb files without metadata; now each is
    one counted skip and every shard is written. The summary records the teacher's weights."""
    good = make_shards(tmp_path / "shards", [5], seed=1)
    img = data_helpers.jpeg(20, 20, 3)
    members = data_helpers.sample("k0", img, "fine", {"class": "a"})
    members += data_helpers.sample("bad\udcffkey", img, "raw byte in the name", {})
    members += data_helpers.sample("k1", img, "lone surrogate", b'{"class": "b", "n": "\\udc80"}')
    members += data_helpers.sample("k2", img, "fine too", {"class": "c", "n": "\u00e9"})
    damaged = data_helpers.raw_tar(tmp_path / "shards" / "damaged.tar", members)
    cfg = cfg_for(tmp_path / "run", good + [str(damaged)])
    summary = run_embed(cfg)
    embed_dir = RunDir(cfg.run_dir).embed
    assert (summary["shards_embedded"], summary["shards_failed"], summary["rows"]) == (2, 0, 7)
    _, _, meta = read_stem(embed_dir, "damaged")
    assert meta["key"] == ["k0", "k2"] and meta["class"] == ["a", "c"]
    assert json.loads(meta["json"][1]) == {"class": "c", "n": "\u00e9"}
    assert RunDir.read_done(embed_dir, "damaged")["skipped"] == {"bad_key": 1, "bad_metadata": 1}
    assert summary["skipped"] == {"bad_key": 1, "bad_metadata": 1}
    random_tiny = {"teacher": TINY, "weights": "random", "seed": 0}
    assert summary["teacher_weights"] == {"image": random_tiny, "text": random_tiny}
    success = json.loads((embed_dir / "_SUCCESS.json").read_text())
    assert success["teacher_weights"] == summary["teacher_weights"]


def test_write_failures_fail_only_their_shard_and_leave_no_file(local_ray, tmp_path, monkeypatch):
    """ENOSPC while writing one shard's metadata, and while writing another's ``_done`` record:
    those two shards fail with the error as their reason and keep no file (not even an older
    version's), the others are written; the next run writes just the two."""
    shards = make_shards(tmp_path / "shards", [5, 6, 4, 3], seed=4)
    stems = [shard_stem(u) for u in shards]
    cfg = cfg_for(tmp_path / "run", shards)
    embed_dir = RunDir(cfg.run_dir).embed
    bad = {stems[1]: "metadata", stems[2]: "_done"}
    monkeypatch.setenv(WRITE_FAULT_ENV, ",".join(f"{s}:{f}" for s, f in bad.items()))
    with pytest.raises(EmbedError, match="No space left on device"):
        run_embed(cfg)
    failed = json.loads((embed_dir / "_FAILED.json").read_text())
    assert sorted(failed["failed"]) == [shards[1], shards[2]]
    for url in (shards[1], shards[2]):
        assert failed["failed"][url].startswith(
            "write: OSError: [Errno 28] No space left on device"
        )
    assert (failed["shards_embedded"], failed["shards_failed"], failed["rows"]) == (2, 2, 8)

    def files_of(stem: str) -> list[Path]:
        return sorted(p for p in embed_dir.rglob("*") if p.is_file() and stem in p.name)

    for stem in bad:
        assert files_of(stem) == []  # no .npy, .parquet, _done, nor a .tmp-* left behind
    for stem, n in ((stems[0], 5), (stems[3], 3)):
        assert RunDir.read_done(embed_dir, stem)["rows"] == n
        assert [p.parent.name for p in files_of(stem)] == [
            "_done",
            "img_emb",
            "metadata",
            "text_emb",
        ]

    monkeypatch.delenv(WRITE_FAULT_ENV)
    again = run_embed(cfg)  # space freed: only the failed shards are written
    assert (again["shards_done_before"], again["shards_embedded"], again["rows"]) == (2, 2, 18)
    assert not (embed_dir / "_FAILED.json").exists()

    # a changed input is embedded again; its write fails: the older version goes too, so the
    # folder never holds a shard's old metadata beside new vectors (or a record for either)
    os.utime(shards[1], ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    monkeypatch.setenv(WRITE_FAULT_ENV, f"{stems[1]}:text_emb")
    with pytest.raises(EmbedError, match=rf"{stems[1]}\.tar: write: OSError"):
        run_embed(cfg)
    assert files_of(stems[1]) == []
    assert len(files_of(stems[0])) == 4


def test_input_signatures_run_in_parallel_in_order(tmp_path, monkeypatch):
    """Start-up stats every shard for the restart check: on a thread pool, not one by one."""
    from megaclass.pipelines import embed_decode

    real = make_shards(tmp_path / "shards", [1, 2, 1])
    assert embed_decode.input_signatures(real) == [input_signature(u) for u in real]

    def slow(url: str) -> dict:
        time.sleep(0.2)  # one object-store round trip, exaggerated
        return {"url": url}

    monkeypatch.setattr(embed_decode, "input_signature", slow)
    urls = [f"s3://bucket/laion/{i:05d}.tar" for i in range(48)]
    t0 = time.perf_counter()
    sigs = embed_decode.input_signatures(urls)
    assert time.perf_counter() - t0 < 3.0  # one after another: 9.6 s
    assert [s["url"] for s in sigs] == urls


def test_clip_retrieval_metadata_gets_keys_from_image_path(tmp_path):
    """clip-retrieval's metadata has ``image_path`` but no ``key``: the key is the file name."""
    import pyarrow as pa
    from megaclass.data import regroup
    from megaclass.data.embeddings import (
        EmbeddingsError,
        key_from_path,
        load_shard,
        read_keys,
        validate_embeddings_dir,
    )

    assert regroup.key_from_path is key_from_path  # moved, still importable from regroup
    byo = tmp_path / "clip"
    (byo / "img_emb").mkdir(parents=True)
    (byo / "metadata").mkdir()
    x = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float16)
    np.save(byo / "img_emb" / "img_emb_0.npy", x)
    paths = ["/data/laion/00012/000120034.jpg", "00012.tar/000120035.jpg", "C:\\l\\000120036.webp"]
    meta = pa.table({"image_path": paths, "caption": ["a", "b", "c"]})
    pq.write_table(meta, byo / "metadata" / "metadata_0.parquet")
    assert validate_embeddings_dir(byo)["rows"] == 3
    want = ["000120034", "000120035", "000120036"]
    assert read_keys(byo, "metadata_0") == want
    keys, feats = load_shard(byo, "metadata_0", "image")
    assert keys == want and feats.shape == (3, 8)

    pq.write_table(
        pa.table({"image_path": [paths[0], None, paths[2]]}),
        byo / "metadata" / "metadata_0.parquet",
    )
    with pytest.raises(EmbeddingsError, match="1 rows have no image_path"):
        read_keys(byo, "metadata_0")
    pq.write_table(pa.table({"url": ["u"] * 3}), byo / "metadata" / "metadata_0.parquet")
    with pytest.raises(EmbeddingsError, match="missing column 'key' \\(or 'image_path'"):
        validate_embeddings_dir(byo)


def test_write_and_crash_fault_switches_and_the_crash_ledger(monkeypatch):
    monkeypatch.setenv(WRITE_FAULT_ENV, "a:metadata, dir-b:_done")
    assert write_fault_plan() == {"a": "metadata", "dir-b": "_done"}
    monkeypatch.setenv(WRITE_FAULT_ENV, "a:parquet")
    with pytest.raises(ValueError, match=WRITE_FAULT_ENV):
        write_fault_plan()
    monkeypatch.setenv(EMBED_CRASH_ENV, "x, y,")
    assert crash_plan() == {"x", "y"}

    # the ledger's rule, without Ray: a worker that starts again before it finished had died
    ledger = CrashLedger()
    ledger.start("actor:1", "teacher", "s0", 0)
    ledger.finish("actor:1")
    ledger.start("actor:1", "teacher", "s1", 3)  # dies here ...
    ledger.start("actor:2", "teacher", "s0", 1)  # (another actor, in flight at the end)
    ledger.start("actor:1", "teacher", "s2", 0)  # ... the restarted actor takes other work
    ledger.start("task:9", "decode", "s3", -1)
    ledger.start("task:9", "decode", "s3", -1)  # a decode task retried after its death
    assert ledger.crashed() == {"s1": ("teacher", 3, 1), "s3": ("decode", -1, 1)}


def test_embeddings_shard_is_written_all_or_nothing(tmp_path):
    """A value the parquet writer refuses (a lone surrogate) or a failing file leaves no file
    of the stem, not even the older version's; a version without text drops the old text_emb."""
    from megaclass.data.embeddings import write_embeddings_shard

    x = np.ones((2, 4), np.float32)
    meta = {"key": ["a", "b"], "caption": ["x", "y"]}
    write_embeddings_shard(tmp_path, "s", x, x, meta)
    assert sorted(p.parent.name for p in tmp_path.rglob("s.*")) == [
        "img_emb",
        "metadata",
        "text_emb",
    ]
    with pytest.raises(UnicodeEncodeError):
        write_embeddings_shard(tmp_path, "s", x, x, {"key": ["a", "\udcff"]})
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []

    def full_disk(kind: str) -> None:
        if kind == "metadata":
            raise OSError(28, "No space left on device")

    write_embeddings_shard(tmp_path, "s", x, x, meta)
    with pytest.raises(OSError, match="No space"):
        write_embeddings_shard(tmp_path, "s", x, None, meta, before_file=full_disk)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    write_embeddings_shard(tmp_path, "s", x, x, meta)
    write_embeddings_shard(tmp_path, "s", x, None, meta)
    assert sorted(p.parent.name for p in tmp_path.rglob("s.*")) == ["img_emb", "metadata"]
