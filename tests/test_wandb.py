"""Weights & Biases logging, run for real in W&B's offline mode (WANDB_MODE=offline).

What is checked is what W&B wrote: the offline run folder under RUN/train/wandb/ and its
``run-<id>.wandb`` record log, read back with a small reader of that file format (LevelDB's
log framing around W&B's own protobuf records, ``wandb.proto``), plus the eval table's JSON.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from megaclass.core.config import ConfigError
from megaclass.data.config import DataConfig
from megaclass.pipelines.config import load_config
from megaclass.training.config import TrainConfig, TrainJob
from megaclass.training.tracking import (
    WANDB_ID_FILE,
    MetricsLogger,
    log_eval_table,
    wandb_option_errors,
)

wandb = pytest.importorskip("wandb")  # optional dependency: in the dev extra

BLOCK = 32 * 1024  # LevelDB log block size, which W&B's record log uses


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B record log"
    out, pos, pending = [], 7, b""  # 7-byte file header: ident, magic, version
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, middle/last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def _items(items) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _history(records) -> dict[int, dict[str, Any]]:
    return {
        r.history.step.num: _items(r.history.item)
        for r in records
        if r.WhichOneof("record_type") == "history"
    }


def _flush() -> None:
    """Let W&B's service write out what it holds. In real life the training, its resume and the
    eval table are separate processes, each flushed at exit; here they share one process, and
    W&B may write a run it reopened under the same id only at teardown."""
    wandb.teardown()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def _job(train_dir: Path, **train) -> TrainJob:
    return TrainJob(train=TrainConfig(**train), data=DataConfig(), seed=3, train_dir=train_dir)


REC = dict(lr=0.1, head_lr=None, samples_per_s=40.0, data_wait_share=0.25, grad_norm=2.0)


def test_scalars_config_resume_and_eval_table_reach_wandb_offline(tmp_path, offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_dir = tmp_path / "run" / "train"
    job = _job(train_dir, wandb_project="megaclass-test", wandb_run_name="tiny", wandb_tags=["ci"])
    m = MetricsLogger(train_dir, enabled=True, job=job)
    for s in (1, 2, 3, 4):
        m.log({"step": s, "loss": 1.0 / s, **REC, "time": 100.0 + s})
    m.close()
    _flush()
    run_id = (train_dir / WANDB_ID_FILE).read_text().strip()
    (first,) = list((train_dir / "wandb").glob(f"offline-run-*-{run_id}"))  # default WANDB_DIR
    recs = wandb_records(first / f"run-{run_id}.wandb")

    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, list(run.tags)) == ("megaclass-test", "tiny", ["ci"])
    config = _items(run.config.update)
    assert config["seed"] == 3 and config["train"]["wandb_project"] == "megaclass-test"

    hist = _history(recs)
    assert sorted(hist) == [1, 2, 3, 4]
    assert [hist[s]["train/loss"] for s in (1, 2, 3, 4)] == [1.0, 0.5, 1 / 3, 0.25]
    # the same scalars as TensorBoard: same tags (no step/time, no None-valued head_lr)
    tb = EventAccumulator(str(train_dir / "tb"))
    tb.Reload()
    logged = {k for k in hist[1] if not k.startswith("_")}
    assert (
        logged
        == set(tb.Tags()["scalars"])
        == {
            "train/loss",
            "train/lr",
            "train/samples_per_s",
            "train/data_wait_share",
            "train/grad_norm",
        }
    )

    # resumed at step 2 (killed after 4): the same W&B run continues
    m = MetricsLogger(train_dir, enabled=True, resume_step=2, job=job)
    m.log({"step": 3, "loss": float("nan"), **REC, "time": 200.0})
    m.close()
    _flush()
    assert (train_dir / WANDB_ID_FILE).read_text().strip() == run_id
    runs = sorted((train_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 2
    resumed = _history(wandb_records(next(p for p in runs if p != first) / f"run-{run_id}.wandb"))
    assert list(resumed) == [3] and math.isnan(resumed[3]["train/loss"])

    # the eval table, added later (another process in real life) to the same run
    cols, rows = ["encoder", "dim", "R@1"], [["teacher", 64, 40.0], ["student", 32, 55.5]]
    assert log_eval_table(train_dir, job.train, cols, rows, {"student/recall@1": 0.555})
    _flush()
    runs = sorted((train_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(runs) == 3
    (table,) = [p for r in runs for p in r.glob("files/media/table/eval/table*.table.json")]
    assert json.loads(table.read_text())["data"] == rows
    summaries = [
        _items(r.summary.update)
        for p in runs
        for r in wandb_records(p / f"run-{run_id}.wandb")
        if r.WhichOneof("record_type") == "summary"
    ]
    assert any(s.get("eval/student/recall@1") == 0.555 for s in summaries)


def test_wandb_dir_and_off_by_default(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    train_dir = tmp_path / "train"
    m = MetricsLogger(train_dir, enabled=True, job=_job(train_dir, wandb_project="p"))
    m.log({"step": 1, "loss": 1.0, **REC})
    m.close()
    assert list((tmp_path / "elsewhere" / "wandb").glob("offline-run-*"))
    assert not (train_dir / "wandb").exists()
    # no project: no W&B at all (and the eval table call is a no-op)
    off = tmp_path / "off"
    m = MetricsLogger(off, enabled=True, job=_job(off))
    m.log({"step": 1, "loss": 1.0, **REC})
    m.close()
    assert not (off / "wandb").exists() and not (off / WANDB_ID_FILE).exists()
    assert not log_eval_table(off, TrainConfig(), ["a"], [[1]])


def test_missing_wandb_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when absent
    train_dir = tmp_path / "train"
    with pytest.raises(ConfigError, match=r"train\.wandb_project: .*pip install 'wandb"):
        MetricsLogger(train_dir, enabled=True, job=_job(train_dir, wandb_project="p"))
    assert not train_dir.exists()  # refused before anything was written
    # rank != 0 never imports it
    MetricsLogger(train_dir, enabled=False, job=_job(train_dir, wandb_project="p")).close()


def test_wandb_config_keys():
    cfg = load_config(
        None, ["train.wandb_project=proj", "train.wandb_tags=[a, b]", "train.wandb_run_name=r1"]
    )
    assert (cfg.train.wandb_project, cfg.train.wandb_tags) == ("proj", ["a", "b"])
    assert TrainConfig().wandb_project is None and TrainConfig().wandb_tags == []
    with pytest.raises(ConfigError, match=r"train\.wandb_tags\[0\]"):
        load_config(None, ["train.wandb_tags=[1]"])
    assert wandb_option_errors(cfg.train) == []
    errs = wandb_option_errors(TrainConfig(wandb_run_name="r1", wandb_tags=["x"]))
    assert [e.split(":")[0] for e in errs] == ["train.wandb_run_name", "train.wandb_tags"]
