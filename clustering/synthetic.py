"""Planted clusters on the unit sphere, for tests and benchmarks."""

from __future__ import annotations

import numpy as np


def planted_sphere(
    n: int, k: int, d: int, noise: float = 0.1, seed: int = 0, dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``k`` random unit centres (Gaussian noise of std ``noise`` per
    coordinate·√d scale-free), with their true cluster ids. Generated in blocks to stay lean."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, size=n)
    x = np.empty((n, d), dtype=dtype)
    step = 1 << 20
    for s in range(0, n, step):
        e = min(n, s + step)
        blk = centres[labels[s:e]] + rng.standard_normal((e - s, d)).astype(np.float32) * (
            noise / np.sqrt(d)
        )
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        x[s:e] = blk
    return x, labels


def write_embed_dir(
    embed_dir: str,
    img: np.ndarray,
    txt: np.ndarray | None = None,
    classes: list | None = None,
    rows_per_stem: int = 1000,
    key_prefix: str = "s",
    mark_done: bool = True,
) -> list[str]:
    """A RUN/embed folder in the contract layout (float16 arrays, metadata parquet, _done)."""
    import json
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(embed_dir)
    for sub in ("img_emb", "metadata", "_done") + (("text_emb",) if txt is not None else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for j, s in enumerate(range(0, len(img), rows_per_stem)):
        e = min(len(img), s + rows_per_stem)
        stem = f"{j:05d}"
        stems.append(stem)
        np.save(root / "img_emb" / f"{stem}.npy", img[s:e].astype(np.float16))
        if txt is not None:
            np.save(root / "text_emb" / f"{stem}.npy", txt[s:e].astype(np.float16))
        cols = {
            "key": [f"{key_prefix}{i:09d}" for i in range(s, e)],
            "shard": [f"/data/{stem}.tar"] * (e - s),
            "caption": [""] * (e - s),
        }
        if classes is not None:
            cols["class"] = [None if c is None else str(c) for c in classes[s:e]]
        pq.write_table(pa.table(cols), root / "metadata" / f"{stem}.parquet")
        if mark_done:
            (root / "_done" / f"{stem}.json").write_text(json.dumps({"rows": e - s}))
    return stems
