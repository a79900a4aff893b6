"""``megaclass data sop|cub|cars|inshop|imagefolder --src DIR --out DIR``: benchmark archives → shards.

Why converters: the published retrieval numbers of Unicom and MLCD are measured on four
benchmarks whose official archives each have their own listing format. Turning each into the
same WebDataset shards lets one eval stage (``pipelines/eval.py``) measure all of them, with
the split of each benchmark's published protocol written into every sample. Nothing is
downloaded: ``--src`` is the archive as the user unpacked it.

What each converter reads (``--src`` is the folder holding these files):

* ``sop`` — Stanford Online Products: ``Ebay_train.txt`` and ``Ebay_test.txt`` (a header line,
  then ``image_id class_id super_class_id path``); test = classes 11,319–22,634, which must be
  the classes of ``Ebay_test.txt``.
* ``cub`` — CUB-200-2011: ``images.txt`` (``id path``, under ``images/``) and
  ``image_class_labels.txt`` (``id class``); the metric-learning split: classes 1–100 train,
  101–200 test (the archive's own ``train_test_split.txt`` is a classification split, unused).
* ``cars`` — Cars196: ``cars_annos.mat`` (a struct array ``annotations`` with fields
  ``relative_im_path``, ``class``, ``test``, and ``class_names``) beside ``car_ims/``; the
  metric-learning split: classes 1–98 train, 99–196 test (the ``test`` flag is kept in the json
  as ``devkit_test``).
* ``inshop`` — In-Shop Clothes: ``list_eval_partition.txt`` (also found under ``Eval/``; line 1
  the image count, line 2 the column names, then ``image_name item_id evaluation_status`` with
  status train/query/gallery); images under ``img/`` (also found under ``Img/img/``).
* ``imagefolder`` — class-per-folder trees: ``DIR/<split>/<class>/…/image`` when every top
  folder is a split name (:data:`SPLIT_NAMES`, e.g. ImageNet's ``train/`` and ``val/``), else
  ``DIR/<class>/…/image`` with split ``all``; a class is the image's folder path below the
  split folder.

Output (``--out``)::

    OUT/<split>/<dataset>-000000.tar …  one folder per split (train, test, query, gallery, …)
    OUT/<split>.txt                      the absolute shard paths of a split, a shard spec
    OUT/eval.txt                         the shards the benchmark's protocol evaluates
                                         (test; In-Shop: query + gallery) → data.eval_shards
    OUT/_convert.json                    counts, and every skipped item with its reason

Each sample is the original image bytes (never re-encoded, so pixels are exactly the
archive's) + a caption + a json with ``class`` (string), ``split``, ``caption`` and where it
came from (``file``, original ids). Samples are written in the order of the archive's
listing (sorted paths for imagefolder), so ties in retrieval are broken as any tool iterating
the listing would.

Nothing is dropped silently: every listed item is written or skipped with a reason —
``missing_file``, ``unreadable_file``, ``malformed_line`` (a listing line or .mat record that
does not parse, names a class outside the protocol's range, repeats an id, or leaves the
archive folder), ``undecodable_image``, ``unsupported_format`` (only JPEG/PNG/WEBP are accepted,
recognised by their magic bytes before any decoder runs), ``too_many_pixels`` and, for
imagefolder, ``not_an_image`` and ``no_class_folder``. The counts are printed at the end and
every skipped item, named by file and line, is in ``OUT/_convert.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from megaclass.core.atomic import write_json_atomic, write_text_atomic
from megaclass.core.errors import UserError
from megaclass.data.reader import DEFAULT_MAX_PIXELS, ImageRejected, load_rgb, open_image
from megaclass.data.writer import ShardWriter
from tqdm import tqdm

MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
MALFORMED_LINE = "malformed_line"
UNDECODABLE_IMAGE = "undecodable_image"
UNSUPPORTED_FORMAT = "unsupported_format"
NOT_AN_IMAGE = "not_an_image"
NO_CLASS_FOLDER = "no_class_folder"

SOP_TEST_CLASSES = (11319, 22634)
CUB_TRAIN_CLASSES, CUB_CLASSES = 100, 200
CARS_TRAIN_CLASSES, CARS_CLASSES = 98, 196
INSHOP_STATUSES = ("train", "query", "gallery")
SPLIT_NAMES = (
    "train",
    "training",
    "val",
    "valid",
    "validation",
    "test",
    "testing",
    "query",
    "gallery",
    "eval",
)
"""Top folder names that make imagefolder read ``DIR/<split>/<class>/``."""
TRAIN_SPLITS = ("train", "training")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "ico", "ppm", "pgm", "jp2", "heic", "avif")
SUMMARY_FILE = "_convert.json"


class ConvertError(UserError, ValueError):
    """The archive cannot be converted at all (its listing is missing or unreadable, or no
    image survived); the message names the file and what was expected."""


@dataclass(frozen=True)
class Item:
    """One image to convert, as the archive's listing describes it."""

    path: Path
    """The image file."""
    cls: str
    split: str
    caption: str
    where: str
    """Names the item in messages: the listing file and line, or the path in the tree."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra json fields: the file's path in the archive, original ids."""


@dataclass(frozen=True)
class Skip:
    """An item that was not written, with why."""

    reason: str
    where: str
    detail: str


@dataclass
class Listing:
    """What a dataset's parser found: items to convert, lines already rejected, notes."""

    items: list[Item] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    eval_splits: tuple[str, ...] = ()
    """The splits the benchmark's protocol evaluates (listed in OUT/eval.txt)."""

    def skip(self, reason: str, where: str, detail: str) -> None:
        self.skips.append(Skip(reason, where, detail))


# --------------------------------------------------------------------------------------
# small readers shared by the parsers
# --------------------------------------------------------------------------------------


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConvertError(f"{path} not found: {what}")
    return path


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text) of every line; text is None when it is not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    for n, line in enumerate(raw.splitlines(), 1):
        if n == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
        try:
            yield n, line.decode("utf-8")
        except UnicodeDecodeError:
            yield n, None


def _rows(path: Path, listing: Listing) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, where, fields) of the non-blank lines; bad UTF-8 is a skip."""
    for n, text in _lines(path):
        where = f"{path.name}:{n}"
        if text is None:
            listing.skip(MALFORMED_LINE, where, "not UTF-8 text")
            continue
        fields = text.split()
        if fields:
            yield n, where, fields


def _safe_rel(text: str) -> PurePosixPath | None:
    """A listing path as a relative path inside the archive, or None when it would leave it."""
    p = PurePosixPath(text.replace("\\", "/"))
    if not text or p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return p


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _words(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split())


# --------------------------------------------------------------------------------------
# the five parsers
# --------------------------------------------------------------------------------------


def list_sop(src: str | os.PathLike) -> Listing:
    """Stanford Online Products: both listing files; split by file, checked by class range."""
    root = Path(src)
    hint = (
        "--src must be the Stanford_Online_Products folder of the official archive "
        "(Ebay_train.txt, Ebay_test.txt and the <category>_final/ image folders)"
    )
    files = [
        ("train", _require(root / "Ebay_train.txt", hint)),
        ("test", _require(root / "Ebay_test.txt", hint)),
    ]
    lo, hi = SOP_TEST_CLASSES
    out = Listing(eval_splits=("test",))
    seen: dict[int, str] = {}
    for split, f in files:
        for line_no, where, fields in _rows(f, out):
            if line_no == 1 and fields[:2] == ["image_id", "class_id"]:
                continue  # the header line
            if len(fields) != 4:
                out.skip(
                    MALFORMED_LINE,
                    where,
                    f"expected 4 fields 'image_id class_id super_class_id path', got {len(fields)}",
                )
                continue
            image_id, class_id, super_id = (_int(v) for v in fields[:3])
            rel = _safe_rel(fields[3])
            if image_id is None or class_id is None or super_id is None:
                out.skip(
                    MALFORMED_LINE, where, "image_id, class_id and super_class_id must be integers"
                )
                continue
            if rel is None:
                out.skip(MALFORMED_LINE, where, f"path {fields[3]!r} leaves the archive folder")
                continue
            if (lo <= class_id <= hi) != (split == "test"):
                out.skip(
                    MALFORMED_LINE,
                    where,
                    f"class {class_id} in {f.name}, but the test classes are {lo}-{hi}",
                )
                continue
            if image_id in seen:
                out.skip(MALFORMED_LINE, where, f"image_id {image_id} already at {seen[image_id]}")
                continue
            seen[image_id] = where
            category = rel.parts[0].removesuffix("_final") if len(rel.parts) > 1 else "product"
            out.items.append(
                Item(
                    root / rel,
                    str(class_id),
                    split,
                    f"a product photo of a {_words(category)}",
                    where,
                    {"file": str(rel), "image_id": image_id, "super_class": super_id},
                )
            )
    return out


def list_cub(src: str | os.PathLike) -> Listing:
    """CUB-200-2011: images.txt joined with image_class_labels.txt by image id."""
    root = Path(src)
    hint = (
        "--src must be the CUB_200_2011 folder of the official archive "
        "(images.txt, image_class_labels.txt and images/)"
    )
    images_txt = _require(root / "images.txt", hint)
    labels_txt = _require(root / "image_class_labels.txt", hint)
    out = Listing(eval_splits=("test",))
    paths: dict[int, tuple[PurePosixPath, str]] = {}
    for _, where, fields in _rows(images_txt, out):
        image_id = _int(fields[0]) if len(fields) == 2 else None
        rel = _safe_rel(fields[1]) if len(fields) == 2 else None
        if image_id is None or rel is None:
            out.skip(
                MALFORMED_LINE, where, "expected 'image_id path' (an integer and a relative path)"
            )
        elif image_id in paths:
            out.skip(MALFORMED_LINE, where, f"image id {image_id} already at {paths[image_id][1]}")
        else:
            paths[image_id] = (rel, where)
    labels: dict[int, int] = {}
    for _, where, fields in _rows(labels_txt, out):
        image_id, cls = (_int(v) for v in fields) if len(fields) == 2 else (None, None)
        if image_id is None or cls is None:
            out.skip(MALFORMED_LINE, where, "expected 'image_id class_id' (two integers)")
        elif not 1 <= cls <= CUB_CLASSES:
            out.skip(MALFORMED_LINE, where, f"class {cls} is outside 1-{CUB_CLASSES}")
        elif image_id in labels:
            out.skip(MALFORMED_LINE, where, f"image id {image_id} has a second class line")
        elif image_id not in paths:
            out.skip(MALFORMED_LINE, where, f"image id {image_id} is not in {images_txt.name}")
        else:
            labels[image_id] = cls
    for image_id, (rel, where) in paths.items():
        cls = labels.get(image_id)
        if cls is None:
            out.skip(MALFORMED_LINE, where, f"image id {image_id} has no line in {labels_txt.name}")
            continue
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        name = _words(folder.split(".", 1)[-1]) if folder else f"class {cls}"
        out.items.append(
            Item(
                root / "images" / rel,
                str(cls),
                "train" if cls <= CUB_TRAIN_CLASSES else "test",
                f"a photo of a {name}, a type of bird",
                where,
                {"file": f"images/{rel}", "image_id": image_id},
            )
        )
    return out


def _mat_str(v: Any) -> str:
    a = np.asarray(v)
    if a.size != 1 or a.dtype.kind not in "USO":
        raise ValueError(f"expected a string, got {a.dtype} of shape {a.shape}")
    s = a.reshape(()).item()
    s = s.decode("utf-8") if isinstance(s, bytes) else s
    if not isinstance(s, str):
        raise ValueError(f"expected a string, got {type(s).__name__}")
    return s


def _mat_int(v: Any) -> int:
    a = np.asarray(v)
    if a.size != 1 or a.dtype.kind not in "iuf":
        raise ValueError(f"expected a number, got {a.dtype} of shape {a.shape}")
    f = float(a.reshape(()).item())
    if not f.is_integer():
        raise ValueError(f"expected an integer, got {f}")
    return int(f)


def list_cars(src: str | os.PathLike) -> Listing:
    """Cars196: the annotations of cars_annos.mat (read with scipy.io.loadmat)."""
    import scipy.io

    root = Path(src)
    mat = next(
        (p for p in (root / "cars_annos.mat", root / "devkit" / "cars_annos.mat") if p.is_file()),
        None,
    )
    if mat is None:
        raise ConvertError(
            f"{root / 'cars_annos.mat'} not found: --src must be the folder holding cars_annos.mat "
            "and car_ims/ of the Cars196 archive"
        )
    try:
        m = scipy.io.loadmat(str(mat), squeeze_me=True)
    except Exception as e:  # scipy raises several types on garbage, and on v7.3 (HDF5) files
        raise ConvertError(
            f"{mat}: cannot read it as a MATLAB v5 file ({type(e).__name__}: {e})"
        ) from None
    annos = m.get("annotations")
    fields = getattr(getattr(annos, "dtype", None), "names", None) or ()
    missing = [f for f in ("relative_im_path", "class", "test") if f not in fields]
    if annos is None or missing:
        raise ConvertError(
            f"{mat}: expected a struct array 'annotations' with fields relative_im_path, class "
            f"and test; missing: {', '.join(missing) or 'annotations'}"
        )
    names: list[str] = []
    if "class_names" in m:
        try:
            names = [_mat_str(v) for v in np.atleast_1d(m["class_names"])]
        except ValueError:
            names = []
    out = Listing(eval_splits=("test",))
    if len(names) not in (0, CARS_CLASSES):
        out.notes.append(f"{mat.name}: {len(names)} class_names instead of {CARS_CLASSES}")
    for i, rec in enumerate(np.atleast_1d(annos)):
        where = f"{mat.name}:annotations({i + 1})"
        try:
            rel_text = _mat_str(rec["relative_im_path"])
            cls = _mat_int(rec["class"])
            test = _mat_int(rec["test"])
        except ValueError as e:
            out.skip(MALFORMED_LINE, where, str(e))
            continue
        rel = _safe_rel(rel_text)
        if rel is None:
            out.skip(MALFORMED_LINE, where, f"path {rel_text!r} leaves the archive folder")
            continue
        if not 1 <= cls <= CARS_CLASSES:
            out.skip(MALFORMED_LINE, where, f"class {cls} is outside 1-{CARS_CLASSES}")
            continue
        name = names[cls - 1] if cls <= len(names) else ""
        meta: dict[str, Any] = {"file": str(rel), "devkit_test": bool(test)}
        if name:
            meta["class_name"] = name
        out.items.append(
            Item(
                root / rel,
                str(cls),
                "train" if cls <= CARS_TRAIN_CLASSES else "test",
                f"a photo of a {name}, a type of car" if name else "a photo of a car",
                where,
                meta,
            )
        )
    return out


def list_inshop(src: str | os.PathLike) -> Listing:
    """In-Shop Clothes: list_eval_partition.txt, status train/query/gallery as the split."""
    root = Path(src)
    part = next(
        (
            p
            for p in (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
            if p.is_file()
        ),
        None,
    )
    if part is None:
        raise ConvertError(
            f"{root / 'list_eval_partition.txt'} (or Eval/list_eval_partition.txt) not found: "
            "--src must be the In-shop Clothes Retrieval Benchmark folder (with img/ or Img/img/)"
        )
    base = root / "Img" if not (root / "img").is_dir() and (root / "Img" / "img").is_dir() else root
    out = Listing(eval_splits=("query", "gallery"))
    declared: int | None = None
    rows = 0
    for line_no, where, fields in _rows(part, out):
        if line_no == 1 and len(fields) == 1 and _int(fields[0]) is not None:
            declared = _int(fields[0])
            continue
        if line_no <= 2 and fields == ["image_name", "item_id", "evaluation_status"]:
            continue
        rows += 1
        if len(fields) != 3:
            out.skip(
                MALFORMED_LINE,
                where,
                f"expected 3 fields 'image_name item_id evaluation_status', got {len(fields)}",
            )
            continue
        rel, item_id, status = _safe_rel(fields[0]), fields[1], fields[2]
        if rel is None:
            out.skip(MALFORMED_LINE, where, f"path {fields[0]!r} leaves the archive folder")
            continue
        if status not in INSHOP_STATUSES:
            out.skip(
                MALFORMED_LINE,
                where,
                f"status {status!r} is not one of {', '.join(INSHOP_STATUSES)}",
            )
            continue
        parts = rel.parts
        if len(parts) >= 4:  # img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg
            what = f"{parts[1].lower()}'s {_words(parts[2]).lower()}"
        else:
            what = "clothing"
        out.items.append(
            Item(
                base / rel, item_id, status, f"a product photo of {what}", where, {"file": str(rel)}
            )
        )
    if declared is not None and declared != rows:
        out.notes.append(f"{part.name}: line 1 declares {declared} images, {rows} rows follow")
    return out


def list_imagefolder(src: str | os.PathLike) -> Listing:
    """A class-per-folder tree, with a split level when every top folder is a split name.

    Every file is an item or a skip (not an image, unsupported format, outside any class
    folder); hidden folders (``.git``, ``.ipynb_checkpoints``) are not entered, each noted.
    """
    root = Path(src)
    if not root.is_dir():
        raise ConvertError(f"{root} is not a folder: --src must be a class-per-folder image tree")
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not tops:
        raise ConvertError(
            f"{root} has no sub-folder: expected DIR/<class>/ or DIR/<split>/<class>/"
        )
    is_split = [p.name.lower() in SPLIT_NAMES for p in tops]
    if any(is_split) and not all(is_split):
        splits = [p.name for p, s in zip(tops, is_split) if s]
        others = [p.name for p, s in zip(tops, is_split) if not s]
        raise ConvertError(
            f"{root}: top folders mix split names ({', '.join(splits)}) and other names "
            f"({', '.join(others[:5])}); use DIR/<split>/<class>/ or DIR/<class>/ throughout"
        )
    bases = [(p.name, p) for p in tops] if all(is_split) else [("all", root)]
    out = Listing(eval_splits=tuple(s for s, _ in bases if s.lower() not in TRAIN_SPLITS))

    def visit(p: Path, split: str, base: Path) -> None:
        rel = p.relative_to(root).as_posix()
        ext = p.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            if ext in OTHER_IMAGE_EXTS:
                out.skip(UNSUPPORTED_FORMAT, rel, f".{ext}: only JPEG, PNG and WEBP are converted")
            else:
                out.skip(NOT_AN_IMAGE, rel, "not a .jpg/.jpeg/.png/.webp file")
            return
        cls_dir = p.parent.relative_to(base)
        if cls_dir == Path(".") or split == "":
            out.skip(NO_CLASS_FOLDER, rel, "not inside a class folder")
            return
        caption = f"a photo of a {_words(cls_dir.name)}"
        out.items.append(Item(p, cls_dir.as_posix(), split, caption, rel, {"file": rel}))

    if all(is_split):  # what lies beside the split folders belongs to no split
        for p in sorted(root.iterdir()):
            if not p.is_dir():
                visit(p, "", root)
            elif p.name.startswith("."):
                out.notes.append(f"hidden folder {p.name}/ not converted")
    for split, base in bases:
        for folder, dirs, files in os.walk(base):
            for d in sorted(d for d in dirs if d.startswith(".")):
                rel = (Path(folder) / d).relative_to(root).as_posix()
                out.notes.append(f"hidden folder {rel}/ not converted")
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                visit(Path(folder) / name, split, base)
    return out


# --------------------------------------------------------------------------------------
# the shared writer loop
# --------------------------------------------------------------------------------------


def sniff_format(data: bytes) -> str | None:
    """'jpg', 'png' or 'webp' from the magic bytes, else None (no decoder has run)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def load_image_file(args: tuple[str, int]) -> tuple[bytes | None, str, str, str]:
    """Read and fully check one image file: ``(bytes, ext, "", "")`` or ``(None, "", reason, detail)``.

    The bytes are returned unchanged; decoding them once here (header with the pixel limit,
    then all pixels) is what guarantees the eval stage will not meet a bad image later.
    """
    path, max_pixels = args
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None, "", MISSING_FILE, f"{path}: no such file"
    except OSError as e:
        return None, "", UNREADABLE_FILE, f"{path}: {type(e).__name__}: {e}"
    ext = sniff_format(data)
    if ext is None:
        return None, "", UNSUPPORTED_FORMAT, f"{path}: not JPEG, PNG or WEBP ({data[:8]!r}…)"
    try:
        img = open_image(data, max_pixels)
        if img.format != _PIL_FORMATS[ext]:
            return (
                None,
                "",
                UNDECODABLE_IMAGE,
                f"{path}: {ext} signature but decoded as {img.format}",
            )
        load_rgb(img)
    except ImageRejected as e:
        return None, "", e.reason, f"{path}: {e.detail}"
    return data, ext, "", ""


def _loaded(
    items: list[Item], max_pixels: int, workers: int
) -> Iterator[tuple[bytes | None, str, str, str]]:
    jobs = [(str(it.path), max_pixels) for it in items]
    if workers <= 1:
        yield from map(load_image_file, jobs)
        return
    ctx = get_context("spawn" if sys.platform == "darwin" else "fork")
    with ctx.Pool(workers) as pool:  # imap keeps the listing order
        yield from pool.imap(load_image_file, jobs, chunksize=16)


def _remove_previous(out: Path, name: str) -> None:
    """Delete what an earlier conversion of ``name`` into ``out`` wrote (its own list only),
    so a smaller rebuild leaves no stale shard behind."""
    old = out / SUMMARY_FILE
    try:
        prev = json.loads(old.read_text()) if old.is_file() else {}
    except (OSError, ValueError):
        prev = {}
    root = out.resolve()
    if prev.get("dataset") == name:
        for f in prev.get("files", []):
            p = Path(f).resolve()
            if p.is_relative_to(root) and p.suffix in (".tar", ".txt"):  # only what it wrote
                p.unlink(missing_ok=True)
    for p in out.glob(f"*/{name}-[0-9]*.tar"):
        p.unlink()


def write_converted(
    name: str,
    listing: Listing,
    src: str | os.PathLike,
    out: str | os.PathLike,
    shard_size: int = 1000,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Write the listing's images into OUT/<split>/ shards; count and name every skip.

    Returns the summary also written to OUT/_convert.json; raises :class:`ConvertError` (after
    writing it) when no image could be converted.
    """
    if shard_size < 1:
        raise ConvertError(f"--shard-size must be at least 1, got {shard_size}")
    t0 = time.perf_counter()
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    _remove_previous(out_path, name)
    n_workers = workers or min(4, os.cpu_count() or 1)
    writers: dict[str, ShardWriter] = {}
    per_class: dict[str, Counter] = {}
    skips = list(listing.skips)
    bar = tqdm(
        total=len(listing.items),
        desc=f"convert {name}",
        unit="img",
        disable=None,
        dynamic_ncols=True,
    )
    try:
        for n, (item, (data, ext, reason, detail)) in enumerate(
            zip(listing.items, _loaded(listing.items, max_pixels, n_workers))
        ):
            bar.update(1)
            if data is None:
                skips.append(Skip(reason, item.where, detail))
                continue
            w = writers.get(item.split)
            if w is None:
                w = ShardWriter(out_path / item.split, prefix=f"{name}-", maxcount=shard_size)
                writers[item.split] = w
            key = f"{n:09d}"
            meta = {"class": item.cls, "split": item.split, "caption": item.caption, "key": key}
            w.write(key, data, item.caption, {**meta, **item.meta}, image_ext=ext)
            per_class.setdefault(item.split, Counter())[item.cls] += 1
    except BaseException:
        for w in writers.values():
            w._abort()
        raise
    finally:
        bar.close()
    for w in writers.values():
        w.close()

    files: list[str] = []
    splits: dict[str, Any] = {}
    for split in sorted(writers):
        shards = [str(Path(s).resolve()) for s in writers[split].shards]
        lst = out_path / f"{split}.txt"
        write_text_atomic(lst, "".join(f"{s}\n" for s in shards))
        files += [*shards, str(lst)]
        splits[split] = {
            "samples": sum(per_class[split].values()),
            "classes": len(per_class[split]),
            "shards": len(shards),
            "list": str(lst),
        }
    eval_shards = [
        s for split in listing.eval_splits if split in writers for s in writers[split].shards
    ]
    eval_list = None
    if eval_shards:
        eval_list = out_path / "eval.txt"
        write_text_atomic(eval_list, "".join(f"{Path(s).resolve()}\n" for s in eval_shards))
        files.append(str(eval_list))
    reasons = Counter(s.reason for s in skips)
    summary: dict[str, Any] = {
        "dataset": name,
        "src": str(Path(src).resolve()),
        "out": str(out_path.resolve()),
        "listed": len(listing.items) + len(listing.skips),
        "written": sum(v["samples"] for v in splits.values()),
        "skipped": len(skips),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "splits": splits,
        "eval_splits": [s for s in listing.eval_splits if s in writers],
        "eval_shards": str(eval_list) if eval_list else None,
        "notes": list(listing.notes),
        "seconds": round(time.perf_counter() - t0, 3),
        "files": files,
        "skipped_items": [asdict(s) for s in skips],
    }
    write_json_atomic(out_path / SUMMARY_FILE, summary)
    print(format_summary(summary), file=sys.stderr)
    if not summary["written"]:
        raise ConvertError(
            f"{name}: no image could be converted from {src} "
            f"({', '.join(f'{r}={c}' for r, c in sorted(reasons.items())) or 'nothing listed'}); "
            f"every skipped item is listed in {out_path / SUMMARY_FILE}"
        )
    return summary


def format_summary(summary: dict[str, Any], per_reason: int = 5) -> str:
    """The lines printed at the end: what was written per split, and the skips by reason with
    the first few named (all of them are in _convert.json)."""
    name = summary["dataset"]
    parts = [
        f"{split} {v['samples']} images / {v['classes']} classes / {v['shards']} shards"
        for split, v in summary["splits"].items()
    ]
    lines = [
        f"{name}: wrote {summary['written']} of {summary['listed']} listed images "
        f"({'; '.join(parts) or 'none'}) in {summary['seconds']:.1f} s → {summary['out']}"
    ]
    if summary["skipped"]:
        by = ", ".join(f"{r}={c}" for r, c in summary["skipped_by_reason"].items())
        lines.append(f"{name}: skipped {summary['skipped']} ({by}):")
        shown: Counter = Counter()
        for s in summary["skipped_items"]:
            if shown[s["reason"]] < per_reason:
                lines.append(f"  {s['reason']}: {s['where']}: {s['detail']}")
            shown[s["reason"]] += 1
        for reason, c in shown.items():
            if c > per_reason:
                lines.append(f"  {reason}: … {c - per_reason} more")
    else:
        lines.append(f"{name}: nothing skipped")
    lines += [f"{name}: note: {n}" for n in summary["notes"]]
    if summary["eval_shards"]:
        lines.append(
            f"{name}: evaluation shards ({' + '.join(summary['eval_splits'])}): "
            f"data.eval_shards={summary['eval_shards']}"
        )
    lines.append(f"{name}: details in {Path(summary['out']) / SUMMARY_FILE}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# one function per dataset, and the entry point
# --------------------------------------------------------------------------------------


def convert_sop(src: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """Stanford Online Products → OUT/train, OUT/test (eval.txt = test; eval.protocol=all).

    ``kw``: ``shard_size``, ``workers``, ``max_pixels`` of :func:`write_converted`.
    """
    return write_converted("sop", list_sop(src), src, out, **kw)


def convert_cub(src: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """CUB-200-2011 → OUT/train (classes 1-100), OUT/test (101-200; eval.protocol=all)."""
    return write_converted("cub", list_cub(src), src, out, **kw)


def convert_cars(src: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """Cars196 → OUT/train (classes 1-98), OUT/test (99-196; eval.protocol=all)."""
    return write_converted("cars", list_cars(src), src, out, **kw)


def convert_inshop(src: str | os.PathLike, out: str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """In-Shop → OUT/train, OUT/query, OUT/gallery (eval.txt = query + gallery;
    eval.protocol=query_gallery)."""
    return write_converted("inshop", list_inshop(src), src, out, **kw)


def convert_imagefolder(
    src: str | os.PathLike, out: str | os.PathLike, **kw: Any
) -> dict[str, Any]:
    """A class-per-folder tree → OUT/<split>/ (eval.txt = every split but train)."""
    return write_converted("imagefolder", list_imagefolder(src), src, out, **kw)


CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "sop": convert_sop,
    "cub": convert_cub,
    "cars": convert_cars,
    "inshop": convert_inshop,
    "imagefolder": convert_imagefolder,
}


def convert(
    name: str, src: str | os.PathLike, out: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """``megaclass data NAME --src DIR --out DIR``: convert archive ``name`` (see CONVERTERS)."""
    if name not in CONVERTERS:
        raise ConvertError(f"unknown dataset {name!r}; choose one of {', '.join(CONVERTERS)}")
    if not Path(src).exists():
        raise ConvertError(f"--src {src} does not exist")
    return CONVERTERS[name](src, out, **kwargs)
