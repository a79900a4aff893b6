"""Export round trips: our safetensors + config, and the open_clip-loadable full state dict."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from megaclass.pipelines.config import ConfigError, TrainConfig
from megaclass.training.encoders import build_student, register_tiny_configs
from megaclass.training.export import export_encoder, load_encoder
from PIL import Image


def _perturb(model):
    # "trained" weights: anything different from a fresh init
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def test_open_clip_export_loads_in_open_clip_with_same_features(tmp_path):
    torch.manual_seed(0)
    tc = TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=32)
    model = build_student(tc, image_size=32)
    _perturb(model)
    paths = export_encoder(model, tmp_path, {"training": {"steps": 3}}, seed=0)
    assert set(paths) == {
        "encoder",
        "encoder_config",
        "open_clip",
        "open_clip_config",
        "model_card",
        "hub_card",
    }
    register_tiny_configs()
    clip = open_clip.create_model("megaclass-tiny-vit", pretrained=paths["open_clip"]).eval()
    enc, tf = load_encoder(tmp_path)
    model.eval()
    img = Image.new("RGB", (50, 40), (200, 30, 90))
    x = tf(img)[None]
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        ref = model.encoder(x)
        assert torch.allclose(clip.encode_image(x), ref, atol=1e-6)
        assert torch.allclose(enc(x), ref, atol=1e-6)
    assert not enc.training
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "NOT trained" in card and "megaclass-tiny-vit" in card and "Not evaluated" in card


def test_siglip_export_carries_trained_text_tower(tmp_path):
    tc = TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=32, objective="siglip")
    model = build_student(tc, image_size=32)
    _perturb(model)
    paths = export_encoder(model, tmp_path, {"eval": {"recall@1": 0.5}})
    register_tiny_configs()
    clip = open_clip.create_model("megaclass-tiny-vit", pretrained=paths["open_clip"]).eval()
    model.eval()
    tok = model.text.tokenize(["a red circle", "a blue square"])
    with torch.no_grad():
        assert torch.allclose(clip.encode_text(tok), model.text(tok), atol=1e-6)
    assert torch.allclose(clip.logit_scale, model.logit_scale.reshape(()))
    assert all(p.ndim > 0 for p in model.parameters())  # DeepSpeed cannot broadcast 0-dim
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "trained jointly" in card and "recall@1" in card


def test_projection_export_and_efficientnet_roundtrip(tmp_path):
    # embed_dim differs from the CLIP width: no open_clip file, and the card says why
    tc = TrainConfig(model="open_clip:megaclass-tiny-vit", embed_dim=16)
    model = build_student(tc, image_size=32)
    paths = export_encoder(model, tmp_path / "a")
    assert "open_clip" not in paths
    assert "differs" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    tc = TrainConfig(model="efficientnet-lite0", embed_dim=24, pretrained=None)
    model = build_student(tc, image_size=64).eval()
    _perturb(model)
    export_encoder(model, tmp_path / "b")
    enc, tf = load_encoder(tmp_path / "b" / "encoder.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(enc(x), model.encoder(x), atol=1e-5)
    assert json.loads((tmp_path / "b" / "encoder.json").read_text())["spec"]["embed_dim"] == 24


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_encoder(tmp_path)
    with pytest.raises(ConfigError, match="train.model"):
        build_student(TrainConfig(model="resnet-9000"), 32)
    with pytest.raises(ConfigError, match="siglip"):
        build_student(TrainConfig(model="efficientnet-lite0", objective="siglip"), 32)
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_student(TrainConfig(model="open_clip:NoSuchNet"), 32)


def test_registering_tiny_configs_leaves_no_temp_folder(monkeypatch, tmp_path):
    """The tiny open_clip configs are registered from a temporary folder that is removed at
    once (every process used to leave one behind in /tmp); open_clip keeps the parsed configs,
    also across a later rescan."""
    import tempfile

    import open_clip
    from megaclass.training import encoders, teachers

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(encoders, "_registered", False)
    monkeypatch.setattr(teachers, "_TINY_REGISTERED", False)
    encoders.register_tiny_configs()
    teachers._register_tiny()
    assert list(tmp_path.iterdir()) == []
    other = tmp_path / "other-configs"
    other.mkdir()
    open_clip.add_model_config(other)  # rescans every registered path, the removed ones too
    names = set(open_clip.list_models())
    assert set(encoders.TINY_OPEN_CLIP_CONFIGS) <= names and teachers.TINY_OPEN_CLIP in names
