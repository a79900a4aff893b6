"""The embed stage joining a two-node Ray cluster (ray.cluster_utils.Cluster) by address:
outputs equal a plain single-process loop with the same teacher over the same shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from megaclass.core.rundir import RunDir
from megaclass.data.reader import iter_samples
from megaclass.data.shards import shard_stem
from megaclass.data.stats import SampleStats
from megaclass.data.writer import ShardWriter
from megaclass.pipelines.config import DataConfig, EmbedConfig, RayConfig, RunConfig
from megaclass.pipelines.embed import run_embed
from megaclass.training.teachers import load_teacher
from PIL import Image

TINY = "open_clip:megaclass-tiny"


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_node_cluster_equals_plain_loop(two_node_cluster, tmp_path):
    import ray

    rng = np.random.default_rng(11)
    with ShardWriter(tmp_path / "shards", maxcount=7) as w:
        for i in range(17):
            img = Image.fromarray(rng.integers(0, 256, (20 + i, 28, 3), dtype=np.uint8))
            w.write(f"k{i:03d}", img, f"caption number {i}", {"class": str(i % 2)})
    shards = w.shards
    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        data=DataConfig(shards="::".join(shards)),
        ray=RayConfig(address=two_node_cluster.address),
        embed=EmbedConfig(
            image_teacher=TINY, text_teacher=TINY, batch_size=3, allow_random_teacher=True
        ),
    )
    # the stage joins the running cluster (and leaves it up: it did not start it)
    ray.init(address=two_node_cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    summary = run_embed(cfg)
    assert ray.is_initialized()
    assert summary["rows"] == 17 and summary["shards_embedded"] == 3

    torch.set_num_threads(1)
    t = load_teacher(TINY, TINY)
    embed_dir = RunDir(cfg.run_dir).embed
    for url in shards:
        samples = list(iter_samples(url, SampleStats()))
        stem = shard_stem(url)
        img = np.load(embed_dir / "img_emb" / f"{stem}.npy")
        txt = np.load(embed_dir / "text_emb" / f"{stem}.npy")
        keys = pq.read_table(embed_dir / "metadata" / f"{stem}.parquet").column("key").to_pylist()
        assert keys == [s.key for s in samples]
        ref_img = np.concatenate(
            [
                t.encode_images(
                    torch.stack([t.image_transform(s.image) for s in samples[i : i + 3]])
                )
                for i in range(0, len(samples), 3)
            ]
        )
        ref_txt = np.concatenate(
            [
                t.encode_texts([s.caption for s in samples[i : i + 3]])
                for i in range(0, len(samples), 3)
            ]
        )
        np.testing.assert_allclose(img.astype(np.float32), ref_img, atol=2e-3)
        np.testing.assert_allclose(txt.astype(np.float32), ref_txt, atol=2e-3)
