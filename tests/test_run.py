"""``megaclass run``: which stages run or are skipped, and bring-your-own inputs, on real files.

The kill-during-each-stage / restart test of the whole pipeline is tests/test_run_kill.py.
Here the real cluster and assign stages run on tiny embeddings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from megaclass.pipelines.config import ConfigError, load_config
from megaclass.pipelines.run import PIPELINE, plan, run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slurm import _tiny_embeddings  # noqa: E402

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


def _actions(cfg, stages=PIPELINE) -> dict[str, str]:
    return {p.stage: p.action for p in plan(cfg, stages)}


def test_plan_skips_complete_stages_and_bring_your_own_inputs(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}"])
    assert _actions(cfg) == dict.fromkeys(PIPELINE, "run")
    # a stage is complete exactly when its _SUCCESS.json exists
    for folder in ("embed", "labels"):
        (tmp_path / "run" / folder).mkdir(parents=True)
        (tmp_path / "run" / folder / "_SUCCESS.json").write_text("{}")
    (tmp_path / "run" / "cluster" / "_done").mkdir(parents=True)  # partial work only
    acts = _actions(cfg)
    assert acts["embed"] == "skip" and acts["assign"] == "skip"
    assert acts["cluster"] == "run" and acts["train"] == "run" and acts["report"] == "run"
    # bring your own
    byo = load_config(None, [f"run_dir={tmp_path / 'other'}", "embed.embeddings_dir=/x/emb"])
    assert _actions(byo)["embed"] == "skip" and _actions(byo)["cluster"] == "run"
    byo = load_config(None, [f"run_dir={tmp_path / 'other'}", "cluster.centroids=/x/c.npy"])
    p = {x.stage: x for x in plan(byo)}
    assert p["cluster"].action == "run" and "cluster.centroids" in p["cluster"].reason
    byo = load_config(None, [f"run_dir={tmp_path / 'other'}", "assign.labels_dir=/x/labels"])
    assert _actions(byo) == {**dict.fromkeys(("embed", "cluster", "assign"), "skip"),
                             **dict.fromkeys(("regroup", "train", "eval", "report"), "run")}  # fmt: skip
    assert list(_actions(cfg, ["eval", "train"])) == ["train", "eval"]  # always pipeline order
    with pytest.raises(ConfigError, match="bogus"):
        plan(cfg, ["train", "bogus"])


def test_cli_rejects_unknown_stage(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run")}))
    res = subprocess.run(
        [PY, "-m", "megaclass.pipelines.run", str(tmp_path / "c.yaml"), "--stages", "embed,nope"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 2 and "nope" in res.stderr


def test_byo_embeddings_and_centroids_are_imported_then_skipped_on_resume(tmp_path):
    """Real cluster stage on brought embeddings + centroids (the Ray assign of such a run is
    exercised, labels checked against brute force, in test_slurm's Ray-cluster test)."""
    from megaclass.data.labels import file_sha256

    emb = _tiny_embeddings(tmp_path, n_stems=2, rows=40, d=8)
    rng = np.random.default_rng(3)
    cent = rng.normal(size=(5, 8)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    np.save(tmp_path / "mine.npy", cent)
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"embed.embeddings_dir={emb}",
            f"cluster.centroids={tmp_path / 'mine.npy'}",
            "cluster.k=5",
            "cluster.feature=image",
        ],
    )
    res = run_pipeline(cfg, stages=("embed", "cluster"))
    assert {s: r["action"] for s, r in res["stages"].items()} == {"embed": "skip", "cluster": "run"}
    run = tmp_path / "run"
    stored = np.load(run / "cluster" / "centroids.npy")
    assert np.allclose(stored, cent, atol=1e-6)  # imported (renormalised), not re-clustered
    sha = (run / "cluster" / "centroids.sha256").read_text().strip()
    assert sha == file_sha256(run / "cluster" / "centroids.npy")
    stats = json.loads((run / "cluster" / "_SUCCESS.json").read_text())
    assert stats["backend"] == "byo" and stats["sample_rows"] == 80 and stats["objective"] == []
    mtime = (run / "cluster" / "centroids.npy").stat().st_mtime_ns
    # started again: complete, so nothing is redone
    res2 = run_pipeline(cfg, stages=("embed", "cluster"))
    assert {r["action"] for r in res2["stages"].values()} == {"skip"}
    assert (run / "cluster" / "centroids.npy").stat().st_mtime_ns == mtime
    # a changed config on the same run directory is refused unless forced
    other = load_config(None, [f"run_dir={run}", f"embed.embeddings_dir={emb}", "cluster.k=6"])
    with pytest.raises(Exception, match="different config"):
        run_pipeline(other, stages=("cluster",))


def test_stale_temporaries_of_the_starting_stage_are_removed(tmp_path):
    from megaclass.pipelines.run import remove_stale_temporaries

    run = tmp_path / "run"
    files = {
        "embed/img_emb/.tmp-a.npy.x1.npy": True,  # embed's own: not the stage starting
        "cluster/state/.tmp-iter-0003.npz.x2": True,
        "train/ckpt/step-0000004/head/.tmp-rank0.pt.x3": False,
        "train/.tmp-metrics.jsonl.x4": False,
        "export/.tmp-encoder.safetensors.x5": False,
        "train/ckpt/step-0000004/head/rank0.pt": True,  # a final name is never touched
        ".tmp-report.json.x6": True,  # the root belongs to the report stage
    }
    for rel in files:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"partial")
    removed = remove_stale_temporaries(run, "train")
    assert sorted(p.relative_to(run).as_posix() for p in removed) == sorted(
        rel for rel, kept in files.items() if not kept
    )
    assert all((run / rel).exists() == kept for rel, kept in files.items())
    assert [p.name for p in remove_stale_temporaries(run, "report")] == [".tmp-report.json.x6"]
    assert remove_stale_temporaries(tmp_path / "absent", "eval") == []


def test_cli_refuses_a_changed_config_with_a_message(tmp_path, capsys):
    from megaclass.core.rundir import RunDir
    from megaclass.pipelines.cli import main as cli_main

    run = tmp_path / "run"
    RunDir(run).write_config(load_config(None, [f"run_dir={run}", "cluster.k=5"]))
    RunDir.write_done(RunDir(run).embed, "shard-0", {})  # stage output: config not provisional
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"run_dir": str(run)}))
    assert cli_main(["run", str(tmp_path / "c.yaml"), "cluster.k=6"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "cluster.k: 5 -> 6" in err and "Traceback" not in err


def test_training_without_any_matching_label_sidecar_is_refused(tmp_path):
    from megaclass.pipelines.run import check_labels_for_training

    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(4):  # what assign writes for LAION's published embedding parts
        (labels / f"metadata_{i}.parquet").write_bytes(b"")
    spec = f"{tmp_path}/shards/{{00000..00009}}.tar"
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.shards={spec}",
                             f"assign.labels_dir={labels}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"none of the 10 training shards.*'00000'.*metadata_0"):
        check_labels_for_training(cfg)
    siglip = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.shards={spec}",
                                f"assign.labels_dir={labels}", "train.objective=siglip"])  # fmt: skip
    check_labels_for_training(siglip)  # no labels needed
    (labels / "00003.parquet").write_bytes(b"")
    check_labels_for_training(cfg)  # one shard has labels: the loader counts the others
    # the run's own labels folder is the default
    own = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.shards={spec}"])
    with pytest.raises(ConfigError, match="holds 0: none"):
        check_labels_for_training(own)
