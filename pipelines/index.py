"""``megaclass index CONFIG --encoder SPEC --shards SPEC --out DIR``: a faiss index of a shard set.

Why: the eval stage says how well an encoder retrieves; an index lets a person *look* at what it
retrieves (``megaclass search``, :mod:`megaclass.pipelines.search`) on any shard set, held-out or
not. Any encoder of the eval harness works (``teacher``, ``student``, ``open_clip:…``, an export
path …): it is resolved and loaded by :func:`megaclass.pipelines.eval.parse_encoder_spec` and
:func:`~megaclass.pipelines.eval.load_encoder_for_eval`, so index and eval embed an image alike.

The index type follows the size: up to ``--flat-max`` vectors an exact ``IndexFlatIP`` (inner
product of unit vectors = cosine), above it an ``IndexIVFFlat`` with ``nlist ≈ 4·√n`` lists,
trained on a seeded sample of the vectors, searched with ``nprobe`` lists (stored). The choice
and why are printed and recorded in the manifest.

Layout of DIR (docs/search.md):

* ``index.faiss`` — the faiss index (``faiss.write_index``); row i is sample i;
* ``samples.npz`` — per sample: ``keys``, ``captions``, ``classes`` ('' when the json has no
  ``data.class_field``), ``shard`` (index into the manifest's ``shards``), ``members`` (the
  image's tar member name) and ``thumb_offsets`` (n + 1 byte offsets into ``thumbs.bin``);
* ``thumbs.bin`` — one small JPEG per sample (longest side ``THUMB_PX``), concatenated: search
  pages show thumbnails without reading the shards again, which may be remote or gone;
* ``manifest.json`` — written last: the encoder (resolved spec and weights fingerprint), the
  index choice, the read statistics, and the size of every file above. Without it DIR is not an
  index; an existing manifest is removed before a rebuild starts, so a killed rebuild never
  passes for a complete index.

Damaged samples are skipped and counted by the shard reader (:mod:`megaclass.data.reader`), as
in the eval stage; the counts are printed and kept in the manifest.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megaclass.clustering.faiss_import import import_faiss
from megaclass.core.atomic import atomic_path, write_json_atomic
from megaclass.core.errors import UserError
from megaclass.data.reader import iter_samples
from megaclass.data.shards import expand_shards
from megaclass.data.stats import SampleStats
from megaclass.pipelines.config import RunConfig
from megaclass.pipelines.eval import (
    EncoderEntry,
    LoadedEncoder,
    load_encoder_for_eval,
    parse_encoder_spec,
)
from megaclass.pipelines.retrieval import resolve_device
from PIL import Image

log = logging.getLogger(__name__)

FORMAT = "megaclass-index"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
SAMPLES_FILE = "samples.npz"
THUMBS_FILE = "thumbs.bin"
DATA_FILES = (INDEX_FILE, SAMPLES_FILE, THUMBS_FILE)
THUMB_PX = 128
"""Longest side of the stored thumbnails (JPEG quality ``THUMB_QUALITY``)."""
THUMB_QUALITY = 80
DEFAULT_FLAT_MAX = 500_000
"""Up to this many vectors the index is exact (flat); above it IVF. A flat search reads every
stored vector for each batch of queries (1 GB at 500k × 512-d), fine for looking at results."""
IVF_POINTS_PER_LIST = 39
"""faiss's k-means wants at least this many training points per list; nlist is capped so."""
IVF_TRAIN_PER_LIST = 256
"""The IVF quantizer is trained on at most this many sampled vectors per list."""


class SearchIndexError(UserError, ValueError):
    """Unusable index input or index folder; the message names the option, file or key."""


# --------------------------------------------------------------------------------------
# choosing the index
# --------------------------------------------------------------------------------------


def choose_index(
    n: int, flat_max: int = DEFAULT_FLAT_MAX, nlist: int | None = None, nprobe: int | None = None
) -> dict[str, Any]:
    """The index for ``n`` vectors: flat when ``n <= flat_max``, else IVF with ``nlist ≈ 4·√n``
    (capped at n/39, faiss's minimum training points per list; a given ``nlist`` only at n) and
    ``nprobe ≈ nlist/16`` (at least 8, at most nlist), with the reason in words."""
    if n <= flat_max:
        return {
            "type": "flat",
            "reason": f"{n} vectors <= flat_max {flat_max}: exact inner-product search",
        }
    auto = nlist is None
    if auto:  # capped so that k-means has its minimum training points per list
        nlist = min(int(round(4 * math.sqrt(n))), n // IVF_POINTS_PER_LIST)
    nlist = max(1, min(int(nlist), n))
    if nprobe is None:
        nprobe = max(8, nlist // 16)
    nprobe = max(1, min(int(nprobe), nlist))
    return {
        "type": "ivf",
        "nlist": nlist,
        "nprobe": nprobe,
        "reason": f"{n} vectors > flat_max {flat_max}: IVF-Flat with nlist={nlist}"
        + (" (≈ 4·√n)" if auto else "")
        + f", nprobe={nprobe} (approximate; raise nprobe for more recall)",
    }


def build_faiss_index(x: np.ndarray, choice: dict[str, Any], seed: int = 0) -> Any:
    """A faiss index over the unit rows ``x`` as ``choice`` says (IVF: quantizer trained on a
    seeded sample of at most ``IVF_TRAIN_PER_LIST · nlist`` rows)."""
    faiss = import_faiss()

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    if choice["type"] == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = choice["nlist"]
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        n_train = min(len(x), IVF_TRAIN_PER_LIST * nlist)
        rows = np.sort(np.random.default_rng(seed).choice(len(x), n_train, replace=False))
        index.train(x[rows])
        index.nprobe = choice["nprobe"]
        choice["train_sample"] = int(n_train)
    index.add(x)
    return index


# --------------------------------------------------------------------------------------
# embedding a shard set
# --------------------------------------------------------------------------------------


def thumbnail_jpeg(img: Image.Image, px: int = THUMB_PX) -> bytes:
    """A JPEG of ``img`` whose longest side is at most ``px`` (RGB)."""
    t = img.convert("RGB")
    t.thumbnail((px, px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return buf.getvalue()


@dataclasses.dataclass
class Embedded:
    """What one pass over the shards produced (vectors plus one entry per kept sample)."""

    x: np.ndarray
    keys: list[str]
    captions: list[str]
    classes: list[str]
    shard: list[int]
    members: list[str]
    thumb_offsets: list[int]
    stats: SampleStats
    seconds: float


def embed_shards(
    urls: list[str],
    enc: LoadedEncoder,
    thumbs_out: io.BufferedWriter,
    class_field: str,
    max_pixels: int,
    batch_size: int,
) -> Embedded:
    """Embed every good sample of ``urls`` with ``enc``; thumbnails go to ``thumbs_out``.

    The progress bar counts shards (so its ETA is the set's) and shows images/s."""
    from tqdm.auto import tqdm

    stats = SampleStats()
    out = Embedded(np.zeros((0, 0), np.float32), [], [], [], [], [], [0], stats, 0.0)
    chunks: list[np.ndarray] = []
    batch: list[Image.Image] = []
    t0 = time.perf_counter()

    def flush() -> None:
        x = torch.stack([enc.transform(img) for img in batch])
        chunks.append(np.asarray(enc.encode(x), dtype=np.float32))
        batch.clear()

    bar = tqdm(total=len(urls), desc="index embed", unit="shard", dynamic_ncols=True, mininterval=1)
    try:
        for si, url in enumerate(urls):
            for s in iter_samples(url, stats, max_pixels=max_pixels, decode=True):
                cls = s.meta.get(class_field) if isinstance(s.meta, dict) else None
                out.keys.append(s.key)
                out.captions.append(s.caption)
                out.classes.append("" if cls is None else str(cls))
                out.shard.append(si)
                out.members.append(f"{s.key}.{s.image_ext}" if s.image_ext else s.key)
                jpg = thumbnail_jpeg(s.image)
                thumbs_out.write(jpg)
                out.thumb_offsets.append(out.thumb_offsets[-1] + len(jpg))
                batch.append(s.image)
                if len(batch) >= batch_size:
                    flush()
            bar.update(1)
            rate = len(out.keys) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{len(out.keys)} img, {rate:.1f} img/s", refresh=False)
        if batch:
            flush()
    finally:
        bar.close()
    out.seconds = time.perf_counter() - t0
    out.x = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return out


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------


def encoder_record(spec: EncoderEntry) -> dict[str, Any]:
    """The resolved encoder as the manifest keeps it (paths absolute), for search to reload."""
    rec = dataclasses.asdict(spec)
    for k in ("path", "pretrained"):
        v = rec.get(k)
        if v and Path(v).expanduser().exists():
            rec[k] = str(Path(v).expanduser().resolve())
    return rec


def encoder_from_record(rec: dict[str, Any]) -> EncoderEntry:
    """The :class:`EncoderEntry` of a manifest (fields unknown to this version are ignored)."""
    names = {f.name for f in dataclasses.fields(EncoderEntry)}
    return EncoderEntry(**{k: v for k, v in rec.items() if k in names})


def build_index(
    cfg: RunConfig,
    encoder: str,
    shards: str,
    out: str | Path,
    *,
    flat_max: int = DEFAULT_FLAT_MAX,
    nlist: int | None = None,
    nprobe: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Embed ``shards`` with ``encoder`` and write the index folder ``out``; returns the manifest."""
    faiss = import_faiss()
    import megaclass

    out = Path(out)
    if flat_max < 0:
        raise SearchIndexError(f"--flat-max must be >= 0, got {flat_max}")
    for name, v in (("--nlist", nlist), ("--nprobe", nprobe)):
        if v is not None and v < 1:
            raise SearchIndexError(f"{name} must be >= 1, got {v}")
    bs = int(batch_size or cfg.eval.batch_size)
    if bs < 1:
        raise SearchIndexError(f"--batch-size must be >= 1, got {bs}")
    if (out / MANIFEST).exists() and not force:
        raise SearchIndexError(
            f"{out} already holds an index ({MANIFEST}); pass --force to rebuild it"
        )
    if out.exists() and not out.is_dir():
        raise SearchIndexError(f"--out {out}: exists and is not a folder")
    urls = expand_shards(shards)
    if not urls:
        raise SearchIndexError(f"--shards {shards!r}: no shards")
    # paths made absolute first: search reloads the encoder from the manifest, from any folder,
    # and compares its fingerprint with the one recorded here
    spec = encoder_from_record(encoder_record(parse_encoder_spec(encoder, cfg)))
    seed = cfg.seed if seed is None else int(seed)
    dev = resolve_device(device or cfg.eval.device)

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on DIR is not a complete index
    t_start = time.perf_counter()
    enc = load_encoder_for_eval(spec, dev)
    log.info("index: loaded %s (%s) on %s", spec.name, spec.spec, dev)
    with atomic_path(out / THUMBS_FILE) as tmp, open(tmp, "wb") as f:
        emb = embed_shards(urls, enc, f, cfg.data.class_field, cfg.data.max_image_pixels, bs)
    n = len(emb.keys)
    if n == 0:
        raise SearchIndexError(
            f"--shards {shards!r}: no readable sample in {len(urls)} shard(s) "
            f"({emb.stats.summary()})"
        )
    x = emb.x
    choice = choose_index(n, flat_max, nlist, nprobe)
    print(f"megaclass index: {choice['reason']}")
    t0 = time.perf_counter()
    index = build_faiss_index(x, choice, seed)
    build_s = time.perf_counter() - t0
    with atomic_path(out / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(out / SAMPLES_FILE, suffix=".npz") as tmp:
        np.savez(
            tmp,
            keys=np.asarray(emb.keys, dtype=str),
            captions=np.asarray(emb.captions, dtype=str),
            classes=np.asarray(emb.classes, dtype=str),
            shard=np.asarray(emb.shard, dtype=np.int32),
            members=np.asarray(emb.members, dtype=str),
            thumb_offsets=np.asarray(emb.thumb_offsets, dtype=np.int64),
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "megaclass_version": megaclass.__version__,
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "n": n,
        "dim": int(x.shape[1]),
        "metric": "inner_product",
        "index": {**choice, "flat_max": flat_max, "seed": seed},
        "encoder": encoder_record(spec),
        "encoder_fingerprint": spec.fingerprint(),
        "shards": urls,
        "shards_spec": shards,
        "class_field": cfg.data.class_field,
        "max_image_pixels": cfg.data.max_image_pixels,
        "thumb_px": THUMB_PX,
        "read": emb.stats.as_dict(),
        "embed_seconds": round(emb.seconds, 3),
        "images_per_s": round(n / max(emb.seconds, 1e-9), 2),
        "build_seconds": round(build_s, 3),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "files": {name: (out / name).stat().st_size for name in DATA_FILES},
    }
    write_json_atomic(out / MANIFEST, manifest)  # last: DIR is an index from here on
    skipped = emb.stats.total_skipped
    print(
        f"megaclass index: {n} images from {len(urls)} shard(s) with {spec.name} "
        f"({x.shape[1]}-d) at {manifest['images_per_s']} images/s; "
        f"{skipped} sample(s) skipped"
        + (f" ({emb.stats.summary()})" if skipped else "")
        + f"; wrote {out}"
    )
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a complete index folder; a folder without one, or whose files do not
    match it (a copy cut short, a rebuild in progress), is refused with what to do."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SearchIndexError(f"{folder}: no such index folder (build one with `megaclass index`)")
    if not path.is_file():
        raise SearchIndexError(
            f"{folder}: not a complete index (no {MANIFEST}: never finished or being rebuilt); "
            "run `megaclass index` again"
        )
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{path}: unreadable ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SearchIndexError(f"{path}: not a megaclass index manifest")
    if int(m.get("version", 0)) > VERSION:
        raise SearchIndexError(
            f"{path}: index format version {m.get('version')} is newer than this megaclass"
        )
    for name, size in (m.get("files") or {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            raise SearchIndexError(
                f"{f}: missing or of another size than its manifest says ({size} bytes); "
                "the index folder is incomplete, run `megaclass index` again"
            )
    return m
