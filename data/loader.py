"""Streaming training loader with exact mid-epoch resume: :class:`TrainLoader`.

Usage (what the train stage does)::

    loader = TrainLoader(
        "/data/{00000..00099}.tar", batch_size=256,
        rank=rank, world_size=world_size, num_workers=4, seed=cfg.seed,
        transform=encoder.transform_train,            # PIL RGB image -> tensor
        labels_dir=run.labels_dir, centroid_sha=sha,  # sidecars RUN/labels/<stem>.parquet
        num_labels=None,                              # None: label (B,) = cls; l: (B, l) top-l
    )
    loader.load_state_dict(ckpt["loader"])            # optional: resume
    for batch in loader:                              # one epoch from the current position
        batch["image"], batch["label"], batch["key"], batch["caption"]
        ...
        ckpt["loader"] = loader.state_dict()          # per rank; after the batch is consumed

Pipeline per (rank, worker) — everything is a pure function of (seed, epoch, rank, worker):

1. **Shard split.** Epoch ``e`` permutes the shard list with ``(seed, e)``; rank ``r`` of
   ``R`` takes ``perm[r::R]`` and worker ``w`` of ``W`` takes that list's ``[w::W]``.
   Ranks may get different numbers of samples; a distributed job should use
   ``resampled=True`` (or ``batches_per_epoch``) so every rank runs the same step count.
   In resampled mode each worker draws shards with replacement forever, open_clip style,
   and the epoch is ``batches_per_epoch`` batches per worker (``None``: endless).
2. **Read + label join.** Samples come from :func:`megaclass.data.reader.iter_samples`
   (header checked, not decoded). When a shard is opened its sidecar
   ``labels_dir/<stem>.parquet`` is read; a sidecar with another centroid sha raises
   :class:`LabelShaMismatchError` (with ``check_labels=True`` also for all shards before the
   first batch; off by default, so start-up touches no file per shard); a
   sample without a label row (or a shard without a sidecar) is skipped as
   ``missing_label``.
3. **Seeded shuffle buffer** of ``shuffle_buffer`` samples (0/1: stream order).
4. **Decode + transform** after the buffer, so skipped-over samples are never decoded.
   A decode failure is skipped as ``undecodable_image``. Random augmentations are seeded
   per sample from (seed, epoch, rank, worker, draw index), so a resumed run also gets
   identical tensors (torch's RNG; the caller's RNG is restored in-process).
5. **Batching** into ``{"image": Tensor (B,C,H,W) | list[PIL], "label": LongTensor (B,) or
   (B, num_labels) (absent without labels_dir), "key": list[str], "caption": list[str]}``;
   a worker's last batch may be short unless ``drop_last``.

With ``num_workers ≥ 1`` the worker streams run in torch DataLoader processes and the
loader interleaves their batches round robin (worker 0, 1, …; finished workers drop out).

**Resume semantics.** The state lives in the main process: per worker the number of
samples drawn from its shuffle buffer (``drawn``) and batches produced, whose turn is next,
the epoch, and the skip statistics. ``load_state_dict`` with the same world size, worker
count, shard list, seed, batch size and buffer size continues with exactly the sample
sequence (and tensors) an uninterrupted loader would have produced: workers replay reading
and shuffling without decoding the first ``drawn`` samples. If any of these differ, the
loader warns and restarts at the next epoch boundary (the current epoch if nothing of it
was consumed). Replay cost is proportional to the position within the epoch.

**Stats.** ``loader.stats`` (:class:`SampleStats`) counts every skipped sample by reason
and shard, for the consumed part of the stream; it is saved in ``state_dict``.
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
from megaclass.data.labels import check_label_sha, label_path, read_labels
from megaclass.data.reader import DEFAULT_MAX_PIXELS, ImageRejected, iter_samples, load_rgb
from megaclass.data.shards import expand_shards, shard_stem
from megaclass.data.stats import SampleStats
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

STATE_VERSION = 1
_MASK64 = (1 << 64) - 1


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


class _EventStats(SampleStats):
    """Worker-side stats: records skip events to ship with the next batch."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str | None, str]] = []

    def skip(self, reason: str, shard: str, key: str | None = None, detail: str = "") -> None:
        self.events.append((reason, shard, key, detail[:200]))

    def drain(self) -> tuple[int, int, list]:
        out = (self.seen, self.kept, self.events)
        self.seen, self.kept, self.events = 0, 0, []
        return out


@dataclass
class _Item:
    """What a worker sends: a batch (or None), samples drawn for it, stats delta, end flag."""

    worker: int
    batch: dict[str, Any] | None
    drawn: int
    seen: int
    kept: int
    events: list
    end: bool = False


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
            for s in iter_samples(url, stats, max_pixels=c.max_pixels, decode=False):
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
    workers: int  # effective: max(1, num_workers)
    seed: int
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


class _Starvation:
    """Resampled mode draws shards forever; if every sample of every draw is skipped (no label
    sidecars, all samples rejected) the stream would loop silently. Stop with an error after
    ``3 × len(shards)`` (at least 10) consecutive shard draws that gave no usable sample."""

    def __init__(self, c: _StreamConfig, worker: int) -> None:
        self.c, self.worker = c, worker
        self.limit = max(10, 3 * len(c.shards))
        self.draws_since_sample = 0

    def shards(self, urls: Iterator[str]) -> Iterator[str]:
        for url in urls:
            if self.draws_since_sample >= self.limit:
                raise RuntimeError(
                    f"TrainLoader (rank {self.c.rank}, worker {self.worker}): "
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
    """The per-(rank, worker) batch streams; iterated inside DataLoader workers or in-process."""

    def __init__(self, cfg: _StreamConfig, epoch: int, drawn: list[int], batches: list[int]):
        super().__init__()
        self.cfg, self.epoch, self.drawn, self.batches = cfg, epoch, drawn, batches

    # -- shard assignment ------------------------------------------------------------
    def worker_shards(self, worker: int) -> Iterator[str]:
        c = self.cfg
        if c.resampled:
            rng = np.random.default_rng([c.seed, self.epoch, c.rank, worker, 0x5E5A])
            while True:
                yield c.shards[int(rng.integers(len(c.shards)))]
        order = np.arange(len(c.shards))
        if c.shuffle_shards:
            order = np.random.default_rng([c.seed, self.epoch, 0x5A4D]).permutation(order)
        mine = order[c.rank :: c.world_size][worker :: c.workers]
        yield from (c.shards[i] for i in mine)

    # -- the stream --------------------------------------------------------------------
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
        stats = _EventStats()
        rng = np.random.default_rng([c.seed, self.epoch, c.rank, worker, 0xB0F])
        labelled = _LabelledStream(c, stats)
        if c.resampled:  # endless shard draws: an all-skipped stream would spin forever
            starve = _Starvation(c, worker)
            samples = starve.samples(labelled(starve.shards(self.worker_shards(worker))))
        else:
            samples = labelled(self.worker_shards(worker))
        draws = _shuffled(samples, c.shuffle_buffer, rng)
        index = 0
        for _ in range(self.drawn[worker]):  # fast-forward: no decoding
            if next(draws, None) is None:
                break
            index += 1
        stats.drain()  # those skips were counted before the state was saved
        nbatches = self.batches[worker]
        batch: list[tuple] = []
        ndrawn = 0
        limit = c.batches_per_epoch
        if limit is not None and nbatches >= limit:
            yield _Item(worker, None, 0, *stats.drain(), end=True)
            return
        for key, caption, opened, label, url in draws:
            i, index = index, index + 1
            ndrawn += 1
            try:
                image = load_rgb(opened)
            except ImageRejected as e:
                stats.kept -= 1
                stats.skip(e.reason, url, key, e.detail)
                continue
            if c.transform is not None:
                image = self._transform(image, worker, i, in_process)
            batch.append((image, label, key, caption))
            if len(batch) == c.batch_size:
                yield _Item(worker, self.collate(batch), ndrawn, *stats.drain())
                batch, ndrawn = [], 0
                nbatches += 1
                if limit is not None and nbatches >= limit:
                    break
        if batch and not c.drop_last:
            yield _Item(worker, self.collate(batch), ndrawn, *stats.drain())
            ndrawn = 0
        yield _Item(worker, None, ndrawn, *stats.drain(), end=True)

    def _transform(self, image: Any, worker: int, index: int, in_process: bool) -> Any:
        c = self.cfg
        assert c.transform is not None
        if not c.seed_transforms:
            return c.transform(image)
        saved = torch.random.get_rng_state() if in_process else None
        # the CPU generator only: torch.manual_seed would also queue lazy CUDA/MPS/XPU seeding
        # calls that capture a Python traceback each time (≈1 ms per sample)
        torch.default_generator.manual_seed(_mix(c.seed, self.epoch, c.rank, worker, index))
        try:
            return c.transform(image)
        finally:
            if saved is not None:
                torch.random.set_rng_state(saved)

    def collate(self, batch: list[tuple]) -> dict[str, Any]:
        images = [b[0] for b in batch]
        out: dict[str, Any] = {
            "image": torch.stack(images) if isinstance(images[0], torch.Tensor) else images,
            "key": [b[2] for b in batch],
            "caption": [b[3] for b in batch],
        }
        if self.cfg.labels_dir is not None:
            out["label"] = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
        return out


class TrainLoader:
    """Streaming, label-joining, exactly resumable training loader (see the module docstring).

    Args:
        shards: a shard spec (``expand_shards``) or a list of URLs.
        batch_size: samples per batch (per rank).
        rank, world_size: this process's data-parallel rank; default from torch.distributed
            when initialised, else 0 / 1.
        num_workers: DataLoader worker processes (0 = in the main process).
        seed: base seed of the shard permutation, shuffle buffer and augmentation RNG.
        transform: callable PIL RGB image → tensor (e.g. a torchvision.transforms.v2 pipeline).
        labels_dir: folder of label sidecars; None = no labels (no ``label`` in batches).
        centroid_sha: expected ``centroid_sha256`` of every sidecar (None = not checked).
        num_labels: None → ``label`` is (B,) = cls; l → (B, l) top-l labels (MLCD).
        shuffle_buffer: samples in the shuffle buffer (0 = stream order).
        shuffle_shards: permute the shard list every epoch (from seed and epoch).
        resampled: draw shards with replacement (open_clip's resampled mode).
        batches_per_epoch: end an epoch after this many batches per worker (None = at the end
            of the data; in resampled mode None means endless).
        drop_last: drop each worker's short last batch.
        max_pixels: images with more pixels are skipped (``too_many_pixels``).
        check_labels: check every sidecar's sha before the first batch. Off by default: each
            sidecar's sha is checked when its shard is first opened (the same error, raised
            then), so start-up costs no file access per shard — at 41,456 shards on object
            storage the eager check took minutes per rank before the first step.
        seed_transforms: seed torch's RNG per sample so augmentations are reproducible.
        prefetch_factor, pin_memory, multiprocessing_context: passed to torch DataLoader.
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
        workers = max(1, num_workers)
        if not resampled and len(urls) < world_size * workers:
            warnings.warn(
                f"TrainLoader: {len(urls)} shards for {world_size} ranks × {workers} workers: "
                "some workers get no data (use more shards or resampled=True)",
                stacklevel=2,
            )
        self.cfg = _StreamConfig(
            shards=urls,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            workers=workers,
            seed=seed,
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
        )
        self.num_workers = num_workers
        self.check_labels = check_labels
        self.dataloader_kwargs = {
            "prefetch_factor": prefetch_factor if num_workers else None,
            "pin_memory": pin_memory,
            "multiprocessing_context": multiprocessing_context,
        }
        self.stats = SampleStats()
        self._labels_checked = False
        self._active: object | None = None
        self._reset_position(0)

    # -- position ------------------------------------------------------------------------
    def _reset_position(self, epoch: int) -> None:
        self._epoch = epoch
        self._drawn = [0] * self.cfg.workers
        self._batches = [0] * self.cfg.workers
        self._next_worker = 0

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
            "world_size": c.world_size,
            "workers": c.workers,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "shuffle_buffer": c.shuffle_buffer,
            "shuffle_shards": c.shuffle_shards,
            "resampled": c.resampled,
            "batches_per_epoch": c.batches_per_epoch,
            "drop_last": c.drop_last,
            "num_labels": c.num_labels,
            "shards_sha": hashlib.sha256("\n".join(c.shards).encode()).hexdigest(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out, plus stats; plain JSON-able types."""
        return {
            "version": STATE_VERSION,
            "rank": self.cfg.rank,
            "epoch": self._epoch,
            "drawn": list(self._drawn),
            "batches": list(self._batches),
            "next_worker": self._next_worker,
            "config": self._fingerprint(),
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same rank); see the module docstring."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"TrainLoader state version {state.get('version')} not supported")
        saved_cfg, ours = state["config"], self._fingerprint()
        if saved_cfg.get("world_size") == ours["world_size"] and state["rank"] != self.cfg.rank:
            raise ValueError(
                f"TrainLoader state of rank {state['rank']} loaded on rank {self.cfg.rank}"
            )
        self.stats = SampleStats.from_dict(state["stats"])
        changed = sorted(k for k in ours if saved_cfg.get(k) != ours[k])
        if not changed:
            self._epoch = int(state["epoch"])
            self._drawn = [int(x) for x in state["drawn"]]
            self._batches = [int(x) for x in state["batches"]]
            self._next_worker = int(state["next_worker"])
            return
        started = any(state["drawn"]) or any(state["batches"])
        epoch = int(state["epoch"]) + (1 if started else 0)
        details = ", ".join(f"{k}: {saved_cfg.get(k)!r} → {ours[k]!r}" for k in changed)
        warnings.warn(
            f"TrainLoader: resuming with a different setup ({details}); an exact mid-epoch "
            f"resume is impossible, restarting at the start of epoch {epoch}",
            stacklevel=2,
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
        streams = _WorkerStreams(self.cfg, self._epoch, list(self._drawn), list(self._batches))
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
        W = self.cfg.workers
        pending: list[deque[_Item]] = [deque() for _ in range(W)]
        alive = [True] * W
        turn = self._next_worker
        try:
            while any(alive):
                if not alive[turn]:
                    turn = (turn + 1) % W
                    continue
                if self._active is not token:
                    raise RuntimeError(
                        "TrainLoader: a newer iteration over this loader was started; "
                        "iterate one at a time (the position is shared)"
                    )
                while not pending[turn]:
                    item = next(source)
                    pending[item.worker].append(item)
                item = pending[turn].popleft()
                self._drawn[turn] += item.drawn
                self.stats.seen += item.seen
                self.stats.kept += item.kept
                for ev in item.events:
                    self.stats.skip(*ev)
                if item.end:
                    alive[turn] = False
                turn = (turn + 1) % W
                if item.batch is not None:
                    self._batches[item.worker] += 1
                    self._next_worker = turn
                    yield item.batch
        finally:
            del source
            if dl_iter is not None:
                dl_iter._shutdown_workers()  # type: ignore[attr-defined]
        self._reset_position(self._epoch + 1)
