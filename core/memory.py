"""Memory plans: a stage states what its big arrays will take before it allocates them.

Why: at LAION scale a wrong setting (a 64M-point sample on a node with 256 GB, a 10M-class head
on one GPU) used to show up hours later as an OOM kill with no message. Each stage now builds a
:class:`MemoryPlan` (what, how many bytes, which config keys size it), logs it, and refuses to
start when the total exceeds the memory this process can get — naming the keys to change and
``memory_check=false`` to go ahead anyway (docs/operations.md, "Memory").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from megaclass.core.errors import UserError

log = logging.getLogger(__name__)

GB = 1e9


class MemoryBudgetError(UserError, RuntimeError):
    """A stage's memory estimate exceeds the memory available; the message names the keys."""


def available_bytes() -> int:
    """Memory this process can still get: MemAvailable, capped by a cgroup limit if one is set."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:  # not Linux: physical memory as the ceiling
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                continue
            limit = int(raw)
            used = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit < 1 << 60:  # "no limit" is written as a huge number in cgroup v1
            avail = min(avail, max(0, limit - used))
    return int(avail)


@dataclass
class MemoryPlan:
    """The big allocations of one stage, in bytes, with the config keys that size them."""

    stage: str
    items: dict[str, int] = field(default_factory=dict)
    """What -> bytes, e.g. {'sample 64,000,000 x 768 float32': 196_608_000_000}."""
    keys: list[str] = field(default_factory=list)
    """Config keys that change the estimate (named in the refusal)."""

    def add(self, what: str, nbytes: float) -> None:
        self.items[what] = self.items.get(what, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.items.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in self.items.items())
        return f"{self.stage}: memory estimate {self.total / GB:.2f} GB ({parts})"

    def check(self, enabled: bool = True, available: int | None = None) -> None:
        """Log the plan; raise :class:`MemoryBudgetError` when it exceeds what is available."""
        avail = available_bytes() if available is None else available
        log.info("%s; %.2f GB available", self.describe(), avail / GB)
        if enabled and self.total > avail:
            keys = ", ".join(self.keys)
            raise MemoryBudgetError(
                f"{self.describe()} exceeds the {avail / GB:.2f} GB available on this node. "
                f"Lower it with {keys}, run on a larger node, or set memory_check=false to "
                "start anyway."
            )
