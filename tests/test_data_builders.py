"""Dataset builders: layout, held-out classes, determinism, real Debian datasets, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from megaclass.data.builders import DatasetUnavailableError, build_dataset
from megaclass.data.reader import iter_samples
from megaclass.data.shards import expand_shards
from megaclass.data.stats import SampleStats
from PIL import Image


def _read_split(summary, split):
    stats = SampleStats()
    spec = summary["splits"][split]["spec"]
    samples = [s for u in expand_shards(spec) for s in iter_samples(u, stats)]
    assert stats.total_skipped == 0
    return samples


def _check_layout(summary):
    train, ev = _read_split(summary, "train"), _read_split(summary, "eval")
    assert len(train) == summary["splits"]["train"]["samples"] > 0
    assert len(ev) == summary["splits"]["eval"]["samples"] > 0
    for split, samples in (("train", train), ("eval", ev)):
        assert all(s.meta["split"] == split for s in samples)
        assert {s.meta["class"] for s in samples} == set(summary["classes"][split])
        assert all(s.caption and isinstance(s.meta["class"], str) for s in samples)
    assert not set(summary["classes"]["train"]) & set(summary["classes"]["eval"])
    keys = [s.key for s in train + ev]
    assert len(set(keys)) == len(keys)
    return train, ev


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.tar")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_small_deterministic(tmp_path):
    kw = dict(n_classes=12, per_class=8, maxcount=30, workers=2)
    a = build_dataset("demo", str(tmp_path / "a"), seed=5, **kw)
    train, ev = _check_layout(a)
    assert a["splits"]["train"]["classes"] + a["splits"]["eval"]["classes"] == 12
    assert len(train) + len(ev) == 96
    assert json.loads((tmp_path / "a" / "dataset.json").read_text())["splits"] == a["splits"]
    b = build_dataset("demo", str(tmp_path / "b"), seed=5, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    build_dataset("demo", str(tmp_path / "c"), seed=6, **kw)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert b["classes"] == a["classes"]
    # captions describe the image: the colour family of the class is named (some synonym)
    from megaclass.data.demo_render import COLOUR_WORDS, SHAPE_WORDS

    for s in train[:30]:
        assert any(w in s.caption for w in COLOUR_WORDS[s.meta["colour"]])
        assert any(w in s.caption for w in SHAPE_WORDS[s.meta["shape"]])
    assert len({s.caption for s in train}) > len(train) // 2  # varied wording
    # the shape's colour dominates the pixels of a big solid shape: class is visible
    img = np.asarray(train[0].image, dtype=np.float32)
    assert img.shape == (128, 128, 3) and img.std() > 5


def test_openclipart_fake_tree_skips_huge(tmp_path):
    root = tmp_path / "png"
    for cat in ("animals/cats", "food"):
        (root / cat).mkdir(parents=True)
        for i in range(3):
            im = Image.new("RGBA", (300 + i, 200), (0, 0, 0, 0))
            im.paste((200, 10, 10, 255), (50, 50, 150, 150))
            im.save(root / cat / f"{cat.split('/')[-1]}_thing_{i:02d}.png")
    Image.new("L", (3000, 3000), 0).save(root / "food" / "huge_01.png")  # 9 MP > 4 MP cap
    s = build_dataset("openclipart", str(tmp_path / "out"), root=root, min_per_class=3)
    assert s["skipped"]["skipped"] == {"too_many_pixels": 1}
    assert s["splits"]["train"]["samples"] + s["splits"]["eval"]["samples"] == 6
    train, ev = _check_layout(s)
    x = (train + ev)[0]
    assert max(x.image.size) <= 256
    assert x.image.getpixel((0, 0)) == (255, 255, 255)  # transparency flattened onto white
    assert x.caption.startswith("clip art of ") and "thing" in x.caption


def test_openclipart_real_package(tmp_path):
    s = build_dataset("openclipart", str(tmp_path), max_per_class=2)
    _check_layout(s)
    n_cls = s["splits"]["train"]["classes"] + s["splits"]["eval"]["classes"]
    assert n_cls >= 50 and s["splits"]["eval"]["classes"] >= 10


def test_fashion_mnist_real_package(tmp_path):
    s = build_dataset("fashion-mnist", str(tmp_path), max_per_class=15)
    train, ev = _check_layout(s)
    assert len(train) == 7 * 15 and len(ev) == 3 * 15
    assert train[0].image.size == (28, 28)


def test_missing_package_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="apt-get install openclipart-png"):
        build_dataset("openclipart", str(tmp_path), root=tmp_path / "nope")
    with pytest.raises(DatasetUnavailableError, match="dataset-fashion-mnist"):
        build_dataset("fashion-mnist", str(tmp_path), root=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", str(tmp_path))
