"""Counting skipped samples by reason and shard, so nothing is dropped silently.

Every stage that reads samples owns a :class:`SampleStats`, merges the workers' copies, and
writes ``as_dict()`` into its ``_done`` records and the report.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Reasons a sample (or a whole shard) is skipped. Stages may add their own strings.
REASONS = (
    "undecodable_image",
    "missing_image",
    "missing_caption",
    "too_many_pixels",
    "duplicate_key",
    "bad_json",
    "truncated_tar",
    "unreadable_shard",
    "missing_label",
    "oversized_file",
)


@dataclass
class SampleStats:
    """Samples read/kept and skipped (by reason and by shard)."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_by_shard: dict[str, Counter] = field(default_factory=dict)  # shard -> reason -> count
    examples: list[dict[str, str]] = field(default_factory=list)  # first few skips, for the report

    max_examples: int = 20

    def skip(self, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_by_shard.setdefault(shard, Counter())[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(
                {"reason": reason, "shard": shard, "key": key or "", "detail": detail[:200]}
            )

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: SampleStats) -> SampleStats:
        self.seen += other.seen
        self.kept += other.kept
        self.skipped.update(other.skipped)
        for shard, c in other.skipped_by_shard.items():
            self.skipped_by_shard.setdefault(shard, Counter()).update(c)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "skipped_total": self.total_skipped,
            "skipped_by_shard": {s: dict(c) for s, c in self.skipped_by_shard.items()},
            "examples": list(self.examples),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleStats:
        s = cls(seen=int(d.get("seen", 0)), kept=int(d.get("kept", 0)))
        s.skipped.update(d.get("skipped", {}))
        for shard, c in d.get("skipped_by_shard", {}).items():
            s.skipped_by_shard[shard] = Counter(c)
        s.examples = list(d.get("examples", []))
        return s

    def summary(self) -> str:
        if not self.total_skipped:
            return f"{self.kept}/{self.seen} samples kept, none skipped"
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        return f"{self.kept}/{self.seen} samples kept, {self.total_skipped} skipped ({reasons})"
