"""Checkpoint verification on restore, and the all-or-nothing universal conversion.

One tiny real run (1 rank, DeepSpeed ZeRO-1 on CPU, checkpoints at steps 2 and 4) provides
real checkpoint folders; each test damages a copy of them the way a crash or a bad disk
would (a flipped byte, a truncated file, a missing file, a torn marker) and checks that resume
takes the previous checkpoint with a warning naming the file. The corrupt case resumes the real
training run; the others call ``plan_resume`` as the trainer does. A 2-rank gloo test checks
that the ranks split the hashing and still agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megaclass.training import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TRAIN_TESTS = REPO / "tests" / "test_train.py"
PFC_TESTS = REPO / "tests" / "test_partial_fc.py"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"
HEAD = "head/rank-00000-of-00001.pt"


def _train_helpers() -> dict:
    """tests/test_train.py's shard writer, run-directory builder and launcher env."""
    return runpy.run_path(str(TRAIN_TESTS), run_name="test_train_helpers")


def _train(cfg: Path, *overrides: str) -> subprocess.CompletedProcess:
    """One rank, the way a user starts it: ``python -m megaclass.pipelines.train CFG``."""
    env = _train_helpers()["_env"]()
    return subprocess.run(
        [sys.executable, "-m", "megaclass.pipelines.train", str(cfg), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 1-rank ZeRO-1 run with complete checkpoints at steps 2 and 4, and a pristine
    copy of its checkpoint folder (tests damage copies, never this one)."""
    h = _train_helpers()
    root = tmp_path_factory.mktemp("verify")
    shards = h["write_shards"](root / "shards")
    run = h["_make_run"](root, shards, "run", steps=4, ckpt_every=2, keep_last=3, zero_stage=1)
    res = _train(run / "cfg.yaml")
    assert res.returncode == 0, res.stderr[-4000:]
    pristine = root / "pristine-ckpt"
    shutil.copytree(run / "train" / "ckpt", pristine)
    return {"run": run, "pristine": pristine}


def _copy_ckpts(tiny_run, tmp_path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_run["pristine"], root)
    return root


def _flip_byte(path: Path) -> None:
    """Silent corruption: same size, one byte in the middle changed."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# --------------------------------------------------------------------------------------
# what a save records
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_marker_records_size_and_sha256_of_every_file(tiny_run, caplog):
    for step in (2, 4):
        folder = tiny_run["pristine"] / ckpt.step_tag(step)
        record = ckpt.read_marker(folder)[ckpt.FILES_KEY]
        on_disk = sorted(
            p.relative_to(folder).as_posix()
            for p in folder.rglob("*")
            if p.is_file() and p.name != ckpt.MARKER
        )
        assert sorted(record) == on_disk and {OPTIM, MODEL, HEAD} <= set(record)
        for rel, want in record.items():
            data = (folder / rel).read_bytes()
            assert want == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert ckpt.verify_share(folder, record) == []
    with caplog.at_level(logging.INFO, logger="megaclass.training.checkpoint"):
        plan = ckpt.plan_resume(tiny_run["pristine"], rank=0, world=1)
    assert plan.step == 4 and _warnings(caplog) == ""


# --------------------------------------------------------------------------------------
# damaged newest checkpoint -> the previous one, with a warning naming the file
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_file_resume_falls_back_to_previous_checkpoint(tiny_run, tmp_path):
    """The real trainer: a flipped byte in the newest checkpoint's optimizer state (torch would
    load it without complaint) -> resume from step 2, retrain to 4, same weights as before."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    shutil.rmtree(run / "train" / "ckpt")
    shutil.copytree(tiny_run["pristine"], run / "train" / "ckpt")
    root = run / "train" / "ckpt"
    _flip_byte(root / "step-0000004" / OPTIM)

    res = _train(tiny_run["run"] / "cfg.yaml", f"run_dir={run}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"step-0000004/{OPTIM}: sha256 differs" in res.stderr, res.stderr[-4000:]
    assert "falling back to the previous checkpoint" in res.stderr
    success = json.loads((run / "train" / "_SUCCESS.json").read_text())
    assert success["resumed_from"].endswith("step-0000002") and success["steps"] == 4
    # the damaged folder is kept aside (not pruned over the good ones), a new step 4 written
    assert (root / "step-0000004.rejected" / OPTIM).is_file()
    new = root / "step-0000004"
    assert ckpt.verify_share(new, ckpt.read_marker(new)[ckpt.FILES_KEY]) == []
    a = torch.load(tiny_run["pristine"] / "step-0000004" / MODEL, weights_only=False)["module"]
    b = torch.load(new / MODEL, weights_only=False)["module"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=1e-7), k


@pytest.mark.slow
def test_truncated_file_falls_back(tiny_run, tmp_path, caplog):
    root = _copy_ckpts(tiny_run, tmp_path)
    head = root / "step-0000004" / HEAD
    head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="megaclass.training.checkpoint"):
        # readers (eval, export, reshard) skip it without touching it ...
        assert ckpt.latest_complete(root) == root / "step-0000002"
        assert (root / "step-0000004").is_dir()
        # ... resume skips it and moves it aside
        plan = ckpt.plan_resume(root, rank=0, world=1)
    assert plan.step == 2 and plan.head_file == root / "step-0000002" / HEAD
    w = _warnings(caplog)
    assert f"step-0000004/{HEAD}: " in w and "truncated" in w
    assert "moved aside to step-0000004.rejected" in w
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]


@pytest.mark.slow
def test_missing_file_falls_back(tiny_run, tmp_path, caplog):
    root = _copy_ckpts(tiny_run, tmp_path)
    (root / "step-0000004" / MODEL).unlink()
    with caplog.at_level(logging.WARNING, logger="megaclass.training.checkpoint"):
        plan = ckpt.plan_resume(root, rank=0, world=1)
    assert plan.step == 2
    assert f"step-0000004/{MODEL}: missing" in _warnings(caplog)


@pytest.mark.slow
def test_torn_marker_falls_back_naming_the_marker(tiny_run, tmp_path, caplog):
    root = _copy_ckpts(tiny_run, tmp_path)
    (root / "step-0000004" / ckpt.MARKER).write_text('{"step": 4, "world_')
    with caplog.at_level(logging.WARNING, logger="megaclass.training.checkpoint"):
        plan = ckpt.plan_resume(root, rank=0, world=1)
    assert plan.step == 2
    assert f"step-0000004/{ckpt.MARKER}: unreadable checkpoint marker" in _warnings(caplog)


@pytest.mark.slow
def test_every_checkpoint_damaged_refuses_instead_of_restarting(tiny_run, tmp_path):
    root = _copy_ckpts(tiny_run, tmp_path)
    for step in (2, 4):
        _flip_byte(root / ckpt.step_tag(step) / MODEL)
    with pytest.raises(ckpt.CheckpointError, match="every complete checkpoint under .* fails"):
        ckpt.plan_resume(root, rank=0, world=1)
    # nothing moved: the next start refuses again instead of silently starting from scratch
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4]


@pytest.mark.slow
def test_old_marker_without_record_loads_with_a_note(tiny_run, tmp_path, caplog):
    """Checkpoints saved before records were kept still resume (nothing to check them by)."""
    root = _copy_ckpts(tiny_run, tmp_path)
    marker_path = root / "step-0000004" / ckpt.MARKER
    marker = json.loads(marker_path.read_text())
    del marker[ckpt.FILES_KEY]
    marker_path.write_text(json.dumps(marker))
    with caplog.at_level(logging.INFO, logger="megaclass.training.checkpoint"):
        plan = ckpt.plan_resume(root, rank=0, world=1)
    assert plan.step == 4 and plan.same_world
    notes = [r for r in caplog.records if "no file record" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "loaded without verification" in notes[0].getMessage() and _warnings(caplog) == ""


# --------------------------------------------------------------------------------------
# resharding: universal conversion is all or nothing
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reshard_redoes_a_partial_universal_conversion(tiny_run, tmp_path):
    root = _copy_ckpts(tiny_run, tmp_path)
    folder = root / "step-0000004"
    target = root / "step-0000004_universal"
    # what a conversion killed halfway leaves: the folder, part of zero/, no marker
    (target / "zero" / "half_written_param").mkdir(parents=True)
    (target / "zero" / "half_written_param" / "fp32.pt").write_bytes(b"cut")
    stale = root / ".tmp-step-0000004_universal.killed"  # an older killed attempt
    stale.mkdir()
    ckpt.reshard(folder, 2)
    assert (target / ckpt.MARKER).is_file()
    marker = json.loads((target / ckpt.MARKER).read_text())
    assert marker["source"] == "step-0000004"
    assert not (target / "zero" / "half_written_param").exists()  # redone from scratch
    params = [p.name for p in (target / "zero").iterdir() if p.is_dir()]
    assert params and all((target / "zero" / p / "fp32.pt").is_file() for p in params)
    assert {p for p in marker[ckpt.FILES_KEY] if p.startswith("zero/")} >= {
        f"zero/{p}/fp32.pt" for p in params
    }
    assert not list(root.glob(".tmp-*"))  # neither the stale nor this run's temporary left
    (tmp_path / "plain").mkdir()  # the folder has a plain mkdir's mode (not mkdtemp's 0700)
    assert target.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (root / "latest_universal").read_text() == target.name
    rec = json.loads((folder / "reshard-ws2.json").read_text())
    assert rec["universal"] is True and rec["ds_tag"] == target.name
    plan = ckpt.plan_resume(root, rank=1, world=2)
    assert plan.universal and plan.ds_tag == target.name and plan.head_file.is_file()
    # a complete conversion (marker present) is kept as it is
    (target / "sentinel").write_text("kept")
    ckpt.reshard(folder, 2)
    assert (target / "sentinel").read_text() == "kept"


@pytest.mark.slow
def test_failed_conversion_leaves_no_target(tiny_run, tmp_path):
    """ds_to_universal failing (here: a Python without DeepSpeed) raises and leaves neither a
    target folder nor a temporary one, so the next reshard starts clean."""
    root = _copy_ckpts(tiny_run, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="ds_to_universal failed"):
        ckpt.reshard(root / "step-0000004", 2, python=shutil.which("false") or "/bin/false")
    assert not (root / "step-0000004_universal").exists()
    assert not list(root.glob(".tmp-*"))
    assert not (root / "step-0000004" / "reshard-ws2.json").exists()


# --------------------------------------------------------------------------------------
# several ranks: each hashes its share, all agree
# --------------------------------------------------------------------------------------


def _fake_ckpt(root: Path, step: int, world: int, sizes: dict[str, int]) -> Path:
    """A checkpoint folder of random files with a marker recording them, as a save writes."""
    folder = root / ckpt.step_tag(step)
    gen = torch.Generator().manual_seed(step)
    for rel, n in sizes.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(
            torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).numpy().tobytes()
        )
    record = ckpt.record_files(folder, ckpt.checkpoint_files(folder))
    (folder / ckpt.MARKER).write_text(
        json.dumps({"step": step, "world_size": world, ckpt.FILES_KEY: record})
    )
    return folder


SIZES = {MODEL: 40_000, "zero_pp_rank_0_x.pt": 30_000, "zero_pp_rank_1_x.pt": 20_000,
         "head/rank-00000-of-00002.pt": 5_000, "head/rank-00001-of-00002.pt": 5_000}  # fmt: skip


def test_verify_shares_cover_every_file_once(tmp_path):
    folder = _fake_ckpt(tmp_path, 1, 2, SIZES)
    record = ckpt.read_marker(folder)[ckpt.FILES_KEY]
    for rel in SIZES:
        _flip_byte(folder / rel)
    for world in (1, 2, 3, 7):
        found = [ckpt.verify_share(folder, record, r, world) for r in range(world)]
        flat = [p for part in found for p in part]
        assert len(flat) == len(set(flat)) == len(SIZES), (world, found)
    # balanced by bytes, largest first to the least-loaded rank: on 2 ranks 40k + 5k + 5k on
    # rank 0 and 30k + 20k on rank 1 (50 kB each)
    assert [len(ckpt.verify_share(folder, record, r, 2)) for r in range(2)] == [3, 2]


def _collective_checks(rank: int, world: int) -> dict:
    root = Path(os.environ["MEGACLASS_VERIFY_ROOT"])
    plan = ckpt.plan_resume(root, rank, world)
    torch.distributed.barrier()
    return {"fails": [], "step": plan.step, "head": plan.head_file.name}


if __name__ == "__gloo_worker__":
    runpy.run_path(str(PFC_TESTS), run_name="test_partial_fc_helpers")["_worker"](
        **GLOO,  # noqa: F821 (set by spawn_gloo)
        checks=_collective_checks,
    )


def test_two_ranks_split_the_check_and_fall_back_together(tmp_path, monkeypatch):
    """The damaged file is in rank 1's share only (largest file -> rank 0, next -> rank 1):
    rank 0 falls back too, so the verdicts were gathered."""
    root = tmp_path / "ckpt"
    _fake_ckpt(root, 2, 2, SIZES)
    bad = _fake_ckpt(root, 4, 2, SIZES)
    _flip_byte(bad / "zero_pp_rank_0_x.pt")
    record = ckpt.read_marker(bad)[ckpt.FILES_KEY]
    assert ckpt.verify_share(bad, record, 0, 2) == []  # rank 0 alone would not see it
    monkeypatch.setenv("MEGACLASS_VERIFY_ROOT", str(root))
    spawn_gloo = runpy.run_path(str(PFC_TESTS), run_name="test_partial_fc_helpers")["spawn_gloo"]
    out = spawn_gloo(2, script=__file__)
    assert [o["fails"] for o in out] == [[], []], out
    assert [o["step"] for o in out] == [2, 2]
    assert [o["head"] for o in out] == ["rank-00000-of-00002.pt", "rank-00001-of-00002.pt"]
    assert (root / "step-0000004.rejected").is_dir()  # moved aside once, by rank 0
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
