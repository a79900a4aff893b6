"""The assign stage: Ray Data actors, label sidecars, summary, and SIGKILL resume per shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from megaclass.clustering.lloyd import chunked_topk
from megaclass.clustering.synthetic import planted_sphere, write_embed_dir
from megaclass.data.embeddings import list_stems, load_shard
from megaclass.data.labels import LabelShaMismatchError, read_labels
from megaclass.pipelines.assign import run_assign
from megaclass.pipelines.cluster import run_cluster
from megaclass.pipelines.config import load_config

K = 10


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    # "local": a fresh instance even when another Ray on this machine was started by `ray start`
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emb")
    x, y = planted_sphere(2000, K, 16, 0.3, 31)
    write_embed_dir(str(root), x, classes=[f"c{v}" for v in y], rows_per_stem=500)
    return root


def _args(run_dir: Path, embed_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"embed.embeddings_dir={embed_dir}",
        f"cluster.k={K}",
        "cluster.niter=5",
        "cluster.feature=image",
        "assign.topk=3",
        "assign.concurrency=2",
        "assign.num_cpus_per_actor=1",
        "assign.batch_size=128",
        *extra,
    ]


def _clustered(run_dir: Path, embed_dir: Path, *extra: str):
    cfg = load_config(None, _args(run_dir, embed_dir, *extra))
    run_cluster(cfg)
    return cfg


def test_assign_before_cluster_is_a_clear_error(tmp_path: Path, embed_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cluster/centroids\.npy: no centroids"):
        run_assign(load_config(None, _args(tmp_path / "r", embed_dir)))


def test_exact_labels_equal_brute_force_and_summary(tmp_path: Path, embed_dir: Path) -> None:
    run = tmp_path / "r"
    cfg = _clustered(run, embed_dir)
    summary = run_assign(cfg)
    c = np.load(run / "cluster" / "centroids.npy")
    sha = (run / "cluster" / "centroids.sha256").read_text().strip()
    low = 0
    hist = np.zeros(K, dtype=np.int64)
    for stem in list_stems(embed_dir):
        keys, x = load_shard(embed_dir, stem, "image")
        t = read_labels(run / "labels" / f"{stem}.parquet", expected_sha=sha)
        ref_l, ref_s = chunked_topk(x, c, 3)
        assert t.keys == keys
        np.testing.assert_array_equal(t.labels, ref_l)
        np.testing.assert_allclose(t.scores, ref_s, atol=1e-6)
        low += int((ref_s[:, 0] < cfg.assign.low_score_threshold).sum())
        hist += np.bincount(ref_l[:, 0], minlength=K)
        with pytest.raises(LabelShaMismatchError):
            read_labels(run / "labels" / f"{stem}.parquet", expected_sha="0" * 64)
    assert summary["rows"] == 2000 and summary["stems_assigned_this_run"] == 4
    assert summary["centroid_sha256"] == sha
    assert summary["low_score_rows"] == low
    assert summary["label_histogram"]["points"] == 2000
    assert summary["label_histogram"]["largest"][0] == hist.max()
    assert json.loads((run / "labels" / "_SUCCESS.json").read_text()) == summary
    # everything done: a second run skips every shard
    again = run_assign(cfg)
    assert again["stems_assigned_this_run"] == 0 and again["rows"] == 2000


@pytest.mark.parametrize("method", ["hnsw", "tree"])
def test_approximate_methods_agree_with_exact(tmp_path: Path, embed_dir: Path, method: str) -> None:
    run = tmp_path / "r"
    probe = ["assign.nprobe=2"] if method == "tree" else []  # nprobe is the tree's setting
    cfg = _clustered(run, embed_dir, f"assign.method={method}", *probe, "assign.concurrency=1")
    run_assign(cfg)
    c = np.load(run / "cluster" / "centroids.npy")
    agree = total = 0
    for stem in list_stems(embed_dir):
        _, x = load_shard(embed_dir, stem, "image")
        t = read_labels(run / "labels" / f"{stem}.parquet")
        ref, _ = chunked_topk(x, c, 1)
        agree += int((t.labels[:, 0] == ref[:, 0]).sum())
        total += len(x)
    assert agree / total >= 0.95


def test_sigkill_and_resume_gives_identical_label_files(
    tmp_path: Path, embed_dir: Path, ray_local
) -> None:
    """The driver is SIGKILLed once 2 shards are done; the rerun does only the rest; files match."""
    code = (
        "import sys; from megaclass.pipelines.config import load_config;"
        "from megaclass.pipelines.assign import run_assign;"
        "run_assign(load_config(None, sys.argv[1:]))"
    )
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ("assign.concurrency=1", f"ray.address={ray_local}")
    cfg_a = _clustered(a, embed_dir, *extra)
    env = dict(os.environ, TQDM_DISABLE="1", MEGACLASS_FAULT="assign_done:2")
    args = _args(a, embed_dir, *extra)
    killed = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -9, killed.stderr.decode()[-3000:]
    done = sorted(p.stem for p in (a / "labels" / "_done").glob("*.json"))
    assert len(done) == 2 and not (a / "labels" / "_SUCCESS.json").exists()
    resumed = run_assign(cfg_a)
    assert resumed["stems_assigned_this_run"] == 4 - len(done)
    cfg_b = _clustered(b, embed_dir, *extra)
    run_assign(cfg_b)
    for stem in list_stems(embed_dir):
        fa = (a / "labels" / f"{stem}.parquet").read_bytes()
        fb = (b / "labels" / f"{stem}.parquet").read_bytes()
        assert fa == fb, stem


CRASHING_DRIVER = """
import os, sys
import ray
from megaclass.pipelines.assign import run_assign
from megaclass.pipelines.config import load_config

CRASH_STEM, TALLY = sys.argv[1], sys.argv[2]


def crash_on_stem():
    # runs in every worker of this Ray instance: the actor exits hard on one stem
    from megaclass.pipelines import assign

    real = assign.AssignActor.assign_stem

    def assign_stem(self, stem):
        if stem == CRASH_STEM:
            with open(TALLY, "a") as f:
                f.write("attempt\\n")
            os._exit(1)
        return real(self, stem)

    assign.AssignActor.assign_stem = assign_stem


ray.init(
    num_cpus=2,
    include_dashboard=False,
    log_to_driver=False,
    runtime_env={"worker_process_setup_hook": crash_on_stem},
)
try:
    run_assign(load_config(None, sys.argv[3:]))
except Exception as e:
    print("ASSIGN_ERROR:", type(e).__name__, flush=True)
    sys.exit(3)
print("ASSIGN_OK", flush=True)
"""


def test_crashing_actor_is_retried_a_bounded_number_of_times(
    tmp_path: Path, embed_dir: Path
) -> None:
    """An actor that exits hard on one shard is restarted and the shard retried
    ``assign.actor_crash_retries`` times, then the stage ends with Ray's error (Ray's default:
    forever). Its own Ray instance in a subprocess, so that the end is seen as it is."""
    import signal

    run = tmp_path / "r"
    extra = ("assign.concurrency=1", "assign.actor_crash_retries=1")
    _clustered(run, embed_dir, *extra)
    crash_stem = list_stems(embed_dir)[1]
    tally = tmp_path / "attempts.txt"
    env = dict(os.environ, RAY_ADDRESS="local", TQDM_DISABLE="1")  # a fresh local Ray
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CRASHING_DRIVER,
            crash_stem,
            str(tally),
            *_args(run, embed_dir, *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        out = b"(timed out: the crashing shard is retried without end)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a hung stage and its Ray processes
        except ProcessLookupError:
            pass
        proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 3 and "ASSIGN_ERROR: ActorDiedError" in text, text[-3000:]
    assert tally.read_text().count("attempt") == 2  # the first try and actor_crash_retries=1
    labels = run / "labels"
    assert not (labels / f"{crash_stem}.parquet").exists()
    assert not (labels / "_done" / f"{crash_stem}.json").exists()
    assert not (labels / "_SUCCESS.json").exists()
