"""The data section of the run config (``data.*``): where the shards are and how samples decode.

Owned by the data package, beside the reader and loader it configures; ``pipelines/config.py``
composes it into the run config (docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the image-text shards are and how samples are decoded."""

    shards: str = ""
    """Training/embedding shard spec: brace-expandable paths or URLs joined by '::', or a .txt list file."""
    eval_shards: str = ""
    """Evaluation shard spec (held-out classes with a ground-truth class field in the json)."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels than this are skipped as decompression bombs (reason 'too_many_pixels')."""
    class_field: str = "class"
    """Key in each sample's json holding the ground-truth class (used by eval and cluster quality)."""
    image_size: int = 224
    """Side of the square crop fed to the student during training."""
    num_workers: int = 0
    """DataLoader worker processes per rank for the training loader."""
    shuffle_buffer: int = 256
    """Samples held in the seeded shuffle buffer of the training loader (0 disables shuffling)."""
    resampled: bool = False
    """Draw shards with replacement forever (open_clip's resampled mode) instead of epochs."""
