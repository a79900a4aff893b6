"""End-to-end train stage: real multi-process DeepSpeed (CPU, gloo) on tiny synthetic shards.

Every run is a real launch: the deepspeed launcher, torchrun, and an srun-style start (two
processes given only SLURM_* variables). To keep the suite short the assertions are grouped
per run: one pfc run carries loss/head/backbone/export checks, an interrupted + resumed pfc
run is compared with it, an mlcd run (ZeRO-1) is re-sharded 2 → 1 rank, a SigLIP run checks
its loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from megaclass.core.net import free_port
from megaclass.data.labels import file_sha256, write_labels
from megaclass.data.writer import ShardWriter
from PIL import Image

pytestmark = pytest.mark.slow

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
NCLS = 8
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (220, 30, 220),
          (30, 220, 220), (240, 240, 240), (90, 90, 90)]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def write_shards(out: Path):
    """2 shards x 32 samples, 8 visually distinct classes; keys -> class for the sidecars."""
    rng = np.random.default_rng(0)
    keys: dict[str, list[tuple[str, int]]] = {}
    with ShardWriter(out, prefix="train-", maxcount=32, image_ext="png") as w:
        for i in range(64):
            c = i % NCLS
            arr = np.clip(np.array(COLORS[c]) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            arr[:, : 4 + c * 3] = 0  # a class-dependent bar as well
            key = f"{i:06d}"
            w.write(
                key,
                Image.fromarray(arr.astype(np.uint8)),
                f"a picture of class {c}",
                {"class": str(c)},
            )
            keys.setdefault(f"train-{i // 32:06d}", []).append((key, c))
    return out, keys


def write_label_sidecars(
    run: Path, keys: dict[str, list[tuple[str, int]]], sha: str, top: int = 4, ncls: int = NCLS
) -> None:
    """RUN/labels/<shard>.parquet for the shards of ``keys`` (shard stem -> [(key, class)]):
    per sample its class, then the next ``top - 1`` classes (mod ``ncls``), every score 1.

    Shared with tests/test_elastic.py (loaded with runpy), so that every end-to-end training
    test writes its sidecars the way the assign stage lays them out."""
    for stem, items in keys.items():
        cls = np.array([c for _, c in items])
        labels = np.stack([(cls + j) % ncls for j in range(top)], 1)
        write_labels(run / "labels" / f"{stem}.parquet", [k for k, _ in items], labels,
                     np.ones(labels.shape, np.float32), sha)  # fmt: skip


def write_train_config(
    path: Path, run: Path, shards: str, train: dict, shuffle_buffer: int = 16, **sections
) -> Path:
    """``path``: the config of a tiny test training of ``run`` on ``shards`` (seed 0, 32-px
    images read in the training process), the ``train`` section and any other ``sections``
    (``cluster={...}``).

    Shared with tests/test_elastic.py and tests/test_hub_export.py: the training tests differ
    in their train section only, not in how they read the data."""
    cfg = {
        "run_dir": str(run),
        "seed": 0,
        "data": {
            "shards": shards,
            "image_size": 32,
            "num_workers": 0,
            "shuffle_buffer": shuffle_buffer,
        },
        **sections,
        "train": train,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _make_run(root: Path, shards, name: str, **train) -> Path:
    """A run directory with centroids (+sha) and label sidecars, and its config file."""
    shard_dir, keys = shards
    run = root / name
    (run / "cluster").mkdir(parents=True)
    cent = np.random.default_rng(1).normal(size=(NCLS, 8)).astype(np.float32)
    np.save(run / "cluster" / "centroids.npy", cent)
    sha = file_sha256(run / "cluster" / "centroids.npy")
    (run / "cluster" / "centroids.sha256").write_text(sha)
    write_label_sidecars(run, keys, sha)
    tcfg = dict(
        objective="pfc",
        model="open_clip:megaclass-tiny-vit",
        embed_dim=32,
        steps=8,
        micro_batch_size=8,
        lr=3e-3,
        warmup_steps=1,
        ckpt_every=3,
        log_every=1,
        sample_rate=1.0,
        scale=16.0,
        margin_m=0.2,
        weight_decay=0.0,
    )
    tcfg.update(train)
    shard_spec = str(shard_dir / "train-{000000..000001}.tar")
    write_train_config(run / "cfg.yaml", run, shard_spec, tcfg, cluster={"k": NCLS})
    return run


def _env(**extra) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "MASTER_"))
    }
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _check(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"


def deepspeed_launch(target: list[str], n: int = 2, **env) -> None:
    cmd = [
        PY,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(n),
        "--master_port",
        str(free_port()),
        *target,
    ]
    _check(
        subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=400, cwd=REPO)
    )


def train_module(cfg: Path) -> list[str]:
    return ["--module", "megaclass.pipelines.train", str(cfg)]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]


def _heads(ck: Path, world: int) -> list[dict]:
    return [
        torch.load(ck / "head" / f"rank-{r:05d}-of-{world:05d}.pt", weights_only=True)
        for r in range(world)
    ]


def _ds_states(ck: Path) -> dict:
    out = {"model": torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]}
    for f in sorted(ck.glob("*optim_states.pt")):
        out[f.name] = torch.load(f, weights_only=False)["optimizer_state_dict"]
    return out


def assert_trees(a, b, leaf, where: str = "") -> None:
    """Walks two nested dict/list/tuple trees (checkpoint states) in step, asserting the same
    keys and lengths, and calls ``leaf(x, y, where)`` on every pair of leaves; ``where`` names
    the path in the failure message.

    Shared with tests/test_train_eval.py: the tests differ in how leaves compare (close here,
    identical there), not in how states are walked."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_trees(a[k], b[k], leaf, f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_trees(x, y, leaf, f"{where}[{i}]")
    else:
        leaf(a, b, where)


def _close_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), where


def _assert_close_tree(a, b, where=""):
    assert_trees(a, b, _close_tensors, where)


def _ds_shm_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


SHM_LEFT: dict[str, set[str]] = {}


@pytest.fixture(scope="module")
def pfc_run(tmp_path_factory, shards):
    run = _make_run(tmp_path_factory.mktemp("pfc"), shards, "full")
    before = _ds_shm_files()
    deepspeed_launch(train_module(run / "cfg.yaml"))
    SHM_LEFT["pfc"] = _ds_shm_files() - before
    return run


def test_pfc_two_ranks_learns_keeps_head_sharded_and_exports(pfc_run):
    run = pfc_run
    m = _metrics(run)
    assert [x["step"] for x in m] == list(range(1, 9))
    losses = [x["loss"] for x in m]
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2]), losses
    assert all(x["samples_per_s"] > 0 and 0 <= x["data_wait_share"] <= 1 for x in m)
    assert all(x["grad_norm"] is not None and x["lr"] > 0 for x in m)
    success = json.loads((run / "train" / "_SUCCESS.json").read_text())
    assert success["steps"] == 8 and success["world_size"] == 2 and success["bad_steps"] == 0
    # keep_last=2 of the checkpoints at 3, 6, 8; DeepSpeed's universal-checkpoint info saved
    ck = run / "train" / "ckpt" / "step-0000008"
    names = sorted(p.name for p in (run / "train" / "ckpt").glob("step-*"))
    assert names == ["step-0000006", "step-0000008"] and (ck / "COMPLETE.json").is_file()
    states = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)
    assert states["universal_checkpoint_info"]["universal_checkpoint_version"] == 0.2
    # the head stays model-parallel: each rank holds its own 4 of 8 classes, not a broadcast copy
    h0, h1 = _heads(ck, 2)
    w0, w1 = h0["head"]["weight"], h1["head"]["weight"]
    assert w0.shape == w1.shape == (NCLS // 2, 32) and not torch.allclose(w0, w1)
    # and the backbone is bit-identical on both ranks
    assert h0["trainer"]["backbone_checksum"] == h1["trainer"]["backbone_checksum"]
    # DeepSpeed's CPU all-reduce workspaces (64 MiB per rank in /dev/shm) were removed
    assert not SHM_LEFT["pfc"], SHM_LEFT
    # export: open_clip loads the full state dict and gives the student's features
    import open_clip
    from megaclass.training.encoders import register_tiny_configs
    from megaclass.training.export import load_encoder

    register_tiny_configs()
    clip = open_clip.create_model(
        "megaclass-tiny-vit", pretrained=str(run / "export" / "open_clip_model.safetensors")
    ).eval()
    enc, tf = load_encoder(run)
    enc_ck, _ = load_encoder(ck)  # straight from the DeepSpeed checkpoint
    x = tf(Image.new("RGB", (40, 40), COLORS[2]))[None]
    with torch.no_grad():
        assert torch.allclose(clip.encode_image(x), enc(x), atol=1e-5)
        assert torch.allclose(enc_ck(x), enc(x), atol=1e-6)
    assert "NOT trained" in (run / "export" / "MODEL_CARD.md").read_text()


def test_sigterm_then_resume_equals_uninterrupted(pfc_run, tmp_path, shards):
    run = _make_run(tmp_path, shards, "interrupted")
    deepspeed_launch(train_module(run / "cfg.yaml"), MEGACLASS_TEST_SIGNAL_AT_STEP="5")
    ckdir = run / "train" / "ckpt"
    assert not (run / "train" / "_SUCCESS.json").exists()
    assert sorted(p.name for p in ckdir.glob("step-*")) == ["step-0000003", "step-0000005"]
    assert (ckdir / "step-0000005" / "COMPLETE.json").is_file()
    deepspeed_launch(train_module(run / "cfg.yaml"))  # resumes from step 5
    success = json.loads((run / "train" / "_SUCCESS.json").read_text())
    assert success["resumed_from"].endswith("step-0000005")
    a, b = pfc_run / "train" / "ckpt" / "step-0000008", ckdir / "step-0000008"
    _assert_close_tree(_ds_states(a), _ds_states(b), "deepspeed")
    for ha, hb in zip(_heads(a, 2), _heads(b, 2)):
        _assert_close_tree(ha["head"], hb["head"], "head")
        _assert_close_tree(ha["head_opt"]["state"], hb["head_opt"]["state"], "head_opt")
        assert ha["loader"] is None  # saved once, world-size free: loader.json
    assert json.loads((a / "loader.json").read_text()) == json.loads(
        (b / "loader.json").read_text()
    )
    ma, mb = _metrics(pfc_run), _metrics(run)
    assert [x["step"] for x in mb] == list(range(1, 9))
    assert [x["loss"] for x in ma] == pytest.approx([x["loss"] for x in mb], rel=1e-6)


def _srun_style(cfg: Path, n: int = 2) -> None:
    """Start n ranks the way srun does: only SLURM_* variables (plus the master address)."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [PY, "-m", "megaclass.pipelines.train", str(cfg)],
            env=_env(
                SLURM_PROCID=str(r),
                SLURM_NTASKS=str(n),
                SLURM_LOCALID=str(r),
                SLURM_JOB_NODELIST="127.0.0.1",
                MASTER_PORT=port,
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for r in range(n)
    ]
    for p in procs:
        out, err = p.communicate(timeout=400)
        _check(subprocess.CompletedProcess(p.args, p.returncode, out, err))


def test_mlcd_srun_style_zero1_then_reshard_to_one_rank(tmp_path, shards):
    run = _make_run(
        tmp_path,
        shards,
        "mlcd",
        objective="mlcd",
        num_positive_labels=3,
        zero_stage=1,
        steps=4,
        ckpt_every=4,
    )
    _srun_style(run / "cfg.yaml")
    losses = [x["loss"] for x in _metrics(run)]
    assert len(losses) == 4 and sum(losses[-2:]) < sum(losses[:2]), losses
    # the same loss on a fixed batch: 2 ranks from the checkpoint as written ...
    out2, out1 = tmp_path / "probe2.json", tmp_path / "probe1.json"
    deepspeed_launch([str(REPO / "tests" / "train_probe.py"), str(run / "cfg.yaml"), str(out2)])
    # ... and 1 rank after the re-shard (head re-split + universal checkpoint): the manual
    # `megaclass train reshard` works, and a plain start on 1 rank does it itself (logged)
    ck = run / "train" / "ckpt" / "step-0000004"
    cli = [PY, "-m", "megaclass.pipelines.cli", "train", "reshard", str(run), "--world-size", "3"]
    _check(subprocess.run(cli, env=_env(), capture_output=True, text=True, cwd=REPO))
    assert json.loads((ck / "reshard-ws3.json").read_text())["universal"] is True
    assert (run / "train" / "ckpt" / "step-0000004_universal").is_dir()
    assert not (ck / "reshard-ws1.json").exists()
    res = subprocess.run(
        [PY, "-m", "megaclass.pipelines.train", str(run / "cfg.yaml"), "train.nproc=1",
         "train.micro_batch_size=16"],  # the same global batch of 16
        env=_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    _check(res)
    assert "re-sharding it now" in res.stderr
    assert json.loads((ck / "reshard-ws1.json").read_text())["universal"] is True
    _check(
        subprocess.run(
            [
                PY,
                str(REPO / "tests" / "train_probe.py"),
                str(run / "cfg.yaml"),
                str(out1),
                "train.micro_batch_size=16",
            ],  # fmt: skip
            env=_env(),
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    )
    p2, p1 = json.loads(out2.read_text()), json.loads(out1.read_text())
    assert p2["world_size"] == 2 and p1["world_size"] == 1 and p1["step"] == p2["step"] == 4
    assert p1["loss"] == pytest.approx(p2["loss"], rel=1e-5, abs=1e-6)


def test_siglip_under_torchrun(tmp_path, shards):
    run = _make_run(tmp_path, shards, "siglip", objective="siglip", steps=4, ckpt_every=4, lr=1e-3)
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megaclass.pipelines.train", str(run / "cfg.yaml")]  # fmt: skip
    _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=REPO))
    losses = [x["loss"] for x in _metrics(run)]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert "trained jointly" in (run / "export" / "MODEL_CARD.md").read_text()


NAN_SCRIPT = """
import sys, torch
from megaclass.pipelines.config import load_config
from megaclass.pipelines.train import make_job
from megaclass.training import trainer
from megaclass.training.heads import PartialFC

class NaNAfterTwo(PartialFC):
    def forward(self, emb, labels, step=None):
        loss = super().forward(emb, labels, step)
        return loss * float("nan") if int(self.step) > 2 else loss

def head(cfg, env, n):
    tc = cfg.train
    return NaNAfterTwo(n, tc.embed_dim, margin=tc.margin, scale=tc.scale, m=tc.margin_m)

cfg = load_config(sys.argv[1], sys.argv[2:])
try:
    trainer.train(make_job(cfg), make_head=head)
except trainer.NonFiniteLossError as e:
    print("STOPPED:", e)
"""


def test_non_finite_losses_are_skipped_then_stop(tmp_path, shards):
    run = _make_run(tmp_path, shards, "nan", steps=5, max_bad_steps=3, ckpt_every=100)
    res = subprocess.run(
        [PY, "-c", NAN_SCRIPT, str(run / "cfg.yaml")],
        env=_env(),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    _check(res)
    assert "STOPPED: 3 consecutive non-finite losses at step 2" in res.stdout, (
        res.stdout + res.stderr[-3000:]
    )
    assert "max_bad_steps=3" in res.stdout
    assert [x["step"] for x in _metrics(run)] == [1, 2]


def test_bf16_two_ranks_zero2_accum_learns_with_head_outside_engine(tmp_path, shards):
    run = _make_run(tmp_path, shards, "bf16", precision="bf16", zero_stage=2, grad_accum=2,
                    micro_batch_size=4, steps=6, ckpt_every=6)  # fmt: skip
    deepspeed_launch(train_module(run / "cfg.yaml"))
    losses = [x["loss"] for x in _metrics(run)]
    assert len(losses) == 6 and sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses
    ck = run / "train" / "ckpt" / "step-0000006"
    module = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {v.dtype for v in module.values() if v.is_floating_point()} == {torch.bfloat16}
    assert not any("head" in k or k == "weight" for k in module), "head inside the engine"
    # the head is ours: fp32, one distinct shard per rank, its own optimizer state
    h0, h1 = _heads(ck, 2)
    w0, w1 = h0["head"]["weight"], h1["head"]["weight"]
    assert w0.dtype == w1.dtype == torch.float32 and w0.shape == (NCLS // 2, 32)
    assert not torch.allclose(w0, w1)
    # its own optimizer stepped once per optimizer step (6), not per micro-batch (12)
    assert h0["head_opt"]["state"][0]["row_step"].tolist() == [6] * (NCLS // 2)
    assert h0["trainer"]["backbone_checksum"] == h1["trainer"]["backbone_checksum"]
    # DeepSpeed's CPU all-reduce workspaces (64 MiB per rank in /dev/shm) were removed
    assert not SHM_LEFT["pfc"], SHM_LEFT


def test_fp16_on_cpu_refused_naming_the_key(tmp_path, shards):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's DeepSpeed accelerator runs fp16 (covered by the GPU CI)")
    run = _make_run(tmp_path, shards, "fp16", precision="fp16")
    res = subprocess.run([PY, "-m", "megaclass.pipelines.train", str(run / "cfg.yaml")],
                         env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip
    assert res.returncode == 2, res.stderr[-3000:]
    assert "config error: train.precision: fp16 is not supported" in res.stderr


# ======================================================================================
# The training step at world sizes 1, 2, 4 (gloo) == one float64 process
# ======================================================================================
# Same global batch of 16 per step, split as (micro-batch, accumulation) = (8, 2) on 1 rank,
# (8, 1) on 2, (2, 2) on 4 ranks. The real trainer.train() runs (DeepSpeed engine in fp32,
# PartialFC head outside it with grad_average, its own SGD + head_lr_mult, clipping of both,
# weight decay, warm-up + cosine LR); the reference is written here in float64 from the
# definitions: dense ArcFace softmax over all classes (tests/test_partial_fc.py's reference),
# torch.optim.SGD, clip coefficient min(1, c / (‖g‖ + 1e-6)) for backbone and head separately.
# Each step is a fresh random batch with random labels (the loss is not expected to fall).
# Tolerance: the distributed side is fp32 (ε ≈ 1.2e-7); the parameters' distance from the
# float64 result, relative to how far training moved them, measures ≈ 1e-6 (backbone) and
# ≤ 5e-7 (head) at every world size; 2e-5 leaves a 20× margin, while a wrong factor is far
# outside it (backbone gradient × 2 on the unclipped steps: 0.21; head lr without
# head_lr_mult: 0.69).

WS_SPLIT = {1: (8, 2), 2: (8, 1), 4: (2, 2)}
WS_STEPS, WS_BATCH, WS_CLASSES, WS_DIM = 3, 16, 10, 16
TOL_WS = 2e-5
WS_TRAIN = dict(objective="pfc", model="open_clip:megaclass-tiny-vit", embed_dim=WS_DIM,
                optimizer="sgd", lr=0.03, head_lr_mult=3.0, weight_decay=0.01, warmup_steps=1,
                grad_clip=20.0, sample_rate=1.0, margin="arcface", margin_m=0.3, scale=16.0,
                steps=WS_STEPS, ckpt_every=1000, log_every=1, precision="fp32", zero_stage=0)  # fmt: skip
PFC_TESTS = REPO / "tests" / "test_partial_fc.py"


def _pfc_test_module() -> dict:
    """tests/test_partial_fc.py's globals: its gloo launcher and its float64 head reference."""
    import runpy

    return runpy.run_path(str(PFC_TESTS), run_name="test_partial_fc_helpers")


def _ws_data():
    g = torch.Generator().manual_seed(42)
    x = torch.randn(WS_STEPS, WS_BATCH, 3, 32, 32, generator=g)
    y = torch.randint(0, WS_CLASSES, (WS_STEPS, WS_BATCH), generator=g)
    w0 = 0.1 * torch.randn(WS_CLASSES, WS_DIM, generator=g)  # head grads ~ backbone grads
    return x, y, w0


def _ws_cfg(run: Path, world: int):
    from megaclass.pipelines.config import load_config

    micro, accum = WS_SPLIT[world]
    kv = {**WS_TRAIN, "micro_batch_size": micro, "grad_accum": accum}
    over = [f"train.{k}={v}" for k, v in kv.items()]
    return load_config(None, [f"run_dir={run}", "seed=0", "data.image_size=32",
                              f"cluster.k={WS_CLASSES}", *over])  # fmt: skip


def _ws_checks(rank: int, world: int) -> dict:
    """In a gloo rank: trainer.train() on this rank's slices of the fixed global batches."""
    from megaclass.pipelines.train import make_job
    from megaclass.training import trainer

    x, y, w0 = _ws_data()
    micro, accum = WS_SPLIT[world]

    class Slices:  # micro-step j of step t: rows [j·W·m + r·m, +m) of the global batch
        def __iter__(self):
            for t in range(WS_STEPS):
                for j in range(accum):
                    lo = j * world * micro + rank * micro
                    yield {"image": x[t, lo : lo + micro], "label": y[t, lo : lo + micro]}

    def head(cfg, env, n):
        h = trainer.build_head(cfg, env, n)
        h.load_full_weight(w0)
        return h

    cfg = _ws_cfg(Path(os.environ["MEGACLASS_WS_RUNS"]) / f"ws{world}", world)
    trainer.train(make_job(cfg), make_loader=lambda *a: Slices(), make_head=head, resume=False)
    return {"fails": []}


if __name__ == "__gloo_worker__":
    _pfc_test_module()["_worker"](**GLOO, checks=_ws_checks)  # noqa: F821 (set by spawn_gloo)


def _ws_reference(ref_loss) -> dict:
    """float64, one process, the whole global batch per step."""
    import math
    import random

    from megaclass.pipelines.config import TrainConfig
    from megaclass.training.encoders import build_student

    x, y, w0 = _ws_data()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # what trainer.setup() seeds
    tc = TrainConfig(**WS_TRAIN)
    model = build_student(tc, 32).double().train()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    w = torch.nn.Parameter(w0.double().clone())
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.SGD(groups, lr=tc.lr, momentum=0.9)
    hopt = torch.optim.SGD([w], lr=tc.lr * tc.head_lr_mult, momentum=0.9, weight_decay=0.01)
    losses, coefs = [], {"backbone": [], "head": []}
    for t in range(WS_STEPS):
        f = 1.0 if t < 1 else 0.5 * (1 + math.cos(math.pi * (t - 1) / (WS_STEPS - 1)))
        for o, base in ((opt, tc.lr), (hopt, tc.lr * tc.head_lr_mult)):
            for gr in o.param_groups:
                gr["lr"] = base * f
        opt.zero_grad(), hopt.zero_grad()
        loss = ref_loss("arcface", {"m": 0.3}, model(x[t].double()), w[:, None, :], y[t])
        loss.backward()
        losses.append(float(loss.detach()))
        for part, ps in (("backbone", params), ("head", [w])):
            norm = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in ps)))
            coefs[part].append(tc.grad_clip / (norm + 1e-6))
            for p in ps:
                p.grad.mul_(min(1.0, coefs[part][-1]))
        opt.step(), hopt.step()
    # Clipping must act on some steps and not on others, for both parts, clearly away from
    # the threshold: clipped steps check the clipping, unclipped ones the gradient's scale
    # (clipping to a norm hides a wrong scale factor, e.g. a missing 1/W).
    for part, cs in coefs.items():
        assert min(cs) < 0.95 and max(cs) > 1.1, (part, cs)
    return {"losses": losses, "init": init, "model": model.state_dict(), "head": w.detach()}


@pytest.fixture(scope="module")
def ws_reference():
    return _ws_reference(_pfc_test_module()["ref_loss"])


def _rel_err(got: dict, ref: dict, init: dict) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref − θ_0‖ over all tensors: the error relative to what training moved."""
    num = sum(float((got[k].double() - ref[k]).pow(2).sum()) for k in ref)
    den = sum(float((ref[k] - init[k]).pow(2).sum()) for k in ref)
    return (num / den) ** 0.5


@pytest.mark.parametrize("world", [1, 2, 4])
def test_training_step_equals_float64_reference(world, ws_reference, tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACLASS_WS_RUNS", str(tmp_path))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    results = _pfc_test_module()["spawn_gloo"](world, timeout=300, script=__file__)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails)
    run = tmp_path / f"ws{world}"
    ref = ws_reference
    losses = [m["loss"] for m in _metrics(run)]
    assert losses == pytest.approx(ref["losses"], rel=1e-5), (losses, ref["losses"])
    ck = run / "train" / "ckpt" / f"step-{WS_STEPS:07d}"
    module = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert set(module) == set(ref["model"])
    err_backbone = _rel_err(module, ref["model"], ref["init"])
    head = torch.cat([h["head"]["weight"] for h in _heads(ck, world)])
    w0 = _ws_data()[2].double()
    err_head = _rel_err({"w": head}, {"w": ref["head"]}, {"w": w0})
    print(f"world {world}: relative error backbone {err_backbone:.2e}, head {err_head:.2e}")
    assert err_backbone < TOL_WS and err_head < TOL_WS, (err_backbone, err_head)


def test_train_step_benchmark_smoke(tmp_path):
    """benchmarks/train_step.py end to end with tiny settings (one process): it must finish."""
    out = tmp_path / "bench.json"
    cmd = [PY, str(REPO / "benchmarks" / "train_step.py"), "--steps", "2", "--warmup", "2",
           "--rounds", "1", "--batch", "4", "--classes", "50", "--loader-samples", "32",
           "--out", str(out)]  # fmt: skip
    _check(subprocess.run(cmd, env=_env(TMPDIR=str(tmp_path)), capture_output=True, text=True,
                          timeout=300, cwd=REPO))  # fmt: skip
    res = json.loads(out.read_text())
    assert res["world_size"] == 1 and res["ratio_ours_over_ddp"] > 0
    assert 0 <= res["data_wait_share"] <= 1 and res["real_loader_samples_per_s"] > 0
    assert not (tmp_path / "megaclass-bench-train").exists()  # cleaned up
