"""Embedding-folder reader, key-hash sample, and the cluster stage end to end (incl. SIGKILL resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megaclass.clustering.sampling import load_sample
from megaclass.clustering.synthetic import planted_sphere, write_embed_dir
from megaclass.data.embeddings import (
    EmbeddingsError,
    list_stems,
    load_shard,
    validate_embeddings_dir,
)
from megaclass.data.labels import file_sha256
from megaclass.pipelines.cluster import run_cluster
from megaclass.pipelines.config import load_config

K = 12


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory) -> Path:
    """RUN/embed with image and text features of 12 planted classes, 4 stems, a class column."""
    root = tmp_path_factory.mktemp("run")
    x, y = planted_sphere(2400, K, 16, 0.15, 21)
    rng = np.random.default_rng(0)
    t = x + rng.standard_normal(x.shape).astype(np.float32) * 0.02  # captions agree with images
    write_embed_dir(str(root / "embed"), x, t, classes=[f"c{v}" for v in y], rows_per_stem=600)
    return root


def _cfg(run_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"cluster.k={K}",
            "cluster.niter=8",
            "cluster.points_per_centroid=150",
            "ray.num_cpus=2",
            *extra,
        ],
    )


# --- reader ----------------------------------------------------------------------------


def test_reader_fuses_and_validates(embed_run: Path) -> None:
    e = embed_run / "embed"
    assert list_stems(e) == ["00000", "00001", "00002", "00003"]
    info = validate_embeddings_dir(e)
    assert (
        info["rows"] == 2400 and info["d_img"] == 16 and info["d_txt"] == 16 and info["has_class"]
    )
    keys, img = load_shard(e, "00001", "image")
    _, txt = load_shard(e, "00001", "text")
    _, mean = load_shard(e, "00001", "mean")
    assert keys[0] == "s000000600" and img.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mean, axis=1), 1, atol=1e-5)
    expect = img + txt
    np.testing.assert_allclose(
        mean, expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-5
    )
    k2, sub = load_shard(e, "00001", "image", rows=np.array([3, 7]))
    assert k2 == [keys[3], keys[7]]
    np.testing.assert_array_equal(sub, img[[3, 7]])


def test_mean_of_different_widths_is_scaled_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((5, 6)), rng.standard_normal((5, 4))
    write_embed_dir(str(tmp_path), img, txt, rows_per_stem=5)
    _, m = load_shard(tmp_path, "00000", "mean")
    assert m.shape == (5, 10)
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1, atol=1e-3)


def test_laion_layout_and_incomplete_stems(tmp_path: Path) -> None:
    for d in ("img_emb", "text_emb", "metadata"):
        (tmp_path / d).mkdir()
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float16)
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", x)
    np.save(tmp_path / "text_emb" / "text_emb_0.npy", x)
    pq.write_table(
        pa.table({"key": list("abcd"), "url": ["u"] * 4}),
        tmp_path / "metadata" / "metadata_0.parquet",
    )
    info = validate_embeddings_dir(tmp_path)
    assert info["stems"] == ["metadata_0"] and info["rows"] == 4
    keys, f = load_shard(tmp_path, "metadata_0", "text")
    assert keys == list("abcd") and f.shape == (4, 8)
    # with a _done folder, only stems with a record count (the embed stage writes it last)
    (tmp_path / "_done").mkdir()
    with pytest.raises(EmbeddingsError, match="no complete"):
        validate_embeddings_dir(tmp_path)


@pytest.mark.parametrize(
    "breakage, match",
    [
        ("rows", r"img_emb/00000\.npy: 3 rows but .*00000\.parquet has 4 rows"),
        ("nokey", r"00000\.parquet: missing column 'key'"),
        ("nan", r"img_emb/00000\.npy: row 1 is zero or not finite"),
        ("dtype", r"img_emb/00000\.npy: expected a 2-D float16/float32 array"),
    ],
)
def test_bad_folders_name_the_file(tmp_path: Path, breakage: str, match: str) -> None:
    x = np.random.default_rng(3).standard_normal((4, 8))
    write_embed_dir(str(tmp_path), x, rows_per_stem=4)
    if breakage == "rows":
        np.save(tmp_path / "img_emb" / "00000.npy", x[:3].astype(np.float16))
    elif breakage == "nokey":
        pq.write_table(pa.table({"id": list("abcd")}), tmp_path / "metadata" / "00000.parquet")
    elif breakage == "nan":
        x[1, 2] = np.nan
        np.save(tmp_path / "img_emb" / "00000.npy", x.astype(np.float16))
    else:
        np.save(tmp_path / "img_emb" / "00000.npy", x.astype(np.int32))
    with pytest.raises(EmbeddingsError, match=match):
        validate_embeddings_dir(tmp_path)


# --- sample ----------------------------------------------------------------------------


def test_key_hash_sample_is_deterministic_and_independent_of_sharding(tmp_path: Path) -> None:
    x, _ = planted_sphere(3000, 5, 8, 0.3, 4)
    write_embed_dir(str(tmp_path / "a"), x, rows_per_stem=1000)
    write_embed_dir(str(tmp_path / "b"), x, rows_per_stem=700)
    sa = load_sample(tmp_path / "a", list_stems(tmp_path / "a"), "image", 900, seed=5)
    sb = load_sample(tmp_path / "b", list_stems(tmp_path / "b"), "image", 900, seed=5)
    sc = load_sample(tmp_path / "a", list_stems(tmp_path / "a"), "image", 900, seed=6)
    assert sa.keys == sb.keys  # same keys whatever the shard boundaries
    np.testing.assert_array_equal(sa.x, sb.x)
    assert 750 < len(sa.keys) < 1050  # binomial around the target
    assert set(sa.keys) != set(sc.keys)
    everything = load_sample(tmp_path / "a", list_stems(tmp_path / "a"), "image", 10**6, seed=5)
    assert len(everything.keys) == 3000


# --- stage -----------------------------------------------------------------------------


def test_cluster_stage_outputs_and_quality(embed_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "embed").symlink_to(embed_run / "embed")
    stats = run_cluster(_cfg(run, "cluster.feature=mean"))
    out = run / "cluster"
    c = np.load(out / "centroids.npy")
    assert c.dtype == np.float32 and c.shape == (K, 16)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    assert (out / "centroids.sha256").read_text().strip() == file_sha256(out / "centroids.npy")
    assert json.loads((out / "_SUCCESS.json").read_text()) == json.loads(
        (out / "stats.json").read_text()
    )
    assert len(stats["objective"]) == 8 and stats["objective"][-1] >= stats["objective"][0]
    assert stats["quality"]["nmi"] >= 0.95 and stats["quality"]["ami"] >= 0.9
    assert stats["sizes"]["empty"] == 0 and stats["sizes"]["imbalance"] >= 1.0
    assert 0 < stats["sample_rows"] <= 2400
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == ["objective.png", "sizes.png"]
    assert len(list((out / "state").glob("iter-*.npz"))) == 9  # init + 8 iterations
    # a second call finds the stage complete and returns the same summary
    assert run_cluster(_cfg(run, "cluster.feature=mean")) == stats


def test_cluster_stage_bring_your_own_embeddings_and_errors(
    embed_run: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        tmp_path / "r",
        f"embed.embeddings_dir={embed_run / 'embed'}",
        "cluster.backend=hierarchical",
    )
    stats = run_cluster(cfg)
    assert stats["embeddings_dir"] == str(embed_run / "embed") and stats["quality"]["nmi"] >= 0.95
    assert (tmp_path / "r" / "cluster" / "tree_offsets.npy").exists()
    with pytest.raises(ValueError, match="cluster.k = 5000 but the sample has only"):
        run_cluster(
            _cfg(tmp_path / "r2", f"embed.embeddings_dir={embed_run / 'embed'}", "cluster.k=5000")
        )


def test_cluster_stage_sigkill_and_resume_gives_identical_centroids(
    embed_run: Path, tmp_path: Path
) -> None:
    """A real SIGKILL after iteration 3's checkpoint; the rerun continues and matches."""
    code = (
        "import sys; from megaclass.pipelines.config import load_config;"
        "from megaclass.pipelines.cluster import run_cluster;"
        "run_cluster(load_config(None, sys.argv[1:]))"
    )

    def run(run_dir: Path, fault: str | None) -> subprocess.CompletedProcess:
        env = dict(os.environ, TQDM_DISABLE="1")
        env.pop("MEGACLASS_FAULT", None)
        if fault:
            env["MEGACLASS_FAULT"] = fault
        args = [
            f"run_dir={run_dir}",
            f"embed.embeddings_dir={embed_run / 'embed'}",
            f"cluster.k={K}",
            "cluster.niter=8",
            "cluster.feature=image",
        ]
        return subprocess.run(
            [sys.executable, "-c", code, *args], env=env, capture_output=True, timeout=300
        )

    killed = run(tmp_path / "a", "kmeans_iter:3")
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    state = tmp_path / "a" / "cluster" / "state"
    assert (state / "iter-0003.npz").exists() and not (state / "iter-0004.npz").exists()
    assert not (tmp_path / "a" / "cluster" / "centroids.npy").exists()
    resumed = run(tmp_path / "a", None)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    run_cluster(  # the uninterrupted run, in this process
        load_config(
            None,
            [
                f"run_dir={tmp_path / 'b'}",
                f"embed.embeddings_dir={embed_run / 'embed'}",
                f"cluster.k={K}",
                "cluster.niter=8",
                "cluster.feature=image",
            ],
        )
    )
    a = (tmp_path / "a" / "cluster" / "centroids.npy").read_bytes()
    b = (tmp_path / "b" / "cluster" / "centroids.npy").read_bytes()
    assert a == b
    sa = json.loads((tmp_path / "a" / "cluster" / "stats.json").read_text())
    sb = json.loads((tmp_path / "b" / "cluster" / "stats.json").read_text())
    assert sa["objective"] == sb["objective"] and sa["centroid_sha256"] == sb["centroid_sha256"]
