"""Training checkpoints: DeepSpeed state + per-rank head shards, a completion marker, resharding.

Layout (one folder per checkpoint, docs/architecture.md)::

    RUN/train/ckpt/step-0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*   DeepSpeed (backbone, its optimizer, schedule)
        head/rank-00000-of-00002.pt                  per rank: head shard, head optimizer and
                                                     schedule, RNG states, counters
        loader.json                                  the loader position, world-size free
                                                     (all ranks' parts merged; written once)
        COMPLETE.json                                written LAST by rank 0 after a barrier;
                                                     records size + sha256 of every file above
        reshard-ws1.json                             written by the re-shard (last): by
                                                     `megaclass train reshard`, or by rank 0
                                                     when a run resumes at another world size
        head-ws1/rank-00000-of-00001.pt              head re-split for 1 rank
    RUN/train/ckpt/step-0000100_universal/           DeepSpeed universal checkpoint (ZeRO>0 only),
        COMPLETE.json                                its own marker (converted in a temporary folder,
                                                     marker last, then renamed into place)

Only folders with ``COMPLETE.json`` count; a run killed mid-save leaves an incomplete folder
that resume ignores and the next save removes.

Why a file record in the marker: the marker proves the save finished, not that the bytes are
still there. Every file is fsynced by the rank that wrote it before the marker, and the marker
lists each file's size and sha256; resume checks them and falls back to the previous checkpoint
(with a warning naming the file) when one is missing, truncated or corrupt. Markers written
before records were kept load unverified, with a note.

Why the head is separate: it is model-parallel (each rank owns a slice of the class centres),
so DeepSpeed must neither broadcast nor average it, and its state is different on every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megaclass.core.atomic import (
    atomic_path,
    fsync_dir,
    fsync_file,
    fsync_tree,
    write_json_atomic,
    write_text_atomic,
)
from megaclass.core.errors import UserError

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
_STEP_RE = re.compile(r"^step-(\d{7})$")
LOADER_FILE = "loader.json"
"""The loader position of a checkpoint, world-size free (data/loader.py), saved once."""
FILES_KEY = "files"
"""Marker key: {relative path: {"size": bytes, "sha256": hex}} of every file of the save."""
_HEAD_SHARD_RE = re.compile(r"(?:^|/)rank-(\d{5})-of-\d{5}\.pt$")
_DS_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used as asked; the message says which folder and what to do."""


def step_tag(step: int) -> str:
    return f"step-{step:07d}"


def shard_name(rank: int, world: int) -> str:
    return f"rank-{rank:05d}-of-{world:05d}.pt"


def list_checkpoints(root: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) sorted by step; only complete ones unless ``complete_only`` is False."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / MARKER).is_file()):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_complete(root: str | Path, verify: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match its marker's record (None: none).

    A checkpoint that fails the check is skipped with a warning naming the file, so eval,
    export and ``train reshard`` never read a torn or corrupt one. ``verify=False``: the
    newest with a marker, unchecked (reads no data).
    """
    ck = list_checkpoints(root)
    if not verify:
        return ck[-1][1] if ck else None
    for _step, folder in reversed(ck):
        if not _problems_or_note(folder, _verify_all(folder)):
            return folder
    return None


def read_marker(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint marker ({e})") from e
    if not isinstance(marker, dict) or "step" not in marker or "world_size" not in marker:
        raise CheckpointError(f"{path}: not a checkpoint marker (no step / world_size)")
    return marker


# --------------------------------------------------------------------------------------
# File records: written at save, checked at restore
# --------------------------------------------------------------------------------------


def file_digest(path: Path, chunk: int = 8 << 20) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of ``path``, read in ``chunk``-byte blocks.

    Why sha256: stdlib, and at the ~0.7-2 GB/s measured here (benchmarks/atomic_fsync.py) a
    rank's share of a checkpoint (its ZeRO optimizer shard and head shard, a few hundred MB to
    a few GB) costs about a second per save; a CRC would be faster but catches less.
    """
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Relative paths of the files a save wrote (not the marker, not stray temporaries)."""
    out = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(folder).as_posix()
            if rel != MARKER and not name.startswith(".tmp-"):
                out.append(rel)
    return sorted(out)


def file_owner(rel: str, world: int) -> int:
    """The rank that wrote ``rel`` in a save: it fsyncs and hashes that file.

    Head shards and DeepSpeed's ``*zero_pp_rank_<r>_*`` files belong to their rank (DeepSpeed's
    data-parallel rank is the global rank: the engine has no model parallelism here); shared
    files (``mp_rank_00_model_states.pt``, ``zero_to_fp32.py``) are written by rank 0. Why the
    writer: on a shared filesystem only the node that wrote a file can flush its cache.
    """
    m = _HEAD_SHARD_RE.search(rel) or _DS_RANK_RE.search(Path(rel).name)
    return int(m.group(1)) % world if m else 0


def record_files(folder: Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    """fsync each file and return its {"size", "sha256"} record."""
    rec = {}
    for rel in rels:
        fsync_file(folder / rel)
        size, digest = file_digest(folder / rel)
        rec[rel] = {"size": size, "sha256": digest}
    return rec


def check_file(folder: Path, rel: str, want: dict[str, Any]) -> str | None:
    """None if ``folder/rel`` matches its record, else what is wrong with it (names the file)."""
    path = folder / rel
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != int(want["size"]):
        return f"{path}: {size} bytes, the marker recorded {want['size']} (truncated or rewritten)"
    if file_digest(path)[1] != want["sha256"]:
        return f"{path}: sha256 differs from the marker's record (corrupt)"
    return None


def verify_share(
    folder: Path, record: dict[str, dict[str, Any]], rank: int = 0, world: int = 1
) -> list[str]:
    """Problems in this rank's share of ``record`` (all of it for ``world=1``).

    Shares are balanced by bytes (largest file to the least-loaded rank) so a restore on many
    ranks reads each byte once, in parallel, instead of every rank hashing everything.
    """
    load = [0] * world
    mine = []
    for rel, want in sorted(record.items(), key=lambda kv: (-int(kv[1]["size"]), kv[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += int(want["size"])
        if r == rank:
            mine.append(rel)
    return [p for rel in mine if (p := check_file(folder, rel, record[rel])) is not None]


def _verify_all(folder: Path) -> list[str] | None:
    """This process checks every recorded file (None: the marker has no record)."""
    try:
        marker = read_marker(folder)
    except CheckpointError as e:
        return [str(e)]
    record = marker.get(FILES_KEY)
    return None if record is None else verify_share(folder, record)


def _verify_collective(folder: Path, rank: int, world: int) -> list[str] | None:
    """Like :func:`_verify_all`, split over the ranks when a process group of ``world`` is up;
    every rank gets the same answer (so all of them fall back together)."""
    import torch.distributed as dist

    if not (world > 1 and dist.is_available() and dist.is_initialized()):
        return _verify_all(folder)
    if dist.get_world_size() != world:
        return _verify_all(folder)
    try:
        marker = read_marker(folder)
    except CheckpointError as e:
        return [str(e)]  # the same file on every rank: the same verdict everywhere
    record = marker.get(FILES_KEY)
    if record is None:
        return None
    mine = verify_share(folder, record, rank, world)
    found: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(found, mine)
    return sorted(p for part in found for p in part)


def _problems_or_note(folder: Path, problems: list[str] | None, loud: bool = True) -> bool:
    """Log the outcome of a verification; True if ``folder`` must be skipped."""
    if problems is None:
        if loud:
            log.info(
                "%s: its marker has no file record (written before records were kept); "
                "loaded without verification",
                folder,
            )
        return False
    if problems and loud:
        log.warning(
            "%s fails verification, falling back to the previous checkpoint: %s",
            folder,
            "; ".join(problems),
        )
    return bool(problems)


# --------------------------------------------------------------------------------------
# RNG state (per rank)
# --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(_tuplify(st["python"]))
    n = st["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def generator_states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """States of torch.Generator attributes of ``module`` and its children (e.g. a head's sampler)."""
    out = {}
    for name, mod in module.named_modules():
        for attr, val in vars(mod).items():
            if isinstance(val, torch.Generator):
                out[f"{name}.{attr}" if name else attr] = val.get_state()
    return out


def set_generator_states(module: torch.nn.Module, states: dict[str, torch.Tensor]) -> None:
    mods = dict(module.named_modules())
    for key, st in states.items():
        name, _, attr = key.rpartition(".")
        gen = getattr(mods[name], attr, None)
        if isinstance(gen, torch.Generator):
            gen.set_state(st)


# --------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------


@dataclass
class HeadState:
    """What each rank saves next to DeepSpeed's files."""

    head: dict[str, Any] | None
    head_opt: dict[str, Any] | None
    head_sched: dict[str, Any] | None
    head_rng: dict[str, torch.Tensor]
    rng: dict[str, Any]
    loader: Any
    trainer: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def save_checkpoint(
    root: str | Path,
    step: int,
    engine: Any,
    state: HeadState,
    rank: int,
    world: int,
    marker_info: dict[str, Any],
    keep_last: int,
    loader_state: dict[str, Any] | None = None,
) -> Path:
    """Save on every rank (collective). The marker is written by rank 0 after everyone is done.

    ``loader_state``: the merged, world-size-free loader state; rank 0 writes it once as
    ``loader.json`` (recorded in the marker like every other file)."""
    import torch.distributed as dist

    root = Path(root)
    tag = step_tag(step)
    folder = root / tag
    if rank == 0 and folder.exists():  # a torn save of the same step from a killed run
        shutil.rmtree(folder)
        # and the universal conversion of that earlier save: it no longer matches
        shutil.rmtree(root / f"{tag}_universal", ignore_errors=True)
    dist.barrier()
    client = dict(UNIVERSAL_INFO)
    client["megaclass_step"] = step
    engine.save_checkpoint(str(root), tag=tag, client_state=client)
    with atomic_path(folder / "head" / shard_name(rank, world)) as tmp:
        torch.save(state.to_dict(), tmp)
    if rank == 0 and loader_state is not None:
        write_json_atomic(folder / LOADER_FILE, loader_state)
    dist.barrier()
    # DeepSpeed's files are not fsynced by DeepSpeed: each rank flushes and hashes what it
    # wrote, rank 0 gathers the records and makes the folder entries durable, marker last.
    files = checkpoint_files(folder)
    mine = record_files(folder, [f for f in files if file_owner(f, world) == rank])
    parts: list[dict[str, Any]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    if rank == 0:
        record = {k: v for part in parts for k, v in part.items()}
        for dirpath, _dirs, _files in os.walk(folder, topdown=False):
            fsync_dir(dirpath)
        fsync_dir(root)
        write_json_atomic(
            folder / MARKER,
            {
                "step": step,
                "world_size": world,
                "time": time.time(),
                **marker_info,
                FILES_KEY: record,
            },
        )
        prune(root, keep_last)
    dist.barrier()
    return folder


def prune(root: Path, keep_last: int) -> list[Path]:
    """Keep the newest ``keep_last`` complete checkpoints; drop older and incomplete ones."""
    complete = list_checkpoints(root)
    newest = complete[-1][0] if complete else -1
    keep = {p for _, p in complete[-max(1, keep_last) :]}
    removed = []
    for step, p in list_checkpoints(root, complete_only=False):
        if p in keep or (step > newest and not (p / MARKER).exists()):
            continue
        shutil.rmtree(p, ignore_errors=True)
        uni = root / f"{p.name}_universal"
        if uni.exists():
            shutil.rmtree(uni, ignore_errors=True)
        removed.append(p)
    return removed


def set_aside(folder: Path) -> Path:
    """Rename a checkpoint that failed verification to ``<name>.rejected`` (kept for inspection).

    Why not leave it: it still has a marker and the highest step, so pruning would keep it
    and delete the good checkpoints the resumed run writes (with ``keep_last=1``, all of them).
    Its universal conversion, derived from it, is removed.
    """
    dest = folder.with_name(f"{folder.name}.rejected")
    n = 1
    while dest.exists():
        dest = folder.with_name(f"{folder.name}.rejected-{n}")
        n += 1
    os.replace(folder, dest)
    uni = folder.parent / f"{folder.name}_universal"
    if uni.exists():
        shutil.rmtree(uni, ignore_errors=True)
    fsync_dir(folder.parent)
    return dest


@dataclass
class ResumePlan:
    """Which files this rank restores from, decided before the DeepSpeed engine is built."""

    folder: Path
    step: int
    ds_tag: str
    head_file: Path
    universal: bool
    same_world: bool


def plan_resume(
    root: str | Path, rank: int, world: int, auto_reshard: bool = False
) -> ResumePlan | None:
    """The newest complete and intact checkpoint and how this world size loads it.

    None: no checkpoint, start fresh. Each candidate's files are checked against its marker's
    record (split over the ranks when the process group is up); one that fails is skipped with
    a warning naming the file. If every checkpoint fails, refuse rather than silently restart.

    A checkpoint of another world size needs its head re-split (and ZeRO state converted to a
    universal checkpoint). ``auto_reshard``: rank 0 does it here (:func:`reshard`, logged) while
    the other ranks wait — the caller holds the run directory's lock (pipelines/train.py), so
    no other process touches the folder; without it, the error asks for
    ``megaclass train reshard``.
    """
    complete = list_checkpoints(root)
    if not complete:
        return None
    folder, rejected = None, []
    for _step, cand in reversed(complete):
        if not _problems_or_note(cand, _verify_collective(cand, rank, world), loud=rank == 0):
            folder = cand
            break
        rejected.append(cand)
    if folder is None:
        raise CheckpointError(
            f"every complete checkpoint under {root} fails verification (see the warnings "
            "above); restore the damaged files, or move the folders away to start from scratch"
        )
    if rank == 0:
        for bad in rejected:
            moved = set_aside(bad)
            log.warning("%s moved aside to %s (inspect, then delete it)", bad, moved.name)
    marker = read_marker(folder)
    old_world = int(marker["world_size"])
    if old_world == world:
        return ResumePlan(
            folder,
            int(marker["step"]),
            folder.name,
            folder / "head" / shard_name(rank, world),
            False,
            True,
        )
    rec = folder / f"reshard-ws{world}.json"
    if not rec.is_file() and auto_reshard:
        _reshard_collectively(folder, rank, world, old_world)
    if not rec.is_file():
        raise CheckpointError(
            f"{folder} was written by {old_world} ranks but this run has {world}. Re-shard it "
            f"first: `megaclass train reshard {Path(root).parent.parent} --world-size {world}` "
            "(docs/training.md, 'Changing the number of ranks')."
        )
    info = json.loads(rec.read_text())
    return ResumePlan(
        folder,
        int(marker["step"]),
        info["ds_tag"],
        folder / info["head_dir"] / shard_name(rank, world),
        bool(info["universal"]),
        False,
    )


def _reshard_collectively(folder: Path, rank: int, world: int, old_world: int) -> None:
    """Rank 0 re-shards ``folder`` for ``world`` ranks; every rank learns the outcome (a failure
    raises the same error everywhere instead of leaving the others at a barrier)."""
    import torch.distributed as dist

    err = None
    if rank == 0:
        log.warning(
            "%s was written by %d ranks, this run has %d: re-sharding it now (head re-split, "
            "universal conversion of ZeRO state)",
            folder,
            old_world,
            world,
        )
        t0 = time.time()
        try:
            reshard(folder, world)
            log.warning("%s re-sharded for %d ranks in %.1f s", folder, world, time.time() - t0)
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised
            err = f"{type(e).__name__}: {e}"
    if world > 1 and dist.is_available() and dist.is_initialized():
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise CheckpointError(
            f"re-sharding {folder} for {world} ranks failed: {err}. Try "
            f"`megaclass train reshard {folder.parent.parent.parent} --world-size {world}`"
        )


def load_loader_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's world-size-free loader state (None: a checkpoint from before it was
    saved once; its head files then hold per-rank states)."""
    path = Path(folder) / LOADER_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable loader state ({e})") from e


def load_head_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing head shard {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------
# Resharding to a different number of ranks
# --------------------------------------------------------------------------------------


def class_partition(num_classes: int, world: int) -> list[tuple[int, int]]:
    """(start, count) of each rank's contiguous slice of the classes (Partial FC's rule)."""
    base, rem = divmod(num_classes, world)
    return [(r * base + min(r, rem), base + (1 if r < rem else 0)) for r in range(world)]


def _reshard_tensor(parts: list[torch.Tensor], old: list[tuple[int, int]], new, key: str):
    """Row-sharded along the class partition when the shapes fit it; else replicated (equal)."""
    rows = [p.shape[0] if p.ndim else -1 for p in parts]
    mults = {r // c for r, (_, c) in zip(rows, old) if c > 0 and r > 0 and r % c == 0}
    fits = len(mults) == 1 and all(r == c * next(iter(mults)) for r, (_, c) in zip(rows, old))
    if fits:
        m = next(iter(mults))
        full = torch.cat(parts, 0)
        return [full[s * m : (s + c) * m].clone() for s, c in new]
    if all(p.shape == parts[0].shape and torch.equal(p, parts[0]) for p in parts[1:]):
        return [parts[0].clone() for _ in new]  # replicated (scalars, EMA statistics, step counts)
    raise CheckpointError(
        f"head tensor {key!r}: per-rank rows {rows} fit neither the class partition "
        f"{[c for _, c in old]} nor a replicated value; cannot re-shard"
    )


def _reshard_tree(trees: list[Any], old, new, key: str = "") -> list[Any]:
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return _reshard_tensor(trees, old, new, key)
    if isinstance(first, dict):
        outs: list[dict] = [{} for _ in new]
        for k in first:
            vals = _reshard_tree([t[k] for t in trees], old, new, f"{key}.{k}")
            for o, v in zip(outs, vals):
                o[k] = v
        return outs
    if isinstance(first, list) and first and isinstance(first[0], (dict, torch.Tensor)):
        cols = [
            _reshard_tree([t[i] for t in trees], old, new, f"{key}[{i}]") for i in range(len(first))
        ]
        return [[c[j] for c in cols] for j in range(len(new))]
    return [first for _ in new]


def reshard(
    ckpt: str | Path, new_world: int, python: str | None = None, run_universal: bool = True
) -> Path:
    """Re-split the head shards of ``ckpt`` for ``new_world`` ranks and, when the DeepSpeed state
    is ZeRO-partitioned, convert it to a universal checkpoint. Writes ``reshard-ws<N>.json`` last.
    """
    ckpt = Path(ckpt)
    if not (ckpt / MARKER).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {MARKER})")
    marker = read_marker(ckpt)
    old_world, num_classes = int(marker["world_size"]), int(marker.get("num_classes", 0))
    files = [load_head_file(ckpt / "head" / shard_name(r, old_world)) for r in range(old_world)]
    old, new = class_partition(num_classes, old_world), class_partition(num_classes, new_world)
    heads = (
        _reshard_tree([f["head"] for f in files], old, new, "head")
        if files[0]["head"] is not None
        else [None] * new_world
    )
    opts = (
        _reshard_tree([f["head_opt"] for f in files], old, new, "head_opt")
        if files[0]["head_opt"] is not None
        else [None] * new_world
    )
    out_dir = ckpt / f"head-ws{new_world}"
    for r in range(new_world):
        src = files[r % old_world]
        st = dict(src)
        st.update(head=heads[r], head_opt=opts[r])
        # fresh sampler streams for ranks that did not exist; the loader restarts its epoch
        st["head_rng"] = {} if r >= old_world else src["head_rng"]
        st["resharded_from"] = old_world
        with atomic_path(out_dir / shard_name(r, new_world)) as tmp:
            torch.save(st, tmp)
    universal = any(ckpt.glob("zero_pp_rank_*optim_states.pt")) or any(
        ckpt.glob("bf16_zero_pp_rank_*optim_states.pt")
    )
    ds_tag = ckpt.name
    if universal:
        ds_tag = f"{ckpt.name}_universal"
        target = ckpt.parent / ds_tag
        if run_universal and not (target / MARKER).is_file():
            convert_universal(ckpt, target, python)
    write_json_atomic(
        ckpt / f"reshard-ws{new_world}.json",
        {
            "from_world_size": old_world,
            "world_size": new_world,
            "head_dir": out_dir.name,
            "ds_tag": ds_tag,
            "universal": universal,
        },
    )
    return ckpt


def convert_universal(ckpt: Path, target: Path, python: str | None = None) -> Path:
    """DeepSpeed's ``ds_to_universal`` of ``ckpt`` into ``target``, all or nothing.

    Why a temporary folder: a conversion killed halfway used to leave ``target`` with part of
    its files, which the next ``reshard`` took for a finished one. Now the conversion writes
    ``.tmp-<name>.*`` next to it, fsyncs it, writes ``COMPLETE.json`` last and renames the
    folder into place; a ``target`` without the marker (killed, or from an older version) and
    stale temporaries are removed and converted again.
    """
    parent, name = target.parent, target.name
    if target.exists():
        log.warning("%s: no %s (an interrupted conversion), converting again", target, MARKER)
        shutil.rmtree(target)
    for stale in parent.glob(f".tmp-{name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    # not mkdtemp: its 0700 mode would stay on the renamed folder (unreadable to the group)
    tmp = parent / f".tmp-{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cmd = [
            python or sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(ckpt),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        log.info("converting to a universal checkpoint: %s", " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise CheckpointError(
                f"ds_to_universal failed on {ckpt} (exit {res.returncode}):\n{res.stderr[-3000:]}"
            )
        fsync_tree(tmp)
        record = {rel: {"size": (tmp / rel).stat().st_size} for rel in checkpoint_files(tmp)}
        write_json_atomic(
            tmp / MARKER, {"source": ckpt.name, "time": time.time(), FILES_KEY: record}
        )
        os.replace(tmp, target)
        fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    # ds_to_universal points DeepSpeed's `latest_universal` at the folder it wrote (our
    # temporary name); nothing here reads it, but a user's DeepSpeed tooling might.
    write_text_atomic(parent / "latest_universal", name)
    return target
