"""Durable atomic output (core/atomic.py): the data is fsynced before the rename, the folder
after it, new folders' parents too; every writer kind that goes through atomic_path gets it.

A crash cannot be staged in a test, so the order of the real system calls is recorded instead:
``os.fsync`` and ``os.replace`` are wrapped (the real calls still run) and each fsync is
resolved to the path it flushed through /proc/self/fd.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from megaclass.core import atomic
from megaclass.core.atomic import (
    atomic_path,
    fsync_tree,
    makedirs_durable,
    write_json_atomic,
)
from safetensors.torch import load_file, save_file


@pytest.fixture
def syscalls(monkeypatch):
    """Events ("fsync", path) and ("replace", src, dst) in the order the real calls ran."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _write_npy(tmp: Path) -> None:
    np.save(tmp, np.arange(10, dtype=np.float32), allow_pickle=False)


def _write_parquet(tmp: Path) -> None:
    pq.write_table(pa.table({"k": ["a", "b"], "v": [1, 2]}), tmp)


def _write_npz(tmp: Path) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, a=np.ones(3))


def _write_torch(tmp: Path) -> None:
    torch.save({"w": torch.ones(2, 2)}, tmp)


def _write_safetensors(tmp: Path) -> None:
    save_file({"w": torch.ones(2, 2)}, str(tmp))


WRITERS = {
    "x.npy": (_write_npy, lambda p: np.load(p).sum() == 45),
    "x.parquet": (_write_parquet, lambda p: pq.read_table(p).num_rows == 2),
    "x.npz": (_write_npz, lambda p: np.load(p)["a"].sum() == 3),
    "x.pt": (_write_torch, lambda p: torch.load(p, weights_only=True)["w"].sum() == 4),
    "x.safetensors": (_write_safetensors, lambda p: load_file(str(p))["w"].sum() == 4),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_writer_kind_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path, syscalls, name
):
    write, check = WRITERS[name]
    final = tmp_path / "out" / name
    with atomic_path(final, suffix=Path(name).suffix) as tmp:
        write(tmp)
    assert check(final)
    replaces = [i for i, e in enumerate(syscalls) if e[0] == "replace"]
    assert len(replaces) == 1
    r = replaces[0]
    tmp_name = syscalls[r][1]
    assert syscalls[r][2] == str(final) and Path(tmp_name).name.startswith(f".tmp-{name}.")
    # the data of the temporary file reached the disk before it got its final name ...
    assert ("fsync", tmp_name) in syscalls[:r]
    # ... and the rename (the folder entry) after it
    assert ("fsync", str(final.parent)) in syscalls[r + 1 :]
    # the new folder "out" was created durably: its parent was fsynced
    assert ("fsync", str(tmp_path)) in syscalls[:r]
    assert not [p for p in final.parent.iterdir() if p.name.startswith(".tmp-")]


def test_marker_written_last_is_durable_after_the_data(tmp_path, syscalls):
    """The reliability rule, as a stage follows it: data file, then marker; the marker's fsync
    comes after the data's fsync and rename, so a surviving marker implies surviving data."""
    data, marker = tmp_path / "part.npy", tmp_path / "_done" / "part.json"
    with atomic_path(data, suffix=".npy") as tmp:
        np.save(tmp, np.zeros(4), allow_pickle=False)
    write_json_atomic(marker, {"rows": 4})
    flushed = [e[1] for e in syscalls if e[0] == "fsync"]
    renamed = [e[2] for e in syscalls if e[0] == "replace"]
    assert renamed == [str(data), str(marker)]
    first_marker_fsync = next(i for i, p in enumerate(flushed) if ".tmp-part.json." in p)
    assert str(tmp_path) in flushed[:first_marker_fsync]  # data's folder entry before marker
    assert json.loads(marker.read_text()) == {"rows": 4}


def test_durable_false_skips_the_fsyncs(tmp_path, syscalls):
    """The benchmark's baseline: same rename, no fsync."""
    with atomic_path(tmp_path / "a.bin", durable=False) as tmp:
        tmp.write_bytes(b"x")
    assert [e[0] for e in syscalls] == ["replace"] and (tmp_path / "a.bin").read_bytes() == b"x"


def test_failed_block_leaves_neither_final_nor_temporary(tmp_path, syscalls):
    final = tmp_path / "never.npy"
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(final, suffix=".npy") as tmp:
            np.save(tmp, np.ones(3), allow_pickle=False)
            raise RuntimeError("writer died")
    assert list(tmp_path.iterdir()) == []
    assert not [e for e in syscalls if e[0] == "replace"]


def test_outputs_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    """mkstemp creates 0600; outputs in a shared run directory must be readable like any
    file the process creates (0644 under umask 022), or other users' eval/report fail."""
    old = os.umask(0o022)
    try:
        atomic._UMASK = None  # re-read
        with atomic_path(tmp_path / "a.npy", suffix=".npy") as tmp:
            np.save(tmp, np.ones(2), allow_pickle=False)
        write_json_atomic(tmp_path / "m.json", {})
    finally:
        os.umask(old)
        atomic._UMASK = None
    assert (tmp_path / "a.npy").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_makedirs_durable_and_fsync_tree(tmp_path, syscalls):
    makedirs_durable(tmp_path / "a" / "b" / "c")
    flushed = [e[1] for e in syscalls if e[0] == "fsync"]
    # each new folder's entry is made durable in its parent
    assert flushed == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    syscalls.clear()
    (tmp_path / "a" / "b" / "c" / "f.bin").write_bytes(b"1")
    (tmp_path / "a" / "g.bin").write_bytes(b"2")
    fsync_tree(tmp_path / "a")
    flushed = [e[1] for e in syscalls if e[0] == "fsync"]
    for p in ("a/b/c/f.bin", "a/g.bin", "a/b/c", "a/b", "a"):
        assert str(tmp_path / p) in flushed, p
    # files before their folder: a folder entry never points at unflushed data
    assert flushed.index(str(tmp_path / "a/b/c/f.bin")) < flushed.index(str(tmp_path / "a/b/c"))
    assert flushed[-1] == str(tmp_path / "a")


def test_checkpoint_record_fsyncs_each_file_it_hashes(tmp_path, syscalls):
    """save_checkpoint's per-rank step: DeepSpeed's own files (not written through
    atomic_path) are fsynced by record_files before the marker can be written."""
    import hashlib

    from megaclass.training import checkpoint as ckpt

    (tmp_path / "head").mkdir()
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"model" * 1000)
    (tmp_path / "head" / "rank-00000-of-00001.pt").write_bytes(b"head")
    files = ckpt.checkpoint_files(tmp_path)
    assert files == ["head/rank-00000-of-00001.pt", "mp_rank_00_model_states.pt"]
    rec = ckpt.record_files(tmp_path, files)
    flushed = {e[1] for e in syscalls if e[0] == "fsync"}
    assert {str(tmp_path / f) for f in files} <= flushed
    assert rec["head/rank-00000-of-00001.pt"] == {
        "size": 4,
        "sha256": hashlib.sha256(b"head").hexdigest(),
    }
