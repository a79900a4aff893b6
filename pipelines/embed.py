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

This module is the stage: the Ray dataset, the passes and retries, the ``_done`` records,
bring-your-own embeddings and the summary. The parts that run elsewhere or that other stages
share live apart: decoding in ``embed_decode.py``, the teacher actor (and :class:`TeacherSpec`,
what the vectors depend on) in ``embed_actor.py``, both at module level so that Ray ships them to
its workers by reference; the files of the embeddings folder are written by
``data/embeddings.py``, next to their reader, so the format has one owner.

Why chunks rather than Ray's own batching: Ray Data forms batches from whatever blocks arrive
first, so a sample's neighbours in a forward pass (and with them the last bits of its vector on
CPU kernels) would depend on timing. A chunk holds consecutive samples of one shard, always cut
at the same places, so every vector is a function of the shard alone: a killed and restarted run
writes byte-identical files, and the Ray output equals a plain loop with the same batch size.

Failures stay per shard: decode and teacher errors become error rows, a shard that could not
be read or whose chunks did not all arrive is retried ``embed.max_retries`` times in further
passes, and then reported in ``RUN/embed/_FAILED.json`` and an :class:`EmbedError` -- after
every other shard has been written. Bad samples are skipped and counted by the reader (and by
the decode tasks, when the teacher's transform rejects an image) into each shard's ``_done``
record and the stage summary.

Writing is per shard too: a shard's files are written all or nothing (``write_embeddings_shard``)
and its ``_done`` record last; a write that fails (a full disk, ENOSPC) fails that shard alone,
with the error as its reason and no file of it left, and is not retried in this run (the
next run does it again).

Crashes: a process that dies (native crash, OOM kill) cannot send an error row. Ray restarts a
teacher actor and retries its chunk, and retries a decode task, at most
``embed.actor_crash_retries`` times (Ray's own defaults are unlimited: one poisonous chunk would
be retried forever); then the pass ends with Ray's error (``max_errored_blocks`` stays 0: with
errors ignored, Ray Data 2.x waits forever on an actor pool whose actors are dead for good).
The pass's :class:`~megaclass.pipelines.embed_actor.CrashLedger` names the shard whose work was
running at every crash: that shard is reported failed at once, and the other unfinished shards
run again in the next pass without being charged a retry. When no shard can be named, every
unfinished shard is charged, as for any other error.

Bring your own embeddings: with ``embed.embeddings_dir`` set, that folder (LAION's layout) is
validated and recorded in ``RUN/embed/_SUCCESS.json``; nothing is embedded, and the cluster
stage reads ``embed.embeddings_dir`` instead of ``RUN/embed``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from megaclass.core.atomic import write_json_atomic
from megaclass.core.errors import UserError
from megaclass.core.rundir import RunDir
from megaclass.data.embeddings import (
    remove_embeddings_shard,
    validate_embeddings_dir,
    write_embeddings_shard,
)
from megaclass.data.stats import SampleStats
from megaclass.pipelines.config import RunConfig, write_run_config
from megaclass.pipelines.embed_actor import (
    CrashLedger,
    TeacherActor,
    TeacherSpec,
    actor_threads,
    crash_plan,
    fault_plan,
)
from megaclass.pipelines.embed_decode import decode_shard, input_signatures
from megaclass.pipelines.ray_session import connect_ray

logger = logging.getLogger(__name__)

# Ray Data block size while embedding: smaller than one chunk of pixels, so every chunk travels
# as its own block (streams to the actors as soon as it is decoded).
BLOCK_BYTES = 1 << 20

# Fault injection for the tests of the write path: ``MEGACLASS_EMBED_WRITE_FAULT=
# "<stem>:<file>[,…]"`` makes writing <file> (img_emb, text_emb, metadata or _done) of shard
# <stem> raise OSError(ENOSPC), as a full disk would. The driver writes, so the driver reads it.
WRITE_FAULT_ENV = "MEGACLASS_EMBED_WRITE_FAULT"
WRITE_FILES = ("img_emb", "text_emb", "metadata", "_done")


class EmbedError(UserError, RuntimeError):
    """Some shards could not be embedded after all retries; the message names them."""


def write_fault_plan() -> dict[str, str]:
    """:data:`WRITE_FAULT_ENV` as ``{stem: file}`` (empty when unset)."""
    spec = os.environ.get(WRITE_FAULT_ENV, "").strip()
    plan: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        stem, _, what = item.rpartition(":")
        if not stem or what not in WRITE_FILES:
            raise ValueError(
                f"{WRITE_FAULT_ENV}={spec!r}: expected '<stem>:<file>[,…]' with <file> one of "
                f"{', '.join(WRITE_FILES)}"
            )
        plan[stem] = what
    return plan


def _write_hook(stem: str, plan: dict[str, str]) -> Callable[[str], None]:
    """Called before each file of ``stem`` is written; raises ENOSPC where the plan says so."""

    def hook(what: str) -> None:
        if plan.get(stem) == what:
            raise OSError(
                errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: {WRITE_FAULT_ENV})"
            )

    return hook


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
    exhausted: bool = False  # another pass would not help (reads spent, write error, crash)
    charged: bool = True  # this pass counts as one of the shard's attempts
    first_seen: float = 0.0

    def complete(self) -> bool:
        return self.n_chunks is not None and len(self.chunks) == self.n_chunks and not self.error


def _stack(chunks: list[dict[str, Any]], col: str, dim_col: str) -> np.ndarray:
    dim = int(chunks[0][dim_col])
    parts = [np.frombuffer(c[col], np.float32).reshape(int(c["n"]), dim) for c in chunks]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def write_shard(
    embed_dir: Path,
    p: _Pending,
    spec: TeacherSpec,
    signature: dict[str, Any],
    attempt: int,
    write_faults: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write one shard's arrays and metadata (all or nothing), then its ``_done`` record.

    Raises on any failure, leaving no file and no record of the shard: an older version's
    record is removed before anything is written (it must not vouch for a mix of files), and
    the files are removed when the record cannot be written.
    """
    hook = _write_hook(p.stem, write_faults or {})
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
    txt = _stack(chunks, "txt", "txt_dim") if spec.has_text else None
    columns = {
        "key": meta["key"],
        "shard": [p.url] * n,
        "caption": meta["caption"],
        "class": meta["class"],
        "json": meta["json"],
    }
    RunDir.done_path(embed_dir, p.stem).unlink(missing_ok=True)
    write_embeddings_shard(embed_dir, p.stem, img, txt, columns, before_file=hook)
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
        "text_dim": None if txt is None else int(txt.shape[1]),
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
    try:
        hook("_done")
        RunDir.write_done(embed_dir, p.stem, record)
    except BaseException:
        remove_embeddings_shard(embed_dir, p.stem)
        raise
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
    cfg: RunConfig,
    spec: TeacherSpec,
    shards: list[tuple[str, str]],
    attempt: int = 1,
    ledger: Any = None,
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
            "max_caption_bytes": cfg.data.max_caption_bytes,
            "max_json_bytes": cfg.data.max_json_bytes,
            "ledger": ledger,
        },
        num_cpus=e.num_cpus_per_decoder,
        max_retries=e.actor_crash_retries,  # Ray Data's default: -1, forever
    )
    return ds.map_batches(
        TeacherActor,
        fn_constructor_kwargs={
            "spec": spec,
            "num_threads": actor_threads(e.num_cpus_per_actor),
            "use_gpu": e.num_gpus_per_actor > 0,
            "attempt": attempt,
            "faults": fault_plan(),
            "crashes": crash_plan(),
            "ledger": ledger,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=e.concurrency),
        num_cpus=e.num_cpus_per_actor,
        num_gpus=e.num_gpus_per_actor or None,
        zero_copy_batch=True,
        # Ray Data's defaults are -1 (forever) for both: a chunk that kills its actor
        max_restarts=e.actor_crash_retries,
        max_task_retries=e.actor_crash_retries,
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
) -> dict[str, tuple[str, bool, bool]]:
    """One Ray Data execution over ``todo``; writes finished shards.

    Returns ``{stem: (error, retry, charged)}`` for the shards that did not finish: ``retry``
    is False when another pass would not help (the decode task already retried the read, the
    write failed, the shard crashed its workers); ``charged`` is False for a shard that only
    lost its work because another shard's crash ended the pass.
    """
    import ray
    from ray.data import DataContext

    pending = {stem: _Pending(url, stem) for url, stem in todo}
    write_faults = write_fault_plan()
    ledger = ray.remote(num_cpus=0)(CrashLedger).remote()
    ctx = DataContext.get_current()
    saved = (ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.target_max_block_size)
    # 0, Ray's default: a lost block ends the pass (see the module docstring); shards whose
    # own work failed arrive as error rows instead
    ctx.max_errored_blocks = 0
    ctx.enable_progress_bars = False
    # Stream chunk by chunk: with Ray's default (128 MiB) a decode task would hand over a whole
    # shard as one block, so the actor waits for the shard's last image before its first
    # forward pass, and the pipeline fills and drains shard by shard.
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        ds = _build_dataset(cfg, spec, todo, attempt, ledger)
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
                try:
                    rec = write_shard(embed_dir, p, spec, signatures[stem], attempt, write_faults)
                except Exception as e:  # this shard's files only: full disk, refused value …
                    logger.warning("embed: writing %s failed: %s", p.url, e, exc_info=True)
                    p.error = f"write: {type(e).__name__}: {e}"
                    p.exhausted = True  # a full disk stays full: the next run retries it
                    p.chunks.clear()
                    continue
                del pending[stem]
                totals["rows"] += rec["rows"]
                bar.update(1)
            elapsed = max(time.perf_counter() - totals["t0"], 1e-9)
            bar.set_postfix_str(f"{totals['samples'] / elapsed:.1f} samples/s", refresh=False)
    except Exception as e:  # the whole execution died (a crash past its retries, lost node …)
        _blame(pending, e, _crashed(ledger), cfg.embed.actor_crash_retries, attempt)
    finally:
        ctx.max_errored_blocks, ctx.enable_progress_bars, ctx.target_max_block_size = saved
        try:
            ray.kill(ledger)
        except Exception as e:
            logger.debug("embed: crash ledger: %s", e)
    out = {}
    for stem, p in pending.items():
        n = p.n_chunks if p.n_chunks is not None else "?"
        err = p.error or f"incomplete: {len(p.chunks)} of {n} chunks arrived"
        out[stem] = (err, not p.exhausted, p.charged)
    return out


def _crashed(ledger: Any) -> dict[str, tuple[str, int, int]]:
    """The ledger's shards whose work crashed a process ({} when it cannot tell)."""
    import ray

    try:
        return dict(ray.get(ledger.crashed.remote(), timeout=60))
    except Exception as e:
        logger.warning("embed: crash ledger unreadable (%s): every unfinished shard is charged", e)
        return {}


def _blame(
    pending: dict[str, _Pending],
    error: Exception,
    crashed: dict[str, tuple[str, int, int]],
    crash_retries: int,
    attempt: int,
) -> None:
    """After a pass died: the shards that crashed fail for good, the others' work is void.

    An unfinished shard that crashed nothing and had no error of its own is not charged when
    a culprit is known (it only lost its place in the pass); without one (a crash on the first
    attempt with ``actor_crash_retries`` 0, a lost node), every unfinished shard is charged
    with Ray's error, as before.
    """
    logger.warning("embed pass %d aborted: %s", attempt, error)
    crashed = {stem: c for stem, c in crashed.items() if stem in pending}
    for p in pending.values():
        p.chunks.clear()
        if p.stem in crashed:
            where, chunk, deaths = crashed[p.stem]
            unit = "decoding the shard" if where == "decode" else f"embedding chunk {chunk}"
            p.error = (
                f"crash: the {where} process died while {unit}, on the first attempt and on "
                f"{deaths} retr{'y' if deaths == 1 else 'ies'} (embed.actor_crash_retries="
                f"{crash_retries}): it exited without a Python error (a crash in native code, "
                "the OOM killer, an exit)"
            )
            p.exhausted, p.charged = True, True
            logger.warning("embed: %s failed: %s", p.url, p.error)
        elif p.error:
            continue  # failed on its own before the end of the pass
        elif crashed:
            p.error = f"pass {attempt} ended by the crash of {', '.join(sorted(crashed))}"
            p.charged = False
        else:
            p.error = f"ray: {type(error).__name__}: {error}"


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
        "noted": d["noted"],  # kept samples changed or members left out (data/stats.py NOTES)
    }


def _run_byo(cfg: RunConfig, embed_dir: Path) -> dict[str, Any]:
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
        msg = (
            f"embed: {len(failed)} shard(s) failed (up to {attempts} attempt(s) each): "
            + "; ".join(f"{url}: {err}" for url, err in sorted(failed.items()))
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
    from megaclass.training.teachers import check_teacher_names, teacher_weights_record
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    rd = RunDir(cfg.run_dir)
    write_run_config(rd, cfg, force)
    embed_dir = rd.embed
    embed_dir.mkdir(parents=True, exist_ok=True)
    (embed_dir / "_SUCCESS.json").unlink(missing_ok=True)
    if cfg.embed.embeddings_dir:
        return _run_byo(cfg, embed_dir)

    if cfg.embed.batch_size < 1:
        raise ValueError(f"embed.batch_size must be >= 1, got {cfg.embed.batch_size}")
    if cfg.embed.actor_crash_retries < 0:
        raise ValueError(
            f"embed.actor_crash_retries must be >= 0, got {cfg.embed.actor_crash_retries}"
        )
    spec = TeacherSpec.from_config(cfg)
    # names, and no open_clip teacher without weights unless asked for (embed.allow_random_teacher)
    check_teacher_names(
        spec.image_teacher, spec.text_teacher, cfg.embed.pretrained, cfg.embed.allow_random_teacher
    )
    # which weights the vectors come from (a tag, a file and its sha256, shipped, random)
    weights = {"image": teacher_weights_record(spec.image_teacher, spec.pretrained)}
    weights["text"] = (
        weights["image"]
        if spec.text_teacher == spec.image_teacher
        else teacher_weights_record(spec.text_teacher, spec.pretrained)
    )
    urls = expand_shards(cfg.data.shards)
    stems: dict[str, str] = {}
    for u in urls:
        s = shard_stem(u)
        if s in stems:
            raise ValueError(f"data.shards: shards {stems[s]!r} and {u!r} share the stem {s!r}")
        stems[s] = u
    _remove_stale_temporaries(embed_dir)
    signatures = dict(zip(stems, input_signatures(list(stems.values()))))
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
        started = connect_ray(cfg, log_to_driver=True)
        totals["ray_init_s"] = time.perf_counter() - t_connect
        bar = tqdm(total=len(todo), unit="shard", desc="embed", dynamic_ncols=True)
        try:
            _check_local_cpus(cfg)
            totals["t0"] = time.perf_counter()
            totals["t0_wall"] = time.time()
            remaining = todo
            tries = dict.fromkeys(stems, 0)  # passes charged to each shard
            # each pass charges every unfinished shard, or fails a crashing one for good
            max_passes = cfg.embed.max_retries + 1 + len(todo)
            attempt = 0
            while remaining and attempt < max_passes:
                attempt += 1
                result = _run_pass(
                    cfg, spec, embed_dir, remaining, signatures, attempt, bar, totals
                )
                for stem, (err, _, charged) in result.items():
                    failed[stem] = err
                    tries[stem] += int(charged)
                    logger.warning("embed: %s failed (pass %d): %s", stem, attempt, err)
                for _, stem in remaining:  # this pass's shards that made it
                    if stem not in result:
                        failed.pop(stem, None)
                remaining = [
                    (u, s)
                    for u, s in remaining
                    if s in result and result[s][1] and tries[s] <= cfg.embed.max_retries
                ]
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
        "teacher_weights": weights,
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
