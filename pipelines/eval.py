"""The eval stage: retrieval on held-out classes for the teacher, the student, or any encoder.

``megaclass eval CONFIG`` reads ``data.eval_shards`` (WebDataset shards whose sample json holds
the ground-truth class under ``data.class_field``), embeds every image with each encoder in
``eval.encoders``, and computes the metrics of :mod:`megaclass.pipelines.retrieval` under
``eval.protocol`` on the full features and on the first d dimensions (``eval.compact_dims``):
``all`` (SOP, CUB, Cars: every image queries the others) or ``query_gallery`` (In-Shop: the
samples whose json ``split`` is ``query`` search those whose ``split`` is ``gallery``), or,
with ``eval.protocol=classification``, the kNN and linear probes of
:mod:`megaclass.pipelines.probes` (learn on split ``train``, score ``test``).

Encoder specs (``eval.encoders`` entries; ``label=spec`` names a column, e.g. ``ours=/x/export``):

* ``teacher`` — the embed stage's image teacher (``embed.image_teacher`` / ``embed.pretrained``);
* ``student`` — this run's trained encoder: ``RUN/export/encoder.safetensors``, else the newest
  complete checkpoint under ``RUN/train/ckpt`` (so an unfinished run can be evaluated);
* ``open_clip:<model>`` or ``open_clip:<model>@<pretrained tag or file>`` — an open_clip image
  tower, e.g. ``open_clip:ViT-B-32@RUN/export/open_clip_model.safetensors`` or a ``.pt`` state
  dict; also ``efficientnet-lite0``;
* ``hf:<folder>`` — a Hugging Face vision tower saved with ``save_pretrained`` (MLCD, CLIP,
  SigLIP; offline; see :mod:`megaclass.pipelines.hf_vision` for the class and feature chosen);
* ``<path>@step=<N>`` (also ``student@step=<N>``) — the complete checkpoint of step N of a run
  directory, i.e. ``RUN/train/ckpt/step-000000N`` (which can also be given as a path);
* any other string is a path: an exported ``encoder.safetensors``, a folder holding one, a
  checkpoint folder, or a run directory (see :func:`megaclass.training.export.load_encoder`).

Layout: ``RUN/eval/features/<encoder>.npz`` (float32 unit features, keys, classes, splits) with a record
``RUN/eval/_done/<encoder>.json`` written last, holding a fingerprint of the encoder's weights and
of the eval shards; a re-run reuses features whose fingerprint still matches (a killed eval resumes
per encoder; a retrained student is re-embedded). Then ``RUN/eval/metrics.json`` and, last,
``RUN/eval/_SUCCESS.json``. The teacher-vs-student table is printed at the end.

Samples without a class are skipped and counted (reason ``missing_class``), like every other bad
sample the reader reports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megaclass.core.atomic import atomic_path, write_json_atomic
from megaclass.core.errors import UserError
from megaclass.core.rundir import RunDir
from megaclass.data.reader import iter_samples
from megaclass.data.shards import expand_shards
from megaclass.data.stats import SampleStats
from megaclass.pipelines.config import RunConfig, config_to_dict, write_run_config
from megaclass.pipelines.hf_vision import HF_PREFIX, pick_class, read_hf_config
from megaclass.pipelines.probes import CLASSIFICATION, run_probes
from megaclass.pipelines.retrieval import (
    GALLERY,
    QUERY,
    evaluate_features,
    resolve_device,
    split_query_gallery,
)
from megaclass.training.checkpoint import MARKER, latest_complete, list_checkpoints, step_tag
from megaclass.training.encoders import register_tiny_configs
from megaclass.training.export import ENCODER_FILE, load_encoder
from megaclass.training.teachers import EFFICIENTNET_LITE0, OPEN_CLIP_PREFIX, load_teacher

log = logging.getLogger(__name__)

MISSING_CLASS = "missing_class"
SPLIT_FIELD = "split"
"""Sample json key read for ``eval.protocol=query_gallery`` (written by ``megaclass data``)."""
_LABEL_RE = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")
_TAR_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.][^/]*$")  # WebDataset: key = path to first dot
_STEP_RE = re.compile(r"^(.+)@step=(\d+)$")


class EvalError(UserError, ValueError):
    """Unusable eval input (no shards, no labelled samples, an encoder that cannot be found)."""


# --------------------------------------------------------------------------------------
# encoder specs: a thin layer over the teacher and student loaders
# --------------------------------------------------------------------------------------


@dataclass
class EncoderEntry:
    """One entry of ``eval.encoders``, resolved: how to load it and how to recognise it again."""

    name: str
    kind: str  # teacher | student | model | path | hf
    spec: str
    model: str | None = None  # teacher/model: the teacher name for load_teacher
    pretrained: str | None = None
    path: str | None = None  # student/path: what load_encoder is given
    image_size: int | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What decides whether cached features are still valid (cheap: no weights loaded)."""
        fp: dict[str, Any] = {"kind": self.kind, "model": self.model, "image_size": self.image_size}
        if self.pretrained:
            fp["pretrained"] = self.pretrained
            fp["pretrained_file"] = _file_sig(self.pretrained)
        if self.kind == "hf":
            from megaclass.pipelines.hf_vision import fingerprint

            fp["hf_files"] = fingerprint(Path(str(self.path)))
        elif self.path is not None:
            fp["weights"] = _weights_sig(Path(self.path))
        return fp


def _file_sig(path: str | Path) -> dict[str, Any] | None:
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _weights_sig(p: Path) -> dict[str, Any] | None:
    """The file load_encoder would read for ``p`` (export file or newest complete checkpoint)."""
    for f in [p] if p.is_file() else [p / ENCODER_FILE, p / "export" / ENCODER_FILE]:
        if f.is_file():
            return _file_sig(f)
    if not p.is_dir():
        return None
    # a checkpoint folder itself, else the newest complete one of a run directory
    ck = p if (p / MARKER).is_file() else latest_complete(p / "train" / "ckpt")
    if ck is None:
        return None
    files = sorted(q for q in ck.rglob("*") if q.is_file())
    return {"checkpoint": str(ck.resolve()), "files": [_file_sig(q) for q in files[:64]]}


def parse_encoder_spec(entry: str, cfg: RunConfig) -> EncoderEntry:
    """Turn an ``eval.encoders`` entry into an :class:`EncoderEntry` (no weights loaded)."""
    label = None
    m = _LABEL_RE.match(entry)
    if m and not entry.startswith(OPEN_CLIP_PREFIX):
        label, entry = m.group(1), m.group(2)
    if entry == "teacher":
        return EncoderEntry(
            name=label or "teacher",
            kind="teacher",
            spec=entry,
            model=cfg.embed.image_teacher,
            pretrained=cfg.embed.pretrained,
            image_size=cfg.embed.image_size,
        )
    if entry == "student":
        return EncoderEntry(name=label or "student", kind="student", spec=entry, path=cfg.run_dir)
    if entry.startswith(HF_PREFIX):
        folder = Path(entry[len(HF_PREFIX) :]).expanduser()
        if not (folder / "config.json").is_file():
            raise EvalError(
                f"eval.encoders: {entry!r}: {folder} is not a Hugging Face model folder "
                "(no config.json; hf: takes a local save_pretrained folder, nothing is downloaded)"
            )
        cls_name, _ = pick_class(read_hf_config(folder), folder)  # config errors now, not later
        return EncoderEntry(
            name=label or folder.name or entry,
            kind="hf",
            spec=entry,
            model=cls_name,
            path=str(folder),
        )
    m_step = _STEP_RE.match(entry)
    if m_step:
        base, step = m_step.group(1), int(m_step.group(2))
        run = Path(cfg.run_dir if base == "student" else base).expanduser()
        ck = run / "train" / "ckpt" / step_tag(step)
        done = [s for s, _ in list_checkpoints(run / "train" / "ckpt")]
        if step not in done:
            raise EvalError(
                f"eval.encoders: {entry!r}: no complete checkpoint {ck} "
                f"(complete steps there: {done or 'none'})"
            )
        default = f"{'student' if base == 'student' else run.name}@{step}"
        return EncoderEntry(name=label or default, kind="path", spec=entry, path=str(ck))
    if entry.startswith(OPEN_CLIP_PREFIX) or entry == EFFICIENTNET_LITE0:
        model, _, pretrained = entry.partition("@")
        return EncoderEntry(
            name=label or entry,
            kind="model",
            spec=entry,
            model=model,
            pretrained=pretrained or None,
        )
    p = Path(entry).expanduser()
    if not p.exists():
        raise EvalError(
            f"eval.encoders: {entry!r} is not 'teacher', 'student', 'open_clip:<model>[@<pretrained>]', "
            "'hf:<folder>', '<run>@step=<N>' or an existing path to an exported encoder / "
            "checkpoint / run directory"
        )
    name = p.parent.name if p.is_file() else p.name
    return EncoderEntry(name=label or name or entry, kind="path", spec=entry, path=str(p))


@dataclass
class LoadedEncoder:
    """A frozen image encoder: PIL → tensor transform, and batch → unit float32 rows."""

    spec: EncoderEntry
    transform: Callable[[Any], torch.Tensor]
    encode: Callable[[torch.Tensor], np.ndarray]
    dim: int | None = None
    seconds: float = 0.0
    images: int = 0
    chunks: list[np.ndarray] = field(default_factory=list)


def load_encoder_for_eval(spec: EncoderEntry, device: torch.device) -> LoadedEncoder:
    """Load the weights named by ``spec`` on ``device`` (eval mode, no gradients)."""
    if spec.kind in ("teacher", "model"):
        register_tiny_configs()  # the student's tiny test architectures, for their open_clip export

        teacher = load_teacher(
            spec.model, "none", spec.pretrained, device=device, image_size=spec.image_size
        )
        return LoadedEncoder(
            spec, teacher.image_transform, teacher.encode_images, teacher.image_dim
        )
    if spec.kind == "hf":
        from megaclass.pipelines.hf_vision import load_hf_vision

        transform, encode_hf, dim, _ = load_hf_vision(str(spec.path), device)
        return LoadedEncoder(spec, transform, encode_hf, dim)

    try:
        module, transform = load_encoder(spec.path)
    except FileNotFoundError as e:
        raise EvalError(f"eval encoder {spec.name!r}: {e}") from e
    module = module.to(device).eval()

    def encode(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = module(x.to(device, torch.float32)).float()
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()

    return LoadedEncoder(spec, transform, encode)


# --------------------------------------------------------------------------------------
# embedding the eval set
# --------------------------------------------------------------------------------------


def eval_set_signature(urls: list[str], class_field: str, max_pixels: int) -> str:
    """Hash of the shard list (with size/mtime of local files) and the reading settings."""
    parts = [class_field, str(max_pixels)]
    for u in urls:
        sig = _file_sig(u)
        parts.append(json.dumps(sig, sort_keys=True) if sig else u)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "encoder"


def count_local_samples(urls: list[str]) -> int | None:
    """Samples in the shards, from the tar headers alone (no image read): the progress bar's
    total, hence its ETA. None when a shard is not a local file (pipe:, http…)."""
    import tarfile

    n = 0
    for u in urls:
        if not Path(u).is_file():
            return None
        try:
            with tarfile.open(u, "r:") as tf:
                n += len({_TAR_KEY_RE.sub(r"\1", m.name) for m in tf if m.isfile()})
        except (OSError, tarfile.TarError):
            return None  # the reader will name the broken shard; no total then
    return n


def embed_eval_set(
    urls: list[str],
    encoders: list[LoadedEncoder],
    class_field: str,
    max_pixels: int,
    batch_size: int,
) -> tuple[list[str], list[str], list[str], SampleStats]:
    """One pass over the shards feeding every encoder; returns keys, classes, splits (json
    ``split``, '' when absent) and read stats."""
    from tqdm.auto import tqdm

    stats = SampleStats()
    keys: list[str] = []
    classes: list[str] = []
    splits: list[str] = []
    batch: list[Any] = []

    def flush() -> None:
        for enc in encoders:
            t0 = time.perf_counter()
            x = torch.stack([enc.transform(img) for img in batch])
            feats = np.asarray(enc.encode(x), dtype=np.float32)
            enc.chunks.append(feats)
            enc.seconds += time.perf_counter() - t0
            enc.images += len(batch)
        batch.clear()

    total = count_local_samples(urls)
    bar = tqdm(desc="eval embed", total=total, unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    seen = 0
    try:
        for url in urls:
            for s in iter_samples(url, stats, max_pixels=max_pixels, decode=True):
                seen += 1
                bar.update(1)
                cls = s.meta.get(class_field) if isinstance(s.meta, dict) else None
                if cls is None or (isinstance(cls, str) and not cls.strip()):
                    stats.kept -= 1
                    stats.skip(MISSING_CLASS, url, s.key, f"no '{class_field}' in the sample json")
                    continue
                keys.append(s.key)
                classes.append(str(cls))
                split = s.meta.get(SPLIT_FIELD)
                splits.append("" if split is None else str(split))
                batch.append(s.image)
                if len(batch) >= batch_size:
                    flush()
                    bar.set_postfix_str(
                        f"{len(keys) / max(time.perf_counter() - t0, 1e-9):.1f} img/s",
                        refresh=False,
                    )
        if batch:
            flush()
    finally:
        bar.close()
    wall = max(time.perf_counter() - t0, 1e-9)
    log.info(
        "eval: read %d samples (%d labelled) in %.1f s: %.1f images/s through %d encoder(s)",
        seen,
        len(keys),
        wall,
        len(keys) / wall,
        len(encoders),
    )
    return keys, classes, splits, stats


def _save_features(
    path: Path, x: np.ndarray, keys: list[str], classes: list[str], splits: list[str]
) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(
            tmp,
            x=x.astype(np.float32),
            keys=np.asarray(keys, dtype=str),
            classes=np.asarray(classes, dtype=str),
            splits=np.asarray(splits, dtype=str),
        )


def _load_features(path: Path) -> tuple[np.ndarray, list[str], list[str], list[str] | None]:
    """Features, keys, classes and splits; splits is None in files written before they were
    stored, which makes the caller re-embed rather than guess them."""
    with np.load(path, allow_pickle=False) as z:
        splits = z["splits"].tolist() if "splits" in z.files else None
        return z["x"], z["keys"].tolist(), z["classes"].tolist(), splits


# --------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------


def run_eval(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Embed the eval set with every configured encoder, compute metrics, write and print them."""
    t_start = time.perf_counter()
    rd = RunDir(cfg.run_dir)
    write_run_config(rd, cfg, force)
    out_dir = rd.eval
    out_dir.mkdir(parents=True, exist_ok=True)
    rd.success_path("eval").unlink(missing_ok=True)  # incomplete until the end
    ec = cfg.eval
    if not cfg.data.eval_shards:  # own shards without a held-out set: the run still completes
        note = "eval skipped: data.eval_shards is empty (no held-out set to evaluate on)"
        log.warning(note)
        summary = {"skipped": True, "note": note, "encoders": {}, "encoder_order": []}
        rd.finish_stage("eval", summary)
        return summary
    if not ec.encoders:
        raise EvalError("eval.encoders is empty: list 'teacher', 'student' or encoder paths")
    if ec.batch_size < 1:
        raise EvalError(f"eval.batch_size must be >= 1, got {ec.batch_size}")
    urls = expand_shards(cfg.data.eval_shards)
    data_sig = eval_set_signature(urls, cfg.data.class_field, cfg.data.max_image_pixels)
    specs = [parse_encoder_spec(e, cfg) for e in ec.encoders]
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or len({_slug(n) for n in names}) != len(names):
        raise EvalError(f"eval.encoders: two entries have the same name ({names}); use label=spec")
    device = resolve_device(ec.device)

    # features: reuse those whose record matches; embed the rest in one pass over the shards
    feats: dict[str, np.ndarray] = {}
    info: dict[str, dict[str, Any]] = {}
    keys: list[str] | None = None
    classes: list[str] | None = None
    splits: list[str] | None = None
    read_stats: dict[str, Any] | None = None
    pending: list[EncoderEntry] = []
    for sp in specs:
        slug = _slug(sp.name)
        rec = RunDir.read_done(out_dir, slug)
        fpath = out_dir / "features" / f"{slug}.npz"
        if (
            rec is not None
            and rec.get("fingerprint") == json.loads(json.dumps(sp.fingerprint()))
            and rec.get("data_signature") == data_sig
            and fpath.is_file()
        ):
            x, k, c, spl = _load_features(fpath)
            if spl is not None and (keys is None or (k == keys and c == classes and spl == splits)):
                feats[sp.name], keys, classes, splits = x, k, c, spl
                info[sp.name] = {**rec.get("info", {}), "cached": True}
                read_stats = rec.get("read_stats", read_stats)
                log.info("eval: reusing cached features of %s (%s)", sp.name, fpath)
                continue
        pending.append(sp)

    if pending:
        loaded = []
        for sp in pending:
            t0 = time.perf_counter()
            loaded.append(load_encoder_for_eval(sp, device))
            log.info("eval: loaded %s (%s) in %.1f s", sp.name, sp.spec, time.perf_counter() - t0)
        k_new, c_new, s_new, stats = embed_eval_set(
            urls, loaded, cfg.data.class_field, cfg.data.max_image_pixels, ec.batch_size
        )
        if len(k_new) < 2:
            raise EvalError(
                f"data.eval_shards: only {len(k_new)} labelled samples in {len(urls)} shard(s) "
                f"({stats.summary()}); eval needs at least 2 with a '{cfg.data.class_field}' field"
            )
        if keys is not None and (k_new != keys or c_new != classes or s_new != splits):
            for name in feats:  # stale caches: drop their records so the next run re-embeds
                RunDir.done_path(out_dir, _slug(name)).unlink(missing_ok=True)
            raise EvalError(
                "eval: the cached features of "
                + ", ".join(feats)
                + " were made from other samples than the shards hold now; their records are "
                "removed, run eval again to re-embed them"
            )
        keys, classes, splits, read_stats = k_new, c_new, s_new, stats.as_dict()
        for enc in loaded:
            x = np.concatenate(enc.chunks) if enc.chunks else np.zeros((0, 0), np.float32)
            slug = _slug(enc.spec.name)
            _save_features(out_dir / "features" / f"{slug}.npz", x, keys, classes, splits)
            meta = {
                "kind": enc.spec.kind,
                "spec": enc.spec.spec,
                "model": enc.spec.model,
                "pretrained": enc.spec.pretrained,
                "path": enc.spec.path,
                "images": enc.images,
                "embed_seconds": round(enc.seconds, 3),
                "images_per_s": round(enc.images / max(enc.seconds, 1e-9), 2),
            }
            RunDir.write_done(
                out_dir,
                slug,
                {
                    "fingerprint": enc.spec.fingerprint(),
                    "data_signature": data_sig,
                    "info": meta,
                    "read_stats": read_stats,
                },
            )
            feats[enc.spec.name] = x
            info[enc.spec.name] = {**meta, "cached": False}
            log.info(
                "eval: %s embedded %d images at %.1f images/s",
                enc.spec.name,
                enc.images,
                meta["images_per_s"],
            )
        del loaded

    assert keys is not None and classes is not None and splits is not None
    split_counts = {(v or "(none)"): n for v, n in sorted(Counter(splits).items())}
    outside: dict[str, int] = {}
    if ec.protocol == "query_gallery":
        q_idx, g_idx, outside = split_query_gallery(splits)
        if not len(q_idx) or not len(g_idx):
            raise EvalError(
                f"eval.protocol=query_gallery needs samples whose json '{SPLIT_FIELD}' is "
                f"'{QUERY}' and samples whose '{SPLIT_FIELD}' is '{GALLERY}'; data.eval_shards "
                f"has {split_counts} (In-Shop shards from `megaclass data inshop` have them; "
                "use eval.protocol=all for the other benchmarks)"
            )
        if outside:
            log.warning("eval: samples outside query/gallery take no part: %s", outside)
    results: dict[str, Any] = {}
    for sp in specs:
        x = feats[sp.name]
        t0 = time.perf_counter()
        if ec.protocol == CLASSIFICATION:
            res = run_probes(
                x,
                classes,
                splits,
                ec.probes,
                knn_k=ec.probe_knn_k,
                temperature=ec.probe_temperature,
                l2_grid=ec.probe_l2,
                val_fraction=ec.probe_val_fraction,
                seed=cfg.seed,
                chunk_size=ec.chunk_size,
                device=device,
            )
            # "full"/"compact" stay (empty) for readers of retrieval results (report, export)
            results[sp.name] = {
                **info[sp.name],
                "dim": int(x.shape[1]),
                "probes": res,
                "full": {},
                "compact": {},
            }
            log.info("eval: probes of %s in %.1f s", sp.name, time.perf_counter() - t0)
            continue
        res = evaluate_features(
            x,
            classes,
            recall_ks=ec.recall_ks,
            knn_k=ec.knn_k,
            compact_dims=ec.compact_dims,
            chunk_size=ec.chunk_size,
            device=device,
            skip_oversized=True,
            protocol=ec.protocol,
            splits=splits,
        )
        for d, why in res["compact_skipped"].items():
            log.warning("eval: %s: compact dimension %s skipped (%s)", sp.name, d, why)
        results[sp.name] = {**info[sp.name], "dim": int(x.shape[1]), **res}
        log.info("eval: metrics of %s in %.1f s", sp.name, time.perf_counter() - t0)

    n_cls = len(set(classes))
    summary: dict[str, Any] = {
        "stage": "eval",
        "eval_set": {
            "shards": urls,
            "n": len(keys),
            "classes": n_cls,
            "class_field": cfg.data.class_field,
            "read": read_stats,
            "protocol": ec.protocol,
            "splits": split_counts,
            "outside_protocol": {(v or "(none)"): n for v, n in outside.items()},
        },
        "settings": {**config_to_dict(ec), "device": str(device)},
        "encoders": results,
        "encoder_order": names,
        "comparison": None if ec.protocol == CLASSIFICATION else compare(results),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    write_json_atomic(out_dir / "metrics.json", summary)
    rd.finish_stage("eval", summary)
    print(format_table(summary))
    return summary


# --------------------------------------------------------------------------------------
# the comparison table
# --------------------------------------------------------------------------------------


def metric_rows(settings_or_result: dict[str, Any]) -> list[tuple[str, str]]:
    """(column label, key in a metrics dict) in display order for one metrics dict."""
    ks = sorted(
        int(k.split("@")[1])
        for k in settings_or_result
        if k.startswith("recall@") and k.split("@")[1].isdigit()
    )
    rows = [(f"R@{k}", f"recall@{k}") for k in ks] + [("mAP@R", "map@r")]
    knn_k = settings_or_result.get("knn_k")
    rows.append((f"kNN@{knn_k}" if knn_k else "kNN", "knn_acc"))
    return rows


def compare(results: dict[str, Any]) -> dict[str, Any] | None:
    """student − teacher on every metric (full and common compact dims), when both were run."""
    if "teacher" not in results or "student" not in results:
        return None
    t, s = results["teacher"], results["student"]
    out: dict[str, Any] = {"reference": "teacher", "candidate": "student", "full": {}}
    for _, key in metric_rows(s["full"]):
        a, b = t["full"].get(key), s["full"].get(key)
        out["full"][key] = None if a is None or b is None else b - a
    out["compact"] = {}
    for d in sorted(set(t["compact"]) & set(s["compact"]), key=int):
        out["compact"][d] = {
            key: (
                None
                if t["compact"][d].get(key) is None or s["compact"][d].get(key) is None
                else s["compact"][d][key] - t["compact"][d][key]
            )
            for _, key in metric_rows(s["compact"][d])
        }
    return out


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text table: one row per encoder × feature size, one column per metric (in %)."""
    results = summary["encoders"]
    if summary.get("skipped"):
        return summary.get("note", "eval skipped")
    if not results:
        return "(no encoders evaluated)"
    if "probes" in next(iter(results.values())):
        return format_probe_table(summary)
    first = next(iter(results.values()))["full"]
    rows = metric_rows(first)
    header = ["encoder", "dim"] + [label for label, _ in rows]
    lines: list[list[str]] = []
    for name, r in results.items():
        lines.append([name, str(r["dim"])] + [_pct(r["full"].get(k)) for _, k in rows])
        for d, m in sorted(r["compact"].items(), key=lambda kv: int(kv[0])):
            if int(d) == r["dim"]:
                continue
            lines.append([f"  {name}", f"{d}"] + [_pct(m.get(k)) for _, k in rows])
    cmp_ = summary.get("comparison")
    if cmp_:
        lines.append(
            ["Δ student−teacher", "full"]
            + [
                "—" if cmp_["full"].get(k) is None else f"{100 * cmp_['full'][k]:+.1f}"
                for _, k in rows
            ]
        )
        for d, m in sorted(cmp_["compact"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                ["Δ student−teacher", d]
                + ["—" if m.get(k) is None else f"{100 * m[k]:+.1f}" for _, k in rows]
            )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    es = summary.get("eval_set", {})
    if summary.get("settings", {}).get("protocol") == "query_gallery":
        how = "query/gallery protocol; metrics in %; queries without a gallery match excluded"
    else:
        how = "SOP protocol; metrics in %; singleton classes excluded as queries"
    title = (
        f"Retrieval on held-out classes: {es.get('n', '?')} images, {es.get('classes', '?')} "
        f"classes ({how})"
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, fmt(header), sep, *[fmt(r) for r in lines]])


def format_probe_table(summary: dict[str, Any]) -> str:
    """Top-1 accuracy (%) of each probe per encoder, with the λ the linear probe chose."""
    results = summary["encoders"]
    first = next(iter(results.values()))["probes"]
    header = ["encoder", "dim"]
    if "knn" in first:
        header.append(f"kNN@{first['knn']['k']} top-1")
    if "linear" in first:
        header += ["linear top-1", "λ"]
    lines = []
    for name, r in results.items():
        p = r["probes"]
        row = [name, str(r["dim"])]
        if "knn" in first:
            row.append(_pct(p.get("knn", {}).get("top1")))
        if "linear" in first:
            lin = p.get("linear", {})
            row += [_pct(lin.get("top1")), "—" if lin.get("l2") is None else f"{lin['l2']:g}"]
        lines.append(row)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )

    title = (
        f"Classification probes: learn on {first['n_train']} images ({first['val_split']} "
        f"chooses λ), score {first['n_test']} images of split '{first['test_split']}', "
        f"{first['classes']} classes; top-1 in %"
    )
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, fmt(header), sep, *[fmt(r) for r in lines]])
