"""Training metrics: RUN/train/metrics.jsonl (one JSON object per record) and TensorBoard.

Only rank 0 writes. On resume, records after the resumed step (written by the interrupted
run before it died) are dropped so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from megaclass.core.atomic import write_text_atomic

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, train_dir: str | Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(train_dir) / "metrics.jsonl"
        self._tb = None
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= resume_step
            ]
            write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))
        self._f = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(train_dir) / "tb"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard not installed: JSONL only
            log.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in rec.items()
        }
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, rec["step"])
            self._tb.flush()
        log.info(
            "step %d loss %.4f lr %.3g %.1f samples/s data-wait %.1f%%",
            rec["step"],
            rec["loss"],
            rec["lr"],
            rec["samples_per_s"],
            100 * rec["data_wait_share"],
        )

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # unreadable (torn) line: drop it
