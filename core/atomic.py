"""Atomic file output: write to a temporary name in the same folder, then rename.

A reader never sees a half-written file under its final name, so a killed stage leaves
either the complete file or nothing (plus a stray ``.tmp-*`` that the next run ignores).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` if the block succeeds.

    ``suffix`` keeps an extension that a writer insists on (``np.save`` appends ``.npy``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(final: str | Path, text: str) -> None:
    write_bytes_atomic(final, text.encode())


def write_json_atomic(final: str | Path, obj: Any) -> None:
    write_text_atomic(
        final, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays show up in stats; keep the JSON plain.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
