"""``megaclass demo``: the whole pipeline on built-in demo data, on this machine.

Builds the demo shards (procedurally rendered, captioned images; some classes held out),
then runs ``configs/demo.yaml`` end to end: embed with the offline teachers, cluster,
assign, train a student over two DeepSpeed ranks, evaluate teacher and student on the
held-out classes, and write the report. Re-running it resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import megaclass
from megaclass.data.atomic import write_text_atomic
from megaclass.pipelines.config import load_config

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(megaclass.__file__).resolve().parent / "configs" / "demo.yaml"


def _shard_list(folder: Path, out: Path) -> Path:
    """Write a list file of the shards in ``folder`` (list files are a valid shard spec)."""
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {folder}")
    write_text_atomic(out, "".join(f"{p}\n" for p in shards))
    return out


def run_demo(out: str = "runs/demo", overrides: list[str] | None = None) -> int:
    """Build the demo data if needed, then run every stage; returns a process exit code."""
    from megaclass.data.builders import build_dataset
    from megaclass.pipelines.run import run_pipeline

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    t0 = time.time()
    root = Path(out).resolve()
    data_dir = root / "data"
    if not (data_dir / "_BUILT").exists():
        print(f"[demo] building demo shards in {data_dir}")
        build_dataset("demo", str(data_dir), seed=0)
        write_text_atomic(data_dir / "_BUILT", "ok\n")
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
    run_pipeline(cfg)
    print(f"[demo] finished in {time.time() - t0:.0f} s; report: {root / 'report.html'}")
    return 0
