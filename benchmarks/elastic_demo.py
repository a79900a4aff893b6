"""Elastic resume on the demo config: 2 ranks to step 30, then 1 rank to step 60.

    .venv/bin/python benchmarks/elastic_demo.py [--work DIR]     # ~6 min on 2 cores

Claim checked (issue "Elastic resume", docs/training.md "Elastic resume"): a demo run trained by
2 ranks to step 30 and resumed with ``train.nproc=1`` to step 60 reads exactly the global batches
of an uninterrupted 2-rank run — ``RUN/train/batches.jsonl`` is identical line for line. The
weights are not compared here: EfficientNet-Lite0's drop-connect draws depend on the rank's
micro batch and the CPU's float sums on the split, so only the data order is world-size free on
this model (the float64 test in tests/test_elastic.py compares weights on a model without random
layers).

Steps: build the demo data, run embed/cluster/assign once into ``base``, copy it into two run
directories, train one uninterrupted (2 ranks, 60 steps) and the other 2 ranks with
``train.steps=30`` (standing in for a preemption right after the step-30 checkpoint), then
``train.nproc=1`` with ``train.steps=60`` (``--force`` both times: the step count differs from
the base's config; the rank count alone would not need it). Prints both files' line counts and whether
they are equal; exit status 1 when they differ.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo.yaml"


def megaclass(*args: str) -> None:
    cmd = [sys.executable, "-m", "megaclass.pipelines.cli", *args]
    print("+", " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: temp)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="megaclass-elastic-"))
    data = work / "data"
    if not (data / "dataset.json").exists():
        megaclass("data", "demo", "--out", str(data))
    shards = f"data.shards={data}/train/demo-{{000000..000005}}.tar"
    evals = f"data.eval_shards={data}/eval/demo-{{000000..000001}}.tar"
    base = work / "base"
    common = [shards, evals, "train.log_batch_keys=true"]
    megaclass("run", str(CONFIG), f"run_dir={base}", *common, "--stages", "embed,cluster,assign")
    runs = {name: work / name for name in ("whole", "elastic")}
    if not (runs["whole"] / "train" / "_SUCCESS.json").is_file():  # reused by a re-run
        shutil.rmtree(runs["whole"], ignore_errors=True)
        shutil.copytree(base, runs["whole"])
        megaclass("train", str(CONFIG), f"run_dir={runs['whole']}", *common)
    shutil.rmtree(runs["elastic"], ignore_errors=True)
    shutil.copytree(base, runs["elastic"])
    megaclass(
        "train", str(CONFIG), f"run_dir={runs['elastic']}", *common, "train.steps=30", "--force"
    )
    megaclass(
        "train", str(CONFIG), f"run_dir={runs['elastic']}", *common, "train.nproc=1", "--force"
    )
    a = (runs["whole"] / "train" / "batches.jsonl").read_text().splitlines()
    b = (runs["elastic"] / "train" / "batches.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in b]
    same = a == b
    print(
        f"uninterrupted 2 ranks: {len(a)} lines; 2 ranks to 30 then 1 rank to 60: {len(b)} lines "
        f"(steps {steps[0]}..{steps[-1]}); identical: {same}"
    )
    return 0 if same and len(a) == 60 else 1


if __name__ == "__main__":
    sys.exit(main())
