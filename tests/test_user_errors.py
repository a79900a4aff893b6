"""User errors print one line and exit 2; a failed first attempt does not pin its config.

The stages run for real (the cluster stage on tiny brought embeddings); the command lines are
the real entry points: ``megaclass`` (pipelines/cli.py) in-process, and
``python -m megaclass.pipelines.run`` / ``python -m megaclass.pipelines.train`` as processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from megaclass.core.config import ConfigError
from megaclass.core.errors import UserError, user_error_of
from megaclass.core.rundir import ConfigChangedError
from megaclass.pipelines.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slurm import _tiny_embeddings  # noqa: E402

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, emb: Path | str) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "embed": {"embeddings_dir": str(emb)},
        "cluster": {"k": 5, "feature": "image", "niter": 5},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_line(err: str) -> str:
    """The single ``megaclass: …`` line of ``err``; no traceback (log lines and progress bars
    are allowed around it)."""
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("megaclass")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and 'File "' not in err, err
    return lines[0]


def test_user_error_classes_keep_their_builtin_base():
    from megaclass.core.memory import MemoryBudgetError
    from megaclass.data.builders import DatasetUnavailableError
    from megaclass.data.embeddings import EmbeddingsError
    from megaclass.data.labels import LabelFileError, LabelShaMismatchError
    from megaclass.data.regroup import RegroupError
    from megaclass.data.shards import ShardSpecError
    from megaclass.pipelines.embed import EmbedError
    from megaclass.pipelines.eval import EvalError
    from megaclass.pipelines.retrieval import MetricsError
    from megaclass.training.checkpoint import CheckpointError
    from megaclass.training.teachers import TeacherError
    from megaclass.training.trainer import NonFiniteLossError

    expected = {
        ConfigError: ValueError,
        ConfigChangedError: RuntimeError,
        MemoryBudgetError: RuntimeError,
        DatasetUnavailableError: FileNotFoundError,
        EmbeddingsError: ValueError,
        LabelFileError: ValueError,
        LabelShaMismatchError: ValueError,
        RegroupError: ValueError,
        ShardSpecError: ValueError,
        EmbedError: RuntimeError,
        EvalError: ValueError,
        MetricsError: ValueError,
        CheckpointError: RuntimeError,
        TeacherError: ValueError,
        NonFiniteLossError: RuntimeError,
    }
    for cls, base in expected.items():
        assert issubclass(cls, UserError) and issubclass(cls, base), cls


def test_a_user_error_is_one_line_and_exit_2_and_debug_shows_the_traceback(
    tmp_path, capsys, monkeypatch
):
    cfg = _cfg(tmp_path, tmp_path / "no-such-embeddings")
    assert cli_main(["cluster", str(cfg)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("megaclass: ") and "no-such-embeddings" in line
    # --debug anywhere on the line, or MEGACLASS_DEBUG=1: the same message plus the traceback
    assert cli_main(["cluster", str(cfg), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1] == line
    monkeypatch.setenv("MEGACLASS_DEBUG", "1")
    assert cli_main(["cluster", str(cfg)]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("MEGACLASS_DEBUG")
    # a config error keeps its "config error:" prefix
    assert cli_main(["cluster", str(cfg), "cluster.k=many"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == "megaclass: config error: cluster.k: expected int, got 'many'"


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only user errors are shortened: anything else is not caught by the guard."""
    from megaclass.pipelines.cli import run_guarded

    def bug() -> int:
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_guarded(bug)


def test_ray_wrapped_user_error_prints_the_original_message():
    """A user error raised in a Ray task reaches the driver wrapped, its text the remote
    traceback; the line printed is the original message (Ray's own wrapper class)."""
    from megaclass.data.shards import ShardSpecError
    from megaclass.pipelines.cli import user_error_message
    from ray.exceptions import RayTaskError

    cause = ShardSpecError("shard spec 'x' expands to no shards")
    remote = (
        'Traceback (most recent call last):\n  File "shards.py", line 1, in read_part\n'
        f"megaclass.data.shards.ShardSpecError: {cause}"
    )
    wrapped = RayTaskError("read_part", remote, cause, proctitle="ray::read_part", pid=7)
    wrapped = wrapped.as_instanceof_cause()
    assert isinstance(wrapped, ShardSpecError) and "pid=7" in str(wrapped)
    assert user_error_of(wrapped) is cause
    assert user_error_message(wrapped) == "shard spec 'x' expands to no shards"


def test_entry_points_run_and_train_print_one_line_and_exit_2(tmp_path):
    cfg = _cfg(tmp_path, tmp_path / "no-such-embeddings")
    res = subprocess.run(
        [PY, "-m", "megaclass.pipelines.run", str(cfg), "--stages", "cluster"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    line = _one_line(res.stderr)
    assert line.startswith("megaclass: ") and "no-such-embeddings" in line
    # the train entry (what torchrun/srun start): a bad override, before any rank trains
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run2"), "train": {"steps": 0}}))
    res = subprocess.run(
        [PY, "-m", "megaclass.pipelines.train", str(bad), "train.steps=many"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    line = _one_line(res.stderr)
    assert line == "megaclass: config error: train.steps: expected int, got 'many'"


def test_failed_first_attempt_does_not_pin_its_config_but_real_progress_does(tmp_path, capsys):
    emb = _tiny_embeddings(tmp_path, n_stems=2, rows=40, d=8)
    run = tmp_path / "run"
    # 1. fails on its input (k above the 80 sampled points): exit 2, no stage output
    cfg = _cfg(tmp_path, emb)
    assert cli_main(["cluster", str(cfg), "cluster.k=500"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "cluster.k = 500 but the sample has only 80 points" in line
    assert yaml.safe_load((run / "config.yaml").read_text())["cluster"]["k"] == 500
    # 2. the corrected retry runs without --force (and records the corrected config)
    assert cli_main(["cluster", str(cfg)]) == 0
    capsys.readouterr()
    assert (run / "cluster" / "_SUCCESS.json").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["cluster"]["k"] == 5
    # 3. now the run has output: a changed config is refused, naming the key and the output
    assert cli_main(["cluster", str(cfg), "cluster.k=6"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "different config (cluster.k: 5 -> 6)" in line and str(run / "cluster") in line
    assert yaml.safe_load((run / "config.yaml").read_text())["cluster"]["k"] == 5
    assert cli_main(["cluster", str(cfg), "cluster.k=6", "--force"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["cluster"]["k"] == 6


def test_leftovers_of_a_failed_attempt_are_not_stage_output(tmp_path):
    """A killed writer's temporary and the embed stage's _FAILED.json (every shard failed) are
    no progress; a _done record is."""
    from megaclass.core.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    (rd.embed / "img_emb").mkdir(parents=True)
    (rd.embed / "img_emb" / ".tmp-x.npy.abc").write_bytes(b"partial")
    (rd.embed / "_FAILED.json").write_text("{}")
    (rd.train / "ckpt").mkdir(parents=True)
    (rd.root / "report.json").write_text("{}")  # the report is rebuilt, not progress
    assert rd.has_stage_output() is None
    RunDir.write_done(rd.embed, "part-00000", {"rows": 1})
    assert rd.has_stage_output() == rd.embed / "_done" / "part-00000.json"
