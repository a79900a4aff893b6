"""The embed stage's decode side: one input shard -> its samples, cut into fixed chunks.

:func:`decode_shard` runs in Ray Data ``flat_map`` tasks on CPUs: it reads a shard's tar in
order, decodes the images, applies the teacher's own preprocessing and cuts the shard into
chunks of ``embed.batch_size`` consecutive samples. The chunk boundaries depend on the shard
alone (never on which Ray blocks arrived first), which is what makes every vector a function of
its shard and a restarted run byte-identical; see docs/architecture.md ("embed").

Decoding never raises into Ray: a failed read becomes an error row that the driver retries in a
later pass, so one bad shard cannot end the execution for the others. Bad samples never reach
the teacher or the writer: the reader skips and counts them (undecodable or unsupported images,
keys and json that no UTF-8 writer accepts, oversized json; ``data/reader.py``). A decode task
that dies (a crash in a native decoder) is retried by Ray a bounded number of times and reported
to the pass's crash ledger (``embed_actor.py``). The functions are module level so that Ray can
ship them to its workers by reference.

:func:`input_signatures` stats the input shards for the restart check on a thread pool: one
``stat`` after another took minutes at start-up on object storage at 41,456 shards.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from megaclass.data.reader import DEFAULT_MAX_CAPTION_BYTES, DEFAULT_MAX_JSON_BYTES
from megaclass.data.stats import SampleStats
from megaclass.pipelines.embed_actor import TeacherSpec, ledger_finish, ledger_start

logger = logging.getLogger(__name__)

# Skip reasons that mean "the shard could not be read", not "a sample was bad": such a shard is
# retried and then reported as failed instead of being recorded as done with zero rows.
SHARD_FAILURE_REASONS = ("unreadable_shard",)


def input_signature(url: str) -> dict[str, Any]:
    """Identity of an input shard for the restart check: size and mtime where they can be had.

    Local files use ``os.stat``; other fsspec URLs use the filesystem's ``info`` (size plus
    whichever modification stamp the backend reports); ``pipe:`` commands only have their URL.
    """
    sig: dict[str, Any] = {"url": url}
    if url.startswith("pipe:"):
        return sig
    try:
        if "://" not in url or url.startswith("file://"):
            st = os.stat(
                os.path.expanduser(url[len("file://") :] if url.startswith("file://") else url)
            )
            sig.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url)
            info = fs.info(path)
            sig["size"] = info.get("size")
            for k in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag"):
                if k in info:
                    sig[k] = str(info[k])
    except (OSError, ValueError, ImportError) as e:
        sig["error"] = f"{type(e).__name__}: {e}"
    return sig


SIGNATURE_THREADS = 32
"""Concurrent ``stat`` calls of :func:`input_signatures` (object stores answer each in ~10 ms)."""


def input_signatures(urls: list[str], threads: int = SIGNATURE_THREADS) -> list[dict[str, Any]]:
    """:func:`input_signature` of every URL, in order, ``threads`` at a time.

    Why threads: each call is one round trip (a local ``stat``, an object store's ``HEAD``) that
    waits on I/O, and the stage needs them all before it knows which shards are done.
    """
    if len(urls) <= 1 or threads <= 1:
        return [input_signature(u) for u in urls]
    with ThreadPoolExecutor(min(threads, len(urls)), thread_name_prefix="stat") as pool:
        return list(pool.map(input_signature, urls))


_TRANSFORMS: dict[tuple, Any] = {}


def _transform_for(spec: TeacherSpec) -> Any:
    key = (spec.image_teacher, spec.pretrained, spec.image_size)
    if key not in _TRANSFORMS:
        from megaclass.training.teachers import build_image_transform

        _TRANSFORMS[key] = build_image_transform(
            spec.image_teacher, spec.pretrained, spec.image_size
        )
    return _TRANSFORMS[key]


def _chunk_row(url: str, stem: str, idx: int, items: list[dict], pixels: list) -> dict[str, Any]:
    if pixels:
        arr = np.stack([p.numpy() for p in pixels]).astype(np.float32, copy=False)
    else:
        arr = np.zeros((0,), np.float32)
    meta = {k: [it[k] for it in items] for k in ("key", "caption", "class", "json")}
    return {
        "stem": stem,
        "url": url,
        "chunk": idx,
        "final": False,
        "n": len(items),
        "shape": json.dumps(list(arr.shape)),
        "pixels": arr.tobytes(),
        "meta": json.dumps(meta, ensure_ascii=False),
        "stats": "",
        "error": "",
        "retryable": True,
        "read_attempts": 1,
        "decode_s": 0.0,
    }


def _decode_once(
    url: str,
    stem: str,
    spec: TeacherSpec,
    max_pixels: int,
    class_field: str,
    max_caption_bytes: int,
    max_json_bytes: int,
) -> Iterator[dict[str, Any]]:
    """One read of a shard: its chunks in order, the last one with the stats; raises on failure."""
    from megaclass.data.reader import iter_samples

    stats = SampleStats()
    t_busy = 0.0
    t0 = time.perf_counter()
    idx = 0
    items: list[dict] = []
    pixels: list = []
    transform = _transform_for(spec)
    samples = iter_samples(
        url,
        stats,
        max_pixels=max_pixels,
        max_caption_bytes=max_caption_bytes,
        max_json_bytes=max_json_bytes,
    )
    for s in samples:
        try:
            x = transform(s.image)
        except Exception as e:  # an image PIL opened but the transform cannot use
            stats.skip("undecodable_image", url, s.key, f"transform: {type(e).__name__}: {e}")
            stats.kept -= 1
            continue
        cls = s.meta.get(class_field) if isinstance(s.meta, dict) else None
        items.append(
            {
                "key": s.key,
                "caption": s.caption,
                "class": None if cls is None else str(cls),
                "json": json.dumps(s.meta, ensure_ascii=False),
            }
        )
        pixels.append(x)
        if len(items) == spec.batch_size:
            out = _chunk_row(url, stem, idx, items, pixels)
            t_busy += time.perf_counter() - t0
            yield out
            t0 = time.perf_counter()
            idx, items, pixels = idx + 1, [], []
    failures = {r: n for r, n in stats.skipped.items() if r in SHARD_FAILURE_REASONS}
    if failures:
        detail = "; ".join(
            ex["detail"] for ex in stats.examples if ex["reason"] in SHARD_FAILURE_REASONS
        )
        raise OSError(f"{url}: unreadable ({detail or failures})")
    out = _chunk_row(url, stem, idx, items, pixels)
    out["final"] = True
    out["stats"] = json.dumps(stats.as_dict())
    out["decode_s"] = t_busy + time.perf_counter() - t0
    yield out


def decode_shard(
    row: dict[str, Any],
    spec: TeacherSpec,
    max_pixels: int,
    class_field: str,
    max_attempts: int = 1,
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
    ledger: Any = None,
) -> Iterator[dict[str, Any]]:
    """Read one shard in tar order and yield its chunks; the last one carries the shard's stats.

    Never raises. A read that fails before its first chunk (a shard that cannot be opened, a
    ``pipe:`` that dies at once) is retried right here, with a short backoff, up to
    ``max_attempts`` reads; a failure after chunks went out ends the shard with an error row
    marked ``retryable`` so that the driver re-reads it in a later pass. ``ledger`` (the pass's
    :class:`~megaclass.pipelines.embed_actor.CrashLedger`) hears of the task before it reads.
    """
    import torch

    torch.set_num_threads(1)
    url, stem = str(row["url"]), str(row["stem"])
    ledger_start(ledger, "decode", stem, -1)
    for attempt in range(1, max_attempts + 1):
        emitted = False
        try:
            for out in _decode_once(
                url, stem, spec, max_pixels, class_field, max_caption_bytes, max_json_bytes
            ):
                emitted = True
                out["read_attempts"] = attempt
                yield out
            ledger_finish(ledger)
            return
        except Exception as e:
            logger.debug("decode of %s failed:\n%s", url, traceback.format_exc())
            if emitted or attempt == max_attempts:
                err = _chunk_row(url, stem, 0, [], [])
                err.update(
                    final=True,
                    error=f"decode: {type(e).__name__}: {e}",
                    retryable=emitted,
                    read_attempts=attempt,
                )
                yield err
                ledger_finish(ledger)
                return
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
