"""Benchmark converters on miniature archives in the exact official formats.

Each archive is built in tmp with a handful of tiny real images (JPEG, plus PNG/WEBP for the
image folder), the official listing files (Cars196: a real .mat written by scipy in the
devkit's struct layout), and deliberate damage: malformed lines, missing files, a truncated
JPEG, a file that is not an image. The shards are read back with the project's reader; every
skipped item must be counted under its reason and named by file and line.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from megaclass.data.builders import BUILDERS
from megaclass.data.converters import (
    CONVERTERS,
    SUMMARY_FILE,
    ConvertError,
    convert,
    list_imagefolder,
    sniff_format,
)
from megaclass.data.reader import iter_samples
from megaclass.data.shards import expand_shards
from megaclass.data.stats import SampleStats
from megaclass.pipelines.cli import build_parser, main
from PIL import Image


def _image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def _truncated_jpeg(seed: int) -> bytes:
    data = _image_bytes(seed, size=(64, 64))
    return data[: len(data) // 2]  # header intact, scan data cut: fails only at full decode


def _read(spec: str) -> list:
    stats = SampleStats()
    samples = [s for u in expand_shards(spec) for s in iter_samples(u, stats)]
    assert stats.total_skipped == 0, stats.summary()
    return samples


def _skipped(summary: dict) -> set[tuple[str, str]]:
    return {(s["reason"], s["where"]) for s in summary["skipped_items"]}


def _check_summary(summary: dict, out: Path) -> None:
    """Invariants of every conversion: nothing listed is unaccounted for, the json matches."""
    assert summary["listed"] == summary["written"] + summary["skipped"]
    assert sum(summary["skipped_by_reason"].values()) == summary["skipped"]
    assert len(summary["skipped_items"]) == summary["skipped"]
    assert all(s["where"] and s["detail"] for s in summary["skipped_items"])
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk["skipped_items"] == summary["skipped_items"]
    assert on_disk["splits"] == summary["splits"]


# --------------------------------------------------------------------------------------
# Stanford Online Products
# --------------------------------------------------------------------------------------


def _sop_archive(root: Path) -> dict[str, bytes]:
    src = root / "Stanford_Online_Products"
    imgs = {
        rel: _put(src / rel, _image_bytes(i))
        for i, rel in enumerate(
            [
                "bicycle_final/111_0.JPG",
                "bicycle_final/111_1.JPG",
                "bicycle_final/222_0.JPG",
                "chair_final/333_0.JPG",
                "chair_final/333_1.JPG",
                "chair_final/444_0.JPG",
            ]
        )
    }
    _put(src / "chair_final/broken.JPG", _truncated_jpeg(7))
    _put(src / "chair_final/fake.JPG", b"this is a text file, not a photo")
    (src / "Ebay_train.txt").write_text(
        "image_id class_id super_class_id path\n"
        "1 1 1 bicycle_final/111_0.JPG\n"
        "2 1 1 bicycle_final/111_1.JPG\n"
        "3 2 1 bicycle_final/222_0.JPG\n"
        "4 2 1 bicycle_final/missing.JPG\n"  # line 5: missing file
        "5 3 1\n"  # line 6: three fields
        "x 3 1 bicycle_final/222_0.JPG\n"  # line 7: not an integer id
        "6 11400 2 chair_final/333_0.JPG\n"  # line 8: a test class in the train file
        "\n"  # a blank line is no item
    )
    (src / "Ebay_test.txt").write_text(
        "image_id class_id super_class_id path\n"
        "7 11319 2 chair_final/333_0.JPG\n"
        "8 11319 2 chair_final/333_1.JPG\n"
        "9 11320 2 chair_final/444_0.JPG\n"
        "10 11320 2 chair_final/broken.JPG\n"  # line 5: truncated JPEG
        "11 11320 2 chair_final/fake.JPG\n"  # line 6: not an image
        "12 11320 2 ../../etc/passwd\n"  # line 7: leaves the archive
        "7 11320 2 chair_final/444_0.JPG\n"  # line 8: image_id 7 again
    )
    return imgs


def test_sop(tmp_path, capsys):
    imgs = _sop_archive(tmp_path)
    out = tmp_path / "sop-shards"
    summary = convert("sop", tmp_path / "Stanford_Online_Products", out, shard_size=2, workers=1)
    _check_summary(summary, out)
    assert summary["written"] == 6 and summary["listed"] == 14
    assert summary["splits"]["train"]["samples"] == 3 and summary["splits"]["train"]["classes"] == 2
    assert summary["splits"]["test"]["samples"] == 3 and summary["splits"]["test"]["shards"] == 2
    assert _skipped(summary) == {
        ("missing_file", "Ebay_train.txt:5"),
        ("malformed_line", "Ebay_train.txt:6"),
        ("malformed_line", "Ebay_train.txt:7"),
        ("malformed_line", "Ebay_train.txt:8"),
        ("undecodable_image", "Ebay_test.txt:5"),
        ("unsupported_format", "Ebay_test.txt:6"),
        ("malformed_line", "Ebay_test.txt:7"),
        ("malformed_line", "Ebay_test.txt:8"),
    }
    assert summary["skipped_by_reason"] == {
        "malformed_line": 5,
        "missing_file": 1,
        "undecodable_image": 1,
        "unsupported_format": 1,
    }
    by_where = {s["where"]: s["detail"] for s in summary["skipped_items"]}
    assert "test classes are 11319-22634" in by_where["Ebay_train.txt:8"]
    assert "leaves the archive" in by_where["Ebay_test.txt:7"]
    assert "already at Ebay_test.txt:2" in by_where["Ebay_test.txt:8"]

    train, test = _read(str(out / "train.txt")), _read(summary["eval_shards"])
    assert [s.meta["class"] for s in train] == ["1", "1", "2"]
    assert [s.meta["class"] for s in test] == ["11319", "11319", "11320"]
    assert {s.meta["split"] for s in train} == {"train"} and {s.meta["split"] for s in test} == {
        "test"
    }
    for s in train + test:  # the archive's bytes, not a re-encoding
        assert s.image_bytes == imgs[s.meta["file"]]
        assert s.caption.startswith("a product photo of a ") and s.meta["caption"] == s.caption
    assert test[0].caption == "a product photo of a chair" and test[0].meta["super_class"] == 2
    assert summary["eval_splits"] == ["test"]
    err = capsys.readouterr().err
    assert "skipped 8 (malformed_line=5, missing_file=1" in err
    assert "Ebay_test.txt:5" in err and "data.eval_shards=" in err


def test_sop_listing_missing_is_one_clear_error(tmp_path):
    with pytest.raises(ConvertError, match=r"Ebay_train\.txt not found: --src must be"):
        convert("sop", tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------


def _cub_archive(root: Path) -> Path:
    src = root / "CUB_200_2011"
    for i, rel in enumerate(
        [
            "001.Black_footed_Albatross/a.jpg",
            "001.Black_footed_Albatross/b.jpg",
            "101.White_Pelican/c.jpg",
            "101.White_Pelican/d.jpg",
            "200.Common_Yellowthroat/e.jpg",
            "200.Common_Yellowthroat/nolabel.jpg",
        ]
    ):
        _put(src / "images" / rel, _image_bytes(20 + i))
    (src / "images.txt").write_text(
        "1 001.Black_footed_Albatross/a.jpg\n"
        "2 001.Black_footed_Albatross/b.jpg\n"
        "3 101.White_Pelican/c.jpg\n"
        "4 101.White_Pelican/d.jpg\n"
        "5 200.Common_Yellowthroat/e.jpg\n"
        "6 200.Common_Yellowthroat/missing.jpg\n"  # line 6: missing file
        "7\n"  # line 7: one field
        "8 200.Common_Yellowthroat/nolabel.jpg\n"  # line 8: no class line
    )
    (src / "image_class_labels.txt").write_text(
        "1 1\n2 1\n3 101\n4 101\n5 200\n6 200\n"
        "9 5\n"  # line 7: id 9 is not an image
        "1 2\n"  # line 8: a second class for id 1
        "4 201\n"  # line 9: class out of range
    )
    (src / "train_test_split.txt").write_text("1 1\n2 0\n")  # present, and ignored
    return src


def test_cub(tmp_path):
    out = tmp_path / "cub-shards"
    summary = convert("cub", _cub_archive(tmp_path), out, workers=1)
    _check_summary(summary, out)
    assert _skipped(summary) == {
        ("missing_file", "images.txt:6"),
        ("malformed_line", "images.txt:7"),
        ("malformed_line", "images.txt:8"),
        ("malformed_line", "image_class_labels.txt:7"),
        ("malformed_line", "image_class_labels.txt:8"),
        ("malformed_line", "image_class_labels.txt:9"),
    }
    train, test = _read(str(out / "train.txt")), _read(str(out / "eval.txt"))
    assert [s.meta["class"] for s in train] == ["1", "1"]
    assert [s.meta["class"] for s in test] == ["101", "101", "200"]
    assert test[0].caption == "a photo of a White Pelican, a type of bird"
    assert test[0].meta["file"] == "images/101.White_Pelican/c.jpg"
    assert summary["splits"]["test"]["classes"] == 2


def test_cli_cub_and_rebuild_removes_stale_shards(tmp_path, capsys):
    src = _cub_archive(tmp_path)
    out = tmp_path / "cub-shards"
    assert main(["data", "cub", "--src", str(src), "--out", str(out), "--shard-size", "1"]) == 0
    assert len(list((out / "test").glob("cub-*.tar"))) == 3
    assert "cub: wrote 5 of 11 listed images" in capsys.readouterr().err
    assert main(["data", "cub", "--src", str(src), "--out", str(out)]) == 0
    assert [p.name for p in (out / "test").glob("cub-*.tar")] == ["cub-000000.tar"]
    assert len(_read(str(out / "eval.txt"))) == 3


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["data", "cub", "--out", "OUT"], "needs --src DIR"),
        (["data", "sop", "--src", "SRC", "--out", "OUT"], "Ebay_train.txt not found"),
        (["data", "cub", "--src", "CUB", "--out", "OUT", "--shard-size", "0"], "at least 1"),
        (["data", "demo", "--src", "SRC", "--out", "OUT"], "--src/--shard-size are for"),
        (["data", "cars", "--src", "NOWHERE", "--out", "OUT"], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, needle):
    src = tmp_path / "src"
    src.mkdir()
    cub = _cub_archive(tmp_path)
    subst = {"OUT": str(tmp_path / "out"), "SRC": str(src), "CUB": str(cub)}
    subst["NOWHERE"] = str(tmp_path / "nowhere")
    assert main([subst.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert err.startswith("megaclass: ") and err.count("\n") == 1


def test_cli_dataset_names_match_the_registries():
    sub = next(
        a for a in build_parser()._actions if getattr(a, "choices", None) and "data" in a.choices
    )
    data = sub.choices["data"]
    names = next(a for a in data._actions if a.dest == "dataset").choices
    assert set(names) == set(BUILDERS) | set(CONVERTERS)
    assert not set(BUILDERS) & set(CONVERTERS)


# --------------------------------------------------------------------------------------
# Cars196
# --------------------------------------------------------------------------------------


def _cars_archive(root: Path) -> Path:
    import scipy.io

    src = root / "cars196"
    rows = [  # (relative_im_path, class, test flag)
        ("car_ims/000001.jpg", 1, 0),
        ("car_ims/000002.jpg", 1, 1),
        ("car_ims/000003.jpg", 98, 0),
        ("car_ims/000004.jpg", 99, 1),
        ("car_ims/000005.jpg", 99, 0),
        ("car_ims/000006.jpg", 196, 1),
        ("car_ims/000007.jpg", 197, 0),  # annotation 7: class out of range
        ("car_ims/000008.jpg", 5, 0),  # annotation 8: missing file
        (np.float64(3.5), 5, 0),  # annotation 9: a number where the path belongs
    ]
    for i in range(1, 8):
        _put(src / f"car_ims/{i:06d}.jpg", _image_bytes(40 + i))
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annos = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for i, (path, cls, test) in enumerate(rows):
        box = [np.array([[v]], dtype=np.uint16) for v in (1, 2, 20, 18)]
        annos[0, i] = (path, *box, np.array([[cls]], np.uint8), np.array([[test]], np.uint8))
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Make{c + 1} Model Sedan 2012"
    scipy.io.savemat(src / "cars_annos.mat", {"annotations": annos, "class_names": names})
    return src


def test_cars(tmp_path):
    out = tmp_path / "cars-shards"
    summary = convert("cars", _cars_archive(tmp_path), out, workers=1)
    _check_summary(summary, out)
    assert _skipped(summary) == {
        ("malformed_line", "cars_annos.mat:annotations(7)"),
        ("missing_file", "cars_annos.mat:annotations(8)"),
        ("malformed_line", "cars_annos.mat:annotations(9)"),
    }
    train, test = _read(str(out / "train.txt")), _read(str(out / "eval.txt"))
    assert [s.meta["class"] for s in train] == ["1", "1", "98"]
    assert [s.meta["class"] for s in test] == ["99", "99", "196"]
    # the metric-learning split ignores the devkit's own test flag, which is kept
    assert [s.meta["devkit_test"] for s in train] == [False, True, False]
    assert test[2].meta["class_name"] == "Make196 Model Sedan 2012"
    assert test[2].caption == "a photo of a Make196 Model Sedan 2012, a type of car"


def test_cars_bad_mat_is_one_clear_error(tmp_path):
    (tmp_path / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, but then garbage")
    with pytest.raises(ConvertError, match=r"cars_annos\.mat: cannot read it as a MATLAB"):
        convert("cars", tmp_path, tmp_path / "out")
    import scipy.io

    scipy.io.savemat(tmp_path / "cars_annos.mat", {"other": np.zeros(3)})
    with pytest.raises(ConvertError, match="struct array 'annotations'"):
        convert("cars", tmp_path, tmp_path / "out")


# --------------------------------------------------------------------------------------
# In-Shop
# --------------------------------------------------------------------------------------


def _inshop_archive(root: Path) -> Path:
    src = root / "inshop"
    rows = [
        ("img/WOMEN/Dresses/id_00000001/01_1_front.jpg", "id_00000001", "train"),
        ("img/WOMEN/Dresses/id_00000001/01_2_side.jpg", "id_00000001", "train"),
        ("img/MEN/Denim/id_00000002/01_1_front.jpg", "id_00000002", "query"),
        ("img/MEN/Denim/id_00000002/01_2_side.jpg", "id_00000002", "gallery"),
        ("img/MEN/Denim/id_00000002/01_3_back.jpg", "id_00000002", "gallery"),
        ("img/MEN/Denim/id_00000003/01_1_front.jpg", "id_00000003", "query"),
        ("img/MEN/Denim/id_00000003/01_2_side.jpg", "id_00000003", "gallery"),
    ]
    for i, (rel, _, _) in enumerate(rows):
        _put(src / rel, _image_bytes(60 + i))
    lines = [f"{a}  {b}  {c}" for a, b, c in rows]
    lines.append("img/MEN/Denim/id_00000003/01_1_front.jpg id_00000003 validation")  # line 10
    lines.append("img/MEN/Denim/id_00000003/01_9_gone.jpg id_00000003 gallery")  # line 11
    (src / "Eval").mkdir()
    (src / "Eval" / "list_eval_partition.txt").write_text(
        "10\nimage_name item_id evaluation_status\n" + "\n".join(lines) + "\n"
    )
    return src


def test_inshop(tmp_path):
    out = tmp_path / "inshop-shards"
    summary = convert("inshop", _inshop_archive(tmp_path), out, workers=1)
    _check_summary(summary, out)
    assert _skipped(summary) == {
        ("malformed_line", "list_eval_partition.txt:10"),
        ("missing_file", "list_eval_partition.txt:11"),
    }
    assert summary["notes"] == ["list_eval_partition.txt: line 1 declares 10 images, 9 rows follow"]
    assert {k: v["samples"] for k, v in summary["splits"].items()} == {
        "gallery": 3,
        "query": 2,
        "train": 2,
    }
    ev = _read(str(out / "eval.txt"))
    assert [s.meta["split"] for s in ev] == ["query", "query", "gallery", "gallery", "gallery"]
    assert [s.meta["class"] for s in ev] == [
        "id_00000002",
        "id_00000003",
        "id_00000002",
        "id_00000002",
        "id_00000003",
    ]
    assert ev[0].caption == "a product photo of men's denim"
    assert summary["eval_splits"] == ["query", "gallery"]


# --------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------


def _folder_tree(root: Path) -> Path:
    src = root / "tree"
    _put(src / "train/cat/a.jpg", _image_bytes(80))
    _put(src / "train/cat/b.png", _image_bytes(81, "PNG"))
    _put(src / "train/dog/c.jpg", _image_bytes(82))
    _put(src / "val/cat/d.jpg", _image_bytes(83))
    _put(src / "val/dog/e.webp", _image_bytes(84, "WEBP"))
    _put(src / "val/dog/big_dog/f.jpg", _image_bytes(85))  # nested: class dog/big_dog
    _put(src / "val/stray.jpg", _image_bytes(86))  # no class folder
    _put(src / "val/dog/notes.txt", b"labels")  # not an image
    _put(src / "val/dog/g.gif", _image_bytes(87, "GIF"))  # unsupported format
    _put(src / "val/dog/h.jpg", _image_bytes(88, "PNG"))  # PNG named .jpg: fine, sniffed
    _put(src / "val/dog/i.jpg", b"GIF89a" + b"\0" * 40)  # GIF named .jpg: refused
    _put(src / "README.txt", b"a tree")  # beside the split folders: no split, not an image
    _put(src / "cover.jpg", _image_bytes(89))  # beside the split folders: no class
    _put(src / "val/.cache/cat/x.jpg", _image_bytes(90))  # hidden folder: noted, not entered
    return src


def test_imagefolder_with_splits(tmp_path):
    out = tmp_path / "folder-shards"
    summary = convert("imagefolder", _folder_tree(tmp_path), out, workers=1)
    _check_summary(summary, out)
    assert _skipped(summary) == {
        ("not_an_image", "README.txt"),
        ("no_class_folder", "cover.jpg"),
        ("no_class_folder", "val/stray.jpg"),
        ("not_an_image", "val/dog/notes.txt"),
        ("unsupported_format", "val/dog/g.gif"),
        ("unsupported_format", "val/dog/i.jpg"),
    }
    train, val = _read(str(out / "train.txt")), _read(str(out / "eval.txt"))
    assert [(s.meta["class"], s.image_ext) for s in train] == [
        ("cat", "jpg"),
        ("cat", "png"),
        ("dog", "jpg"),
    ]
    assert [(s.meta["class"], s.image_ext) for s in val] == [
        ("cat", "jpg"),
        ("dog", "webp"),
        ("dog", "png"),
        ("dog/big_dog", "jpg"),
    ]
    assert {s.meta["split"] for s in val} == {"val"} and summary["eval_splits"] == ["val"]
    assert summary["notes"] == ["hidden folder val/.cache/ not converted"]


def test_imagefolder_without_splits_and_mixed_tops(tmp_path):
    src = tmp_path / "flat"
    _put(src / "red/a.jpg", _image_bytes(90))
    _put(src / "blue/b.jpg", _image_bytes(91))
    listing = list_imagefolder(src)
    assert [(i.cls, i.split) for i in listing.items] == [("blue", "all"), ("red", "all")]
    summary = convert("imagefolder", src, tmp_path / "out", workers=1)
    assert summary["eval_splits"] == ["all"] and len(_read(summary["eval_shards"])) == 2
    _put(src / "train/red/c.jpg", _image_bytes(92))
    with pytest.raises(ConvertError, match="mix split names"):
        list_imagefolder(src)


def test_worker_pool_writes_the_same_shards(tmp_path):
    src = _folder_tree(tmp_path)
    a = convert("imagefolder", src, tmp_path / "a", workers=1)
    b = convert("imagefolder", src, tmp_path / "b", workers=2)
    assert a["skipped_items"] == b["skipped_items"]
    for split in ("train", "val"):
        for x, y in zip(
            sorted((tmp_path / "a" / split).glob("*.tar")),
            sorted((tmp_path / "b" / split).glob("*.tar")),
            strict=True,
        ):
            assert x.read_bytes() == y.read_bytes()


def test_sniff_format():
    assert sniff_format(_image_bytes(1)) == "jpg"
    assert sniff_format(_image_bytes(1, "PNG")) == "png"
    assert sniff_format(_image_bytes(1, "WEBP")) == "webp"
    assert sniff_format(_image_bytes(1, "GIF")) is None
    assert sniff_format(_image_bytes(1, "BMP")) is None
    assert sniff_format(b"") is None


def test_nothing_converted_is_an_error_after_the_summary(tmp_path):
    src = tmp_path / "tree"
    _put(src / "cat/a.jpg", b"not an image")
    with pytest.raises(ConvertError, match="no image could be converted"):
        convert("imagefolder", src, tmp_path / "out", workers=1)
    summary = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert summary["skipped_by_reason"] == {"unsupported_format": 1}
