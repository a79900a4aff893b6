"""Embedding folders (the embed stage's output, or LAION's layout): written, read and checked.

The embed stage writes these folders and the cluster, assign and regroup stages read them, so
the format has one owner: this module holds both sides, and a change to the layout is made here.

Layout (docs/architecture.md, "The run directory")::

    EMBED/img_emb/<stem>.npy        float16/float32 (n, d_img), L2-normalised
    EMBED/text_emb/<stem>.npy       (n, d_txt), optional
    EMBED/metadata/<stem>.parquet   column ``key`` (string) plus anything else (``class``…)
    EMBED/_done/<stem>.json         present for the embed stage's output: marks a complete stem

LAION's published embeddings name the files ``img_emb/img_emb_<i>.npy``,
``text_emb/text_emb_<i>.npy`` and ``metadata/metadata_<i>.parquet``; such a folder is read as is
(the stem is then ``metadata_<i>``, the metadata file's name).

The fused feature that k-means sees is ``image``, ``text`` or ``mean``. ``mean`` is
normalise(normalise(img) + normalise(txt)) when both have the same width; when the widths differ
(two unrelated teachers) there is no shared space to average in, so ``mean`` is the concatenation
``[img, txt] / sqrt(2)`` instead — again unit length, and its dot product is the mean of the two
cosines, which is what averaging would give for aligned spaces.

Arrays are opened memory-mapped so that the cluster stage can stream row subsets of huge shards
without reading whole files. :func:`write_embeddings_shard` writes a stem all or nothing: every
file under a temporary ``.tmp-*`` name in its folder first, then the renames, and on any failure
(a disk that fills up, a value the parquet writer refuses) no file of the stem is left; the
``_done`` record, which makes a stem count, is written after them by the embed stage.

Keys: the metadata's ``key`` column; clip-retrieval's metadata has none but an ``image_path``,
whose file name without extension is the img2dataset key (:func:`key_from_path`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from megaclass.core.atomic import atomic_path, fsync_dir
from megaclass.core.errors import UserError

FEATURES = ("image", "text", "mean")
_LAION_PREFIX = "metadata_"


class EmbeddingsError(UserError, ValueError):
    """An embedding folder or file is malformed; the message names the file (and key/row)."""


def _npy_path(embed_dir: Path, kind: str, stem: str) -> Path:
    """``kind`` is 'img_emb' or 'text_emb'; resolves our naming or LAION's."""
    direct = embed_dir / kind / f"{stem}.npy"
    if direct.exists() or not stem.startswith(_LAION_PREFIX):
        return direct
    laion = embed_dir / kind / f"{kind}_{stem[len(_LAION_PREFIX) :]}.npy"
    return laion if laion.exists() else direct


def metadata_path(embed_dir: str | Path, stem: str) -> Path:
    return Path(embed_dir) / "metadata" / f"{stem}.parquet"


def key_from_path(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """img2dataset key from a path such as clip-retrieval's ``image_path`` column
    (``/data/laion/00012/000120034.jpg`` or ``00012.tar/000120034.jpg`` -> ``000120034``):
    the file name without its extension."""
    names = pc.replace_substring_regex(pc.cast(paths, pa.string()), r"^.*[/\\]", "")
    return pc.replace_substring_regex(names, r"\.[^.]*$", "")


def _shard_files(embed_dir: Path, stem: str) -> list[Path]:
    """The files :func:`write_embeddings_shard` writes for ``stem`` (our naming)."""
    return [
        embed_dir / "img_emb" / f"{stem}.npy",
        embed_dir / "text_emb" / f"{stem}.npy",
        metadata_path(embed_dir, stem),
    ]


def remove_embeddings_shard(embed_dir: str | Path, stem: str) -> None:
    """Delete every file of ``stem`` (absent ones are fine), durably.

    Why: a stem whose write failed must not keep some of its files (an ``img_emb`` without its
    metadata, or last run's metadata beside this run's vectors).
    """
    for path in _shard_files(Path(embed_dir), stem):
        if path.exists():
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)


def write_embeddings_shard(
    embed_dir: str | Path,
    stem: str,
    img: np.ndarray,
    txt: np.ndarray | None,
    metadata: dict[str, list],
    before_file: Callable[[str], None] | None = None,
) -> None:
    """Write one stem's ``img_emb``, ``text_emb`` (when ``txt`` is given) and ``metadata`` files,
    all or nothing.

    Arrays are stored as float16 (the readers widen to float32). ``metadata`` holds string
    columns in file order and must include ``key``, one entry per row. Every file is written and
    fsynced under a temporary name first; only when all are written are they renamed into place
    (metadata last); a ``text_emb`` file left by an older version is removed when ``txt`` is
    None. If anything fails (the disk fills up, the parquet writer refuses a value), the
    temporaries are removed, and so is every file of the stem already in place (an older
    version's included), and the error propagates: the stem then has no files at all. The
    caller writes its completion marker after this returns.

    ``before_file`` is called with each file's kind (``img_emb``, ``text_emb``, ``metadata``)
    before that file is written: the embed stage's fault injection for the tests of this path.
    """
    embed_dir = Path(embed_dir)
    if "key" not in metadata:
        raise EmbeddingsError(f"{metadata_path(embed_dir, stem)}: metadata needs a 'key' column")
    hook = before_file or (lambda kind: None)
    img_path, txt_path, meta_path = _shard_files(embed_dir, stem)
    try:
        if txt is None and txt_path.exists():  # an older version's: not this one's
            txt_path.unlink()
            fsync_dir(txt_path.parent)
        # built before any file: a value Arrow refuses (not UTF-8) leaves nothing behind
        table = pa.table({name: pa.array(col, pa.string()) for name, col in metadata.items()})
        with contextlib.ExitStack() as stack:
            # each atomic_path renames on a clean exit, in reverse order of entry (metadata
            # last) and not at all when the block raises: then it removes its temporary
            meta_tmp = stack.enter_context(atomic_path(meta_path, suffix=".parquet"))
            txt_tmp = None
            if txt is not None:
                txt_tmp = stack.enter_context(atomic_path(txt_path, suffix=".npy"))
            img_tmp = stack.enter_context(atomic_path(img_path, suffix=".npy"))
            hook("img_emb")
            np.save(img_tmp, img.astype(np.float16), allow_pickle=False)
            if txt is not None and txt_tmp is not None:
                hook("text_emb")
                np.save(txt_tmp, txt.astype(np.float16), allow_pickle=False)
            hook("metadata")
            pq.write_table(table, meta_tmp)
    except BaseException:
        remove_embeddings_shard(embed_dir, stem)
        raise


def list_stems(embed_dir: str | Path) -> list[str]:
    """Complete stems, sorted. With a ``_done`` folder (embed-stage output) only stems that
    have their done record count; a bring-your-own folder has none, so every metadata file counts."""
    embed_dir = Path(embed_dir)
    meta = embed_dir / "metadata"
    if not meta.is_dir():
        raise EmbeddingsError(f"{meta}: missing metadata folder (expected metadata/<stem>.parquet)")
    stems = sorted(p.stem for p in meta.glob("*.parquet") if not p.name.startswith("."))
    done = embed_dir / "_done"
    if done.is_dir():
        stems = [s for s in stems if (done / f"{s}.json").exists()]
    return stems


def open_array(embed_dir: str | Path, stem: str, kind: str) -> np.ndarray | None:
    """Memory-mapped (n, d) array of ``kind`` ('img_emb'/'text_emb'), or None when absent."""
    path = _npy_path(Path(embed_dir), kind, stem)
    if not path.exists():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise EmbeddingsError(f"{path}: not a readable .npy array ({e})") from None
    if arr.ndim != 2 or arr.dtype not in (np.float16, np.float32):
        raise EmbeddingsError(
            f"{path}: expected a 2-D float16/float32 array, got shape {arr.shape} dtype {arr.dtype}"
        )
    return arr


def read_keys(embed_dir: str | Path, stem: str) -> list[str]:
    """The keys of a stem in row order: the ``key`` column, else keys derived from
    ``image_path`` (clip-retrieval's metadata, which has no ``key``; :func:`key_from_path`)."""
    path = metadata_path(embed_dir, stem)
    try:
        names = pq.read_schema(path).names
        if "key" not in names and "image_path" in names:
            paths = pq.read_table(path, columns=["image_path"]).column("image_path")
            if paths.null_count:
                raise EmbeddingsError(
                    f"{path}: {paths.null_count} rows have no image_path to derive a key from"
                )
            return [str(k) for k in key_from_path(paths).to_pylist()]
        table = pq.read_table(path, columns=["key"])
    except EmbeddingsError:
        raise
    except Exception as e:  # pyarrow raises several types for missing columns / bad files
        raise EmbeddingsError(f"{path}: cannot read column 'key' ({e})") from None
    return [str(k) for k in table.column("key").to_pylist()]


def read_column(embed_dir: str | Path, stem: str, column: str) -> list | None:
    """One metadata column as a list, or None when the file has no such column."""
    path = metadata_path(embed_dir, stem)
    schema = pq.read_schema(path)
    if column not in schema.names:
        return None
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _normalise(x: np.ndarray, where: str, row_offset: int = 0) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0]) + row_offset
        raise EmbeddingsError(f"{where}: row {i} is zero or not finite")
    x /= norms
    return x


def fuse(
    img: np.ndarray | None,
    txt: np.ndarray | None,
    feature: str,
    where: str = "",
    row_offset: int = 0,
) -> np.ndarray:
    """Fused float32 L2-normalised features from (row-aligned) image/text arrays."""
    if feature not in FEATURES:
        raise EmbeddingsError(f"feature {feature!r} is not one of {', '.join(FEATURES)}")
    if feature in ("image", "mean") and img is None:
        raise EmbeddingsError(f"{where}: feature '{feature}' needs img_emb, which is absent")
    if feature in ("text", "mean") and txt is None:
        raise EmbeddingsError(f"{where}: feature '{feature}' needs text_emb, which is absent")
    if feature == "image":
        return _normalise(img, f"{where} img_emb", row_offset)
    if feature == "text":
        return _normalise(txt, f"{where} text_emb", row_offset)
    a = _normalise(img, f"{where} img_emb", row_offset)
    b = _normalise(txt, f"{where} text_emb", row_offset)
    if a.shape[1] == b.shape[1]:
        a += b
        return _normalise(a, f"{where} mean", row_offset)
    return np.concatenate([a, b], axis=1) * np.float32(1.0 / np.sqrt(2.0))


def load_shard(
    embed_dir: str | Path, stem: str, feature: str, rows: np.ndarray | None = None
) -> tuple[list[str], np.ndarray]:
    """Keys and fused features (float32, (n, d), L2-normalised) of one stem.

    ``rows`` (sorted indices) reads only those rows from the memory-mapped arrays — the cluster
    stage's sample reads this way so a shard is never loaded whole just to keep a few rows.
    """
    embed_dir = Path(embed_dir)
    keys = read_keys(embed_dir, stem)
    img = open_array(embed_dir, stem, "img_emb")
    txt = open_array(embed_dir, stem, "text_emb")
    where = f"{embed_dir}/*/{stem}"
    for arr, kind in ((img, "img_emb"), (txt, "text_emb")):
        if arr is not None and arr.shape[0] != len(keys):
            raise EmbeddingsError(
                f"{_npy_path(embed_dir, kind, stem)}: {arr.shape[0]} rows but "
                f"{metadata_path(embed_dir, stem)} has {len(keys)} keys"
            )
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        keys = [keys[i] for i in rows]
        img = None if img is None else img[rows]
        txt = None if txt is None else txt[rows]
    return keys, fuse(img, txt, feature, where)


def feature_dim(embed_dir: str | Path, stem: str, feature: str) -> int:
    img = open_array(embed_dir, stem, "img_emb")
    txt = open_array(embed_dir, stem, "text_emb")
    if feature == "image":
        return int(img.shape[1])
    if feature == "text":
        return int(txt.shape[1])
    return int(img.shape[1]) if img.shape[1] == txt.shape[1] else int(img.shape[1] + txt.shape[1])


def validate_embeddings_dir(path: str | Path, check_rows: int = 1024) -> dict:
    """Check a folder cheaply (headers, row counts, key column, a few rows' norms).

    Returns ``{"stems", "rows", "d_img", "d_txt", "has_class"}``; raises :class:`EmbeddingsError`
    naming the offending file. Only the first ``check_rows`` rows of each array are read, so the
    check stays fast on LAION-sized folders.
    """
    path = Path(path)
    if not path.is_dir():
        raise EmbeddingsError(f"{path}: embeddings folder does not exist")
    if not (path / "img_emb").is_dir() and not (path / "text_emb").is_dir():
        raise EmbeddingsError(f"{path}: neither img_emb/ nor text_emb/ exists")
    stems = list_stems(path)
    if not stems:
        raise EmbeddingsError(f"{path}/metadata: no complete <stem>.parquet files")
    d_img: int | None = None
    d_txt: int | None = None
    rows = 0
    has_class = False
    for stem in stems:
        mpath = metadata_path(path, stem)
        try:
            meta = pq.ParquetFile(mpath)
        except Exception as e:
            raise EmbeddingsError(f"{mpath}: not a readable parquet file ({e})") from None
        names = meta.schema_arrow.names
        if "key" not in names and "image_path" not in names:
            raise EmbeddingsError(
                f"{mpath}: missing column 'key' (or 'image_path' to derive it; columns: {names})"
            )
        has_class = has_class or "class" in names
        n = meta.metadata.num_rows
        img = open_array(path, stem, "img_emb")
        txt = open_array(path, stem, "text_emb")
        if img is None and txt is None:
            raise EmbeddingsError(
                f"{_npy_path(path, 'img_emb', stem)}: missing (and no text_emb for stem {stem})"
            )
        for arr, kind in ((img, "img_emb"), (txt, "text_emb")):
            if arr is None:
                continue
            fpath = _npy_path(path, kind, stem)
            if arr.shape[0] != n:
                raise EmbeddingsError(f"{fpath}: {arr.shape[0]} rows but {mpath} has {n} rows")
            d_seen = d_img if kind == "img_emb" else d_txt
            if d_seen is not None and arr.shape[1] != d_seen:
                raise EmbeddingsError(f"{fpath}: width {arr.shape[1]}, other stems have {d_seen}")
            if kind == "img_emb":
                d_img = arr.shape[1]
            else:
                d_txt = arr.shape[1]
            _normalise(arr[:check_rows], str(fpath))
        rows += n
    return {"stems": stems, "rows": rows, "d_img": d_img, "d_txt": d_txt, "has_class": has_class}
