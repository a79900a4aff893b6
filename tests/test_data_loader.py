"""TrainLoader: the same global batches at world sizes 1/2/4 and worker counts 0/1/2, exact resume
at the same and at another world size, label join, sha refusal, stats."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from megaclass.data.labels import LabelShaMismatchError
from megaclass.data.loader import (
    TrainLoader,
    VirtualStreamsError,
    effective_streams,
    global_order,
)
from torchvision.transforms import v2


def _transform():
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(8, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def _loader(ds, **kw):
    args = dict(
        batch_size=7,
        seed=3,
        transform=_transform(),
        labels_dir=ds["labels_dir"],
        centroid_sha=ds["sha"],
        shuffle_buffer=16,
        virtual_streams=64,  # what the trainer passes (train.virtual_streams)
    )
    args.update(kw)
    return TrainLoader(ds["shards"], **args)


def _take(it, n):
    out = []
    for _ in range(n):
        out.append(next(it))
    return out


def _flat(batches):
    return [k for b in batches for k in b["key"]]


G = 8  # global batch of the invariance tests: batch_size = G / R on each of R ranks


def _global_batches(ds, world, workers=0, states=None, n=None, **kw):
    """Lockstep over R rank loaders: the global batches (keys and images in global order) until
    the first one a rank cannot fill (the trainer's epoch-end rule), or ``n`` of them; and the
    merged state after them."""
    loaders = [
        _loader(
            ds,
            batch_size=G // world,
            rank=r,
            world_size=world,
            num_workers=workers,
            drop_last=True,
            **kw,
        )  # fmt: skip
        for r in range(world)
    ]
    if states is not None:
        for ld in loaders:
            ld.load_state_dict(states)
    its = [iter(ld) for ld in loaders]
    out = []
    while n is None or len(out) < n:
        parts = [next(it, None) for it in its]
        if any(p is None for p in parts):  # every rank starts the next epoch (the trainer)
            epoch = max(ld.epoch for ld in loaders)
            for ld in loaders:
                ld.set_epoch(epoch)
            break
        keys = global_order([p["key"] for p in parts])
        rows = global_order([list(p["image"]) for p in parts])
        labels = global_order([list(p["label"]) for p in parts])
        out.append({"key": keys, "image": torch.stack(rows), "label": torch.stack(labels)})
    state = TrainLoader.merge_states([ld.state_dict() for ld in loaders])
    del its
    return out, state


def _same(a, b):
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])  # augmentations are tied to the sample
        assert torch.equal(x["label"], y["label"])


@pytest.fixture(scope="module")
def reference(tiny_dataset):
    """One rank, in-process: the global batches of epoch 0."""
    return _global_batches(tiny_dataset, 1)[0]


@pytest.mark.parametrize(
    "world,workers", [(1, 1), (1, 2), (2, 0), (2, 2), (4, 0), (4, 1)], ids=lambda x: str(x)
)
def test_global_batches_do_not_depend_on_ranks_or_workers(tiny_dataset, reference, world, workers):
    got, state = _global_batches(tiny_dataset, world, workers)
    assert len(reference) >= 6  # 4 streams (6 shards) of ≥ 20 samples: at least 80 samples
    _same(got, reference)
    keys = [k for b in got for k in b["key"]]
    assert len(set(keys)) == len(keys)
    assert set(state["streams"]) == {"0", "1", "2", "3"}


@pytest.mark.parametrize("world", [1, 4])
def test_resume_at_another_world_size_mid_epoch(tiny_dataset, reference, world):
    """A state saved at R=2 after 3 global batches continues exactly at R=1 and R=4."""
    first, state = _global_batches(tiny_dataset, 2, workers=1, n=3)
    assert state["position"] == 3 * G and "rank" not in state
    assert sum(state["streams"].values()) >= 3 * G
    rest, end = _global_batches(tiny_dataset, world, workers=1 if world == 1 else 0, states=state)
    _same(first + rest, reference)
    assert end["epoch"] == 0 or end["position"] == 0


def test_world_size_must_divide_the_streams(tiny_dataset):
    with pytest.raises(VirtualStreamsError, match="virtual_streams=64 .* world size 3"):
        _loader(tiny_dataset, rank=0, world_size=3)
    # 6 shards leave 4 of 64 streams usable: 8 ranks cannot share them; 16 streams of 24 can
    assert effective_streams(64, 6, resampled=False) == 4
    assert effective_streams(64, 6, resampled=True) == 64
    with pytest.raises(VirtualStreamsError, match="6 shards leave 4 usable"):
        _loader(tiny_dataset, rank=0, world_size=8)


def test_short_last_batch_is_the_same_for_any_worker_count(tiny_dataset):
    """drop_last=False: the epoch's last batch holds the slots before the first stream that ran
    dry — decided the same way when the streams are split over workers."""
    a = list(_loader(tiny_dataset, num_workers=0))
    b = list(_loader(tiny_dataset, num_workers=2))
    _same(a, b)
    assert 0 < len(a[-1]["key"]) < 7 and all(len(x["key"]) == 7 for x in a[:-1])


def test_exact_resume_same_world_with_workers(tiny_dataset):
    """Iterate N, save, restore in a fresh loader: the next batches are identical (R=1, W=2)."""
    kw = dict(num_workers=2)
    full = list(_loader(tiny_dataset, **kw))
    n = len(full) // 2 + 1
    a = _loader(tiny_dataset, **kw)
    it = iter(a)
    first = _take(it, n)
    state = a.state_dict()
    del it
    b = _loader(tiny_dataset, **kw)
    b.load_state_dict(state)
    got = first + list(b)
    _same(got, full)
    assert b.epoch == 1 and not any(b.state_dict()["streams"].values())


def test_epochs_differ_and_repeat_with_the_seed(tiny_dataset):
    a = _loader(tiny_dataset)
    e0, e1 = _flat(a), _flat(a)
    assert len(set(e0)) == len(e0) and e0 != e1
    assert _flat(_loader(tiny_dataset)) == e0
    assert _flat(_loader(tiny_dataset, seed=4)) != e0


def test_resume_across_epochs_and_multi_label(tiny_dataset):
    a = _loader(tiny_dataset, num_labels=2, num_workers=1)
    e0 = list(a)
    whole = e0 + list(a)
    a2 = _loader(tiny_dataset, num_labels=2, num_workers=1)
    list(a2)
    it = iter(a2)
    _take(it, 3)
    st = a2.state_dict()
    assert st["epoch"] == 1
    b = _loader(tiny_dataset, num_labels=2, num_workers=1)
    b.load_state_dict(st)
    assert _flat(list(b)) == _flat(whole[len(e0) + 3 :])
    lab = whole[0]["label"]
    assert lab.dtype == torch.int64 and lab.shape == (7, 2)
    keys = np.array([int(k) for k in whole[0]["key"]])
    assert np.array_equal(lab.numpy(), np.stack([keys * 10, keys * 10 + 1], 1))


def test_other_setup_or_old_state_restarts_at_epoch_boundary(tiny_dataset):
    a = _loader(tiny_dataset)
    it = iter(a)
    _take(it, 2)
    st = a.state_dict()
    b = _loader(tiny_dataset, seed=5)
    with pytest.warns(UserWarning, match="seed: 3 → 5"):
        b.load_state_dict(st)
    assert b.epoch == 1
    ref = _loader(tiny_dataset, seed=5)
    ref.set_epoch(1)
    assert _flat(list(b)) == _flat(list(ref))
    old = {"version": 1, "rank": 0, "epoch": 0, "drawn": [14], "batches": [2], "config": {},
           "stats": st["stats"]}  # fmt: skip
    c = _loader(tiny_dataset)
    with pytest.warns(UserWarning, match="state version 1"):
        c.load_state_dict(old)
    assert c.epoch == 1
    with pytest.raises(ValueError, match="merged state"):
        _loader(tiny_dataset, rank=0, world_size=2).load_state_dict(
            _loader(tiny_dataset, batch_size=4, rank=1, world_size=2).state_dict()
        )


def test_resampled_mode_resumes(tiny_dataset):
    kw = dict(resampled=True, batches_per_epoch=8, num_workers=2, virtual_streams=8)
    full = list(_loader(tiny_dataset, **kw))
    assert len(full) == 8
    a = _loader(tiny_dataset, **kw)
    it = iter(a)
    first = _take(it, 4)
    b = _loader(tiny_dataset, **kw)
    b.load_state_dict(a.state_dict())
    assert _flat(first + list(b)) == _flat(full)


def test_sha_mismatch_refused(tiny_dataset):
    with pytest.raises(LabelShaMismatchError, match="expects 'other'"):
        next(iter(_loader(tiny_dataset, centroid_sha="other")))
    # also when the check happens in a worker (check_labels=False defers it to shard open)
    with pytest.raises(Exception, match="expects 'other'"):
        next(iter(_loader(tiny_dataset, centroid_sha="other", check_labels=False, num_workers=1)))


def test_missing_labels_and_bad_samples_are_counted(tiny_dataset, corrupt_shards, tmp_path):
    """Samples without a label row and corrupt samples are skipped and counted exactly."""
    labels = tmp_path / "labels"
    shutil.copytree(tiny_dataset["labels_dir"], labels)
    (labels / "tiny-000005.parquet").unlink()  # shard 5: all 20 samples lack labels
    ds = dict(tiny_dataset, labels_dir=str(labels))
    shards = tiny_dataset["shards"] + corrupt_shards["shards"]
    a = TrainLoader(
        shards,
        batch_size=5,
        labels_dir=str(labels),
        centroid_sha=ds["sha"],
        max_pixels=corrupt_shards["max_pixels"],
        num_workers=2,
        world_size=1,
        rank=0,
        virtual_streams=1,  # one stream reads every shard: the epoch covers all samples
    )
    keys = _flat(list(a))
    assert sorted(keys) == [f"{i:06d}" for i in range(100)]
    expected = dict(corrupt_shards["skipped"])
    n_corrupt_good = sum(map(len, corrupt_shards["good_keys"]))
    # corrupt shards have no sidecars: their readable samples (incl. the cut JPEG, whose
    # header is fine) are missing_label; the label join comes before any pixel decoding
    expected["missing_label"] = 20 + n_corrupt_good + len(corrupt_shards["lazy_ok"])
    expected["undecodable_image"] -= len(corrupt_shards["lazy_ok"])
    assert dict(a.stats.skipped) == expected
    assert a.stats.skipped_by_shard[tiny_dataset["shards"][5]] == {"missing_label": 20}
    assert a.stats.kept == 100 and a.stats.seen == a.stats.kept + a.stats.total_skipped


def test_decode_failures_counted_once_across_resume(corrupt_shards):
    """The cut JPEG passes the header check and fails at decode: counted once, even on resume."""
    kw = dict(batch_size=1, max_pixels=corrupt_shards["max_pixels"], shuffle_buffer=4, seed=1)
    shards = corrupt_shards["shards"][:1]
    full = TrainLoader(shards, **kw)
    ref = _flat(list(full))
    a = TrainLoader(shards, **kw)
    it = iter(a)
    _take(it, 3)
    b = TrainLoader(shards, **kw)
    b.load_state_dict(a.state_dict())
    rest = _flat(list(b))
    assert ref[3:] == rest
    assert b.stats.as_dict()["skipped"] == full.stats.as_dict()["skipped"]
    assert full.stats.skipped["undecodable_image"] == 2


def test_two_live_iterations_are_refused(tiny_dataset):
    a = _loader(tiny_dataset)
    old = iter(a)
    next(old)
    new = iter(a)
    next(new)
    with pytest.raises(RuntimeError, match="newer iteration"):
        next(old)


def test_resampled_stream_without_any_usable_sample_raises(tiny_dataset, tmp_path):
    """Resampled mode draws shards forever: with no label sidecar at all it must stop with an
    error naming labels_dir, not spin (it did: a benchmark hung on exactly this)."""
    empty = tmp_path / "no-labels"
    empty.mkdir()
    a = TrainLoader(
        tiny_dataset["shards"],
        batch_size=4,
        labels_dir=str(empty),
        centroid_sha=tiny_dataset["sha"],
        resampled=True,
        check_labels=False,
    )
    with pytest.raises(RuntimeError, match="no-labels"):
        next(iter(a))
    # with the sidecars present the same resampled loader keeps producing batches
    b = _loader(tiny_dataset, resampled=True)
    assert len(_take(iter(b), 3)) == 3


def test_caption_and_json_caps_come_from_the_loader_arguments(tiny_dataset):
    """data.max_caption_bytes / data.max_json_bytes reach the reader through the loader (the
    trainer passes the config's values): captions are cut and noted, samples whose .json is
    over the cap are skipped and counted — also across worker processes."""
    a = _loader(tiny_dataset, max_caption_bytes=5, num_workers=2, world_size=1, rank=0)
    batches = list(a)
    caps = [c for b in batches for c in b["caption"]]
    assert caps and all(c == "capti" for c in caps), caps[:5]
    # every sample read was cut and noted (read ahead into the shuffle buffers included)
    assert a.stats.noted["caption_truncated"] == a.stats.kept >= len(caps)
    b = _loader(tiny_dataset, max_json_bytes=4, world_size=1, rank=0, virtual_streams=1)
    assert _flat(list(b)) == []
    assert b.stats.skipped["json_too_large"] == b.stats.seen == 120
