"""Writing WebDataset shards that the reader (and webdataset, and img2dataset tools) accept.

Guarantees: shard names are deterministic (``<prefix>000000.tar``, ``<prefix>000001.tar`` …);
a sample's files are contiguous and in a fixed order (image, txt, json); every shard is
written under a temporary name and renamed when complete, so a crash leaves only whole
shards; member headers carry no time, user or group, so the same input gives byte-identical
shards; limits per shard by sample count and by bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_image(image: Image.Image, ext: str = "jpg", quality: int = 90) -> bytes:
    """Encode a PIL image to ``ext`` bytes deterministically (no EXIF, fixed quality)."""
    fmt = _FORMATS.get(ext.lower())
    if fmt is None:
        raise ValueError(f"unsupported image extension {ext!r}; use one of {sorted(_FORMATS)}")
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": quality} if fmt in ("JPEG", "WEBP") else {"optimize": False}
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShardWriter:
    """Write samples into numbered tar shards under ``out_dir``.

    >>> with ShardWriter("out/train", prefix="demo-", maxcount=500) as w:
    ...     w.write("000000001", pil_image, "a red circle", {"class": "red-circle"})

    ``image`` may be a PIL image (encoded as ``image_ext``) or already-encoded bytes (then
    ``image_ext`` names their format). Keys must be unique within a shard (across shards
    too, which the writer checks) and must not contain a dot in their last path component
    (the reader splits the key at the first dot). ``shards`` lists the completed shard paths.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "",
        maxcount: int = 1000,
        maxsize: int = 1 << 30,
        image_ext: str = "jpg",
        quality: int = 90,
        start_index: int = 0,
    ) -> None:
        if maxcount < 1:
            raise ValueError(f"maxcount must be ≥ 1, got {maxcount}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.maxcount = maxcount
        self.maxsize = maxsize
        self.image_ext = image_ext
        self.quality = quality
        self.index = start_index
        self.shards: list[str] = []
        self.total = 0
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._size = 0

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    # -- writing -----------------------------------------------------------------------
    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.prefix}{index:06d}.tar"

    def write(
        self,
        key: str,
        image: Image.Image | bytes,
        caption: str,
        meta: dict[str, Any] | None = None,
        image_ext: str | None = None,
    ) -> None:
        """Append one sample (image, caption and json metadata) as contiguous members."""
        ext = (image_ext or self.image_ext).lower()
        if isinstance(image, Image.Image):
            data = encode_image(image, ext, self.quality)
        elif isinstance(image, bytes | bytearray):
            data = bytes(image)
        else:
            raise TypeError(f"sample {key!r}: image must be a PIL image or bytes")
        if not isinstance(caption, str):
            raise TypeError(f"sample {key!r}: caption must be a str")
        files = {ext: data, "txt": caption.encode("utf-8")}
        if meta is not None:
            files["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        self.write_files(key, files)

    def write_files(self, key: str, files: dict[str, bytes]) -> None:
        """Append raw members ``<key>.<ext>`` in the given order (for tools and test fixtures)."""
        if not key or "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"bad sample key {key!r}: must be non-empty without a dot")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} (shard {self.shard_path(self.index)})")
        nbytes = sum(len(v) + 512 for v in files.values())
        if self._tar is not None and (
            self._count >= self.maxcount or self._size + nbytes > self.maxsize
        ):
            self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            info.uid = info.gid = 0
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        self._size += nbytes
        self.total += 1

    def close(self) -> None:
        """Finish the open shard (rename it into place). Idempotent."""
        if self._tar is not None:
            self._finish_shard()

    # -- internals ---------------------------------------------------------------------
    def _open_shard(self) -> None:
        final = self.shard_path(self.index)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=self.out_dir)
        os.close(fd)
        self._tmp = Path(tmp)
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._size = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.shard_path(self.index)
        os.chmod(self._tmp, 0o666 & ~_umask())  # mkstemp makes 0600; shards are shared data
        os.replace(self._tmp, final)
        self.shards.append(str(final))
        self._tar = None
        self._tmp = None
        self.index += 1

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tmp = None
