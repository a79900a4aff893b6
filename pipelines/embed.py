"""The embed stage: teacher vectors for every sample, one output file set per input shard.

A Ray Data program::

    from_items(one row per pending shard URL)
      -> flat_map(decode_shard)      CPU tasks: read the tar in order, decode, teacher preprocessing,
                                     cut the shard into chunks of ``embed.batch_size`` samples
      -> map_batches(TeacherActor)   actors holding the frozen teacher (num_gpus / concurrency from
                                     the config), one chunk per forward pass
      -> driver                      reassembles each shard from its chunks and writes
                                     RUN/embed/{img_emb,text_emb}/<stem>.npy, metadata/<stem>.parquet,
                                     then _done/<stem>.json (last, atomically)

Why chunks rather than Ray's own batching: Ray Data forms batches from whatever blocks arrive
first, so a sample's neighbours in a forward pass (and with them the last bits of its vector on
CPU kernels) would depend on timing. A chunk holds consecutive samples of one shard, always cut
at the same places, so every vector is a function of the shard alone: a killed and restarted run
writes byte-identical files, and the Ray output equals a plain loop with the same batch size.

Failures stay per shard: decode and teacher errors become error rows (Ray's
``max_errored_blocks`` is lifted as a second line of defence), a shard that could not be read
or whose chunks did not all arrive is retried ``embed.max_retries`` times in further passes,
and then reported in ``RUN/embed/_FAILED.json`` and an :class:`EmbedError` -- after every other
shard has been written. Bad samples are skipped and counted by the reader (and here, when the
teacher's transform rejects an image) into each shard's ``_done`` record and the stage summary.

Bring your own embeddings: with ``embed.embeddings_dir`` set, that folder (LAION's layout) is
validated and recorded in ``RUN/embed/_SUCCESS.json``; nothing is embedded, and the cluster
stage reads ``embed.embeddings_dir`` instead of ``RUN/embed``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.core.atomic import atomic_path, write_json_atomic
from megaclass.core.rundir import RunDir
from megaclass.data.stats import SampleStats
from megaclass.pipelines.config import RunConfig

logger = logging.getLogger(__name__)

# Skip reasons that mean "the shard could not be read", not "a sample was bad": such a shard is
# retried and then reported as failed instead of being recorded as done with zero rows.
SHARD_FAILURE_REASONS = ("unreadable_shard",)
# Ray Data block size while embedding: smaller than one chunk of pixels, so every chunk travels
# as its own block (streams to the actors as soon as it is decoded).
BLOCK_BYTES = 1 << 20


class EmbedError(RuntimeError):
    """Some shards could not be embedded after all retries; the message names them."""


# --------------------------------------------------------------------------------------
# what a shard's output depends on
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines the vectors (besides the input shard)."""

    image_teacher: str
    text_teacher: str
    pretrained: str | None
    image_size: int | None
    batch_size: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TeacherSpec:
        e = cfg.embed
        return cls(e.image_teacher, e.text_teacher, e.pretrained, e.image_size, e.batch_size)

    @property
    def has_text(self) -> bool:
        return self.text_teacher != "none"


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


# --------------------------------------------------------------------------------------
# decode: one shard -> chunk rows (runs in Ray tasks)
# --------------------------------------------------------------------------------------

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
    url: str, stem: str, spec: TeacherSpec, max_pixels: int, class_field: str
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
    for s in iter_samples(url, stats, max_pixels=max_pixels):
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
) -> Iterator[dict[str, Any]]:
    """Read one shard in tar order and yield its chunks; the last one carries the shard's stats.

    Never raises. A read that fails before its first chunk (a shard that cannot be opened, a
    ``pipe:`` that dies at once) is retried right here, with a short backoff, up to
    ``max_attempts`` reads; a failure after chunks went out ends the shard with an error row
    marked ``retryable`` so that the driver re-reads it in a later pass.
    """
    import torch

    torch.set_num_threads(1)
    url, stem = str(row["url"]), str(row["stem"])
    for attempt in range(1, max_attempts + 1):
        emitted = False
        try:
            for out in _decode_once(url, stem, spec, max_pixels, class_field):
                emitted = True
                out["read_attempts"] = attempt
                yield out
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
                return
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))


# --------------------------------------------------------------------------------------
# the teacher actor (map_batches callable class)
# --------------------------------------------------------------------------------------


# Fault injection for the retry tests: ``MEGACLASS_EMBED_FAULT="<stem>:<n>[,<stem>:<n>…]"`` makes
# the teacher step raise on every chunk of shard <stem> in passes 1..n (n large: always). Read
# by the driver and handed to the actors, so it works whatever environment Ray's workers have.
EMBED_FAULT_ENV = "MEGACLASS_EMBED_FAULT"


def _fault_plan() -> dict[str, int]:
    spec = os.environ.get(EMBED_FAULT_ENV, "").strip()
    plan: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        stem, _, n = item.rpartition(":")
        if not stem or not n.isdigit():
            raise ValueError(f"{EMBED_FAULT_ENV}={spec!r}: expected '<stem>:<passes>[,…]'")
        plan[stem] = int(n)
    return plan


def actor_threads(num_cpus_per_actor: float) -> int:
    """Torch threads of a teacher actor: its CPU reservation, rounded (at least 1).

    Fractional reservations let a small machine give the actors every core while the decode
    tasks, idle most of the time next to a CPU teacher, keep a small one: on 2 cores one actor
    with 1.5 CPUs runs 2 threads, or two actors with 0.75 CPUs run 1 thread each, next to a
    0.5-CPU decoder (configs/demo.yaml).
    """
    return max(1, int(round(num_cpus_per_actor)))


class TeacherActor:
    """Holds one frozen teacher; each call embeds one chunk (batch_size=1 row of map_batches)."""

    def __init__(
        self,
        spec: TeacherSpec,
        num_threads: int,
        use_gpu: bool,
        attempt: int = 1,
        faults: dict[str, int] | None = None,
    ) -> None:
        t0 = time.time()
        import torch
        from megaclass.training.teachers import load_teacher

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.spec = spec
        self.teacher = load_teacher(
            spec.image_teacher, spec.text_teacher, spec.pretrained, device, spec.image_size
        )
        self.fail_stems = {s for s, n in (faults or {}).items() if attempt <= n}
        self.init_s = time.time() - t0

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        import torch

        out = dict(row)
        out.pop("pixels", None)
        out.update(img=b"", txt=b"", img_dim=self.teacher.image_dim, encode_s=0.0)
        out.update(t_start=time.time(), t_end=0.0, init_s=self.init_s)
        out["txt_dim"] = int(self.teacher.text_dim or 0)
        if row["error"]:
            return out
        try:
            t0 = time.perf_counter()
            if row["stem"] in self.fail_stems:
                raise RuntimeError(f"injected fault ({EMBED_FAULT_ENV})")
            shape = json.loads(row["shape"])
            n = int(row["n"])
            if n:
                x = torch.from_numpy(np.frombuffer(row["pixels"], np.float32).reshape(shape).copy())
                out["img"] = self.teacher.encode_images(x).tobytes()
                if self.spec.has_text:
                    caps = json.loads(row["meta"])["caption"]
                    out["txt"] = self.teacher.encode_texts(caps).tobytes()
            out["encode_s"] = time.perf_counter() - t0
            out["t_end"] = time.time()
        except Exception as e:
            out["error"] = f"teacher: {type(e).__name__}: {e}"
            logger.debug(
                "teacher failed on %s chunk %s:\n%s",
                row["url"],
                row["chunk"],
                traceback.format_exc(),
            )
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["stem"])
        rows = [self._one({k: _scalar(v[i]) for k, v in batch.items()}) for i in range(n)]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


# --------------------------------------------------------------------------------------
# driver side: reassemble shards, write files
# --------------------------------------------------------------------------------------


@dataclass
class _Pending:
    url: str
    stem: str
    chunks: dict[int, dict[str, Any]] = field(default_factory=dict)
    n_chunks: int | None = None
    final: dict[str, Any] | None = None
    error: str = ""
    exhausted: bool = False  # the decode task already spent every read attempt
    first_seen: float = 0.0

    def complete(self) -> bool:
        return self.n_chunks is not None and len(self.chunks) == self.n_chunks and not self.error


def _stack(chunks: list[dict[str, Any]], col: str, dim_col: str) -> np.ndarray:
    dim = int(chunks[0][dim_col])
    parts = [np.frombuffer(c[col], np.float32).reshape(int(c["n"]), dim) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr, allow_pickle=False)


def _save_metadata(path: Path, url: str, meta: dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(meta["key"])
    table = pa.table(
        {
            "key": pa.array(meta["key"], pa.string()),
            "shard": pa.array([url] * n, pa.string()),
            "caption": pa.array(meta["caption"], pa.string()),
            "class": pa.array(meta["class"], pa.string()),
            "json": pa.array(meta["json"], pa.string()),
        }
    )
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def write_shard(
    embed_dir: Path, p: _Pending, spec: TeacherSpec, signature: dict[str, Any], attempt: int
) -> dict[str, Any]:
    """Write one shard's arrays and metadata (atomically), then its ``_done`` record."""
    chunks = [p.chunks[i] for i in range(int(p.n_chunks or 0))]
    meta: dict[str, list] = {"key": [], "caption": [], "class": [], "json": []}
    for c in chunks:
        m = json.loads(c["meta"])
        for k in meta:
            meta[k].extend(m[k])
    img = _stack(chunks, "img", "img_dim")
    n = img.shape[0]
    if n != len(meta["key"]) or len(set(meta["key"])) != n:
        raise EmbedError(f"{p.url}: {n} vectors for {len(meta['key'])} keys (internal error)")
    _save_npy(embed_dir / "img_emb" / f"{p.stem}.npy", img.astype(np.float16))
    text_dim = None
    if spec.has_text:
        txt = _stack(chunks, "txt", "txt_dim")
        text_dim = int(txt.shape[1])
        _save_npy(embed_dir / "text_emb" / f"{p.stem}.npy", txt.astype(np.float16))
    _save_metadata(embed_dir / "metadata" / f"{p.stem}.parquet", p.url, meta)
    assert p.final is not None
    stats = SampleStats.from_dict(json.loads(p.final["stats"]))
    stats.kept = n
    record = {
        "stem": p.stem,
        "shard": p.url,
        "input": signature,
        "teacher": asdict(spec),
        "rows": n,
        "image_dim": int(img.shape[1]),
        "text_dim": text_dim,
        "stats": stats.as_dict(),
        "skipped": dict(stats.skipped),
        "attempt": attempt,
        "read_attempts": int(p.final.get("read_attempts", 1)),
        "timing": {
            "decode_s": round(float(p.final.get("decode_s", 0.0)), 4),
            "encode_s": round(sum(float(c.get("encode_s", 0.0)) for c in chunks), 4),
            "wall_s": round(time.perf_counter() - p.first_seen, 4),
        },
        "written_at": time.time(),
    }
    RunDir.write_done(embed_dir, p.stem, record)
    return record


def done_matches(
    record: dict[str, Any] | None, spec: TeacherSpec, signature: dict[str, Any]
) -> bool:
    """A shard is finished when its record exists for the same input and the same teacher."""
    if not record:
        return False
    return record.get("input") == signature and record.get("teacher") == asdict(spec)


# --------------------------------------------------------------------------------------
# Ray plumbing
# --------------------------------------------------------------------------------------


def _connect_ray(cfg: RunConfig) -> bool:
    """Join ``ray.address`` or start a local Ray; returns whether we started (and must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_memory,
            include_dashboard=False,
            **kwargs,
        )
    return True


def _check_local_cpus(cfg: RunConfig) -> None:
    """On a local Ray, refuse reservations that can never be scheduled (Ray Data would wait forever)."""
    import ray

    if cfg.ray.address or os.environ.get("RAY_ADDRESS", "local") != "local":
        return  # a cluster may scale up; Ray reports what it cannot place
    e = cfg.embed
    need = e.concurrency * e.num_cpus_per_actor + e.num_cpus_per_decoder
    have = float(ray.cluster_resources().get("CPU", 0.0))
    if need > have + 1e-9:
        raise ValueError(
            f"embed: embed.concurrency={e.concurrency} x embed.num_cpus_per_actor="
            f"{e.num_cpus_per_actor} + embed.num_cpus_per_decoder={e.num_cpus_per_decoder} need "
            f"{need:g} CPUs, the local Ray has {have:g} (ray.num_cpus); lower the reservations"
        )


def _build_dataset(
    cfg: RunConfig, spec: TeacherSpec, shards: list[tuple[str, str]], attempt: int = 1
) -> Any:
    import ray.data
    from ray.data import ActorPoolStrategy

    e = cfg.embed
    ds = ray.data.from_items(
        [{"url": u, "stem": s} for u, s in shards], override_num_blocks=len(shards)
    )
    ds = ds.flat_map(
        decode_shard,
        fn_kwargs={
            "spec": spec,
            "max_pixels": cfg.data.max_image_pixels,
            "class_field": cfg.data.class_field,
            "max_attempts": e.max_retries + 1,
        },
        num_cpus=e.num_cpus_per_decoder,
    )
    return ds.map_batches(
        TeacherActor,
        fn_constructor_kwargs={
            "spec": spec,
            "num_threads": actor_threads(e.num_cpus_per_actor),
            "use_gpu": e.num_gpus_per_actor > 0,
            "attempt": attempt,
            "faults": _fault_plan(),
        },
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=e.concurrency),
        num_cpus=e.num_cpus_per_actor,
        num_gpus=e.num_gpus_per_actor or None,
        zero_copy_batch=True,
    )


def _run_pass(
    cfg: RunConfig,
    spec: TeacherSpec,
    embed_dir: Path,
    todo: list[tuple[str, str]],
    signatures: dict[str, dict],
    attempt: int,
    bar: Any,
    totals: dict[str, float],
) -> dict[str, tuple[str, bool]]:
    """One Ray Data execution over ``todo``; writes finished shards.

    Returns ``{stem: (error, exhausted)}`` for the shards that did not finish; ``exhausted``
    means the decode task already retried the read and another pass would not help.
    """
    from ray.data import DataContext

    pending = {stem: _Pending(url, stem) for url, stem in todo}
    ctx = DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.target_max_block_size)
    ctx.max_errored_blocks = -1  # lost blocks show up as incomplete shards and are retried
    ctx.enable_progress_bars = False
    # Stream chunk by chunk: with Ray's default (128 MiB) a decode task would hand over a whole
    # shard as one block, so the actor waits for the shard's last image before its first
    # forward pass, and the pipeline fills and drains shard by shard.
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        ds = _build_dataset(cfg, spec, todo, attempt)
        for row in ds.iter_rows():
            stem = str(row["stem"])
            p = pending.get(stem)
            if p is None:  # already written (cannot happen) or unknown
                continue
            if not p.first_seen:
                p.first_seen = time.perf_counter()
            totals["actor_init_s"] = max(totals["actor_init_s"], float(row["init_s"]))
            if row["t_end"]:  # steady-state clock: the actors' first chunk start to last end
                t_first = totals["t_first"] or float(row["t_start"])
                totals["t_first"] = min(t_first, float(row["t_start"]))
                totals["t_last"] = max(totals["t_last"], float(row["t_end"]))
            if row["error"]:
                p.error = p.error or str(row["error"])
                p.exhausted = p.exhausted or not bool(row["retryable"])
                p.chunks.clear()  # this attempt is void: keep no vectors in memory for it
            elif p.error:
                continue
            else:
                p.chunks[int(row["chunk"])] = row
                totals["samples"] += int(row["n"])
            if row["final"]:
                p.n_chunks = int(row["chunk"]) + 1
                p.final = row
            if p.complete():
                rec = write_shard(embed_dir, p, spec, signatures[stem], attempt)
                del pending[stem]
                totals["rows"] += rec["rows"]
                bar.update(1)
            elapsed = max(time.perf_counter() - totals["t0"], 1e-9)
            bar.set_postfix_str(f"{totals['samples'] / elapsed:.1f} samples/s", refresh=False)
    except Exception as e:  # the whole execution died (actor crash, lost node …)
        logger.warning("embed pass %d aborted: %s", attempt, e)
        for p in pending.values():
            p.error = p.error or f"ray: {type(e).__name__}: {e}"
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.target_max_block_size = saved
    out = {}
    for stem, p in pending.items():
        n = p.n_chunks if p.n_chunks is not None else "?"
        err = p.error or f"incomplete: {len(p.chunks)} of {n} chunks arrived"
        out[stem] = (err, p.exhausted)
    return out


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------


def _summary_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    stats = SampleStats()
    for r in records:
        stats.merge(SampleStats.from_dict(r["stats"]))
    d = stats.as_dict()
    return {
        "rows": sum(int(r["rows"]) for r in records),
        "seen": d["seen"],
        "skipped": d["skipped"],
        "skipped_total": d["skipped_total"],
        "skipped_by_shard": d["skipped_by_shard"],
        "skip_examples": d["examples"],
    }


def _run_byo(cfg: RunConfig, embed_dir: Path) -> dict[str, Any]:
    from megaclass.data.embeddings import validate_embeddings_dir

    path = str(Path(cfg.embed.embeddings_dir).expanduser().resolve())  # type: ignore[arg-type]
    info = validate_embeddings_dir(path)
    summary = {
        "stage": "embed",
        "skipped_stage": True,
        "embeddings_dir": path,
        "reason": "embed.embeddings_dir is set: bring-your-own embeddings, validated, not recomputed",
        "validation": info,
        "rows": info.get("rows"),
        "image_dim": info.get("d_img"),
        "text_dim": info.get("d_txt"),
        "shards": len(info.get("stems", [])),
    }
    write_json_atomic(embed_dir / "_SUCCESS.json", summary)
    logger.info("embed: using bring-your-own embeddings at %s (%s rows)", path, info.get("rows"))
    return summary


def _remove_stale_temporaries(embed_dir: Path) -> None:
    """Half-written ``.tmp-*`` files of a killed run (never read: final names are renamed to)."""
    for sub in ("img_emb", "text_emb", "metadata", "_done"):
        for p in (embed_dir / sub).glob(".tmp-*"):
            p.unlink(missing_ok=True)


def finish_stage(
    embed_dir: Path, summary: dict[str, Any], attempts: int, allow_failed: bool
) -> None:
    """Write the stage's end marker, or refuse to when shards failed (unless allowed).

    With failed shards (``summary["failed"]``: url -> last error) the summary goes to
    ``_FAILED.json`` and :class:`EmbedError` names them; with ``allow_failed`` the stage is
    marked complete anyway and ``_SUCCESS.json`` lists them.
    """
    failed = summary.get("failed") or {}
    if failed:
        write_json_atomic(embed_dir / "_FAILED.json", summary)
        msg = f"embed: {len(failed)} shard(s) failed after {attempts} attempts: " + "; ".join(
            f"{url}: {err}" for url, err in sorted(failed.items())
        )
        if not allow_failed:
            raise EmbedError(
                msg + f" (details in {embed_dir / '_FAILED.json'}; the other shards are written)"
            )
        logger.warning("%s (embed.allow_failed_shards: finishing without them)", msg)
    else:
        (embed_dir / "_FAILED.json").unlink(missing_ok=True)
    write_json_atomic(embed_dir / "_SUCCESS.json", summary)


def embeddings_location(cfg: RunConfig) -> Path:
    """Where the next stage reads embeddings: ``embed.embeddings_dir`` if set, else RUN/embed."""
    if cfg.embed.embeddings_dir:
        return Path(cfg.embed.embeddings_dir).expanduser()
    return RunDir(cfg.run_dir).embed


def run_embed(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Embed every configured shard (resuming), or validate bring-your-own embeddings.

    Returns the stage summary that is also written to ``RUN/embed/_SUCCESS.json``. Raises
    :class:`EmbedError` (after writing every other shard and ``RUN/embed/_FAILED.json``) when
    some shards still fail after ``embed.max_retries`` retries.
    """
    from megaclass.data.shards import expand_shards, shard_stem
    from megaclass.training.teachers import check_teacher_names
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    rd = RunDir(cfg.run_dir)
    rd.write_config(cfg, force)
    embed_dir = rd.embed
    embed_dir.mkdir(parents=True, exist_ok=True)
    (embed_dir / "_SUCCESS.json").unlink(missing_ok=True)
    if cfg.embed.embeddings_dir:
        return _run_byo(cfg, embed_dir)

    if cfg.embed.batch_size < 1:
        raise ValueError(f"embed.batch_size must be >= 1, got {cfg.embed.batch_size}")
    spec = TeacherSpec.from_config(cfg)
    check_teacher_names(spec.image_teacher, spec.text_teacher)
    urls = expand_shards(cfg.data.shards)
    stems: dict[str, str] = {}
    for u in urls:
        s = shard_stem(u)
        if s in stems:
            raise ValueError(f"data.shards: shards {stems[s]!r} and {u!r} share the stem {s!r}")
        stems[s] = u
    _remove_stale_temporaries(embed_dir)
    signatures = {s: input_signature(u) for s, u in stems.items()}
    todo = [
        (u, s)
        for s, u in stems.items()
        if not done_matches(RunDir.read_done(embed_dir, s), spec, signatures[s])
    ]
    logger.info(
        "embed: %d shards, %d already done, %d to embed",
        len(urls),
        len(urls) - len(todo),
        len(todo),
    )

    failed: dict[str, str] = {}
    totals = dict(
        samples=0.0, rows=0.0, t0=time.perf_counter(), t_first=0.0, t_last=0.0, actor_init_s=0.0
    )
    if todo:
        t_connect = time.perf_counter()
        started = _connect_ray(cfg)
        totals["ray_init_s"] = time.perf_counter() - t_connect
        bar = tqdm(total=len(todo), unit="shard", desc="embed", dynamic_ncols=True)
        try:
            _check_local_cpus(cfg)
            totals["t0"] = time.perf_counter()
            totals["t0_wall"] = time.time()
            remaining = todo
            for attempt in range(1, cfg.embed.max_retries + 2):
                result = _run_pass(
                    cfg, spec, embed_dir, remaining, signatures, attempt, bar, totals
                )
                for stem, (err, _) in result.items():
                    failed[stem] = err
                    logger.warning("embed: %s failed (pass %d): %s", stem, attempt, err)
                for _, stem in remaining:  # this pass's shards that made it
                    if stem not in result:
                        failed.pop(stem, None)
                retry = {s for s, (_, exhausted) in result.items() if not exhausted}
                remaining = [(u, s) for u, s in remaining if s in retry]
                if not remaining:
                    break
        finally:
            bar.close()
            if started:
                import ray

                t_stop = time.perf_counter()
                ray.shutdown()
                totals["ray_shutdown_s"] = time.perf_counter() - t_stop

    wall = time.perf_counter() - t_start
    records = [
        r for s in stems if (r := RunDir.read_done(embed_dir, s)) is not None and s not in failed
    ]
    dims = records[0] if records else {}
    summary: dict[str, Any] = {
        "stage": "embed",
        "skipped_stage": False,
        "embeddings_dir": str(embed_dir),
        "teacher": asdict(spec),
        "image_dim": dims.get("image_dim"),
        "text_dim": dims.get("text_dim"),
        "shards": len(urls),
        "shards_done_before": len(urls) - len(todo),
        "shards_embedded": len(todo) - len(failed),
        "shards_failed": len(failed),
        "failed": {stems[s]: err for s, err in failed.items()},
        **_summary_from_records(records),
        "rows_this_run": int(totals["rows"]),
        "wall_s": round(wall, 3),
        "samples_per_s": round(totals["rows"] / wall, 3) if todo else None,
        "samples_per_s_after_startup": (
            round(totals["rows"] / max(time.perf_counter() - totals["t0"], 1e-9), 3)
            if todo
            else None
        ),
        "samples_per_s_steady": (
            round(totals["samples"] / max(totals["t_last"] - totals["t_first"], 1e-9), 3)
            if totals["t_last"] > totals["t_first"]
            else None
        ),
        "timing": {  # where the wall time went (seconds)
            "ray_init": round(totals.get("ray_init_s", 0.0), 3),
            "actor_startup": round(totals["actor_init_s"], 3),
            "first_forward_after": (
                round(totals["t_first"] - totals["t0_wall"], 3) if totals["t_first"] else None
            ),
            "steady": round(max(totals["t_last"] - totals["t_first"], 0.0), 3),
            "ray_shutdown": round(totals.get("ray_shutdown_s", 0.0), 3),
        }
        if todo
        else None,
        "ray": {
            "address": cfg.ray.address,
            "concurrency": cfg.embed.concurrency,
            "threads_per_actor": actor_threads(cfg.embed.num_cpus_per_actor),
        },
    }
    finish_stage(embed_dir, summary, cfg.embed.max_retries + 1, cfg.embed.allow_failed_shards)
    logger.info(
        "embed: %d rows in %d shards (%d embedded now, %.1f samples/s); %s",
        summary["rows"],
        len(urls),
        summary["shards_embedded"],
        summary["samples_per_s"] or 0.0,
        f"skipped {summary['skipped']}" if summary["skipped_total"] else "no samples skipped",
    )
    return summary
