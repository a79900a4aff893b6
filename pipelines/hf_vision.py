"""Hugging Face vision towers from a local folder, as frozen eval encoders (``hf:FOLDER``).

Why a separate module: MLCD's released checkpoints (and CLIP/SigLIP ones) are published as
transformers folders (``config.json`` + ``model.safetensors`` [+ ``preprocessor_config.json``]);
evaluating them beside our own students needs transformers, which nothing else in megaclass
imports. Loading is strictly offline (``HF_HUB_OFFLINE=1``, ``local_files_only``): a folder
name that is not on disk is an error, never a download.

Which class and which output (the feature the paper's numbers are computed on):

========================================  ===============================  =====================
config.json                               class                            feature
========================================  ===============================  =====================
model_type ``mlcd_vision_model``          ``MLCDVisionModel``              ``pooler_output``
model_type ``clip_vision_model``          ``CLIPVisionModel``              ``pooler_output``
  … architectures name ``…WithProjection``  ``CLIPVisionModelWithProjection``  ``image_embeds``
model_type ``clip`` (a whole CLIPModel)   ``CLIPVisionModelWithProjection``  ``image_embeds``
model_type ``siglip_vision_model``/``siglip``  ``SiglipVisionModel``     ``pooler_output``
========================================  ===============================  =====================

CLIP's projected ``image_embeds`` are what zero-shot retrieval compares, so a saved projection
is used when there is one. Features are L2-normalised in float32.

Preprocessing: the folder's ``preprocessor_config.json`` through transformers' image processor
(``AutoImageProcessor``) when present; otherwise a documented default — resize the shorter side
to the config's ``image_size`` (bicubic), centre crop, scale to [0, 1] and normalise with the
model family's mean/std (OpenAI CLIP's for clip and mlcd, 0.5/0.5 for siglip).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megaclass.core.errors import UserError

HF_PREFIX = "hf:"
"""``eval.encoders`` prefix of a Hugging Face folder: ``hf:/models/mlcd-vit-bigG-patch14-336``."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
"""Files whose size/mtime make up the folder's fingerprint (weights, config, preprocessor)."""
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFEncoderError(UserError, ValueError):
    """The folder is not a loadable transformers vision model of a supported family."""


def read_hf_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, or an error naming what is missing."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HFEncoderError(f"{folder}: no config.json (expected a save_pretrained folder)")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFEncoderError(f"{cfg_path}: unreadable ({e})") from e


def pick_class(cfg: dict[str, Any], folder: Path) -> tuple[str, str]:
    """(transformers class name, output field) for a folder's config.json (table above)."""
    mt = str(cfg.get("model_type", ""))
    archs = [str(a) for a in cfg.get("architectures") or []]
    if mt in ("mlcd_vision_model", "mlcd"):
        return "MLCDVisionModel", "pooler_output"
    if mt == "clip" or (
        mt == "clip_vision_model" and any(a.endswith("WithProjection") for a in archs)
    ):
        return "CLIPVisionModelWithProjection", "image_embeds"
    if mt == "clip_vision_model":
        return "CLIPVisionModel", "pooler_output"
    if mt in ("siglip_vision_model", "siglip"):
        return "SiglipVisionModel", "pooler_output"
    raise HFEncoderError(
        f"{folder}/config.json: model_type {mt!r} (architectures {archs}) is not a supported "
        "vision tower; hf: loads mlcd_vision_model, clip_vision_model, clip, "
        "siglip_vision_model and siglip"
    )


def fingerprint(folder: Path) -> list[dict[str, Any]]:
    """Size and mtime of every weights/config file in the folder (cheap; no weights read)."""
    out = []
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES):
            st = f.stat()
            out.append({"file": f.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _default_transform(cfg: dict[str, Any], family: str) -> Callable[[Any], torch.Tensor]:
    import torchvision.transforms as T

    vcfg = cfg.get("vision_config", cfg) if cfg.get("model_type") in ("clip", "siglip") else cfg
    size = int(vcfg.get("image_size", 224))
    mean, std = (
        ((0.5,) * 3, (0.5,) * 3) if family == "SiglipVisionModel" else (_CLIP_MEAN, _CLIP_STD)
    )
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def load_hf_vision(
    folder: str | Path, device: torch.device
) -> tuple[Callable[[Any], torch.Tensor], Callable[[torch.Tensor], np.ndarray], int, str]:
    """(PIL → tensor transform, batch → unit float32 rows, feature dim, class name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise HFEncoderError(
            f"hf:{folder}: not a folder (hf: takes a local save_pretrained folder)"
        )
    cfg = read_hf_config(folder)
    cls_name, field = pick_class(cfg, folder)
    import transformers

    cls = getattr(transformers, cls_name)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise HFEncoderError(f"hf:{folder}: transformers cannot load it as {cls_name}: {e}") from e
    model = model.to(device).eval()

    if (folder / "preprocessor_config.json").is_file():
        proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)

        def transform(img: Any) -> torch.Tensor:
            return proc(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    else:
        transform = _default_transform(cfg, cls_name)

    def encode(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = getattr(model(pixel_values=x.to(device, torch.float32)), field).float()
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()

    dim = int(
        getattr(model.config, "projection_dim", 0)
        if field == "image_embeds"
        else model.config.hidden_size
    )
    return transform, encode, dim, cls_name
