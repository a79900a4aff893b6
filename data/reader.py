"""Reading img2dataset-style WebDataset shards, one sample at a time, never crashing.

A shard is a tar whose members are grouped by key: ``<key>.jpg|jpeg|png|webp`` (image),
``<key>.txt`` (caption), ``<key>.json`` (metadata). The key is the member path up to the
first dot of its file name, as in webdataset. Members of one sample are expected to be
contiguous (the writer guarantees it); a key that shows up again later in the same shard is
a duplicate.

Every problem with a sample is a *skip with a reason* in a :class:`SampleStats` (reasons in
``data/stats.py``); nothing is raised and nothing is dropped silently:

``missing_image``, ``missing_caption``, ``bad_json`` (unparseable or not an object),
``too_many_pixels`` (checked from the header before any pixel is decoded),
``undecodable_image``, ``unsupported_format`` (an image Pillow could read but the pipeline
does not decode: only JPEG, PNG and WEBP, img2dataset's formats, ever reach a decoder, so an EPS
named ``.jpg`` is never handed to Ghostscript), ``duplicate_key``, ``oversized_file`` (a member
over ``max_file_bytes``, never read into memory), ``json_too_large`` (a ``.json`` over
``max_json_bytes``, never read), ``bad_key`` (a member name that is not UTF-8: a raw byte that
no parquet or JSON writer can store), ``bad_metadata`` (a json that parses but holds a lone
surrogate such as ``"\\ud800"``, which no UTF-8 writer accepts), ``truncated_tar`` (the samples
before the cut are kept, the one being assembled is counted), ``unreadable_shard`` (cannot be
opened or is not a tar at all; counted once per shard).

Why keys and metadata are checked here: one such sample used to reach the embed stage's parquet
writer and fail its whole shard; checked per sample, it is one counted skip in every stage.

Bounded memory per sample: only the members a stage uses (image extensions, ``txt``, ``json``)
are read, others are passed over unread and noted (``ignored_member``); a caption is read up to
``max_caption_bytes`` and cut at a character boundary when longer (noted ``caption_truncated``,
the sample is kept). Notes do not enter the counting rule below (``data/stats.py``).

Counting rule: every sample group (and every shard-level failure) adds one to
``stats.seen``; it then either adds one to ``stats.kept`` or one skip, so
``seen == kept + total_skipped`` holds after a shard is read to the end.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from megaclass.data.shards import open_shard
from megaclass.data.stats import SampleStats
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)
JSON_EXTS = ("json",)
USED_EXTS = IMAGE_EXTS + CAPTION_EXTS + JSON_EXTS
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Pillow formats that are decoded (img2dataset writes these); any other is ``unsupported_format``."""
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_FILE_BYTES = 256 << 20
DEFAULT_MAX_CAPTION_BYTES = 65536  # = DataConfig.max_caption_bytes
DEFAULT_MAX_JSON_BYTES = 1 << 20  # = DataConfig.max_json_bytes


@dataclass
class Sample:
    """One image–caption pair as read from a shard.

    ``image`` is an RGB PIL image when the reader decoded it, else ``None`` (the bytes are
    always there, and the header was already checked against the pixel limit).
    """

    key: str
    image: Image.Image | None
    image_bytes: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    shard: str = ""
    image_ext: str = ""
    opened: Image.Image | None = field(default=None, repr=False)
    """With ``decode=False``: the header-checked, not yet decoded image (see ``load_rgb``)."""


class ImageRejected(Exception):
    """Internal: why an image cannot be used (a reason string from REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def split_key(name: str) -> tuple[str, str]:
    """``dir/000123.jpg`` → (``dir/000123``, ``jpg``); the extension is lower-cased."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def set_pixel_guard(max_pixels: int) -> None:
    """Make PIL refuse images over ``max_pixels`` at open time (its decompression-bomb guard).

    PIL's own default (≈89 MP) would otherwise either reject images the config allows or let
    bigger ones through to a full decode.
    """
    Image.MAX_IMAGE_PIXELS = int(max_pixels)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format whose signature check accepts ``data``'s first bytes, else None.

    Only the plugins' ``accept`` prefix checks run (no header parsing, no decoder), so this is
    safe on untrusted bytes; an allowed format (``IMAGE_FORMATS``) wins over any other.
    """
    Image.init()
    prefix = data[:16]
    for fmt in (*IMAGE_FORMATS, *Image.ID):
        entry = Image.OPEN.get(fmt)
        accept = entry[1] if entry else None
        if accept is None:  # plugins without a signature check would claim any bytes
            continue
        try:
            if accept(prefix):
                return fmt
        except Exception:  # a plugin's check failing on odd bytes means "not mine"
            continue
    return None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel count; raises :class:`ImageRejected`.

    Only ``IMAGE_FORMATS`` are tried: bytes in another format Pillow knows are
    ``unsupported_format`` (found by signature alone, see :func:`sniff_format`) and never
    reach that format's parser or decoder.
    """
    if not data:
        raise ImageRejected("undecodable_image", "empty image file")
    set_pixel_guard(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_many_pixels", str(e)) from None
    except Exception as e:  # PIL raises many types for garbage input
        fmt = sniff_format(data)
        if fmt is not None and fmt not in IMAGE_FORMATS:
            raise ImageRejected(
                "unsupported_format", f"{fmt} image; only {', '.join(IMAGE_FORMATS)} are decoded"
            ) from None
        raise ImageRejected("undecodable_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageRejected("undecodable_image", f"bad size {w}x{h}")
    if w * h > max_pixels:
        raise ImageRejected("too_many_pixels", f"{w}x{h} > {max_pixels} pixels")
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB copy of ``img``; transparency is composited onto ``background`` (white by default)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels of an image from :func:`open_image`, as RGB; raises ImageRejected."""
    try:
        img.load()
        return to_rgb(img)
    except Exception as e:
        raise ImageRejected("undecodable_image", f"{type(e).__name__}: {e}") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode to RGB; raises :class:`ImageRejected` with the reason."""
    return load_rgb(open_image(data, max_pixels))


class _TailStream(io.RawIOBase):
    """Pass-through reader that remembers the last bytes it delivered.

    tarfile's stream mode ends quietly when a tar is cut at a member boundary or inside a
    header; keeping the tail lets the reader check for the end-of-archive block itself.
    """

    def __init__(self, raw, keep: int = 1 << 16) -> None:
        self.raw = raw
        self.keep = keep
        self.total = 0
        self.chunks: list[tuple[int, bytes]] = []
        self.kept_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        data = self.raw.read(n)
        if data:
            self.chunks.append((self.total, data))
            self.total += len(data)
            self.kept_bytes += len(data)
            while len(self.chunks) > 1 and self.kept_bytes - len(self.chunks[0][1]) >= self.keep:
                self.kept_bytes -= len(self.chunks.pop(0)[1])
        return data

    def drain(self, limit: int = 1 << 20) -> None:
        """Read to EOF (the zero padding after the last member), at most ``limit`` bytes."""
        while limit > 0:
            data = self.read(min(limit, 1 << 16))
            if not data:
                return
            limit -= len(data)

    def has_end_block(self, offset: int) -> bool:
        """True when the 512 bytes at ``offset`` were delivered and are all zero."""
        if self.total < offset + 512:
            return False
        tail = b"".join(c for _, c in self.chunks)
        start = offset - self.chunks[0][0]
        if start < 0:
            return True  # not kept any more: cannot tell, trust tarfile
        return not any(tail[start : start + 512])

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Group:
    __slots__ = ("key", "files", "exts", "ignored", "dup_ext", "oversized", "json_large", "cut")

    def __init__(self, key: str) -> None:
        self.key = key
        self.files: dict[str, bytes] = {}  # the members that were read, by extension
        self.exts: set[str] = set()  # used extensions seen (read or not), for duplicates
        self.ignored: list[str] = []  # extensions no stage reads (passed over unread)
        self.dup_ext = ""
        self.oversized = ""
        self.json_large = ""
        self.cut = False  # the caption member is longer than max_caption_bytes


def _utf8_ok(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _meta_ok(raw: bytes, meta: dict[str, Any]) -> bool:
    """Whether parsed json ``meta`` can be written back as UTF-8.

    The raw bytes were valid UTF-8, so a lone surrogate can only come from a ``\\u`` escape:
    only then is the whole object serialised to check (cheap for the usual json).
    """
    if b"\\u" not in raw:
        return True
    try:
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        return False
    return True


def _cut_utf8(data: bytes, limit: int) -> bytes:
    """The first at most ``limit`` bytes of ``data``, not splitting a UTF-8 character."""
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and cut > limit - 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1  # data[cut] continues a character that starts before the cut: drop it
    return data[:cut]


def _finish(
    g: _Group,
    url: str,
    stats: SampleStats,
    seen_keys: set[str],
    max_pixels: int,
    decode: bool,
    max_caption_bytes: int,
) -> Sample | None:
    """Validate one assembled group; count a skip and return None if it is bad."""
    stats.seen += 1
    if not _utf8_ok(g.key):
        stats.skip("bad_key", url, g.key, "member name is not valid UTF-8")
        return None
    if g.key in seen_keys or g.dup_ext:
        detail = "key seen earlier in the shard" if g.key in seen_keys else f"two .{g.dup_ext}"
        stats.skip("duplicate_key", url, g.key, detail)
        return None
    seen_keys.add(g.key)
    if g.oversized:
        stats.skip("oversized_file", url, g.key, g.oversized)
        return None
    ext = next((e for e in IMAGE_EXTS if e in g.files), "")
    if not ext:
        members = sorted(g.exts) + [f"{e} (ignored)" for e in g.ignored]
        stats.skip("missing_image", url, g.key, f"members: {members}")
        return None
    if g.json_large:
        stats.skip("json_too_large", url, g.key, g.json_large)
        return None
    meta: dict[str, Any] = {}
    if "json" in g.files:
        raw = g.files["json"]
        try:
            meta = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad utf-8, bad json, absurd nesting
            stats.skip("bad_json", url, g.key, f"{type(e).__name__}: {e}")
            return None
        if not isinstance(meta, dict):
            stats.skip("bad_json", url, g.key, f"json is a {type(meta).__name__}, not an object")
            return None
        if not _meta_ok(raw, meta):
            stats.skip("bad_metadata", url, g.key, "json holds a lone surrogate (not UTF-8)")
            return None
    caption = ""
    cut = g.cut
    if "txt" in g.files:
        raw_caption = _cut_utf8(g.files["txt"], max_caption_bytes)
        caption = raw_caption.decode("utf-8", errors="replace").strip()
    elif isinstance(meta.get("caption"), str):
        # img2dataset also stores the caption in the json
        encoded = meta["caption"].encode("utf-8")
        cut = len(encoded) > max_caption_bytes
        caption = _cut_utf8(encoded, max_caption_bytes).decode("utf-8").strip()
    if not caption:
        stats.skip("missing_caption", url, g.key, "no .txt and no json caption")
        return None
    data = g.files[ext]
    try:
        opened = open_image(data, max_pixels)
        image = load_rgb(opened) if decode else None
    except ImageRejected as e:
        stats.skip(e.reason, url, g.key, e.detail)
        return None
    stats.kept += 1
    if cut:
        stats.note("caption_truncated")
    return Sample(g.key, image, data, caption, meta, url, ext, None if decode else opened)


def iter_samples(
    url: str,
    stats: SampleStats,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: bool = True,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> Iterator[Sample]:
    """Yield the good samples of one shard in tar order; count every bad one in ``stats``.

    A member larger than ``max_file_bytes`` is never read into memory; its sample is
    skipped as ``oversized_file``. A ``.json`` over ``max_json_bytes`` is not read either
    (``json_too_large``); of a ``.txt`` only ``max_caption_bytes`` (+1, to find the cut) are
    read, whatever its size. Members of other extensions are passed over unread.

    With ``decode=False`` the image header is still checked (format recognised, pixel
    limit) but pixels are not decoded, so a later full decode can still fail with
    ``undecodable_image`` (the training loader counts that itself).
    """
    try:
        stream = _TailStream(open_shard(url))
    except Exception as e:
        stats.seen += 1
        stats.skip("unreadable_shard", url, None, f"{type(e).__name__}: {e}")
        log.warning("unreadable shard %s: %s", url, e)
        return
    members = 0
    group: _Group | None = None
    seen_keys: set[str] = set()

    def finish(g: _Group) -> Sample | None:
        return _finish(g, url, stats, seen_keys, max_pixels, decode, max_caption_bytes)

    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*", bufsize=1 << 16)
        except Exception as e:
            stats.seen += 1
            stats.skip("unreadable_shard", url, None, f"not a tar: {type(e).__name__}: {e}")
            log.warning("unreadable shard %s: %s", url, e)
            return
        name = ""
        try:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name
                key, ext = split_key(name)
                if key.rsplit("/", 1)[-1].startswith("._") or not ext:
                    continue  # macOS resource forks and extension-less junk are not samples
                if group is None or key != group.key:
                    if group is not None:
                        sample = finish(group)
                        if sample is not None:
                            yield sample
                    group = _Group(key)
                if ext not in USED_EXTS:
                    group.ignored.append(ext)
                    stats.note("ignored_member")
                    members += 1
                    continue  # tarfile skips the data without keeping it
                if ext in group.exts:
                    group.dup_ext = ext
                group.exts.add(ext)
                want = info.size
                if ext in CAPTION_EXTS:
                    want = min(info.size, max_caption_bytes + 1)  # +1: see where to cut
                    group.cut = info.size > max_caption_bytes
                elif ext in JSON_EXTS and info.size > max_json_bytes:
                    group.json_large = f"{name}: {info.size} bytes > {max_json_bytes}"
                    members += 1
                    continue
                elif info.size > max_file_bytes:
                    group.oversized = f"{name}: {info.size} bytes > {max_file_bytes}"
                    members += 1
                    continue
                f = tar.extractfile(info)
                data = f.read(want) if f is not None else b""
                if f is not None and len(data) != want:
                    raise EOFError(f"member {info.name} cut short")
                members += 1
                group.files[ext] = data
            if getattr(tar.fileobj, "comptype", "tar") == "tar":
                stream.drain()
                if not stream.has_end_block(tar.offset):
                    raise EOFError(f"no end-of-archive block at byte {tar.offset}")
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            cut_key = split_key(name)[0] if name else None
            if group is not None and cut_key is not None and cut_key != group.key:
                # the cut is inside the next sample's member: the pending one is whole
                sample = finish(group)
                if sample is not None:
                    yield sample
                group = _Group(cut_key)
            stats.seen += 1
            where = group.key if group is not None else None
            reason = "truncated_tar" if members else "unreadable_shard"
            stats.skip(reason, url, where, f"after {members} members: {type(e).__name__}: {e}")
            log.warning("%s in %s after %d members: %s", reason, url, members, e)
            return
        if group is not None:
            sample = finish(group)
            if sample is not None:
                yield sample
    finally:
        try:
            stream.close()
        except Exception as e:  # a failing pipe: command reports here
            stats.skip("unreadable_shard", url, None, f"close: {e}")
            stats.seen += 1
