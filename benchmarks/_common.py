"""What the partial-FC benchmarks share: memory probes, the gloo rank launcher and the memory formula.

Imported by ``benchmarks/partial_fc.py`` and ``benchmarks/partial_fc_chunked.py`` (run as scripts:
their folder is on ``sys.path``, and spawned rank processes inherit that path).
"""

from __future__ import annotations

import re
import resource

import torch.multiprocessing as mp
from megaclass.core.net import free_port

GB = 1e9


def peak_rss_gb() -> float:
    """The process's peak resident set (``ru_maxrss``, KiB on Linux) in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def status_gb(key: str) -> float:
    """VmRSS / VmHWM of this process in GB (Linux)."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024 / GB


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_gb() -> float:
    """MemAvailable of this machine in GB."""
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024 / GB


def spawn_ranks(worker, world: int, *args, timeout: float = 7200) -> list[dict]:
    """Run ``worker(rank, world, port, *args, queue)`` in ``world`` fresh spawned processes (one
    gloo rank each; fresh, so peak-memory figures belong to this configuration alone) and
    return the dict each put on the queue, sorted by its ``"rank"``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = sorted((q.get(timeout=timeout) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return res


def memory_formula(
    classes: int,
    gpus: int,
    d: int,
    batch: int,
    rate: float,
    opt_states: int,
    chunk: int | None = None,
    row_chunk: int | None = None,
) -> tuple[float, float]:
    """(static, working) bytes per rank, K = 1, fp32. static = C/N·D·4·(1 + optimizer states).
    Unchunked working = the B × S logits and probabilities (B·S·8) + S·D·16 (gathered rows,
    normalised rows, gradients). Class-chunked (``chunk``) working = B·chunk·8 (forward block +
    backward recompute) + 3·chunk·D·4 (a chunk's gathered rows, their gradient, its full-width
    copy) + S·D·4·(2 + optimizer states) (the sampled rows' gradient; the optimizer's gathered
    weight rows and state rows). Row-chunked (``row_chunk``) working = row_chunk·S·4 (the block,
    turned into probabilities in place) + S·D·4·(2 + optimizer states) (the forward's gathered
    rows and their gradient; then the gradient and the optimizer's gathered rows): the forward's
    and the optimizer's peaks added, so an upper bound."""
    local = classes / gpus
    s = rate * local
    static = local * d * 4 * (1 + opt_states)
    if row_chunk is not None:
        return static, min(row_chunk, batch) * s * 4 + s * d * 4 * (2 + opt_states)
    if chunk is None:
        return static, batch * s * 8 + s * d * 16
    c = min(chunk, s)
    return static, batch * c * 8 + 3 * c * d * 4 + s * d * 4 * (2 + opt_states)
