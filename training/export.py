"""Export the trained encoder and load it back (for eval, or for users).

``RUN/export/`` after training:

* ``encoder.safetensors`` + ``encoder.json`` — the student (backbone + projection) and the
  spec that rebuilds its architecture; :func:`load_encoder` reads them.
* ``open_clip_model.safetensors`` (open_clip backbones whose width equals ``embed_dim``) — a
  full CLIP state dict with the trained vision tower, loadable with
  ``open_clip.create_model(name, pretrained=file)``; open_clip insists on a text tower, so it
  carries one: trained for SigLIP, otherwise as initialised (the card says which).
* ``open_clip_config.json`` (with the open_clip file) — the architecture and preprocessing in
  open_clip's hub layout, so ``open_clip.create_model_and_transforms("local-dir:RUN/export")``
  loads the folder as it is, and ``"hf-hub:ORG/NAME"`` once the folder is pushed to the hub
  (``megaclass export RUN --push ORG/NAME``); no model registration is needed on that side.
* ``MODEL_CARD.md`` — config, data, training summary and eval numbers when known.
* ``README.md`` — the same card with the hub's metadata front matter (library, license, tags,
  datasets), which the Hugging Face hub shows as the model page.

Why the weights use open_clip's hub file name (``open_clip_model.safetensors``): its ``hf-hub:``
loader tries that file before the pickled ``open_clip_pytorch_model.bin``, and its ``local-dir:``
loader prefers that name among the folder's weight files, so one safetensors file serves both
and no pickle is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from megaclass.core.atomic import (
    atomic_path,
    makedirs_durable,
    write_json_atomic,
    write_text_atomic,
)
from megaclass.training.checkpoint import MARKER, latest_complete, read_marker
from megaclass.training.encoders import (
    Encoder,
    EncoderSpec,
    create_open_clip,
    encoder_from_spec,
    open_clip_name,
    register_tiny_configs,
)
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
ENCODER_JSON = "encoder.json"
OPEN_CLIP_FILE = "open_clip_model.safetensors"
CARD_FILE = "MODEL_CARD.md"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's HF_CONFIG_NAME
HUB_CARD_FILE = "README.md"
OBJECTIVE_TAGS = {"pfc": "unicom", "mlcd": "mlcd", "siglip": "siglip"}
"""Hub tag per training objective (partial-FC margin softmax is Unicom's method)."""


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
    makedirs_durable(out)  # files go through atomic_path (fsync + rename + folder fsync)
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
    text_trained = False
    name = open_clip_name(spec.model)
    if name is not None and isinstance(enc.proj, nn.Identity):
        full, text_note = open_clip_state_dict(model, name, spec, seed)
        _save_safetensors(out / OPEN_CLIP_FILE, full, {"format": "open_clip", "model": name})
        paths["open_clip"] = str(out / OPEN_CLIP_FILE)
        hub_cfg = open_clip_hub_config(name, enc)
        write_json_atomic(out / OPEN_CLIP_CONFIG, hub_cfg)
        paths["open_clip_config"] = str(out / OPEN_CLIP_CONFIG)
        tok_note = save_hf_tokenizer(name, hub_cfg, out)
        if tok_note:
            text_note = f"{text_note}; {tok_note}"
        text = getattr(model, "text", None)
        text_trained = text is not None and isinstance(text.proj, nn.Identity)
    elif name is not None:
        text_note = (
            f"no open_clip file: train.embed_dim={spec.embed_dim} differs from {name}'s embedding "
            "size, so the trained projection does not fit the open_clip architecture"
        )
    if "open_clip" not in paths:  # an earlier export into this folder must not load instead
        for stale in (OPEN_CLIP_FILE, OPEN_CLIP_CONFIG):
            (out / stale).unlink(missing_ok=True)
    body = model_card(spec, card or {}, paths, text_note)
    write_text_atomic(out / CARD_FILE, body)
    paths["model_card"] = str(out / CARD_FILE)
    front = hub_metadata(spec, card or {}, "open_clip" in paths, text_trained)
    write_text_atomic(out / HUB_CARD_FILE, front_matter(front) + "\n" + body)
    paths["hub_card"] = str(out / HUB_CARD_FILE)
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
    if "open_clip_config" in paths:
        lines += ["", *open_clip_usage(card.get("repo_id"))]
    if card.get("eval_table"):
        lines += ["", "## Evaluation", "", card["eval_table"].rstrip()]
    for title, key in (("Training", "training"), ("Data", "data"), ("Evaluation", "eval")):
        if key == "eval" and card.get("eval_table"):
            continue  # the table above says it; the raw metrics stay in RUN/eval/metrics.json
        if card.get(key):
            lines += [
                "",
                f"## {title}",
                "",
                "```json",
                json.dumps(card[key], indent=2, default=str),
                "```",
            ]
    if not card.get("eval") and not card.get("eval_table"):
        lines += ["", "## Evaluation", "", "Not evaluated yet (run `megaclass eval`)."]
    if card.get("config"):
        lines += ["", "## Config", "", "```yaml", card["config"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def open_clip_usage(repo_id: str | None) -> list[str]:
    """The card's "Use with open_clip" section (the hub id when known, else a placeholder)."""
    hub = repo_id or "ORG/NAME"
    return [
        "## Use with open_clip",
        "",
        "```python",
        "import open_clip",
        "",
        "# this folder, as it is:",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/export")',
        f"# or, once pushed to the Hugging Face hub (`megaclass export RUN --push {hub}`):",
        f'model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{hub}")',
        "features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)",
        "```",
        "",
        "`preprocess` is the encoder's eval transform (shortest-side bilinear resize, centre "
        "crop, the training mean/std), so these features equal the trainer's.",
    ]


def open_clip_hub_config(name: str, enc: Encoder) -> dict[str, Any]:
    """``open_clip_config.json``: what open_clip's ``local-dir:`` / ``hf-hub:`` loader builds.

    ``model_cfg`` is the architecture as the trainer built it (the registered config with the
    image size it was trained at), written out in full so that the loading side needs no
    registration (the tiny test configs included). ``preprocess_cfg`` reproduces the encoder's
    eval transform — shortest-side bilinear resize, centre crop, its mean/std — so open_clip's
    preprocessing feeds the model the same tensors as :func:`load_encoder`'s transform.
    """
    import open_clip

    register_tiny_configs()
    model_cfg = open_clip.get_model_config(name)  # a deep copy
    if model_cfg is None:  # create_open_clip built it, so the name is known; guard anyway
        raise ValueError(f"open_clip has no config named {name!r}")
    size = model_cfg["vision_cfg"].get("image_size")
    if size is not None and size != enc.spec.image_size:  # as create_open_clip forced it
        model_cfg["vision_cfg"]["image_size"] = enc.spec.image_size
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(enc.mean),
            "std": list(enc.std),
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        },
    }


def save_hf_tokenizer(name: str, hub_cfg: dict[str, Any], out: Path) -> str | None:
    """Tokenizer files for architectures with a Hugging Face tokenizer (SigLIP, …).

    open_clip's ``local-dir:`` tokenizer reads them from the folder itself (``hf-hub:`` uses the
    name in the config instead). CLIP's own BPE tokenizer ships with open_clip: nothing to save.
    Returns a note for the card when the files could not be written (e.g. offline, not cached).
    """
    if not hub_cfg["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name"):
        return None
    import open_clip

    try:
        open_clip.get_tokenizer(name).save_pretrained(str(out))
    except Exception as e:  # the weights are exported regardless; say what is missing
        log.warning("export: tokenizer files of %s not saved (%s)", name, e)
        return (
            "tokenizer files missing (`local-dir:` text tokenization needs them; "
            f"`hf-hub:` fetches the tokenizer itself): {type(e).__name__}"
        )
    return None


def package_license() -> str | None:
    """The hub licence id of this package (pyproject's ``license``, e.g. ``apache-2.0``)."""
    try:
        text = importlib.metadata.metadata("megaclass").get("License")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return None
    return text.strip().lower() if text else None


def hub_metadata(
    spec: EncoderSpec, card: dict[str, Any], open_clip_ok: bool, text_trained: bool
) -> dict[str, Any]:
    """The hub's model-card metadata (the README front matter).

    Why ``pipeline_tag`` depends on the text tower: zero-shot classification is only honest
    when the text tower was trained with the image tower (SigLIP); otherwise the model is an
    image feature extractor. ``library_name: open_clip`` only when open_clip can load the folder.
    """
    objective = card.get("objective") or ("siglip" if spec.with_text else None)
    tags = ["megaclass", "image-retrieval"]
    if open_clip_ok:
        tags.insert(0, "open_clip")
    if objective in OBJECTIVE_TAGS:
        tags.append(OBJECTIVE_TAGS[objective])
    meta: dict[str, Any] = {}
    if open_clip_ok:
        meta["library_name"] = "open_clip"
    lic = package_license()
    if lic:
        meta["license"] = lic
    meta["pipeline_tag"] = (
        "zero-shot-image-classification" if text_trained else "image-feature-extraction"
    )
    meta["tags"] = tags
    if card.get("datasets"):
        meta["datasets"] = list(card["datasets"])
    return meta


def front_matter(meta: dict[str, Any]) -> str:
    """``---`` YAML ``---`` as the hub reads it at the top of README.md."""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


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
