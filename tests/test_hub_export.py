"""The export in open_clip's hub layout: ``local-dir:`` (and ``hf-hub:``) loading, the hub model
card, and ``megaclass export`` on a real training checkpoint.

``hf-hub:`` is exercised without a network: the export folder is placed in a Hugging Face cache
laid out as a download leaves it, and huggingface_hub runs offline (HF_HUB_OFFLINE=1), so
open_clip's hub code path resolves exactly the file names the folder holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from megaclass.core.atomic import write_json_atomic
from megaclass.pipelines.config import TrainConfig
from megaclass.pipelines.export import export_run_dir
from megaclass.pipelines.export import main as export_main
from megaclass.pipelines.retrieval import evaluate_features
from megaclass.training.checkpoint import MARKER, step_tag
from megaclass.training.encoders import TINY_OPEN_CLIP_CONFIGS, build_student
from megaclass.training.export import export_encoder, load_encoder
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import _env, write_shards, write_train_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = "megaclass-tiny-vit"


def _perturb(model: torch.nn.Module) -> None:
    torch.manual_seed(123)  # "trained" weights: anything different from a fresh init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def _image(seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    return Image.fromarray(arr)  # not square, not the model size: resize + crop both matter


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), card[:80]
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def test_local_dir_loads_the_export_with_the_trainers_features(tmp_path):
    torch.manual_seed(0)
    model = build_student(TrainConfig(model=f"open_clip:{TINY}", embed_dim=32), image_size=32)
    _perturb(model)
    model.eval()
    paths = export_encoder(model, tmp_path, {"objective": "pfc", "datasets": ["org/pets"]})
    assert {"open_clip", "open_clip_config", "hub_card"} <= set(paths)
    hub_cfg = json.loads((tmp_path / "open_clip_config.json").read_text())
    # the whole architecture is in the file: no registration of the tiny config needed to load
    assert hub_cfg["model_cfg"] == TINY_OPEN_CLIP_CONFIGS[TINY]
    assert hub_cfg["preprocess_cfg"]["mean"] == list(model.encoder.mean)

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    clip.eval()
    img = _image()
    x = preprocess(img)[None]
    assert torch.equal(x, model.encoder.transform_eval(img)[None])  # same eval transform
    with torch.no_grad():
        assert torch.allclose(clip.encode_image(x), model.encoder(x), atol=1e-6)

    card = (tmp_path / "README.md").read_text()
    meta = front_matter(card)
    pyproject = (REPO / "pyproject.toml").read_text()
    license_ = re.search(r'license = \{ text = "([^"]+)" \}', pyproject).group(1)
    assert meta["library_name"] == "open_clip" and meta["license"] == license_.lower()
    assert meta["datasets"] == ["org/pets"] and {"open_clip", "unicom"} <= set(meta["tags"])
    # pfc trains no text tower: not a zero-shot classifier
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert 'create_model_and_transforms("local-dir:' in card and "NOT trained" in card
    assert card.endswith((tmp_path / "MODEL_CARD.md").read_text())  # same body as the card


def test_no_open_clip_layout_when_the_projection_does_not_fit(tmp_path):
    model = build_student(TrainConfig(model=f"open_clip:{TINY}", embed_dim=16), image_size=32)
    paths = export_encoder(model, tmp_path)
    assert "open_clip_config" not in paths and not (tmp_path / "open_clip_config.json").exists()
    meta = front_matter((tmp_path / "README.md").read_text())
    assert "library_name" not in meta and "open_clip" not in meta["tags"]
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")


# --------------------------------------------------------------------------------------
# `megaclass export` on a real checkpoint (one single-process SigLIP training, 2 steps)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """A finished training run with complete checkpoints at steps 1 and 2 and its export."""
    root = tmp_path_factory.mktemp("hub")
    shard_dir, _ = write_shards(root / "shards")
    run = root / "run"
    write_train_config(
        root / "cfg.yaml",
        run,
        str(shard_dir / "train-{000000..000001}.tar"),
        {
            "objective": "siglip",
            "model": f"open_clip:{TINY}",
            "embed_dim": 32,
            "steps": 2,
            "micro_batch_size": 8,
            "lr": 1e-2,  # large enough that steps 1 and 2 differ clearly
            "warmup_steps": 1,
            "ckpt_every": 1,
            "keep_last": 2,
            "log_every": 1,
        },
    )
    cmd = [sys.executable, "-m", "megaclass.pipelines.train", str(root / "cfg.yaml")]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return run


def _eval_summary(run: Path) -> dict:
    """RUN/eval/metrics.json as the eval stage writes it (metrics from the real evaluator)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 60).tolist()
    centers = rng.normal(size=(6, 32))
    encoders = {}
    for name, noise, dim in (("teacher", 2.0, 32), ("student", 1.0, 32)):
        x = centers[y][:, :dim] + noise * rng.normal(size=(60, dim))
        res = evaluate_features(x, y, (1, 2), 5, [16], skip_oversized=True)
        encoders[name] = {"kind": name, "spec": name, "dim": dim, **res}
    summary = {
        "stage": "eval",
        "eval_set": {"n": 60, "classes": 6},
        "encoders": encoders,
        "encoder_order": ["teacher", "student"],
    }
    write_json_atomic(run / "eval" / "metrics.json", summary)
    return summary


FRESH_LOAD = """
import sys, open_clip, torch
x = torch.load(sys.argv[1], weights_only=True)
out = {}
for name in sys.argv[2:]:  # plain open_clip: nothing of megaclass is imported or registered
    model, _, _ = open_clip.create_model_and_transforms(name)
    model.eval()
    with torch.no_grad():
        tok = open_clip.get_tokenizer(name)(["a picture of class 1", "a picture of class 2"])
        out[name] = (model.encode_image(x), model.encode_text(tok), model.logit_scale)
torch.save(out, sys.argv[1] + ".out")
"""


@pytest.mark.slow
def test_export_command_exports_the_chosen_checkpoint(siglip_run, tmp_path, capsys):
    run = siglip_run
    ckpt = run / "train" / "ckpt"
    summary = _eval_summary(run)

    # default: the newest complete checkpoint, the same tensors as the trainer's own export
    assert export_main([str(run), "--out", str(tmp_path / "newest")]) == 0
    new = load_file(str(tmp_path / "newest" / "open_clip_model.safetensors"))
    at_train = load_file(str(run / "export" / "open_clip_model.safetensors"))
    assert new.keys() == at_train.keys() and all(torch.equal(new[k], at_train[k]) for k in new)
    capsys.readouterr()

    # --step 1: that checkpoint's encoder, loadable by open_clip in a fresh process
    out = tmp_path / "step1"
    assert export_main([str(run), "--step", "1", "--out", str(out), "--dataset", "org/pets"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["checkpoint"] == str(ckpt / "step-0000001")
    assert printed["open_clip_config"] == str(out / "open_clip_config.json")
    older = load_file(str(out / "open_clip_model.safetensors"))
    assert not torch.equal(older["visual.conv1.weight"], new["visual.conv1.weight"])
    # a Hugging Face cache as a download of the pushed folder leaves it
    hf_cache = tmp_path / "hf"
    snap = hf_cache / "models--megaclass-test--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in out.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)

    enc, tf = load_encoder(ckpt / "step-0000001")  # straight from the DeepSpeed checkpoint
    x = torch.stack([tf(_image(s)) for s in range(3)])
    with torch.no_grad():
        ref = enc(x)
    probe = tmp_path / "probe.pt"
    torch.save(x, probe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache)}
    names = [f"local-dir:{out}", "hf-hub:megaclass-test/tiny"]
    res = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, str(probe), *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    got = torch.load(str(probe) + ".out", weights_only=True)
    step1 = torch.load(ckpt / "step-0000001" / "mp_rank_00_model_states.pt", weights_only=True)
    for name in names:
        img, _, scale = got[name]
        assert torch.allclose(img, ref, atol=1e-5), name
        assert torch.equal(scale.reshape(1), step1["module"]["logit_scale"].float())
    assert torch.equal(got[names[0]][1], got[names[1]][1])  # the same text tower both ways

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["datasets"] == ["org/pets"] and "siglip" in meta["tags"]
    assert meta["pipeline_tag"] == "zero-shot-image-classification"  # text tower trained too
    assert "step-0000001" in card and "| encoder | dim | R@1 | R@2 |" in card
    student = summary["encoders"]["student"]["full"]["recall@1"]
    assert f"| `student` | 32 | {100 * student:.1f} |" in card


def test_export_command_names_what_is_wrong(tmp_path, capsys):
    assert export_main([str(tmp_path)]) == 2
    assert "no complete checkpoint to export" in capsys.readouterr().err
    ckpt = tmp_path / "train" / "ckpt"
    for step, complete in ((1, True), (2, True), (3, False)):  # 3: a save cut short by a kill
        (ckpt / step_tag(step)).mkdir(parents=True)
        if complete:
            write_json_atomic(ckpt / step_tag(step) / MARKER, {"step": step, "world_size": 1})
    assert export_main([str(tmp_path), "--step", "7"]) == 2
    assert "no checkpoint of step 7; complete checkpoints: 1, 2" in capsys.readouterr().err
    assert export_main([str(tmp_path), "--step", "3"]) == 2
    assert "step-0000003 is incomplete" in capsys.readouterr().err


@pytest.mark.slow
def test_export_adds_the_eval_table_to_the_training_wandb_run(siglip_run, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for k, v in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = tmp_path / "run"
    shutil.copytree(siglip_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run_dir"] = str(run)
    cfg["train"]["wandb_project"] = "megaclass-test"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    _eval_summary(run)
    assert export_run_dir(run)["wandb_eval_table"] == "logged"
    wandb.teardown()  # flush W&B's service before reading its files
    (table,) = (run / "train" / "wandb").glob("offline-run-*/files/media/table/eval/*.json")
    data = json.loads(table.read_text())
    assert data["columns"][:4] == ["encoder", "dim", "R@1", "R@2"]
    assert [(r[0], r[1]) for r in data["data"]] == [
        ("teacher", 32),
        ("teacher", 16),
        ("student", 32),
        ("student", 16),
    ]
