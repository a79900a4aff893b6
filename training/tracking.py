"""Training metrics: RUN/train/metrics.jsonl (one JSON object per record), TensorBoard and,
optionally, Weights & Biases.

Only rank 0 writes. On resume, records after the resumed step (written by the interrupted
run before it died) are dropped so the file reads as one uninterrupted run.

Weights & Biases (``train.wandb_project``; off by default) receives the same scalars as
TensorBoard (``train/<key>`` at the record's step), the run's config at start and, once the
eval stage has run, its table (:func:`log_eval_table`, called by ``megaclass export``). Why it
stays optional: most runs need no account or network, so ``wandb`` is imported only when a
project is set, and a missing package is a config error naming the key. The W&B run id is
kept in ``RUN/train/wandb-run-id``, so a resumed training and the later eval table continue
the same W&B run (W&B ignores the steps it already holds from before the interruption).
``WANDB_MODE`` (e.g. ``offline``) and ``WANDB_DIR`` are W&B's own variables and are honoured;
without ``WANDB_DIR`` the W&B files go to ``RUN/train/wandb/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any

from megaclass.core.atomic import write_text_atomic
from megaclass.core.config import ConfigError, config_to_dict
from megaclass.training.config import TrainConfig, TrainJob

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb-run-id"
"""RUN/train/<this>: the W&B run id, so that a resume and the eval table reuse the run."""


class MetricsLogger:
    """Rank 0's metrics sink; with ``job`` given and ``job.train.wandb_project`` set, W&B too."""

    def __init__(
        self,
        train_dir: str | Path,
        enabled: bool,
        resume_step: int = 0,
        job: TrainJob | None = None,
    ):
        self.enabled = enabled
        self.path = Path(train_dir) / "metrics.jsonl"
        self._tb = None
        self._f = None
        self._wandb: Any = None
        if not enabled:
            return
        wandb_on = job is not None and job.train.wandb_project is not None
        if wandb_on:
            require_wandb()  # before any file is touched: a config error leaves no trace
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
        if wandb_on:
            assert job is not None
            self._wandb = start_wandb(
                train_dir, job.train, config=job_config(job), resume=resume_step > 0
            )

    def log(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in rec.items()
        }
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        scalars = {f"train/{k}": v for k, v in scalar_items(rec)}
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, rec["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(rec["step"]))
        log.info(
            "step %d loss %.4f lr %.3g %.1f samples/s data-wait %.1f%%",
            rec["step"],
            rec["loss"],
            rec["lr"],
            rec["samples_per_s"],
            100 * rec["data_wait_share"],
        )

    def log_eval(self, step: int, metrics: dict[str, Any], encoder: str = "student") -> None:
        """One eval-during-training record: a metrics.jsonl line ``{"step", "kind": "eval",
        "encoder", <metric>: value…, "seconds"}`` (training lines have no "kind", which is how
        the report tells them apart) and the scalars ``eval/<metric>`` on TensorBoard/W&B.
        Empty ``metrics`` (ranks other than 0) log nothing."""
        if not self.enabled or not metrics:
            return
        rec = {"step": int(step), "kind": "eval", "encoder": encoder, **metrics}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        scalars = {
            f"eval/{k}": v
            for k, v in metrics.items()
            if k != "seconds" and isinstance(v, (int, float)) and v is not None
        }
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        log.info(
            "step %d eval %s",
            step,
            " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        )

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def scalar_items(rec: dict[str, Any]) -> list[tuple[str, float]]:
    """The (key, value) pairs of a record that are plotted: numbers other than step and time
    (None, e.g. head_lr without a head, is left out)."""
    return [
        (k, v)
        for k, v in rec.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and v is not None
    ]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # unreadable (torn) line: drop it


# --------------------------------------------------------------------------------------
# Weights & Biases
# --------------------------------------------------------------------------------------


def require_wandb() -> Any:
    """The ``wandb`` module; its absence is a ConfigError naming ``train.wandb_project``."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            "train.wandb_project: Weights & Biases logging needs the wandb package, which is "
            "not installed: pip install 'wandb>=0.16' (or leave train.wandb_project unset)"
        ) from e
    return wandb


def wandb_option_errors(tc: TrainConfig) -> list[str]:
    """W&B settings that do nothing because ``train.wandb_project`` is unset (for the run
    config's dead-option check, like :func:`~megaclass.training.config.margin_option_errors`)."""
    if tc.wandb_project is not None:
        return []
    return [
        f"train.{key}: only used with train.wandb_project (unset, so W&B logging is off)"
        for key, unset in (("wandb_run_name", None), ("wandb_tags", []))
        if getattr(tc, key) != unset
    ]


def job_config(job: TrainJob) -> dict[str, Any]:
    """What a training run is given, as plain data for the W&B run config."""
    return {
        "seed": job.seed,
        "train": config_to_dict(job.train),
        "data": config_to_dict(job.data),
        "num_classes": job.num_classes,
    }


def start_wandb(
    train_dir: str | Path,
    tc: TrainConfig,
    config: dict[str, Any] | None,
    resume: bool,
    job_type: str = "train",
) -> Any:
    """A started W&B run for this training run directory.

    ``resume``: continue the run whose id is in ``RUN/train/wandb-run-id`` (a new one when
    there is none); otherwise start a new run and record its id there.
    """
    wandb = require_wandb()
    train_dir = Path(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    id_file = train_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
    if not run_id:
        run_id = _new_run_id()
        write_text_atomic(id_file, run_id + "\n")
    kw: dict[str, Any] = {
        "project": tc.wandb_project,
        "name": tc.wandb_run_name,
        "tags": list(tc.wandb_tags) or None,
        "id": run_id,
        "resume": "allow",
        "job_type": job_type,
    }
    if config is not None:
        kw["config"] = config
    # W&B's own variables, read here (W&B reads them once per process); W&B adds "wandb/" below
    kw["dir"] = os.environ.get("WANDB_DIR") or str(train_dir)
    if os.environ.get("WANDB_MODE"):
        kw["mode"] = os.environ["WANDB_MODE"]
    return wandb.init(**kw)


def _new_run_id() -> str:
    """8 random lowercase letters/digits (W&B's own id alphabet)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def log_eval_table(
    train_dir: str | Path,
    tc: TrainConfig,
    columns: list[str],
    rows: list[list[Any]],
    summary: dict[str, float] | None = None,
) -> bool:
    """Add the eval table (and headline numbers as ``eval/<key>`` summary values) to the
    training's W&B run. Returns False, doing nothing, when ``train.wandb_project`` is unset.

    Why a separate entry point: eval runs after training, in another process, when the
    training's W&B run has finished; this reopens it by the id the training recorded.
    """
    if tc.wandb_project is None:
        return False
    wandb = require_wandb()
    run = start_wandb(train_dir, tc, config=None, resume=True, job_type="eval")
    try:
        run.log({"eval/table": wandb.Table(columns=list(columns), data=[list(r) for r in rows])})
        for k, v in (summary or {}).items():
            run.summary[f"eval/{k}"] = v
    finally:
        run.finish()
    return True
