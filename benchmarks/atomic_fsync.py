"""Claim: making atomic_path durable (fsync the data before the rename, the folder after it)
costs little next to what is written — milliseconds per file, a fraction of a 64 MB write.

For each size (a small 4 KB JSON-like file, a 64 MB array file) the same writer runs through
``atomic_path(..., durable=True)`` and ``durable=False``, alternating to spread the noise of a
shared machine, in a folder on the filesystem under test (``--dir``; the default is a temporary
folder next to this script, i.e. the repository's disk — not /tmp, which may be tmpfs where
fsync is free). Prints the median time per file of each, the difference, and the filesystem
type. Also prints the sha256 rate of ``training.checkpoint.file_digest`` (the checkpoint file
record) on the 64 MB file, read from the page cache.

    .venv/bin/python benchmarks/atomic_fsync.py [--dir PATH] [--small 200] [--large 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from megaclass.core.atomic import atomic_path
from megaclass.training.checkpoint import file_digest


def fs_type(path: Path) -> str:
    """Filesystem type of ``path`` from /proc/mounts (longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, f"{typ} ({dev} on {mnt})"
    except OSError:
        pass
    return kind


def write_once(folder: Path, name: str, data: bytes, durable: bool) -> float:
    t0 = time.perf_counter()
    with atomic_path(folder / name, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return time.perf_counter() - t0


def measure(folder: Path, data: bytes, n: int) -> dict[bool, list[float]]:
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(n):
        for durable in (i % 2 == 0, i % 2 == 1):  # alternate which one goes first
            times[durable].append(write_once(folder, f"f{i % 4}.bin", data, durable))
    return times


def report(label: str, times: dict[bool, list[float]]) -> None:
    d, nd = statistics.median(times[True]), statistics.median(times[False])
    print(
        f"{label:>10}: fsync {d * 1e3:9.2f} ms   no fsync {nd * 1e3:9.2f} ms   "
        f"difference {(d - nd) * 1e3:+9.2f} ms per file   ({len(times[True])} files each)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="folder on the filesystem to measure")
    ap.add_argument("--small", type=int, default=200, help="small files per variant")
    ap.add_argument("--large", type=int, default=5, help="64 MB files per variant")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix=".atomic-fsync-", dir=base) as tmp:
        folder = Path(tmp)
        print(f"folder: {folder}  filesystem: {fs_type(folder)}")
        print(f"load average (1, 5, 15 min): {os.getloadavg()}")
        small = (b'{"key": "value", "n": 12345}\n' * 142)[:4096]
        report("4 KB", measure(folder, small, args.small))
        large = os.urandom(64 << 20)
        report("64 MB", measure(folder, large, args.large))
        path = folder / "f0.bin"
        file_digest(path)  # warm the page cache
        t0 = time.perf_counter()
        size, _ = file_digest(path)
        dt = time.perf_counter() - t0
        print(f"    sha256: {size / dt / 1e9:.2f} GB/s (file_digest, 64 MB from the page cache)")


if __name__ == "__main__":
    main()
