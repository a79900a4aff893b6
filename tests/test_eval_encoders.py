"""Encoders megaclass did not train, by name in eval.encoders: Hugging Face vision towers from a
local folder (tiny random MLCDVisionModel and CLIPVisionModelWithProjection) and an open_clip
model from a local .pt file, evaluated side by side in one table; features checked against a
direct forward pass of each library."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megaclass.pipelines.eval import EvalError, parse_encoder_spec, run_eval
from megaclass.pipelines.hf_vision import HFEncoderError, pick_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_eval import _cfg, _eval_shards  # noqa: E402

_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return _eval_shards(tmp_path_factory.mktemp("evalshards"))


def _save_mlcd(folder: Path, seed: int) -> None:
    from transformers import MLCDVisionConfig, MLCDVisionModel

    torch.manual_seed(seed)
    MLCDVisionModel(MLCDVisionConfig(**_TINY, image_size=32, patch_size=8)).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An MLCD folder without preprocessor (the default transform), a CLIP folder with a
    projection and its image processor, and an open_clip state dict saved with torch.save."""
    import open_clip
    from megaclass.training.encoders import register_tiny_configs
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    root = tmp_path_factory.mktemp("models")
    _save_mlcd(root / "mlcd-tiny", 0)
    torch.manual_seed(1)
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**_TINY, image_size=32, patch_size=8, projection_dim=16)
    )
    clip.save_pretrained(root / "clip-tiny")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root / "clip-tiny")
    register_tiny_configs()
    torch.manual_seed(2)
    oc = open_clip.create_model("megaclass-tiny-vit")
    torch.save(oc.state_dict(), root / "oc.pt")
    return root


def _shard_images(spec: str, keys: list[str]):
    from megaclass.data.reader import iter_samples
    from megaclass.data.shards import expand_shards
    from megaclass.data.stats import SampleStats

    by_key = {s.key: s.image for u in expand_shards(spec) for s in iter_samples(u, SampleStats())}
    return [by_key[k] for k in keys]


def _default_pixels(img, size: int) -> torch.Tensor:
    """hf_vision's documented default, written out independently: bicubic shorter side, centre
    crop, [0, 1], OpenAI CLIP mean/std."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    a = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    return torch.from_numpy(((a - mean) / std).transpose(2, 0, 1).copy())


def test_hf_and_open_clip_file_side_by_side(tmp_path, eval_data, models, capsys):
    import open_clip
    from megaclass.training.encoders import register_tiny_configs
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, MLCDVisionModel

    run = tmp_path / "run"
    encoders = [
        f"hf:{models / 'mlcd-tiny'}",
        f"clip=hf:{models / 'clip-tiny'}",
        f"oc=open_clip:megaclass-tiny-vit@{models / 'oc.pt'}",
    ]
    cfg = _cfg(run, eval_data["spec"], encoders, **{"eval.compact_dims": "[]"})
    summary = run_eval(cfg)
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["encoder_order"] == ["mlcd-tiny", "clip", "oc"]
    assert m["encoders"]["mlcd-tiny"]["model"] == "MLCDVisionModel"
    assert m["encoders"]["clip"]["dim"] == 16  # the projected image_embeds, not the width
    feats = {n: np.load(run / "eval" / "features" / f"{n}.npz") for n in m["encoder_order"]}
    keys = feats["oc"]["keys"].tolist()
    assert len(keys) == eval_data["n"]
    imgs = _shard_images(eval_data["spec"], keys[:6])

    def unit(t: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(t.float(), dim=-1).numpy()

    with torch.no_grad():
        mlcd = MLCDVisionModel.from_pretrained(models / "mlcd-tiny").eval()
        ref = mlcd(pixel_values=torch.stack([_default_pixels(i, 32) for i in imgs])).pooler_output
        np.testing.assert_allclose(feats["mlcd-tiny"]["x"][:6], unit(ref), atol=1e-5)
        clip = CLIPVisionModelWithProjection.from_pretrained(models / "clip-tiny").eval()
        px = CLIPImageProcessor.from_pretrained(models / "clip-tiny")(
            images=imgs, return_tensors="pt"
        )["pixel_values"]
        np.testing.assert_allclose(
            feats["clip"]["x"][:6], unit(clip(pixel_values=px).image_embeds), atol=1e-5
        )
        register_tiny_configs()
        oc, _, pre = open_clip.create_model_and_transforms(
            "megaclass-tiny-vit", pretrained=str(models / "oc.pt")
        )
        ref_oc = oc.eval().encode_image(torch.stack([pre(i) for i in imgs]))
        np.testing.assert_allclose(feats["oc"]["x"][:6], unit(ref_oc), atol=1e-5)
    table = capsys.readouterr().out
    assert all(name in table for name in ("mlcd-tiny", "clip", "oc")) and "R@1" in table
    assert summary["encoders"]["clip"]["full"]["recall@1"] is not None

    # the fingerprint covers the folder's weights: new MLCD weights are embedded again
    _save_mlcd(models / "mlcd-tiny", 5)
    again = run_eval(cfg)
    assert again["encoders"]["mlcd-tiny"]["cached"] is False
    assert again["encoders"]["clip"]["cached"] and again["encoders"]["oc"]["cached"]


def test_hf_spec_errors_and_class_choice(tmp_path, eval_data):
    cfg = _cfg(tmp_path / "r", eval_data["spec"], ["teacher"])
    with pytest.raises(EvalError, match="no config.json"):
        parse_encoder_spec(f"hf:{tmp_path}", cfg)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(HFEncoderError, match="'bert'.*not a supported vision tower"):
        parse_encoder_spec(f"hf:{tmp_path / 'odd'}", cfg)
    f = tmp_path
    assert pick_class({"model_type": "siglip_vision_model"}, f) == (
        "SiglipVisionModel",
        "pooler_output",
    )
    assert pick_class({"model_type": "clip"}, f)[0] == "CLIPVisionModelWithProjection"
    assert pick_class({"model_type": "clip_vision_model"}, f) == (
        "CLIPVisionModel",
        "pooler_output",
    )
    with pytest.raises(EvalError, match=r"no complete checkpoint .*step-0000040"):
        parse_encoder_spec(f"{tmp_path}@step=40", cfg)
