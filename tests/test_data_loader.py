"""TrainLoader: exact resume (workers 1/2, world sizes 1/2), label join, sha refusal, stats."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from megaclass.data.labels import LabelShaMismatchError
from megaclass.data.loader import TrainLoader
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


@pytest.mark.parametrize(
    "num_workers,world_size", [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2)], ids=lambda x: str(x)
)
def test_exact_resume(tiny_dataset, num_workers, world_size):
    """Iterate N, save, restore in a fresh loader: the next M batches are identical."""
    for rank in range(world_size):
        kw = dict(num_workers=num_workers, rank=rank, world_size=world_size)
        full = list(_loader(tiny_dataset, **kw))  # one uninterrupted epoch
        n = len(full) // 2 + 1

        a = _loader(tiny_dataset, **kw)
        it = iter(a)
        first = _take(it, n)
        state = a.state_dict()
        del it

        b = _loader(tiny_dataset, **kw)
        b.load_state_dict(state)
        rest = list(b)
        got = first + rest
        assert _flat(got) == _flat(full)
        for x, y in zip(got, full):
            assert torch.equal(x["image"], y["image"])  # augmentations are reproducible too
            assert torch.equal(x["label"], y["label"])
        assert b.epoch == 1 and b.state_dict()["drawn"] == [0] * max(1, num_workers)


def test_ranks_partition_the_epoch(tiny_dataset):
    keys = []
    for rank in range(2):
        keys += _flat(_loader(tiny_dataset, rank=rank, world_size=2, num_workers=2))
    assert sorted(keys) == [f"{i:06d}" for i in range(120)]
    # a different epoch gives another order, same seed and epoch the same order
    a = _loader(tiny_dataset)
    e0, e1 = _flat(a), _flat(a)
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert _flat(_loader(tiny_dataset)) == e0


def test_resume_across_epochs_and_multi_label(tiny_dataset):
    a = _loader(tiny_dataset, num_labels=2, num_workers=1)
    whole = list(a) + list(a)
    a2 = _loader(tiny_dataset, num_labels=2, num_workers=1)
    list(a2)
    it = iter(a2)
    _take(it, 3)
    st = a2.state_dict()
    assert st["epoch"] == 1
    b = _loader(tiny_dataset, num_labels=2, num_workers=1)
    b.load_state_dict(st)
    assert _flat(list(b)) == _flat(whole[len(whole) // 2 + 3 :])
    lab = whole[0]["label"]
    assert lab.dtype == torch.int64 and lab.shape == (7, 2)
    keys = np.array([int(k) for k in whole[0]["key"]])
    assert np.array_equal(lab.numpy(), np.stack([keys * 10, keys * 10 + 1], 1))


def test_world_size_change_restarts_at_epoch_boundary(tiny_dataset):
    a = _loader(tiny_dataset, rank=0, world_size=2)
    it = iter(a)
    _take(it, 2)
    st = a.state_dict()
    b = _loader(tiny_dataset, rank=0, world_size=1)
    with pytest.warns(UserWarning, match="world_size: 2 → 1"):
        b.load_state_dict(st)
    assert b.epoch == 1
    ref = _loader(tiny_dataset)
    ref.set_epoch(1)
    assert _flat(list(b)) == _flat(list(ref))
    with pytest.raises(ValueError, match="rank 0 loaded on rank 1"):
        _loader(tiny_dataset, rank=1, world_size=2).load_state_dict(st)


def test_resampled_mode_resumes(tiny_dataset):
    kw = dict(resampled=True, batches_per_epoch=5, num_workers=2)
    full = list(_loader(tiny_dataset, **kw))
    assert len(full) == 10
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
