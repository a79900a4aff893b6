"""Export the trained encoder and load it back (for eval, or for users).

``RUN/export/`` after training:

* ``encoder.safetensors`` + ``encoder.json`` — the student (backbone + projection) and the
  spec that rebuilds its architecture; :func:`load_encoder` reads them.
* ``open_clip_model.safetensors`` (open_clip backbones whose width equals ``embed_dim``) — a
  full CLIP state dict with the trained vision tower, loadable with
  ``open_clip.create_model(name, pretrained=file)``; open_clip insists on a text tower, so it
  carries one: trained for SigLIP, otherwise as initialised (the card says which).
* ``MODEL_CARD.md`` — config, data, training summary and eval numbers when known.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from megaclass.core.atomic import atomic_path, write_json_atomic, write_text_atomic
from megaclass.training.checkpoint import MARKER, latest_complete, read_marker
from megaclass.training.encoders import (
    EncoderSpec,
    create_open_clip,
    encoder_from_spec,
    open_clip_name,
)
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
ENCODER_JSON = "encoder.json"
OPEN_CLIP_FILE = "open_clip_model.safetensors"
CARD_FILE = "MODEL_CARD.md"


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous fp32 CPU copies without shared storage (safetensors refuses aliases)."""
    return {
        k: v.detach()
        .to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
        .contiguous()
        .clone()
        for k, v in sd.items()
    }


def _save_safetensors(path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(_plain(sd), str(tmp), metadata=meta)


def export_encoder(
    model: nn.Module, out_dir: str | Path, card: dict[str, Any] | None = None, seed: int = 0
) -> dict[str, str]:
    """Write the export files for a trained :class:`~megaclass.training.encoders.StudentModel`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc = model.encoder
    spec: EncoderSpec = enc.spec
    paths = {"encoder": str(out / ENCODER_FILE), "encoder_config": str(out / ENCODER_JSON)}
    _save_safetensors(out / ENCODER_FILE, enc.state_dict(), {"format": "megaclass-encoder-v1"})
    write_json_atomic(
        out / ENCODER_JSON,
        {
            "format": "megaclass-encoder-v1",
            "spec": spec.to_dict(),
            "mean": enc.mean,
            "std": enc.std,
        },
    )
    text_note = None
    name = open_clip_name(spec.model)
    if name is not None and isinstance(enc.proj, nn.Identity):
        full, text_note = open_clip_state_dict(model, name, spec, seed)
        _save_safetensors(out / OPEN_CLIP_FILE, full, {"format": "open_clip", "model": name})
        paths["open_clip"] = str(out / OPEN_CLIP_FILE)
    elif name is not None:
        text_note = (
            f"no open_clip file: train.embed_dim={spec.embed_dim} differs from {name}'s embedding "
            "size, so the trained projection does not fit the open_clip architecture"
        )
    write_text_atomic(out / CARD_FILE, model_card(spec, card or {}, paths, text_note))
    paths["model_card"] = str(out / CARD_FILE)
    return paths


def open_clip_state_dict(
    model: nn.Module, name: str, spec: EncoderSpec, seed: int
) -> tuple[dict[str, torch.Tensor], str]:
    """Full CLIP state dict: trained vision tower + a text tower (trained or as initialised)."""
    text = getattr(model, "text", None)
    if text is not None and isinstance(text.proj, nn.Identity):
        base = {k: v for k, v in text.clip.state_dict().items() if not k.startswith("visual.")}
        for n in text.removed_scalars:  # open_clip's own logit scale/bias <- the trained ones
            base[n] = getattr(model, n).detach().reshape(())
        note = "text tower: trained jointly with the image tower (SigLIP objective)"
    else:
        torch.manual_seed(seed)
        fresh = create_open_clip(name, spec.pretrained, spec.image_size)
        base = {k: v for k, v in fresh.state_dict().items() if not k.startswith("visual.")}
        src = f"pretrained '{spec.pretrained}'" if spec.pretrained else f"random init (seed {seed})"
        note = (
            f"text tower: NOT trained — as initialised ({src}); only the vision tower was trained"
        )
    visual = {f"visual.{k}": v for k, v in model.encoder.backbone.state_dict().items()}
    return {**base, **visual}, note


def model_card(
    spec: EncoderSpec, card: dict[str, Any], paths: dict[str, str], text_note: str | None
) -> str:
    lines = [
        "# megaclass encoder",
        "",
        f"- backbone: `{spec.model}` (init: {spec.pretrained or 'random'})",
        f"- embedding size: {spec.embed_dim}, input: {spec.image_size}x{spec.image_size} RGB",
        "- output: unnormalised embeddings; L2-normalise them for cosine retrieval",
    ]
    if text_note:
        lines.append(f"- {text_note}")
    lines += ["", "## Files", ""] + [f"- {k}: `{Path(v).name}`" for k, v in paths.items()]
    lines += [
        "",
        "Load with `megaclass.training.export.load_encoder(path)`"
        + (
            f", or `open_clip.create_model('{open_clip_name(spec.model)}', pretrained='{OPEN_CLIP_FILE}')`."
            if "open_clip" in paths
            else "."
        ),
    ]
    for title, key in (("Training", "training"), ("Data", "data"), ("Evaluation", "eval")):
        if card.get(key):
            lines += [
                "",
                f"## {title}",
                "",
                "```json",
                json.dumps(card[key], indent=2, default=str),
                "```",
            ]
    if not card.get("eval"):
        lines += ["", "## Evaluation", "", "Not evaluated yet (run `megaclass eval`)."]
    if card.get("config"):
        lines += ["", "## Config", "", "```yaml", card["config"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_encoder(path_or_run_dir: str | Path) -> tuple[nn.Module, Any]:
    """(encoder in eval mode, its eval transform) from an export or a run directory.

    Accepts ``encoder.safetensors``, a folder holding it (``RUN/export``), a checkpoint folder
    (``RUN/train/ckpt/step-N``), or a run directory:
    there ``RUN/export/encoder.safetensors`` if present, else the newest complete checkpoint in
    ``RUN/train/ckpt`` (so eval can run on an unfinished training run).
    """
    p = Path(path_or_run_dir)
    cand = [p] if p.is_file() else [p / ENCODER_FILE, p / "export" / ENCODER_FILE]
    for f in cand:
        if f.is_file():
            return _load_export(f)

    if (p / MARKER).is_file():  # a checkpoint folder itself
        return _load_checkpoint(p, read_marker(p))
    ck = latest_complete(p / "train" / "ckpt") if p.is_dir() else None
    if ck is not None:
        return _load_checkpoint(ck, read_marker(ck))
    raise FileNotFoundError(
        f"{p}: no {ENCODER_FILE}, no RUN/export/{ENCODER_FILE} and no complete checkpoint "
        "under train/ckpt"
    )


def _finish(enc: nn.Module, sd: dict[str, torch.Tensor], where: Path) -> tuple[nn.Module, Any]:
    missing, unexpected = enc.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match the encoder spec "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    enc.float().eval()
    return enc, enc.transform_eval


def _load_export(f: Path) -> tuple[nn.Module, Any]:
    cfg_path = f.with_name(ENCODER_JSON)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{f}: its config {cfg_path.name} is missing next to it")
    spec = EncoderSpec.from_dict(json.loads(cfg_path.read_text())["spec"])
    return _finish(encoder_from_spec(spec), load_file(str(f)), f)


def _load_checkpoint(ck: Path, marker: dict[str, Any]) -> tuple[nn.Module, Any]:
    spec = EncoderSpec.from_dict(marker["encoder_spec"])
    states = ck / "mp_rank_00_model_states.pt"
    blob = torch.load(states, map_location="cpu", weights_only=True)
    module = blob["module"]
    sd = {k[len("encoder.") :]: v for k, v in module.items() if k.startswith("encoder.")}
    return _finish(encoder_from_spec(spec), sd, states)
