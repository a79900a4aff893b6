"""Shard specs: which tar files a stage reads, and how to open one.

A spec is what a user types in a config: brace-expandable paths or URLs
(``/data/{00000..41455}.tar``), several of them joined by ``::``, or a ``.txt`` file listing
one spec per line. ``pipe:CMD`` runs a shell command and reads its stdout (as webdataset
does); every other URL goes through fsspec, so ``s3://`` / ``gs://`` work once the matching
fsspec backend is installed.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path
from typing import IO

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


class ShardSpecError(ValueError):
    """A shard spec that expands to nothing or cannot be parsed."""


def braceexpand(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and ``{000..012}`` ranges (zero padding kept), left to right.

    Ranges keep the width of the wider bound, so ``{000..010}`` gives ``000 … 010``; this is
    how img2dataset names its shards.
    """
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        a, b = r.group(1).lstrip("-"), r.group(2).lstrip("-")
        padded = (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0")
        width = max(len(r.group(1)), len(r.group(2))) if padded else 0
        step = 1 if hi >= lo else -1
        items = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    out: list[str] = []
    for item in items:
        out.extend(braceexpand(head + item + tail))
    return out


def _is_list_file(part: str) -> bool:
    return part.endswith(".txt") and not part.startswith("pipe:") and "{" not in part


def _read_list_file(path: str) -> list[str]:
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rt") as f:
            text = f.read()
    else:
        text = Path(_local_path(path)).read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def expand_shards(spec: str) -> list[str]:
    """Turn a shard spec into the ordered list of shard URLs.

    ``::`` separates parts; each part is a ``.txt`` list file (one spec per line, ``#``
    comments allowed) or a brace pattern. Order is preserved and kept deterministic because
    the training loader derives its per-rank split from this order.
    """
    if not spec or not spec.strip():
        raise ShardSpecError("empty shard spec")
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if _is_list_file(part):
            for line in _read_list_file(part):
                urls.extend(expand_shards(line))
        else:
            urls.extend(braceexpand(part))
    if not urls:
        raise ShardSpecError(f"shard spec {spec!r} expands to no shards")
    return urls


def shard_stem(url: str) -> str:
    """File name of a shard without directory and tar extension: the ``<stem>`` of RUN files.

    ``pipe:aws s3 cp s3://b/x/00012.tar -`` → ``00012`` (the last token that looks like a tar).
    """
    name = url
    if url.startswith("pipe:"):
        tokens = [t for t in url[5:].split() if any(t.endswith(s) for s in _TAR_SUFFIXES)]
        name = tokens[-1] if tokens else url[5:].split()[-1]
    name = name.rstrip("/").rsplit("/", 1)[-1]
    name = name.split("?", 1)[0]
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


class _PipeStream(io.RawIOBase):
    """stdout of a ``pipe:`` command; a non-zero exit status surfaces as an OSError on close."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        assert self.proc.stdout is not None
        return self.proc.stdout.readinto(b)

    def close(self) -> None:
        if self.closed:
            return
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        rc = self.proc.wait()
        super().close()
        if rc != 0:
            raise OSError(f"pipe: command exited with status {rc}: {self.cmd}")


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for sequential binary reading (local path, ``file://``, ``pipe:``, fsspec).

    The caller closes the stream. Errors (missing file, unknown protocol) propagate; the
    reader turns them into an ``unreadable_shard`` count.
    """
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url[5:]), buffer_size=1 << 20)
    if "://" not in url or url.startswith("file://"):
        return open(os.path.expanduser(_local_path(url)), "rb", buffering=1 << 20)
    import fsspec

    return fsspec.open(url, "rb").open()
