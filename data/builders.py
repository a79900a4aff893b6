"""``megaclass data demo|openclipart|fashion-mnist --out DIR``: labelled image–caption shards.

Every builder writes the same layout, so the pipeline and the evaluation treat them alike::

    DIR/train/<name>-000000.tar …   samples of the *seen* classes (for embed/cluster/train)
    DIR/eval/<name>-000000.tar …    samples of *held-out* classes (retrieval evaluation)
    DIR/dataset.json                the summary returned by :func:`build_dataset`

Each sample is ``<key>.jpg|png`` + ``<key>.txt`` (caption) + ``<key>.json`` with at least
``class`` (string), ``split`` (``train``/``eval``) and ``caption``. Which classes are held
out is a seeded choice; everything is deterministic given the seed.

* ``demo`` — procedurally rendered shapes (``data/demo_render.py``), no external data:
  50 classes × 60 samples, 10 classes held out; seconds on 2 cores.
* ``openclipart`` — Debian ``openclipart-png`` (clip-art PNGs in category folders): class =
  category folder with ≥ 20 images, transparency flattened onto white, downscaled to ≤ 256 px;
  images over ``max_pixels`` are skipped (``too_many_pixels``) and reported.
* ``fashion-mnist`` — Debian ``dataset-fashion-mnist`` (70k 28×28 product photos, 10 classes).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.core.atomic import write_json_atomic
from megaclass.core.errors import UserError
from megaclass.data.demo_render import demo_classes, render_sample
from megaclass.data.reader import ImageRejected, open_image, to_rgb
from megaclass.data.stats import SampleStats
from megaclass.data.writer import ShardWriter, encode_image
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

OPENCLIPART_DIR = Path("/usr/share/openclipart/png")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


class DatasetUnavailableError(UserError, FileNotFoundError):
    """The system package a builder reads from is not installed."""


# ------------------------------------------------------------------------------------
# common writing
# ------------------------------------------------------------------------------------


def _held_out(classes: list[str], fraction: float, seed: int) -> set[str]:
    n = max(1, round(len(classes) * fraction))
    order = np.random.default_rng([seed, 4242]).permutation(len(classes))
    return {sorted(classes)[i] for i in order[:n]}


def _write_splits(
    name: str,
    out: Path,
    items: Iterable[tuple[Image.Image | bytes, str, dict[str, Any], str]],
    held_out: set[str],
    total: int,
    maxcount: int,
    image_ext: str,
) -> dict[str, Any]:
    """Write (image, caption, meta, ext) items into out/train and out/eval by class."""
    writers = {
        split: ShardWriter(out / split, prefix=f"{name}-", maxcount=maxcount, image_ext=image_ext)
        for split in ("train", "eval")
    }
    counts: dict[str, Counter] = {"train": Counter(), "eval": Counter()}
    try:
        for n, (image, caption, meta, ext) in enumerate(
            tqdm(items, total=total, desc=f"data {name}", unit="img", disable=None)
        ):
            split = "eval" if meta["class"] in held_out else "train"
            meta = {**meta, "split": split, "caption": caption, "key": f"{n:09d}"}
            writers[split].write(f"{n:09d}", image, caption, meta, image_ext=ext)
            counts[split][meta["class"]] += 1
    except BaseException:
        for w in writers.values():
            w._abort()
        raise
    for w in writers.values():
        w.close()
    return {
        "name": name,
        "out": str(out),
        "splits": {
            split: {
                "samples": sum(counts[split].values()),
                "shards": len(writers[split].shards),
                "classes": len(counts[split]),
                "spec": f"{out / split}/{name}-{{000000..{len(writers[split].shards) - 1:06d}}}.tar"
                if writers[split].shards
                else "",
            }
            for split in ("train", "eval")
        },
        "classes": {split: sorted(counts[split]) for split in ("train", "eval")},
        "per_class": {split: dict(sorted(counts[split].items())) for split in ("train", "eval")},
    }


# ------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------


def _demo_one(args: tuple[int, int, int, int]) -> tuple[bytes, str, dict, str]:
    seed, n_classes, per_class, idx = args
    cls = demo_classes(n_classes)[idx // per_class]
    image, caption, extra = render_sample(cls, seed, idx)
    return encode_image(image, "jpg", quality=90), caption, {"class": cls.name, **extra}, "jpg"


def _pool(workers: int | None):
    n = workers or min(4, os.cpu_count() or 1)
    return get_context("spawn" if sys.platform == "darwin" else "fork").Pool(n)


def _demo_items(
    seed: int, n_classes: int, per_class: int, workers: int | None
) -> Iterator[tuple[bytes, str, dict, str]]:
    order = np.random.default_rng([seed, 1]).permutation(n_classes * per_class)
    jobs = [(seed, n_classes, per_class, int(i)) for i in order]
    with _pool(workers) as pool:  # each sample depends only on (seed, index): order-safe
        yield from pool.imap(_demo_one, jobs, chunksize=32)


def build_demo(
    out: str | os.PathLike,
    seed: int = 0,
    n_classes: int = 50,
    per_class: int = 60,
    held_out_fraction: float = 0.2,
    maxcount: int = 400,
    workers: int | None = None,
) -> dict[str, Any]:
    """Procedural shapes dataset (see ``data/demo_render.py``)."""
    names = [c.name for c in demo_classes(n_classes)]
    held = _held_out(names, held_out_fraction, seed)
    return _write_splits(
        "demo",
        Path(out),
        _demo_items(seed, n_classes, per_class, workers),
        held,
        n_classes * per_class,
        maxcount,
        "jpg",
    )


# ------------------------------------------------------------------------------------
# openclipart-png
# ------------------------------------------------------------------------------------


def _words(stem: str) -> str:
    stem = re.sub(r"_+\d+$", "", stem)  # trailing _01 numbering
    words = [w for w in re.split(r"[_\-\s.]+", stem) if w and not w.isdigit()]
    return " ".join(words).lower()


def _clipart_one(args: tuple[str, str, int, int]) -> tuple[bytes | None, str, str]:
    """Load, flatten onto white, downscale; returns (png bytes | None, reason, detail)."""
    path, _cls, max_pixels, max_side = args
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = open_image(data, max_pixels)
        img.load()
        img = to_rgb(img)
        img.thumbnail((max_side, max_side), Image.LANCZOS)
        return encode_image(img, "jpg", quality=92), "", ""
    except ImageRejected as e:
        return None, e.reason, e.detail
    except Exception as e:  # unreadable file
        return None, "undecodable_image", f"{type(e).__name__}: {e}"


def build_openclipart(
    out: str | os.PathLike,
    seed: int = 0,
    root: str | os.PathLike = OPENCLIPART_DIR,
    min_per_class: int = 20,
    max_per_class: int | None = None,
    held_out_fraction: float = 0.2,
    max_pixels: int = 4_000_000,
    max_side: int = 256,
    maxcount: int = 1000,
    workers: int | None = None,
) -> dict[str, Any]:
    """Debian openclipart-png → shards; class = category folder (relative path)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailableError(
            f"{root} not found: install the Debian package openclipart-png "
            "(sudo apt-get install openclipart-png)"
        )
    by_cls: dict[str, list[Path]] = {}
    for p in sorted(root.rglob("*.png")):
        by_cls.setdefault(str(p.parent.relative_to(root)), []).append(p)
    classes = sorted(c for c, fs in by_cls.items() if len(fs) >= min_per_class and c != ".")
    if not classes:
        raise DatasetUnavailableError(f"{root}: no category folder has ≥ {min_per_class} PNGs")
    files = [(p, c) for c in classes for p in by_cls[c][: max_per_class or None]]
    order = np.random.default_rng([seed, 2]).permutation(len(files))
    files = [files[i] for i in order]
    held = _held_out(classes, held_out_fraction, seed)
    stats = SampleStats()

    def items() -> Iterator[tuple[bytes, str, dict, str]]:
        jobs = [(str(p), c, max_pixels, max_side) for p, c in files]
        with _pool(workers) as pool:
            for (p, c), (data, reason, detail) in zip(
                files, pool.imap(_clipart_one, jobs, chunksize=16)
            ):
                stats.seen += 1
                rel = str(p.relative_to(root))
                if data is None:
                    stats.skip(reason, str(root), rel, detail)
                    continue
                stats.kept += 1
                leaf = c.rsplit("/", 1)[-1]
                what = _words(p.stem) or leaf
                caption = f"clip art of {what}" + (f" ({leaf})" if leaf not in what else "")
                yield data, caption, {"class": c, "file": rel}, "jpg"

    summary = _write_splits("openclipart", Path(out), items(), held, len(files), maxcount, "jpg")
    summary["skipped"] = stats.as_dict()
    return summary


# ------------------------------------------------------------------------------------
# fashion-mnist
# ------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape} values, found {data.size}")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise DatasetUnavailableError(
        f"{root / stem}[.gz] not found: install the Debian package dataset-fashion-mnist "
        "(sudo apt-get install dataset-fashion-mnist)"
    )


FASHION_TEMPLATES = (
    "a photo of a {}",
    "a small grayscale product picture of a {}",
    "{} on a black background",
    "catalogue photo: {}",
    "a low-resolution image of a {}",
)


def build_fashion_mnist(
    out: str | os.PathLike,
    seed: int = 0,
    root: str | os.PathLike = FASHION_MNIST_DIR,
    held_out: tuple[str, ...] | None = None,
    max_per_class: int | None = None,
    maxcount: int = 5000,
) -> dict[str, Any]:
    """Debian dataset-fashion-mnist → shards (28×28 greyscale PNGs); 3 of 10 classes held out."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailableError(
            f"{root} not found: install the Debian package dataset-fashion-mnist "
            "(sudo apt-get install dataset-fashion-mnist)"
        )
    parts = []
    for source, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        y = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise ValueError(f"{root}: {len(x)} {source} images but {len(y)} labels")
        parts.append((source, x, y))
    held = set(held_out) if held_out else _held_out(list(FASHION_CLASSES), 0.3, seed)
    rows = [(s, i, int(y[i])) for s, _x, y in parts for i in range(len(y))]
    if max_per_class:
        seen: Counter = Counter()
        rows = [r for r in rows if (seen.update([r[2]]) or seen[r[2]] <= max_per_class)]
    order = np.random.default_rng([seed, 3]).permutation(len(rows))
    images = {s: x for s, x, _y in parts}
    rng = np.random.default_rng([seed, 5])

    def items() -> Iterator[tuple[bytes, str, dict, str]]:
        for j in order:
            source, i, label = rows[j]
            cls = FASHION_CLASSES[label]
            png = encode_image(Image.fromarray(images[source][i], mode="L"), "png")
            caption = FASHION_TEMPLATES[rng.integers(len(FASHION_TEMPLATES))].format(cls)
            yield png, caption, {"class": cls, "source_split": source, "index": int(i)}, "png"

    return _write_splits("fashion-mnist", Path(out), items(), held, len(rows), maxcount, "png")


# ------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "demo": build_demo,
    "openclipart": build_openclipart,
    "fashion-mnist": build_fashion_mnist,
}


def build_dataset(name: str, out: str, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """Build dataset ``name`` into ``out`` (train/ and eval/ shards); returns the summary.

    The summary (also written to ``out/dataset.json``) has per split the sample, shard and
    class counts and a shard spec, the class lists, per-class counts, and (openclipart)
    the skipped images with reasons.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    out_path = Path(out)
    for split in ("train", "eval"):
        stale = sorted((out_path / split).glob(f"{name}-*.tar"))
        for p in stale:  # a rebuild must not leave shards of an earlier, larger build behind
            p.unlink()
    summary = BUILDERS[name](out_path, seed=seed, **kwargs)
    summary["seed"] = seed
    write_json_atomic(out_path / "dataset.json", summary)
    s = summary["splits"]
    print(
        f"{name}: train {s['train']['samples']} samples / {s['train']['classes']} classes "
        f"in {s['train']['shards']} shards, eval {s['eval']['samples']} samples / "
        f"{s['eval']['classes']} held-out classes in {s['eval']['shards']} shards → {out}",
        file=sys.stderr,
    )
    return summary
