"""``megaclass demo``: the whole pipeline on built-in demo data, on this machine.

Builds the demo shards (procedurally rendered, captioned images; some classes held out),
then runs ``configs/demo.yaml`` end to end: embed with the offline teachers, cluster,
assign, train a student over two DeepSpeed ranks, evaluate teacher and student on the
held-out classes, and write the report. Re-running it resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import megaclass
from megaclass.core.atomic import write_text_atomic
from megaclass.core.errors import MissingInputError
from megaclass.core.rundir import RunDir
from megaclass.data.builders import build_dataset
from megaclass.pipelines.config import load_config
from megaclass.pipelines.eval import format_table
from megaclass.pipelines.run import run_pipeline

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(megaclass.__file__).resolve().parent / "configs" / "demo.yaml"


def _shard_list(folder: Path, out: Path) -> Path:
    """Write a list file of the shards in ``folder`` (list files are a valid shard spec)."""
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise MissingInputError(f"no .tar shards in {folder}")
    write_text_atomic(out, "".join(f"{p}\n" for p in shards))
    return out


def run_demo(out: str = "runs/demo", overrides: list[str] | None = None) -> int:
    """Build the demo data if needed, then run every stage; returns a process exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    t0 = time.time()
    root = Path(out).resolve()
    # one demo per folder: the lock covers building the data too (run_pipeline re-enters it)
    with RunDir(root).lock(f"megaclass demo --out {root}"):
        return _run_demo_locked(root, overrides, t0)


def _run_demo_locked(root: Path, overrides: list[str] | None, t0: float) -> int:
    data_dir = root / "data"
    times: dict[str, str] = {}
    if not (data_dir / "_BUILT").exists():
        print(f"[demo] building demo shards in {data_dir}")
        build_dataset("demo", str(data_dir), seed=0)
        write_text_atomic(data_dir / "_BUILT", "ok\n")
        times["data"] = f"{time.time() - t0:.0f} s"
    else:
        times["data"] = "reused"
    train_list = _shard_list(data_dir / "train", data_dir / "train.txt")
    eval_list = _shard_list(data_dir / "eval", data_dir / "eval.txt")
    cfg = load_config(
        DEMO_CONFIG,
        [
            f"run_dir={root}",
            f"data.shards={train_list}",
            f"data.eval_shards={eval_list}",
            *(overrides or []),
        ],
    )
    result = run_pipeline(cfg)
    for stage, rec in result["stages"].items():
        times[stage] = f"{rec['seconds']:.0f} s" if "seconds" in rec else "skipped (complete)"
    total = time.time() - t0
    print(summary_text(root, times, total, interrupted=result["interrupted"]))
    return 1 if result["interrupted"] else 0


def summary_text(root: Path, times: dict[str, str], total: float, interrupted: bool) -> str:
    """The demo's closing lines: time per stage, the teacher-vs-student table, the report."""
    lines = ["", "[demo] " + ", ".join(f"{k} {v}" for k, v in times.items())]
    lines.append(f"[demo] total {total:.0f} s ({total / 60:.1f} min)")
    if interrupted:
        lines.append(
            f"[demo] training stopped after a checkpoint; run `megaclass demo --out {root}` "
            "again to resume"
        )
        return "\n".join(lines)
    table = eval_table_text(root)
    if table:
        lines += ["", table, ""]
    lines.append(
        f"[demo] report: {root / 'report.html'} (also report.md, report.json; plots in "
        f"{root / 'plots'})"
    )
    return "\n".join(lines)


def eval_table_text(root: Path) -> str | None:
    """The eval stage's teacher-vs-student table, from RUN/eval/metrics.json."""
    path = root / "eval" / "metrics.json"
    if not path.is_file():
        return None
    m: dict[str, Any] = json.loads(path.read_text())
    enc = m.get("encoders") or {}
    order = [n for n in m.get("encoder_order") or [] if n in enc]
    order += sorted(n for n in enc if n not in order)
    return format_table({**m, "encoders": {n: enc[n] for n in order}})
