"""Training checkpoints: DeepSpeed state + per-rank head shards, a completion marker, resharding.

Layout (one folder per checkpoint, docs/architecture.md)::

    RUN/train/ckpt/step-0000100/
        mp_rank_00_model_states.pt, zero_pp_rank_*   DeepSpeed (backbone, its optimizer, schedule)
        head/rank-00000-of-00002.pt                  per rank: head shard, head optimizer and
                                                     schedule, RNG states, loader state, counters
        COMPLETE.json                                written LAST by rank 0 after a barrier
        reshard-ws1.json                             written by `megaclass train reshard` (last)
        head-ws1/rank-00000-of-00001.pt              head re-split for 1 rank
    RUN/train/ckpt/step-0000100_universal/           DeepSpeed universal checkpoint (ZeRO>0 only)

Only folders with ``COMPLETE.json`` count; a run killed mid-save leaves an incomplete folder
that resume ignores and the next save removes.

Why the head is separate: it is model-parallel (each rank owns a slice of the class centres),
so DeepSpeed must neither broadcast nor average it, and its state is different on every rank.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megaclass.core.atomic import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
_STEP_RE = re.compile(r"^step-(\d{7})$")


class CheckpointError(RuntimeError):
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


def latest_complete(root: str | Path) -> Path | None:
    ck = list_checkpoints(root)
    return ck[-1][1] if ck else None


def read_marker(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MARKER).read_text())


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
) -> Path:
    """Save on every rank (collective). The marker is written by rank 0 after everyone is done."""
    import torch.distributed as dist

    root = Path(root)
    tag = step_tag(step)
    folder = root / tag
    if rank == 0 and folder.exists():  # a torn save of the same step from a killed run
        shutil.rmtree(folder)
    dist.barrier()
    client = dict(UNIVERSAL_INFO)
    client["megaclass_step"] = step
    engine.save_checkpoint(str(root), tag=tag, client_state=client)
    with atomic_path(folder / "head" / shard_name(rank, world)) as tmp:
        torch.save(state.to_dict(), tmp)
    dist.barrier()
    if rank == 0:
        write_json_atomic(
            folder / MARKER,
            {"step": step, "world_size": world, "time": time.time(), **marker_info},
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


@dataclass
class ResumePlan:
    """Which files this rank restores from, decided before the DeepSpeed engine is built."""

    folder: Path
    step: int
    ds_tag: str
    head_file: Path
    universal: bool
    same_world: bool


def plan_resume(root: str | Path, rank: int, world: int) -> ResumePlan | None:
    """The newest complete checkpoint and how this world size loads it (None: start fresh)."""
    folder = latest_complete(root)
    if folder is None:
        return None
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
        if run_universal and not (target / "zero").exists():
            if target.exists():
                shutil.rmtree(target)
            cmd = [
                python or sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(ckpt),
                "--output_folder",
                str(target),
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
