"""Fault injection for the kill-and-resume tests: ``MEGACLASS_FAULT=<point>:<n>``.

When the variable names this point and count, a process is SIGKILLed right there — a real,
uncatchable kill at a reproducible moment (after checkpoint or shard n was written), which is
what the resume guarantees are about. By default the calling process dies; a Ray worker can
instead kill its driver (``pid``) and then wait to be reaped with the job, so that no further
shard is written after the kill point. Unset in normal runs: the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time


def maybe_die(point: str, n: int, pid: int | None = None) -> None:
    if os.environ.get("MEGACLASS_FAULT") != f"{point}:{n}":
        return
    if pid is None or pid == os.getpid():
        os.kill(os.getpid(), signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    time.sleep(120)  # the driver's death ends the job and its workers; write nothing more
