"""Counting skipped samples by reason and shard, so nothing is dropped silently.

Every stage that reads samples owns a :class:`SampleStats`, merges the workers' copies, and
writes ``as_dict()`` into its ``_done`` records and the report.

Two kinds of count: a *skip* (``REASONS``) drops a sample, and ``seen == kept + skipped`` holds
after a shard is read; a *note* (``NOTES``) marks something changed or left out of a sample that
is still used (a caption cut to ``data.max_caption_bytes``, a tar member of a kind no stage
reads), so it is counted without taking part in that sum.
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
    "bad_key",  # the member name is not valid UTF-8 (a raw byte): no file format can store it
    "bad_metadata",  # the json parses but holds text no UTF-8 writer accepts (a lone surrogate)
    "unsupported_format",  # an image in a format the pipeline does not decode (GIF, BMP, EPS…)
    "json_too_large",  # a .json member over data.max_json_bytes (never read into memory)
)

# Notes: counted, but the sample is kept (see the module docstring).
NOTES = (
    "caption_truncated",  # a caption over data.max_caption_bytes, cut at a character boundary
    "ignored_member",  # a tar member whose extension no stage reads (never read into memory)
)


def printable(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes of a file name) as ``\\udcff`` escapes.

    Why: a key or detail taken from a damaged member name would otherwise make every later
    UTF-8 write of the stats (JSON records, the report) fail on the example that explains it.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class SampleStats:
    """Samples read/kept and skipped (by reason and by shard)."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_by_shard: dict[str, Counter] = field(default_factory=dict)  # shard -> reason -> count
    examples: list[dict[str, str]] = field(default_factory=list)  # first few skips, for the report
    noted: Counter = field(default_factory=Counter)  # note -> count (kept samples, see NOTES)

    max_examples: int = 20

    def skip(self, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_by_shard.setdefault(shard, Counter())[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(
                {
                    "reason": reason,
                    "shard": printable(shard),
                    "key": printable(key or ""),
                    "detail": printable(detail[:200]),
                }
            )

    def note(self, what: str, n: int = 1) -> None:
        """Count ``n`` of note ``what`` (NOTES): nothing is skipped, ``seen``/``kept`` unchanged."""
        self.noted[what] += n

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
        self.noted.update(other.noted)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "skipped_total": self.total_skipped,
            "skipped_by_shard": {s: dict(c) for s, c in self.skipped_by_shard.items()},
            "examples": list(self.examples),
            "noted": dict(self.noted),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleStats:
        s = cls(seen=int(d.get("seen", 0)), kept=int(d.get("kept", 0)))
        s.skipped.update(d.get("skipped", {}))
        for shard, c in d.get("skipped_by_shard", {}).items():
            s.skipped_by_shard[shard] = Counter(c)
        s.examples = list(d.get("examples", []))
        s.noted.update(d.get("noted", {}))
        return s

    def summary(self) -> str:
        if not self.total_skipped:
            return f"{self.kept}/{self.seen} samples kept, none skipped"
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items()))
        return f"{self.kept}/{self.seen} samples kept, {self.total_skipped} skipped ({reasons})"
