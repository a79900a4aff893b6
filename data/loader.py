"""Streaming training loader, world-size invariant, exactly resumable: :class:`TrainLoader`.

Usage (what the train stage does)::

    loader = TrainLoader(
        "/data/{00000..00099}.tar", batch_size=256,
        rank=rank, world_size=world_size, num_workers=4, seed=cfg.seed,
        virtual_streams=64,                           # the unit of the world-size-free order
        transform=encoder.transform_train,            # PIL RGB image -> tensor
        labels_dir=run.labels_dir, centroid_sha=sha,  # sidecars RUN/labels/<stem>.parquet
        num_labels=None,                              # None: label (B,) = cls; l: (B, l) top-l
    )
    loader.load_state_dict(state)                     # optional: resume (a merged state)
    for batch in loader:                              # one epoch from the current position
        batch["image"], batch["label"], batch["key"], batch["caption"]
        ...
    part = loader.state_dict()                        # this rank's part, after a consumed batch
    state = TrainLoader.merge_states(all_ranks_parts) # world-size free; saved once

**The global sample sequence** is a pure function of (seed, shard list, V = virtual streams),
never of the number of ranks R or loader workers:

1. **Virtual streams.** Epoch ``e`` permutes the shard list with ``(seed, e)`` and deals it to
   ``V_eff`` streams: stream ``s`` reads ``perm[s::V_eff]``. ``V_eff`` is the largest divisor
   of V that is at most the number of shards (so no stream is empty; V itself with thousands
   of shards). In resampled mode each stream instead draws shards with replacement forever
   from ``(seed, e, s)`` (open_clip style) and ``V_eff = V``.
2. **Per stream:** read + label join (:func:`megaclass.data.reader.iter_samples`, header
   checked, not decoded; sidecar ``labels_dir/<stem>.parquet`` read when a shard is opened,
   another centroid sha raises :class:`LabelShaMismatchError`; a sample without a label row
   is skipped as ``missing_label``), then a seeded shuffle buffer of ``shuffle_buffer``
   samples (its own, seeded by ``(seed, e, s)``; a rank holds ``V_eff / R`` of them).
3. **Round robin.** Global sample ``n`` of the epoch (n = 0, 1, 2, …) is the next sample of
   stream ``n mod V_eff``. Global batch ``b`` of size G is samples ``[b·G, (b+1)·G)`` in this
   order — so it depends on the global batch size, not on how it is split.
4. **Decode + transform** after the buffer, so skipped-over samples are never decoded. A
   decode failure is skipped as ``undecodable_image`` and the same stream fills the slot with
   its next sample. Random augmentations are seeded per sample from (seed, epoch, stream,
   draw index within the stream) — never from rank or worker.

**Ranks and workers.** Rank ``r`` of R (R must divide ``V_eff``) owns streams ``r::R`` and
the global positions ``n ≡ r (mod R)``: its local sample ``i`` is global sample ``r + i·R``
(stream ``(r + i·R) mod V_eff``). It reads only those streams. Its batches are consecutive
``batch_size`` local samples, so micro-batch ``t`` of all ranks together is the contiguous
global range ``[t·B·R, (t+1)·B·R)`` and global key order is ``key[j] = rank (j mod R)'s
key[j // R]`` (:func:`global_order`). Loader workers of a rank split its streams (stream
position ``p`` of the rank's list goes to worker ``p mod W``); each worker sends its slots of
every batch and the main process places them — the batch is the same for any W.

**Epoch end.** A rank's epoch ends at its first batch that a stream cannot fill (the stream
ran dry) — with ``drop_last=False`` that batch is still yielded, short, holding the slots
before the first unfilled one (the same for any worker count) — or after
``batches_per_epoch`` batches (resampled mode: endless by default). With
several ranks, the trainer ends everyone's epoch at the first *global* batch that any rank
cannot fill (one tiny all-reduce per step, then :meth:`TrainLoader.set_epoch`) — so the epoch
end, too, is a property of the global sequence. Streams hold nearly equal shard counts, so
the data left unread at an epoch end is about one shard per stream (other shards next epoch).

**Resume.** :meth:`state_dict` is this rank's part: the epoch, the global position (samples
of the epoch consumed by all ranks together), and per owned stream the number of samples
drawn from its shuffle buffer — no rank or worker numbers. :meth:`merge_states` joins the
ranks' parts (stats summed); :meth:`load_state_dict` of a merged state at any R that divides
``V_eff`` continues with exactly the samples (and tensors) an uninterrupted loader would have
produced: each stream replays reading and shuffling without decoding its first ``drawn``
samples, so replay cost is proportional to the position within the epoch. A state of
another seed, shard list, V, buffer or mode (or of the old per-rank format) warns and
restarts at the next epoch boundary.

**Stats.** ``loader.stats`` (:class:`SampleStats`) counts every skipped sample by reason
and shard, for the consumed part of the stream; it is part of the state (on a resume the
merged counts go to rank 0).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megaclass.core.workspace import Workspace
from megaclass.data.labels import check_label_sha, label_path, read_labels
from megaclass.data.reader import (
    DEFAULT_MAX_CAPTION_BYTES,
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    iter_samples,
    load_rgb,
)
from megaclass.data.shards import expand_shards, shard_stem
from megaclass.data.stats import SampleStats
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

STATE_VERSION = 2
DEFAULT_VIRTUAL_STREAMS = 64
_MASK64 = (1 << 64) - 1


class VirtualStreamsError(ValueError):
    """The world size does not divide the (effective) number of virtual streams."""


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps); stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def effective_streams(virtual_streams: int, num_shards: int, resampled: bool) -> int:
    """V_eff: the largest divisor of ``virtual_streams`` that is ≤ ``num_shards`` (every stream
    gets a shard); ``virtual_streams`` itself in resampled mode. A function of the config and
    the shard list only, so it is the same at every world size."""
    if resampled or num_shards >= virtual_streams:
        return virtual_streams
    return max(d for d in range(1, num_shards + 1) if virtual_streams % d == 0)


def global_order(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """The global order of one global batch from the ranks' parts (rank order): element ``j`` is
    rank ``j mod R``'s element ``j // R`` (every part has the same length)."""
    R = len(parts)
    n = sum(len(p) for p in parts)
    return [parts[j % R][j // R] for j in range(n)]


class _EventStats(SampleStats):
    """Worker-side stats: records skip events and notes to ship with the next batch."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str | None, str]] = []

    def skip(self, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
        self.events.append((reason, shard, key, detail[:200]))

    def drain(self) -> tuple[int, int, list, dict[str, int]]:
        out = (self.seen, self.kept, self.events, dict(self.noted))
        self.seen, self.kept, self.events = 0, 0, []
        self.noted.clear()
        return out


@dataclass
class _Item:
    """What a worker sends per batch: its slots of the batch (or None at the end), samples
    drawn per stream for them, stats delta, end flag."""

    worker: int
    part: dict[str, Any] | None
    drawn: dict[int, int]
    seen: int
    kept: int
    events: list
    noted: dict[str, int]
    end: bool = False
    dry: int | None = None  # the slot at which a stream ran dry (the part holds slots < it)


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class _LabelledStream:
    """Samples of a list of shards, each joined to its shard's label sidecar."""

    def __init__(self, loader_cfg: _StreamConfig, stats: SampleStats) -> None:
        self.c = loader_cfg
        self.stats = stats

    def shard_labels(self, url: str) -> tuple[dict[str, int], np.ndarray] | None:
        path = label_path(self.c.labels_dir, shard_stem(url))
        if not path.exists():
            log.warning("no label sidecar %s for shard %s: its samples are skipped", path, url)
            return None
        table = read_labels(path, self.c.centroid_sha)
        if self.c.num_labels is not None:
            if table.labels.shape[1] < self.c.num_labels:
                raise ValueError(
                    f"{path}: has top-{table.labels.shape[1]} labels, "
                    f"num_labels={self.c.num_labels} requested"
                )
            labels = table.labels[:, : self.c.num_labels]
        else:
            labels = table.labels[:, 0]
        return table.index(), labels

    def __call__(self, urls: Iterator[str]) -> Iterator[tuple]:
        c, stats = self.c, self.stats
        for url in urls:
            joined = None
            if c.labels_dir is not None:
                joined = self.shard_labels(url)
            samples = iter_samples(
                url,
                stats,
                max_pixels=c.max_pixels,
                decode=False,
                max_caption_bytes=c.max_caption_bytes,
                max_json_bytes=c.max_json_bytes,
            )
            for s in samples:
                label = None
                if c.labels_dir is not None:
                    row = joined[0].get(s.key) if joined is not None else None
                    if row is None:
                        stats.kept -= 1
                        why = "no row in sidecar" if joined is not None else "no sidecar"
                        stats.skip("missing_label", url, s.key, why)
                        continue
                    label = joined[1][row]
                yield (s.key, s.caption, s.opened, label, url)


def _shuffled(it: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Seeded shuffle buffer: once full, emit a random slot and put the new sample there."""
    if size <= 1:
        yield from it
        return
    buf: list[Any] = []
    for x in it:
        if len(buf) < size:
            buf.append(x)
            continue
        i = int(rng.integers(size))
        out, buf[i] = buf[i], x
        yield out
    order = rng.permutation(len(buf))
    for i in order:
        yield buf[i]


@dataclass
class _StreamConfig:
    shards: list[str]
    batch_size: int
    rank: int
    world_size: int
    workers: int  # effective: max(1, min(num_workers, streams per rank))
    seed: int
    streams: int  # V_eff
    transform: Callable[[Any], Any] | None
    labels_dir: str | None
    centroid_sha: str | None
    num_labels: int | None
    shuffle_buffer: int
    shuffle_shards: bool
    resampled: bool
    batches_per_epoch: int | None
    drop_last: bool
    max_pixels: int
    seed_transforms: bool
    max_caption_bytes: int
    max_json_bytes: int

    @property
    def mine(self) -> list[int]:
        """This rank's streams, in the order of its local samples."""
        return list(range(self.rank, self.streams, self.world_size))


class _Starvation:
    """Resampled mode draws shards forever; if every sample of every draw is skipped (no label
    sidecars, all samples rejected) the stream would loop silently. Stop with an error after
    ``3 × len(shards)`` (at least 10) consecutive shard draws that gave no usable sample."""

    def __init__(self, c: _StreamConfig, stream: int) -> None:
        self.c, self.stream = c, stream
        self.limit = max(10, 3 * len(c.shards))
        self.draws_since_sample = 0

    def shards(self, urls: Iterator[str]) -> Iterator[str]:
        for url in urls:
            if self.draws_since_sample >= self.limit:
                raise RuntimeError(
                    f"TrainLoader (virtual stream {self.stream}): "
                    f"{self.draws_since_sample} shard draws in a row gave no usable sample "
                    f"(resampled mode would loop forever): every sample was skipped — check "
                    f"that labels_dir={self.c.labels_dir!r} has a sidecar per shard, and the "
                    f"skip reasons in the loader stats"
                )
            self.draws_since_sample += 1
            yield url

    def samples(self, items: Iterator[tuple]) -> Iterator[tuple]:
        for item in items:
            self.draws_since_sample = 0
            yield item


class _WorkerStreams(IterableDataset):
    """The per-worker part of a rank's batches; iterated inside DataLoader workers or in-process."""

    def __init__(
        self, cfg: _StreamConfig, epoch: int, local: int, drawn: dict[int, int], batches: int
    ):
        super().__init__()
        self.cfg, self.epoch, self.local = cfg, epoch, local
        self.drawn, self.batches = drawn, batches

    # -- one virtual stream ---------------------------------------------------------------
    def stream_shards(self, stream: int) -> Iterator[str]:
        c = self.cfg
        if c.resampled:
            rng = np.random.default_rng([c.seed, self.epoch, stream, 0x5E5A])
            while True:
                yield c.shards[int(rng.integers(len(c.shards)))]
        order = np.arange(len(c.shards))
        if c.shuffle_shards:
            order = np.random.default_rng([c.seed, self.epoch, 0x5A4D]).permutation(order)
        yield from (c.shards[i] for i in order[stream :: c.streams])

    def samples(self, stream: int, stats: SampleStats) -> Iterator[tuple]:
        """Stream ``stream``'s undecoded samples after its shuffle buffer."""
        c = self.cfg
        labelled = _LabelledStream(c, stats)
        if c.resampled:  # endless shard draws: an all-skipped stream would spin forever
            starve = _Starvation(c, stream)
            raw = starve.samples(labelled(starve.shards(self.stream_shards(stream))))
        else:
            raw = labelled(self.stream_shards(stream))
        rng = np.random.default_rng([c.seed, self.epoch, stream, 0xB0F])
        return _shuffled(raw, c.shuffle_buffer, rng)

    # -- the worker's part of every batch --------------------------------------------------
    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        if info is not None:
            if info.num_workers != self.cfg.workers:
                raise RuntimeError(f"expected {self.cfg.workers} workers, got {info.num_workers}")
            yield from self.stream(info.id, in_process=False)
        else:
            yield from self.stream(0, in_process=True)

    def stream(self, worker: int, in_process: bool) -> Iterator[_Item]:
        c = self.cfg
        mine = c.mine
        K, W, B = len(mine), c.workers, c.batch_size
        stats = _EventStats()
        draws: dict[int, Iterator[tuple]] = {}
        index: dict[int, int] = {}
        for p in range(worker, K, W):  # this worker's streams; fast-forward without decoding
            s = mine[p]
            it = self.samples(s, stats)
            n = 0
            for _ in range(self.drawn.get(s, 0)):
                if next(it, None) is None:
                    break
                n += 1
            draws[p], index[p] = it, n
        stats.drain()  # those skips were counted before the state was saved
        limit = c.batches_per_epoch
        nbatches, local = self.batches, self.local
        # slot j of a batch starting at local sample i comes from stream position (i + j) mod K
        while limit is None or nbatches < limit:
            batch: list[tuple] = []
            slots: list[int] = []
            delta: dict[int, int] = {}
            j = (worker - local) % W if K % W == 0 else 0
            step = W if K % W == 0 else 1
            while j < B:
                p = (local + j) % K
                if p % W != worker:
                    j += step
                    continue
                s = mine[p]
                while True:  # the stream fills its slot with its next decodable sample
                    x = next(draws[p], None)
                    if x is None:  # the stream ran dry: this rank's epoch ends here
                        part = self.collate(batch, slots)
                        yield _Item(worker, part, delta, *stats.drain(), end=True, dry=j)
                        return
                    i = index[p]
                    index[p] = i + 1
                    delta[s] = delta.get(s, 0) + 1
                    key, caption, opened, label, url = x
                    try:
                        image = load_rgb(opened)
                    except ImageRejected as e:
                        stats.kept -= 1
                        stats.skip(e.reason, url, key, e.detail)
                        continue
                    break
                if c.transform is not None:
                    image = self._transform(image, s, i, in_process)
                batch.append((image, label, key, caption))
                slots.append(j)
                j += step
            yield _Item(worker, self.collate(batch, slots), delta, *stats.drain())
            nbatches += 1
            local += B
        yield _Item(worker, None, {}, *stats.drain(), end=True)

    def _transform(self, image: Any, stream: int, index: int, in_process: bool) -> Any:
        c = self.cfg
        assert c.transform is not None
        if not c.seed_transforms:
            return c.transform(image)
        saved = torch.random.get_rng_state() if in_process else None
        # the CPU generator only: torch.manual_seed would also queue lazy CUDA/MPS/XPU seeding
        # calls that capture a Python traceback each time (≈1 ms per sample)
        torch.default_generator.manual_seed(_mix(c.seed, self.epoch, stream, index))
        try:
            return c.transform(image)
        finally:
            if saved is not None:
                torch.random.set_rng_state(saved)

    def collate(self, batch: list[tuple], slots: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {"slots": slots}
        if not batch:
            return out
        images = [b[0] for b in batch]
        out["image"] = torch.stack(images) if isinstance(images[0], torch.Tensor) else images
        out["key"] = [b[2] for b in batch]
        out["caption"] = [b[3] for b in batch]
        if self.cfg.labels_dir is not None:
            out["label"] = np.stack([b[1] for b in batch]).astype(np.int64)
        return out


def _trim(part: dict[str, Any], cut: int) -> dict[str, Any]:
    """The samples of a worker's part that sit in slots before ``cut``."""
    keep = [k for k, j in enumerate(part["slots"]) if j < cut]
    if len(keep) == len(part["slots"]):
        return part
    out: dict[str, Any] = {"slots": [part["slots"][k] for k in keep]}
    if keep:
        img = part["image"]
        out["image"] = img[keep] if isinstance(img, torch.Tensor) else [img[k] for k in keep]
        out["key"] = [part["key"][k] for k in keep]
        out["caption"] = [part["caption"][k] for k in keep]
        if "label" in part:
            out["label"] = part["label"][keep]
    return out


def _assemble(
    parts: list[dict[str, Any]], size: int, labelled: bool, ws: Workspace | None = None
) -> dict[str, Any]:
    """One batch from the workers' parts: each part's samples go to its slots. The batch tensor
    comes from ``ws`` when given: a buffer the consumer no longer holds is reused instead of
    page-faulting a fresh one per batch (38 MB at 64 × 3 × 224²; BENCHMARKS.md, loader)."""
    parts = [p for p in parts if p.get("slots")]
    if len(parts) == 1:  # one worker (or one with every slot): already in slot order
        p = parts[0]
        out = {"image": p["image"], "key": p["key"], "caption": p["caption"]}
        if labelled:
            out["label"] = torch.from_numpy(p["label"])
        return out
    keys: list[Any] = [None] * size
    caps: list[Any] = [None] * size
    first = parts[0]["image"]
    tensor = isinstance(first, torch.Tensor)
    shape = (size, *first.shape[1:])
    if not tensor:
        images: Any = [None] * size
    elif ws is not None:
        images = ws.get(shape, first.dtype, first.device)
    else:
        images = torch.empty(shape, dtype=first.dtype)
    labels = np.empty((size, *parts[0]["label"].shape[1:]), np.int64) if labelled else None
    for p in parts:
        slots = p["slots"]
        if tensor:
            s0, n = slots[0], len(slots)
            st = slots[1] - s0 if n > 1 else 1
            if slots == list(range(s0, s0 + st * n, st)):  # the usual case: every W-th slot
                images[s0 : s0 + st * (n - 1) + 1 : st] = p["image"]  # a strided copy
            else:
                images[torch.as_tensor(slots)] = p["image"]
        for k, j in enumerate(slots):
            keys[j], caps[j] = p["key"][k], p["caption"][k]
            if not tensor:
                images[j] = p["image"][k]
        if labels is not None:
            labels[slots] = p["label"]
    out = {"image": images, "key": keys, "caption": caps}
    if labels is not None:
        out["label"] = torch.from_numpy(labels)
    return out


class TrainLoader:
    """Streaming, label-joining, world-size-invariant, exactly resumable training loader (see
    the module docstring).

    Args:
        shards: a shard spec (``expand_shards``) or a list of URLs.
        batch_size: samples per batch (per rank); the global batch is ``batch_size × world_size``
            consecutive global samples.
        rank, world_size: this process's data-parallel rank; default from torch.distributed
            when initialised, else 0 / 1. ``world_size`` must divide the effective number of
            virtual streams (:class:`VirtualStreamsError` otherwise).
        num_workers: DataLoader worker processes (0 = in the main process); at most the rank's
            number of streams are started.
        seed: base seed of the shard permutation, shuffle buffers and augmentation RNG.
        virtual_streams: V, the number of virtual streams (the unit the order is made of and
            the most ranks that can share it; see :func:`effective_streams`). The trainer passes
            ``train.virtual_streams`` (default :data:`DEFAULT_VIRTUAL_STREAMS`). None: one
            stream per rank and worker (``world_size × max(1, num_workers)``) — the topology of
            the loader before virtual streams, for direct single-job use; its order then
            depends on the world size.
        transform: callable PIL RGB image → tensor (e.g. a torchvision.transforms.v2 pipeline).
        labels_dir: folder of label sidecars; None = no labels (no ``label`` in batches).
        centroid_sha: expected ``centroid_sha256`` of every sidecar (None = not checked).
        num_labels: None → ``label`` is (B,) = cls; l → (B, l) top-l labels (MLCD).
        shuffle_buffer: samples in each virtual stream's shuffle buffer (0 = stream order).
        shuffle_shards: permute the shard list every epoch (from seed and epoch).
        resampled: draw shards with replacement (open_clip's resampled mode).
        batches_per_epoch: end an epoch after this many batches per rank (None = when a stream
            runs dry; in resampled mode None means endless).
        drop_last: end the epoch at the first batch a stream cannot fill without yielding it
            (what a distributed job needs: equal batches everywhere). False: that last batch is
            yielded short, holding the slots before the first one that could not be filled.
        max_pixels: images with more pixels are skipped (``too_many_pixels``).
        max_caption_bytes, max_json_bytes: ``data.max_caption_bytes`` / ``data.max_json_bytes``
            (captions cut there and noted ``caption_truncated``; larger ``.json`` members never
            read, the sample skipped as ``json_too_large``), as the embed stage applies them.
        check_labels: check every sidecar's sha before the first batch. Off by default: each
            sidecar's sha is checked when its shard is first opened (the same error, raised
            then), so start-up costs no file access per shard — at 41,456 shards on object
            storage the eager check took minutes per rank before the first step.
        seed_transforms: seed torch's RNG per sample so augmentations are reproducible.
        prefetch_factor: batches each worker prepares ahead (DataLoader gets ``× workers``
            items: a worker's item is its share of one batch).
        pin_memory, multiprocessing_context: passed to torch DataLoader.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        virtual_streams: int | None = None,
        transform: Callable[[Any], Any] | None = None,
        labels_dir: str | Path | None = None,
        centroid_sha: str | None = None,
        num_labels: int | None = None,
        shuffle_buffer: int = 256,
        shuffle_shards: bool = True,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
        drop_last: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        check_labels: bool = False,
        seed_transforms: bool = True,
        prefetch_factor: int | None = 2,
        pin_memory: bool = False,
        multiprocessing_context: Any = None,
    ) -> None:
        urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
        if not urls:
            raise ValueError("TrainLoader: no shards")
        if rank is None or world_size is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
            else:
                rank, world_size = 0, 1
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainLoader: rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"TrainLoader: batch_size must be ≥ 1, got {batch_size}")
        if num_labels is not None and num_labels < 1:
            raise ValueError(f"TrainLoader: num_labels must be ≥ 1 or None, got {num_labels}")
        if virtual_streams is None:
            virtual_streams = world_size * max(1, num_workers)
        if virtual_streams < 1:
            raise VirtualStreamsError(f"virtual_streams must be ≥ 1, got {virtual_streams}")
        streams = effective_streams(virtual_streams, len(urls), resampled)
        if streams % world_size:
            few = (
                f" ({len(urls)} shards leave {streams} usable)" if streams < virtual_streams else ""
            )
            raise VirtualStreamsError(
                f"virtual_streams={virtual_streams}{few} is not divisible by the world size "
                f"{world_size}: choose a number of ranks that divides {streams} (or another "
                "virtual_streams, which changes the sample order)"
            )
        per_rank = streams // world_size
        workers = max(1, min(num_workers, per_rank))
        if num_workers > per_rank:
            log.info(
                "TrainLoader: %d workers requested, %d streams per rank: starting %d",
                num_workers, per_rank, workers,
            )  # fmt: skip
        self.cfg = _StreamConfig(
            shards=urls,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            workers=workers,
            seed=seed,
            streams=streams,
            transform=transform,
            labels_dir=str(labels_dir) if labels_dir is not None else None,
            centroid_sha=centroid_sha,
            num_labels=num_labels,
            shuffle_buffer=shuffle_buffer,
            shuffle_shards=shuffle_shards,
            resampled=resampled,
            batches_per_epoch=batches_per_epoch,
            drop_last=drop_last,
            max_pixels=max_pixels,
            seed_transforms=seed_transforms,
            max_caption_bytes=max_caption_bytes,
            max_json_bytes=max_json_bytes,
        )
        self.virtual_streams = virtual_streams
        self.num_workers = workers if num_workers else 0
        self.check_labels = check_labels
        self.dataloader_kwargs = {
            # a worker's item is its 1/W share of a batch, and every batch waits for all W
            # shares: W× the items keep as many samples in flight per worker as whole batches
            # did (2 batches ahead each by default), so one slow worker does not stall the rank
            "prefetch_factor": prefetch_factor * workers
            if num_workers and prefetch_factor
            else None,
            "pin_memory": pin_memory,
            "multiprocessing_context": multiprocessing_context,
        }
        self.stats = SampleStats()
        self._ws = Workspace()  # batch tensors assembled from the workers' shares
        self._labels_checked = False
        self._active: object | None = None
        self._reset_position(0)

    # -- position ------------------------------------------------------------------------
    def _reset_position(self, epoch: int) -> None:
        self._epoch = epoch
        self._drawn = dict.fromkeys(self.cfg.mine, 0)
        self._local = 0  # this rank's samples consumed in the epoch
        self._batches = 0

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` (forgets the position within the current one)."""
        self._reset_position(epoch)

    def _fingerprint(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "seed": c.seed,
            "virtual_streams": c.streams,
            "shuffle_buffer": c.shuffle_buffer,
            "shuffle_shards": c.shuffle_shards,
            "resampled": c.resampled,
            "num_labels": c.num_labels,
            "shards_sha": hashlib.sha256("\n".join(c.shards).encode()).hexdigest(),
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the position after the last batch handed out, plus stats (plain
        JSON-able types; no rank or worker numbers). Join the ranks' parts with
        :meth:`merge_states`; with one rank the part is the whole state."""
        c = self.cfg
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._local * c.world_size,  # global samples consumed in the epoch
            "streams": {str(s): int(n) for s, n in self._drawn.items()},
            "config": self._fingerprint(),
            "stats": self.stats.as_dict(),
        }

    @staticmethod
    def merge_states(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One world-size-free state from every rank's :meth:`state_dict` (taken at the same
        step): the streams' positions joined, the skip counts summed."""
        first = parts[0]
        for p in parts[1:]:
            for k in ("version", "epoch", "position", "config"):
                if p[k] != first[k]:
                    raise ValueError(
                        f"TrainLoader.merge_states: ranks disagree on {k!r} "
                        f"({first[k]!r} vs {p[k]!r}): states not taken at the same step"
                    )
        stats = SampleStats()
        streams: dict[str, int] = {}
        for p in parts:
            streams.update(p["streams"])
            stats.merge(SampleStats.from_dict(p["stats"]))
        return dict(first, streams=dict(sorted(streams.items(), key=lambda kv: int(kv[0]))),
                    stats=stats.as_dict())  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a (merged) state at any world size dividing the streams; see the module
        docstring. A state this loader cannot continue exactly warns and restarts at the next
        epoch boundary."""
        c = self.cfg
        if state.get("version") != STATE_VERSION:
            started = any(state.get("drawn") or []) or any(state.get("batches") or [])
            self._restart(state, started, f"state version {state.get('version')}")
            return
        saved_cfg, ours = state["config"], self._fingerprint()
        changed = sorted(k for k in ours if saved_cfg.get(k) != ours[k])
        if changed:
            details = ", ".join(f"{k}: {saved_cfg.get(k)!r} → {ours[k]!r}" for k in changed)
            self._restart(state, int(state["position"]) > 0, details)
            return
        missing = [s for s in c.mine if str(s) not in state["streams"]]
        if missing:
            raise ValueError(
                f"TrainLoader state lacks virtual streams {missing[:8]} of rank {c.rank}: "
                "load the merged state (TrainLoader.merge_states), not one rank's part"
            )
        position, per = int(state["position"]), c.batch_size * c.world_size
        if position % per:
            raise ValueError(
                f"TrainLoader: saved position {position} is not a whole number of global "
                f"batches of {per} (batch_size {c.batch_size} × world size {c.world_size}); "
                "resume with the same global batch size"
            )
        self._epoch = int(state["epoch"])
        self._drawn = {s: int(state["streams"][str(s)]) for s in c.mine}
        self._local = position // c.world_size
        self._batches = position // per
        self.stats = SampleStats.from_dict(state["stats"]) if c.rank == 0 else SampleStats()

    def _restart(self, state: dict[str, Any], started: bool, details: str) -> None:
        if self.cfg.rank == 0 and "stats" in state:
            self.stats = SampleStats.from_dict(state["stats"])
        epoch = int(state.get("epoch", 0)) + (1 if started else 0)
        warnings.warn(
            f"TrainLoader: resuming with a different setup ({details}); an exact mid-epoch "
            f"resume is impossible, restarting at the start of epoch {epoch}",
            stacklevel=3,
        )
        log.warning("loader restarts at epoch %d boundary (%s)", epoch, details)
        self._reset_position(epoch)

    # -- iteration -----------------------------------------------------------------------
    def _check_sidecars(self) -> None:
        c = self.cfg
        if c.labels_dir is None or not self.check_labels or self._labels_checked:
            return
        paths = [label_path(c.labels_dir, shard_stem(u)) for u in c.shards]
        present = [p for p in paths if p.exists()]
        if len(present) < len(paths):
            log.warning(
                "%d of %d shards have no label sidecar in %s; their samples will be skipped "
                "as missing_label",
                len(paths) - len(present),
                len(paths),
                c.labels_dir,
            )
        if c.centroid_sha is not None and present:
            with ThreadPoolExecutor(min(8, len(present))) as ex:
                list(ex.map(lambda p: check_label_sha(p, c.centroid_sha), present))
        self._labels_checked = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches from the current position to the end of the epoch; then epoch += 1."""
        self._check_sidecars()
        c = self.cfg
        streams = _WorkerStreams(c, self._epoch, self._local, dict(self._drawn), self._batches)
        if self.num_workers == 0:
            source: Iterator[_Item] = streams.stream(0, in_process=True)
            dl_iter = None
        else:
            dl = DataLoader(
                streams,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                worker_init_fn=_worker_init,
                persistent_workers=False,
                **self.dataloader_kwargs,
            )
            dl_iter = iter(dl)
            source = dl_iter
        token = object()
        self._active = token  # a newer iteration makes this one stale (see below)
        W = c.workers
        labelled = c.labels_dir is not None
        pending: list[deque[_Item]] = [deque() for _ in range(W)]
        try:
            while True:
                if self._active is not token:
                    raise RuntimeError(
                        "TrainLoader: a newer iteration over this loader was started; "
                        "iterate one at a time (the position is shared)"
                    )
                items = []
                for w in range(W):  # every worker sends one item per batch
                    while not pending[w]:
                        item = next(source)
                        pending[item.worker].append(item)
                    items.append(pending[w].popleft())
                for item in items:
                    self.stats.seen += item.seen
                    self.stats.kept += item.kept
                    for ev in item.events:
                        self.stats.skip(*ev)
                    for what, n in item.noted.items():  # caption_truncated, ignored_member
                        self.stats.note(what, n)
                if any(it.end for it in items):
                    cut = min((it.dry for it in items if it.dry is not None), default=0)
                    if cut and not c.drop_last:  # the short last batch: slots before `cut`
                        parts = [_trim(it.part, cut) for it in items if it.part]
                        yield _assemble(parts, cut, labelled, self._ws)
                    break
                for item in items:
                    for s, n in item.drawn.items():
                        self._drawn[s] += n
                self._local += c.batch_size
                self._batches += 1
                yield _assemble([it.part for it in items], c.batch_size, labelled, self._ws)
        finally:
            del source
            if dl_iter is not None:
                dl_iter._shutdown_workers()  # type: ignore[attr-defined]
        self._reset_position(self._epoch + 1)
