"""The embed stage's teacher actor: what determines the vectors, and the process that computes them.

Ray Data's ``map_batches`` runs :class:`TeacherActor` in long-lived actors so that the frozen
teacher is loaded once per actor, not once per chunk. Ray ships the class (and the
:class:`TeacherSpec` it is built from) to the actors by reference, so both live at module level
in an importable module; this one imports neither Ray nor torch at import time, which keeps the
driver's and the decode tasks' imports light.

A chunk that fails in the teacher becomes an error row, not an exception: Ray would otherwise
fail the whole execution, while the driver can retry just that shard in a later pass. The
fault-injection switch (:data:`EMBED_FAULT_ENV`) exists for the tests of that retry path.

A chunk that kills its process (a crash in native code, the OOM killer) cannot answer with an
error row. Ray restarts the actor and retries the chunk, at most ``embed.actor_crash_retries``
times (the stage bounds both); then the execution ends. To tell the driver *which* shard did it,
every actor and decode task reports each unit of work to a :class:`CrashLedger` before starting
it: a retried task that reports again names the unit its dead process was running. The crash
switch (:data:`EMBED_CRASH_ENV`) makes an actor exit hard, for the tests of that path.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
from megaclass.pipelines.config import RunConfig

logger = logging.getLogger(__name__)

# Fault injection for the retry tests: ``MEGACLASS_EMBED_FAULT="<stem>:<n>[,<stem>:<n>…]"`` makes
# the teacher step raise on every chunk of shard <stem> in passes 1..n (n large: always). Read
# by the driver and handed to the actors, so it works whatever environment Ray's workers have.
EMBED_FAULT_ENV = "MEGACLASS_EMBED_FAULT"
# Crash injection: ``MEGACLASS_EMBED_CRASH="<stem>[,<stem>…]"`` makes the actor process exit at
# once (``os._exit``, no Python error, like a segfault) on every chunk of each such shard, in
# every pass. Read by the driver and handed to the actors, like EMBED_FAULT_ENV.
EMBED_CRASH_ENV = "MEGACLASS_EMBED_CRASH"


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines the vectors (besides the input shard)."""

    image_teacher: str
    text_teacher: str
    pretrained: str | None
    image_size: int | None
    batch_size: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TeacherSpec:
        e = cfg.embed
        return cls(e.image_teacher, e.text_teacher, e.pretrained, e.image_size, e.batch_size)

    @property
    def has_text(self) -> bool:
        return self.text_teacher != "none"


def fault_plan() -> dict[str, int]:
    """The injected faults of :data:`EMBED_FAULT_ENV` as ``{stem: passes}`` (empty when unset)."""
    spec = os.environ.get(EMBED_FAULT_ENV, "").strip()
    plan: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        stem, _, n = item.rpartition(":")
        if not stem or not n.isdigit():
            raise ValueError(f"{EMBED_FAULT_ENV}={spec!r}: expected '<stem>:<passes>[,…]'")
        plan[stem] = int(n)
    return plan


def crash_plan() -> frozenset[str]:
    """The stems of :data:`EMBED_CRASH_ENV` (empty when unset)."""
    spec = os.environ.get(EMBED_CRASH_ENV, "")
    return frozenset(filter(None, (x.strip() for x in spec.split(","))))


class CrashLedger:
    """Which units of work were running when their process died, for one pass (a Ray actor).

    A unit is ``(where, stem, chunk)``: ``("decode", stem, -1)`` for a decode task,
    ``("teacher", stem, i)`` for chunk ``i`` in a teacher actor. Workers report each unit before
    starting it (:meth:`start`, waited for) and when done (:meth:`finish`, not waited for), under
    a worker key that survives the death of their process: the actor id for an actor (Ray
    restarts it under the same id; it runs one call at a time), the task id for a task (a
    retried task keeps it). A start under a key whose last unit never finished means that
    unit's process died: that is counted as a crash of the unit. Only work in flight is held,
    plus the crash counts.
    """

    def __init__(self) -> None:
        self.running: dict[str, tuple[str, str, int]] = {}
        self.crashes: dict[tuple[str, str, int], int] = {}

    def start(self, worker: str, where: str, stem: str, chunk: int) -> None:
        died = self.running.get(worker)
        if died is not None:  # the worker's previous process never finished this unit
            self.crashes[died] = self.crashes.get(died, 0) + 1
        self.running[worker] = (where, stem, chunk)

    def finish(self, worker: str) -> None:
        self.running.pop(worker, None)

    def crashed(self) -> dict[str, tuple[str, int, int]]:
        """``{stem: (where, chunk, deaths seen)}`` of the shards whose work crashed a process."""
        out: dict[str, tuple[str, int, int]] = {}
        for (where, stem, chunk), n in sorted(self.crashes.items()):
            if stem not in out or n > out[stem][2]:
                out[stem] = (where, chunk, n)
        return out


def _worker_key() -> str:
    """The caller's key for :class:`CrashLedger`: its actor id, else its task id.

    Why not the task id in an actor: in Ray Data's actors it names the actor's long-running
    call, not one chunk, and a restarted actor's retried call gets a new one.
    """
    import ray

    ctx = ray.get_runtime_context()
    actor = ctx.get_actor_id()
    return f"actor:{actor}" if actor else f"task:{ctx.get_task_id()}"


def ledger_start(ledger: Any, where: str, stem: str, chunk: int) -> None:
    """Report a unit of work before it starts (waits, so that a crash right after still counts).

    A ledger that cannot be reached only costs the attribution of crashes, never the work.
    """
    if ledger is None:
        return
    import ray

    try:
        ray.get(ledger.start.remote(_worker_key(), where, stem, chunk), timeout=60)
    except Exception as e:  # attribution is best effort
        logger.debug("crash ledger unreachable: %s", e)


def ledger_finish(ledger: Any) -> None:
    """Report that this task's unit finished (fire and forget: the next start is ordered after)."""
    if ledger is None:
        return
    try:
        ledger.finish.remote(_worker_key())
    except Exception as e:
        logger.debug("crash ledger unreachable: %s", e)


def actor_threads(num_cpus_per_actor: float) -> int:
    """Torch threads of a teacher actor: its CPU reservation, rounded (at least 1).

    Fractional reservations let a small machine give the actors every core while the decode
    tasks, idle most of the time next to a CPU teacher, keep a small one: on 2 cores one actor
    with 1.5 CPUs runs 2 threads, or two actors with 0.75 CPUs run 1 thread each, next to a
    0.5-CPU decoder (configs/demo.yaml).
    """
    return max(1, int(round(num_cpus_per_actor)))


class TeacherActor:
    """Holds one frozen teacher; each call embeds one chunk (batch_size=1 row of map_batches)."""

    def __init__(
        self,
        spec: TeacherSpec,
        num_threads: int,
        use_gpu: bool,
        attempt: int = 1,
        faults: dict[str, int] | None = None,
        crashes: frozenset[str] = frozenset(),
        ledger: Any = None,
    ) -> None:
        t0 = time.time()
        import torch
        from megaclass.training.teachers import load_teacher

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.teacher = load_teacher(
            spec.image_teacher, spec.text_teacher, spec.pretrained, device, spec.image_size
        )
        self.fail_stems = {s for s, n in (faults or {}).items() if attempt <= n}
        self.crash_stems = crashes
        self.ledger = ledger
        self.init_s = time.time() - t0

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = dict(row)
        out.pop("pixels", None)
        out.update(img=b"", txt=b"", img_dim=self.teacher.image_dim, encode_s=0.0)
        out.update(t_start=time.time(), t_end=0.0, init_s=self.init_s)
        out["txt_dim"] = int(self.teacher.text_dim or 0)
        if row["error"]:
            return out
        unit = (str(row["stem"]), int(row["chunk"]))
        ledger_start(self.ledger, "teacher", *unit)
        if unit[0] in self.crash_stems:
            os._exit(1)  # injected crash (EMBED_CRASH_ENV): no Python error, no error row
        try:
            t0 = time.perf_counter()
            if row["stem"] in self.fail_stems:
                raise RuntimeError(f"injected fault ({EMBED_FAULT_ENV})")
            shape = json.loads(row["shape"])
            n = int(row["n"])
            if n:
                x = torch.from_numpy(np.frombuffer(row["pixels"], np.float32).reshape(shape).copy())
                out["img"] = self.teacher.encode_images(x).tobytes()
                if self.spec.has_text:
                    caps = json.loads(row["meta"])["caption"]
                    out["txt"] = self.teacher.encode_texts(caps).tobytes()
            out["encode_s"] = time.perf_counter() - t0
            out["t_end"] = time.time()
        except Exception as e:
            out["error"] = f"teacher: {type(e).__name__}: {e}"
            logger.debug(
                "teacher failed on %s chunk %s:\n%s",
                row["url"],
                row["chunk"],
                traceback.format_exc(),
            )
        ledger_finish(self.ledger)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["stem"])
        rows = [self._one({k: _scalar(v[i]) for k, v in batch.items()}) for i in range(n)]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
