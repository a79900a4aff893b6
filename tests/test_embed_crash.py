"""A shard whose chunks kill the teacher actor (``os._exit``: no Python error, as a segfault or
the OOM killer) ends the embed stage instead of being retried forever: Ray restarts the actor
and retries the chunk ``embed.actor_crash_retries`` times, the shard is reported failed with
the crash as its reason, and every other shard is written.

Why a subprocess with its own Ray: the stage must be seen to *end*, and a Ray instance shared
with other tests (with their actors and executors) could hide a hang or an early end; the
subprocess starts a fresh local Ray (``connect_ray``) and stops it when done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from megaclass.core.rundir import RunDir
from megaclass.data.writer import ShardWriter
from megaclass.pipelines.embed_actor import EMBED_CRASH_ENV
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_embed import write_embed_yaml  # noqa: E402

DRIVER = """
import sys
from megaclass.pipelines.config import load_config
from megaclass.pipelines.embed import EmbedError, run_embed
try:
    run_embed(load_config(sys.argv[1], []))
except EmbedError as e:
    print("EMBED_ERROR:", e, flush=True)
    sys.exit(3)
print("EMBED_OK", flush=True)
"""


def _shards(out: Path, sizes: list[int]) -> list[str]:
    rng = np.random.default_rng(2)
    paths = []
    for si, n in enumerate(sizes):
        with ShardWriter(out, maxcount=n, start_index=si) as w:
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
                w.write(f"s{si}_{i:03d}", img, f"caption {si} {i}", {"i": i})
        paths.extend(w.shards)
    return paths


def _run_stage(tmp_path: Path, shards: list[str], env: dict[str, str], timeout: float):
    cfg = write_embed_yaml(
        tmp_path / "crash.yaml",
        tmp_path / "run",
        shards,
        text_teacher="none",
        batch_size=4,
        max_retries=2,
        actor_crash_retries=1,
        num_cpus_per_actor=1,
        num_cpus_per_decoder=0.5,
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # the Ray it starts lives in this session: killed below
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = b"(timed out)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a hung stage and any Ray process it left
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, out.decode(errors="replace")


def test_actor_crash_fails_only_its_shard_and_the_stage_ends(tmp_path):
    shards = _shards(tmp_path / "shards", [6, 7, 5])
    crash_stem = "000001"
    env = dict(os.environ, RAY_ADDRESS="local")  # a fresh local Ray, whatever else runs here
    env.update({EMBED_CRASH_ENV: crash_stem, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    rc, out = _run_stage(tmp_path, shards, env, timeout=420)
    assert rc == 3, out[-4000:]  # EmbedError, not a hang (timeout) or a Ray traceback
    assert "EMBED_ERROR:" in out and f"{crash_stem}.tar" in out

    embed_dir = RunDir(tmp_path / "run").embed
    failed = json.loads((embed_dir / "_FAILED.json").read_text())
    assert list(failed["failed"]) == [shards[1]]
    reason = failed["failed"][shards[1]]
    assert reason.startswith("crash: the teacher process died while embedding chunk "), reason
    assert "on the first attempt and on 1 retry (embed.actor_crash_retries=1)" in reason
    assert (failed["shards_embedded"], failed["shards_failed"], failed["rows"]) == (2, 1, 11)
    assert RunDir.read_done(embed_dir, crash_stem) is None
    assert not list(embed_dir.rglob(f"{crash_stem}.*"))  # no file of the crashed shard
    for stem, n in (("000000", 6), ("000002", 5)):  # the others: complete, uncharged
        assert RunDir.read_done(embed_dir, stem)["rows"] == n
        keys = pq.read_table(embed_dir / "metadata" / f"{stem}.parquet").column("key")
        assert len(keys) == n
    assert not (embed_dir / "_SUCCESS.json").exists()
