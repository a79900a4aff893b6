"""Atomic, durable file output: write to a temporary name in the same folder, fsync, rename.

A reader never sees a half-written file under its final name, so a killed stage leaves
either the complete file or nothing (plus a stray ``.tmp-*`` that the next run ignores).

Why the fsyncs: a rename is atomic but not durable. After a node crash (power, kernel) the
page cache is lost, and without them a file can come back empty or short under its final name
while a completion marker written after it survives — the marker would vouch for data that is
not there. So :func:`atomic_path` makes the temporary file's data durable before the rename
and the rename itself (the folder entry) durable after it; every writer that goes through it
(``np.save``, parquet, npz, safetensors, ``torch.save``, JSON/text) gets this without doing
anything. Markers are written the same way and last, so a durable marker implies durable data.
The cost is measured by ``benchmarks/atomic_fsync.py`` (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Filesystems that cannot fsync a directory say so with one of these (e.g. some FUSE and
# network mounts); there the rename is as durable as that filesystem makes it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def fsync_file(path: str | Path) -> None:
    """Flush a closed file's data and metadata to stable storage.

    Why a fresh descriptor: writers such as ``np.save`` or ``save_file`` open and close the
    file themselves; on Linux ``fsync`` on any descriptor of the inode flushes its dirty pages.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (creations, renames, removals) durable."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:  # pragma: no cover - platform without directory descriptors
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (and ``root`` itself), files first.

    For outputs written by code we do not control (DeepSpeed's ``save_checkpoint``,
    ``ds_to_universal``) before their completion marker is written.
    """
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def makedirs_durable(folder: str | Path) -> None:
    """``mkdir -p`` whose new folders survive a crash (each new entry's parent is fsynced)."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    for d in reversed(missing):  # outermost new folder first: its parent existed before
        fsync_dir(d.parent)


_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (threads: Ray actors)."""
    global _UMASK
    if _UMASK is None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    _UMASK = int(line.split()[1], 8)
        except OSError:
            pass
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str = "", durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` if the block succeeds.

    ``suffix`` keeps an extension that a writer insists on (``np.save`` appends ``.npy``).
    With ``durable`` (default) the temporary file is fsynced before the rename and the folder
    after it, so once this block returns ``final`` survives a crash with its full content.
    ``durable=False`` exists for the benchmark's baseline and for scratch files only.
    """
    final = Path(final)
    if durable:
        makedirs_durable(final.parent)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        st = tmp_path.stat()
        if st.st_mode & 0o777 == 0o600:  # mkstemp's private mode, left by the writer:
            os.chmod(tmp_path, 0o666 & ~_umask())  # the mode a plain open() would give
        if durable:
            fsync_file(tmp_path)
        os.replace(tmp_path, final)
        if durable:
            fsync_dir(final.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:  # atomic_path fsyncs the data before the rename
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(final: str | Path, text: str) -> None:
    write_bytes_atomic(final, text.encode())


def write_json_atomic(final: str | Path, obj: Any) -> None:
    write_text_atomic(
        final, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    )


def _json_default(o: Any) -> Any:
    # numpy scalars and arrays show up in stats; keep the JSON plain.
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
