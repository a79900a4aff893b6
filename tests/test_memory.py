"""Memory plans: stages state their big allocations and refuse what the node cannot hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megaclass.core.memory import MemoryBudgetError, MemoryPlan, available_bytes
from megaclass.pipelines.cluster import memory_plan, run_cluster
from megaclass.pipelines.config import load_config


def test_plan_sums_logs_and_refuses_naming_the_keys(caplog) -> None:
    plan = MemoryPlan("cluster", keys=["cluster.sample_size", "cluster.k"])
    plan.add("sample 1,000 x 8 float32", 32_000)
    plan.add("centroids", 1_000)
    assert plan.total == 33_000
    with caplog.at_level("INFO"):
        plan.check(available=10**9)  # fits: logged, no error
    assert "memory estimate" in caplog.text and "sample 1,000 x 8 float32" in caplog.text
    with pytest.raises(
        MemoryBudgetError, match=r"cluster\.sample_size, cluster\.k.*memory_check=false"
    ):
        plan.check(available=20_000)
    plan.check(enabled=False, available=20_000)  # forced: logged only


def test_available_bytes_is_plausible() -> None:
    avail = available_bytes()
    assert 10**7 < avail < 2**50


def test_hierarchical_plan_counts_the_groups_not_a_second_sample() -> None:
    cfg = load_config(None, ["cluster.backend=hierarchical", "cluster.k=1000000"])
    n, d = 64_000_000, 768
    plan = memory_plan(cfg, n, d)
    sample = 4 * n * d
    assert plan.items[f"sample {n:,} x {d} float32"] == sample
    # about one copy: the sample, its keys, the centroids and the groups in flight
    assert plan.total < 1.5 * sample, plan.describe()
    assert "cluster.hier_parallel" in plan.keys


def _tiny_embeddings(root: Path) -> Path:
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float16)
    np.save(root / "img_emb" / "img_emb_0.npy", x)
    np.save(root / "text_emb" / "text_emb_0.npy", x)
    pq.write_table(
        pa.table({"key": [f"{i:09d}" for i in range(64)]}), root / "metadata" / "metadata_0.parquet"
    )
    return root


def test_cluster_stage_refuses_before_allocating(tmp_path: Path) -> None:
    """k = 10^10 centroids of width 8 cannot fit anywhere: refused before the sample is read."""
    emb = _tiny_embeddings(tmp_path / "emb")
    over = [f"run_dir={tmp_path / 'run'}", f"embed.embeddings_dir={emb}", "cluster.k=10000000000"]
    with pytest.raises(MemoryBudgetError, match=r"cluster\.k"):
        run_cluster(load_config(None, over))
    # memory_check=false goes on, and fails later for the real reason (k > points)
    with pytest.raises(ValueError, match="the sample has only 64 points"):
        run_cluster(load_config(None, [*over, "memory_check=false"]), force=True)
