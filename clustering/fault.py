"""Fault injection for the kill-and-resume tests: ``MEGACLASS_FAULT=<point>:<n>``.

When the variable names this point and count, the process SIGKILLs itself right there — a
real, uncatchable kill at a reproducible moment (after checkpoint n was written), which is
what the resume guarantees are about. Unset in normal runs: the check is one dict lookup.
"""

from __future__ import annotations

import os
import signal


def maybe_die(point: str, n: int) -> None:
    if os.environ.get("MEGACLASS_FAULT") == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)
