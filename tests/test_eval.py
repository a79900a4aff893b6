"""The eval stage end to end on tiny labelled shards, with real teachers and a real exported student."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megaclass.pipelines.config import load_config
from megaclass.pipelines.eval import (
    EvalError,
    format_table,
    parse_encoder_spec,
    run_eval,
)
from megaclass.pipelines.retrieval import evaluate_features
from PIL import Image

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 40),
    "black": (10, 10, 10),
}


def _image(rgb: tuple[int, int, int], seed: int) -> Image.Image:
    """A flat colour with mild noise and a random bright square (same class: same colour)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 12, (40, 40, 3)), 0, 255)
    x, y = rng.integers(0, 28, 2)
    arr[y : y + 12, x : x + 12] = 255
    return Image.fromarray(arr.astype(np.uint8))


def _eval_shards(root: Path) -> dict:
    from megaclass.data.writer import ShardWriter

    n = 0
    with ShardWriter(root, prefix="heldout-", maxcount=12) as w:
        for rep in range(6):
            for name, rgb in COLORS.items():
                w.write(f"{name}-{rep}", _image(rgb, n), f"a {name} picture", {"class": name})
                n += 1
        w.write("purple-0", _image((140, 20, 160), 99), "the only purple one", {"class": "purple"})
        w.write("noclass-0", _image((0, 0, 0), 98), "a sample without class", {"other": 1})
    return {"spec": "::".join(w.shards), "n": n + 1}  # +1: the purple singleton


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return _eval_shards(tmp_path_factory.mktemp("evalshards"))


@pytest.fixture(scope="module")
def exported_student(tmp_path_factory):
    """A real student exported by the train helper's exporter (tiny open_clip ViT, random init)."""
    from megaclass.pipelines.config import TrainConfig
    from megaclass.training.encoders import build_student
    from megaclass.training.export import export_encoder

    torch.manual_seed(0)
    # embed_dim = the tiny ViT's width: the exporter also writes an open_clip state dict
    model = build_student(TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=32))
    out = tmp_path_factory.mktemp("export")
    export_encoder(model, out)
    assert (out / "open_clip_model.safetensors").is_file()
    return out


def _cfg(run: Path, shards: str, encoders: list[str], **extra: str):
    overrides = [
        f"run_dir={run}",
        f"data.eval_shards={shards}",
        f"eval.encoders={json.dumps(encoders)}",
        "eval.compact_dims=[16, 64]",
        "eval.knn_k=3",
        "eval.batch_size=7",
        "eval.chunk_size=9",
        "embed.image_teacher=open_clip:megaclass-tiny",
        "embed.text_teacher=none",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_eval_teacher_and_exported_student(tmp_path, eval_data, exported_student, capsys):
    from megaclass.training.export import load_encoder
    from megaclass.training.teachers import load_teacher

    run = tmp_path / "run"
    shutil.copytree(exported_student, run / "export")  # as the train stage leaves it
    clip_file = exported_student / "open_clip_model.safetensors"
    encoders = [
        "teacher",
        "student",
        f"copy={exported_student}",
        f"oc=open_clip:megaclass-tiny-vit@{clip_file}",
    ]
    cfg = _cfg(run, eval_data["spec"], encoders)
    summary = run_eval(cfg)

    # files in the contract layout
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert (
        json.loads((run / "eval" / "_SUCCESS.json").read_text())["encoders"] == metrics["encoders"]
    )
    es = metrics["eval_set"]
    assert es["n"] == eval_data["n"] and es["classes"] == 6
    assert es["read"]["skipped"] == {"missing_class": 1}
    assert set(metrics["encoders"]) == {"teacher", "student", "copy", "oc"}
    assert metrics["encoder_order"] == ["teacher", "student", "copy", "oc"]
    assert metrics["encoders"]["student"]["kind"] == "student"
    assert metrics["encoders"]["copy"]["kind"] == "path"

    # stored features equal an independent forward pass of each encoder over the same images
    teacher = load_teacher("open_clip:megaclass-tiny", "none")
    student, transform = load_encoder(exported_student)
    z = np.load(run / "eval" / "features" / "teacher.npz")
    keys = z["keys"].tolist()
    assert len(keys) == eval_data["n"] and "noclass-0" not in keys
    # the shard holds JPEGs: compare against the decoded shard images
    from megaclass.data.reader import iter_samples
    from megaclass.data.shards import expand_shards
    from megaclass.data.stats import SampleStats

    imgs = [
        s.image
        for u in expand_shards(eval_data["spec"])
        for s in iter_samples(u, SampleStats())
        if s.key in keys[:5]
    ]
    ref_t = teacher.encode_images(torch.stack([teacher.image_transform(i) for i in imgs]))
    np.testing.assert_allclose(z["x"][:5], ref_t, atol=1e-5)
    with torch.inference_mode():
        ref_s = torch.nn.functional.normalize(
            student(torch.stack([transform(i) for i in imgs])), dim=-1
        )
    zs = np.load(run / "eval" / "features" / "student.npz")
    np.testing.assert_allclose(zs["x"][:5], ref_s.numpy(), atol=1e-5)
    assert zs["x"].shape == (eval_data["n"], 32) and z["x"].shape == (eval_data["n"], 32)
    # RUN/export (kind 'student') and the same export by path give the same features
    zc = np.load(run / "eval" / "features" / "copy.npz")
    np.testing.assert_array_equal(zc["x"], zs["x"])
    # the exported open_clip state dict carries the trained tower: open_clip's own preprocessing
    # differs slightly (bicubic resize), so the features agree closely rather than exactly
    zo = np.load(run / "eval" / "features" / "oc.npz")
    assert float((zo["x"] * zs["x"]).sum(1).mean()) > 0.9

    # metrics are those of the metrics library on the stored features
    ref = evaluate_features(z["x"], z["classes"].tolist(), (1, 2, 4, 8), 3, [16], 4096)
    t = metrics["encoders"]["teacher"]
    for key in ("recall@1", "recall@8", "map@r", "knn_acc"):
        assert t["full"][key] == pytest.approx(ref["full"][key])
        assert t["compact"]["16"][key] == pytest.approx(ref["compact"]["16"][key])
    assert t["full"]["excluded_singletons"] == 1  # the purple image
    # 64 > both feature sizes: recorded as skipped, not a crash; 16 fits both
    assert (
        "64" in t["compact_skipped"] and "64" in metrics["encoders"]["student"]["compact_skipped"]
    )
    assert metrics["comparison"]["full"]["recall@1"] == pytest.approx(
        metrics["encoders"]["student"]["full"]["recall@1"] - t["full"]["recall@1"]
    )
    # colours are easy even for random conv features: far above chance (1/5)
    assert t["full"]["recall@1"] > 0.5

    out = capsys.readouterr().out
    assert "Δ student−teacher" in out and "R@1" in out and "mAP@R" in out and "kNN@3" in out
    assert summary["encoders"]["teacher"]["cached"] is False

    # a second run reuses every encoder's features (fingerprints unchanged) with equal numbers
    again = run_eval(cfg)
    assert all(again["encoders"][n]["cached"] for n in ("teacher", "student", "copy", "oc"))
    for name in ("teacher", "student"):
        new, old = again["encoders"][name]["full"], metrics["encoders"][name]["full"]
        assert {k: v for k, v in new.items() if k != "seconds"} == {
            k: v for k, v in old.items() if k != "seconds"
        }

    # a retrained student (new export in RUN/export) is embedded again; the others are reused
    from megaclass.pipelines.config import TrainConfig
    from megaclass.training.encoders import build_student
    from megaclass.training.export import export_encoder

    torch.manual_seed(1)
    export_encoder(
        build_student(TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=32)),
        run / "export",
    )
    third = run_eval(cfg)
    assert third["encoders"]["student"]["cached"] is False
    assert all(third["encoders"][n]["cached"] for n in ("teacher", "copy", "oc"))
    z3 = np.load(run / "eval" / "features" / "student.npz")["x"]
    assert np.abs(z3 - zs["x"]).max() > 1e-3


def test_open_clip_spec_and_errors(tmp_path, eval_data):
    cfg = _cfg(tmp_path / "r", eval_data["spec"], ["teacher"])
    sp = parse_encoder_spec("clip=open_clip:megaclass-tiny@/no/such.pt", cfg)
    assert (sp.name, sp.kind, sp.model, sp.pretrained) == (
        "clip",
        "model",
        "open_clip:megaclass-tiny",
        "/no/such.pt",
    )
    assert parse_encoder_spec("student", cfg).path == str(tmp_path / "r")
    with pytest.raises(EvalError, match="not 'teacher', 'student'"):
        parse_encoder_spec("/definitely/missing/encoder", cfg)
    # no held-out set (own shards only): eval is skipped with a note and the stage completes
    skipped = run_eval(_cfg(tmp_path / "r2", "", ["teacher"]))
    assert skipped["skipped"] and "data.eval_shards is empty" in skipped["note"]
    assert (tmp_path / "r2" / "eval" / "_SUCCESS.json").is_file()
    with pytest.raises(EvalError, match="same name"):
        run_eval(_cfg(tmp_path / "r3", eval_data["spec"], ["teacher", "teacher"]))
    # a student that was never trained: the error names what is missing
    with pytest.raises(EvalError, match="no complete checkpoint"):
        run_eval(_cfg(tmp_path / "r4", eval_data["spec"], ["student"]))


def test_format_table_marks_missing_values():
    summary = {
        "eval_set": {"n": 3, "classes": 2},
        "encoders": {
            "a": {
                "dim": 8,
                "full": {"recall@1": 0.5, "map@r": None, "knn_acc": 1.0, "knn_k": 2},
                "compact": {"4": {"recall@1": 0.25, "map@r": 0.125, "knn_acc": 0.0, "knn_k": 2}},
            }
        },
        "comparison": None,
    }
    table = format_table(summary)
    lines = table.splitlines()
    assert "R@1" in lines[1] and "kNN@2" in lines[1]
    assert lines[3].split()[-3:] == ["50.0", "—", "100.0"]
    assert lines[4].split() == ["a", "4", "25.0", "12.5", "0.0"]
